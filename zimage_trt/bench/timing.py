"""What every measurement shares: sample statistics (median, p90, mean), a timer (CUDA events on a
GPU, ``perf_counter`` on a CPU), the check on warm-up and repeat counts, releasing memory between
runs, and the progress-log callable."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from zimage_trt.errors import InputError

Log = Callable[[str], None]
T = TypeVar("T")


@dataclass(frozen=True)
class Summary:
    median: float
    p90: float
    mean: float
    n: int


def summary(samples: Sequence[float]) -> Summary:
    """Median, p90 (linear interpolation between ranks) and mean of timing samples."""
    values = np.asarray([float(s) for s in samples], dtype=np.float64)
    if values.size == 0:
        raise InputError("summary() needs at least one sample")
    return Summary(
        median=float(np.median(values)),
        p90=float(np.percentile(values, 90)),
        mean=float(values.mean()),
        n=int(values.size),
    )


class Timer:
    """Seconds a callable takes: CUDA events on a CUDA device (the GPU's time, queued work
    included), ``perf_counter`` on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    @property
    def kind(self) -> str:
        return "cuda-events" if self.cuda else "perf_counter"

    def time(self, fn: Callable[[], T]) -> tuple[T, float]:
        if not self.cuda:
            t0 = time.perf_counter()
            out = fn()
            return out, time.perf_counter() - t0
        torch.cuda.synchronize(self.device)  # earlier queued work is not this call's
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return out, start.elapsed_time(end) / 1e3


def check_count(name: str, value: int, minimum: int) -> None:
    """Reject a warm-up, iteration or repeat count that is not an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")


def free_memory(device: torch.device) -> None:
    """Release what the last pipeline held, so that the next one is measured on its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
