"""The HTTP server: thin FastAPI routes over one ``Service`` (the pipeline, loaded once, and the
worker that owns it). OpenAI's Images API and error shape where they exist, so that existing
clients work unchanged; a native workflow route; health, models and Prometheus metrics.

Every request passes one gate first (``Gate``, plain ASGI): the API key (constant-time, 401 on
every route but ``/healthz``), the body size (413 past ``max_body``, whether announced or
streamed) and the request counter. Bad input is a 4xx naming the bad value and the allowed
range — never a traceback and never a 5xx.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import yaml
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from PIL.Image import Image as PILImage
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from zimage_trt.engines.manifest import ProfileError, select_profile
from zimage_trt.errors import InputError
from zimage_trt.runtime.images import read_image
from zimage_trt.runtime.loading import lora_search
from zimage_trt.runtime.loras import LoraBank, RegisteredLora
from zimage_trt.runtime.pipeline import Pipeline
from zimage_trt.runtime.preflight import engine_calls, prompt_tokens
from zimage_trt.runtime.requests import GenerateRequest, apply_overrides
from zimage_trt.runtime.vae_tiles import VaeTiles
from zimage_trt.sampling.latents import VAE_SCALE
from zimage_trt.sampling.noise import SEED_MAX
from zimage_trt.serving.metrics import Metrics
from zimage_trt.serving.schemas import (
    ErrorBody,
    Health,
    ImageData,
    ImagesRequest,
    ImagesResponse,
    LoraCard,
    LoraList,
    ModelCard,
    ModelList,
    StageImage,
    WorkflowRunRequest,
    WorkflowRunResponse,
)
from zimage_trt.serving.sizes import final_size, nearest_sizes, parse_size, profile_sizes, sized
from zimage_trt.serving.worker import Cancelled, Job, QueueFull, Result, Worker
from zimage_trt.workflow import Workflow, preset_names
from zimage_trt.workflow.comfy_import import import_graph
from zimage_trt.workflow.spec import LatentSource

if TYPE_CHECKING:
    from zimage_trt.engines.tensorrt_engines import WeightBudget

ASGIApp = Callable[[MutableMapping[str, Any], Any, Any], Awaitable[None]]
OPEN_PATHS = ("/healthz",)
ROUTES = (
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/workflows/run",
    "/v1/models",
    "/v1/loras",
    "/healthz",
    "/metrics",
    "/openapi.json",
    "/docs",
)


@dataclass
class ServeSettings:
    """What ``zimage-trt serve`` was started with (its flags)."""

    max_queue: int = 32
    max_batch: int = 4
    batch_wait_ms: float = 20.0
    request_timeout: float = 300.0
    max_n: int = 10
    max_body: int = 1 << 20
    api_key: str | None = None
    url_ttl: float = 600.0  # seconds a response_format=url image stays fetchable
    model_id: str = "z-image-turbo"


@dataclass(frozen=True)
class Source:
    """What the server serves, from its command line: a model or an engine folder, the
    workflow, the device."""

    model: str | None = None
    engines: str | None = None
    workflow: str | None = None
    device: str = "auto"
    loras: tuple[RegisteredLora, ...] = ()  # switched per request (serve --lora)
    max_vram: int | None = None  # a memory budget in bytes (serve --max-vram)
    max_batch: int = 1  # runs sampled together, which the budget's plan allows for
    weight_budget: WeightBudget | None = None  # serve --weight-streaming-budget
    vae_tiles: VaeTiles | None = None  # serve --vae-tiles

    def open(self, log: Callable[[str], None]) -> Pipeline:
        pipeline = Pipeline.open(model=self.model, engines=self.engines, workflow=self.workflow,
                                 device=self.device, max_vram=self.max_vram,
                                 side_by_side=self.max_batch, weight_budget=self.weight_budget,
                                 vae_tiles=self.vae_tiles, log=log)  # fmt: skip
        if self.loras:
            LoraBank.attach(pipeline, self.loras, folder=self.engines, model=self.model,
                            search=lora_search(self.workflow), log=log)  # fmt: skip
        log(f"zimage-trt serve: ready ({pipeline.engines.backend} on {pipeline.engines.device})")
        return pipeline


class ImageStore:
    """PNGs for ``response_format: url``, kept ``ttl`` seconds (at most ``limit`` of them)."""

    def __init__(self, ttl: float, limit: int = 256) -> None:
        self.ttl, self.limit = ttl, limit
        self._items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, png: bytes) -> str:
        key = uuid.uuid4().hex
        with self._lock:
            self._expire()
            self._items[key] = (time.monotonic() + self.ttl, png)
            while len(self._items) > self.limit:
                self._items.popitem(last=False)
        return key

    def get(self, key: str) -> bytes | None:
        with self._lock:
            self._expire()
            item = self._items.get(key)
        return None if item is None else item[1]

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, (until, _) in self._items.items() if until < now]:
            del self._items[key]


class Service:
    """The pipeline (loaded once, on a thread, so that /healthz answers while it loads), the
    worker that owns it, the metrics and the image store."""

    def __init__(self, load: Callable[[], Pipeline], settings: ServeSettings) -> None:
        self.load = load
        self.settings = settings
        self.metrics = Metrics()
        self.exposition: Callable[[], bytes] = self.metrics.exposition  # what /metrics says
        self.images = ImageStore(settings.url_ttl)
        self.pipeline: Pipeline | None = None
        self.worker: Worker | None = None
        self.failure: str | None = None
        self.loaded = threading.Event()
        self.stopped = threading.Event()  # set when the app shuts down
        self.created = int(time.time())

    def start(self) -> None:
        threading.Thread(target=self._load, name="zimage-trt-load", daemon=True).start()

    def _load(self) -> None:
        try:
            pipeline = self.load()
            s = self.settings
            worker = Worker(pipeline, self.metrics, s.max_queue, s.max_batch, s.batch_wait_ms / 1e3)
            worker.start()
            self.pipeline, self.worker = pipeline, worker
        except Exception as exc:  # said on /healthz and in the log; the server stays up
            self.failure = f"{type(exc).__name__}: {exc}"
        finally:
            self.loaded.set()

    def stop(self) -> None:
        self.stopped.set()
        if self.worker is not None:
            self.worker.stop()

    def ready(self) -> tuple[Pipeline, Worker]:
        if self.pipeline is None or self.worker is None:
            raise HTTPException(503, self.failure or "the engines are still loading; retry soon")
        return self.pipeline, self.worker


def error(
    status: int,
    message: str,
    *,
    kind: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


_CODES = {
    401: "invalid_api_key",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    503: "loading",
}


class Gate:
    """Auth, body size and the request counter, before any route runs (plain ASGI, so that
    streamed bodies are counted too and disconnects still reach the route)."""

    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        status = [500]

        async def counted_send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, counted_send)
                return
            await self.app(scope, self._limited(receive), counted_send)
        finally:
            self.service.metrics.requests.labels(
                endpoint=_endpoint(path), status=str(status[0])
            ).inc()

    def _refusal(self, scope: MutableMapping[str, Any]) -> JSONResponse | None:
        settings = self.service.settings
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if settings.api_key is not None and scope["path"] not in OPEN_PATHS:
            given = headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            ok = scheme.lower() == "bearer" and hmac.compare_digest(
                token.strip().encode(), settings.api_key.encode()
            )
            if not ok:
                return error(
                    401,
                    "a valid API key is needed: send 'Authorization: Bearer KEY' "
                    "(the server's ZIMAGE_TRT_API_KEY)",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > settings.max_body):
            return error(
                413,
                f"the body is {length} bytes; this server takes at most "
                f"{settings.max_body} (--max-body)",
                code="body_too_large",
            )
        return None

    def _limited(self, receive: Any) -> Any:
        limit = self.service.settings.max_body
        received = [0]

        async def limited() -> MutableMapping[str, Any]:
            message = await receive()
            if message["type"] == "http.request":
                received[0] += len(message.get("body", b""))
                if received[0] > limit:
                    raise HTTPException(
                        413, f"the body is over {limit} bytes, this server's --max-body"
                    )
            return message

        return limited


def _endpoint(path: str) -> str:
    if path.startswith("/v1/images/") and path.endswith(".png"):
        return "/v1/images/{id}.png"
    return path if path in ROUTES else "other"


def create_app(service: Service) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        service.start()
        yield
        await asyncio.to_thread(service.stop)

    app = FastAPI(
        title="zimage-trt",
        version="1",
        lifespan=lifespan,
        description="Z-Image-Turbo behind OpenAI's Images API",
        responses={
            400: {"model": ErrorBody},
            401: {"model": ErrorBody},
            413: {"model": ErrorBody},
            429: {"model": ErrorBody},
            503: {"model": ErrorBody},
            504: {"model": ErrorBody},
        },
    )
    _handlers(app)
    settings = service.settings

    @app.get("/healthz", response_model=Health, responses={503: {"model": Health}})
    def healthz() -> JSONResponse:
        if service.failure is not None:
            return JSONResponse(
                Health(status="failed", detail=service.failure).model_dump(exclude_none=True),
                status_code=503,
            )
        if service.pipeline is None:
            return JSONResponse(
                Health(status="loading").model_dump(exclude_none=True), status_code=503
            )
        p = service.pipeline
        wf = p.workflow.name if p.workflow is not None else None
        return JSONResponse(
            Health(
                status="ok", backend=p.engines.backend, device=str(p.engines.device), workflow=wf
            ).model_dump(exclude_none=True)
        )

    @app.get("/v1/models", response_model=ModelList)
    def models() -> ModelList:
        return ModelList(data=[ModelCard(id=settings.model_id, created=service.created)])

    @app.get("/v1/loras", response_model=LoraList)
    def loras() -> LoraList:
        """The LoRAs requests may name (``serve --lora``)."""
        pipeline, _ = service.ready()
        bank = pipeline.loras
        if bank is None:
            return LoraList(data=[], held=[])
        cards = [LoraCard(name=r.name, strength=r.strength, sha256=r.sha256)
                 for r in bank.registered.values()]  # fmt: skip
        return LoraList(data=cards, held=bank.describe_held())

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> Response:
        return Response(service.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get(
        "/v1/images/{key}.png",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}, 404: {"model": ErrorBody}},
    )
    def image(key: str) -> Response:
        png = service.images.get(key)
        if png is None:
            raise HTTPException(
                404, f"no image {key!r} here (images are kept {settings.url_ttl:.0f} s)"
            )
        return Response(png, media_type="image/png")

    @app.post(
        "/v1/images/generations", response_model=ImagesResponse, response_model_exclude_none=True
    )
    async def generations(body: ImagesRequest, request: Request) -> ImagesResponse:
        return await _images(service, body, request)

    @app.post(
        "/v1/images/edits",
        response_model=ImagesResponse,
        response_model_exclude_none=True,
        description="OpenAI's image edits (multipart form): the picture, VAE-encoded at the first "
        "stage's size (center-cropped to its aspect), is that stage's starting latent, and "
        "`strength` its denoise; the other fields as for /v1/images/generations",
    )
    async def edits(
        request: Request,
        image: Annotated[UploadFile, File(description="the picture to edit: PNG, JPEG or WebP")],
        prompt: Annotated[str, Form()],
        n: Annotated[int, Form()] = 1,
        size: Annotated[str | None, Form()] = None,
        strength: Annotated[float, Form(gt=0.0, le=1.0, description=STRENGTH)] = 0.75,
        response_format: Annotated[str, Form()] = "b64_json",
        model: Annotated[str | None, Form()] = None,
        seed: Annotated[int | None, Form()] = None,
        negative_prompt: Annotated[str | None, Form()] = None,
        workflow: Annotated[str | None, Form()] = None,
        user: Annotated[str | None, Form()] = None,
        mask: Annotated[UploadFile | None, File(description="not supported: a 400")] = None,
    ) -> ImagesResponse:
        if mask is not None:
            raise _bad("mask is not supported here: the whole picture is edited (strength)", "mask")
        fields = {"prompt": prompt, "n": n, "size": size, "response_format": response_format,
                  "model": model, "seed": seed, "negative_prompt": negative_prompt,
                  "workflow": workflow, "user": user}  # fmt: skip
        try:
            body = ImagesRequest.model_validate({k: v for k, v in fields.items() if v is not None})
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from None
        data = await image.read()
        picture = await asyncio.to_thread(read_image, data, image.filename or "image", "image")
        return await _images(service, body, request, Edit(picture, strength))

    @app.post("/v1/workflows/run", response_model=WorkflowRunResponse)
    async def run_workflow(body: WorkflowRunRequest, request: Request) -> WorkflowRunResponse:
        pipeline, worker = service.ready()
        wf = _posted_workflow(pipeline, body)
        job = Job([wf], previews=True)
        result = await _run(worker, job, request, settings.request_timeout)
        data = [
            StageImage(
                b64_json=base64.b64encode(i.png).decode(),
                stage=i.stage,
                kind="final" if i.kind == "final" else "preview",
            )
            for i in result.images
        ]
        return WorkflowRunResponse(created=int(time.time()), data=data, timings=result.timings)

    app.add_middleware(Gate, service=service)
    return app


@dataclass
class Edit:
    """An edit's picture and strength (the first stage's denoise)."""

    picture: PILImage
    strength: float


UPLOAD = "upload:image"  # how an edit's workflow names its picture (never a file)
STRENGTH = "how much of the picture is redrawn: the first stage's denoise (0 < strength ≤ 1)"


async def _images(
    service: Service, body: ImagesRequest, request: Request, edit: Edit | None = None
) -> ImagesResponse:
    """Generations and edits: the request's workflows (one per image), run, as OpenAI's body."""
    pipeline, worker = service.ready()
    settings = service.settings
    if body.model is not None and body.model != settings.model_id:
        raise _bad(
            f"model {body.model!r} is not served here; this server serves {settings.model_id!r}",
            "model",
        )
    if body.n > settings.max_n:
        raise _bad(f"n {body.n} is outside 1 … {settings.max_n} (--max-n)", "n")
    if body.workflow is not None and body.workflow not in preset_names():
        raise _bad(
            f"workflow {body.workflow!r} is not a preset; choose one of: "
            + ", ".join(preset_names()),
            "workflow",
        )
    first = body.seed if body.seed is not None else secrets.randbelow(SEED_MAX - body.n + 2)
    if first + body.n - 1 > SEED_MAX:
        raise _bad(f"seed {first} + n {body.n} - 1 is past the largest seed {SEED_MAX}", "seed")
    wf = _request_workflow(pipeline, body, first, edit)  # checked once; images differ by seed
    workflows = [wf] + [
        apply_overrides(wf.model_copy(deep=True), seed=first + i) for i in range(1, body.n)
    ]
    job = Job(workflows)
    if edit is not None:
        job.images[UPLOAD] = await asyncio.to_thread(_cropped, edit.picture, wf)  # a copy
    result = await _run(worker, job, request, settings.request_timeout)
    data = []
    for img in result.images:
        if body.response_format == "url":
            url = str(request.url_for("image", key=service.images.put(img.png)))
            data.append(ImageData(url=url, seed=img.seed))
        else:
            data.append(ImageData(b64_json=base64.b64encode(img.png).decode(), seed=img.seed))
    return ImagesResponse(created=int(time.time()), data=data)


def _edited(pipeline: Pipeline, wf: Workflow, strength: float) -> Workflow:
    """``wf`` starting from the uploaded picture: its first stage's latent is the picture,
    VAE-encoded at that stage's size, and its denoise is ``strength``."""
    if pipeline.engines.vae_encoder is None:
        raise _bad(
            f"the served {pipeline.engines.backend} engines have no VAE encoder, which edits "
            "need: build the folder for a workflow whose first stage starts from an image",
            "image",
        )
    out = wf.model_copy(deep=True)
    stage = out.stages[0]
    (h, w) = wf.latent_sizes()[0]
    stage.latent = LatentSource(
        source="image", image=UPLOAD, width=w * VAE_SCALE, height=h * VAE_SCALE
    )
    stage.scheduler.denoise = strength
    return out


