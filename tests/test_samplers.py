"""Sampler loops against ComfyUI's numbers (comfyui-semantics.md §6, §16) and exact oracles."""

from __future__ import annotations

import math
from collections.abc import Callable

import comfy_reference as ref
import pytest
import torch
from torch import Tensor

from zimage_trt.sampling.model_sampling import FlowSampling
from zimage_trt.sampling.noise import ancestral_noise_sampler, brownian_tree_noise_sampler
from zimage_trt.sampling.samplers import (
    SAMPLERS,
    euler_ancestral_rf_step_coefficients,
    midpoint_sigmas_dpmpp_sde,
    sample,
    sample_dpmpp_sde,
    sample_euler,
    sample_euler_ancestral,
)

Callback = Callable[[int, Tensor, Tensor, Tensor, Tensor], None]

STAGE1_SIGMAS = torch.tensor(ref.STAGE1_SIGMAS)
STAGE2_SIGMAS = torch.tensor(ref.STAGE2_SIGMAS)
STAGE3_SIGMAS = torch.tensor(ref.STAGE3_SIGMAS)
STAGE3_MIDPOINTS = torch.tensor(ref.STAGE3_MIDPOINTS)
SHAPE = (1, 2, 3, 4)


def _randn(seed: int, shape: tuple[int, ...] = SHAPE) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


class ConstantDenoiser:
    """Returns the same x0 whatever the input; records the sigmas it was called with."""

    def __init__(self, x0: Tensor) -> None:
        self.x0 = x0
        self.sigmas: list[Tensor] = []

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        assert sigma.shape == (x.shape[0],)
        self.sigmas.append(sigma)
        return self.x0


class FakeNoise:
    """A deterministic noise sampler: one fixed tensor per call, calls recorded."""

    def __init__(self, noise: Tensor) -> None:
        self.noise = noise
        self.calls: list[tuple[float, float]] = []

    def __call__(self, sigma: Tensor | float, sigma_next: Tensor | float) -> Tensor:
        self.calls.append((float(sigma), float(sigma_next)))
        return self.noise


class PathDenoiser(ConstantDenoiser):
    """A constant-x0 denoiser that asserts every input lies on σ·ε + (1−σ)·x0."""

    def __init__(self, x0: Tensor, eps: Tensor, atol: float) -> None:
        super().__init__(x0)
        self.eps, self.atol = eps, atol

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        s = sigma[0]
        torch.testing.assert_close(x, s * self.eps + (1 - s) * self.x0, atol=self.atol, rtol=0)
        return super().__call__(x, sigma)


def _on_path_checker(eps: Tensor, x0: Tensor, atol: float) -> tuple[list[int], Callback]:
    """A callback asserting x at step i is σ_i·ε + (1−σ_i)·x0 (the straight flow path)."""
    seen: list[int] = []

    def callback(i: int, x: Tensor, denoised: Tensor, sigma: Tensor, sigma_next: Tensor) -> None:
        torch.testing.assert_close(x, sigma * eps + (1 - sigma) * x0, atol=atol, rtol=0)
        assert denoised is x0
        seen.append(i)

    return seen, callback


# ---- Euler-ancestral coefficients ----------------------------------------------------------


@pytest.mark.parametrize("row", range(8))
def test_euler_ancestral_coefficients_stage1_table(row: int) -> None:
    got = euler_ancestral_rf_step_coefficients(STAGE1_SIGMAS[row], STAGE1_SIGMAS[row + 1], 1.0)
    torch.testing.assert_close(
        torch.stack(got), torch.tensor(ref.STAGE1_EA_COEFFICIENTS[row]), atol=1e-6, rtol=0
    )


def test_euler_ancestral_coefficients_stage2_first_row() -> None:
    got = euler_ancestral_rf_step_coefficients(STAGE2_SIGMAS[0], STAGE2_SIGMAS[1], 1.0)
    torch.testing.assert_close(
        torch.stack(got), torch.tensor(ref.STAGE2_FIRST_EA_COEFFICIENTS), atol=1e-6, rtol=0
    )


