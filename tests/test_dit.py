"""The project's DiT against diffusers' ZImageTransformer2DModel on the same random weights."""

from __future__ import annotations

import re

import pytest
import torch
from diffusers import ZImageTransformer2DModel
from torch import Tensor

from zimage_trt.models import dit as dit_module
from zimage_trt.models.dit import CaptionPath, DiTConfig, ZImageDiT
from zimage_trt.models.dit_keys import (
    config_from_state_dict,
    diffusers_to_original,
    original_to_diffusers,
)

TINY = DiTConfig.tiny()
ATOL = 1e-5


def _reference(
    cfg: DiTConfig = TINY, axes_lens: tuple[int, ...] | None = None
) -> ZImageTransformer2DModel:
    return ZImageTransformer2DModel(
        all_patch_size=(cfg.patch_size,),
        all_f_patch_size=(1,),
        in_channels=cfg.in_channels,
        dim=cfg.dim,
        n_layers=cfg.n_layers,
        n_refiner_layers=cfg.n_refiner_layers,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_heads,
        norm_eps=cfg.norm_eps,
        qk_norm=cfg.qk_norm,
        cap_feat_dim=cfg.cap_feat_dim,
        rope_theta=cfg.rope_theta,
        t_scale=cfg.t_scale,
        axes_dims=list(cfg.axes_dims),
        axes_lens=list(axes_lens or cfg.axes_lens),
    ).eval()


@pytest.fixture(scope="module")
def models() -> tuple[ZImageTransformer2DModel, ZImageDiT]:
    """Random weights of O(1) activations (so differences show), pad tokens included."""
    torch.manual_seed(0)
    ref = _reference()
    with torch.no_grad():
        for name, param in ref.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif param.ndim == 2 and not name.endswith("pad_token"):
                param.normal_(0.0, param.shape[1] ** -0.5)
            else:  # biases and pad tokens
                param.normal_(0.0, 0.5)
    dit = ZImageDiT(TINY).eval()
    dit.load_state_dict(diffusers_to_original(ref.state_dict()))
    return ref, dit


def _captions(lengths: list[int], seed: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, TINY.cap_feat_dim, generator=g) for n in lengths]


def _right_padded(caps: list[Tensor], length: int | None = None) -> tuple[Tensor, Tensor]:
    length = length or max(len(c) for c in caps)
    feats = torch.full((len(caps), length, TINY.cap_feat_dim), float("nan"))  # must not leak
    mask = torch.zeros(len(caps), length, dtype=torch.bool)
    for i, cap in enumerate(caps):
        feats[i, : len(cap)] = cap
        mask[i, : len(cap)] = True
    return feats, mask


def _reference_velocity(
    ref: ZImageTransformer2DModel, latents: Tensor, sigma: Tensor, caps: list[Tensor]
) -> Tensor:
    """The diffusers pipeline's conventions: timestep 1 − σ, prediction negated."""
    out = ref([x[:, None] for x in latents], 1.0 - sigma, caps, return_dict=False)[0]
    return -torch.stack([o[:, 0] for o in out])


def _velocity(
    dit: ZImageDiT, latents: Tensor, sigma: Tensor, caps: list[Tensor], length: int | None = None
) -> Tensor:
    tokens, valid = dit.caption_tokens(*_right_padded(caps, length))
    return dit(latents, sigma, tokens, valid)


