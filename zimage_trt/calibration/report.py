"""A calibration's quality gate (``zimage-trt calibrate --report``): the workflow rendered for
held-out prompts by the quantized DiT (and text encoder, if quantized) and by the same models
with their quantizers off, on the same seeds, compared per stage (mean |Δ| of the latents
relative to the full-precision one's mean |x|) and on the final image (PSNR and SSIM on uint8
RGB); a quantized text encoder's own error (its hidden states for the prompt, by the same
measure) is reported beside them. No model is downloaded for it: no CLIP.

On the tiny random-weight model the figures only prove the plumbing; with real weights the same
command gives the real ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from zimage_trt.calibration.quantize import unquantized
from zimage_trt.runtime.pipeline import Pipeline
from zimage_trt.runtime.requests import apply_overrides
from zimage_trt.text_table import text_table


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images in dB (inf when equal)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Structural similarity of two uint8 [H, W, C] images (Wang et al. 2004: an 11×11 Gaussian
    window, σ 1.5, K1 0.01, K2 0.03, per channel over the valid region, then averaged)."""
    x = torch.from_numpy(a.astype(np.float64)).permute(2, 0, 1)[:, None]  # [C, 1, H, W]
    y = torch.from_numpy(b.astype(np.float64)).permute(2, 0, 1)[:, None]
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5**2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :])[None, None]
    if min(x.shape[-2:]) < 11:
        raise ValueError(f"SSIM needs images of 11×11 pixels at least, not {a.shape[:2]}")

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    value = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(value.mean())


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """mean |got − ref| / mean |ref|."""
    scale = max(float(ref.abs().mean()), 1e-12)
    return float((got.float() - ref.float()).abs().mean()) / scale


def quality_report(
    pipeline: Pipeline,
    models: Sequence[nn.Module],
    prompts: Sequence[str],
    first_seed: int,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Render ``prompts`` (seed ``first_seed + i`` for prompt ``i``) through ``pipeline``'s
    workflow with ``models`` (the DiT; the text encoder too when it is quantized) quantized and
    unquantized; the comparison as JSON-ready data."""
    wf = pipeline.workflow
    assert wf is not None  # calibration opened it with one
    text_encoder = getattr(pipeline.engines.text_encoder, "module", None)
    encoder_quantized = any(model is text_encoder for model in models)
    rows: list[dict[str, Any]] = []
    for i, prompt in enumerate(prompts):
        run = apply_overrides(wf.model_copy(deep=True), prompt=prompt, seed=first_seed + i)
        pipeline.clear_caches()  # every caption through the model being measured
        with unquantized(*models):
            full = pipeline.run(run)
            hidden = pipeline.prompts(prompt) if encoder_quantized else None
        pipeline.clear_caches()
        quantized = pipeline.run(run)
        stages = {}
        for ref, got in zip(full.stages, quantized.stages, strict=True):
            assert ref.latent is not None and got.latent is not None
            stages[ref.name] = relative_error(got.latent, ref.latent)
        row = {
            "prompt": prompt, "seed": first_seed + i, "latent_error": stages,
            "psnr_db": psnr(quantized.image, full.image), "ssim": ssim(quantized.image, full.image),
        }  # fmt: skip
        if hidden is not None:
            row["text_encoder_error"] = relative_error(pipeline.prompts(prompt), hidden)
        rows.append(row)
        if progress is not None:
            progress(i + 1, len(prompts))
    pipeline.clear_caches()
    psnrs = [float(r["psnr_db"]) for r in rows]
    ssims = [float(r["ssim"]) for r in rows]
    finite = [p for p in psnrs if math.isfinite(p)]
    encoder = {"text_encoder_error": float(np.mean([r["text_encoder_error"] for r in rows]))
               } if encoder_quantized else {}  # fmt: skip
    return {
        "prompts": len(rows),
        **encoder,
        "psnr_db": {"mean": float(np.mean(finite)) if finite else math.inf, "min": min(psnrs)},
        "ssim": {"mean": float(np.mean(ssims)), "min": min(ssims)},
        "latent_error": {
            name: float(np.mean([r["latent_error"][name] for r in rows]))
            for name in rows[0]["latent_error"]
        },
        "rows": rows,
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as a table: one row per prompt, then the means."""
    stages = list(report["latent_error"])
    encoder = "text_encoder_error" in report

    def cells(row: dict[str, Any], psnr_db: float, ssim_value: float) -> tuple[str, ...]:
        text = (f"{row['text_encoder_error']:.4f}",) if encoder else ()
        return (*text, *(f"{row['latent_error'][s]:.4f}" for s in stages),
                f"{psnr_db:.2f}", f"{ssim_value:.4f}")  # fmt: skip

    table = [("seed", "prompt", *(("text enc Δ",) if encoder else ()),
              *(f"{s} Δ" for s in stages), "PSNR dB", "SSIM")]  # fmt: skip
    for row in report["rows"]:
        prompt = row["prompt"] if len(row["prompt"]) <= 32 else row["prompt"][:31] + "…"
        table.append((str(row["seed"]), prompt, *cells(row, row["psnr_db"], row["ssim"])))
    means = cells(report, report["psnr_db"]["mean"], report["ssim"]["mean"])
    table.append(("mean", "", *means))
    return text_table(table)
