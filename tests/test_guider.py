"""CFGGuider: ComfyUI's cfg-1 shortcut, cond/uncond batching order, dtype flow, CFG formula."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from zimage_trt.sampling.guider import CFGGuider, Cond
from zimage_trt.sampling.model_sampling import calculate_denoised

D = 8


class RecordingModel:
    """v = x·(1 + mean(context)) + σ, in the input dtype; records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[Tensor, Tensor, Tensor, tuple[str, ...]]] = []
        self.guided_calls = 0

    def __call__(self, x: Tensor, sigma: Tensor, context: Tensor, names: tuple[str, ...]) -> Tensor:
        self.calls.append((x.clone(), sigma.clone(), context.clone(), names))
        scale = 1 + context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        return x * scale + sigma.reshape(-1, 1, 1, 1).to(x.dtype)

    def begin_guided_call(self) -> None:
        self.guided_calls += 1


def v_ref(x: Tensor, sigma: Tensor, context: Tensor) -> Tensor:
    """RecordingModel's v for one conditioning, fed the way the guider must feed it."""
    xb, cb = x.to(torch.bfloat16), context.to(torch.bfloat16).expand(x.shape[0], -1, -1)
    scale = 1 + cb.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
    return xb * scale + sigma.reshape(-1, 1, 1, 1).to(torch.bfloat16)


def make_cond(name: str, length: int, seed: int) -> Cond:
    g = torch.Generator().manual_seed(seed)
    return Cond(name, torch.randn(1, length, D, generator=g) * 0.5)


@pytest.fixture
def state() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 16, 6, 4, generator=g), torch.tensor([0.7, 0.7])


def test_cfg1_skips_uncond_and_returns_cond_x0_bitwise(state: tuple[Tensor, Tensor]) -> None:
    x, sigma = state
    model = RecordingModel()
    cond, uncond = make_cond("cond", 10, 1), make_cond("uncond", 10, 2)
    guider = CFGGuider(model, cond, uncond, cfg=1.0)
    for _ in range(3):
        x0 = guider(x, sigma)
    assert guider.model_calls == 3 and model.guided_calls == 3
    assert [c[3] for c in model.calls] == [("cond",)] * 3
    expected = calculate_denoised(sigma, v_ref(x, sigma, cond.context).float(), x)
    assert x0.dtype == torch.float32
    assert torch.equal(x0, expected)
    # isclose(cfg, 1.0) is ComfyUI's test, not ==.
    assert CFGGuider(model, cond, None, cfg=1.0 + 1e-12)(x, sigma).equal(expected)


def test_dtype_flow_into_the_model(state: tuple[Tensor, Tensor]) -> None:
    x, sigma = state
    model = RecordingModel()
    cond = make_cond("cond", 5, 1)
    CFGGuider(model, cond, None, cfg=1.0)(x, sigma)
    xm, sm, cm, _ = model.calls[0]
    assert xm.dtype == torch.bfloat16 and cm.dtype == torch.bfloat16 and sm.dtype == torch.float32
    assert torch.equal(xm, x.to(torch.bfloat16))
    assert cm.shape == (2, 5, D)  # the [1, L, D] caption repeated to the image batch
    assert torch.equal(cm, cond.context.to(torch.bfloat16).expand(2, -1, -1))
    assert torch.equal(sm, sigma)
    # float32 model: x passes unchanged; a 0-d sigma is broadcast to [B]
    model32 = RecordingModel()
    CFGGuider(model32, cond, None, 1.0, model_dtype=torch.float32)(x, torch.tensor(0.5))
    assert model32.calls[0][0].dtype == torch.float32
    assert model32.calls[0][1].tolist() == [0.5, 0.5]


def test_unequal_lengths_run_cond_then_uncond(state: tuple[Tensor, Tensor]) -> None:
    x, sigma = state
    model = RecordingModel()
    cond, uncond = make_cond("cond", 10, 1), make_cond("uncond", 8, 2)
    guider = CFGGuider(model, cond, uncond, cfg=2.0)
    out = guider(x, sigma)
    assert guider.model_calls == 2 and model.guided_calls == 1
    assert [c[3] for c in model.calls] == [("cond",), ("uncond",)]
    assert [c[2].shape[1] for c in model.calls] == [10, 8]
    cond_x0 = calculate_denoised(sigma, v_ref(x, sigma, cond.context).float(), x)
    uncond_x0 = calculate_denoised(sigma, v_ref(x, sigma, uncond.context).float(), x)
    assert torch.equal(out, uncond_x0 + (cond_x0 - uncond_x0) * 2.0)
    assert not torch.equal(out, cond_x0)


