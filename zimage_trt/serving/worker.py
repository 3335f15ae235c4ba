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
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from zimage_trt.errors import ZimageError
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


@dataclass
class Job:
    workflows: list[Workflow]
    previews: bool = False  # /v1/workflows/run: every image the workflow saves, not only finals
    deadline: float | None = None  # time.monotonic() after which it is dropped
    future: Future[Result] = field(default_factory=Future)
    reason: str | None = None  # why it was cancelled
    created: float = field(default_factory=time.monotonic)

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
    """Runs jobs on ``pipeline`` one at a time, on its own thread (``start``/``stop``)."""

    def __init__(self, pipeline: Pipeline, metrics: Metrics, max_queue: int = 32) -> None:
        self.pipeline = pipeline
        self.metrics = metrics
        self.max_queue = max_queue
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self._thread: threading.Thread | None = None
        self._seconds_per_image = 1.0  # running mean, for Retry-After
        self.busy = False

    # -- the caller's side ---------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        with self._lock:
            if self._waiting >= self.max_queue:
                images = sum(len(j.workflows) for j in list(self._queue.queue) if j is not None)
                wait = max(1, round((images + 1) * self._seconds_per_image))
                raise QueueFull(self._waiting, wait)
            self._waiting += 1
            self.metrics.queue_depth.set(self._waiting)
        self._queue.put(job)
        return job

    @property
    def depth(self) -> int:
        return self._waiting

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="zimage-trt-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the jobs already queued, then end the thread."""
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the worker's side ---------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                self._waiting -= 1
                self.metrics.queue_depth.set(self._waiting)
            if not job.future.set_running_or_notify_cancel():
                continue
            self.busy = True
            try:
                job.future.set_result(self._run(job))
            except BaseException as exc:  # delivered to the request that asked
                job.future.set_exception(exc)
            finally:
                self.busy = False

    def _run(self, job: Job) -> Result:
        job.check()
        self.metrics.batch_size.observe(1)
        images: list[Image] = []
        timings: dict[str, float] = {}
        for wf in job.workflows:
            start = time.perf_counter()
            generation = self.pipeline.run(wf, progress=lambda *_: job.check())
            seconds = time.perf_counter() - start
            self._seconds_per_image = 0.8 * self._seconds_per_image + 0.2 * seconds
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
