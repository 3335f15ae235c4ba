"""Noise against ComfyUI's own numbers (comfyui-semantics.md §7, §6, §16)."""

from __future__ import annotations

import comfy_reference as ref
import pytest
import torch

from zimage_trt.sampling.noise import (
    SEED_MAX,
    NoiseSampler,
    ancestral_noise_sampler,
    brownian_tree_noise_sampler,
    initial_noise,
)

STAGE3_SIGMAS = torch.tensor(ref.STAGE3_SIGMAS)
STAGE3_FIRST_MIDPOINT = torch.tensor(ref.STAGE3_MIDPOINTS[0])


@pytest.mark.parametrize(("shape", "seed", "first6", "total"), ref.INITIAL_NOISE)
def test_initial_noise_matches_comfyui(
    shape: tuple[int, ...], seed: int, first6: list[float], total: float
) -> None:
    noise = initial_noise(shape, seed)
    assert noise.shape == shape
    assert noise.dtype == torch.float32
    assert noise.device.type == "cpu"
    torch.testing.assert_close(noise.flatten()[:6], torch.tensor(first6), atol=1e-6, rtol=0)
    assert noise.double().sum().item() == pytest.approx(total, abs=1e-3)


def test_initial_noise_equals_global_seed_and_leaves_global_state_alone() -> None:
    state = torch.random.get_rng_state()
    noise = initial_noise((2, 3, 4), 123)
    assert torch.equal(torch.random.get_rng_state(), state)
    with torch.random.fork_rng():
        generator = torch.manual_seed(123)  # what ComfyUI's prepare_noise does
        expected = torch.randn((2, 3, 4), dtype=torch.float32, generator=generator)
    assert torch.equal(noise, expected)


def test_initial_noise_accepts_the_full_seed_range() -> None:
    assert initial_noise((3,), 0).shape == (3,)
    top = initial_noise((3,), SEED_MAX)
    assert SEED_MAX == 2**64 - 1
    assert torch.equal(top, torch.randn(3, generator=torch.Generator().manual_seed(SEED_MAX)))


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, True, "7"])
def test_initial_noise_rejects_bad_seeds(seed: object) -> None:
    with pytest.raises(ValueError) as info:
        initial_noise((3,), seed)  # type: ignore[arg-type]
    assert str(info.value) == (
        f"seed must be an integer in [0, 2**64 - 1 = 18446744073709551615], got {seed!r}"
    )


def test_ancestral_cpu_first_draw_matches_comfyui() -> None:
    x = torch.zeros(1, 16, 28, 22)
    ns = ancestral_noise_sampler(x, ref.STAGE1_SEED)
    first = ns(torch.tensor(ref.STAGE1_SIGMAS[0]), torch.tensor(ref.STAGE1_SIGMAS[1]))
    assert first.shape == x.shape and first.dtype == torch.float32
    torch.testing.assert_close(
        first.flatten()[:3], torch.tensor(ref.ANCESTRAL_FIRST_DRAW), atol=1e-6, rtol=0
    )
    assert first.double().sum().item() == pytest.approx(ref.ANCESTRAL_FIRST_DRAW_SUM, abs=1e-3)
    # One draw per call from one generator seeded with seed + 1 (x on CPU).
    gen = torch.Generator().manual_seed(ref.STAGE1_SEED + 1)
    assert torch.equal(first, torch.randn(x.shape, generator=gen))
    assert torch.equal(ns(0.95, 0.90), torch.randn(x.shape, generator=gen))


def test_ancestral_cpu_option_equals_auto_on_cpu_and_is_not_the_initial_noise() -> None:
    x = torch.zeros(2, 3, 5)
    auto, cpu = ancestral_noise_sampler(x, 42), ancestral_noise_sampler(x, 42, "cpu")
    for _ in range(3):
        assert torch.equal(auto(1.0, 0.5), cpu(1.0, 0.5))
    assert not torch.equal(ancestral_noise_sampler(x, 42)(1.0, 0.5), initial_noise(x.shape, 42))


def test_ancestral_top_seed_wraps_instead_of_overflowing() -> None:
    x = torch.zeros(4)
    draw = ancestral_noise_sampler(x, SEED_MAX)(1.0, 0.5)
    assert torch.equal(draw, torch.randn(4, generator=torch.Generator().manual_seed(0)))


