"""Workflows of one shape sampled side by side, their denoiser calls batched along the batch axis.

Each item runs its own ``Pipeline.run`` on a thread of its own — its own seeds, noise samplers
(one Brownian tree per item for ``dpmpp_sde``), EasyCache state and decisions, captions — with
``LockstepModel`` standing in for the denoiser. A denoiser call waits until every item still
running is waiting in one too (or has finished); the waiting calls then run as one engine call
(or as few as the built profiles allow), each item's latents, σ and caption in its own rows,
captions of different lengths padded to the longest with the padding masked (``cap_valid``). An
item that skips a call (EasyCache) or has finished simply is not in that call's batch. A call
with no company runs exactly as ``Pipeline.model`` would run it alone. So each image is its
request's own image; what batching may change is only the floating-point order inside the
engine (tests/test_serve.py measures it: at most 1/255 per pixel on CPU).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor

from zimage_trt.runtime.pipeline import Pipeline
from zimage_trt.runtime.requests import Generation, Progress
from zimage_trt.workflow import Workflow


@dataclass
class _Call:
    x: Tensor
    sigma: Tensor
    context: Tensor
    result: Tensor | None = None
    error: BaseException | None = None


class LockstepModel:
    """The denoiser shared by ``items`` workflows sampled side by side (see the module)."""

    def __init__(self, pipeline: Pipeline, items: int) -> None:
        self.pipeline = pipeline
        self.live = items
        self.pending: list[_Call] = []
        self.batches: list[int] = []  # the batch size (in requests' rows) of every engine call
        self._cv = threading.Condition()

    def __call__(
        self, x: Tensor, sigma: Tensor, context: Tensor, cond_names: tuple[str, ...]
    ) -> Tensor:
        call = _Call(x, sigma, context)
        with self._cv:
            self.pending.append(call)
            self._run_if_all_waiting()
            while call.result is None and call.error is None:
                self._cv.wait()
        if call.error is not None:
            raise call.error
        assert call.result is not None
        return call.result

    def finished(self) -> None:
        """An item is done (or failed): the others no longer wait for it."""
        with self._cv:
            self.live -= 1
            self._run_if_all_waiting()

    def _run_if_all_waiting(self) -> None:
        if not self.pending or len(self.pending) < self.live:
            return
        calls, self.pending = self.pending, []
        try:
            for group in self._groups(calls):
                self._run(group)
        except BaseException as exc:  # every waiting item gets the engine's error
            for call in calls:
                if call.result is None:
                    call.error = exc
        self._cv.notify_all()

    def _groups(self, calls: list[_Call]) -> list[list[_Call]]:
        """Calls of one latent shape and dtype together, each group cut to what the built
        profiles take in one call."""
        by_shape: dict[tuple[object, ...], list[_Call]] = {}
        for call in calls:
            by_shape.setdefault((tuple(call.x.shape[1:]), call.x.dtype), []).append(call)
        groups = []
        for same in by_shape.values():
            limit = self._batch_limit(same[0].x)
            group: list[_Call] = []
            for call in same:
                if group and sum(c.x.shape[0] for c in group) + call.x.shape[0] > limit:
                    groups.append(group)
                    group = []
                group.append(call)
            groups.append(group)
        return groups

    def _batch_limit(self, x: Tensor) -> int:
        """The largest batch a denoiser profile covering this latent size takes (no profiles:
        eager engines, any batch)."""
        profiles = self.pipeline.engines.profiles.get("denoiser")
        if not profiles:
            return 1 << 30
        h, w = x.shape[2:]
        fits = [p.shapes["latents"].max[0] for p in profiles
                if p.shapes["latents"].min[2] <= h <= p.shapes["latents"].max[2]
                and p.shapes["latents"].min[3] <= w <= p.shapes["latents"].max[3]]  # fmt: skip
        return max(fits, default=1)

    def _run(self, group: list[_Call]) -> None:
        if len(group) == 1:  # alone: exactly the call a single run makes
            call = group[0]
            call.result = self.pipeline.model(call.x, call.sigma, call.context)
            self.batches.append(call.x.shape[0])
            return
        longest = max(c.context.shape[1] for c in group)
        rows = sum(c.x.shape[0] for c in group)
        first = group[0].context
        context = first.new_zeros((rows, longest, first.shape[2]))
        valid = torch.zeros((rows, longest), dtype=torch.bool, device=first.device)
        row = 0
        for call in group:
            b, length = call.context.shape[:2]
            context[row : row + b, :length] = call.context
            valid[row : row + b, :length] = True
            row += b
        x = torch.cat([c.x for c in group])
        sigma = torch.cat([c.sigma.reshape(-1) for c in group])
        v = self.pipeline.model(x, sigma, context, valid=valid)
        self.batches.append(rows)
        for call, part in zip(group, v.split([c.x.shape[0] for c in group]), strict=True):
            call.result = part


def run_batch(
    pipeline: Pipeline,
    workflows: Sequence[Workflow],
    progress: Sequence[Progress | None] | None = None,
    images: Sequence[Mapping[str, Image.Image] | None] | None = None,
) -> tuple[list[Generation | BaseException], list[int]]:
    """Run ``workflows`` side by side (see the module): each item's Generation, or the error
    that ended it (a Cancelled from its ``progress`` callback, a NonFiniteError, …), in order;
    and the batch size of every denoiser engine call made. ``images``: each item's pictures in
    memory (``Pipeline.run``)."""
    sets = {tuple((r.path, r.strength) for r in wf.models.loras) for wf in workflows}
    if len(sets) > 1:  # a LoRA switch (runtime.loras) would land in the others' runs
        raise ValueError(
            f"workflows sampled side by side must ask for one LoRA set; these ask for {len(sets)}"
        )
    if pipeline.loras is not None and workflows:
        pipeline.loras.hold(workflows[0])
    lockstep = LockstepModel(pipeline, len(workflows))
    results: list[Generation | BaseException | None] = [None] * len(workflows)
    callbacks = list(progress) if progress is not None else [None] * len(workflows)
    pictures = list(images) if images is not None else [None] * len(workflows)

    def item(i: int) -> Callable[[], None]:
        def work() -> None:
            try:
                results[i] = pipeline.run(workflows[i], callbacks[i], lockstep, pictures[i])
            except BaseException as exc:  # handed to the caller with the others' results
                results[i] = exc
            finally:
                lockstep.finished()

        return work

    threads = [threading.Thread(target=item(i), name=f"zimage-trt-item-{i}", daemon=True)
               for i in range(len(workflows))]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done = [r for r in results if r is not None]
    assert len(done) == len(workflows)  # every item's thread set its outcome
    return done, lockstep.batches
