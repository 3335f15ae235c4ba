"""Per-request LoRAs (issue 15): ``serve --lora NAME=PATH[:STRENGTH]`` registers LoRAs, a request
names them (``"lora": [{"name", "strength"}]``) and the worker switches them into the DiT
between batches. Served over real HTTP on loopback (the tiny model's folder: its LoRA paths are
honoured), each image is compared with ``zimage-trt generate`` given the same LoRA file."""

from __future__ import annotations

import base64
import hashlib
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from tests.test_serve import AUTH, KEY, WORKFLOW, Server, _pixels
from zimage_trt.cli import main
from zimage_trt.errors import InputError
from zimage_trt.models.tiny import tiny_model_dir
from zimage_trt.runtime.loras import RegisteredLora
from zimage_trt.serving.app import ServeSettings, Service, Source, create_app
from zimage_trt.serving.server import DrainingServer

PROMPT = "a red fox in snow"


@pytest.fixture(scope="module")
def loras(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny model's LoRA, and a second one: the same with its up weights negated."""
    tiny = next((tiny_model_dir() / "loras").glob("*.safetensors"))
    mirror = tmp_path_factory.mktemp("loras") / "mirror.safetensors"
    tensors = load_file(tiny)
    save_file({k: -v if k.endswith("lora_up.weight") else v for k, v in tensors.items()}, mirror)
    return tiny, mirror


@pytest.fixture(scope="module")
def lora_server(
    tmp_path_factory: pytest.TempPathFactory, loras: tuple[Path, Path]
) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("serve-loras")
    workflow = folder / "serve-test.yaml"
    workflow.write_text(WORKFLOW)
    logs: list[str] = []
    registered = (RegisteredLora.parse(f"style={loras[0]}:0.8"),
                  RegisteredLora.parse(f"mirror={loras[1]}"))  # fmt: skip
    source = Source(model=str(tiny_model_dir()), workflow=str(workflow), loras=registered)
    service = Service(lambda: source.open(logs.append), ServeSettings(api_key=KEY, max_batch=4))
    uv = DrainingServer(create_app(service), "127.0.0.1", 0, logs.append)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    while uv.port is None and thread.is_alive():
        time.sleep(0.02)
    assert service.loaded.wait(120) and service.failure is None, service.failure
    yield Server(f"http://127.0.0.1:{uv.port}", service, workflow, logs)
    uv.should_exit = True
    thread.join(30)


def _image(server: Server, lora: list[dict[str, object]] | None, seed: int = 5) -> np.ndarray:
    body: dict[str, object] = {"prompt": PROMPT, "seed": seed}
    if lora is not None:
        body["lora"] = lora
    with server.client() as client:
        response = client.post("/v1/images/generations", json=body, headers=AUTH)
    assert response.status_code == 200, response.text
    return _pixels(base64.b64decode(response.json()["data"][0]["b64_json"]))


def _generated(server: Server, tmp_path: Path, lora: list[str], seed: int = 5) -> np.ndarray:
    out = tmp_path / f"gen{len(list(tmp_path.iterdir()))}"
    argv = ["generate", "--model", str(tiny_model_dir()), "-w", str(server.workflow), "-p", PROMPT,
            "--seed", str(seed), "--out", str(out), "-q"]  # fmt: skip
    for spec in lora:
        argv += ["--lora", spec]
    assert main(argv) == 0
    final = next(p for p in sorted(out.rglob("*.png")) if "preview" not in p.name)
    return _pixels(final.read_bytes())


def _metric(server: Server, name: str) -> float:
    with server.client() as client:
        text = client.get("/metrics", headers=AUTH).text
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    assert match is not None, name
    return float(match.group(1))


def test_a_named_lora_gives_generate_s_pixels_and_switches_back_exactly(
    lora_server: Server, loras: tuple[Path, Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    style = _image(lora_server, [{"name": "style"}])  # registered at 0.8
    plain = _image(lora_server, None)  # the served workflow's LoRAs: none
    again = _image(lora_server, [{"name": "style", "strength": 0.8}])
    mirror = _image(lora_server, [{"name": "mirror"}])
    half = _image(lora_server, [{"name": "style", "strength": 0.5}, {"name": "mirror"}])
    assert np.array_equal(style, _generated(lora_server, tmp_path, [f"{loras[0]}:0.8"]))
    assert np.array_equal(plain, _generated(lora_server, tmp_path, []))
    assert np.array_equal(
        half, _generated(lora_server, tmp_path, [f"{loras[0]}:0.5", f"{loras[1]}:1"])
    )
    capsys.readouterr()
    assert np.array_equal(again, style)  # back to a set: the same weights, bit for bit
    for a, b in ((style, plain), (style, mirror), (mirror, plain), (half, style)):
        assert np.abs(a.astype(int) - b).max() > 8
    with lora_server.client() as client:
        listed = client.get("/v1/loras", headers=AUTH).json()
    digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in loras]
    assert listed == {"object": "list", "held": ["style at 0.5", "mirror at 1"], "data": [
        {"name": "style", "strength": 0.8, "sha256": digests[0]},
        {"name": "mirror", "strength": 1.0, "sha256": digests[1]},
    ]}  # fmt: skip
    assert _metric(lora_server, "zimage_trt_lora_switches_total") == 5
    assert _metric(lora_server, "zimage_trt_lora_switch_seconds_count") == 5
    assert 0 < _metric(lora_server, "zimage_trt_lora_switch_seconds_sum") < 30


def test_requests_with_other_loras_never_share_a_batch(lora_server: Server) -> None:
    alone = {name: _image(lora_server, [{"name": name}], seed=9) for name in ("style", "mirror")}
    worker = lora_server.service.worker
    assert worker is not None
    before = len(worker.engine_batches)
    with ThreadPoolExecutor(4) as pool:  # two of each, sent together: never one batch of four
        names = ["style", "mirror", "style", "mirror"]
        images = list(pool.map(lambda n: _image(lora_server, [{"name": n}], seed=9), names))
    for name, image in zip(names, images, strict=True):
        assert np.abs(image.astype(int) - alone[name]).max() <= 1, name  # batched: ≤ 1/255
    # (a mixed batch would fail: runtime.batch refuses workflows with other LoRA sets)
    assert max(list(worker.engine_batches)[before:]) <= 2 * 2  # cond + uncond rows of two


def test_an_unknown_lora_is_400_listing_the_registered_ones(lora_server: Server) -> None:
    with lora_server.client() as client:
        unknown = client.post("/v1/images/generations", headers=AUTH,
                              json={"prompt": PROMPT, "lora": [{"name": "nope"}]})  # fmt: skip
        assert unknown.status_code == 400
        assert unknown.json()["error"] == {
            "message": "LoRA 'nope' is not registered here; registered: mirror, style",
            "type": "invalid_request_error", "param": "lora", "code": None,
        }  # fmt: skip
        strong = client.post("/v1/images/generations", headers=AUTH, json={
            "prompt": PROMPT, "lora": [{"name": "style", "strength": 11}]})  # fmt: skip
        assert strong.status_code == 400
        assert strong.json()["error"]["param"] == "lora.0.strength"
        path = client.post("/v1/images/generations", headers=AUTH, json={
            "prompt": PROMPT, "lora": [{"name": "style", "path": "/etc/passwd"}]})  # fmt: skip
        assert path.status_code == 400
        assert path.json()["error"]["message"].startswith("lora.0.path: is not a field")


def test_a_server_without_loras_says_so(tmp_path: Path) -> None:
    from fastapi import HTTPException

    from zimage_trt.runtime.pipeline import Pipeline
    from zimage_trt.serving.app import _request_workflow
    from zimage_trt.serving.schemas import ImagesRequest, LoraChoice

    pipeline = Pipeline.open(model="tiny", workflow="zimage-turbo", log=lambda m: None)
    body = ImagesRequest(prompt=PROMPT, lora=[LoraChoice(name="style")])
    with pytest.raises(HTTPException) as refused:
        _request_workflow(pipeline, body, 1)
    assert refused.value.detail == "this server has no registered LoRAs (serve --lora NAME=PATH)"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("style", "--lora 'style' is not NAME=PATH[:STRENGTH]"),
        ("=x.safetensors", "--lora '=x.safetensors' is not NAME=PATH[:STRENGTH]"),
        ("a b=x", "--lora 'a b=x': the name 'a b' may hold letters, digits, - _ ."),
        ("s=/nowhere/x.safetensors:0.5", "--lora 's=/nowhere/x.safetensors:0.5': no file "
         "/nowhere/x.safetensors"),
        ("s={lora}:12", "--lora 's={lora}:12': strength 12 is outside -10 … 10"),
        ("s={lora}:nan", "--lora 's={lora}:nan': strength nan is outside -10 … 10"),
    ],
)  # fmt: skip
def test_a_bad_lora_flag_is_refused_naming_it(
    spec: str, message: str, loras: tuple[Path, Path]
) -> None:
    with pytest.raises(InputError) as refused:
        RegisteredLora.parse(spec.format(lora=loras[0]))
    assert str(refused.value) == message.format(lora=loras[0])


def test_a_lora_flag_takes_the_strength_after_the_last_colon(loras: tuple[Path, Path]) -> None:
    assert RegisteredLora.parse(f"s={loras[0]}:-0.25") == RegisteredLora("s", loras[0], -0.25)
    assert RegisteredLora.parse(f"s={loras[0]}").strength == 1.0


def test_serve_refuses_twice_the_same_name_and_a_model_beside_engines_without_lora(
    loras: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    twice = ["serve", "--model", "tiny", "--lora", f"a={loras[0]}", "--lora", f"a={loras[1]}"]
    assert main([*twice, "--port", "1"]) != 0
    assert "--lora: the name(s) a are given twice" in capsys.readouterr().err
    assert main(["serve", "--model", "tiny", "--engines", "x", "--port", "1"]) != 0
    assert ("--model with --engines names the base DiT for LoRA switches (--lora); without "
            "--lora pass one of them") in capsys.readouterr().err  # fmt: skip
    assert main(["serve", "--port", "1"]) != 0
    assert "serve needs --model or --engines" in capsys.readouterr().err
