"""PSNR / SSIM and reading the workflow back from an image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zimage_trt.runtime.reproduce import psnr, ssim, workflow_from_image


def test_psnr_known_values() -> None:
    a = np.zeros((8, 8, 3), dtype=np.uint8)
    b = a.copy()
    assert psnr(a, b) == float("inf")
    b[...] = 1  # MSE 1 → 10·log10(255²) = 48.13 dB
    assert psnr(a, b) == pytest.approx(48.1308, abs=1e-4)
    with pytest.raises(ValueError, match=r"images differ in size: \(8, 8, 3\) vs \(4, 8, 3\)"):
        psnr(a, b[:4])


def test_ssim_identical_noisy_and_inverted() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    noisy = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    assert 0.5 < ssim(a, noisy) < 0.99
    assert ssim(a, 255 - a) < 0.0  # anti-correlated structure


def test_image_without_workflow_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(path)
    with pytest.raises(ValueError) as err:
        workflow_from_image(path)
    assert str(err.value) == (
        f"{path} carries no workflow: neither a zimage-trt "
        "'zimage-trt.workflow' chunk nor ComfyUI's 'prompt'/'workflow' "
        "chunks"
    )
