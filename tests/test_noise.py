"""Noise against ComfyUI's own numbers (comfyui-semantics.md §7, §6, §16)."""

from __future__ import annotations

import pytest
import torch

from zimage_trt.runtime.noise import (
    SEED_MAX,
    NoiseSampler,
    ancestral_noise_sampler,
    brownian_tree_noise_sampler,
    initial_noise,
)

# §16 noise checksums: shape, seed, first six values, sum.
INITIAL_NOISE = [
    (
        (1, 16, 28, 22),
        905124181980574,
        [0.3623764, -0.5754872, 1.1528263, 0.2605728, -0.7819521, 1.3729424],
        -86.052745,
    ),
    (
        (1, 16, 54, 42),
        182450993364532,
        [2.2608187, 0.3004878, -0.3708425, 0.7733823, 1.2257245, 1.1216058],
        125.968293,
    ),
    (
        (1, 16, 108, 84),
        894355038471848,
        [1.2404746, -0.5303831, 1.4364955, 0.1722028, -0.5025685, 0.2269332],
        -388.471570,
    ),
]

STAGE1_SEED = 905124181980574
STAGE3_SEED = 894355038471848
STAGE3_SIGMAS = torch.tensor(
    [
        0.930881143, 0.915012956, 0.896854758, 0.875436842, 0.849809885, 0.820474803,
        0.785153687, 0.742732584, 0.693181872, 0.633455217, 0.564049602, 0.478773564,
        0.381561249, 0.273353755, 0.162650615, 0.0597722903, 0.0,
    ]
)  # fmt: skip
STAGE3_FIRST_MIDPOINT = torch.tensor(0.92332256)


@pytest.mark.parametrize(("shape", "seed", "first6", "total"), INITIAL_NOISE)
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
    ns = ancestral_noise_sampler(x, STAGE1_SEED)
    first = ns(torch.tensor(1.0), torch.tensor(0.954693854))
    assert first.shape == x.shape and first.dtype == torch.float32
    torch.testing.assert_close(
        first.flatten()[:3], torch.tensor([-0.2646814, 0.9821804, 2.0374773]), atol=1e-6, rtol=0
    )
    assert first.double().sum().item() == pytest.approx(-92.326295, abs=1e-3)
    # One draw per call from one generator seeded with seed + 1 (x on CPU).
    gen = torch.Generator().manual_seed(STAGE1_SEED + 1)
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
    return x, brownian_tree_noise_sampler(x, positive.min(), STAGE3_SIGMAS.max(), STAGE3_SEED)


def test_brownian_tree_first_two_calls_match_comfyui() -> None:
    x, ns = _stage3_tree()
    first = ns(STAGE3_SIGMAS[0], STAGE3_FIRST_MIDPOINT)
    second = ns(STAGE3_SIGMAS[0], STAGE3_SIGMAS[1])
    assert first.shape == x.shape and first.dtype == torch.float32
    torch.testing.assert_close(
        first.flatten()[:4],
        torch.tensor([-2.402406, -0.680422, 0.565156, -0.795890]),
        atol=1e-6,
        rtol=0,
    )
    assert first.double().sum().item() == pytest.approx(181.5714, abs=1e-4)
    torch.testing.assert_close(
        second.flatten()[:4],
        torch.tensor([-2.575469, -1.107076, -0.593200, -0.476963]),
        atol=1e-6,
        rtol=0,
    )
    assert second.double().sum().item() == pytest.approx(393.9002, abs=1e-4)


def test_brownian_tree_is_query_order_independent_and_antisymmetric() -> None:
    _, ns = _stage3_tree((2, 3, 4))
    later = ns(STAGE3_SIGMAS[0], STAGE3_SIGMAS[1])
    _, fresh = _stage3_tree((2, 3, 4))
    fresh(STAGE3_SIGMAS[3], STAGE3_SIGMAS[5])
    assert torch.equal(fresh(STAGE3_SIGMAS[0], STAGE3_SIGMAS[1]), later)
    backwards = ns(STAGE3_SIGMAS[1], STAGE3_SIGMAS[0])
    assert torch.equal(backwards, -later)
    # Python floats are taken as float32, as ComfyUI's torch.as_tensor does.
    assert torch.equal(ns(0.930881143, 0.915012956), later)


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
