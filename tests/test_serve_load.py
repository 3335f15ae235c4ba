"""``benchmarks/serve_load.py`` on a 10-second run: the load script, in process, against the
tiny-model server of ``tests/test_serve.py`` (one server under two labels, 1 and 2 clients): the
JSON's fields and types, its counts against the server's own ``/metrics``, the markdown table,
the chart's size, the refusal to overwrite; a launched server that fails to start; bad usage.
Nothing here asserts a time."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests import test_serve
from tests.conftest import benchmark_script
from tests.test_serve import AUTH, KEY, Server

server = test_serve.server  # its fixture: the tiny model behind uvicorn on loopback, key KEY


@pytest.fixture(scope="module")
def serve_load() -> ModuleType:
    return benchmark_script("serve_load")


def _images_made(at: Server) -> float:
    text = httpx.get(f"{at.url}/metrics", headers=AUTH, timeout=30).text
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    return next(s.value for s in samples if s.name == "zimage_trt_images_total")


def test_a_sweep_writes_every_figure_and_refuses_to_overwrite(
    server: Server,
    serve_load: ModuleType,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "load.json"
    argv = ["--url", server.url, "--label", "a", "--url", server.url, "--label", "b",
            "--levels", "1,2", "--duration", "1.5", "--size", "64x64", "--api-key", KEY,
            "--json", str(out)]  # fmt: skip
    made = _images_made(server)
    assert serve_load.main(argv) == 0
    made = _images_made(server) - made
    printed = capsys.readouterr()
    result = json.loads(out.read_text())

    assert set(result) == {"schema", "created", "zimage_trt", "machine", "settings", "servers",
                           "cells", "comparisons"}  # fmt: skip
    assert result["schema"] == "zimage-trt-serve-load/1"
    assert set(result["machine"]) == {"platform", "python", "cpu", "cpu_count", "gpus"}
    assert result["settings"]["levels"] == [1, 2] and result["settings"]["duration"] == 1.5
    assert result["settings"]["api_key"] is True and KEY not in out.read_text()
    health = {"status": "ok", "backend": "torch", "device": "cpu", "workflow": "serve-test"}
    assert result["servers"] == {
        label: {"url": server.url, "launch": None, "health": health} for label in ("a", "b")
    }
    cells = result["cells"]
    assert [(c["server"], c["clients"]) for c in cells] == [("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    for c in cells:
        assert set(c) == {"server", "clients", "seconds", "requests", "ok", "ok_in_window",
                          "images_per_s", "latency_s", "status_counts", "rate_429",
                          "retry_wait_s", "errors", "drain_s", "warmup", "batch_sizes",
                          "server_images"}  # fmt: skip
        assert c["seconds"] == 1.5 and c["warmup"] == {"requests": c["clients"], "ok": c["clients"]}
        # max_queue 2 holds both clients' requests: every one is a 200
        assert c["status_counts"] == {"200": c["requests"]} and c["requests"] == c["ok"]
        assert c["ok"] >= c["clients"]  # each client's first request starts inside the window
        assert c["rate_429"] == 0.0 and c["retry_wait_s"] == 0.0
        assert c["errors"] == {"count": 0, "first": None}
        assert 0 <= c["ok_in_window"] <= c["ok"]  # the drained ones count in ok only
        assert c["images_per_s"] == pytest.approx(c["ok_in_window"] / 1.5)
        lat = c["latency_s"]
        assert set(lat) == {"p50", "p95", "p99", "mean"}
        assert all(isinstance(v, float) for v in lat.values())
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] and lat["mean"] > 0
        assert c["drain_s"] >= 0
        # the server's own counts for the cell: its images, and batches of 1 … 4 (--max-batch 4)
        assert c["server_images"] == c["ok"]
        assert set(c["batch_sizes"]) <= {"1", "2", "3", "4"}
        assert sum(int(k) * v for k, v in c["batch_sizes"].items()) == c["ok"]
        if c["clients"] == 1:
            assert c["batch_sizes"] == {"1": c["ok"]}
    assert made == sum(c["ok"] + c["warmup"]["ok"] for c in cells)  # nothing uncounted

    comp = result["comparisons"]
    a_p95 = sorted(c["latency_s"]["p95"] for c in cells if c["server"] == "a")
    assert comp["p95_budget_s"] == pytest.approx(sum(a_p95) / 2)  # the median of two
    best_a = comp["best_within_budget"]["a"]
    assert best_a is not None and best_a["clients"] in (1, 2)
    (pair,) = comp["pairs"]
    assert (pair["a"], pair["b"]) == ("a", "b")
    by = {(c["server"], c["clients"]): c["images_per_s"] for c in cells}
    assert pair["throughput_ratio"] == {
        str(n): None if by["a", n] == 0 else pytest.approx(by["b", n] / by["a", n]) for n in (1, 2)
    }

    md = out.with_suffix(".md").read_text()
    assert md in printed.out
    assert "| clients | server | images/s | p50 ms | p95 ms | p99 ms |" in md
    rows = [line for line in md.splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    assert [row.split(" | ")[:2] for row in rows] == [["| 1", "a"], ["| 1", "b"], ["| 2", "a"],
                                                      ["| 2", "b"]]  # fmt: skip
    assert "- images/s, b / a: 1 client " in md and "at equal p95, b / a:" in md
    assert len([line for line in printed.err.splitlines() if line.startswith("[")]) == 4
    with Image.open(out.with_suffix(".png")) as chart:
        assert chart.format == "PNG" and chart.size == serve_load.chart_size(2)

    written = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()}
    assert sorted(p.name for p in written) == ["load.json", "load.md", "load.png"]
    assert serve_load.main(argv) == 5  # before any request: nothing is sent, nothing written
    assert f"{out} exists; not overwritten (pass --force" in capsys.readouterr().err
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()} == written


def test_a_server_that_does_not_start_is_named_with_its_log(
    serve_load: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--launch", "bad=--model tiny --max-batch 0", "--levels", "1", "--duration", "1"]
    assert serve_load.main(argv) == 6
    err = capsys.readouterr().err
    assert "server 'bad' exited with status 2 before it was ready; its log ends:" in err
    assert "--max-batch 0 is outside 1 … 64" in err


def test_a_server_that_wants_another_key_is_refused_before_the_sweep(
    server: Server,
    serve_load: ModuleType,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("ZIMAGE_TRT_API_KEY", raising=False)
    argv = ["--url", server.url, "--levels", "1", "--duration", "1"]
    assert serve_load.main(argv) == 6
    label = server.url.removeprefix("http://")
    assert f"server '{label}' at {server.url} needs an API key: pass --api-key KEY" in (
        capsys.readouterr().err
    )
    assert serve_load.main([*argv, "--api-key", "wrong"]) == 6
    assert "refuses the API key given" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "nothing to load: give --url URL"),
        (["--launch", "no label"], "--launch 'no label': expected LABEL=\"SERVE ARGS\""),
        (["--launch", "x="], "--launch 'x=': no serve arguments after '='"),
        (["--launch", "x=--model 'tiny"], '--launch "x=--model \'tiny": No closing quotation'),
        (["--launch", "x=--model tiny", "--launch", "x=--model tiny"], "labels must differ"),
        (["--url", "http://h:1", "--levels", "1,0"], "distinct client counts ≥ 1"),
        (["--url", "http://h:1", "--label", "a", "--label", "b"], "2 --label for 1 --url"),
    ],
)
def test_bad_usage_is_refused_before_anything_starts(
    serve_load: ModuleType, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        serve_load.main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_batch_sizes_from_cumulative_buckets(serve_load: ModuleType) -> None:
    """Bucket counts are cumulative (le); sizes 1 … 4 exact, larger ones by their bucket."""
    bounds = [1, 2, 3, 4, 6, 8, 12, 16, float("inf")]
    before = serve_load.Snapshot(3, dict(zip(bounds, [2, 3, 3, 3, 3, 3, 3, 3, 3], strict=True)))
    after = serve_load.Snapshot(40, dict(zip(bounds, [5, 6, 10, 10, 11, 11, 11, 11, 12],
                                             strict=True)))  # fmt: skip
    assert serve_load.batch_sizes(before, after) == {"1": 3, "3": 4, "5-6": 1, ">16": 1}
    assert serve_load.percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert serve_load.percentile([1.0, 2.0, 3.0, 4.0], 0.95) == pytest.approx(3.85)
    assert serve_load.percentile([7.0], 0.99) == 7.0
