"""The ``torch`` backend: the project's own modules (``zimage_trt.models``) behind the engine
interface, eager, on one device and dtype; and the choice of device and dtype for it."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from zimage_trt.engines.protocol import ENGINE_IO, Engine, Engines
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
    text_encoder_placement: str = "resident",
    reload: Mapping[str, Callable[[], nn.Module]] | None = None,
) -> Engines:
    """The eager ``torch`` backend over the project's modules (``zimage_trt.models``).

    The DiT computes in ``dtype`` (bf16 on GPU as ComfyUI; fp32 on CPU), the text encoder in
    fp32 activations as ComfyUI does (its manual-cast ops upcast the weights), the VAE in
    ``vae_dtype`` (default: the DiT's); ``resident_blocks``: only that many of the DiT's main
    blocks on ``device``, the others streamed (``engines.block_streaming``);
    ``text_encoder_placement``: ``resident``, ``released`` (taking turns with the DiT) or
    ``cpu`` (``engines.placement``; released on the CPU reads the networks again through
    ``reload``: ``"text encoder"`` and ``"DiT"`` → the module, as built here). fp16 is refused
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
    engines = _placed(
        TorchEngine("text_encoder", text_encoder.to(dtype=text_encoder_dtype)),
        TorchEngine("caption_path", CaptionPath(dit)),
        TorchEngine("denoiser", dit),
        device,
        text_encoder_placement,
        reload,
    )
    return Engines(
        *engines,
        vae_decoder=TorchEngine("vae_decoder", _Cast(VAEDecoder(vae), vae_dtype)),
        vae_encoder=TorchEngine("vae_encoder", _Cast(VAEEncoder(vae), vae_dtype)),
        backend="torch",
        device=device,
        dtype=dtype,
    )


def _placed(
    text: TorchEngine,
    caption: TorchEngine,
    denoiser: TorchEngine,
    device: torch.device,
    placement: str,
    reload: Mapping[str, Callable[[], nn.Module]] | None,
) -> tuple[Engine, Engine, Engine]:
    """The text encoder and the DiT's engines placed (``engines.placement``); the text encoder
    arrives on the CPU (or on ``meta``: released already, read at its first call)."""
    from zimage_trt.engines import placement as where

    if placement not in where.TEXT_ENCODER_PLACEMENTS:
        raise InputError(f"text encoder placement {placement!r} is not one of "
                         f"{', '.join(where.TEXT_ENCODER_PLACEMENTS)}")  # fmt: skip
    released = next(text.module.parameters()).device.type == "meta"
    if released and placement != "released":
        raise InputError("the text encoder arrived released (on meta): it must be placed "
                         "'released'")  # fmt: skip
    if placement == "resident":
        text.module.to(device)
        return text, caption, denoiser
    if placement == "cpu":
        return where.OnCpu(text, device), caption, denoiser
    parked: dict[str, where.Parking]
    if device.type == "cuda":
        parked = {"text encoder": where.Offload(text.module, device),
                  "DiT": where.Offload(denoiser.module, device)}  # fmt: skip
    else:
        if reload is None or set(reload) != {"text encoder", "DiT"}:
            raise InputError("releasing the text encoder on the CPU reads it (and the DiT) again "
                             "from the model's files: load the model from files")  # fmt: skip
        parked = {name: where.Reload(module, reload[name]) for name, module in
                  (("text encoder", text.module), ("DiT", denoiser.module))}  # fmt: skip
        if not released:
            parked["text encoder"].park()
    turns = where.Turns(parked, on="DiT")
    dit = [where.TurnEngine(engine, "DiT", turns) for engine in (caption, denoiser)]
    return where.TurnEngine(text, "text encoder", turns), dit[0], dit[1]


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
    text_encoder_placement: str = "resident",
    text_encoder_storage: torch.dtype = torch.float32,
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
) -> Engines:
    """The three networks of ``sources`` (its LoRAs fused into the DiT) on ``device``, eager
    (``gguf_in_memory``: a GGUF DiT kept quantized, ``models.gguf_resident``;
    ``text_encoder_placement``: see ``torch_engines``; released on the CPU, the text encoder is
    read at its first call, never beside the DiT). ``text_encoder_storage`` bf16: its weights
    kept in bf16 (a bf16 file's, exactly) and upcast block by block as it computes in fp32
    (``engines.placement.upcast_per_block``)."""
    files = sources.files
    if text_encoder_storage not in (torch.float32, torch.bfloat16):
        raise InputError(f"text encoder storage {text_encoder_storage} is not float32 or "
                         "bfloat16")  # fmt: skip

    def dit() -> nn.Module:
        return load_fused_dit(sources, dtype, lora_ignore_unmatched=lora_ignore_unmatched,
                              gguf_in_memory=gguf_in_memory, log=log)  # fmt: skip

    def text_encoder(meta: bool = False) -> nn.Module:
        log(f"loading the text encoder from {files.text_encoder}" + (" (its shapes)" * meta))
        return load_text_encoder_weights(files.text_encoder, text_encoder_storage, meta=meta)

    later = text_encoder_placement == "released" and device.type == "cpu"
    if later and resident_blocks is not None:
        raise InputError("on the CPU the DiT's blocks have nowhere else to stream from: "
                         "drop --resident-blocks (a released text encoder reads the DiT "
                         "again)")  # fmt: skip
    fused = dit()
    text = text_encoder(meta=later)
    log(f"loading the VAE from {files.vae}")
    vae = load_vae_weights(files.vae, dtype)
    assert isinstance(fused, ZImageDiT) and isinstance(text, Qwen3TextEncoder)
    if text_encoder_storage != torch.float32:
        from zimage_trt.engines.placement import upcast_per_block

        upcast_per_block(text)
    return torch_engines(fused, text, vae, device=device, dtype=dtype,
                         text_encoder_dtype=text_encoder_storage,
                         resident_blocks=resident_blocks,
                         text_encoder_placement=text_encoder_placement,
                         reload={"text encoder": text_encoder, "DiT": dit})  # fmt: skip
