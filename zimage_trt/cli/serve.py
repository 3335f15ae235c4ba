"""``zimage-trt serve``: the engines behind an HTTP API (``zimage_trt.serving``) on uvicorn, or
with ``--ray`` on Ray Serve replicas (``serving.ray_app``); SIGTERM drains and exits 0.

``ray_app`` builds the same Ray application from ``serve run``'s ``key=value`` arguments:
``serve run zimage_trt.cli.serve:ray_app model=tiny replicas=2 max_batch=4``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import threading
from typing import Any, NoReturn

from zimage_trt.cli.common import RAW, examples, parse_bytes, stderr_log
from zimage_trt.errors import EXIT_INTERRUPTED, InputError, MissingLibraryError

API_KEY_VARIABLE = "ZIMAGE_TRT_API_KEY"
BOUNDS = {  # flag → (smallest, largest)
    "port": (0, 65535),
    "max_queue": (1, 100_000),
    "max_batch": (1, 64),
    "batch_wait_ms": (0, 10_000),
    "request_timeout": (1, 86_400),
    "max_n": (1, 100),
    "max_body": (1024, 1 << 30),
    "replicas": (1, 1024),
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
    p.add_argument(
        "--model",
        metavar="PATH|REPO|tiny",
        help="serve the torch backend on this model (folder, repo id or tiny); with --engines, "
        "the base DiT that LoRA switches start from (default: the workflow's)",
    )
    p.add_argument("--engines", metavar="DIR", help="serve a built engine folder")
    p.add_argument(
        "-w",
        "--workflow",
        default=None,
        help="the served workflow: a preset name or YAML file (default: the engine "
        "folder's, else zimage-turbo)",
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1")
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME=PATH[:STRENGTH]",
        help='register a LoRA that requests may name ("lora": [{"name": NAME}]); it is '
        "switched into the DiT engines between batches (torch backends, ONNX Runtime folders, "
        "TensorRT folders built with --refittable). Repeatable; strength default 1",
    )
    p.add_argument(
        "--max-vram",
        default=None,
        metavar="SIZE",
        help="a memory budget (8G, 12G …; RAM without a GPU) for --model: its plan, made for "
        "--max-batch images sampled together, places the networks and tiles the decode; a "
        "request that would pass it is refused with 400",
    )
    p.add_argument(
        "--weight-streaming-budget",
        default=None,
        metavar="PCT|auto",
        help="for --engines built --weight-streaming: the share of each streaming engine's "
        "weights kept on the GPU (0–100 %%), or auto",
    )
    p.add_argument(
        "--vae-tiles",
        default=None,
        metavar="TILE[:OVERLAP]",
        help="decode in tiles as ComfyUI's VAEDecodeTiled (pixels, e.g. 512:64): less memory "
        "for the decoder (an engine folder built --vae-tiles decodes in its own by default)",
    )
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
    ray = p.add_argument_group(
        "scale-out (Ray Serve; pip install 'zimage-trt[ray]')",
        "The same API in every replica, one replica per GPU; Ray routes requests among them. "
        "Starts a local Ray cluster, or joins the one RAY_ADDRESS names.",
    )
    ray.add_argument("--ray", action="store_true", help="serve on Ray Serve replicas")
    ray.add_argument(
        "--replicas",
        type=int,
        default=1,
        metavar="N",
        help="replicas to start (each loads the engines once; default 1)",
    )
    ray.add_argument(
        "--max-replicas",
        type=int,
        default=None,
        metavar="M",
        help="let Ray add replicas up to M while requests wait (about --max-batch in flight "
        "per replica), and remove them when idle (default: exactly --replicas)",
    )
    p.set_defaults(func=cmd_serve)


def check_bounds(args: argparse.Namespace) -> None:
    if args.model is None and args.engines is None:
        raise InputError("serve needs --model or --engines")
    if args.model is not None and args.engines is not None and not args.lora:
        raise InputError(
            "--model with --engines names the base DiT for LoRA switches (--lora); without "
            "--lora pass one of them"
        )
    for name, (low, high) in BOUNDS.items():
        value = getattr(args, name)
        if not low <= value <= high:  # NaN fails too
            flag = "--" + name.replace("_", "-")
            raise InputError(f"{flag} {value!r} is outside {low} … {high}")
    if args.max_replicas is not None and not args.replicas <= args.max_replicas <= 1024:
        raise InputError(
            f"--max-replicas {args.max_replicas} is outside --replicas ({args.replicas}) … 1024"
        )
    if not args.ray and (args.replicas != 1 or args.max_replicas is not None):
        raise InputError("--replicas and --max-replicas need --ray")


def settings_from(args: argparse.Namespace) -> Any:
    from zimage_trt.serving.app import ServeSettings

    return ServeSettings(
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        request_timeout=args.request_timeout,
        max_n=args.max_n,
        max_body=args.max_body,
        api_key=os.environ.get(API_KEY_VARIABLE) or None,
        model_id=args.model_id,
    )


def source_from(args: argparse.Namespace) -> Any:
    """What the flags serve; the --lora files are checked here, before anything loads."""
    from zimage_trt.runtime.loras import RegisteredLora, check_names
    from zimage_trt.serving.app import Source

    loras = tuple(RegisteredLora.parse(spec) for spec in args.lora)
    check_names(loras)
    max_vram = parse_bytes(args.max_vram) if args.max_vram else None
    weight_budget = None
    if args.weight_streaming_budget is not None:
        from zimage_trt.engines.tensorrt_engines import WeightBudget

        weight_budget = WeightBudget.parse(args.weight_streaming_budget)
    tiles = None
    if args.vae_tiles is not None:
        from zimage_trt.runtime.vae_tiles import VaeTiles

        tiles = VaeTiles.parse(args.vae_tiles)
    return Source(args.model, args.engines, args.workflow, args.device, loras, max_vram,
                  args.max_batch, weight_budget, tiles)  # fmt: skip


def ray_app(args: dict[str, str]) -> Any:
    """The Ray Serve application for ``serve run zimage_trt.cli.serve:ray_app KEY=VALUE …``:
    the keys are this command's flags without dashes (``model=tiny``, ``max_batch=4``,
    ``replicas=2``; ``lora=NAME=PATH[:S],…`` for several LoRAs), checked as the flags are."""

    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:
            raise InputError(f"ray_app {args}: {message}")

    parser = Parser(prog="zimage_trt.cli.serve:ray_app")
    add_serve_parser(parser.add_subparsers())
    argv = ["serve", "--ray"]
    for key, value in args.items():
        values = str(value).split(",") if key == "lora" else [str(value)]
        for one in values:
            argv += [f"--{key.replace('_', '-')}", one]
    parsed = parser.parse_args(argv)
    check_bounds(parsed)
    from zimage_trt.serving.ray_app import application

    return application(source_from(parsed), settings_from(parsed), parsed.replicas,
                       parsed.max_replicas)  # fmt: skip


def cmd_serve(args: argparse.Namespace) -> int:
    check_bounds(args)
    from zimage_trt.serving.app import Service, create_app
    from zimage_trt.serving.server import DrainingServer

    log = stderr_log(False)
    settings = settings_from(args)
    if args.workflow is not None or args.engines is None:  # a bad workflow: refused before binding
        from zimage_trt.runtime.loading import open_workflow

        open_workflow(args.workflow, args.engines)
    source = source_from(args)
    log(
        "zimage-trt serve: "
        + (
            f"API key required ({API_KEY_VARIABLE})"
            if settings.api_key
            else f"no API key: every route is open ({API_KEY_VARIABLE} is unset)"
        )
    )
    if args.ray:
        return _serve_on_ray(args, source, settings, log)
    server = DrainingServer(create_app(Service(lambda: source.open(log), settings)), args.host,
                            args.port, log)  # fmt: skip
    server.run()
    return EXIT_INTERRUPTED if server.interrupted else 0


def _serve_on_ray(args: argparse.Namespace, source: Any, settings: Any, log: Any) -> int:
    """Start (or join) Ray, run the application, wait for SIGTERM or Ctrl-C, then shut Serve
    down — its replicas finish the requests in flight — and exit 0 (130 after Ctrl-C)."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise MissingLibraryError(
            "--ray needs Ray Serve, which is not installed: pip install 'zimage-trt[ray]'"
        ) from None
    from zimage_trt.serving.ray_app import APP_NAME, application

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    port = args.port or _free_port(args.host)
    stop = threading.Event()
    caught: list[int] = []

    def on_signal(sig: int, frame: object) -> None:
        caught.append(sig)
        stop.set()

    previous: dict[int, Any] = {}
    try:
        ray.init(include_dashboard=False, logging_level=logging.WARNING)
        # after ray.init, which installs its own SIGTERM handler (it aborts the process)
        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        serve.start(http_options={"host": args.host, "port": port})
        how = (f"{args.replicas}…{args.max_replicas} replicas (autoscaled)"
               if args.max_replicas and args.max_replicas > args.replicas
               else f"{args.replicas} replica(s)")  # fmt: skip
        log(f"zimage-trt serve: starting Ray Serve, {how}")
        serve.run(application(source, settings, args.replicas, args.max_replicas),
                  name=APP_NAME, route_prefix="/", blocking=False)  # fmt: skip
        log(f"zimage-trt serve: listening on http://{args.host}:{port} (Ray Serve)")
        stop.wait()
        what = "interrupted" if caught[0] == signal.SIGINT else "SIGTERM"
        log(f"zimage-trt serve: {what}: draining the replicas (the requests in flight finish)")
        serve.delete(APP_NAME)  # replicas take no new requests and finish those in flight
        serve.shutdown()
    finally:
        ray.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log("zimage-trt serve: stopped")
    return EXIT_INTERRUPTED if caught and caught[0] == signal.SIGINT else 0


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