def test_euler_ancestral_coefficients_eta0_and_floats() -> None:
    down, ratio, renoise = euler_ancestral_rf_step_coefficients(0.8, 0.6, 0.0)
    assert down.dtype == torch.float32
    assert (down.item(), ratio.item(), renoise.item()) == (pytest.approx(0.6), 1.0, 0.0)


# ---- exact-x0 oracles --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "eta"),
    [("euler", 1.0), ("euler_ancestral", 0.0), ("euler_ancestral", 1.0), ("dpmpp_sde", 0.0),
     ("dpmpp_sde", 1.0)],
)  # fmt: skip
def test_every_sampler_lands_on_a_constant_x0(name: str, eta: float) -> None:
    x0 = _randn(1)
    sigmas = STAGE3_SIGMAS if name == "dpmpp_sde" else STAGE1_SIGMAS
    out = sample(name, ConstantDenoiser(x0), _randn(2), sigmas, seed=3, eta=eta)
    if name == "euler":  # x + (x − x0)/σ·(0 − σ): x0 up to rounding
        torch.testing.assert_close(out, x0, atol=1e-6, rtol=0)
    else:  # the last step to σ = 0 returns x0 itself
        assert torch.equal(out, x0)


def test_euler_stays_on_the_linear_flow_path() -> None:
    x0, eps = _randn(1), _randn(2)
    seen, callback = _on_path_checker(eps, x0, atol=1e-6)
    x = STAGE1_SIGMAS[0] * eps + (1 - STAGE1_SIGMAS[0]) * x0
    out = sample_euler(ConstantDenoiser(x0), x, STAGE1_SIGMAS, callback=callback)
    assert seen == list(range(9))
    torch.testing.assert_close(out, x0, atol=1e-6, rtol=0)
    # The path itself between steps, not only where the denoiser sees it.
    partial = sample_euler(ConstantDenoiser(x0), x, STAGE1_SIGMAS[:5])
    torch.testing.assert_close(
        partial, STAGE1_SIGMAS[4] * eps + (1 - STAGE1_SIGMAS[4]) * x0, atol=1e-6, rtol=0
    )


def test_deterministic_ancestral_and_sde_steps_stay_on_the_path() -> None:
    x0, eps = _randn(1), _randn(2)
    for sampler, sigmas, atol in [
        (sample_euler_ancestral, STAGE2_SIGMAS, 1e-6),
        (sample_dpmpp_sde, STAGE3_SIGMAS, 2e-6),  # exp/log round-trips cost a few ulps
    ]:
        seen, callback = _on_path_checker(eps, x0, atol=atol)
        x = sigmas[0] * eps + (1 - sigmas[0]) * x0
        noise = FakeNoise(torch.full(SHAPE, 1e3))
        denoiser = PathDenoiser(x0, eps, atol)  # dpmpp_sde's midpoint inputs too
        sampler(denoiser, x, sigmas, eta=0.0, noise_sampler=noise, callback=callback)
        assert seen == list(range(16))
        assert len(denoiser.sigmas) == (31 if sampler is sample_dpmpp_sde else 16)
        assert noise.calls == []


# ---- euler_ancestral -------------------------------------------------------------------------


def test_euler_ancestral_one_step_by_hand() -> None:
    x0, x, eps = _randn(1), _randn(2), _randn(3)
    noise = FakeNoise(eps)
    out = sample_euler_ancestral(ConstantDenoiser(x0), x, STAGE1_SIGMAS[:2], noise_sampler=noise)
    down, ratio, renoise = ref.STAGE1_EA_COEFFICIENTS[0]  # σ = 1, so sigma_down / σ = sigma_down
    expected = ratio * (down * x + (1 - down) * x0) + renoise * eps
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=0)
    assert noise.calls == [(1.0, pytest.approx(ref.STAGE1_SIGMAS[1]))]


def test_euler_ancestral_s_noise_scales_the_draw() -> None:
    x0, x, eps = _randn(1), _randn(2), _randn(3)
    args = (ConstantDenoiser(x0), x, STAGE1_SIGMAS[:2])
    quiet = sample_euler_ancestral(*args, noise_sampler=FakeNoise(eps), s_noise=0.0)
    loud = sample_euler_ancestral(*args, noise_sampler=FakeNoise(eps), s_noise=2.0)
    renoise = ref.STAGE1_EA_COEFFICIENTS[0][2]
    torch.testing.assert_close(loud - quiet, 2 * renoise * eps, atol=2e-6, rtol=0)


