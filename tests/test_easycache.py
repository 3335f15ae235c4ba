"""EasyCache: §16 windows, ComfyUI's skip rule on hand-computed and sampled sequences, logging."""

from __future__ import annotations

import logging

import pytest
import torch
from comfy_reference import (
    STAGE2_EASYCACHE_WINDOW,
    STAGE2_EASYCACHE_WINDOW_SHIFT7,
    STAGE2_SIGMAS,
    STAGE3_EASYCACHE_WINDOW,
    STAGE3_MIDPOINTS,
    STAGE3_SIGMAS,
)
from torch import Tensor

from zimage_trt.sampling.easycache import EasyCache, easycache_window
from zimage_trt.sampling.guider import CFGGuider, Cond
from zimage_trt.sampling.model_sampling import FlowSampling

BF16 = torch.bfloat16


# ---- windows (§9.4, §16) -------------------------------------------------------------------


def test_stage2_window_stock_shift3() -> None:
    ec = EasyCache.from_percents(0.37, 0.45, 0.95, FlowSampling(3.0))
    assert ec.start_sigma == pytest.approx(STAGE2_EASYCACHE_WINDOW[0], abs=1e-6)
    assert ec.end_sigma == pytest.approx(STAGE2_EASYCACHE_WINDOW[1], abs=1e-6)
    w = easycache_window(STAGE2_SIGMAS[:-1], ec.start_sigma, ec.end_sigma)
    assert w == ["window"] * 13 + ["after"] * 3


def test_stage2_window_if_auraflow7_were_honoured() -> None:
    ms = FlowSampling(7.0)
    start, end = ms.percent_to_sigma(0.45), ms.percent_to_sigma(0.95)
    assert (start, end) == (
        pytest.approx(STAGE2_EASYCACHE_WINDOW_SHIFT7[0], abs=1e-6),
        pytest.approx(STAGE2_EASYCACHE_WINDOW_SHIFT7[1], abs=1e-6),
    )
    assert (
        easycache_window(torch.tensor(STAGE2_SIGMAS[:-1]), start, end)
        == ["window"] * 10 + ["after"] * 6
    )


def test_stage3_window_31_evaluations() -> None:
    ec = EasyCache.from_percents(0.12, 0.7, 0.95, FlowSampling(7.0))
    assert ec.start_sigma == pytest.approx(STAGE3_EASYCACHE_WINDOW[0], abs=1e-6)
    assert ec.end_sigma == pytest.approx(STAGE3_EASYCACHE_WINDOW[1], abs=1e-6)
    evaluated = [s for pair in zip(STAGE3_SIGMAS[:15], STAGE3_MIDPOINTS, strict=True) for s in pair]
    evaluated.append(STAGE3_SIGMAS[15])
    assert len(evaluated) == 31
    w = easycache_window(evaluated, ec.start_sigma, ec.end_sigma)
    assert w == ["before"] * 14 + ["window"] * 13 + ["after"] * 4
    assert evaluated[14] == STAGE3_SIGMAS[7] and evaluated[26] == STAGE3_SIGMAS[13]


def test_window_bounds_compare_in_float32() -> None:
    # float32(0.2) = 0.2000000030 > 0.2 as doubles, but ComfyUI compares in float32: not > end.
    assert easycache_window([0.2, 0.5, 0.6], 0.5, 0.2) == ["after", "window", "before"]


# ---- a scripted sequence, computed by hand --------------------------------------------------


class FillModel:
    """Returns a constant bf16 field whose value is looked up by σ; counts its calls."""

    def __init__(self, outputs: dict[float, float]) -> None:
        self.outputs = outputs
        self.calls = 0

    def __call__(self, x: Tensor, sigma: Tensor, context: Tensor, names: tuple[str, ...]) -> Tensor:
        self.calls += 1
        return torch.full_like(x, self.outputs[round(float(sigma[0]), 4)])


SHAPE = (1, 16, 16, 16)
CTX = torch.zeros(1, 4, 8, dtype=BF16)


