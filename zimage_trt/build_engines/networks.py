"""Each engine's network as the builder sees it: its inputs and outputs (names, symbolic dims,
dtypes), the module it exports, sample inputs at any shape, and the torch.export dynamic shapes.

Dims are integers (static) or axis names:

| axis | meaning                                           |
|------|---------------------------------------------------|
| B    | batch (cond and uncond share a call when equal)   |
| L    | text tokens (the chat-templated prompt)           |
| Lc   | caption slots after the caption path, ceil(L/32)·32 |
| H, W | latent height and width (even: the DiT patchifies 2×2) |
| 8H, 8W | image height and width in pixels               |

A `ShapePoint` (batch, tokens, latent h, w) fixes every axis, so one point gives every input's
shape; the profiles are built from points (see ``profiles.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.export import Dim

from zimage_trt.engines.protocol import DTYPE_NAMES, ENGINE_IO
from zimage_trt.errors import InputError
from zimage_trt.models.dit import SEQ_MULTIPLE, CaptionPath, DiTConfig, ZImageDiT
from zimage_trt.models.text_encoder import Qwen3Config, Qwen3TextEncoder
from zimage_trt.models.vae import FluxVAE, VAEConfig, VAEDecoder, VAEEncoder

DimSpec = tuple[int | str, ...]
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ShapePoint:
    """One call's sizes: batch, text tokens, latent height and width."""

    batch: int
    tokens: int
    height: int
    width: int

    def axes(self) -> dict[str, int]:
        caption = -(-self.tokens // SEQ_MULTIPLE) * SEQ_MULTIPLE
        return {"B": self.batch, "L": self.tokens, "Lc": caption, "H": self.height,
                "W": self.width, "8H": 8 * self.height, "8W": 8 * self.width}  # fmt: skip


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dims: DimSpec
    dtype: torch.dtype

    def shape(self, point: ShapePoint) -> tuple[int, ...]:
        axes = point.axes()
        return tuple(d if isinstance(d, int) else axes[d] for d in self.dims)


@dataclass(frozen=True)
class Network:
    """One engine: its I/O and how to make its module from the three networks."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    component: str  # "transformer" | "text_encoder" | "vae": whose weights it holds

    def shapes(self, point: ShapePoint) -> dict[str, tuple[int, ...]]:
        return {spec.name: spec.shape(point) for spec in self.inputs}

    def module(self, dit: ZImageDiT | None, text: Qwen3TextEncoder | None,
               vae: FluxVAE | None) -> nn.Module:  # fmt: skip
        wrappers: dict[str, Any] = {
            "text_encoder": lambda: text,
            "caption_path": lambda: dit and CaptionPath(dit),
            "denoiser": lambda: dit,
            "vae_decoder": lambda: vae and VAEDecoder(vae),
            "vae_encoder": lambda: vae and VAEEncoder(vae),
        }
        module = wrappers[self.name]()
        if module is None:
            raise InputError(f"engine {self.name!r} needs the {self.component} network")
        return module

    def sample_inputs(self, point: ShapePoint, generator: torch.Generator) -> dict[str, Tensor]:
        """Random inputs of the right shapes and dtypes; masks are right-padded per item (the
        second item shorter) so masking is exercised, and token ids stay inside ``vocab``."""
        out: dict[str, Tensor] = {}
        for spec in self.inputs:
            shape = spec.shape(point)
            if spec.name in ("attention_mask", "cap_mask", "cap_valid"):
                out[spec.name] = _right_padded_mask(shape, spec.dtype, spec.name == "cap_valid")
            elif spec.name == "input_ids":
                out[spec.name] = torch.randint(0, 1000, shape, generator=generator)
            elif spec.name == "sigma":
                out[spec.name] = torch.rand(shape, generator=generator) * 0.9 + 0.05
            else:
                out[spec.name] = torch.randn(shape, generator=generator).to(spec.dtype)
        return out

    def dynamic_shapes(self, limits: ShapePoint) -> dict[str, dict[int, Any]]:
        """torch.export dynamic shapes with one `Dim` object per axis shared by every input
        (required by the exporter), bounded by ``limits`` (the largest point served)."""
        half_h = Dim("half_height", min=1, max=max(2, limits.height // 2))
        half_w = Dim("half_width", min=1, max=max(2, limits.width // 2))
        dims: dict[str, Any] = {
            "B": Dim("batch", min=1, max=max(2, limits.batch)),
            "L": Dim("tokens", min=1, max=max(2, limits.tokens)),
            "Lc": SEQ_MULTIPLE * Dim("caption_blocks", min=1, max=max(2, -(-limits.tokens // 32))),
            "H": 2 * half_h,
            "W": 2 * half_w,
            "8H": 16 * half_h,
            "8W": 16 * half_w,
        }
        return {
            spec.name: {i: dims[d] for i, d in enumerate(spec.dims) if isinstance(d, str)}
            for spec in self.inputs
        }


def _right_padded_mask(shape: tuple[int, ...], dtype: torch.dtype, blocks: bool) -> Tensor:
    batch, length = shape
    mask = torch.ones(shape, dtype=torch.bool)
    if batch > 1:  # the second item is shorter: padding must be masked, not computed on
        keep = max(1, length // 2)
        if blocks:  # caption slots are valid in whole blocks of 32
            keep = max(SEQ_MULTIPLE, keep // SEQ_MULTIPLE * SEQ_MULTIPLE) if length > 32 else length
        mask[1, keep:] = False
    return mask.to(dtype)


def networks(
    precision: str, dit: DiTConfig, text: Qwen3Config, vae: VAEConfig
) -> dict[str, Network]:
    """The five engines' I/O for a precision (``fp32`` or ``bf16``; never fp16 for Z-Image)."""
    if precision not in PRECISIONS:
        raise InputError(
            f"precision {precision!r} is not supported; choose one of: {', '.join(PRECISIONS)} "
            "(fp16 gives NaN / black images with Z-Image)"
        )
    dt = PRECISIONS[precision]
    f32, i64, bool_ = torch.float32, torch.int64, torch.bool
    c, z = vae.latent_channels, dit.in_channels
    specs: dict[str, tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...], str]] = {
        "text_encoder": (
            (TensorSpec("input_ids", ("B", "L"), i64),
             TensorSpec("attention_mask", ("B", "L"), i64)),
            (TensorSpec("hidden", ("B", "L", text.hidden_size), dt),),
            "text_encoder",
        ),
        "caption_path": (
            (TensorSpec("cap_feats", ("B", "L", dit.cap_feat_dim), dt),
             TensorSpec("cap_mask", ("B", "L"), bool_)),
            (TensorSpec("cap_tokens", ("B", "Lc", dit.dim), dt),
             TensorSpec("cap_valid", ("B", "Lc"), bool_)),
            "transformer",
        ),
        "denoiser": (
            (TensorSpec("latents", ("B", z, "H", "W"), dt), TensorSpec("sigma", ("B",), f32),
             TensorSpec("cap_tokens", ("B", "Lc", dit.dim), dt),
             TensorSpec("cap_valid", ("B", "Lc"), bool_)),
            (TensorSpec("v", ("B", z, "H", "W"), f32),),
            "transformer",
        ),
        "vae_decoder": (
            (TensorSpec("latents", ("B", c, "H", "W"), dt),),
            (TensorSpec("image", ("B", vae.out_channels, "8H", "8W"), dt),),
            "vae",
        ),
        "vae_encoder": (
            (TensorSpec("image", ("B", vae.in_channels, "8H", "8W"), dt),),
            (TensorSpec("latents", ("B", c, "H", "W"), dt),),
            "vae",
        ),
    }  # fmt: skip
    out = {}
    for name, (inputs, outputs, component) in specs.items():
        names = (tuple(s.name for s in inputs), tuple(s.name for s in outputs))
        assert names == ENGINE_IO[name], f"{name}: {names} != {ENGINE_IO[name]}"
        out[name] = Network(name, inputs, outputs, component)
    return out


def dtype_names(specs: tuple[TensorSpec, ...]) -> dict[str, str]:
    return {s.name: DTYPE_NAMES[s.dtype] for s in specs}
