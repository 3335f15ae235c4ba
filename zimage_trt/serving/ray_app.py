"""Scale-out on Ray Serve: the single-process server's FastAPI app — routes, gate (auth, 413,
request counter), worker with its bounded queue and micro-batching — built inside every replica,
one replica per GPU, Ray's proxy routing requests among them and its autoscaler adding replicas
when requests wait. Nothing here is cluster code of our own: Ray places, routes, restarts and
scales.

``/metrics`` answers for the whole application: every replica posts its Prometheus text to one
small named actor (the board) each second and when asked, and the replica that answers sums them
(counters, histograms and gauges alike; a replica's numbers are at most a second old, a stopped
replica's are dropped). Ray's own metrics (``ray_serve_*``) stay on Ray's metrics port.

``application(source, settings, …)`` is what ``zimage-trt serve --ray`` runs, and what
``serve run zimage_trt.cli.serve:ray_app model=tiny replicas=2`` builds from the same flags.
"""

from __future__ import annotations

import sys
import threading
import uuid
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from zimage_trt.serving.app import ServeSettings, Service, Source, create_app

APP_NAME = "zimage-trt"
BOARD = "zimage-trt-metrics"
NAMESPACE = "zimage-trt"
PUSH_SECONDS = 1.0


class MetricsBoard:
    """The latest Prometheus text of every replica (a Ray actor: ``ray.remote`` applies at use)."""

    def __init__(self) -> None:
        self.texts: dict[str, bytes] = {}

    def put(self, replica: str, text: bytes) -> None:
        self.texts[replica] = text

    def drop(self, replica: str) -> None:
        self.texts.pop(replica, None)

    def all(self) -> list[bytes]:
        return list(self.texts.values())


def _board() -> Any:
    import ray

    actor = ray.remote(num_cpus=0)(MetricsBoard)
    return actor.options(
        name=BOARD, namespace=NAMESPACE, get_if_exists=True, lifetime="detached"
    ).remote()


def merged_exposition(texts: list[bytes]) -> bytes:
    """Prometheus texts summed sample by sample (same name and labels), in first-seen order."""
    families: dict[str, Metric] = {}
    values: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = {}
    for text in texts:
        for family in text_string_to_metric_families(text.decode()):
            families.setdefault(
                family.name, Metric(family.name, family.documentation, family.type, family.unit)
            )
            for sample in family.samples:
                key = (family.name, sample.name, tuple(sample.labels.items()))
                values[key] = values.get(key, 0.0) + sample.value
    for (family_name, name, labels), value in values.items():
        families[family_name].add_sample(name, dict(labels), value)

    class Collected:
        def collect(self) -> list[Metric]:
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collected())
    return generate_latest(registry)


class Replica:
    """One Ray Serve replica: the server's app, its own pipeline and worker."""

    def __init__(self, source: Source, settings: ServeSettings) -> None:
        self.source, self.settings = source, settings
        self.id = uuid.uuid4().hex[:12]
        self.service: Service | None = None

    def __serve_build_asgi_app__(self) -> Any:
        def log(message: str) -> None:
            print(f"[replica {self.id}] {message}", file=sys.stderr, flush=True)

        service = Service(lambda: self.source.open(log), self.settings)
        board = _board()
        own = service.metrics.exposition

        def everyone() -> bytes:
            import ray

            ray.get(board.put.remote(self.id, own()))
            return merged_exposition(ray.get(board.all.remote()))

        def push() -> None:
            while not service.stopped.wait(PUSH_SECONDS):  # until the app shuts down
                board.put.remote(self.id, own())
            board.drop.remote(self.id)

        service.exposition = everyone
        threading.Thread(target=push, name="zimage-trt-metrics", daemon=True).start()
        self.service = service
        return create_app(service)

    def check_health(self) -> None:
        """Ray restarts a replica whose engines failed to load."""
        if self.service is not None and self.service.failure is not None:
            raise RuntimeError(self.service.failure)


def application(
    source: Source, settings: ServeSettings, replicas: int = 1, max_replicas: int | None = None
) -> Any:
    """The Ray Serve application: ``replicas`` replicas (one GPU each where Ray sees GPUs), or,
    with ``max_replicas`` above it, as many between the two as keep about ``max_batch`` requests
    in flight per replica (Ray's autoscaler on queue depth)."""
    import ray
    from ray import serve

    gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    options: dict[str, Any] = {"num_gpus": 1} if gpus else {"num_cpus": 1}
    scaling: dict[str, Any] = {"num_replicas": replicas}
    if max_replicas is not None and max_replicas > replicas:
        scaling = {
            "autoscaling_config": {
                "min_replicas": replicas,
                "max_replicas": max_replicas,
                "target_ongoing_requests": settings.max_batch,
            }
        }
    deployment = serve.deployment(
        name="zimage-trt",
        ray_actor_options=options,
        # our own queue answers 429 past --max-queue; Ray only holds what it could not place
        max_ongoing_requests=settings.max_queue + settings.max_batch + 8,
        health_check_period_s=10,
        graceful_shutdown_timeout_s=settings.request_timeout,
        **scaling,
    )(serve.ingress()(Replica))
    return deployment.bind(source, settings)
