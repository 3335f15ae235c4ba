"""Optimization profiles from a workflow (or a list of resolutions): the shapes each engine serves.

Per stage the DiT sees one latent size; its batch is 1, or 2 when cfg > 1 and the two prompts
encode to equal lengths (ComfyUI batches cond and uncond only then; otherwise two batch-1
calls); its caption slots run from 32 to the caption ceiling rounded up to 32. The opt of each
profile is the stage's exact shape with the workflow's own positive prompt. The text encoder and
caption path serve one prompt at a time at any length up to the ceiling (default 4,096 tokens: a
2,000-character Chinese negative prompt is ~1,600). The VAE decoder gets a static profile per
decoded latent size (each preview and the final image); the encoder one per image input. A build
for tiled decoding (``--vae-tiles``) gives the decoder, in place of those, one profile per
tiling of ComfyUI's VAEDecodeTiled, spanning the pieces it cuts from those latents
(``runtime.vae_tiles``): the engine then holds a tile's activations, not a whole image's.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from zimage_trt.build_engines.networks import Network, ShapePoint
from zimage_trt.engines.manifest import Profile, ShapeRange
from zimage_trt.errors import InputError
from zimage_trt.runtime.vae_tiles import VaeTiles, piece_sides, tilings
from zimage_trt.sampling.latents import MAX_SIDE, SIDE_MULTIPLE, VAE_SCALE
from zimage_trt.workflow import Workflow

CAPTION_MAX = 4096
CAPTION_MIN_CEILING = 64  # below this even the chat template alone would not fit comfortably
RESOLUTION = re.compile(r"^(\d+)[x×](\d+)$")
PROMPT_ENGINES = ("text_encoder", "caption_path")


@dataclass(frozen=True)
class Span:
    """min/opt/max of one size."""

    min: int
    opt: int
    max: int

    @classmethod
    def exactly(cls, value: int) -> Span:
        return cls(value, value, value)


@dataclass(frozen=True)
class StageShapes:
    """What one stage (or one requested resolution, or a bucket) asks of the engines."""

    name: str
    height: Span  # latent rows
    width: Span  # latent columns
    max_batch: int  # 2 when cfg > 1, else 1
    decode: bool  # the VAE decodes this latent (a preview or the final image)
    encode: bool = False  # the VAE encodes an input image at this size
    denoise: bool = True  # the DiT samples this latent (not a decoder-only tile profile)


def workflow_stages(wf: Workflow) -> list[StageShapes]:
    out = []
    for i, (stage, (h, w)) in enumerate(zip(wf.stages, wf.latent_sizes(), strict=True)):
        last = i == len(wf.stages) - 1
        out.append(
            StageShapes(
                name=stage.name or f"stage{i + 1}",
                height=Span.exactly(h),
                width=Span.exactly(w),
                max_batch=1 if math.isclose(stage.cfg, 1.0) else 2,
                decode=stage.preview or last,
                encode=stage.latent.source == "image",
            )
        )
    return out


def parse_resolutions(text: str) -> list[tuple[int, int]]:
    """``"1024x1024,768x1344"`` → [(1024, 1024), (768, 1344)] (width × height in pixels)."""
    sizes = []
    for item in text.replace(" ", "").split(",") if text.strip() else ():
        match = RESOLUTION.match(item)
        if not match:
            raise InputError(f"resolution {item!r} is not WIDTHxHEIGHT (e.g. 1024x1024)")
        w, h = int(match[1]), int(match[2])
        for side in (w, h):
            if side % SIDE_MULTIPLE or not SIDE_MULTIPLE <= side <= MAX_SIDE:
                raise InputError(
                    f"resolution {item}: {side} px must be a multiple of {SIDE_MULTIPLE} "
                    f"between {SIDE_MULTIPLE} and {MAX_SIDE}"
                )
        sizes.append((w, h))
    if not sizes:
        raise InputError("no resolutions given")
    return sizes


def resolution_stages(sizes: Sequence[tuple[int, int]], cfg: bool = True) -> list[StageShapes]:
    """One single-stage profile per resolution; with ``cfg`` the DiT also serves batch 2."""
    return [
        StageShapes(
            f"{w}x{h}",
            Span.exactly(h // VAE_SCALE),
            Span.exactly(w // VAE_SCALE),
            2 if cfg else 1,
            decode=True,
        )
        for w, h in sizes
    ]


def bucket_stage(text: str, stages: Sequence[StageShapes]) -> StageShapes:
    """A wider profile ``"512x512-1024x1024"`` (pixels, min-max) whose opt is the largest
    workflow stage inside it (else its max), serving any size in between."""
    parts = text.split("-")
    if len(parts) != 2:
        raise InputError(f"bucket {text!r} is not MINWxMINH-MAXWxMAXH (e.g. 512x512-1024x1024)")
    (w0, h0), (w1, h1) = parse_resolutions(parts[0])[0], parse_resolutions(parts[1])[0]
    if w0 > w1 or h0 > h1:
        raise InputError(f"bucket {text!r}: the minimum {w0}x{h0} exceeds the maximum {w1}x{h1}")
    lo_h, hi_h, lo_w, hi_w = h0 // VAE_SCALE, h1 // VAE_SCALE, w0 // VAE_SCALE, w1 // VAE_SCALE
    inside = [s for s in stages if lo_h <= s.height.opt <= hi_h and lo_w <= s.width.opt <= hi_w]
    best = max(inside, key=lambda s: s.height.opt * s.width.opt, default=None)
    opt_h, opt_w = (best.height.opt, best.width.opt) if best else (hi_h, hi_w)
    return StageShapes(
        f"bucket {text}",
        Span(lo_h, opt_h, hi_h),
        Span(lo_w, opt_w, hi_w),
        max(2, *(s.max_batch for s in stages)),
        decode=True,
    )


def tile_stages(tiles: VaeTiles, stages: Sequence[StageShapes]) -> list[StageShapes]:
    """The decoder's profiles for decoding ``stages``' latents in ``tiles``: one per tiling of
    ComfyUI's VAEDecodeTiled (tall, wide, square), its rows and columns from the smallest piece
    that tiling cuts from any of them to the largest, its opt (every size of a bucket's span
    counted). No piece is longer than its tiling's tile, so an engine sizes its activation
    memory for a tile rather than for the whole latent."""
    decoded = [s for s in stages if s.decode]
    if not decoded:
        raise InputError("--vae-tiles: no stage decodes a latent")
    tile, overlap = tiles.latent()
    out = []
    for label, (tall, wide) in zip(("tall", "wide", "square"), tilings(tile), strict=True):
        rows = {n for s in decoded for h in range(s.height.min, s.height.max + 1)
                for n in piece_sides(h, tall, overlap)}  # fmt: skip
        cols = {n for s in decoded for w in range(s.width.min, s.width.max + 1)
                for n in piece_sides(w, wide, overlap)}  # fmt: skip
        out.append(StageShapes(
            f"tiles {tiles} {label}",
            Span(min(rows), max(rows), max(rows)),
            Span(min(cols), max(cols), max(cols)),
            1,
            decode=True,
            denoise=False,
        ))  # fmt: skip
    return out


def caption_span(caption_max: int, opt_tokens: int) -> Span:
    if caption_max < CAPTION_MIN_CEILING:
        raise InputError(
            f"caption ceiling {caption_max} tokens is too small; use at least "
            f"{CAPTION_MIN_CEILING} (default {CAPTION_MAX})"
        )
    return Span(1, max(1, min(opt_tokens, caption_max)), caption_max)


def engine_profiles(
    nets: dict[str, Network], stages: Sequence[StageShapes], caption: Span
) -> dict[str, list[Profile]]:
    """One profile per stage for the DiT and the VAE, one for the prompt engines; stages with
    identical shapes share a profile (named after all of them)."""
    out: dict[str, list[Profile]] = {}
    for name, net in nets.items():
        if name in PROMPT_ENGINES:
            corners = (
                ShapePoint(1, caption.min, 2, 2),
                ShapePoint(1, caption.opt, 2, 2),
                ShapePoint(1, caption.max, 2, 2),
            )
            out[name] = [_profile("prompt", net, corners)]
            continue
        wanted = {
            "denoiser": [s for s in stages if s.denoise],
            "vae_decoder": [s for s in stages if s.decode],
            "vae_encoder": [s for s in stages if s.encode],
        }[name]
        profiles: list[Profile] = []
        for stage in wanted:
            batch = stage.max_batch if name == "denoiser" else 1
            tokens = caption if name == "denoiser" else Span.exactly(1)
            corners = (
                ShapePoint(1, tokens.min, stage.height.min, stage.width.min),
                ShapePoint(1, tokens.opt, stage.height.opt, stage.width.opt),
                ShapePoint(batch, tokens.max, stage.height.max, stage.width.max),
            )
            profile = _profile(stage.name, net, corners)
            same = next((i for i, p in enumerate(profiles) if p.shapes == profile.shapes), None)
            if same is None:
                profiles.append(profile)
            else:
                merged = f"{profiles[same].name}+{stage.name}"
                profiles[same] = Profile(name=merged, shapes=profile.shapes)
        if profiles:
            out[name] = profiles
    return out


def _profile(
    name: str, net: Network, corners: tuple[ShapePoint, ShapePoint, ShapePoint]
) -> Profile:
    lo, opt, hi = (net.shapes(p) for p in corners)
    return Profile(
        name=name,
        shapes={k: ShapeRange(min=lo[k], opt=opt[k], max=hi[k]) for k in lo},
    )


def limits(profiles: Sequence[Profile], net: Network) -> ShapePoint:
    """The largest point any profile of ``net`` serves (sizes the export's dims and RoPE tables)."""
    axes = {"B": 1, "L": 1, "H": 2, "W": 2}
    for profile in profiles:
        for spec in net.inputs:
            shape = profile.shapes[spec.name].max
            for dim, size in zip(spec.dims, shape, strict=True):
                if isinstance(dim, str):
                    key = {"Lc": "L", "8H": "H", "8W": "W"}.get(dim, dim)
                    value = size // VAE_SCALE if dim in ("8H", "8W") else size
                    axes[key] = max(axes[key], value)
    return ShapePoint(axes["B"], axes["L"], axes["H"], axes["W"])
