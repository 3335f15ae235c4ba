"""``zimage-trt serve`` over real HTTP on loopback (issue 14): the tiny model behind uvicorn on a
thread, reached with httpx, the official ``openai`` client and schemathesis; SIGTERM in a
process of its own. The served workflow is small (two stages, 128² → 256²) so that each image
costs a fraction of a second."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from zimage_trt.build_engines.build import BuildResult
from zimage_trt.cli import main
from zimage_trt.runtime.pipeline import Pipeline
from zimage_trt.serving.app import ServeSettings, Service, create_app
from zimage_trt.serving.server import DrainingServer

KEY = "test-key-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}
WORKFLOW = """\
name: serve-test
models:
  transformer: z_image_turbo_bf16.safetensors
prompts:
  positive: a lighthouse at dusk
  negative: blurry
stages:
  - name: base
    latent: {source: empty, width: 128, height: 128}
    sampler: {name: euler_ancestral}
    scheduler: {name: simple, steps: 3}
    cfg: 2.0
    seed: 11
    preview: true
  - name: refine
    latent: {source: upscale, scale: 2.0}
    sampler: {name: euler}
    scheduler: {name: simple, steps: 2, denoise: 0.6}
    cfg: 1.0
    seed: 12
output: {folder: out, prefix: serve, format: png}
"""


@dataclass
class Server:
    url: str
    service: Service
    workflow: Path
    logs: list[str]

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("serve")
    workflow = folder / "serve-test.yaml"
    workflow.write_text(WORKFLOW)
    logs: list[str] = []
    settings = ServeSettings(api_key=KEY, max_queue=2, max_n=3, max_body=16_384,
                             request_timeout=120)  # fmt: skip
    service = Service(lambda: Pipeline.open(model="tiny", workflow=workflow, log=logs.append),
                      settings)  # fmt: skip
    uv = DrainingServer(create_app(service), "127.0.0.1", 0, logs.append)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    while uv.port is None and thread.is_alive():
        time.sleep(0.02)
    url = f"http://127.0.0.1:{uv.port}"
    assert service.loaded.wait(120) and service.failure is None, service.failure
    yield Server(url, service, workflow, logs)
    uv.should_exit = True
    thread.join(30)


def _post(server: Server, body: object, path: str = "/v1/images/generations",
          headers: dict[str, str] = AUTH) -> httpx.Response:  # fmt: skip
    with server.client() as client:
        return client.post(path, json=body, headers=headers)


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_health_models_and_auth(server: Server) -> None:
    with server.client() as client:
        health = client.get("/healthz")  # open without a key
        assert health.status_code == 200
        assert health.json() == {"status": "ok", "backend": "torch", "device": "cpu",
                                 "workflow": "serve-test"}  # fmt: skip
        for path in ("/v1/models", "/metrics", "/openapi.json", "/nowhere"):
            refused = client.get(path)
            assert refused.status_code == 401, path
            assert refused.headers["www-authenticate"] == "Bearer"
            assert refused.json() == {"error": {
                "message": "a valid API key is needed: send 'Authorization: Bearer KEY' (the "
                "server's ZIMAGE_TRT_API_KEY)", "type": "invalid_request_error", "param": None,
                "code": "invalid_api_key"}}  # fmt: skip
        wrong = client.get("/v1/models", headers={"Authorization": f"Bearer {KEY[:-1]}x"})
        assert wrong.status_code == 401
        models = client.get("/v1/models", headers=AUTH).json()
        assert [(m["id"], m["object"], m["owned_by"]) for m in models["data"]] == [
            ("z-image-turbo", "model", "zimage-trt")
        ]
        assert client.get("/nowhere", headers=AUTH).json()["error"]["code"] == "not_found"


@pytest.fixture(scope="module")
def seed7(server: Server) -> list[dict[str, object]]:
    """Seeds 7 and 8, each a request of its own (alone in the worker: not batched)."""
    data = []
    for seed in (7, 8):
        response = _post(server, {"prompt": "a red fox in snow", "seed": seed})
        assert response.status_code == 200, response.text
        body = response.json()
        assert abs(body["created"] - time.time()) < 120
        data += body["data"]
    return data


def test_images_equal_the_cli_with_the_same_seed(
    server: Server, seed7: list[dict[str, object]], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    assert [sorted(d) for d in seed7] == [["b64_json", "seed"]] * 2
    assert [d["seed"] for d in seed7] == [7, 8]
    served = base64.b64decode(str(seed7[1]["b64_json"]))
    argv = ["generate", "--model", "tiny", "-w", str(server.workflow), "-p", "a red fox in snow",
            "--seed", "8", "--out", str(tmp_path), "-q"]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    written = sorted(tmp_path.rglob("*.png"))
    final = next(p for p in written if "preview" not in p.name)
    assert np.array_equal(_pixels(served), _pixels(final.read_bytes()))  # pixel-identical
    assert _pixels(served).shape == (256, 256, 3)
    info = Image.open(io.BytesIO(served)).info
    cli_info = Image.open(final).info
    for key in ("zimage-trt.workflow", "zimage-trt.prompt", "zimage-trt.seeds", "software"):
        assert info[key] == cli_info[key], key
    assert info["zimage-trt.seeds"] == "8,12"
    first = _pixels(base64.b64decode(str(seed7[0]["b64_json"])))
    assert not np.array_equal(first, _pixels(served))  # seed 7 is another image


def test_the_openai_client_gets_the_same_image(
    server: Server, seed7: list[dict[str, object]]
) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key=KEY)
    result = client.images.generate(prompt="a red fox in snow", extra_body={"seed": 7})
    assert result.data is not None and len(result.data) == 1
    assert result.data[0].b64_json == seed7[0]["b64_json"]


def test_concurrent_requests_of_one_shape_run_as_one_batch(
    server: Server, seed7: list[dict[str, object]]
) -> None:
    """Three requests (four images) within the batch wait: one batch of three requests, their
    denoiser calls batched; every image within 2/255 of the same request run alone (measured:
    at most 1/255, from the batched matrix products' order on CPU)."""
    worker = server.service.worker
    assert worker is not None
    worker.batch_wait, calls = 2.0, len(worker.engine_batches)
    histogram = server.service.metrics.batch_size
    batches_of_3 = histogram._buckets[2].get()  # le="3.0"
    bodies = [{"prompt": "a red fox in snow", "seed": 7, "n": 2},
              {"prompt": "a quiet harbour at night with many boats", "seed": 1},
              {"prompt": "a red fox in snow", "seed": 8, "size": "256x256"}]  # fmt: skip
    answers: dict[int, httpx.Response] = {}

    def ask(i: int) -> None:
        answers[i] = _post(server, bodies[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    try:
        for thread in threads:
            thread.start()
            time.sleep(0.1)
        for thread in threads:
            thread.join(120)
    finally:
        worker.batch_wait = 0.02
    assert [answers[i].status_code for i in range(3)] == [200, 200, 200]
    rows = list(worker.engine_batches)[calls:]
    assert max(rows) == 4 and histogram._buckets[2].get() == batches_of_3 + 1
    got = {(0, 0): 7, (0, 1): 8, (2, 0): 8}
    alone = {7: seed7[0], 8: seed7[1]}
    for (i, k), seed in got.items():
        item = answers[i].json()["data"][k]
        assert item["seed"] == seed
        batched = _pixels(base64.b64decode(item["b64_json"])).astype(int)
        single = _pixels(base64.b64decode(str(alone[seed]["b64_json"]))).astype(int)
        assert np.abs(batched - single).max() <= 2, (i, k)


def test_a_url_response_serves_the_png_for_a_while(server: Server) -> None:
    response = _post(server, {"prompt": "a red fox in snow", "seed": 7, "response_format": "url",
                              "size": "256x256"})  # fmt: skip
    assert response.status_code == 200, response.text
    item = response.json()["data"][0]
    assert set(item) == {"url", "seed"} and item["url"].startswith(f"{server.url}/v1/images/")
    with server.client() as client:
        png = client.get(item["url"], headers=AUTH)
        gone = client.get(f"{server.url}/v1/images/{'0' * 32}.png", headers=AUTH)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content.startswith(b"\x89PNG") and _pixels(png.content).shape == (256, 256, 3)
    assert gone.status_code == 404
    assert gone.json()["error"]["message"] == f"no image {'0' * 32!r} here (images are kept 600 s)"


def test_a_size_sets_every_stage(server: Server) -> None:
    from zimage_trt.serving.sizes import sized
    from zimage_trt.workflow import Workflow

    wf = Workflow.from_yaml(WORKFLOW)
    resized = sized(wf, 320, 192)
    assert [(s.latent.width, s.latent.height, s.latent.scale) for s in resized.stages] == [
        (160, 96, None), (320, 192, None)
    ]  # fmt: skip
    assert sized(wf, 256, 256) is wf  # its own size: the workflow as it is
    response = _post(server, {"prompt": "a boat", "seed": 3, "size": "320x192"})
    assert response.status_code == 200, response.text
    png = base64.b64decode(response.json()["data"][0]["b64_json"])
    assert _pixels(png).shape == (192, 320, 3)


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"prompt": "x", "n": 4}, "n", "n 4 is outside 1 … 3 (--max-n)"),
        ({"prompt": "x", "n": 0}, "n", "n: Input should be greater than or equal to 1 (got 0)"),
        ({"n": 1}, "prompt", "prompt: Field required"),
        ({"prompt": 3}, "prompt", "prompt: Input should be a valid string (got 3)"),
        ({"prompt": ""}, "prompt", "prompt: String should have at least 1 character (got '')"),
        ({"prompt": "x", "quality": "hd"}, "quality",
         "quality: is not a field of this request (got 'hd')"),
        ({"prompt": "x", "seed": -1}, "seed",
         "seed: Input should be greater than or equal to 0 (got -1)"),
        ({"prompt": "x", "size": "100x100"}, "size",
         "size '100x100': each side must be a multiple of 16 between 64 and 4096 px"),
        ({"prompt": "x", "size": "big"}, "size",
         "size 'big' must be WIDTHxHEIGHT in pixels, e.g. '672x864'"),
        ({"prompt": "x", "response_format": "png"}, "response_format",
         "response_format: Input should be 'b64_json' or 'url' (got 'png')"),
        ({"prompt": "x", "model": "dall-e-3"}, "model",
         "model 'dall-e-3' is not served here; this server serves 'z-image-turbo'"),
        ({"prompt": "x", "workflow": "../../etc/passwd"}, "workflow",
         "workflow '../../etc/passwd' is not a preset; choose one of: zimage-121101, "
         "zimage-turbo"),
        ({"prompt": "x", "seed": 2**64, "n": 1}, "seed",
         "seed: Input should be less than or equal to 18446744073709551615 (got "
         "18446744073709551616)"),
        ([1, 2], None, "Input should be a valid dictionary or object to extract fields from "
         "(got [1, 2])"),
    ],
)  # fmt: skip
def test_bad_requests_are_400_naming_the_value(
    server: Server, body: object, param: str | None, message: str
) -> None:
    response = _post(server, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["message"], error["param"], error["type"]) == (
        message, param, "invalid_request_error"
    )  # fmt: skip


