"""The Z-Image DiT's checkpoint layouts: original/ComfyUI single-file keys (fused ``qkv``, under
``model.diffusion_model.``) ↔ diffusers ``ZImageTransformer2DModel`` keys (split ``to_q/k/v``),
and the architecture read off a state dict's shapes."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from zimage_trt.models.dit import DiTConfig

COMFY_PREFIX = "model.diffusion_model."

# original (ComfyUI single file) ↔ diffusers, as substring renames; qkv is fused/split apart
_RENAMES = (
    ("x_embedder.", "all_x_embedder.2-1."),
    ("final_layer.", "all_final_layer.2-1."),
    (".attention.out.", ".attention.to_out.0."),
    (".attention.q_norm.", ".attention.norm_q."),
    (".attention.k_norm.", ".attention.norm_k."),
)
_QKV = ".attention.qkv.weight"
_SPLIT = (".attention.to_q.weight", ".attention.to_k.weight", ".attention.to_v.weight")
_UNUSED_ORIGINAL_KEYS = ("norm_final.weight",)  # in original files, unused by every reference


def _rename(key: str, renames: Sequence[tuple[str, str]]) -> str:
    for old, new in renames:
        # top-level names are prefixes; names starting with a dot are inside blocks
        if (old in key) if old.startswith(".") else key.startswith(old):
            return key.replace(old, new, 1)
    return key


def normalize_original(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Strip ComfyUI's ``model.diffusion_model.`` prefix and drop the unused ``norm_final``."""
    out = {}
    for key, value in sd.items():
        key = key.removeprefix(COMFY_PREFIX)
        if key not in _UNUSED_ORIGINAL_KEYS:
            out[key] = value
    return out


def original_to_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Original/ComfyUI keys → ``ZImageTransformer2DModel`` keys; qkv is chunked into q, k, v.

    The q/k/v tensors are views of the fused one (clone before saving with safetensors).
    """
    out: dict[str, Tensor] = {}
    for key, value in normalize_original(sd).items():
        if key.endswith(_QKV):
            stem = key[: -len(_QKV)]
            for name, part in zip(_SPLIT, value.chunk(3, dim=0), strict=True):
                out[stem + name] = part
        else:
            out[_rename(key, _RENAMES)] = value
    return out


def diffusers_to_original(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``ZImageTransformer2DModel`` keys → original/ComfyUI keys; to_q, to_k, to_v fuse to qkv."""
    inverse = [(new, old) for old, new in _RENAMES]
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key.endswith(_SPLIT[0]):
            stem = key[: -len(_SPLIT[0])]
            missing = [stem + name for name in _SPLIT if stem + name not in sd]
            if missing:
                raise ValueError(f"diffusers state dict lacks {missing} (needed to fuse qkv)")
            out[stem + _QKV] = torch.cat([sd[stem + name] for name in _SPLIT], dim=0)
        elif not key.endswith(_SPLIT[1:]):
            out[_rename(key, inverse)] = value
    return out


REQUIRED_KEYS = (
    "x_embedder.weight",
    "cap_embedder.1.weight",
    "t_embedder.mlp.0.weight",
    "layers.0.attention.qkv.weight",
    "noise_refiner.0.attention.qkv.weight",
)


def _count_blocks(keys: Sequence[str], prefix: str) -> int:
    pattern = re.compile(rf"^{prefix}\.(\d+)\.")
    indices = {int(m.group(1)) for key in keys if (m := pattern.match(key))}
    return max(indices) + 1 if indices else 0


def config_from_state_dict(sd: Mapping[str, Tensor]) -> DiTConfig:
    """Infer the architecture from an original/ComfyUI-layout state dict (prefix allowed).

    Shapes give dim and cap_feat_dim (``cap_embedder.1.weight``), in_channels
    (``x_embedder.weight`` / patch 2², patch size 2 as in ComfyUI's detection), the timestep
    MLP width, and the block counts (``layers.N.`` / ``noise_refiner.N.``). Heads: the head dim
    is the width of ``q_norm`` (128 for Z-Image, so n_heads = dim // 128; 128 is also assumed
    when there is no q/k norm), and the RoPE axes split it 1/4, 3/8, 3/8 as (32, 48, 48) does.
    """
    sd = normalize_original(sd)
    missing = [key for key in REQUIRED_KEYS if key not in sd]
    if missing:
        hint = (
            " (this looks like a diffusers state dict: convert it with diffusers_to_original)"
            if any(key.startswith("all_x_embedder.") for key in sd)
            else ""
        )
        raise ValueError(f"not a Z-Image DiT checkpoint: missing keys {missing}{hint}")
    dim, cap_feat_dim = sd["cap_embedder.1.weight"].shape
    patch_size = 2
    qk_norm = "layers.0.attention.q_norm.weight" in sd
    head_dim = sd["layers.0.attention.q_norm.weight"].shape[0] if qk_norm else 128
    keys = list(sd)
    return DiTConfig(
        dim=dim,
        n_layers=_count_blocks(keys, "layers"),
        n_refiner_layers=_count_blocks(keys, "noise_refiner"),
        n_heads=dim // head_dim,
        cap_feat_dim=cap_feat_dim,
        in_channels=sd["x_embedder.weight"].shape[1] // (patch_size * patch_size),
        patch_size=patch_size,
        axes_dims=(head_dim // 4, head_dim * 3 // 8, head_dim * 3 // 8),
        qk_norm=qk_norm,
        t_embed_mid_dim=sd["t_embedder.mlp.0.weight"].shape[0],
    )
