"""Pixels out: the VAE image → uint8 exactly as ComfyUI saves it, named as ComfyUI names it,
written atomically, with the workflow that made it in the PNG's text chunks."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torch import Tensor

from zimage_trt import __version__
from zimage_trt.workflow import Workflow

FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
METADATA_WORKFLOW = "zimage-trt.workflow"  # not ComfyUI's "workflow"/"prompt" (JSON graphs)


def to_uint8(image: Tensor) -> np.ndarray:
    """[1,3,H,W] VAE output in [−1, 1] → [H,W,3] uint8: clamp((x+1)/2), ×255, *truncated*
    (ComfyUI's ``process_output`` then ``SaveImage``'s numpy ``astype``)."""
    if image.ndim != 4 or image.shape[0] != 1 or image.shape[1] != 3:
        raise ValueError(f"expected one RGB image [1,3,H,W], got {list(image.shape)}")
    pixels = ((image.float() + 1.0) / 2.0).clamp(0.0, 1.0)
    array = 255.0 * pixels[0].permute(1, 2, 0).cpu().numpy()
    return np.clip(array, 0, 255).astype(np.uint8)


def next_path(folder: Path, prefix: str, suffix: str) -> Path:
    """``{folder}/{prefix}_{counter:05}_.{suffix}`` with the next free counter (ComfyUI naming);
    the prefix may hold sub-folders, which must stay inside ``folder``."""
    target = (folder / f"{prefix}_00001_.{suffix}").resolve()
    root = folder.resolve()
    if root not in target.parents:
        raise ValueError(f"output prefix {prefix!r} escapes the output folder {str(folder)!r}")
    base = Path(prefix).name
    pattern = re.compile(rf"{re.escape(base)}_(\d{{5}})_\.{re.escape(suffix)}$")
    taken = [
        int(m.group(1))
        for p in target.parent.glob(f"{base}_*_.{suffix}")
        if (m := pattern.match(p.name))
    ]
    return target.parent / f"{base}_{max(taken, default=0) + 1:05d}_.{suffix}"


def save_image(pixels: np.ndarray, path: Path, metadata: dict[str, str] | None = None) -> Path:
    """Write via a temp file and rename, so a crash never leaves half an image."""
    fmt = FORMATS.get(path.suffix.lstrip(".").lower())
    if fmt is None:
        raise ValueError(
            f"unknown image format {path.suffix!r}; choose one of: " + ", ".join(FORMATS)
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    image = Image.fromarray(pixels)
    if fmt == "PNG":
        info = PngInfo()
        for key, value in (metadata or {}).items():
            info.add_itxt(key, value)
        image.save(tmp, format=fmt, pnginfo=info, compress_level=4)
    else:
        image.save(tmp, format=fmt, quality=95)
    tmp.replace(path)
    return path


def png_metadata(wf: Workflow, backend: str) -> dict[str, str]:
    """Text chunks: the whole workflow (negative prompt inlined, so it travels with the image),
    the prompts and the seeds."""
    portable = wf.model_copy(deep=True)
    portable.prompts.negative_file = None
    portable.prompts.negative = wf.prompts.negative_text() or None
    return {
        "software": f"zimage-trt {__version__} ({backend})",
        METADATA_WORKFLOW: portable.to_yaml(),
        "zimage-trt.prompt": wf.prompts.positive_text,
        "zimage-trt.negative_prompt": portable.prompts.negative or "",
        "zimage-trt.seeds": ",".join(str(stage.seed) for stage in wf.stages),
    }