def _cropped(picture: PILImage, wf: Workflow) -> PILImage:
    """The picture's center cropped to the first stage's aspect (the pipeline then resizes)."""
    (h, w) = wf.latent_sizes()[0]
    pw, ph = picture.size
    if pw * h > ph * w:  # wider than the stage: trim the sides
        keep = max(1, round(ph * w / h))
        left = (pw - keep) // 2
        return picture.crop((left, 0, left + keep, ph))
    keep = max(1, round(pw * h / w))
    top = (ph - keep) // 2
    return picture.crop((0, top, pw, top + keep))


def _bad(message: str, param: str | None = None) -> HTTPException:
    exc = HTTPException(400, message)
    exc.param = param  # type: ignore[attr-defined]
    return exc


def _request_workflow(
    pipeline: Pipeline, body: ImagesRequest, seed: int, edit: Edit | None = None
) -> Workflow:
    """The workflow of one image: the served (or named preset) workflow with the request's
    prompt, negative prompt, seed and LoRAs (and an edit's picture), sized to ``body.size``,
    checked against the engines."""
    request = GenerateRequest(body.workflow, body.prompt, body.negative_prompt, None, seed)
    wf = request.workflow_for(pipeline.workflow)
    if edit is not None:
        wf = _edited(pipeline, wf, edit.strength)
    if body.lora is not None:
        if pipeline.loras is None:
            raise _bad("this server has no registered LoRAs (serve --lora NAME=PATH)", "lora")
        try:
            wf.models.loras = pipeline.loras.refs([(c.name, c.strength) for c in body.lora])
        except InputError as exc:
            raise _bad(str(exc), "lora") from None
    if body.size is not None:
        try:
            width, height = parse_size(body.size)
        except ValueError as exc:
            raise _bad(str(exc), "size") from None
        wf = sized(wf, width, height)
        try:
            pipeline.check(wf)
        except ProfileError:
            fits = _fits(pipeline, wf)
            shapes = [p.shapes["latents"] for p in pipeline.engines.profiles.get("denoiser", [])]
            near = nearest_sizes(
                width,
                height,
                profile_sizes((s.min, s.max) for s in shapes),
                lambda w, h: fits(sized(wf, w, h)),
            )
            native = "x".join(map(str, final_size(pipeline.workflow or wf)))
            raise _bad(
                f"size {body.size!r} cannot be made by the served engines (built for "
                f"their workflow's profiles, e.g. {native}); nearest sizes that can: "
                + (", ".join(f"{w}x{h}" for w, h in near) or "none"),
                "size",
            ) from None
        return wf
    pipeline.check(wf)
    return wf


