"""The one worker that owns the engines: a bounded queue of jobs, run one after another on a
thread of its own, each able to be cancelled (its client went away, its deadline passed) at the
next sampler step.

A ``Job`` is one HTTP request: its workflows (one per image) and a future for the caller.
``submit`` refuses with ``QueueFull`` (→ 429 with Retry-After) when ``max_queue`` jobs wait
already. The worker turns each workflow's ``Generation`` into PNG bytes carrying the same
metadata as ``zimage-trt generate`` writes, and reports what it did to ``metrics``.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from PIL.Image import Image as PILImage

from zimage_trt.errors import ZimageError
from zimage_trt.runtime.batch import run_batch
from zimage_trt.runtime.images import png_bytes, png_metadata
from zimage_trt.runtime.pipeline import Pipeline
from zimage_trt.runtime.requests import Generation
from zimage_trt.serving.metrics import Metrics
from zimage_trt.workflow import Workflow


class QueueFull(ZimageError):
    """The queue holds ``max_queue`` jobs; ``retry_after`` seconds is a fair wait."""

    def __init__(self, depth: int, retry_after: int) -> None:
        super().__init__(
            f"the server is busy: {depth} requests are queued (--max-queue {depth}); "
            f"retry in {retry_after} s"
        )
        self.retry_after = retry_after


class Cancelled(ZimageError):
    """A job stopped before it finished: its client left, or its deadline passed."""


@dataclass
class Image:
    """One PNG a job made: a stage preview or the final image, with the seeds that made it."""

    png: bytes
    stage: str
    kind: str  # "preview" or "final"
    seed: int


@dataclass
class Result:
    images: list[Image]
    timings: dict[str, float]


def shape_key(wf: Workflow) -> tuple[object, ...]:
    """Jobs with equal keys may run as one batch: the same workflow at the same size, with the
    same LoRAs."""
    loras = tuple((r.path, r.strength) for r in wf.models.loras)
    return wf.name, tuple(wf.latent_sizes()), loras


@dataclass(eq=False)  # a job is itself: the queue removes this one, not an equal one
class Job:
    workflows: list[Workflow]
    previews: bool = False  # /v1/workflows/run: every image the workflow saves, not only finals
    deadline: float | None = None  # time.monotonic() after which it is dropped
    future: Future[Result] = field(default_factory=Future)
    reason: str | None = None  # why it was cancelled
    created: float = field(default_factory=time.monotonic)
    images: dict[str, PILImage] = field(default_factory=dict)  # uploads its workflows name

    @property
    def key(self) -> tuple[object, ...]:
        return (*shape_key(self.workflows[0]), self.previews)

    def cancel(self, reason: str) -> None:
        """Stop the job at its next step (or before it starts)."""
        if self.reason is None:
            self.reason = reason

    def check(self) -> None:
        if self.reason is None and self.deadline is not None and time.monotonic() > self.deadline:
            self.reason = "deadline"
        if self.reason is not None:
            raise Cancelled(f"the request was dropped ({self.reason})")


class Worker:
    """Runs jobs on ``pipeline`` on its own thread (``start``/``stop``). Jobs of one shape (the
    same workflow at the same size) that arrive within ``batch_wait`` seconds of each other run
    as one batch of up to ``max_batch`` images, sampled side by side (``runtime.batch``)."""

    def __init__(
        self,
        pipeline: Pipeline,
        metrics: Metrics,
        max_queue: int = 32,
        max_batch: int = 4,
        batch_wait: float = 0.02,
    ) -> None:
        self.pipeline = pipeline
        self.metrics = metrics
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.batch_wait = batch_wait
        self._jobs: deque[Job] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._seconds_per_image = 1.0  # running mean, for Retry-After
        self.busy = False
        # rows of the latest denoiser calls (bounded: the server runs for weeks)
        self.engine_batches: deque[int] = deque(maxlen=4096)

    # -- the caller's side ---------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        with self._cv:
            if len(self._jobs) >= self.max_queue:
                images = sum(len(j.workflows) for j in self._jobs)
                wait = max(1, round((images + 1) * self._seconds_per_image / self.max_batch))
                raise QueueFull(len(self._jobs), wait)
            self._jobs.append(job)
            self.metrics.queue_depth.set(len(self._jobs))
            self._cv.notify_all()
        return job

    @property
    def depth(self) -> int:
        return len(self._jobs)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="zimage-trt-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the jobs already queued, then end the thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the worker's side ---------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if not batch:
                return
            self.busy = True
            try:
                self._run(batch)
            finally:
                self.busy = False

    def _next_batch(self) -> list[Job]:
        """The oldest job and the queued jobs of its shape, up to ``max_batch`` images, waiting
        up to ``batch_wait`` for more; [] when stopping with nothing left."""
        with self._cv:
            while not self._jobs:
                if self._stopping:
                    return []
                self._cv.wait()
            first = self._jobs.popleft()
            batch, images = [first], len(first.workflows)
            deadline = time.monotonic() + self.batch_wait
            while images < self.max_batch:
                for job in [j for j in self._jobs if j.key == first.key]:
                    if images + len(job.workflows) <= self.max_batch:
                        self._jobs.remove(job)
                        batch.append(job)
                        images += len(job.workflows)
                left = deadline - time.monotonic()
                if images >= self.max_batch or left <= 0 or self._stopping:
                    break
                self._cv.wait(left)
            self.metrics.queue_depth.set(len(self._jobs))
        return [job for job in batch if job.future.set_running_or_notify_cancel()]

    def _run(self, batch: list[Job]) -> None:
        self.metrics.batch_size.observe(len(batch))
        items = [(job, wf) for job in batch for wf in job.workflows]
        outcomes: list[Generation | BaseException] = []
        bank = self.pipeline.loras
        try:
            switched = bank.hold(items[0][1]) if bank is not None else None
        except Exception as exc:  # every job of the batch gets the error; the worker goes on
            for job in batch:
                job.future.set_exception(exc)
            return
        if switched is not None:  # the batch's LoRAs, switched in before its first step
            self.metrics.lora_switches.inc()
            self.metrics.lora_switch_seconds.observe(switched)
        start = time.perf_counter()
        for i in range(0, len(items), self.max_batch):
            chunk = items[i : i + self.max_batch]
            live = [k for k, (job, _) in enumerate(chunk) if job.reason is None]
            results, rows = run_batch(
                self.pipeline,
                [chunk[k][1] for k in live],
                [lambda *_, job=chunk[k][0]: job.check() for k in live],
                [chunk[k][0].images for k in live],
            )
            self.engine_batches += rows
            ran = dict(zip(live, results, strict=True))
            for k, (job, _) in enumerate(chunk):
                dropped = Cancelled(f"the request was dropped ({job.reason})")
                outcomes.append(ran.get(k, dropped))
        seconds = (time.perf_counter() - start) / max(1, len(items))
        self._seconds_per_image = 0.8 * self._seconds_per_image + 0.2 * seconds
        at = 0
        for job in batch:
            mine = outcomes[at : at + len(job.workflows)]
            at += len(job.workflows)
            failed = next((o for o in mine if isinstance(o, BaseException)), None)
            if failed is not None:
                job.future.set_exception(failed)
                continue
            generations = [o for o in mine if isinstance(o, Generation)]
            job.future.set_result(self._result(job, generations))

    def _result(self, job: Job, generations: list[Generation]) -> Result:
        images: list[Image] = []
        timings: dict[str, float] = {}
        for wf, generation in zip(job.workflows, generations, strict=True):
            self._account(wf, generation)
            images += self._images(wf, generation, job.previews)
            for part, value in generation.seconds.items():
                timings[part] = round(timings.get(part, 0.0) + value, 4)
        return Result(images, timings)

    def _account(self, wf: Workflow, generation: Generation) -> None:
        m = self.metrics
        for part, value in generation.seconds.items():
            m.stage_seconds.labels(stage=part).observe(value)
        m.images.inc()
        if generation.cache is not None:
            prompts = 1 + any(not math.isclose(s.cfg, 1.0) for s in wf.stages)
            m.prompt_cache_hits.inc(prompts - generation.cache.caption_path_calls)
            m.easycache_skips.inc(generation.cache.dit_calls_skipped)
        m.sample_gpu_memory()

    def _images(self, wf: Workflow, generation: Generation, previews: bool) -> list[Image]:
        metadata = png_metadata(wf, self.pipeline.engines.backend)
        seed = wf.stages[0].seed
        out = [
            Image(png_bytes(report.preview, metadata), report.name, "preview", seed)
            for report in generation.stages
            if previews and report.preview is not None
        ]
        out.append(
            Image(
                png_bytes(generation.image, metadata), wf.stages[-1].name or "final", "final", seed
            )
        )
        return out
