"""The one interface every engine sits behind: named torch tensors in, named tensors out.

Four networks serve a generation (five with image inputs):

| engine        | inputs                                          | outputs                 |
|---------------|-------------------------------------------------|-------------------------|
| text_encoder  | input_ids [B,L] i64, attention_mask [B,L] i64   | hidden [B,L,C]          |
| caption_path  | cap_feats [B,L,C], cap_mask [B,L]               | cap_tokens, cap_valid   |
| denoiser      | latents [B,16,H,W], sigma [B], cap_tokens,      | v [B,16,H,W]            |
|               | cap_valid                                       |                         |
| vae_decoder   | latents [B,16,h,w] (VAE space)                  | image [B,3,8h,8w]       |
| vae_encoder   | image [B,3,H,W] in [−1, 1]                      | latents [B,16,H/8,W/8]  |

The ``torch`` backend (``torch_engines``) wraps the project's own modules (``zimage_trt.models``);
``compiled`` wraps those in ``torch.compile``; the ONNX Runtime and TensorRT backends implement
the same names over the compiled graphs of an engine folder (``folder``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from zimage_trt.engines.manifest import Profile
from zimage_trt.errors import InputError

ENGINE_IO: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "text_encoder": (("input_ids", "attention_mask"), ("hidden",)),
    "caption_path": (("cap_feats", "cap_mask"), ("cap_tokens", "cap_valid")),
    "denoiser": (("latents", "sigma", "cap_tokens", "cap_valid"), ("v",)),
    "vae_decoder": (("latents",), ("image",)),
    "vae_encoder": (("image",), ("latents",)),
}

# dtype names used in manifests (engine I/O) ↔ torch dtypes
DTYPE_NAMES = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.int64: "int64",
    torch.int32: "int32",
    torch.bool: "bool",
}


def dtype_from_name(name: str) -> torch.dtype:
    for dtype, dtype_name in DTYPE_NAMES.items():
        if dtype_name == name:
            return dtype
    raise InputError(f"unknown dtype {name!r}; known: {', '.join(DTYPE_NAMES.values())}")


class Engine(Protocol):
    name: str

    def __call__(self, **inputs: Tensor) -> dict[str, Tensor]: ...


@dataclass
class Engines:
    """The networks of one model, on one backend, device and compute dtype."""

    text_encoder: Engine
    caption_path: Engine
    denoiser: Engine
    vae_decoder: Engine
    vae_encoder: Engine | None
    backend: str
    device: torch.device
    dtype: torch.dtype  # the DiT's compute dtype (bf16 on GPU; never fp16 for DiT or VAE)
    # compiled engines serve only the shapes they were built for (engine → profiles)
    profiles: dict[str, list[Profile]] = field(default_factory=dict)
    quantization: str | None = None  # what holds Q/DQ nodes, e.g. "DiT fp8 Q/DQ"; None: nothing
