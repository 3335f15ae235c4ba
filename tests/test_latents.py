"""Latent nodes and the Flux latent format against comfyui-semantics.md §2.3, §10 and §16."""

from __future__ import annotations

import re

import pytest
import torch
from comfy_reference import H_28_TO_54, W_22_TO_42

from zimage_trt.sampling.latents import (
    LATENT_CHANNELS,
    VAE_SCALE,
    common_upscale,
    empty_latent,
    prepare_sampler_input,
    process_in,
    process_out,
    upscale_latent,
    upscale_latent_by,
)


def arange_latent(h: int, w: int) -> torch.Tensor:
    """[1, 16, h, w] with value c·h·w + y·w + x, so each output names its source element."""
    return torch.arange(LATENT_CHANNELS * h * w, dtype=torch.float32).reshape(1, 16, h, w)


def test_constants() -> None:
    assert LATENT_CHANNELS == 16
    assert VAE_SCALE == 8


def test_empty_latent_stage1_shape() -> None:
    latent = empty_latent(176, 224)
    assert latent.shape == (1, 16, 28, 22)
    assert latent.dtype == torch.float32
    assert torch.count_nonzero(latent) == 0
    assert empty_latent(16, 16384, batch=3).shape == (3, 16, 2048, 2)


@pytest.mark.parametrize(
    ("width", "height", "message"),
    [
        (100, 224, "width must be a multiple of 16 in [16, 16384] pixels, got 100"),
        (176, 8, "height must be a multiple of 16 in [16, 16384] pixels, got 8"),
        (176, 16400, "height must be a multiple of 16 in [16, 16384] pixels, got 16400"),
        (0, 224, "width must be a multiple of 16 in [16, 16384] pixels, got 0"),
    ],
)
def test_empty_latent_rejects_bad_sides(width: int, height: int, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        empty_latent(width, height)


def test_empty_latent_rejects_bad_batch() -> None:
    with pytest.raises(ValueError, match=r"^batch must be an integer >= 1, got 0$"):
        empty_latent(176, 224, batch=0)


def test_latent_format_values_and_round_trip() -> None:
    z = torch.tensor([0.0, 0.1159, 1.0, -2.5])
    torch.testing.assert_close(
        process_in(z), torch.tensor([-0.04185149, 0.0, 0.31924851, -0.94460149]), atol=1e-7, rtol=0
    )
    torch.testing.assert_close(process_out(process_in(z)), z, atol=1e-6, rtol=0)
    torch.testing.assert_close(process_out(torch.zeros(1)), torch.tensor([0.1159]))
    x = torch.randn(2, 16, 4, 6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(process_in(process_out(x)), x, atol=1e-6, rtol=0)


def test_all_zero_latent_stays_zero() -> None:
    zeros = empty_latent(176, 224)
    assert torch.equal(prepare_sampler_input(zeros), zeros)
    one_hot = zeros.clone()
    one_hot[0, 3, 5, 7] = 1.0
    prepared = prepare_sampler_input(one_hot)
    assert torch.equal(prepared, process_in(one_hot))
    # a single non-zero element switches the whole latent to model space
    assert float(prepared[0, 0, 0, 0]) == pytest.approx(-0.1159 * 0.3611, abs=1e-8)


def test_stage2_latent_upscale_nearest_exact_index_maps() -> None:
    source = arange_latent(28, 22)
    out = upscale_latent(source, 336, 432)  # LatentUpscale nearest-exact, pixels
    assert out.shape == (1, 16, 54, 42)
    rows = torch.tensor(H_28_TO_54)[:, None]
    cols = torch.tensor(W_22_TO_42)[None, :]
    assert torch.equal(out, source[:, :, rows, cols])
    assert out[0, 0, 0].tolist() == [float(i) for i in W_22_TO_42]
    assert (out[0, 0, :, 0] / 22).tolist() == [float(i) for i in H_28_TO_54]


def test_stage3_latent_upscale_by_2_repeats_each_element() -> None:
    source = arange_latent(54, 42)
    out = upscale_latent_by(source, 2.0)
    assert out.shape == (1, 16, 108, 84)
    assert torch.equal(out, source.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))


def test_nearest_exact_commutes_with_latent_format() -> None:
    x = torch.randn(1, 16, 28, 22, generator=torch.Generator().manual_seed(1))
    a = upscale_latent(process_out(x), 336, 432)
    b = process_out(upscale_latent(x, 336, 432))
    assert torch.equal(a, b)  # pure element copies: bit-identical


def test_upscale_by_rounds_like_python() -> None:
    source = arange_latent(27, 21)
    # 21·1.5 = 31.5 → 32 and 27·1.5 = 40.5 → 40 (round half to even)
    assert upscale_latent_by(source, 1.5).shape == (1, 16, 40, 32)
    assert upscale_latent_by(source, 0.5).shape == (1, 16, 14, 10)


def test_upscale_latent_clamps_and_derives_a_zero_side() -> None:
    source = arange_latent(28, 22)
    assert upscale_latent(source, 8, 8).shape == (1, 16, 8, 8)  # clamped to 64 px
    # height 0: round(28 · 336 / 22) = 428 px → 53 latent rows
    assert upscale_latent(source, 336, 0).shape == (1, 16, 53, 42)
    # width 0: round(22 · 432 / 28) = 339 px → 42 latent columns
    assert upscale_latent(source, 0, 432).shape == (1, 16, 54, 42)
    # derived sides are rounded before the // 8: round(28 · 69 / 22) = round(87.8) = 88 → 11 rows,
    # round(22 · 91 / 28) = round(71.5) = 72 → 9 columns
    assert upscale_latent(source, 69, 0).shape == (1, 16, 11, 8)
    assert upscale_latent(source, 0, 91).shape == (1, 16, 11, 9)
    assert upscale_latent(source, 0, 8).shape == (1, 16, 8, 8)  # both clamped to 64 px
    assert upscale_latent(source, 0, 0) is source


def test_other_methods_follow_torch_interpolate() -> None:
    x = torch.randn(1, 16, 28, 22, generator=torch.Generator().manual_seed(2))
    for method in ("bilinear", "bicubic", "area"):
        out = upscale_latent(x, 336, 432, method=method)
        expected = torch.nn.functional.interpolate(x, size=(54, 42), mode=method)
        assert torch.equal(out, expected), method
    # bilinear without align_corners: a constant stays exactly constant
    flat = torch.full((1, 16, 4, 4), 0.25)
    assert torch.equal(
        upscale_latent_by(flat, 2.0, method="bilinear"), torch.full((1, 16, 8, 8), 0.25)
    )


def test_center_crop_trims_the_source_to_the_target_aspect() -> None:
    source = arange_latent(28, 22)
    # target 1:1 from 22 wide × 28 tall: crop 3 rows top and bottom → rows 3..24, then identity
    square = common_upscale(source, 22, 22, "nearest-exact", "center")
    assert torch.equal(square, source[:, :, 3:25, :])
    # target 2:1: keep all 22 columns, trim round((28 − 28·(22/28)/2)/2) = round(8.5) = 8 rows
    # top and bottom (Python rounds half to even), then resize 12 → 11 rows
    wide = common_upscale(source, 22, 11, "nearest-exact", "center")
    assert wide.shape == (1, 16, 11, 22)
    rows = [8 + min(int((i + 0.5) * 12 / 11), 11) for i in range(11)]
    assert rows == [8, 9, 10, 11, 12, 14, 15, 16, 17, 18, 19]
    assert torch.equal(wide, source[:, :, rows, :])
    # 10 wide × 11 tall: (28 − 22·11/10)/2 = 1.9 rounds to 2 rows each side, not 1
    tall = common_upscale(source, 10, 11, "nearest-exact", "center")
    expected = torch.nn.functional.interpolate(
        source[:, :, 2:26, :], size=(11, 10), mode="nearest-exact"
    )
    assert torch.equal(tall, expected)
    # same aspect: no crop
    same = upscale_latent(source, 352, 448, crop="center")
    assert torch.equal(same, source.repeat_interleave(2, 2).repeat_interleave(2, 3))


def test_upscale_errors() -> None:
    source = arange_latent(28, 22)
    with pytest.raises(
        ValueError,
        match=r"^upscale method 'bislerp' is not supported; choose one of: nearest-exact, "
        r"bilinear, area, bicubic$",
    ):
        upscale_latent(source, 336, 432, method="bislerp")
    with pytest.raises(
        ValueError, match=r"^unknown crop 'edges'; choose one of: disabled, center$"
    ):
        upscale_latent(source, 336, 432, crop="edges")
    with pytest.raises(ValueError, match=r"^width must be in \[0, 16384\] pixels, got -8$"):
        upscale_latent(source, -8, 432)
    with pytest.raises(ValueError, match=r"^scale_by must be > 0, got 0$"):
        upscale_latent_by(source, 0)
    with pytest.raises(
        ValueError, match=r"^expected a \[B, C, H, W\] latent, got shape \[16, 28, 22\]$"
    ):
        upscale_latent_by(source[0], 2.0)
