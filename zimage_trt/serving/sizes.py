"""An OpenAI ``size`` ("WxH", the final image) turned into a workflow's stage sizes, and the
nearest sizes the served engines can make when a size cannot be made exactly.

The last stage gets exactly W×H; every earlier stage keeps its ratio to the workflow's final
size, rounded to a multiple of 16 px (the empty latent of the first stage, the upscale targets
of the others, all given explicitly). A size equal to the workflow's own final size leaves the
workflow as it is, so that the image is pixel-identical to ``zimage-trt generate``'s.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

from zimage_trt.errors import InputError
from zimage_trt.sampling.latents import SIDE_MULTIPLE, VAE_SCALE
from zimage_trt.workflow import Workflow
from zimage_trt.workflow.spec import LatentSource

SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
MIN_SIDE = 64  # LatentUpscale's smallest side; and below it Z-Image makes nothing useful
MAX_SERVED_SIDE = 4096


def parse_size(text: str) -> tuple[int, int]:
    """``"672x864"`` → (672, 864); a clear error for anything else."""
    match = SIZE.match(text.strip().lower()) if isinstance(text, str) else None
    if match is None:
        raise InputError(f"size {text!r} must be WIDTHxHEIGHT in pixels, e.g. '672x864'")
    width, height = int(match[1]), int(match[2])
    for side in (width, height):
        if not MIN_SIDE <= side <= MAX_SERVED_SIDE or side % SIDE_MULTIPLE:
            raise InputError(
                f"size {text!r}: each side must be a multiple of {SIDE_MULTIPLE} between "
                f"{MIN_SIDE} and {MAX_SERVED_SIDE} px"
            )
    return width, height


def final_size(wf: Workflow) -> tuple[int, int]:
    """The workflow's own final image size, (width, height) in px."""
    h, w = wf.latent_sizes()[-1]
    return w * VAE_SCALE, h * VAE_SCALE


def sized(wf: Workflow, width: int, height: int) -> Workflow:
    """``wf`` making a ``width``×``height`` image (a copy; ``wf`` itself when that is its size)."""
    native_w, native_h = final_size(wf)
    if (width, height) == (native_w, native_h):
        return wf
    out = wf.model_copy(deep=True)
    sizes = wf.latent_sizes()
    last = len(sizes) - 1
    for i, (stage, (h, w)) in enumerate(zip(out.stages, sizes, strict=True)):
        if i == last:
            new_w, new_h = width, height
        else:
            new_w = _round16(width * w * VAE_SCALE / native_w)
            new_h = _round16(height * h * VAE_SCALE / native_h)
        latent = stage.latent.model_dump()
        stage.latent = LatentSource.model_validate(
            {**latent, "width": new_w, "height": new_h, "scale": None}
        )
    return out


def _round16(pixels: float) -> int:
    return max(SIDE_MULTIPLE, SIDE_MULTIPLE * round(pixels / SIDE_MULTIPLE))


def profile_sizes(
    shape_ranges: Iterable[tuple[Sequence[int], Sequence[int]]],
) -> set[tuple[int, int]]:
    """Every image size (multiples of 16 px) whose latents lie in one of the (min, max) latent
    shape ranges ([B, C, H, W]) — the sizes a denoiser profile can make."""
    sizes = set()
    step = SIDE_MULTIPLE // VAE_SCALE
    for low, high in shape_ranges:
        heights = range(-(-low[2] // step) * step, high[2] + 1, step)
        widths = range(-(-low[3] // step) * step, high[3] + 1, step)
        if len(heights) * len(widths) > 100_000:  # a wide dynamic profile: its corners and middle
            heights = range(heights.start, heights.stop, max(step, len(heights) // 50 * step))
            widths = range(widths.start, widths.stop, max(step, len(widths) // 50 * step))
        sizes |= {(w * VAE_SCALE, h * VAE_SCALE) for h in heights for w in widths}
    return sizes


def nearest_sizes(
    width: int,
    height: int,
    candidates: Iterable[tuple[int, int]],
    fits: Callable[[int, int], bool],
    count: int = 3,
) -> list[tuple[int, int]]:
    """Up to ``count`` of ``candidates`` (width, height) for which ``fits``, nearest to
    ``width``×``height`` first."""
    found: list[tuple[int, int]] = []
    for w, h in sorted(set(candidates), key=lambda s: (abs(s[0] - width) + abs(s[1] - height), s)):
        if MIN_SIDE <= w <= MAX_SERVED_SIDE and MIN_SIDE <= h <= MAX_SERVED_SIDE and fits(w, h):
            found.append((w, h))
            if len(found) == count:
                break
    return found