def test_equal_lengths_batch_uncond_first(state: tuple[Tensor, Tensor]) -> None:
    x, sigma = state
    model = RecordingModel()
    cond, uncond = make_cond("cond", 9, 1), make_cond("uncond", 9, 2)
    guider = CFGGuider(model, cond, uncond, cfg=3.5)
    out = guider(x, sigma)
    assert guider.model_calls == 1
    xm, sm, cm, names = model.calls[0]
    assert names == ("uncond", "cond")
    assert xm.shape == (4, 16, 6, 4) and sm.shape == (4,) and cm.shape == (4, 9, D)
    assert torch.equal(xm[:2], xm[2:])
    assert torch.equal(cm[:2], uncond.context.to(torch.bfloat16).expand(2, -1, -1))
    assert torch.equal(cm[2:], cond.context.to(torch.bfloat16).expand(2, -1, -1))
    cond_x0 = calculate_denoised(sigma, v_ref(x, sigma, cond.context).float(), x)
    uncond_x0 = calculate_denoised(sigma, v_ref(x, sigma, uncond.context).float(), x)
    assert torch.equal(out, uncond_x0 + (cond_x0 - uncond_x0) * 3.5)
    assert out.dtype == torch.float32


def test_cfg_formula_on_known_values() -> None:
    """x0 = x − σ·v; v = x·s: cond s=1.5, uncond s=0.5 → x0_c = 0.25x, x0_u = 0.75x at σ 0.5."""

    def model(x: Tensor, sigma: Tensor, context: Tensor, names: tuple[str, ...]) -> Tensor:
        return x * context[:, :1, :1].reshape(-1, 1, 1, 1)

    x = torch.full((1, 16, 2, 2), 2.0)
    cond, uncond = (
        Cond("cond", torch.full((1, 3, D), 1.5)),
        Cond("uncond", torch.full((1, 4, D), 0.5)),
    )
    out = CFGGuider(model, cond, uncond, cfg=2.0)(x, torch.tensor([0.5]))
    # 1.5 + (0.5 − 1.5)·2 = −0.5
    assert torch.equal(out, torch.full_like(x, -0.5))
    out0 = CFGGuider(model, cond, uncond, cfg=0.0)(x, torch.tensor([0.5]))
    assert torch.equal(out0, torch.full_like(x, 1.5))


@pytest.mark.parametrize("cfg", [float("nan"), float("inf"), -0.5])
def test_bad_cfg(cfg: float) -> None:
    with pytest.raises(ValueError, match=f"cfg must be a finite number >= 0, got {cfg}"):
        CFGGuider(RecordingModel(), make_cond("cond", 3, 0), make_cond("uncond", 3, 1), cfg)


def test_bad_conditionings() -> None:
    with pytest.raises(
        ValueError, match=r"cfg 2.0 needs an unconditional \(negative\) conditioning"
    ):
        CFGGuider(RecordingModel(), make_cond("cond", 3, 0), None, 2.0)
    with pytest.raises(
        ValueError, match=r"conditioning 'cond' must have shape \[1, L, D\], got \[2, 3, 8\]"
    ):
        CFGGuider(RecordingModel(), Cond("cond", torch.zeros(2, 3, D)), None, 1.0)
    with pytest.raises(ValueError, match="cond and uncond need distinct names, both are 'c'"):
        CFGGuider(
            RecordingModel(), Cond("c", torch.zeros(1, 3, D)), Cond("c", torch.zeros(1, 3, D)), 2.0
        )


def test_non_finite_state_names_sigma(state: tuple[Tensor, Tensor]) -> None:
    x, _ = state
    x = x.clone()
    x[1, 3, 2, 1] = float("nan")
    model = RecordingModel()
    guider = CFGGuider(model, make_cond("cond", 3, 0), None, 1.0)
    with pytest.raises(
        FloatingPointError, match=r"sampler state x has NaN/Inf values at sigma 0\.619429"
    ):
        guider(x, torch.tensor([0.619428575, 0.619428575]))
    x[1, 3, 2, 1] = float("-inf")
    with pytest.raises(FloatingPointError, match="NaN/Inf"):
        guider(x, torch.tensor(0.5))
    assert guider.model_calls == 0 and model.calls == []
    with pytest.raises(ValueError, match="sigma must be 0-d or have 2 entries, got 3"):
        guider(torch.zeros(2, 16, 2, 2), torch.ones(3))


def test_equal_padded_shapes_but_different_token_counts_run_separately() -> None:
    """Caption tokens pad to 32: 40 and 50 encoder tokens both give 64, yet ComfyUI (which
    compares encoder outputs) runs cond and uncond as two calls — and EasyCache follows that."""
    names: list[tuple[str, ...]] = []

    def model(
        x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, cond_names: tuple[str, ...]
    ) -> torch.Tensor:
        names.append(cond_names)
        return torch.zeros_like(x)

    ctx = torch.zeros(1, 64, 4)
    guider = CFGGuider(model, Cond("cond", ctx, tokens=40), Cond("uncond", ctx, tokens=50), 2.0)
    guider(torch.zeros(1, 16, 2, 2), torch.tensor(0.5))
    assert names == [("cond",), ("uncond",)]
    guider = CFGGuider(model, Cond("cond", ctx, tokens=40), Cond("uncond", ctx, tokens=40), 2.0)
    names.clear()
    guider(torch.zeros(1, 16, 2, 2), torch.tensor(0.5))
    assert names == [("uncond", "cond")]