@pytest.mark.parametrize(("sigmas", "draws"), [(STAGE1_SIGMAS, 8), (STAGE2_SIGMAS, 15)])
def test_euler_ancestral_draw_counts(sigmas: Tensor, draws: int) -> None:
    noise = FakeNoise(_randn(3))
    denoiser = ConstantDenoiser(_randn(1))
    sample_euler_ancestral(denoiser, _randn(2), sigmas, noise_sampler=noise)
    assert len(noise.calls) == draws
    assert noise.calls == [(float(sigmas[i]), float(sigmas[i + 1])) for i in range(draws)]
    assert torch.equal(torch.cat(denoiser.sigmas), sigmas[:-1])


def test_sample_euler_ancestral_uses_comfyui_cpu_noise() -> None:
    x0, x = _randn(1, (1, 16, 28, 22)), _randn(2, (1, 16, 28, 22))
    out = sample(
        "euler_ancestral", ConstantDenoiser(x0), x, STAGE1_SIGMAS[:2], seed=ref.STAGE1_SEED
    )
    eps = ancestral_noise_sampler(x, ref.STAGE1_SEED)(1.0, 0.95)
    assert eps.flatten()[0].item() == pytest.approx(ref.ANCESTRAL_FIRST_DRAW[0], abs=1e-6)
    down, ratio, renoise = ref.STAGE1_EA_COEFFICIENTS[0]
    expected = ratio * (down * x + (1 - down) * x0) + renoise * eps
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=0)
    # The seed keyword of the sampler itself gives the same stream.
    direct = sample_euler_ancestral(
        ConstantDenoiser(x0), x, STAGE1_SIGMAS[:2], seed=ref.STAGE1_SEED
    )
    assert torch.equal(direct, out)


# ---- dpmpp_sde -------------------------------------------------------------------------------


def test_dpmpp_sde_midpoints_match_comfyui() -> None:
    mids = midpoint_sigmas_dpmpp_sde(STAGE3_SIGMAS)
    assert mids.shape == (15,)
    torch.testing.assert_close(mids, STAGE3_MIDPOINTS, atol=1e-7, rtol=0)


def test_dpmpp_sde_evaluates_steps_and_midpoints() -> None:
    denoiser = ConstantDenoiser(_randn(1, (2, 2, 3, 4)))
    noise = FakeNoise(_randn(3, (2, 2, 3, 4)))
    sample_dpmpp_sde(denoiser, _randn(2, (2, 2, 3, 4)), STAGE3_SIGMAS, noise_sampler=noise)
    assert len(denoiser.sigmas) == 31
    for sigma in denoiser.sigmas:  # the per-sample σ is the same for the whole batch
        assert sigma.shape == (2,) and sigma[0] == sigma[1]
    called = torch.stack([s[0] for s in denoiser.sigmas])
    torch.testing.assert_close(called[0:-1:2], STAGE3_SIGMAS[:15], atol=0, rtol=0)
    torch.testing.assert_close(called[1::2], STAGE3_MIDPOINTS, atol=1e-7, rtol=0)
    assert called[-1] == STAGE3_SIGMAS[15]
    # Both increments of step i start at σ_i: (σ_i, σ1), then (σ_i, σ_{i+1}).
    expected_calls = []
    for i in range(15):
        start = float(STAGE3_SIGMAS[i])
        expected_calls += [(start, float(called[2 * i + 1])), (start, float(STAGE3_SIGMAS[i + 1]))]
    assert noise.calls == expected_calls


