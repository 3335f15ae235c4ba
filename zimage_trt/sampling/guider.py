"""Classifier-free guidance around a velocity model: ComfyUI's CFGGuider and sampling_function.

The guided denoiser takes the float32 sampler state x and σ and returns x0 in float32. Each
model call sees x and the caption cast to the model dtype (bf16) and returns v in that dtype;
x0 = x − σ·v.float() is formed in float32 (comfyui-semantics §2.2, §8, §12).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from zimage_trt.sampling.model_sampling import calculate_denoised


class ModelFn(Protocol):
    """One DiT call: x [B,16,H,W] and context [B,L,D] in the model dtype, σ [B] float32.

    Returns the velocity v [B,16,H,W] in the model dtype. ``cond_names`` names the
    conditionings in the batch, one per B/len(cond_names) slice, in batch order. A model may
    also have a ``begin_guided_call()`` method, which the guider calls once at the start of
    every guided evaluation (ComfyUI's CALC_COND_BATCH wrapper point; EasyCache uses it).
    """

    def __call__(
        self, x: Tensor, sigma: Tensor, context: Tensor, cond_names: tuple[str, ...]
    ) -> Tensor: ...


@dataclass(frozen=True)
class Cond:
    """A named conditioning: what the model call gets as ``context``, [1, L, D].

    ``tokens`` is the text encoder's sequence length when ``context`` is derived from it (the
    caption path pads to multiples of 32): ComfyUI batches cond and uncond only when their
    encoder outputs have equal lengths, and that choice decides EasyCache's first conditioning.
    """

    name: str
    context: Tensor
    tokens: int | None = None

    @property
    def batch_key(self) -> tuple[object, ...]:
        return (tuple(self.context.shape), self.tokens)


class CFGGuider:
    """x, σ → guided x0: ``uncond_x0 + (cond_x0 − uncond_x0)·cfg`` in float32.

    cfg ≈ 1 (``math.isclose``) skips the unconditional pass and returns the cond x0 itself.
    Cond and uncond share one batched call, ordered [uncond, cond], when their contexts have
    equal shapes and token counts (ComfyUI concatenates only then); otherwise they run as two
    calls, cond first.
    ``model_calls`` counts the model calls made so far.
    """

    def __init__(
        self,
        model: ModelFn,
        cond: Cond,
        uncond: Cond | None,
        cfg: float,
        model_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        if not math.isfinite(cfg) or cfg < 0:
            raise ValueError(f"cfg must be a finite number >= 0, got {cfg}")
        for c in (cond, uncond):
            if c is not None and (c.context.ndim != 3 or c.context.shape[0] != 1):
                raise ValueError(
                    f"conditioning {c.name!r} must have shape [1, L, D], "
                    f"got {list(c.context.shape)}"
                )
        self.use_uncond = not math.isclose(cfg, 1.0)
        if self.use_uncond and uncond is None:
            raise ValueError(f"cfg {cfg} needs an unconditional (negative) conditioning, got None")
        if uncond is not None and uncond.name == cond.name:
            raise ValueError(f"cond and uncond need distinct names, both are {cond.name!r}")
        self.model = model
        self.cond = cond
        self.uncond = uncond
        self.cfg = cfg
        self.model_dtype = model_dtype
        self.model_calls = 0
        self._begin: Callable[[], None] | None = getattr(model, "begin_guided_call", None)

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        """Guided x0 for the float32 state x [B,C,H,W] at σ (a 0-d tensor or [B])."""
        batch = x.shape[0]
        sigma = sigma.to(torch.float32).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(batch)
        if sigma.shape[0] != batch:
            raise ValueError(f"sigma must be 0-d or have {batch} entries, got {sigma.shape[0]}")
        if not bool(torch.isfinite(x).all()):
            raise FloatingPointError(
                f"sampler state x has NaN/Inf values at sigma {float(sigma[0]):.6g}"
            )
        if self._begin is not None:
            self._begin()

        if not self.use_uncond:
            return self._x0(x, sigma, (self.cond,))[0]
        assert self.uncond is not None
        if self.cond.batch_key == self.uncond.batch_key:
            uncond_x0, cond_x0 = self._x0(x, sigma, (self.uncond, self.cond))
        else:
            cond_x0 = self._x0(x, sigma, (self.cond,))[0]
            uncond_x0 = self._x0(x, sigma, (self.uncond,))[0]
        return uncond_x0 + (cond_x0 - uncond_x0) * self.cfg

    def _x0(self, x: Tensor, sigma: Tensor, conds: tuple[Cond, ...]) -> list[Tensor]:
        """One model call on the conds batched in the given order; x0 per cond, float32."""
        n = len(conds)
        batch = x.shape[0]
        xs = x.repeat(n, *([1] * (x.ndim - 1))) if n > 1 else x
        sigmas = sigma.repeat(n) if n > 1 else sigma
        context = torch.cat([c.context.expand(batch, -1, -1) for c in conds])
        v = self.model(
            xs.to(self.model_dtype),
            sigmas,
            context.to(self.model_dtype),
            tuple(c.name for c in conds),
        )
        self.model_calls += 1
        x0 = calculate_denoised(sigmas, v.float(), xs)
        return list(x0.split(batch))