def _fits(pipeline: Pipeline, template: Workflow) -> Callable[[Workflow], bool]:
    """Whether a workflow's engine calls lie in the built profiles (the prompts' lengths as in
    ``template``)."""
    tokens = prompt_tokens(template, pipeline.prompts.tokenizer)
    profiles = pipeline.engines.profiles

    def fits(wf: Workflow) -> bool:
        try:
            for engine, shapes in engine_calls(wf, tokens, pipeline.vae_tiles):
                select_profile(engine, profiles[engine], shapes)
        except (ProfileError, KeyError, ValueError):
            return False
        return True

    return fits


def _posted_workflow(pipeline: Pipeline, body: WorkflowRunRequest) -> Workflow:
    """A posted workflow (YAML text, a workflow object or a ComfyUI API graph) with the
    request's prompts and seeds; it must use the served models and name no file here."""
    source = body.workflow
    if isinstance(source, str):
        wf = Workflow.from_yaml(source, source="workflow")
    elif "stages" in source:
        wf = Workflow.from_dict(source, source="workflow")
    else:
        wf = import_graph(source)
    served = pipeline.workflow
    if served is not None and wf.models != served.models:
        mine = json.dumps(served.models.model_dump(mode="json"), ensure_ascii=False)
        raise _bad(
            f"the workflow's models and LoRAs must be the served ones: {mine}", "workflow.models"
        )
    if wf.prompts.negative_file is not None:
        raise _bad(
            "prompts.negative_file names a file on the server; send the text as "
            "prompts.negative or negative_prompt",
            "workflow.prompts.negative_file",
        )
    for i, stage in enumerate(wf.stages):
        if stage.latent.source == "image":
            raise _bad(
                f"stages.{i}.latent names an image file on the server; image inputs are "
                "not taken over HTTP",
                f"workflow.stages.{i}.latent",
            )
    wf = apply_overrides(
        wf, prompt=body.prompt, negative_prompt=body.negative_prompt, seed=body.seed
    )
    pipeline.check(wf)
    return wf