def test_bodies_past_the_limit_are_413_and_bad_json_is_400(server: Server) -> None:
    big = {"prompt": "x" * 20_000}
    with server.client() as client:
        announced = client.post(
            "/v1/images/generations",
            content=json.dumps(big).encode(),
            headers={**AUTH, "content-type": "application/json"},
        )

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams
            data = json.dumps(big).encode()
            for i in range(0, len(data), 4096):
                yield data[i : i + 4096]

        streamed = client.post("/v1/images/generations", content=chunks(),
                               headers={**AUTH, "content-type": "application/json"})  # fmt: skip
        broken = client.post("/v1/images/generations", content=b'{"prompt": ',
                             headers={**AUTH, "content-type": "application/json"})  # fmt: skip
    assert announced.status_code == 413
    assert announced.json()["error"]["message"] == (
        f"the body is {len(json.dumps(big))} bytes; this server takes at most 16384 (--max-body)"
    )
    assert streamed.status_code == 413
    assert (
        streamed.json()["error"]["message"]
        == "the body is over 16384 bytes, this server's --max-body"
    )
    assert broken.status_code == 400
    assert broken.json()["error"] == {"message": "the body is not valid JSON",
                                      "type": "invalid_request_error", "param": None,
                                      "code": "json_invalid"}  # fmt: skip