def test_ancestral_draw_takes_x_dtype() -> None:
    x = torch.zeros(2, 3, dtype=torch.float64)
    draw = ancestral_noise_sampler(x, 7)(1.0, 0.5)
    assert draw.dtype == torch.float64
    expected = torch.randn(2, 3, generator=torch.Generator().manual_seed(8)).double()
    assert torch.equal(draw, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ancestral_cuda_uses_the_seed_and_cpu_option_matches_cpu() -> None:
    x = torch.zeros(1, 4, 8, 8, device="cuda")
    cuda_draw = ancestral_noise_sampler(x, 5)(1.0, 0.5)
    gen = torch.Generator("cuda").manual_seed(5)
    assert torch.equal(cuda_draw, torch.randn(x.shape, device="cuda", generator=gen))
    cpu_draw = ancestral_noise_sampler(x, 5, "cpu")(1.0, 0.5)
    assert cpu_draw.device.type == "cuda"
    assert torch.equal(cpu_draw.cpu(), ancestral_noise_sampler(x.cpu(), 5)(1.0, 0.5))


def test_ancestral_rejects_bad_device_and_seed() -> None:
    x = torch.zeros(3)
    with pytest.raises(ValueError) as info:
        ancestral_noise_sampler(x, 1, "gpu")
    assert str(info.value) == "noise device must be one of auto, cpu, cuda, got 'gpu'"
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*64 - 1"):
        ancestral_noise_sampler(x, -5)


def _stage3_tree(shape: tuple[int, ...] = (1, 16, 108, 84)) -> tuple[torch.Tensor, NoiseSampler]:
    x = torch.zeros(shape)
    positive = STAGE3_SIGMAS[STAGE3_SIGMAS > 0]
    return x, brownian_tree_noise_sampler(x, positive.min(), STAGE3_SIGMAS.max(), ref.STAGE3_SEED)


def test_brownian_tree_first_two_calls_match_comfyui() -> None:
    x, ns = _stage3_tree()
    first = ns(STAGE3_SIGMAS[0], STAGE3_FIRST_MIDPOINT)
    second = ns(STAGE3_SIGMAS[0], STAGE3_SIGMAS[1])
    assert first.shape == x.shape and first.dtype == torch.float32
    torch.testing.assert_close(
        first.flatten()[:4], torch.tensor(ref.BROWNIAN_FIRST_CALL), atol=1e-6, rtol=0
    )
    assert first.double().sum().item() == pytest.approx(ref.BROWNIAN_FIRST_CALL_SUM, abs=1e-4)
    torch.testing.assert_close(
        second.flatten()[:4], torch.tensor(ref.BROWNIAN_SECOND_CALL), atol=1e-6, rtol=0
    )
    assert second.double().sum().item() == pytest.approx(ref.BROWNIAN_SECOND_CALL_SUM, abs=1e-4)


def test_brownian_tree_is_query_order_independent_and_antisymmetric() -> None:
    _, ns = _stage3_tree((2, 3, 4))
    later = ns(STAGE3_SIGMAS[0], STAGE3_SIGMAS[1])
    _, fresh = _stage3_tree((2, 3, 4))
    fresh(STAGE3_SIGMAS[3], STAGE3_SIGMAS[5])
    assert torch.equal(fresh(STAGE3_SIGMAS[0], STAGE3_SIGMAS[1]), later)
    backwards = ns(STAGE3_SIGMAS[1], STAGE3_SIGMAS[0])
    assert torch.equal(backwards, -later)
    # Python floats are taken as float32, as ComfyUI's torch.as_tensor does.
    assert torch.equal(ns(ref.STAGE3_SIGMAS[0], ref.STAGE3_SIGMAS[1]), later)


def test_brownian_tree_follows_x_dtype_and_validates_seed() -> None:
    x = torch.zeros(2, 3, dtype=torch.float64)
    ns = brownian_tree_noise_sampler(x, 0.1, 0.9, 3)
    assert ns(0.9, 0.5).dtype == torch.float64
    reference = brownian_tree_noise_sampler(x.float(), 0.1, 0.9, 3)
    assert torch.equal(ns(0.9, 0.5), reference(0.9, 0.5).double())
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*64 - 1"):
        brownian_tree_noise_sampler(x, 0.1, 0.9, 2**64)


def test_brownian_tree_on_device_builds_an_equivalent_tree_on_cpu() -> None:
    x = torch.zeros(2, 3)
    on_x = brownian_tree_noise_sampler(x, 0.1, 0.9, 11, cpu=False)
    assert torch.equal(on_x(0.9, 0.4), brownian_tree_noise_sampler(x, 0.1, 0.9, 11)(0.9, 0.4))