def _dpmpp_sde_step_float64(
    denoiser: Callable[[Tensor, float], Tensor],
    x: Tensor,
    noises: tuple[Tensor, Tensor],
    s: float,
    t: float,
    *,
    eta: float,
    s_noise: float,
    r: float,
) -> Tensor:
    """One dpmpp_sde step written from §6.2's formulas in float64 (α = 1 − σ, λ = log(α/σ))."""
    lam_s, lam_t = math.log((1 - s) / s), math.log((1 - t) / t)
    lam_1 = lam_s + r * (lam_t - lam_s)
    s1 = 1 / (1 + math.exp(lam_1))

    def step(x: Tensor, x0: Tensor, eps: Tensor, lam_to: float, sigma_to: float) -> Tensor:
        f, to = math.exp(-lam_s), math.exp(-lam_to)
        su = min(to, eta * math.sqrt(to**2 * (f**2 - to**2) / f**2))
        sd = math.sqrt(to**2 - su**2)
        h = -math.log(sd) - lam_s
        a_s, a_to = 1 - s, 1 - sigma_to
        noise = a_to * eps * s_noise * su
        return (a_to / a_s) * math.exp(-h) * x - a_to * math.expm1(-h) * x0 + noise

    x0 = denoiser(x, s)
    x0_1 = denoiser(step(x, x0, noises[0], lam_1, s1), s1)
    fac = 1 / (2 * r)
    return step(x, (1 - fac) * x0 + fac * x0_1, noises[1], lam_t, t)


class SequenceNoise(FakeNoise):
    """Returns the given tensors in turn, so each Brownian increment is told apart."""

    def __init__(self, noises: list[Tensor]) -> None:
        super().__init__(noises[0])
        self.noises = noises

    def __call__(self, sigma: Tensor | float, sigma_next: Tensor | float) -> Tensor:
        super().__call__(sigma, sigma_next)
        return self.noises[len(self.calls) - 1]


@pytest.mark.parametrize(
    ("eta", "s_noise", "r"), [(1.0, 1.0, 0.5), (0.7, 1.3, 0.5), (1.0, 1.0, 0.25), (0.5, 1.0, 1.0)]
)
def test_dpmpp_sde_one_step_by_hand(eta: float, s_noise: float, r: float) -> None:
    x, noises = _randn(2), (_randn(3), _randn(4))
    a, b = _randn(5), _randn(6)

    def denoiser(x: Tensor, sigma: Tensor | float) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1)[0]
        return 0.3 * x + a + sigma * b  # depends on x and σ, so the substep shows

    out = sample_dpmpp_sde(
        denoiser, x, STAGE3_SIGMAS[3:5], eta=eta, s_noise=s_noise, r=r,
        noise_sampler=SequenceNoise(list(noises)),
    )  # fmt: skip
    s, t = STAGE3_SIGMAS[3].item(), STAGE3_SIGMAS[4].item()
    a, b = a.double(), b.double()
    expected = _dpmpp_sde_step_float64(
        denoiser, x.double(), (noises[0].double(), noises[1].double()), s, t,
        eta=eta, s_noise=s_noise, r=r,
    )  # fmt: skip
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=0)


def test_dpmpp_sde_eta0_ignores_the_noise() -> None:
    def denoiser(x: Tensor, sigma: Tensor) -> Tensor:
        return 0.5 * x  # depends on x, so noise added anywhere would show

    x = _randn(2)
    runs = []
    for fill in (1e3, -1e3):
        noise = FakeNoise(torch.full(SHAPE, fill))
        runs.append(sample_dpmpp_sde(denoiser, x, STAGE3_SIGMAS, eta=0.0, noise_sampler=noise))
        assert noise.calls == []
    assert torch.equal(runs[0], runs[1])
    noisy = [
        sample_dpmpp_sde(denoiser, x, STAGE3_SIGMAS, noise_sampler=FakeNoise(torch.full(SHAPE, f)))
        for f in (1.0, -1.0)
    ]
    assert not torch.allclose(noisy[0], noisy[1])


def test_sample_dpmpp_sde_uses_the_cpu_brownian_tree() -> None:
    x0, x = _randn(1), _randn(2)
    sigmas = STAGE3_SIGMAS[-4:]
    out = sample("dpmpp_sde", ConstantDenoiser(x0), x, sigmas, seed=99, eta=1.0)
    ns = brownian_tree_noise_sampler(x, sigmas[sigmas > 0].min(), sigmas.max(), 99)
    expected = sample_dpmpp_sde(ConstantDenoiser(x0), x, sigmas, noise_sampler=ns)
    assert torch.equal(out, expected)
    # The last step returns x0, so compare the state before it: the seed must matter.
    states: dict[int, list[Tensor]] = {99: [], 100: []}
    for seed, xs in states.items():

        def record(i: int, x: Tensor, *_: Tensor, xs: list[Tensor] = xs) -> None:
            xs.append(x)

        sample("dpmpp_sde", ConstantDenoiser(x0), x, sigmas, seed=seed, callback=record)
    assert torch.equal(states[99][0], states[100][0])
    assert not torch.allclose(states[99][2], states[100][2])


