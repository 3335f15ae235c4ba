"""The GPU benchmark's dry run on CPU with tiny configs: the same code path the GPU minutes run,
so they are not spent on bugs (benchmarks/gpu_bench.py)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.conftest import benchmark_script

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_bench.py"


def _load_script():  # type: ignore[no-untyped-def]
    return benchmark_script("gpu_bench")


def test_random_init_keeps_activations_finite() -> None:
    gpu_bench = _load_script()
    dit, text, _ = gpu_bench.random_models(True, torch.device("cpu"), torch.float32)
    assert next(dit.parameters()).device.type == "cpu"
    assert not any(p.requires_grad for p in dit.parameters())
    ids = torch.randint(0, 1000, (1, 40))
    hidden = text(ids, torch.ones_like(ids))
    assert bool(torch.isfinite(hidden).all()) and 0.1 < float(hidden.std()) < 100
    norms = dit.layers[0].attention_norm1.weight
    assert 0.3 < float(norms.mean()) < 1.7  # norm scales near 1
    qkv = dit.layers[0].attention.qkv.weight
    assert math.isclose(float(qkv.std()), 1 / math.sqrt(qkv.shape[1]), rel_tol=0.1)  # 1/√fan-in


def test_the_cpu_dry_run_writes_every_figure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gpu_bench = _load_script()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        code = gpu_bench.main(["--tiny", "--device", "cpu", "--out", str(tmp_path),
                               "--compile-backend", "eager", "--repeats", "1", "--iters", "1",
                               "--warmup", "0"])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    result = json.loads((tmp_path / "gpu_bench-cpu-tiny.json").read_text())
    meta = result["gpu_bench"]
    assert meta["size"] == "tiny" and "random weights" in meta["weights"]
    assert "synthetic" in meta["weights"] and meta["synthetic"]
    assert meta["tensorrt"].startswith("not run: TensorRT is not installed")
    assert list(result["backends"]) == ["torch", "torch-compile"]
    for name, record in result["backends"].items():
        assert record["status"] == "ok"
        stages = [p for p in record["end_to_end"]["parts"] if p["kind"] == "stage"]
        assert [(s["name"], s["model_calls"]) for s in stages] == [
            ("base", 18),
            ("refine", 16),
            ("upscale", 31),
        ], name
        seconds = record["end_to_end"]["total_seconds"]["median"]
        assert math.isfinite(seconds) and seconds > 0
    compiled = result["backends"]["torch-compile"]["compile"]
    assert all(row["status"].startswith("compiled") for row in compiled["shapes"])
    assert meta["compile"] == {"scope": "regional", "backend": "eager"}
    assert {row["engine"] for row in compiled["shapes"]} == {
        "text_encoder", "caption_path", "denoiser", "vae_decoder"
    }  # fmt: skip
    delta = result["agreement"]["torch-compile"]["final_latent_max_abs_delta_vs_torch"]
    assert delta < 1e-4
    assert Image.open(tmp_path / "gpu_bench-cpu-tiny.png").size[0] > 0
    assert "| backend |" in (tmp_path / "gpu_bench-cpu-tiny.md").read_text()
    # issue 17's edge part: each rung of the planner's ladder at its own need, followed
    edge = result["edge"]
    assert edge["device"] == "cpu" and [r["status"] for r in edge["runs"]] == ["ok"] * 3
    released = "text encoder released after encoding (the prompt cache keeps its output)"
    assert [r["choices"] for r in edge["runs"]] == [
        ["everything resident"], [released],
        [released, "decode in tiles (512:64, ComfyUI's VAEDecodeTiled)"],
    ]  # fmt: skip
    for run in edge["runs"]:
        assert run["predicted_total_bytes"] == run["budget_bytes"]  # the rung's own need
        assert run["final_latent_max_abs_delta_vs_first"] == 0.0  # made again: the same bits
        assert "cuda_allocated_peak_bytes" not in run and run["seconds"] > 0
    assert (
        "## Memory budgets (--max-vram plans followed)"
        in (tmp_path / "gpu_bench-cpu-tiny.md").read_text()
    )
    out = capsys.readouterr().out
    # written after each part of each backend
    assert "(so far: torch incomplete)" in out and "(so far: torch ok)" in out
    assert "(so far: torch ok, torch-compile incomplete)" in out
    assert result["gpu_bench"]["partial"] is False


def test_a_spent_budget_skips_the_backends_and_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gpu_bench = _load_script()
    assert (
        gpu_bench.main(["--tiny", "--device", "cpu", "--out", str(tmp_path), "--budget", "0"]) == 0
    )
    result = json.loads((tmp_path / "gpu_bench-cpu-tiny.json").read_text())
    assert list(result["backends"]) == ["torch", "torch-compile"]
    for record in result["backends"].values():
        assert record["status"] == "skipped"
        assert re.fullmatch(r"past the time budget by \d+ s when it was due to start",
                            record["reason"])  # fmt: skip
    assert result["gpu_bench"]["over_budget"] is True and result["gpu_bench"]["partial"] is False
    assert {r["status"] for r in result["edge"]["runs"]} == {"skipped: past the time budget"}
    assert "- torch: skipped, past the time budget by" in capsys.readouterr().out


def _device_wheels():  # type: ignore[no-untyped-def]
    path = SCRIPT.parent.parent / "scripts" / "device_wheels.py"
    spec = importlib.util.spec_from_file_location("device_wheels", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_device_wheels_cover_every_runtime_dependency() -> None:
    """A runtime dependency added to pyproject.toml must be on the GPU image or carried to it."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    wheels = _device_wheels()
    pyproject = tomllib.loads((SCRIPT.parent.parent / "pyproject.toml").read_text())
    names = {
        re.split(r"[<>=!~\[; ]", dep, maxsplit=1)[0].lower().replace("_", "-")
        for dep in pyproject["project"]["dependencies"]
    }
    carried = set(wheels.MISSING_ON_DEVICE)
    assert names - carried - set(wheels.ON_DEVICE) == set()
    assert not carried & set(wheels.ON_DEVICE)
    # pinned to what the tests ran with, one version each
    specs = wheels.pinned()
    assert [s.split("==")[0] for s in specs] == list(wheels.MISSING_ON_DEVICE)
    assert f"pydantic=={importlib.metadata.version('pydantic')}" in specs
