"""The Qwen3-4B text encoder exactly as Z-Image uses it, export-ready by construction.

Z-Image conditions on Qwen3's hidden state after decoder block n−2 (0-based; block 34 of 36),
taken before the final norm: Hugging Face's ``hidden_states[-2]``, ComfyUI's ``layer_idx=-2``.
The last block, the final norm and the LM head never influence it, so this module holds only
the first ``num_hidden_layers − 1`` blocks and returns their output.

The forward is tensor-only: ``(input_ids [B, L] int64, attention_mask [B, L] int/bool) →
hidden [B, L, C]``. Causal attention plus a key mask for right-padded batches; RoPE angles are
computed for positions 0..L−1 on every call (no fixed-length table, so any caption length
works); GQA by repeating the K/V heads. Parameter names are Hugging Face's
(``model.layers.N.self_attn.q_proj.weight`` …), so Qwen3ForCausalLM, ComfyUI and GGUF-mapped
files load through ``zimage_trt.models.text_encoder_keys.convert_state_dict`` unchanged, and
Qwen3Model files after adding the ``model.`` prefix.

Precision follows transformers' Qwen3: matmuls in the weights' dtype, RMSNorm statistics in
float32. ComfyUI runs this network with float32 activations even for bf16 weights (its
``manual_cast`` ops upcast each weight), which is this module cast to float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class Qwen3Config:
    """Qwen3 decoder hyper-parameters; the defaults are Qwen3-4B's.

    ``num_hidden_layers`` counts the blocks of the full language model (36 for Qwen3-4B); the
    encoder instantiates ``num_encoder_layers = num_hidden_layers − 1`` of them.
    """

    vocab_size: int = 151936
    hidden_size: int = 2560
    intermediate_size: int = 9728
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.num_hidden_layers < 2:
            raise ValueError(
                f"num_hidden_layers must be >= 2 (the encoder drops the last block), "
                f"got {self.num_hidden_layers}"
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def num_encoder_layers(self) -> int:
        """Blocks the encoder runs: all but the last (its output is ``hidden_states[-2]``)."""
        return self.num_hidden_layers - 1

    @classmethod
    def tiny(cls) -> Qwen3Config:
        """A small test model of the same architecture: 4 layers (3 encoder blocks), GQA 4/2.

        The vocabulary stays the real 151,936 rows because tests feed real tokenizer ids
        (up to 151,668); at width 32 that is 4.9M floats. ``heads × head_dim`` (64) differs from
        the width (32) as in Qwen3-4B (4096 vs 2560), so a transposed projection cannot pass.
        """
        return cls(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
        )


class RMSNorm(nn.Module):
    """Qwen3's RMSNorm: statistics in float32, cast back, then scaled by a plain weight."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(
    seq_len: int, head_dim: int, theta: float, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """cos and sin [L, head_dim] for positions 0..L−1, computed in float32 as transformers does.

    The half-split layout (angles repeated for both halves) pairs with `_rotate_half`.
    """
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    )
    positions = torch.arange(seq_len, device=device).float()
    angles = positions[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def attention_bias(attention_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive mask [B, 1, L, L]: 0 where query i may see key j (j ≤ i and key j valid).

    The fill is ``finfo.min / 4`` as in ComfyUI: finite, so a query whose keys are all masked
    gets a uniform softmax instead of NaN, with headroom so score + fill cannot overflow.
    """
    seq_len = attention_mask.shape[1]
    index = torch.arange(seq_len, device=attention_mask.device)
    causal = index[None, :] <= index[:, None]
    allowed = causal[None, None, :, :] & (attention_mask != 0)[:, None, None, :]
    bias = torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min / 4)


class Attention(nn.Module):
    """Grouped-query self-attention with per-head q/k RMSNorm before RoPE; no biases."""

    def __init__(self, config: Qwen3Config) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.kv_groups = config.num_attention_heads // config.num_key_value_heads
        q_width = config.num_attention_heads * config.head_dim
        kv_width = config.num_key_value_heads * config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_width, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, kv_width, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, kv_width, bias=False)
        self.o_proj = nn.Linear(q_width, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, bias: Tensor) -> Tensor:
        batch, seq_len, _ = x.shape
        heads_shape = (batch, seq_len, -1, self.head_dim)
        q = self.q_norm(self.q_proj(x).view(heads_shape)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(heads_shape)).transpose(1, 2)
        v = self.v_proj(x).view(heads_shape).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        # Query head h reads K/V head h // kv_groups; repeat_interleave is plain Expand+Reshape
        # in every exporter, where SDPA's enable_gqa is not.
        k = k.repeat_interleave(self.kv_groups, dim=1)
        v = v.repeat_interleave(self.kv_groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq_len, -1))


class MLP(nn.Module):
    """SiLU-gated feed-forward."""

    def __init__(self, config: Qwen3Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: Qwen3Config) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, bias: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, bias)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Decoder(nn.Module):
    """Holds the weights under ``model.`` so parameter names equal the checkpoints'."""

    def __init__(self, config: Qwen3Config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderBlock(config) for _ in range(config.num_encoder_layers))


class Qwen3TextEncoder(nn.Module):
    """The first ``num_hidden_layers − 1`` Qwen3 blocks; returns their output, un-normed."""

    def __init__(self, config: Qwen3Config) -> None:
        super().__init__()
        self.config = config
        self.model = _Decoder(config)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """hidden [B, L, hidden_size] for ``input_ids`` [B, L] and ``attention_mask`` [B, L].

        ``attention_mask`` is nonzero for real tokens. Masked positions are hidden as keys; their
        own outputs are meaningless. With right padding every item's valid positions equal the
        item run alone, since positions always count from 0.
        """
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(
            input_ids.shape[1], self.config.head_dim, self.config.rope_theta, x.device, x.dtype
        )
        bias = attention_bias(attention_mask, x.dtype)
        for block in self.model.layers:
            x = block(x, cos, sin, bias)
        return x
