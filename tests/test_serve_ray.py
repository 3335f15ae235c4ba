"""``zimage-trt serve --ray`` (issue 15): a real process starting a local Ray cluster with one
replica of the tiny model, reached over HTTP on loopback — the same API, auth, pixels and
metrics as the single-process server — then SIGTERM with a request in flight: answered, and the
process exits 0 with no Ray process left."""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from tests.test_serve import AUTH, KEY, WORKFLOW, _pixels
from zimage_trt.cli import main


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_one_ray_replica_serves_the_same_api_and_pixels(tmp_path: Path) -> None:
    import ray  # noqa: F401  # in [dev]: CI runs this test, it is never skipped

    workflow = tmp_path / "serve-test.yaml"
    workflow.write_text(WORKFLOW)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    env = {**os.environ, "ZIMAGE_TRT_API_KEY": KEY, "RAY_AUTH_MODE": "disabled"}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "zimage_trt.cli", "serve", "--ray", "--replicas", "1",
             "--model", "tiny", "-w", str(workflow), "--port", str(port)],
            stderr=out, stdout=out, env=env, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        status = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status = httpx.get(f"{url}/healthz", timeout=5).status_code
            except httpx.HTTPError:
                status = None
            if status == 200:
                break
            time.sleep(0.5)
        assert status == 200, log.read_text()[-3000:]
        with httpx.Client(base_url=url, timeout=120) as client:
            health = client.get("/healthz").json()
            assert health == {"status": "ok", "backend": "torch", "device": "cpu",
                              "workflow": "serve-test"}  # fmt: skip
            assert client.get("/v1/models").status_code == 401  # the same gate
            served = client.post("/v1/images/generations", headers=AUTH,
                                 json={"prompt": "a red fox in snow", "seed": 8})  # fmt: skip
            assert served.status_code == 200, served.text
            metrics = client.get("/metrics", headers=AUTH).text
        assert "zimage_trt_images_total 1.0" in metrics
        assert 'zimage_trt_requests_total{endpoint="/v1/models",status="401"} 1.0' in metrics

        answer: list[httpx.Response] = []
        thread = threading.Thread(target=lambda: answer.append(httpx.post(
            f"{url}/v1/images/generations", headers=AUTH, json={"prompt": "x", "seed": 1},
            timeout=120)))  # fmt: skip
        thread.start()
        time.sleep(0.5)  # the request is in the replica
        proc.send_signal(signal.SIGTERM)
        thread.join(120)
        assert proc.wait(90) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert answer and answer[0].status_code == 200, text[-3000:]
    assert "zimage-trt serve: SIGTERM: draining the replicas" in text
    assert "zimage-trt serve: stopped" in text

    argv = ["generate", "--model", "tiny", "-w", str(workflow), "-p", "a red fox in snow",
            "--seed", "8", "--out", str(tmp_path / "cli"), "-q"]  # fmt: skip
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the replica: Ray gives an actor with num_cpus=1 one thread
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    final = next(p for p in (tmp_path / "cli").rglob("*.png") if "preview" not in p.name)
    png = base64.b64decode(served.json()["data"][0]["b64_json"])
    assert np.array_equal(_pixels(png), _pixels(final.read_bytes()))  # pixel-identical


def test_serve_run_builds_the_application_from_the_same_flags() -> None:
    """``serve run zimage_trt.cli.serve:ray_app KEY=VALUE …``: the flags without dashes, with
    the flags' checks (no Ray cluster needed to build the application)."""
    import pytest

    from zimage_trt.cli.serve import ray_app
    from zimage_trt.errors import InputError

    app = ray_app({"model": "tiny", "replicas": "2", "max_batch": "2"})
    deployment = app._bound_deployment
    assert deployment.num_replicas == 2 and deployment.max_ongoing_requests == 32 + 2 + 8
    auto = ray_app({"model": "tiny", "replicas": "1", "max_replicas": "3"})._bound_deployment
    assert auto._deployment_config.autoscaling_config.max_replicas == 3
    assert auto._deployment_config.autoscaling_config.target_ongoing_requests == 4
    for args, message in (
        ({"model": "tiny", "replicas": "0"}, "--replicas 0 is outside 1 … 1024"),
        ({"model": "tiny", "replicas": "2", "max_replicas": "1"},
         "--max-replicas 1 is outside --replicas (2) … 1024"),
        ({"modle": "tiny"}, "ray_app {'modle': 'tiny'}: unrecognized arguments: --modle tiny"),
        ({"replicas": "2"}, "serve needs --model or --engines"),
    ):  # fmt: skip
        with pytest.raises(InputError) as refused:
            ray_app(args)
        assert str(refused.value) == message


def test_the_replicas_metrics_are_summed() -> None:
    from zimage_trt.serving.metrics import Metrics
    from zimage_trt.serving.ray_app import merged_exposition

    a, b = Metrics(), Metrics()
    a.images.inc(2)
    b.images.inc(3)
    a.requests.labels(endpoint="/healthz", status="200").inc()
    b.batch_size.observe(3)
    a.batch_size.observe(1)
    text = merged_exposition([a.exposition(), b.exposition()]).decode()
    assert "zimage_trt_images_total 5.0" in text
    assert 'zimage_trt_requests_total{endpoint="/healthz",status="200"} 1.0' in text
    assert 'zimage_trt_batch_size_bucket{le="2.0"} 1.0' in text
    assert "zimage_trt_batch_size_count 2.0" in text and "zimage_trt_batch_size_sum 4.0" in text
