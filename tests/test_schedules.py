"""Schedules against the reference numbers of comfyui-semantics.md §16 (computed by ComfyUI).

The §16 values are printed with 9 significant digits, which round-trips float32, so the schedules
that ComfyUI computes the same way are compared bit for bit.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from comfy_reference import (
    BETA_INDICES_26,
    STAGE1_SIGMAS,
    STAGE1_SIGMAS_DYNAMIC,
    STAGE2_SIGMAS,
    STAGE3_SIGMAS,
)

from zimage_trt.sampling.model_sampling import FlowSampling
from zimage_trt.sampling.schedules import (
    SCHEDULERS,
    calculate_sigmas,
    sigmas_beta,
    sigmas_flow_match_euler,
    sigmas_flow_match_linear,
    sigmas_karras,
    sigmas_normal,
    sigmas_simple,
    truncate_for_denoise,
)


def f32(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def assert_bitwise(actual: torch.Tensor, expected: list[float]) -> None:
    assert actual.dtype == torch.float32
    assert actual.shape == (len(expected),)
    assert torch.equal(actual, f32(expected)), (actual.tolist(), expected)


# --- stage 1: the custom FlowMatchEuler node --------------------------------------------------


def test_stage1_custom_node_default_widgets() -> None:
    assert_bitwise(sigmas_flow_match_euler(9, shift=3.0), STAGE1_SIGMAS)
    assert_bitwise(calculate_sigmas("flow_match_euler", FlowSampling(3.0), 9), STAGE1_SIGMAS)


def test_stage1_custom_node_dynamic_shifting_is_a_linear_ramp() -> None:
    sigmas = sigmas_flow_match_euler(9, shift=3.0, use_dynamic_shifting=True)
    assert_bitwise(sigmas, STAGE1_SIGMAS_DYNAMIC)
    # shift and the dynamic-shift widgets other than the switch do not matter with mu = 0
    other = sigmas_flow_match_euler(
        9,
        shift=7.0,
        use_dynamic_shifting=True,
        base_shift=0.1,
        max_shift=3.0,
        base_image_seq_len=64,
        max_image_seq_len=100,
        stochastic_sampling=True,
    )
    assert torch.equal(other, sigmas)


def test_static_shift_is_applied_twice_but_dynamic_mu_once() -> None:
    # Static shift 3: the smallest sigma is shift(shift(0.001)) = 0.00892857.
    assert float(sigmas_flow_match_euler(9)[-2]) == pytest.approx(STAGE1_SIGMAS[-2], abs=1e-10)
    # Dynamic exponential with mu = ln 3 is the same map applied once: shift(0.001) = 0.002994012.
    dynamic = sigmas_flow_match_euler(9, use_dynamic_shifting=True, mu=math.log(3.0))
    assert float(dynamic[-2]) == pytest.approx(0.002994012, abs=1e-9)
    assert float(dynamic[1]) == pytest.approx(
        3 * STAGE1_SIGMAS_DYNAMIC[1] / (1 + 2 * STAGE1_SIGMAS_DYNAMIC[1]), abs=1e-7
    )


def test_normal_scheduler_matches_stage1_within_one_ulp() -> None:
    normal = sigmas_normal(FlowSampling(3.0), 9)
    assert normal.shape == (10,)
    assert normal[-1] == 0
    diff = (normal - f32(STAGE1_SIGMAS)).abs().max().item()
    assert 0 < diff <= 6e-8  # ComfyUI: "matches to <= 6e-8" (1 ulp), not bit-identical
    assert torch.equal(calculate_sigmas("normal", FlowSampling(3.0), 9), normal)


def test_custom_node_slicing() -> None:
    full = sigmas_flow_match_euler(9)
    assert torch.equal(sigmas_flow_match_euler(9, start_at_step=3, end_at_step=5), full[3:6])
    assert torch.equal(sigmas_flow_match_euler(9, end_at_step=2), full[:3])
    # an empty slice falls back to the full schedule
    assert torch.equal(sigmas_flow_match_euler(9, start_at_step=30), full)
    assert torch.equal(sigmas_flow_match_euler(9, start_at_step=6, end_at_step=2), full)


def test_custom_node_invert_shift_terminal_and_conversions() -> None:
    inverted = sigmas_flow_match_euler(9, invert_sigmas=True)
    assert torch.equal(inverted, torch.cat([1.0 - f32(STAGE1_SIGMAS[:-1]), f32([1.0])]))

    stretched = sigmas_flow_match_euler(9, shift_terminal=0.1)
    assert stretched[0] == 1.0
    assert float(stretched[-2]) == pytest.approx(0.1, abs=1e-7)
    assert float(stretched[4]) == pytest.approx(0.773991048, abs=1e-7)
    # shift_terminal 0.0 is off, like None (the node maps its 0.0 widget to None)
    assert torch.equal(sigmas_flow_match_euler(9, shift_terminal=0.0), f32(STAGE1_SIGMAS))

    # Conversions keep the shifted end points (1.0 and 0.00892857) and respace in between.
    lo, ramp = STAGE1_SIGMAS[-2], np.linspace(0, 1, 9)
    karras = (1 + ramp * (lo ** (1 / 7) - 1)) ** 7
    exponential = np.exp(np.linspace(0.0, math.log(lo), 9))
    for flag, expected in (
        ("use_karras_sigmas", karras),
        ("use_exponential_sigmas", exponential),
    ):
        sigmas = sigmas_flow_match_euler(9, **{flag: True})
        torch.testing.assert_close(
            sigmas[:-1], torch.from_numpy(expected).float(), atol=1e-7, rtol=0
        )
        assert sigmas[-1] == 0
    beta = sigmas_flow_match_euler(9, use_beta_sigmas=True)
    assert beta[0] == 1.0 and float(beta[-2]) == pytest.approx(lo, abs=1e-9)
    # ppf(0.5) = 0.5 for the symmetric Beta(0.6, 0.6): the middle step is halfway
    assert float(beta[4]) == pytest.approx(lo + 0.5 * (1 - lo), abs=1e-7)


def test_linear_time_shift() -> None:
    # mu = 1: mu / (mu + 1/t − 1) is the identity, exactly as exponential with mu = 0
    linear = sigmas_flow_match_euler(9, use_dynamic_shifting=True, time_shift_type="linear", mu=1.0)
    assert torch.equal(linear, f32(STAGE1_SIGMAS_DYNAMIC))
    # mu = 0 makes diffusers divide 0 by 0 at t = 1; refuse rather than return NaN
    with pytest.raises(ValueError, match=r"non-finite sigmas .*'linear' time shift needs mu > 0"):
        sigmas_flow_match_euler(9, use_dynamic_shifting=True, time_shift_type="linear")
    # without dynamic shifting the type is unused
    assert torch.equal(sigmas_flow_match_euler(9, time_shift_type="linear"), f32(STAGE1_SIGMAS))


# --- stage 2: the KSampler-registered FlowMatchEuler scheduler -------------------------------


def test_stage2_flow_match_linear_denoise_07() -> None:
    for shift in (3.0, 7.0):  # the handler ignores the model's sampling object
        assert_bitwise(
            calculate_sigmas("flow_match_linear", FlowSampling(shift), 16, 0.7), STAGE2_SIGMAS
        )
    full = sigmas_flow_match_linear(22)
    assert full.shape == (23,)
    assert full[0] == 1.0
    assert torch.equal(full[-17:], f32(STAGE2_SIGMAS))
    assert float(full[6]) == pytest.approx(1 - 6 * 0.999 / 21, abs=1e-7)


def test_flow_match_linear_is_the_custom_node_with_shift_1_dynamic_mu_0() -> None:
    expected = np.linspace(1.0, 0.001, 16).astype(np.float32)
    torch.testing.assert_close(
        sigmas_flow_match_linear(16)[:-1], torch.from_numpy(expected), atol=1e-7, rtol=0
    )
    assert torch.equal(
        sigmas_flow_match_linear(16),
        sigmas_flow_match_euler(16, shift=1.0, use_dynamic_shifting=True),
    )


# --- stage 3: beta ---------------------------------------------------------------------------


def test_stage3_beta_shift7_denoise_06() -> None:
    assert_bitwise(calculate_sigmas("beta", FlowSampling(7.0), 16, 0.6), STAGE3_SIGMAS)


def test_beta_ppf_indices_for_26_steps() -> None:
    ms = FlowSampling(7.0)
    full = sigmas_beta(ms, 26)
    assert full.shape == (27,)
    assert torch.equal(full[:-1], ms.sigmas[BETA_INDICES_26])
    assert full[-1] == 0
    assert torch.equal(full[-17:], f32(STAGE3_SIGMAS))


def test_beta_drops_repeated_indices_and_takes_alpha_beta() -> None:
    ms = FlowSampling(3.0)
    # 600 quantiles of a 1000-entry table: the flat middle of Beta(0.6, 0.6) repeats indices
    dense = sigmas_beta(ms, 600)
    assert len(dense) < 601
    assert bool((dense[:-1] > dense[1:]).all())  # strictly decreasing: no repeats kept
    uniform = calculate_sigmas("beta", ms, 4, alpha=1.0, beta=1.0)  # ppf(u) = u
    assert torch.equal(uniform, torch.cat([ms.sigmas[[999, 749, 500, 250]], f32([0.0])]))


# --- model σ range and the other ComfyUI schedulers ------------------------------------------


@pytest.mark.parametrize(("shift", "sigma_min"), [(3.0, 0.002994012), (7.0, 0.006958250)])
def test_karras_and_exponential_use_the_model_sigma_range(shift: float, sigma_min: float) -> None:
    ms = FlowSampling(shift)
    assert float(ms.sigma_min) == pytest.approx(sigma_min, abs=5e-10)
    for name in ("karras", "exponential"):
        sigmas = calculate_sigmas(name, ms, 9)
        assert sigmas.shape == (10,) and sigmas[-1] == 0
        assert float(sigmas[0]) == pytest.approx(1.0, abs=1e-6)
        assert float(sigmas[-2]) == pytest.approx(sigma_min, rel=1e-6)


def test_karras_formula_and_options() -> None:
    sigmas = sigmas_karras(5, 0.1, 10.0, rho=3.0)
    ramp = np.linspace(0, 1, 5)
    expected = (10.0 ** (1 / 3) + ramp * (0.1 ** (1 / 3) - 10.0 ** (1 / 3))) ** 3
    torch.testing.assert_close(sigmas[:-1], torch.from_numpy(expected).float(), rtol=1e-6, atol=0)
    via_options = calculate_sigmas(
        "karras", FlowSampling(), 5, sigma_min=0.1, sigma_max=10.0, rho=3.0
    )
    assert torch.equal(via_options, sigmas)
    exponential = calculate_sigmas("exponential", FlowSampling(), 3, sigma_min=0.01, sigma_max=1.0)
    torch.testing.assert_close(exponential, f32([1.0, 0.1, 0.01, 0.0]), rtol=1e-6, atol=0)


def test_simple_and_sgm_uniform() -> None:
    ms = FlowSampling(3.0)
    simple = sigmas_simple(ms, 9)
    # stride 1000/9: table indices 999, 888, 777, ... counted from the end
    picks = [999 - int(x * 1000 / 9) for x in range(9)]
    assert torch.equal(simple, torch.cat([ms.sigmas[picks], f32([0.0])]))
    assert picks[:3] == [999, 888, 777]
    sgm = calculate_sigmas("sgm_uniform", ms, 9)
    t = torch.linspace(1.0, float(ms.sigma_min), 10, dtype=torch.float32)[:-1]
    assert torch.equal(sgm, torch.cat([ms.sigma(t), f32([0.0])]))
    assert float(sgm[1]) == pytest.approx(0.960129261, abs=1e-7)


def test_every_scheduler_ends_in_zero_and_decreases() -> None:
    for name in SCHEDULERS:
        sigmas = calculate_sigmas(name, FlowSampling(3.0), 8)
        assert sigmas.dtype == torch.float32 and sigmas.ndim == 1, name
        assert sigmas[-1] == 0, name
        assert bool((sigmas[:-1] > sigmas[1:]).all()), name
        assert len(sigmas) == 9, name


# --- denoise ---------------------------------------------------------------------------------


def test_truncate_for_denoise() -> None:
    def schedule(n: int) -> torch.Tensor:
        return torch.arange(n, -1, -1, dtype=torch.float32)

    assert torch.equal(truncate_for_denoise(schedule, 16, 1.0), schedule(16))
    assert torch.equal(truncate_for_denoise(schedule, 16, 0.99995), schedule(16))
    assert torch.equal(truncate_for_denoise(schedule, 16, 0.7), schedule(22)[-17:])
    assert torch.equal(truncate_for_denoise(schedule, 16, 0.6), schedule(26)[-17:])

    def total(n: int) -> torch.Tensor:  # records which total step count was built
        return torch.full((n + 1,), float(n))

    assert truncate_for_denoise(total, 16, 0.99995).tolist() == [16.0] * 17
    assert truncate_for_denoise(total, 16, 0.9999).tolist() == [16.0] * 17  # int(16.0016)
    assert truncate_for_denoise(total, 30000, 0.99995).tolist() == [30000.0] * 30001
    assert truncate_for_denoise(total, 30000, 0.9999).tolist() == [30003.0] * 30001
    empty = truncate_for_denoise(schedule, 16, 0.0)
    assert empty.shape == (0,) and empty.dtype == torch.float32
    assert truncate_for_denoise(schedule, 16, 0.7)[0] == 16  # int(16/0.7) = 22 → keeps 16..0


def test_denoise_applies_to_the_custom_node_too() -> None:
    truncated = calculate_sigmas("flow_match_euler", FlowSampling(), 4, denoise=0.5, shift=3.0)
    assert torch.equal(truncated, sigmas_flow_match_euler(8, shift=3.0)[-5:])
    assert calculate_sigmas("flow_match_euler", FlowSampling(), 4, denoise=0.0).numel() == 0


# --- errors ----------------------------------------------------------------------------------


def test_unknown_scheduler_is_an_error_not_a_fallback() -> None:
    expected = (
        "unknown scheduler 'ddim_uniform'; choose one of: simple, normal, sgm_uniform, beta, "
        "karras, exponential, flow_match_linear, flow_match_euler, diffusers_zimage"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        calculate_sigmas("ddim_uniform", FlowSampling(), 9)


def test_unknown_option_names_the_accepted_ones() -> None:
    with pytest.raises(
        ValueError,
        match=r"^unknown option 'rho' for scheduler 'beta'; accepted options: alpha, beta$",
    ):
        calculate_sigmas("beta", FlowSampling(), 9, rho=7.0)
    with pytest.raises(ValueError, match=r"unknown option 'shift' for scheduler 'normal'; .*none$"):
        calculate_sigmas("normal", FlowSampling(), 9, shift=3.0)
    with pytest.raises(
        ValueError, match=r"'alpha' for scheduler 'flow_match_euler'.*start_at_step"
    ):
        calculate_sigmas("flow_match_euler", FlowSampling(), 9, alpha=0.6)


@pytest.mark.parametrize("steps", [0, -3])
def test_bad_steps(steps: int) -> None:
    with pytest.raises(ValueError, match=rf"^steps must be an integer >= 1, got {steps}$"):
        calculate_sigmas("simple", FlowSampling(), steps)


@pytest.mark.parametrize("denoise", [-0.1, 1.5, float("nan")])
def test_bad_denoise(denoise: float) -> None:
    with pytest.raises(ValueError, match=r"^denoise must be in \[0, 1\], got "):
        calculate_sigmas("beta", FlowSampling(), 16, denoise)


def test_bad_custom_node_settings() -> None:
    with pytest.raises(
        ValueError,
        match=r"unknown time_shift_type 'cubic'; choose one of: "
        r"exponential, linear",
    ):
        sigmas_flow_match_euler(9, time_shift_type="cubic")
    with pytest.raises(ValueError, match="only one of use_karras_sigmas"):
        sigmas_flow_match_euler(9, use_karras_sigmas=True, use_beta_sigmas=True)
    with pytest.raises(ValueError, match=r"^need 0 < sigma_min <= sigma_max, got sigma_min=0.0, "):
        calculate_sigmas("exponential", FlowSampling(), 9, sigma_min=0.0)
    with pytest.raises(ValueError, match=r"^need 0 <= sigma_min <= sigma_max, got sigma_min=2.0, "):
        calculate_sigmas("karras", FlowSampling(), 9, sigma_min=2.0)
    assert calculate_sigmas("karras", FlowSampling(), 3, sigma_min=0.0)[-2] == 0.0
    with pytest.raises(ValueError, match=r"beta scheduler needs alpha > 0 and beta > 0, got 0.0"):
        calculate_sigmas("beta", FlowSampling(), 9, alpha=0.0)