def call(
    model: object, x: float | Tensor, sigma: float, names: tuple[str, ...] = ("cond",)
) -> Tensor:
    """One guided evaluation with a single model call, as the guider makes it at cfg 1."""
    model.begin_guided_call()  # type: ignore[attr-defined]
    xt = x if isinstance(x, Tensor) else torch.full(SHAPE, x, dtype=BF16)
    return model(xt, torch.tensor([sigma] * xt.shape[0]), CTX, names)  # type: ignore[operator]


# σ → (x, model output); all values and every metric below are exact in bf16.
SCRIPT = [
    (0.90, 1.25, 6.0),  # before start: diff stored only
    (0.80, 1.0, 4.5),  # first in window: reference
    (0.70, 0.875, 4.0),  # ic .125, oc .5 → k = 4, ‖out‖ = 4
    (0.60, 0.75, 3.0),  # ic .125 → cum .125 < .3 → skip (returns .75 + (4 − .875))
    (0.50, 0.625, 3.0),  # ic |.625 − .875| = .25 → cum .375 ≥ .3 → compute; oc 1 → k = 4, ‖out‖ 3
    (0.45, 0.5625, 2.0),  # ic .0625 → 4·.0625/3 = .0833 → skip
    (0.40, 0.5, 2.0),  # ic .125 → cum .0833 + .1667 = .25 < .3 → skip
    (0.35, 0.4375, 2.0),  # ic .1875 → + .25 → .5 → compute; oc 1, k = 1/.1875, ‖out‖ 2
    (0.20, 0.25, 1.0),  # past end (end .25): computed, nothing updated
    (0.10, 0.125, 0.5),  # past end
]


def test_scripted_sequence_hand_computed() -> None:
    model = FillModel({s: o for s, _, o in SCRIPT})
    ec = EasyCache(0.3, start_sigma=0.8, end_sigma=0.25, log=lambda s: None)
    wrapped = ec.wrap(model)
    ec.start_run(len(SCRIPT))
    outs = [call(wrapped, x, s) for s, x, _ in SCRIPT]
    assert ec.actions == ["before", "compute", "compute", "skip", "compute", "skip", "skip",
                          "compute", "after", "after"]  # fmt: skip
    assert model.calls == 7 and ec.calls_computed == 7 and ec.calls_skipped == 3
    assert ec.steps_skipped == 3
    # a skipped call returns x + the diff of the last computed call, in bf16
    assert outs[3].dtype == BF16 and torch.equal(
        outs[3], torch.full(SHAPE, 0.75 + 3.125, dtype=BF16)
    )
    assert torch.equal(outs[5], torch.full(SHAPE, 0.5625 + 2.375, dtype=BF16))
    assert torch.equal(outs[6], torch.full(SHAPE, 0.5 + 2.375, dtype=BF16))
    # past-end calls updated nothing: the state is the one of the call at σ 0.35
    assert ec.first_cond == "cond"
    assert torch.equal(ec.diffs["cond"], torch.full(SHAPE, 2.0 - 0.4375, dtype=BF16))
    assert ec.x_prev_sub is not None and ec.x_prev_sub.shape == (1, 16, 2, 2)
    assert torch.equal(ec.x_prev_sub, torch.full((1, 16, 2, 2), 0.4375, dtype=BF16))
    assert ec.output_prev_norm is not None and ec.output_prev_norm.item() == 2.0
    k = ec.relative_transformation_rate
    assert isinstance(k, Tensor) and k.dtype == BF16
    assert k.item() == (torch.tensor(1.0, dtype=BF16) / torch.tensor(0.1875, dtype=BF16)).item()
    assert ec.cumulative_change_rate == 0.0


def test_before_start_stores_diffs_only() -> None:
    model = FillModel({0.9: 3.0, 0.85: 2.5})
    ec = EasyCache(0.3, start_sigma=0.8, end_sigma=0.25)
    wrapped = ec.wrap(model)
    call(wrapped, 1.0, 0.9, ("cond",))
    call(wrapped, 0.5, 0.85, ("uncond",))
    assert ec.actions == ["before", "before"]
    assert sorted(ec.diffs) == ["cond", "uncond"]
    assert torch.equal(ec.diffs["uncond"], torch.full(SHAPE, 2.0, dtype=BF16))
    assert ec.first_cond is None and ec.x_prev_sub is None and ec.output_prev_norm is None
    assert ec.relative_transformation_rate is None