def test_a_workflow_run_returns_every_image_final_last(server: Server) -> None:
    response = _post(server, {"workflow": WORKFLOW, "prompt": "a red fox in snow", "seed": 8},
                     "/v1/workflows/run")  # fmt: skip
    assert response.status_code == 200, response.text
    body = response.json()
    assert [(d["stage"], d["kind"]) for d in body["data"]] == [("base", "preview"),
                                                              ("refine", "final")]  # fmt: skip
    assert set(body["timings"]) == {"text", "base", "refine", "decode"}
    assert body["timings"]["base"] > 0 and body["timings"]["refine"] > 0  # text: maybe cached
    final = _pixels(base64.b64decode(body["data"][-1]["b64_json"]))
    assert final.shape == (256, 256, 3)
    refused = {
        "models": (WORKFLOW.replace("z_image_turbo_bf16", "other"), "workflow.models"),
        "negative_file": (WORKFLOW.replace("negative: blurry", "negative_file: /etc/passwd"),
                          "workflow.prompts.negative_file"),
        "image": (WORKFLOW.replace("{source: empty, width: 128, height: 128}",
                                   "{source: image, width: 128, height: 128, image: /etc/a.png}"),
                  "workflow.stages.0.latent"),
    }  # fmt: skip
    for name, (text, param) in refused.items():
        response = _post(server, {"workflow": text}, "/v1/workflows/run")
        assert response.status_code == 400, (name, response.text)
        assert response.json()["error"]["param"] == param, name
    broken = _post(server, {"workflow": "stages: [1"}, "/v1/workflows/run")
    assert broken.status_code == 400 and "workflow" in broken.json()["error"]["message"]


