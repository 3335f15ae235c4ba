"""The server's Prometheus metrics, in a registry of its own (one per app, so that tests and
several apps in one process do not share counters)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self) -> None:
        disable_created_metrics()  # no *_created series: one number per counter
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "zimage_trt_requests", "HTTP requests answered", ["endpoint", "status"], registry=r
        )
        self.queue_depth = Gauge(
            "zimage_trt_queue_depth", "requests waiting for the worker", registry=r
        )
        self.batch_size = Histogram(
            "zimage_trt_batch_size",
            "requests per batch the worker ran",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16),
            registry=r,
        )
        self.stage_seconds = Histogram(
            "zimage_trt_stage_seconds",
            "seconds per workflow part",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.images = Counter("zimage_trt_images", "final images made", registry=r)
        self.prompt_cache_hits = Counter(
            "zimage_trt_prompt_cache_hits", "prompts served from the prompt cache", registry=r
        )
        self.easycache_skips = Counter(
            "zimage_trt_easycache_skips", "DiT calls EasyCache skipped", registry=r
        )
        self.lora_switches = Counter(
            "zimage_trt_lora_switches", "LoRA sets switched into the DiT engines", registry=r
        )
        self.lora_switch_seconds = Histogram(
            "zimage_trt_lora_switch_seconds",
            "seconds per LoRA switch (fuse and refit)",
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.gpu_memory = Gauge(
            "zimage_trt_gpu_memory_bytes", "CUDA memory allocated by torch", ["kind"], registry=r
        )

    def sample_gpu_memory(self) -> None:
        """GPU memory after a job, when there is a GPU."""
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.gpu_memory.labels(kind="allocated").set(torch.cuda.memory_allocated())
            self.gpu_memory.labels(kind="reserved").set(torch.cuda.memory_reserved())

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