def test_past_end_never_skips_or_updates() -> None:
    # k = 0 would make every in-window call a skip; past the end the model still runs.
    model = FillModel({0.7: 2.0, 0.6: 2.0, 0.3: 7.0, 0.2: 7.0, 0.1: 7.0})
    ec = EasyCache(3.0, start_sigma=0.8, end_sigma=0.3)
    wrapped = ec.wrap(model)
    call(wrapped, 1.0, 0.7)
    call(wrapped, 0.5, 0.6)
    diffs, xs = dict(ec.diffs), ec.x_prev_sub
    outs = [call(wrapped, 0.25, s) for s in (0.3, 0.2, 0.1)]
    assert ec.actions == ["compute", "compute", "after", "after", "after"]
    assert model.calls == 5
    assert all(torch.equal(o, torch.full(SHAPE, 7.0, dtype=BF16)) for o in outs)
    assert ec.diffs["cond"] is diffs["cond"] and ec.x_prev_sub is xs


def test_threshold_comparison_is_bf16() -> None:
    """cum = 0.369140625 = bf16(0.37): skipped in float64 arithmetic, not in ComfyUI's bf16."""
    # k = .5/.125 = 4, ‖out‖ = 4 → cum = ic = 0.369140625; every value is exact in bf16
    model = FillModel({0.7: 4.5, 0.6: 4.0, 0.5: 3.0})
    assert 0.369140625 < 0.37  # in float64 this would skip
    for threshold, expected in ((0.37, "compute"), (0.3711, "skip")):
        ec = EasyCache(threshold, start_sigma=0.8, end_sigma=0.1)
        wrapped = ec.wrap(model)
        call(wrapped, 0.369140625 + 0.125, 0.7)
        call(wrapped, 0.369140625, 0.6)
        call(wrapped, 0.0, 0.5)
        assert ec.cumulative_change_rate == 0.0 if expected == "compute" else 0.369140625
        assert ec.actions[-1] == expected, threshold


def test_subsample_uses_every_eighth_pixel_of_the_first_cond() -> None:
    model = FillModel({0.7: 4.5, 0.6: 4.0, 0.5: 3.0})
    ec = EasyCache(0.05, start_sigma=0.8, end_sigma=0.1)
    wrapped = ec.wrap(model)
    call(wrapped, 1.0, 0.7)
    call(wrapped, 0.875, 0.6)
    # change every pixel off the ::8 grid by a lot: input_change stays 0 → cum 0 → skip
    x = torch.full(SHAPE, 0.875, dtype=BF16) + 5
    x[..., ::8, ::8] = 0.875
    out = call(wrapped, x, 0.5)
    assert ec.actions[-1] == "skip"
    assert torch.equal(out, x + 3.125)


def test_output_norm_is_over_the_full_tensor() -> None:
    def model(x: Tensor, sigma: Tensor, context: Tensor, names: tuple[str, ...]) -> Tensor:
        out = torch.full_like(x, 2.0)
        out[..., 1::2, :] = -6.0  # off the ::8 grid: full mean |out| 4, subsampled mean 2
        return out

    ec = EasyCache(0.1, start_sigma=0.8, end_sigma=0.1)
    call(ec.wrap(model), 1.0, 0.7)
    assert ec.output_prev_norm is not None and ec.output_prev_norm.dtype == BF16
    assert ec.output_prev_norm.item() == 4.0
    assert ec.out_prev_sub is not None and torch.equal(
        ec.out_prev_sub, torch.full((1, 16, 2, 2), 2.0, dtype=BF16)
    )


# ---- guided sampling: cond/uncond following, batching --------------------------------------


