"""``zimage-trt serve``: the engines behind an HTTP API (``zimage_trt.serving``) on uvicorn;
SIGTERM drains and exits 0 (``serving.server``)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from zimage_trt.cli.common import RAW, examples, stderr_log
from zimage_trt.errors import EXIT_INTERRUPTED, InputError

API_KEY_VARIABLE = "ZIMAGE_TRT_API_KEY"
BOUNDS = {  # flag → (smallest, largest)
    "port": (0, 65535),
    "max_queue": (1, 100_000),
    "max_batch": (1, 64),
    "batch_wait_ms": (0, 10_000),
    "request_timeout": (1, 86_400),
    "max_n": (1, 100),
    "max_body": (1024, 1 << 30),
}


def add_serve_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        formatter_class=RAW,
        help="serve the engines over HTTP (OpenAI Images API, metrics, health)",
        description="Load one engine set once and serve it over HTTP: POST "
        "/v1/images/generations (OpenAI's Images API, plus seed, negative_prompt, workflow), POST "
        "/v1/workflows/run (a whole workflow, every image it saves), GET /v1/models, GET /healthz "
        "(503 until the engines are loaded), GET /metrics (Prometheus). Requests wait in a "
        f"bounded queue (429 with Retry-After when full). Set {API_KEY_VARIABLE} to require "
        "'Authorization: Bearer KEY' on every route but /healthz. SIGTERM drains: no new "
        "connections, the requests in flight finish, exit status 0.",
        epilog=examples(
            "zimage-trt serve --model tiny --port 8000   # smoke server: its images are noise",
            f"{API_KEY_VARIABLE}=s3cret zimage-trt serve --engines engines-trt/ --host 0.0.0.0",
            "curl -s localhost:8000/v1/images/generations -H 'Content-Type: application/json' "
            '-d \'{"prompt": "a red fox in snow", "seed": 7}\'',
        ),
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--model",
        metavar="PATH|REPO|tiny",
        help="serve the torch backend on this model (folder, repo id or tiny)",
    )
    source.add_argument("--engines", metavar="DIR", help="serve a built engine folder")
    p.add_argument(
        "-w",
        "--workflow",
        default=None,
        help="the served workflow: a preset name or YAML file (default: the engine "
        "folder's, else zimage-turbo)",
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)",
    )
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0: any free)")
    p.add_argument(
        "--max-queue",
        type=int,
        default=32,
        metavar="N",
        help="requests that may wait for the worker; past it, 429 (default 32)",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=4,
        metavar="N",
        help="images of one shape (workflow and size) sampled side by side, their denoiser calls "
        "batched (default 4; 1: one at a time)",
    )
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        default=20.0,
        metavar="MS",
        help="how long a request waits for others of its shape to join its batch (default 20)",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=300.0,
        metavar="S",
        help="seconds a request may take, queue included; past it, 504 and the "
        "work is dropped at its next step (default 300)",
    )
    p.add_argument(
        "--max-n",
        type=int,
        default=10,
        metavar="N",
        help="images one request may ask for (n; default 10, as OpenAI's limit)",
    )
    p.add_argument(
        "--max-body",
        type=int,
        default=1 << 20,
        metavar="BYTES",
        help="largest request body; past it, 413 (default 1048576)",
    )
    p.add_argument(
        "--model-id",
        default="z-image-turbo",
        help="the model id /v1/models lists and requests may name",
    )
    p.set_defaults(func=cmd_serve)


def check_bounds(args: argparse.Namespace) -> None:
    for name, (low, high) in BOUNDS.items():
        value = getattr(args, name)
        if not low <= value <= high:  # NaN fails too
            flag = "--" + name.replace("_", "-")
            raise InputError(f"{flag} {value!r} is outside {low} … {high}")


def cmd_serve(args: argparse.Namespace) -> int:
    check_bounds(args)
    from zimage_trt.runtime.pipeline import Pipeline
    from zimage_trt.serving.app import ServeSettings, Service, create_app
    from zimage_trt.serving.server import DrainingServer

    log = stderr_log(False)
    key = os.environ.get(API_KEY_VARIABLE) or None
    settings = ServeSettings(
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        request_timeout=args.request_timeout,
        max_n=args.max_n,
        max_body=args.max_body,
        api_key=key,
        model_id=args.model_id,
    )
    if args.workflow is not None or args.engines is None:  # a bad workflow: refused before binding
        from zimage_trt.runtime.loading import open_workflow

        open_workflow(args.workflow, args.engines)

    def load() -> Pipeline:
        pipeline = Pipeline.open(
            model=args.model,
            engines=args.engines,
            workflow=args.workflow,
            device=args.device,
            log=log,
        )
        log(f"zimage-trt serve: ready ({pipeline.engines.backend} on {pipeline.engines.device})")
        return pipeline

    log(
        "zimage-trt serve: "
        + (
            f"API key required ({API_KEY_VARIABLE})"
            if key
            else f"no API key: every route is open ({API_KEY_VARIABLE} is unset)"
        )
    )
    server = DrainingServer(create_app(Service(load, settings)), args.host, args.port, log)
    server.run()
    return EXIT_INTERRUPTED if server.interrupted else 0