def _send_and_hold(server: Server, body: dict[str, object]) -> socket.socket:
    """A request sent over a raw socket whose answer is never read (the test closes it)."""
    data = json.dumps(body).encode()
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(
        b"POST /v1/images/generations HTTP/1.1\r\nHost: test\r\nContent-Type: "
        b"application/json\r\nAuthorization: Bearer "
        + KEY.encode()
        + b"\r\nContent-Length: "
        + str(len(data)).encode()
        + b"\r\n\r\n"
        + data
    )
    return sock


def test_a_full_queue_is_429_and_a_gone_client_cancels_its_work(server: Server) -> None:
    worker = server.service.worker
    assert worker is not None
    metrics = server.service.metrics.requests
    dropped = metrics.labels(endpoint="/v1/images/generations", status="499")._value.get()
    slow = {"prompt": "slow", "n": 3, "size": "512x512"}
    held = [_send_and_hold(server, slow)]
    while not worker.busy:
        time.sleep(0.01)
    held += [_send_and_hold(server, slow) for _ in range(2)]
    while worker.depth < 2:
        time.sleep(0.01)
    refused = _post(server, {"prompt": "one more"})
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["message"].startswith(
        "the server is busy: 2 requests are queued (--max-queue 2); retry in "
    )
    for sock in held:
        sock.close()  # the clients leave: their running and queued work is dropped
    deadline = time.monotonic() + 60
    while (worker.busy or worker.depth) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not worker.busy and worker.depth == 0
    while (
        metrics.labels(endpoint="/v1/images/generations", status="499")._value.get() < dropped + 3
    ):
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_request_past_its_timeout_is_504_and_dropped(server: Server) -> None:
    settings = server.service.settings
    settings.request_timeout = 0.5
    try:
        response = _post(server, {"prompt": "slow", "n": 3, "size": "512x512"})
    finally:
        settings.request_timeout = 120
    assert response.status_code == 504
    assert response.json()["error"] == {
        "message": "the request took longer than this server's --request-timeout; it was "
        "dropped", "type": "server_error", "param": None, "code": "timeout"}  # fmt: skip
    worker = server.service.worker
    assert worker is not None
    deadline = time.monotonic() + 30
    while worker.busy and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not worker.busy  # dropped at its next step, not run to the end