def test_dpmpp_sde_offsets_a_first_sigma_of_one() -> None:
    sigmas = torch.tensor([1.0, 0.5, 0.0])
    with pytest.raises(ValueError) as info:
        sample_dpmpp_sde(ConstantDenoiser(_randn(1)), _randn(2), sigmas, eta=0.0)
    assert str(info.value) == (
        "sigmas[0] = 1.0 >= 1 has no finite log-SNR; pass model_sampling so it can be "
        "replaced by model_sampling.percent_to_sigma(0.0001)"
    )
    denoiser = ConstantDenoiser(_randn(1))
    out = sample_dpmpp_sde(
        denoiser, _randn(2), sigmas, noise_sampler=FakeNoise(_randn(3)),
        model_sampling=FlowSampling(shift=7.0),
    )  # fmt: skip
    first = torch.tensor(7 * 0.9999 / (1 + 6 * 0.9999), dtype=torch.float32)
    assert denoiser.sigmas[0][0] == first
    assert torch.isfinite(out).all()
    assert sigmas[0] == 1.0  # the caller's schedule is not modified


# ---- registry and errors ---------------------------------------------------------------------


def test_registry_and_empty_schedule() -> None:
    assert list(SAMPLERS) == ["euler", "euler_ancestral", "dpmpp_sde"]
    x = _randn(2)
    for name in SAMPLERS:
        assert sample(name, ConstantDenoiser(_randn(1)), x, STAGE1_SIGMAS[:1], seed=1) is x


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "dpmpp_2m"},
         "unknown sampler 'dpmpp_2m'; supported: euler, euler_ancestral, dpmpp_sde"),
        ({"eta": -0.1}, "eta must be >= 0, got -0.1"),
        ({"eta": float("nan")}, "eta must be >= 0, got nan"),
        ({"s_noise": -1.0}, "s_noise must be >= 0, got -1.0"),
        ({"r": 0.0}, "r must be in (0, 1], got 0.0"),
        ({"r": 1.5}, "r must be in (0, 1], got 1.5"),
        ({"noise_device": "gpu"}, "noise device must be one of auto, cpu, cuda, got 'gpu'"),
        ({"seed": -1}, "seed must be an integer in [0, 2**64 - 1 = 18446744073709551615], got -1"),
        ({"sigmas": torch.ones(2, 2)}, "sigmas must be a 1-D tensor, got shape [2, 2]"),
    ],
)  # fmt: skip
def test_sample_errors(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"name": "euler_ancestral", "sigmas": STAGE1_SIGMAS, "seed": 1}
    args.update(kwargs)
    with pytest.raises(ValueError) as info:
        sample(
            args.pop("name"),  # type: ignore[arg-type]
            ConstantDenoiser(_randn(1)),
            _randn(2),
            args.pop("sigmas"),  # type: ignore[arg-type]
            **args,  # type: ignore[arg-type]
        )
    assert str(info.value) == message


def test_samplers_need_noise_or_a_seed() -> None:
    denoiser, x = ConstantDenoiser(_randn(1)), _randn(2)
    with pytest.raises(ValueError) as info:
        sample_euler_ancestral(denoiser, x, STAGE1_SIGMAS)
    assert str(info.value) == "euler_ancestral with eta > 0 needs a noise_sampler or a seed"
    with pytest.raises(ValueError) as info:
        sample_dpmpp_sde(denoiser, x, STAGE3_SIGMAS)
    assert str(info.value) == "dpmpp_sde with eta, s_noise > 0 needs a noise_sampler or a seed"
    # Without noise, neither needs one.
    assert torch.equal(sample_euler_ancestral(denoiser, x, STAGE1_SIGMAS, eta=0.0), denoiser.x0)
    assert torch.equal(sample_dpmpp_sde(denoiser, x, STAGE3_SIGMAS, s_noise=0.0), denoiser.x0)
