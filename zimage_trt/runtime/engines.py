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

The ``torch`` backend wraps the project's own modules (``zimage_trt.models``); the ONNX Runtime
and TensorRT backends implement the same names over compiled graphs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor, nn

from zimage_trt.runtime.manifest import Profile

if TYPE_CHECKING:
    from zimage_trt.models.dit import ZImageDiT
    from zimage_trt.models.text_encoder import Qwen3TextEncoder
    from zimage_trt.models.vae import FluxVAE

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
    raise ValueError(f"unknown dtype {name!r}; known: {', '.join(DTYPE_NAMES.values())}")


class Engine(Protocol):
    name: str

    def __call__(self, **inputs: Tensor) -> dict[str, Tensor]: ...


class TorchEngine:
    """An nn.Module behind the engine interface (eager; inference mode)."""

    def __init__(self, name: str, module: nn.Module) -> None:
        if name not in ENGINE_IO:
            raise ValueError(f"unknown engine {name!r}; engines: {', '.join(ENGINE_IO)}")
        self.name = name
        self.module = module.eval()
        self.input_names, self.output_names = ENGINE_IO[name]

    def __call__(self, **inputs: Tensor) -> dict[str, Tensor]:
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise ValueError(f"engine {self.name!r} needs inputs {missing}")
        with torch.inference_mode():
            out = self.module(*(inputs[n] for n in self.input_names))
        outs: Sequence[Tensor] = out if isinstance(out, tuple) else (out,)
        return dict(zip(self.output_names, outs, strict=True))


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


def torch_engines(
    dit: ZImageDiT,
    text_encoder: Qwen3TextEncoder,
    vae: FluxVAE,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    text_encoder_dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype | None = None,
) -> Engines:
    """The eager ``torch`` backend over the project's modules (``zimage_trt.models``).

    The DiT computes in ``dtype`` (bf16 on GPU as ComfyUI; fp32 on CPU), the text encoder in
    fp32 activations as ComfyUI does (its manual-cast ops upcast the weights), the VAE in
    ``vae_dtype`` (default: the DiT's). fp16 is refused for the DiT and VAE: Z-Image overflows
    to NaN / black images in fp16.
    """
    from zimage_trt.models.dit import CaptionPath
    from zimage_trt.models.vae import VAEDecoder, VAEEncoder

    vae_dtype = vae_dtype or dtype
    if torch.float16 in (dtype, vae_dtype):
        raise ValueError(
            "float16 is not supported for the DiT or the VAE (Z-Image gives NaN / "
            "black images in fp16); use bfloat16 or float32"
        )
    device = torch.device(device)
    dit = dit.to(device=device, dtype=dtype)
    vae = vae.to(device=device, dtype=vae_dtype)
    return Engines(
        text_encoder=TorchEngine(
            "text_encoder", text_encoder.to(device=device, dtype=text_encoder_dtype)
        ),
        caption_path=TorchEngine("caption_path", CaptionPath(dit)),
        denoiser=TorchEngine("denoiser", dit),
        vae_decoder=TorchEngine("vae_decoder", _Cast(VAEDecoder(vae), vae_dtype)),
        vae_encoder=TorchEngine("vae_encoder", _Cast(VAEEncoder(vae), vae_dtype)),
        backend="torch",
        device=device,
        dtype=dtype,
    )


class _Cast(nn.Module):
    """Feeds a module inputs in its own dtype (the VAE may differ from the sampler's fp32)."""

    def __init__(self, module: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.module = module
        self.dtype = dtype

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x.to(self.dtype))