class VelocityModel:
    """v = a(σ, name)·x + b(σ): a bf16 model whose output drifts with σ at a known rate."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.target = torch.randn(1, 16, 32, 32, generator=g)
        self.wiggle = torch.randn(1, 16, 32, 32, generator=g)
        self.calls: list[tuple[float, tuple[str, ...]]] = []

    def __call__(self, x: Tensor, sigma: Tensor, context: Tensor, names: tuple[str, ...]) -> Tensor:
        self.calls.append((round(float(sigma[0]), 6), names))
        s = sigma.reshape(-1, 1, 1, 1)
        scale = 1 + 0.1 * context.float().mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        v = (x.float() * scale - self.target) / s + 0.3 * torch.sin(12 * s) * self.wiggle
        return v.to(x.dtype)


def euler(guider: CFGGuider, sigmas: list[float], noise_seed: int = 1) -> Tensor:
    sig = torch.tensor(sigmas)
    noise = torch.randn(1, 16, 32, 32, generator=torch.Generator().manual_seed(noise_seed))
    x = sig[0] * noise
    for i in range(len(sigmas) - 1):
        x0 = guider(x, sig[i : i + 1])
        x = x + (x - x0) / sig[i] * (sig[i + 1] - sig[i])
    return x


def reference_actions(threshold: float, start: float, end: float) -> tuple[list[str], float]:
    """Independent, straightforward re-statement of §9.3 for one conditioning, float64 metrics.

    Returns the actions and the smallest relative distance of the accumulated rate from the
    threshold (so the test can tell that bf16 vs float64 rounding cannot flip a decision).
    """
    model = VelocityModel()
    sig = torch.tensor(STAGE2_SIGMAS)
    x = sig[0] * torch.randn(1, 16, 32, 32, generator=torch.Generator().manual_seed(1))
    ctx = torch.zeros(1, 4, 8, dtype=BF16)
    actions: list[str] = []
    ref = None  # (x_sub, out_sub, mean|out|) of the last computed in-window call
    k = None
    cum = 0.0
    diff = None
    margin = float("inf")
    for i in range(len(STAGE2_SIGMAS) - 1):
        s = sig[i : i + 1]
        xb = x.to(BF16)
        v = None
        if float(s) <= end:
            actions.append("after")
        elif float(s) > start:
            actions.append("before")
        else:
            xs = xb[..., ::8, ::8].double()
            ic = None if ref is None else (xs - ref[0]).abs().mean().item()
            if ref is not None and k is not None:
                assert ic is not None
                cum += k * ic / ref[2]
                margin = min(margin, abs(cum - threshold) / threshold)
                if cum < threshold:
                    assert diff is not None
                    v = xb + diff
                    actions.append("skip")
                else:
                    cum = 0.0
            if v is None:
                actions.append("compute")
                v = model(xb, s, ctx, ("cond",))
                vs = v[..., ::8, ::8].double()
                if ref is not None and ic is not None:
                    k = (vs - ref[1]).abs().mean().item() / ic
                ref = (xs, vs, v.double().abs().mean().item())
        if v is None:
            v = model(xb, s, ctx, ("cond",))
        if actions[-1] != "after":
            diff = v - xb
        x0 = x - s * v.float()
        x = x + (x - x0) / sig[i] * (sig[i + 1] - sig[i])
    return actions, margin


C, K, A = "compute", "skip", "after"


@pytest.mark.parametrize(
    ("threshold", "expected"),
    [
        (0.08, [C, C, K, C, K, C, C, K, C, K, C, C, K, A, A, A]),
        (0.15, [C, C, K, K, C, K, C, K, C, K, K, C, K, A, A, A]),
        (0.3, [C, C, K, K, K, C, K, K, C, K, K, K, K, A, A, A]),
        (0.6, [C, C, K, K, K, K, K, C, K, K, K, C, K, A, A, A]),
    ],
)
def test_stage2_sampling_matches_reference(threshold: float, expected: list[str]) -> None:
    ec = EasyCache.from_percents(threshold, 0.45, 0.95, FlowSampling(3.0), log=lambda s: None)
    model = VelocityModel()
    guider = CFGGuider(ec.wrap(model), Cond("cond", torch.zeros(1, 4, 8)), None, 1.0)
    with ec.run(len(STAGE2_SIGMAS) - 1):
        euler(guider, STAGE2_SIGMAS)
    ref, margin = reference_actions(threshold, ec.start_sigma, ec.end_sigma)
    assert margin > 0.03  # far enough from the threshold for bf16 and float64 to agree
    assert ec.actions == ref == expected
    assert ec.steps_skipped == expected.count(K) == ec.calls_skipped
    assert guider.model_calls == 16 and len(model.calls) == 16 - expected.count(K)


def test_uncond_follows_cond_when_called_separately() -> None:
    ec = EasyCache.from_percents(0.37, 0.45, 0.95, FlowSampling(3.0), log=lambda s: None)
    model = VelocityModel()
    cond = Cond("cond", torch.full((1, 5, 8), 0.5))
    uncond = Cond("uncond", torch.zeros(1, 8, 8))
    guider = CFGGuider(ec.wrap(model), cond, uncond, 2.0)
    with ec.run(len(STAGE2_SIGMAS) - 1):
        euler(guider, STAGE2_SIGMAS)
    pairs = list(zip(ec.actions[::2], ec.actions[1::2], strict=True))
    assert [c for c, _ in pairs] == [a for _, a in pairs]  # uncond does what cond did
    assert pairs[:2] == [(C, C)] * 2 and pairs[13:] == [(A, A)] * 3
    assert ec.actions.count(K) > 0
    assert ec.first_cond == "cond"
    # both names computed in every non-skipped step, cond first
    computed = [n for _, n in model.calls]
    assert computed == [("cond",), ("uncond",)] * (16 - ec.steps_skipped)
    assert ec.calls_skipped == 2 * ec.steps_skipped
    assert guider.model_calls == 32


def test_batched_call_makes_uncond_the_first_cond() -> None:
    ec = EasyCache.from_percents(0.37, 0.45, 0.95, FlowSampling(3.0), log=lambda s: None)
    model = VelocityModel()
    cond = Cond("cond", torch.full((1, 8, 8), 0.5))
    uncond = Cond("uncond", torch.zeros(1, 8, 8))
    guider = CFGGuider(ec.wrap(model), cond, uncond, 2.0)
    with ec.run(len(STAGE2_SIGMAS) - 1):
        euler(guider, STAGE2_SIGMAS)
    assert ec.first_cond == "uncond"
    assert len(ec.actions) == 16 and ec.actions[:2] == [C, C] and ec.actions[13:] == [A] * 3
    assert ec.steps_skipped == ec.actions.count(K) > 0
    assert {n for _, n in model.calls} == {("uncond", "cond")}


def test_skipped_batch_returns_x_plus_each_conds_diff() -> None:
    model = FillModel({0.7: 4.5, 0.6: 4.0, 0.5: 3.0})
    ec = EasyCache(3.0, start_sigma=0.8, end_sigma=0.1)
    wrapped = ec.wrap(model)
    x = torch.full((2, *SHAPE[1:]), 1.0, dtype=BF16)
    x[1] = 2.0
    call(wrapped, x, 0.7, ("uncond", "cond"))
    call(wrapped, x - 0.125, 0.6, ("uncond", "cond"))
    out = call(wrapped, x - 0.25, 0.5, ("uncond", "cond"))
    assert ec.actions == [C, C, K]
    assert torch.equal(out[0], torch.full(SHAPE[1:], 0.75 + (4.0 - 0.875), dtype=BF16))
    assert torch.equal(out[1], torch.full(SHAPE[1:], 1.75 + (4.0 - 1.875), dtype=BF16))


def test_metadata_change_resets_with_k_zero(caplog: pytest.LogCaptureFixture) -> None:
    model = FillModel({0.7: 4.5, 0.6: 4.0, 0.5: 3.0, 0.45: 2.0, 0.4: 1.0})
    ec = EasyCache(0.01, start_sigma=0.8, end_sigma=0.1)
    wrapped = ec.wrap(model)
    call(wrapped, 1.0, 0.7)
    call(wrapped, 0.5, 0.6)
    small = torch.full((1, 16, 8, 8), 0.25, dtype=BF16)
    with caplog.at_level(logging.WARNING, logger="zimage_trt.sampling.easycache"):
        call(wrapped, small, 0.5)  # new shape: reset, then this call becomes the reference
    assert caplog.messages == ["EasyCache - Tensor shape, dtype or device changed, resetting state"]
    assert ec.relative_transformation_rate == 0.0 and ec.actions[-1] == C
    # k = 0.0 (not None): the very next call accumulates 0 and skips although the input moved
    out = call(wrapped, small - 0.25, 0.45)
    assert ec.actions == [C, C, C, K] and ec.steps_skipped == 1
    assert torch.equal(out, torch.full((1, 16, 8, 8), 3.0 - 0.25, dtype=BF16))


# ---- logging and validation ----------------------------------------------------------------


def test_log_lines() -> None:
    lines: list[str] = []
    ec = EasyCache.from_percents(0.37, 0.45, 0.95, FlowSampling(3.0), log=lines.append)
    guider = CFGGuider(ec.wrap(VelocityModel()), Cond("cond", torch.zeros(1, 4, 8)), None, 1.0)
    with ec.run(len(STAGE2_SIGMAS) - 1):
        euler(guider, STAGE2_SIGMAS)
    assert ec.steps_skipped == 9
    assert lines == [
        "EasyCache enabled - threshold: 0.37, start_percent: 0.45, end_percent: 0.95",
        "EasyCache - skipped 9/16 steps (2.29x speedup).",
    ]
    # a second run starts fresh
    with ec.run(len(STAGE2_SIGMAS) - 1):
        euler(guider, STAGE2_SIGMAS)
    assert lines[-1] == lines[1] and len(ec.actions) == 16
    assert ec.diffs == {} and ec.x_prev_sub is None  # tensors freed after the run

    lines.clear()
    raw = EasyCache(0.2, 0.5, 0.25, log=lines.append)
    raw.start_run(3)
    raw.steps_skipped = 1
    raw.end_run()
    assert lines == [
        "EasyCache enabled - threshold: 0.2, start_sigma: 0.5, end_sigma: 0.25",
        "EasyCache - skipped 1/3 steps (1.50x speedup).",
    ]


def test_logger_receives_info(caplog: pytest.LogCaptureFixture) -> None:
    ec = EasyCache.from_percents(0.12, 0.7, 0.95, FlowSampling(7.0))
    with caplog.at_level(logging.INFO, logger="zimage_trt.sampling.easycache"), ec.run(16):
        pass
    assert caplog.messages == [
        "EasyCache enabled - threshold: 0.12, start_percent: 0.7, end_percent: 0.95",
        "EasyCache - skipped 0/16 steps (1.00x speedup).",
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"reuse_threshold": -0.1}, "reuse_threshold must be a finite number >= 0, got -0.1"),
        (
            {"reuse_threshold": float("nan")},
            "reuse_threshold must be a finite number >= 0, got nan",
        ),
        ({"start_sigma": 1.5}, r"start_sigma must be in \[0, 1\], got 1.5"),
        ({"end_sigma": -1.0}, r"end_sigma must be in \[0, 1\], got -1.0"),
        ({"subsample_factor": 0}, "subsample_factor must be an int >= 1, got 0"),
        ({"subsample_factor": 2.0}, "subsample_factor must be an int >= 1, got 2.0"),
    ],
)
def test_bad_parameters(kwargs: dict[str, float], message: str) -> None:
    args: dict[str, float] = {"reuse_threshold": 0.2, "start_sigma": 0.8, "end_sigma": 0.2}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        EasyCache(**args)  # type: ignore[arg-type]


def test_bad_percents() -> None:
    with pytest.raises(ValueError, match=r"end_percent must be in \[0, 1\], got 1.2"):
        EasyCache.from_percents(0.2, 0.4, 1.2, FlowSampling(3.0))
