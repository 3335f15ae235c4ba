"""The ``torch`` backend: the project's own modules (``zimage_trt.models``) behind the engine
interface, eager, on one device and dtype; and the choice of device and dtype for it."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from zimage_trt.engines.protocol import ENGINE_IO, Engines
from zimage_trt.errors import InputError, RunError, UnavailableError
from zimage_trt.models.checkpoints import load_text_encoder_weights, load_vae_weights
from zimage_trt.models.dit import CaptionPath, ZImageDiT
from zimage_trt.models.sources import ModelSources, load_fused_dit
from zimage_trt.models.text_encoder import Qwen3TextEncoder
from zimage_trt.models.vae import FluxVAE, VAEDecoder, VAEEncoder


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise InputError(
            f"device {device!r} is not a device; choose auto, cpu, cuda or cuda:N"
        ) from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise UnavailableError(
            f"device {device!r} requested but CUDA is not available; use --device cpu"
        )
    return chosen


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """bf16 on GPUs (as ComfyUI), fp32 on CPU; fp16 is refused for Z-Image."""
    choices = {
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp32": torch.float32,
        "float32": torch.float32,
    }
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in choices:
        raise InputError(
            f"dtype {dtype!r} is not supported; choose one of: auto, bf16, fp32 "
            "(fp16 gives NaN / black images with Z-Image)"
        )
    return choices[dtype]


class TorchEngine:
    """An nn.Module behind the engine interface (eager; inference mode)."""

    def __init__(self, name: str, module: nn.Module) -> None:
        if name not in ENGINE_IO:
            raise InputError(f"unknown engine {name!r}; engines: {', '.join(ENGINE_IO)}")
        self.name = name
        self.module = module.eval()
        self.input_names, self.output_names = ENGINE_IO[name]

    def __call__(self, **inputs: Tensor) -> dict[str, Tensor]:
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise InputError(f"engine {self.name!r} needs inputs {missing}")
        with torch.inference_mode():
            out = self.module(*(inputs[n] for n in self.input_names))
        outs: Sequence[Tensor] = out if isinstance(out, tuple) else (out,)
        return dict(zip(self.output_names, outs, strict=True))

    def refit(
        self, weights: Mapping[str, Tensor], more: Mapping[str, Tensor] | None = None
    ) -> None:
        refit_module(self.name, self.module, weights)


def refit_module(engine: str, module: nn.Module, weights: Mapping[str, Tensor]) -> None:
    """Copy new values into ``module``'s weights in place (a LoRA switch between batches,
    ``runtime.loras``): compiled graphs read the same storage, so they see them too."""
    held = module.state_dict(keep_vars=True)
    unknown = sorted(set(weights) - set(held))
    if unknown:
        raise RunError(
            f"engine {engine!r} has no weight(s) {', '.join(unknown[:3])}"
            + (f" (and {len(unknown) - 3} more)" if len(unknown) > 3 else "")
        )
    with torch.no_grad():
        for name, value in weights.items():
            held[name].copy_(value)


def torch_engines(
    dit: ZImageDiT,
    text_encoder: Qwen3TextEncoder,
    vae: FluxVAE,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    text_encoder_dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype | None = None,
    resident_blocks: int | None = None,
) -> Engines:
    """The eager ``torch`` backend over the project's modules (``zimage_trt.models``).

    The DiT computes in ``dtype`` (bf16 on GPU as ComfyUI; fp32 on CPU), the text encoder in
    fp32 activations as ComfyUI does (its manual-cast ops upcast the weights), the VAE in
    ``vae_dtype`` (default: the DiT's); ``resident_blocks``: only that many of the DiT's main
    blocks on ``device``, the others streamed (``engines.block_streaming``). fp16 is refused
    for the DiT and VAE: Z-Image overflows to NaN / black images in fp16.
    """
    vae_dtype = vae_dtype or dtype
    if torch.float16 in (dtype, vae_dtype):
        raise InputError(
            "float16 is not supported for the DiT or the VAE (Z-Image gives NaN / "
            "black images in fp16); use bfloat16 or float32"
        )
    device = torch.device(device)
    if resident_blocks is None:
        dit = dit.to(device=device, dtype=dtype)
    else:  # the other main blocks streamed from CPU memory (engines.block_streaming)
        from zimage_trt.engines.block_streaming import stream_blocks

        dit = stream_blocks(dit, resident_blocks, device, dtype)
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


def load_torch_engines(
    sources: ModelSources,
    *,
    device: torch.device,
    dtype: torch.dtype,
    lora_ignore_unmatched: bool = False,
    gguf_in_memory: bool = False,
    resident_blocks: int | None = None,
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
) -> Engines:
    """The three networks of ``sources`` (its LoRAs fused into the DiT) on ``device``, eager
    (``gguf_in_memory``: a GGUF DiT kept quantized, ``models.gguf_resident``)."""
    files = sources.files
    dit = load_fused_dit(sources, dtype, lora_ignore_unmatched=lora_ignore_unmatched,
                         gguf_in_memory=gguf_in_memory, log=log)  # fmt: skip
    log(f"loading the text encoder from {files.text_encoder}")
    text_encoder = load_text_encoder_weights(files.text_encoder, torch.float32)
    log(f"loading the VAE from {files.vae}")
    vae = load_vae_weights(files.vae, dtype)
    return torch_engines(dit, text_encoder, vae, device=device, dtype=dtype,
                         resident_blocks=resident_blocks)  # fmt: skip