def test_metrics_count_what_happened(server: Server, seed7: list[dict[str, object]]) -> None:
    with server.client() as client:
        assert client.get("/healthz").status_code == 200
        text = client.get("/metrics", headers=AUTH).text
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert float(lines['zimage_trt_requests_total{endpoint="/healthz",status="200"}']) >= 1
    assert (
        float(lines['zimage_trt_requests_total{endpoint="/v1/images/generations",status="200"}'])
        >= 1
    )
    assert float(lines["zimage_trt_images_total"]) >= 2
    assert float(lines['zimage_trt_batch_size_bucket{le="1.0"}']) >= 1
    assert float(lines['zimage_trt_stage_seconds_count{stage="base"}']) >= 2
    assert "zimage_trt_queue_depth" in lines and "zimage_trt_easycache_skips_total" in lines
    assert float(lines["zimage_trt_prompt_cache_hits_total"]) >= 1  # the same prompt again


def test_random_bodies_never_get_a_5xx(server: Server) -> None:
    """≥ 200 random bodies (hypothesis, derandomized): each invalid somewhere, so that none
    makes an image; every answer a 4xx in OpenAI's error shape; the server alive after."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    json_values = st.recursive(
        st.none() | st.booleans() | st.integers(-(2**70), 2**70)
        | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                     max_size=4),
        max_leaves=12,
    )  # fmt: skip
    fields = st.sampled_from(["prompt", "n", "size", "response_format", "seed", "model", "user",
                              "negative_prompt", "workflow", "quality", "", "prompt "])  # fmt: skip
    bodies = st.dictionaries(fields, json_values, max_size=6) | json_values
    seen: list[int] = []
    client = server.client()

    @settings(max_examples=220, derandomize=True, deadline=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(body=bodies)
    def check(body: object) -> None:
        if isinstance(body, dict) and isinstance(body.get("prompt"), str) and body["prompt"]:
            body = {**body, "n": "many"}  # never a valid request: nothing is drawn
        response = client.post("/v1/images/generations", json=body, headers=AUTH)
        seen.append(response.status_code)
        assert 400 <= response.status_code < 500, (body, response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]

    try:
        check()
    finally:
        client.close()
    print(f"fuzz: {len(seen)} bodies, statuses {dict(sorted(Counter(seen).items()))}")
    assert len(seen) >= 200 and set(seen) <= {400, 413}
    with server.client() as alive:
        assert alive.get("/healthz").status_code == 200


def test_schemathesis_finds_no_5xx_and_no_schema_violation(server: Server) -> None:
    """schemathesis against the server's own OpenAPI schema: every GET with generated
    parameters, and the POST routes with invalid bodies only (a valid one would draw images);
    checks: no 5xx, status codes, content types and bodies as the schema declares."""
    import schemathesis
    from schemathesis import GenerationMode

    with server.client() as client:
        spec = client.get("/openapi.json", headers=AUTH).json()
    counts: dict[str, int] = {}
    for method, modes in (("GET", list(GenerationMode)), ("POST", [GenerationMode.NEGATIVE])):
        schema = schemathesis.openapi.from_dict(spec).include(method=method)
        schema.config.generation.update(modes=modes, max_examples=40, deterministic=True)
        for operation in schema.get_all_operations():
            op = operation.ok()
            strategy = op.as_strategy().filter(_draws_nothing)
            label = f"{op.method.upper()} {op.path}"

            _schemathesis_check(strategy, label, server, counts)()
    assert set(counts) == {"GET /healthz", "GET /v1/models", "GET /v1/loras", "GET /metrics",
                           "GET /v1/images/{key}.png", "POST /v1/images/generations",
                           "POST /v1/images/edits", "POST /v1/workflows/run"}  # fmt: skip
    print(f"schemathesis: {sum(counts.values())} cases, {counts}")
    assert sum(counts.values()) >= 100, counts


def _draws_nothing(case: object) -> bool:
    """Whether a generated case is sure to draw no image: a body for the images route that its
    request model accepts might (bodies for /v1/workflows/run that pass the model still fail as
    workflows: random text and objects are neither YAML workflows nor ComfyUI graphs)."""
    from pydantic import ValidationError

    from zimage_trt.serving.schemas import ImagesRequest

    if getattr(case, "path", "") != "/v1/images/generations":
        return True
    try:
        ImagesRequest.model_validate(getattr(case, "body", None))
    except ValidationError:
        return True
    return False


def _schemathesis_check(
    strategy: object, label: str, server: Server, counts: dict[str, int]
) -> Callable[[], None]:
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import positive_data_acceptance

    @settings(max_examples=40, derandomize=True, deadline=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(case=strategy)
    def check(case: schemathesis.Case) -> None:
        # positive_data_acceptance is left out: the server validates more than a JSON schema
        # can say (n against --max-n, sizes against the engines' profiles, prompt tokens)
        case.call_and_validate(base_url=server.url, headers=AUTH,
                               excluded_checks=[positive_data_acceptance])  # fmt: skip
        counts[label] = counts.get(label, 0) + 1

    return check


def test_sigterm_drains_the_request_in_flight_and_exits_0(tmp_path: Path) -> None:
    """A real process: SIGTERM while a request runs; the request is answered, then the server
    exits with status 0 and says it drained."""
    workflow = tmp_path / "serve-test.yaml"
    workflow.write_text(WORKFLOW)
    env = {k: v for k, v in os.environ.items() if k != "ZIMAGE_TRT_API_KEY"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "zimage_trt.cli", "serve", "--model", "tiny", "-w", str(workflow),
         "--port", "0"],
        stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    assert proc.stderr is not None
    lines: list[str] = []
    url = None
    try:
        for line in proc.stderr:
            lines.append(line.rstrip())
            if "listening on " in line:
                url = line.split("listening on ")[1].strip()
            if "serve: ready" in line:
                break
        assert url is not None, lines
        assert (
            "zimage-trt serve: no API key: every route is open (ZIMAGE_TRT_API_KEY is unset)"
            in lines
        )
        answer: list[httpx.Response] = []
        thread = threading.Thread(target=lambda: answer.append(httpx.post(
            f"{url}/v1/images/generations", json={"prompt": "x", "n": 2, "seed": 1},
            timeout=120)))  # fmt: skip
        thread.start()
        time.sleep(1.0)  # the request is running
        proc.send_signal(signal.SIGTERM)
        thread.join(120)
        rest = proc.stderr.read()
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert answer and answer[0].status_code == 200 and len(answer[0].json()["data"]) == 2
    assert ("zimage-trt serve: SIGTERM: draining (no new connections; the requests in flight "
            "finish)") in rest  # fmt: skip
    assert "Traceback" not in rest


def test_a_size_the_engine_profiles_cannot_make_names_the_nearest_that_can(
    built: BuildResult,
) -> None:
    """Against the reference workflow's ONNX Runtime folder (one fixed profile per stage):
    672x864 is made as it is, 688x864 is refused naming 672x864, the one size its profiles
    make."""
    from fastapi import HTTPException

    from zimage_trt.serving.app import _request_workflow
    from zimage_trt.serving.schemas import ImagesRequest

    pipe = Pipeline.open(engines=built.folder, log=lambda msg: None)
    print({k: [(p.shapes["latents"].min, p.shapes["latents"].max) for p in v]
           for k, v in pipe.engines.profiles.items() if k == "denoiser"})  # fmt: skip
    wf = _request_workflow(pipe, ImagesRequest(prompt="x", size="672x864"), 3)
    assert [s.seed for s in wf.stages] == [3, 182450993364532, 894355038471848]
    with pytest.raises(HTTPException) as refused:
        _request_workflow(pipe, ImagesRequest(prompt="x", size="688x864"), 3)
    assert refused.value.status_code == 400
    assert refused.value.detail == (
        "size '688x864' cannot be made by the served engines (built for their workflow's "
        "profiles, e.g. 672x864); nearest sizes that can: 672x864"
    )


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width``×``height`` pixels (and holds none)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_edits_with_the_openai_client_equal_generate_from_that_image(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``client.images.edit``: the picture, center-cropped to the first stage's aspect (here
    square: 192² of 256×192), is that stage's latent (VAE-encoded at its size), strength its
    denoise — pixel-identical to ``generate`` with a workflow that starts from that crop at
    that denoise."""
    from openai import OpenAI

    y, x = np.mgrid[0:192, 0:256]  # a smooth 256×192 picture: small as a PNG (--max-body 16 KiB)
    rgb = np.stack([x, y, (x + y) // 2], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "PNG")
    picture = buffer.getvalue()
    assert len(picture) < 16_384
    client = OpenAI(base_url=f"{server.url}/v1", api_key=KEY)
    result = client.images.edit(image=("fox.png", picture, "image/png"), prompt="an owl at night",
                                extra_body={"seed": 3, "strength": 0.5})  # fmt: skip
    assert result.data is not None and [d.model_extra for d in result.data] == [{"seed": 3}]
    edited = _pixels(base64.b64decode(str(result.data[0].b64_json)))
    assert edited.shape == (256, 256, 3)
    source = tmp_path / "crop.png"
    Image.fromarray(rgb[:, 32:224]).save(source)  # the center 192×192
    yaml_text = WORKFLOW.replace(
        "latent: {source: empty, width: 128, height: 128}",
        f"latent: {{source: image, image: {source}, width: 128, height: 128}}",
    ).replace("scheduler: {name: simple, steps: 3}", "scheduler: {name: simple, steps: 3, "
              "denoise: 0.5}")  # fmt: skip
    assert yaml_text.count("denoise") == 2 and "source: image" in yaml_text
    workflow = tmp_path / "edit.yaml"
    workflow.write_text(yaml_text)
    argv = ["generate", "--model", "tiny", "-w", str(workflow), "-p", "an owl at night",
            "--seed", "3", "--out", str(tmp_path / "out"), "-q"]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    final = next(p for p in sorted((tmp_path / "out").rglob("*.png")) if "preview" not in p.name)
    assert np.array_equal(edited, _pixels(final.read_bytes()))
    plain = _post(server, {"prompt": "an owl at night", "seed": 3})
    generated = _pixels(base64.b64decode(plain.json()["data"][0]["b64_json"]))
    assert np.abs(edited.astype(int) - generated).mean() > 5  # the picture shaped the edit


def test_bad_edits_are_400_naming_the_value(server: Server) -> None:
    picture = _png_claiming(64, 64)

    def edit(data: dict[str, str], image: bytes = picture, **files: bytes) -> dict[str, object]:
        with server.client() as client:
            response = client.post("/v1/images/edits", headers=AUTH, data=data,
                                   files={"image": ("a.png", image), **files})  # fmt: skip
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert isinstance(error, dict)
        return error

    assert edit({"prompt": "x", "strength": "0"})["param"] == "strength"
    assert edit({"prompt": "x", "n": "0"})["message"] == (
        "n: Input should be greater than or equal to 1 (got 0)"
    )
    masked = edit({"prompt": "x"}, mask=picture)
    assert (masked["param"], masked["message"]) == (
        "mask", "mask is not supported here: the whole picture is edited (strength)")  # fmt: skip
    assert edit({"prompt": "x"}, image=b"not an image")["message"].startswith(
        "image: a.png is not a readable image ("
    )
    assert edit({"prompt": "x"}, image=_png_claiming(8192, 8192))["message"] == (
        "image: a.png is 8192×8192 pixels; input images may have at most 33,554,432 pixels"
    )