async def _run(worker: Worker, job: Job, request: Request, timeout: float) -> Result:
    """Queue ``job`` and wait for it; drop it when the client leaves or ``timeout`` passes."""
    job.deadline = time.monotonic() + timeout
    worker.submit(job)
    future = asyncio.wrap_future(job.future)
    # a job dropped after its client left ends in Cancelled that nobody awaits: retrieve it
    future.add_done_callback(lambda f: f.cancelled() or f.exception())
    while True:
        done, _ = await asyncio.wait({future}, timeout=0.2)
        if done:
            return future.result()
        if await request.is_disconnected():
            job.cancel("the client disconnected")
            raise Cancelled("the client disconnected")
        if time.monotonic() > job.deadline:
            job.cancel("deadline")
            raise TimeoutError


def _handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problem = exc.errors()[0]
        loc = [str(p) for p in problem.get("loc", ()) if p != "body"]
        param = ".".join(loc) if problem.get("type") != "json_invalid" else ""
        got = problem.get("input")
        shown = "" if problem.get("type") == "missing" else f" (got {_short(got)})"
        where = f"{param}: " if param else ""
        message = problem.get("msg", "invalid request")
        if problem.get("type") == "extra_forbidden":
            message = "is not a field of this request"
        elif problem.get("type") == "json_invalid":
            message, shown = "the body is not valid JSON", ""
        return error(400, f"{where}{message}{shown}", param=param or None, code=problem.get("type"))

    @app.exception_handler(StarletteHTTPException)  # FastAPI's, and the router's 404/405
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "server_error" if exc.status_code >= 500 else "invalid_request_error"
        return error(
            exc.status_code,
            str(exc.detail),
            kind=kind,
            param=getattr(exc, "param", None),
            code=_CODES.get(exc.status_code),
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(QueueFull)
    async def busy(request: Request, exc: QueueFull) -> JSONResponse:
        return error(
            429,
            str(exc),
            kind="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": str(exc.retry_after)},
        )

    @app.exception_handler(TimeoutError)
    async def timeout(request: Request, exc: TimeoutError) -> JSONResponse:
        return error(
            504,
            "the request took longer than this server's --request-timeout; it was dropped",
            kind="server_error",
            code="timeout",
        )

    @app.exception_handler(Cancelled)
    async def cancelled(request: Request, exc: Cancelled) -> JSONResponse:
        if "deadline" in str(exc):
            return await timeout(request, TimeoutError())
        return error(499, str(exc), code="cancelled")  # nobody is there to read it

    @app.exception_handler(ValueError)
    async def bad_value(request: Request, exc: ValueError) -> JSONResponse:
        return error(400, str(exc))

    @app.exception_handler(yaml.YAMLError)
    async def bad_yaml(request: Request, exc: yaml.YAMLError) -> JSONResponse:
        return error(400, f"workflow: not valid YAML ({exc})", param="workflow")

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        return error(
            500,
            f"an internal error ({type(exc).__name__}); the server log has the traceback",
            kind="server_error",
            code="internal",
        )


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
