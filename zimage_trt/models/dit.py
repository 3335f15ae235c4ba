"""The Z-Image DiT (``NextDiT`` / diffusers ``ZImageTransformer2DModel``), compact and export-ready.

Parameter names are the ORIGINAL / ComfyUI single-file layout (fused ``attention.qkv``), so
ComfyUI checkpoints load without renaming and LoRAs fuse straight into the fused projection;
``zimage_trt.models.dit_keys`` converts diffusers folders and reads a config off the weights.

The network is split in the two graphs the runtime calls:

* ``caption_tokens(cap_feats, cap_mask)``: caption embedder + context refiner. It depends on the
  prompt only, so the runtime runs it once per prompt (``CaptionPath`` wraps it for export).
* ``ZImageDiT.forward(latents, sigma, cap_tokens, cap_valid)``: the denoiser, in ComfyUI's
  convention: it takes σ and returns v with x0 = x − σ·v.

Both forwards are tensor-only with symbolic shapes: no lists, no complex numbers, no Python value
derived from tensor contents. Per-item caption lengths live in masks; sizes are rounded up to
multiples of 32 with size arithmetic only, and the per-item ``ceil(n/32)·32`` is a float ceil by
the constant 32 (the ONNX exporter rejects ``%``/``//`` between a tensor and a symbolic size).

RoPE angles are float64 products rounded to float32 (as the reference tables); a TensorRT graph
has no float64, so exported graphs gather the same values from fp32 tables (``RopeTables``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SEQ_MULTIPLE = 32  # captions and image tokens are padded to multiples of this with pad tokens
ADALN_MAX_DIM = 256  # diffusers/ComfyUI: the timestep embedding is min(dim, 256) wide
TIMESTEP_FREQ_DIM = 256  # width of the sinusoidal timestep features
TIMESTEP_MAX_PERIOD = 10000.0
FINAL_NORM_EPS = 1e-6
VAE_DOWNSCALE = 8  # latent pixel → image pixels, for error messages


# the parts NVIDIA leaves in full precision when it quantizes FLUX / SD3 (ModelOpt's diffusers
# example), in this DiT's names: the embedders and the final layer
FULL_PRECISION_PARTS = ("x_embedder", "t_embedder", "cap_embedder", "final_layer")


@dataclass(frozen=True)
class DiTConfig:
    """Architecture of the Z-Image DiT; the defaults are Z-Image-Turbo's (6.15 B parameters)."""

    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    cap_feat_dim: int = 2560
    in_channels: int = 16
    patch_size: int = 2
    axes_dims: tuple[int, int, int] = (32, 48, 48)
    # Informational only: the size of the reference RoPE tables. This module computes the angles
    # for the actual positions, so nothing here caps the caption or image length.
    axes_lens: tuple[int, int, int] = (1536, 512, 512)
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    norm_eps: float = 1e-5
    qk_norm: bool = True
    t_embed_mid_dim: int = 1024  # diffusers hard-codes the timestep MLP's hidden width

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if sum(self.axes_dims) != self.head_dim or any(d % 2 for d in self.axes_dims):
            raise ValueError(
                f"axes_dims {self.axes_dims} must be even and sum to the head dim {self.head_dim}"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def adaln_dim(self) -> int:
        return min(self.dim, ADALN_MAX_DIM)

    @property
    def ffn_dim(self) -> int:
        # int(dim / 3 * 8) exactly as the reference (10240 for dim 3840), not 8 * dim // 3
        return int(self.dim / 3 * 8)

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.in_channels

    @classmethod
    def tiny(cls) -> DiTConfig:
        """A few-hundred-thousand-parameter DiT of the real architecture, for tests."""
        return cls(dim=64, n_layers=2, n_refiner_layers=2, n_heads=2, cap_feat_dim=32,
                   axes_dims=(8, 12, 12))  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    """RMSNorm with the reference's precision: statistics in fp32, cast to a half weight's dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        y = x * torch.rsqrt(variance + self.eps)  # promotes a half x to fp32
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            y = y.to(self.weight.dtype)
        return y * self.weight


def _axis_angles(positions: Tensor, dim: int, theta: float) -> Tensor:
    """fp32 angles [..., dim/2] of one RoPE axis: the float64 product, rounded once."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim
    inv_freq = 1.0 / (theta**exponents)
    return (positions.to(torch.float64).unsqueeze(-1) * inv_freq).float()


def rope_cos_sin(
    positions: Tensor, axes_dims: Sequence[int], theta: float
) -> tuple[Tensor, Tensor]:
    """cos and sin [..., head_dim/2] (fp32) of the RoPE angles for integer positions [..., n_axes].

    The angles are computed for the actual positions, never looked up in a fixed-size table, so
    captions of any length work: a float64 product rounded to float32, then fp32 cos/sin, which
    reproduces diffusers' tables to one ulp. An all-fp32 product would differ from it in ~10 % of
    the angles below position 4096, by up to 2.4e-4 rad. Frequencies are built here rather than
    held as buffers so that a model built on the ``meta`` device still exports them.
    """
    angles = [_axis_angles(positions[..., a], d, theta) for a, d in enumerate(axes_dims)]
    angle = torch.cat(angles, dim=-1)
    return angle.cos(), angle.sin()


class RopeTables(nn.Module):
    """The same cos/sin as ``rope_cos_sin``, looked up per axis in tables made when exporting.

    TensorRT has no float64 (it casts DOUBLE down to FLOAT), so an exported graph cannot form the
    float64 angle product; it gathers from fp32 tables computed here with exactly that product
    (bit-equal to ``rope_cos_sin``). The tables are sized from the build's profiles — the
    longest caption and the largest latent side it serves — so nothing caps what the builder can
    cover; the runtime refuses shapes outside the profiles before they reach the graph.
    """

    def __init__(self, cfg: DiTConfig, lengths: Sequence[int]) -> None:
        super().__init__()
        if len(lengths) != len(cfg.axes_dims) or min(lengths) < 1:
            raise ValueError(f"need one table length >= 1 per RoPE axis, got {tuple(lengths)}")
        self.lengths = tuple(lengths)
        for axis, (dim, n) in enumerate(zip(cfg.axes_dims, lengths, strict=True)):
            angles = _axis_angles(torch.arange(n), dim, cfg.rope_theta)
            # not persistent: tables are derived data, not checkpoint weights
            self.register_buffer(f"cos{axis}", angles.cos(), persistent=False)
            self.register_buffer(f"sin{axis}", angles.sin(), persistent=False)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        cos = [F.embedding(positions[..., a], getattr(self, f"cos{a}")) for a in range(3)]
        sin = [F.embedding(positions[..., a], getattr(self, f"sin{a}")) for a in range(3)]
        return torch.cat(cos, dim=-1), torch.cat(sin, dim=-1)


def rope_table_lengths(
    max_caption: int, max_latent_h: int, max_latent_w: int, patch: int = 2
) -> tuple[int, int, int]:
    """Table sizes covering captions up to ``max_caption`` tokens and latents up to h×w: caption
    slot k sits at 1 + k (k < the padded length), image tokens at padded length + 1."""
    return (_round_up(max_caption) + 2, max_latent_h // patch, max_latent_w // patch)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the interleaved pairs (x[2i], x[2i+1]) of x [B, S, H, Dh] in fp32 by cos/sin
    [B, S, Dh/2], then cast back."""
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # broadcast over heads
    rotated = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)


class Attend(nn.Module):
    """Scaled dot-product attention as a module of its own: the place a calibration's FP8
    q/k/v quantizers go (``calibration``); no weights."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Attention(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)  # rows: q, k, v
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.attend = Attend()

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, key_mask: Tensor | None) -> Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.n_heads, -1)).unbind(2)  # [B, S, H, Dh]
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # keys only
        out = self.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)
        return self.out(out.transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Sandwich-normed block; if ``modulated``, the timestep scales and tanh-gates both halves."""

    def __init__(self, cfg: DiTConfig, modulated: bool) -> None:
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim)
        self.attention_norm1 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention_norm2 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm1 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm2 = RMSNorm(cfg.dim, cfg.norm_eps)
        # no SiLU before this Linear (unlike the final layer's), as in the reference
        self.adaLN_modulation = (
            nn.Sequential(nn.Linear(cfg.adaln_dim, 4 * cfg.dim)) if modulated else None
        )

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, key_mask: Tensor | None, adaln: Tensor | None
    ) -> Tensor:
        if self.adaLN_modulation is None or adaln is None:
            x = x + self.attention_norm2(
                self.attention(self.attention_norm1(x), cos, sin, key_mask)
            )
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        scale_msa, gate_msa, scale_mlp, gate_mlp = (
            self.adaLN_modulation(adaln).unsqueeze(1).chunk(4, dim=2)
        )
        scale_msa, scale_mlp = 1.0 + scale_msa, 1.0 + scale_mlp
        gate_msa, gate_mlp = gate_msa.tanh(), gate_mlp.tanh()
        attn = self.attention(self.attention_norm1(x) * scale_msa, cos, sin, key_mask)
        x = x + gate_msa * self.attention_norm2(attn)
        ffn = self.feed_forward(self.ffn_norm1(x) * scale_mlp)
        return x + gate_mlp * self.ffn_norm2(ffn)


class TimestepEmbedder(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(TIMESTEP_FREQ_DIM, cfg.t_embed_mid_dim),
            nn.SiLU(),
            nn.Linear(cfg.t_embed_mid_dim, cfg.adaln_dim),
        )

    def forward(self, t: Tensor) -> Tensor:
        """t [B] (already × t_scale) → [B, adaln_dim]; sinusoid in fp32 (cos half first), then
        cast to the weights' dtype as the reference does."""
        half = TIMESTEP_FREQ_DIM // 2
        exponent = torch.arange(half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(-math.log(TIMESTEP_MAX_PERIOD) * exponent / half)
        args = t.float()[:, None] * freqs[None]
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(features.to(next(self.mlp.parameters()).dtype))


class FinalLayer(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.linear = nn.Linear(cfg.dim, cfg.patch_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.adaln_dim, cfg.dim))

    def forward(self, x: Tensor, adaln: Tensor) -> Tensor:
        scale = 1.0 + self.adaLN_modulation(adaln)
        x = F.layer_norm(x, x.shape[-1:], eps=FINAL_NORM_EPS) * scale.unsqueeze(1)
        return self.linear(x)


# ----------------------------------------------------------------------------------------------
# Sequences


def _round_up(length: int) -> int:
    """Next multiple of 32 of a (possibly symbolic) size: size arithmetic only, never on tensors."""
    return (length + SEQ_MULTIPLE - 1) // SEQ_MULTIPLE * SEQ_MULTIPLE


def _rope(cfg: DiTConfig, positions: Tensor, tables: RopeTables | None) -> tuple[Tensor, Tensor]:
    if tables is not None:
        return tables(positions)
    return rope_cos_sin(positions, cfg.axes_dims, cfg.rope_theta)


def _caption_rope(
    cfg: DiTConfig, length: int, device: torch.device, tables: RopeTables | None
) -> tuple[Tensor, Tensor]:
    """Caption slot k sits at (1 + k, 0, 0); pad slots continue the count. → [1, length, Dh/2]."""
    k = torch.arange(length, device=device)
    zeros = torch.zeros_like(k)
    positions = torch.stack([k + 1, zeros, zeros], dim=-1).unsqueeze(0)
    return _rope(cfg, positions, tables)


def caption_tokens(
    cfg: DiTConfig,
    cap_embedder: nn.Module,
    cap_pad_token: Tensor,
    context_refiner: nn.ModuleList,
    cap_feats: Tensor,
    cap_mask: Tensor,
    rope_tables: RopeTables | None = None,
) -> tuple[Tensor, Tensor]:
    """Embed and refine right-padded captions; the shared body of the caption graph.

    cap_feats [B, L, C], cap_mask [B, L] (nonzero = real token; only its row sums are used, so
    captions must be right-padded). Returns cap_tokens [B, Lpad, D] (weights' dtype) and
    cap_valid [B, Lpad] bool, Lpad = ceil(L/32)·32. Item i with n_i real tokens gets
    ``cap_pad_token`` in slots n_i … ceil(n_i/32)·32 − 1 (valid: they attend and are attended,
    as in the reference); slots beyond are invalid, masked as keys and returned as zeros.
    """
    if cap_feats.ndim != 3 or cap_mask.shape != cap_feats.shape[:2]:
        raise ValueError(
            f"expected cap_feats [B, L, C] and cap_mask [B, L], got {tuple(cap_feats.shape)} "
            f"and {tuple(cap_mask.shape)}"
        )
    if cap_feats.shape[2] != cfg.cap_feat_dim:
        raise ValueError(
            f"cap_feats has {cap_feats.shape[2]} features, expected {cfg.cap_feat_dim}"
        )
    length = cap_feats.shape[1]
    padded = _round_up(length)
    device = cap_feats.device
    # ComfyUI hands the conditioning to the DiT in the DiT's dtype
    feats = F.pad(cap_feats.to(cap_pad_token.dtype), (0, 0, 0, padded - length))
    true_len = (cap_mask != 0).sum(dim=1, keepdim=True)  # [B, 1]
    # ceil(n/32)·32 by a constant divisor, in float (exact below 2^24; dividing by a power of two
    # is exact). No tensor of ceil(L/32) elements: a size that may be 1 makes torch.export guard.
    item_padded = (torch.ceil(true_len.float() / SEQ_MULTIPLE) * SEQ_MULTIPLE).long()
    slot = torch.arange(padded, device=device)[None, :]
    real, valid = slot < true_len, slot < item_padded

    x = cap_embedder(feats)
    pad = torch.where(valid[..., None], cap_pad_token, 0.0)
    x = torch.where(real[..., None], x, pad)
    cos, sin = _caption_rope(cfg, padded, device, rope_tables)
    for block_module in context_refiner:
        x = block_module(x, cos, sin, valid, None)
    return torch.where(valid[..., None], x, 0.0), valid


class ZImageDiT(nn.Module):
    """The Z-Image DiT; ``forward`` is the denoiser, ``caption_tokens`` the caption path."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.x_embedder = nn.Linear(cfg.patch_dim, cfg.dim)
        self.cap_embedder = nn.Sequential(
            RMSNorm(cfg.cap_feat_dim, cfg.norm_eps), nn.Linear(cfg.cap_feat_dim, cfg.dim)
        )
        self.t_embedder = TimestepEmbedder(cfg)
        self.x_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.cap_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.noise_refiner = nn.ModuleList(
            TransformerBlock(cfg, modulated=True) for _ in range(cfg.n_refiner_layers)
        )
        self.context_refiner = nn.ModuleList(
            TransformerBlock(cfg, modulated=False) for _ in range(cfg.n_refiner_layers)
        )
        self.layers = nn.ModuleList(
            TransformerBlock(cfg, modulated=True) for _ in range(cfg.n_layers)
        )
        self.final_layer = FinalLayer(cfg)
        # set by the exporter (after any dtype cast): graphs without float64 gather RoPE
        self.rope_tables: RopeTables | None = None

    def caption_tokens(self, cap_feats: Tensor, cap_mask: Tensor) -> tuple[Tensor, Tensor]:
        """See the module-level ``caption_tokens``."""
        return caption_tokens(
            self.config,
            self.cap_embedder,
            self.cap_pad_token,
            self.context_refiner,
            cap_feats,
            cap_mask,
            self.rope_tables,
        )

    def forward(
        self, latents: Tensor, sigma: Tensor, cap_tokens: Tensor, cap_valid: Tensor
    ) -> Tensor:
        """Velocity v [B, C, H, W] (float32) with x0 = latents − σ·v (ComfyUI's convention).

        latents [B, C, H, W] with H, W even; sigma [B]; cap_tokens [B, Lc, D] and cap_valid
        [B, Lc] from ``caption_tokens`` (items may be padded further with invalid slots). The
        network sees t = 1 − σ and its raw output is negated, as ComfyUI and the diffusers
        pipeline do.
        """
        cfg = self.config
        b, c, h, w = latents.shape
        p = cfg.patch_size
        if h % p or w % p:
            raise ValueError(
                f"latent height and width must be multiples of {p} (image sides multiples of "
                f"{VAE_DOWNSCALE * p} px), got {h}×{w}"
            )
        if c != cfg.in_channels:
            raise ValueError(f"latents have {c} channels, expected {cfg.in_channels}")
        if cap_tokens.ndim != 3 or cap_valid.shape != cap_tokens.shape[:2]:
            raise ValueError(
                f"expected cap_tokens [B, Lc, D] and cap_valid [B, Lc], got "
                f"{tuple(cap_tokens.shape)} and {tuple(cap_valid.shape)}"
            )
        if sigma.shape != (b,) or cap_tokens.shape[0] != b:
            raise ValueError(
                f"batch mismatch: latents {b}, sigma {tuple(sigma.shape)}, "
                f"cap_tokens {cap_tokens.shape[0]}"
            )
        dtype, device = self.x_pad_token.dtype, latents.device
        ht, wt = h // p, w // p
        n = ht * wt
        n_pad = _round_up(n)

        adaln = self.t_embedder((1.0 - sigma.float()) * cfg.t_scale).to(dtype)

        # patchify in (row, col) token order with (ph, pw, c) features, then pad with x_pad_token
        patches = latents.to(dtype).reshape(b, c, ht, p, wt, p).permute(0, 2, 4, 3, 5, 1)
        img = self.x_embedder(patches.reshape(b, n, cfg.patch_dim))
        img = torch.cat([img, self.x_pad_token[None].expand(b, n_pad - n, -1)], dim=1)

        # image token (r, c) sits at (Lpad_i + 1, r, c) with the item's own padded caption
        # length; image pad slots sit at (0, 0, 0)
        cap_valid = cap_valid != 0
        cap_len = cap_valid.sum(dim=1, keepdim=True)  # [B, 1]
        rows = torch.arange(ht, device=device)[:, None].expand(ht, wt).reshape(n)
        cols = torch.arange(wt, device=device)[None, :].expand(ht, wt).reshape(n)
        zeros = torch.zeros(n_pad - n, dtype=rows.dtype, device=device)
        is_token = torch.cat([torch.ones_like(rows, dtype=torch.bool), zeros.bool()])
        axis0 = torch.where(is_token[None, :], cap_len + 1, 0)
        positions = torch.stack(
            [axis0, torch.cat([rows, zeros]).expand(b, -1), torch.cat([cols, zeros]).expand(b, -1)],
            dim=-1,
        )
        img_cos, img_sin = _rope(cfg, positions, self.rope_tables)

        for block_module in self.noise_refiner:
            img = block_module(img, img_cos, img_sin, None, adaln)

        # [image | caption]; invalid caption slots are zeroed so no garbage reaches a masked key
        lc = cap_tokens.shape[1]
        cap = torch.where(cap_valid[..., None], cap_tokens.to(dtype), 0.0)
        cap_cos, cap_sin = _caption_rope(cfg, lc, device, self.rope_tables)
        x = torch.cat([img, cap], dim=1)
        cos = torch.cat([img_cos, cap_cos.expand(b, -1, -1)], dim=1)
        sin = torch.cat([img_sin, cap_sin.expand(b, -1, -1)], dim=1)
        key_mask = torch.cat([torch.ones_like(is_token)[None].expand(b, -1), cap_valid], dim=1)
        for block_module in self.layers:
            x = block_module(x, cos, sin, key_mask, adaln)

        out = self.final_layer(x[:, :n], adaln)
        out = out.view(b, ht, wt, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)
        return (-out).float()  # ComfyUI negates the network output and casts it to fp32


class CaptionPath(nn.Module):
    """Export wrapper of the caption graph; its parameters keep their checkpoint names."""

    def __init__(self, dit: ZImageDiT) -> None:
        super().__init__()
        self.config = dit.config
        self.cap_embedder = dit.cap_embedder
        self.cap_pad_token = dit.cap_pad_token
        self.context_refiner = dit.context_refiner
        self.rope_tables = dit.rope_tables

    def forward(self, cap_feats: Tensor, cap_mask: Tensor) -> tuple[Tensor, Tensor]:
        return caption_tokens(
            self.config,
            self.cap_embedder,
            self.cap_pad_token,
            self.context_refiner,
            cap_feats,
            cap_mask,
            self.rope_tables,
        )
