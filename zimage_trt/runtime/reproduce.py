"""Re-render an image from the workflow it carries and measure how close the result is.

A zimage-trt PNG carries its whole workflow (``zimage-trt.workflow``); a ComfyUI PNG carries its
graph, which `zimage_trt.workflow.comfy_import` imports. PSNR and SSIM compare the new render
with the original.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter

from zimage_trt.errors import InputError
from zimage_trt.runtime.images import METADATA_WORKFLOW, open_image
from zimage_trt.runtime.pipeline import Pipeline
from zimage_trt.runtime.requests import GenerateRequest, Generation, Progress
from zimage_trt.workflow import Workflow
from zimage_trt.workflow.trust import untrusted


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images, in dB (inf when identical)."""
    _same_shape(a, b)
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean structural similarity (Wang et al. 2004: Gaussian window σ 1.5, K1 0.01, K2 0.03,
    L 255) over the colour channels of two uint8 images."""
    _same_shape(a, b)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    scores = []
    for ch in range(a.shape[2] if a.ndim == 3 else 1):
        x = (a[..., ch] if a.ndim == 3 else a).astype(np.float64)
        y = (b[..., ch] if b.ndim == 3 else b).astype(np.float64)

        def blur(img: np.ndarray) -> np.ndarray:
            return np.asarray(gaussian_filter(img, sigma=1.5, truncate=3.5))

        mx, my = blur(x), blur(y)
        vx, vy, cov = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
        s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        scores.append(float(s.mean()))
    return float(np.mean(scores))


def _same_shape(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise InputError(f"images differ in size: {a.shape} vs {b.shape}")


def workflow_from_image(path: str | Path) -> tuple[Workflow, str]:
    """The workflow embedded in a PNG, and where it came from. It is not trusted: it may not
    read local files by path nor choose where images go (``workflow.trust``)."""
    info: dict[Any, Any] = dict(open_image(path).info)
    text = info.get(METADATA_WORKFLOW)
    if isinstance(text, str):
        wf = Workflow.from_yaml(text, f"{path} ({METADATA_WORKFLOW})")
        return untrusted(wf, f"the workflow in {path}"), "zimage-trt workflow"
    if "prompt" in info or "workflow" in info:
        from zimage_trt.workflow.comfy_import import import_graph

        return untrusted(import_graph(path), f"the ComfyUI graph in {path}"), "ComfyUI graph"
    raise InputError(
        f"{path} carries no workflow: neither a zimage-trt '{METADATA_WORKFLOW}' "
        "chunk nor ComfyUI's 'prompt'/'workflow' chunks"
    )


@dataclass
class Reproduction:
    generation: Generation
    engines: Any
    source: str
    psnr: float
    ssim: float


def reproduce(
    path: str | Path,
    model: str | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    out: Path | None = None,
    progress: Progress | None = None,
) -> Reproduction:
    wf, source = workflow_from_image(path)
    original = np.asarray(open_image(path).convert("RGB"))
    pipeline = Pipeline.open(
        model=model, workflow=wf, device=device, dtype=dtype,
        search=(Path(path).resolve().parent, Path.cwd()),
    )  # fmt: skip
    generation = pipeline.generate(GenerateRequest(), progress)
    pipeline.save(wf, generation, out)
    return Reproduction(
        generation,
        pipeline.engines,
        source,
        psnr(generation.image, original),
        ssim(generation.image, original),
    )
