"""EasyCache: skip DiT calls whose output change is predicted to be small (ComfyUI's EasyCache).

Reproduces ``comfy_extras/nodes_easycache.py`` as described in comfyui-semantics §9. Per
conditioning name it caches ``diff = v − x`` (model dtype, bf16); a skipped call returns
``x + diff``. Inside the σ window ``end_sigma < σ ≤ start_sigma`` it tracks, on the first
conditioning's ``[..., ::8, ::8]`` subsample, the input change since the last computed call and
the ratio k = output change / input change, accumulates ``k·input_change/‖out_prev‖`` and skips
while the sum stays below the threshold. All metrics are 0-d tensors in the model dtype, so the
threshold test happens in bf16 arithmetic, as in ComfyUI.

Which ``FlowSampling`` turns the percents into σ is the caller's decision: ComfyUI reads the
model sampling object that happens to be installed before the stage's patches apply (§9.4), so a
workflow may need the previous stage's shift here, not the stage's own.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from zimage_trt.sampling.guider import ModelFn
from zimage_trt.sampling.model_sampling import FlowSampling

_logger = logging.getLogger(__name__)


def easycache_window(
    sigmas_evaluated: Sequence[float] | Tensor, start_sigma: float, end_sigma: float
) -> list[str]:
    """Classify each evaluated σ as "before", "window" or "after" the cache window.

    σ is compared in float32 against the Python-float bounds, as ComfyUI compares
    ``sigma[0]`` (a float32 tensor) with them.
    """
    sig = torch.as_tensor(sigmas_evaluated, dtype=torch.float32).reshape(-1)
    past_end = ~(sig > end_sigma)
    in_window = sig <= start_sigma
    return [
        "after" if bool(a) else "window" if bool(w) else "before"
        for a, w in zip(past_end, in_window, strict=True)
    ]


class EasyCache:
    """State and decisions of one EasyCache node; ``wrap`` puts it in front of a model.

    Counters: ``steps_skipped`` is ComfyUI's count (skips of the batch holding the first
    conditioning, the number in the end-of-run log line); ``calls_skipped`` and
    ``calls_computed`` count wrapped model calls answered from the cache or by the model.
    ``actions`` holds one entry per wrapped call: "before", "compute", "skip" or "after".
    """

    name = "EasyCache"

    relative_transformation_rate: Tensor | float | None  # k; None until a run has measured it
    cumulative_change_rate: Tensor | float
    first_cond: str | None
    x_prev_sub: Tensor | None
    out_prev_sub: Tensor | None
    output_prev_norm: Tensor | None
    diffs: dict[str, Tensor]
    state_metadata: tuple[torch.device, torch.dtype, torch.Size] | None
    actions: list[str]

    def __init__(
        self,
        reuse_threshold: float,
        start_sigma: float,
        end_sigma: float,
        subsample_factor: int = 8,
        log: Callable[[str], None] | logging.Logger | None = None,
        *,
        start_percent: float | None = None,
        end_percent: float | None = None,
    ) -> None:
        if not math.isfinite(reuse_threshold) or reuse_threshold < 0:
            raise ValueError(f"reuse_threshold must be a finite number >= 0, got {reuse_threshold}")
        for label, value in (("start_sigma", start_sigma), ("end_sigma", end_sigma)):
            if not math.isfinite(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{label} must be in [0, 1], got {value}")
        if isinstance(subsample_factor, bool) or not isinstance(subsample_factor, int):
            raise ValueError(f"subsample_factor must be an int >= 1, got {subsample_factor!r}")
        if subsample_factor < 1:
            raise ValueError(f"subsample_factor must be an int >= 1, got {subsample_factor}")
        self.reuse_threshold = reuse_threshold
        self.start_sigma = start_sigma
        self.end_sigma = end_sigma
        self.subsample_factor = subsample_factor
        self.start_percent = start_percent
        self.end_percent = end_percent
        self.num_steps = 0
        if log is None:
            log = _logger
        if isinstance(log, logging.Logger):
            self._info: Callable[[str], None] = log.info
            self._warn: Callable[[str], None] = log.warning
        else:
            self._info = self._warn = log
        self.reset()
        # Before any run, k is "unknown" (None); only reset() mid-run sets it to 0.0 (§9.3).
        self.relative_transformation_rate = None

    @classmethod
    def from_percents(
        cls,
        reuse_threshold: float,
        start_percent: float,
        end_percent: float,
        ms: FlowSampling,
        subsample_factor: int = 8,
        log: Callable[[str], None] | logging.Logger | None = None,
    ) -> EasyCache:
        """The node's parameters: the window comes from ``ms.percent_to_sigma`` (see §9.4)."""
        for label, value in (("start_percent", start_percent), ("end_percent", end_percent)):
            if not math.isfinite(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{label} must be in [0, 1], got {value}")
        return cls(
            reuse_threshold,
            ms.percent_to_sigma(start_percent),
            ms.percent_to_sigma(end_percent),
            subsample_factor,
            log,
            start_percent=start_percent,
            end_percent=end_percent,
        )

    def reset(self) -> None:
        """Forget everything (ComfyUI's ``reset``; note k becomes 0.0, not None)."""
        self.relative_transformation_rate = 0.0
        self.cumulative_change_rate = 0.0
        self.initial_step = True
        self.skip_current_step = False
        self.first_cond = None
        self.x_prev_sub = None
        self.out_prev_sub = None
        self.output_prev_norm = None
        self.diffs = {}
        self.state_metadata = None
        self.steps_skipped = 0
        self.calls_skipped = 0
        self.calls_computed = 0
        self.actions = []

    # -- run bookkeeping ---------------------------------------------------------------------

    def start_run(self, num_steps: int) -> None:
        """Begin a sampling run of ``num_steps`` steps (len(sigmas) − 1) from a fresh state."""
        if num_steps < 0:
            raise ValueError(f"num_steps must be >= 0, got {num_steps}")
        self.reset()
        self.relative_transformation_rate = None
        self.num_steps = num_steps
        if self.start_percent is not None and self.end_percent is not None:
            bounds = f"start_percent: {self.start_percent}, end_percent: {self.end_percent}"
        else:
            bounds = f"start_sigma: {self.start_sigma}, end_sigma: {self.end_sigma}"
        self._info(f"{self.name} enabled - threshold: {self.reuse_threshold}, {bounds}")

    def end_run(self) -> None:
        """Log the skip count and free the cached tensors; the counters stay readable."""
        total, skipped = self.num_steps, self.steps_skipped
        # ComfyUI's formula. Skips count calls (dpmpp_sde midpoints too), so they can reach the
        # step count; ComfyUI catches the ZeroDivisionError and reports 1.0, as here.
        speedup = total / (total - skipped) if total != skipped else 1.0
        self._info(f"{self.name} - skipped {skipped}/{total} steps ({speedup:.2f}x speedup).")
        self.diffs = {}
        self.x_prev_sub = self.out_prev_sub = self.output_prev_norm = None

    @contextmanager
    def run(self, num_steps: int) -> Iterator[EasyCache]:
        """``with cache.run(len(sigmas) - 1): sample(...)`` — start_run/end_run around it."""
        self.start_run(num_steps)
        try:
            yield self
        finally:
            self.end_run()

    def wrap(self, model: ModelFn) -> EasyCacheModel:
        """A ModelFn that consults this cache before calling ``model``."""
        return EasyCacheModel(self, model)

    # -- the per-call algorithm (§9.3) --------------------------------------------------------

    def begin_guided_call(self) -> None:
        """Start of a guided evaluation: the first conditioning decides afresh."""
        self.skip_current_step = False

    def forward(
        self,
        model: ModelFn,
        x: Tensor,
        sigma: Tensor,
        context: Tensor,
        cond_names: tuple[str, ...],
    ) -> Tensor:
        """One DiT call through the cache; x is the model-dtype input, σ float32 [B]."""
        if not bool(sigma[0] > self.end_sigma):
            # Past the end: compute, and leave every piece of state as it is.
            self.actions.append("after")
            self.calls_computed += 1
            return model(x, sigma, context, cond_names)

        first_present = self.first_cond in cond_names
        input_change: Tensor | None = None
        in_window = bool(sigma[0] <= self.start_sigma)
        if in_window:
            self._check_metadata(x)
            if self.skip_current_step and self._has_diffs(cond_names):
                return self._apply_diffs(x, cond_names)
            if self.initial_step:
                self.first_cond = cond_names[0]
                first_present = True
                self.initial_step = False
            if first_present:
                if self.x_prev_sub is not None:
                    input_change = (self._sub(x, cond_names) - self.x_prev_sub).flatten().abs()
                    input_change = input_change.mean()
                k = self.relative_transformation_rate
                if self.output_prev_norm is not None and k is not None:
                    assert input_change is not None
                    self.cumulative_change_rate = (
                        self.cumulative_change_rate + k * input_change / self.output_prev_norm
                    )
                    if bool(self.cumulative_change_rate < self.reuse_threshold) and (
                        self._has_diffs(cond_names)
                    ):
                        # Later conditionings of this guided call follow this decision.
                        self.skip_current_step = True
                        return self._apply_diffs(x, cond_names)
                    self.cumulative_change_rate = 0.0

        out = model(x, sigma, context, cond_names)
        self.actions.append("compute" if in_window else "before")
        self.calls_computed += 1
        if first_present and self.output_prev_norm is not None:
            assert self.out_prev_sub is not None
            output_change = (self._sub(out, cond_names) - self.out_prev_sub).flatten().abs().mean()
            if input_change is not None:
                self.relative_transformation_rate = output_change / input_change
        self._store_diffs(out, x, cond_names)
        if first_present:
            self.x_prev_sub = self._sub(x, cond_names).clone()
            self.out_prev_sub = self._sub(out, cond_names).clone()
            self.output_prev_norm = out.flatten().abs().mean()
        return out

    def _check_metadata(self, x: Tensor) -> None:
        metadata = (x.device, x.dtype, x.shape[1:])
        if self.state_metadata is None:
            self.state_metadata = metadata
        elif metadata != self.state_metadata:
            self._warn(f"{self.name} - Tensor shape, dtype or device changed, resetting state")
            # ComfyUI's reset also zeroes the run's skip count; keep the call log.
            actions, computed, skipped = self.actions, self.calls_computed, self.calls_skipped
            self.reset()
            self.actions, self.calls_computed, self.calls_skipped = actions, computed, skipped

    def _sub(self, t: Tensor, cond_names: tuple[str, ...]) -> Tensor:
        """The first conditioning's batch slice, every ``subsample_factor``-th row and column."""
        n = t.shape[0] // len(cond_names)
        assert self.first_cond is not None
        i = cond_names.index(self.first_cond)
        f = self.subsample_factor
        return t[i * n : (i + 1) * n, ..., ::f, ::f]

    def _has_diffs(self, cond_names: tuple[str, ...]) -> bool:
        return all(name in self.diffs for name in cond_names)

    def _store_diffs(self, out: Tensor, x: Tensor, cond_names: tuple[str, ...]) -> None:
        diff = out - x
        n = diff.shape[0] // len(cond_names)
        for i, name in enumerate(cond_names):
            self.diffs[name] = diff[i * n : (i + 1) * n]

    def _apply_diffs(self, x: Tensor, cond_names: tuple[str, ...]) -> Tensor:
        """x + cached diff per conditioning slice (out of place; same bf16 sums as ComfyUI's +=)."""
        if self.first_cond in cond_names:
            self.steps_skipped += 1
        self.calls_skipped += 1
        self.actions.append("skip")
        n = x.shape[0] // len(cond_names)
        parts = [
            x[i * n : (i + 1) * n] + self.diffs[name].to(x.device)
            for i, name in enumerate(cond_names)
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class EasyCacheModel:
    """A ModelFn with EasyCache in front; exposes the guider's ``begin_guided_call`` hook."""

    def __init__(self, cache: EasyCache, model: ModelFn) -> None:
        self.cache = cache
        self.model = model

    def __call__(
        self, x: Tensor, sigma: Tensor, context: Tensor, cond_names: tuple[str, ...]
    ) -> Tensor:
        return self.cache.forward(self.model, x, sigma, context, cond_names)

    def begin_guided_call(self) -> None:
        self.cache.begin_guided_call()