@pytest.mark.parametrize(
    ("hw", "cap_lens", "buffer_len"),
    [
        ((8, 8), [7], None),  # 16 image tokens → 32, caption 7 → 32
        ((12, 10), [40], None),  # 30 → 32, caption 40 → 64
        ((8, 8), [7, 40], None),  # unequal captions: Lpad 32 and 64 in one batch
        ((12, 10), [40, 7], 100),  # and a caption buffer longer than needed (Lpad 128)
        ((16, 16), [32, 33], None),  # 64 image tokens, no image or first-caption padding
    ],
)
@torch.no_grad()
def test_matches_diffusers(
    models: tuple[ZImageTransformer2DModel, ZImageDiT],
    hw: tuple[int, int],
    cap_lens: list[int],
    buffer_len: int | None,
) -> None:
    ref, dit = models
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(len(cap_lens), TINY.in_channels, *hw, generator=g)
    sigma = torch.tensor([0.7, 0.3])[: len(cap_lens)]
    caps = _captions(cap_lens, seed=2)

    expected = _reference_velocity(ref, latents, sigma, caps)
    got = _velocity(dit, latents, sigma, caps, buffer_len)
    assert got.shape == latents.shape and got.dtype == torch.float32
    assert expected.abs().mean() > 0.3  # a real signal, not a near-zero output
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@torch.no_grad()
def test_bit_identical_with_the_reference_rope_tables(
    models: tuple[ZImageTransformer2DModel, ZImageDiT], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole residual is RoPE's cos/sin kernels (torch.cos vs the reference's torch.polar, one
    ulp apart): taking cos/sin from polar as the reference does makes the outputs bit-identical,
    which pins every other step (padding, positions, masks, casts, op order)."""
    ref, dit = models

    def polar_cos_sin(
        positions: Tensor, axes_dims: list[int], theta: float
    ) -> tuple[Tensor, Tensor]:
        angles = []
        for axis, dim in enumerate(axes_dims):
            inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
            angles.append((positions[..., axis].double()[..., None] * inv_freq).float())
        angle = torch.cat(angles, dim=-1)
        table = torch.polar(torch.ones_like(angle), angle)  # how the reference builds its tables
        return table.real.contiguous(), table.imag.contiguous()

    monkeypatch.setattr(dit_module, "rope_cos_sin", polar_cos_sin)
    latents = torch.randn(2, TINY.in_channels, 12, 10, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.6, 0.25])
    caps = _captions([40, 7], seed=2)
    expected = _reference_velocity(ref, latents, sigma, caps)
    torch.testing.assert_close(_velocity(dit, latents, sigma, caps), expected, atol=0, rtol=0)


@torch.no_grad()
def test_bfloat16_matches_diffusers(models: tuple[ZImageTransformer2DModel, ZImageDiT]) -> None:
    """bf16 weights: fp32 RoPE/norm statistics, fp32 timestep sinusoid, bf16 caption input."""
    ref, dit = models
    ref_bf16 = _reference()
    ref_bf16.load_state_dict(ref.state_dict())
    ref_bf16 = ref_bf16.to(torch.bfloat16)
    dit_bf16 = ZImageDiT(TINY).to(torch.bfloat16)
    dit_bf16.load_state_dict(dit.state_dict())
    latents = torch.randn(2, TINY.in_channels, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.7, 0.3])
    caps = _captions([7, 40], seed=2)
    out = ref_bf16(
        [x[:, None].bfloat16() for x in latents],
        1.0 - sigma,
        [c.bfloat16() for c in caps],
        return_dict=False,
    )[0]
    expected = -torch.stack([o[:, 0] for o in out]).float()
    got = _velocity(dit_bf16, latents, sigma, caps)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=0)  # measured: 0.0


@torch.no_grad()
def test_caption_outputs(models: tuple[ZImageTransformer2DModel, ZImageDiT]) -> None:
    _, dit = models
    tokens, valid = dit.caption_tokens(*_right_padded(_captions([7, 40], seed=3), 70))
    assert tokens.shape == (2, 96, TINY.dim)
    assert valid.sum(1).tolist() == [32, 64]  # each item's own ceil(n/32)·32
    assert valid[0, :32].all() and not valid[0, 32:].any()
    assert (tokens[~valid] == 0).all() and tokens[valid].abs().min() > 0
    # the export wrapper is the same computation under the checkpoint's parameter names
    wrapped = CaptionPath(dit)
    assert set(wrapped.state_dict()) <= set(dit.state_dict())
    torch.testing.assert_close(wrapped(*_right_padded(_captions([7, 40], 3), 70))[0], tokens)


@torch.no_grad()
def test_caption_longer_than_rope_table(models: tuple[ZImageTransformer2DModel, ZImageDiT]) -> None:
    """1530 tokens → Lpad 1536 → image RoPE position 1537, past the 1536-entry reference table."""
    ref, dit = models
    latents = torch.randn(1, TINY.in_channels, 8, 8, generator=torch.Generator().manual_seed(4))
    sigma = torch.tensor([0.5])
    caps = _captions([1530], seed=5)

    with pytest.raises(IndexError, match="out of bounds"):
        _reference_velocity(_reference(), latents, sigma, caps)  # the stock table (1536)

    enlarged = _reference(axes_lens=(2048, 512, 512))
    enlarged.load_state_dict(ref.state_dict())
    expected = _reference_velocity(enlarged, latents, sigma, caps)
    torch.testing.assert_close(_velocity(dit, latents, sigma, caps), expected, atol=ATOL, rtol=0)


def test_odd_latent_side(models: tuple[ZImageTransformer2DModel, ZImageDiT]) -> None:
    _, dit = models
    tokens, valid = dit.caption_tokens(*_right_padded(_captions([7], seed=6)))
    message = "latent height and width must be multiples of 2 (image sides multiples of 16 px)"
    with pytest.raises(ValueError, match=re.escape(message + ", got 9×8")):
        dit(torch.zeros(1, 16, 9, 8), torch.tensor([0.5]), tokens, valid)
    with pytest.raises(ValueError, match=re.escape(message + ", got 8×11")):
        dit(torch.zeros(1, 16, 8, 11), torch.tensor([0.5]), tokens, valid)


def test_key_maps(models: tuple[ZImageTransformer2DModel, ZImageDiT]) -> None:
    ref, dit = models
    sd = ref.state_dict()
    original = diffusers_to_original(sd)
    assert set(original) == set(dit.state_dict())
    qkv = original["layers.1.attention.qkv.weight"]
    assert qkv.shape == (3 * TINY.dim, TINY.dim)
    for part, name in zip(qkv.chunk(3), ("to_q", "to_k", "to_v"), strict=True):
        assert torch.equal(part, sd[f"layers.1.attention.{name}.weight"])

    back = original_to_diffusers(original)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)

    # a ComfyUI single file: prefixed keys plus the unused top-level norm_final
    comfy = {f"model.diffusion_model.{k}": v for k, v in original.items()}
    comfy["model.diffusion_model.norm_final.weight"] = torch.ones(TINY.dim)
    assert original_to_diffusers(comfy).keys() == sd.keys()
    assert config_from_state_dict(comfy) == TINY


def test_config_from_state_dict(models: tuple[ZImageTransformer2DModel, ZImageDiT]) -> None:
    ref, dit = models
    assert config_from_state_dict(dit.state_dict()) == TINY
    with pytest.raises(ValueError, match="convert it with diffusers_to_original"):
        config_from_state_dict(ref.state_dict())
    with pytest.raises(ValueError, match=re.escape("missing keys ['x_embedder.weight'")):
        config_from_state_dict({"foo": torch.zeros(1)})


def test_full_size_layout() -> None:
    """The real architecture on the meta device: parameter count, config, diffusers key map."""
    real = DiTConfig()
    assert (real.head_dim, real.adaln_dim, real.ffn_dim) == (128, 256, 10240)
    with torch.device("meta"):
        dit = ZImageDiT(real)
        ref = _reference(real)
    assert sum(p.numel() for p in dit.parameters()) == 6_154_908_736
    assert config_from_state_dict(dit.state_dict()) == real
    converted = original_to_diffusers(dit.state_dict())
    expected = ref.state_dict()
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in expected.items()}


@torch.no_grad()
def test_export_with_dynamic_shapes(models: tuple[ZImageTransformer2DModel, ZImageDiT]) -> None:
    """Both graphs trace once with symbolic sizes and are right at other sizes (no value-dependent
    Python in the forwards)."""
    _, dit = models
    batch = torch.export.Dim("batch", min=1, max=8)
    h, w = torch.export.Dim("h", min=1, max=128), torch.export.Dim("w", min=1, max=128)
    cap_len = torch.export.Dim("cap_len", min=1, max=4096)

    caption = torch.export.export(
        CaptionPath(dit),
        _right_padded(_captions([7, 20], seed=7)),
        dynamic_shapes=({0: batch, 1: cap_len}, {0: batch, 1: cap_len}),
        strict=False,
    ).module()
    tokens, valid = dit.caption_tokens(*_right_padded(_captions([7, 20], seed=7)))
    denoiser = torch.export.export(
        dit,
        (torch.randn(2, 16, 8, 8), torch.tensor([0.2, 0.9]), tokens, valid),
        dynamic_shapes=(
            {0: batch, 2: 2 * h, 3: 2 * w},
            {0: batch},
            {0: batch, 1: cap_len},
            {0: batch, 1: cap_len},
        ),
        strict=False,
    ).module()

    for cap_lens, hw in (([40, 7, 70], (12, 10)), ([33], (6, 14))):
        feats_mask = _right_padded(_captions(cap_lens, seed=8))
        tokens, valid = dit.caption_tokens(*feats_mask)
        exported_tokens, exported_valid = caption(*feats_mask)
        torch.testing.assert_close(exported_tokens, tokens, atol=1e-6, rtol=0)
        assert torch.equal(exported_valid, valid)
        latents = torch.randn(len(cap_lens), 16, *hw, generator=torch.Generator().manual_seed(9))
        sigma = torch.linspace(0.1, 0.9, len(cap_lens))
        torch.testing.assert_close(
            denoiser(latents, sigma, tokens, valid), dit(latents, sigma, tokens, valid),
            atol=1e-6, rtol=0,
        )  # fmt: skip
