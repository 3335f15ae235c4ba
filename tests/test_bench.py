"""The benchmark harness: the roofline formula against speed-anchors §5.2/§5.5, the statistics,
and whole bench runs on the tiny model whose JSON, markdown and chart carry every figure with
exact counts. No time is asserted beyond being a positive finite number."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from zimage_trt.bench import (
    GPU_PEAK_SOURCES,
    chart_size,
    dit_flops,
    engine_folder_pipeline,
    gpu_bf16_peak,
    markdown,
    parse_backends,
    roofline_flops,
    run_bench,
    summary,
    write_outputs,
)
from zimage_trt.models.dit import DiTConfig
from zimage_trt.workflow import Workflow

FULL = DiTConfig()  # Z-Image-Turbo's DiT


# ---- roofline ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("width", "height", "caption", "tflop"),
    [
        (672, 864, 128, 30.0),  # §5.2, the worked line
        (672, 864, 256, 31.7),
        (672, 864, 512, 35.3),
        (336, 432, 128, 8.2),  # §5.5
        (512, 512, 128, 13.7),
        (1024, 1024, 128, 56.6),
        (1008, 1296, 128, 72.9),
        (1344, 1728, 128, 146.1),
    ],
)
def test_roofline_flops_match_speed_anchors(
    width: int, height: int, caption: int, tflop: float
) -> None:
    tokens = (height // 16) * (width // 16)
    assert roofline_flops(FULL, tokens, caption) == pytest.approx(tflop * 1e12, rel=5e-3)


def test_roofline_parts_at_672x864_with_a_128_token_caption() -> None:
    """§5.2's worked line: 30 × linear 25.48 T, 30 × attention 2.65 T, refiners 1.86 T."""
    assert 42 * 54 == 2268  # image tokens, padded to 2272
    flops = dit_flops(FULL, 2268, 128)
    per_token = 2 * (4 * 3840**2 + 3 * 3840 * 10240)
    assert flops.main == 30 * (per_token * 2400 + 4 * 2400**2 * 3840)
    assert flops.main == pytest.approx((25.48 + 2.65) * 1e12, rel=1e-3)
    assert flops.noise_refiner + flops.context_refiner == pytest.approx(1.86e12, rel=2e-3)
    # the denoiser engine leaves the caption path (run once per prompt) out
    assert flops.denoiser + flops.caption_path == flops.total
    assert flops.total / 989.4e12 == pytest.approx(30.3e-3, rel=2e-3)  # 30.3 ms at H100 peak


def test_token_counts_are_padded_to_32() -> None:
    assert roofline_flops(FULL, 2268, 128) == roofline_flops(FULL, 2268, 97)
    # blocks run on 2272 slots either way; only the patch embedder and final layer see 2268
    a, b = dit_flops(FULL, 2268, 128), dit_flops(FULL, 2272, 128)
    assert (a.main, a.noise_refiner) == (b.main, b.noise_refiner)
    assert b.image_embed - a.image_embed == 4 * 2 * (2 * 64 * 3840)  # 4 tokens, 2 layers
    assert dit_flops(FULL, 2273, 128).main > b.main
    with pytest.raises(ValueError, match="image_tokens must be >= 1, got 0"):
        roofline_flops(FULL, 0, 128)
    with pytest.raises(ValueError, match="caption_tokens must be >= 1, got -3"):
        roofline_flops(FULL, 2268, -3)


def test_gpu_bf16_peaks() -> None:
    assert gpu_bf16_peak("NVIDIA H100 80GB HBM3") == (989.4e12, GPU_PEAK_SOURCES["H100"])
    assert "speed-anchors" in GPU_PEAK_SOURCES["H100"]
    for name, peak in [("NVIDIA H200", 989.4e12), ("NVIDIA H800", 989.4e12),
                       ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L40S", 362e12),
                       ("NVIDIA GeForce RTX 4090", 165.2e12)]:  # fmt: skip
        found = gpu_bf16_peak(name)
        assert found is not None and found[0] == peak, name
    # lower-clocked H100 boards are not given the SXM5 peak; unknown GPUs and CPUs get none
    for unknown in ("NVIDIA H100 PCIe", "NVIDIA H100 NVL", "Tesla T4", "", None):
        assert gpu_bf16_peak(unknown) is None, unknown


# ---- statistics and arguments -----------------------------------------------------------------
def test_summary_of_fixed_samples() -> None:
    s = summary([float(v) for v in range(10, 0, -1)])  # 10 … 1, order does not matter
    assert (s.median, s.p90, s.mean, s.n) == (5.5, pytest.approx(9.1), 5.5, 10)
    s = summary([4.0, 1.0, 3.0, 2.0])
    assert (s.median, s.p90, s.mean, s.n) == (2.5, pytest.approx(3.7), 2.5, 4)
    assert summary([0.25]) == type(s)(0.25, 0.25, 0.25, 1)
    with pytest.raises(ValueError, match="at least one sample"):
        summary([])


def test_bad_arguments_name_the_value_and_the_range() -> None:
    with pytest.raises(ValueError, match=r"unknown backend\(s\) tensorrtx; choose from: torch, "):
        parse_backends("torch,tensorrtx")
    assert parse_backends("onnxruntime, torch,torch") == ["onnxruntime", "torch"]
    with pytest.raises(ValueError, match="iters must be an integer >= 1, got 0"):
        run_bench("tiny", "zimage-121101", "torch", iters=0)
    with pytest.raises(ValueError, match="warmup must be an integer >= 0, got -1"):
        run_bench("tiny", "zimage-121101", "torch", warmup=-1)


# ---- whole runs -------------------------------------------------------------------------------
@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """Nothing here asserts a time, but the runs should take a steady time: on a busy shared
    machine, spinning OpenMP workers of a multi-threaded torch stall for scheduler quanta."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _positive_seconds(node: Any) -> int:
    """Every ``*seconds*`` number and every median/p90/mean inside one is a positive finite
    float; returns how many were checked."""
    checked = 0
    if isinstance(node, dict):
        for key, value in node.items():
            # the per-step overhead is a signed difference, not a time
            if "seconds" in key and value is not None and "overhead" not in key:
                values = value.values() if isinstance(value, dict) else [value]
                for v in values:
                    if isinstance(v, float):
                        assert math.isfinite(v) and v > 0, (key, v)
                        checked += 1
                    else:
                        checked += _positive_seconds(v)
            else:
                checked += _positive_seconds(value)
    elif isinstance(node, list):
        checked += sum(_positive_seconds(v) for v in node)
    return checked


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """``zimage-trt bench`` on the reference workflow, torch backend, one run of everything."""
    from zimage_trt.cli.bench import add_bench_parser, cmd_bench

    out = tmp_path_factory.mktemp("bench") / "out.json"
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers())
    args = parser.parse_args(
        ["bench", "--model", "tiny", "--workflow", "zimage-121101", "--backends", "torch",
         "--iters", "1", "--warmup", "0", "--repeats", "1", "--json", str(out), "-q"]
    )  # fmt: skip
    assert args.func is cmd_bench and cmd_bench(args) == 0
    return out, out.with_suffix(".md").read_text(encoding="utf-8")


def test_reference_run_json_has_every_figure(reference_run: tuple[Path, str]) -> None:
    path, _ = reference_run
    result = json.loads(path.read_text(encoding="utf-8"))
    assert result["schema"] == "zimage-trt-bench/1"
    assert {"platform", "cpu", "cpu_count", "gpu"} <= set(result["machine"])
    assert result["machine"]["gpu"] is None and result["device"] == "cpu"
    assert result["timer"] == "perf_counter" and result["dtype"] == "float32"
    assert {"zimage_trt", "torch", "onnxruntime", "diffusers"} <= set(result["versions"])
    assert result["settings"]["backends"] == ["torch"]
    assert result["dit_config"]["dim"] == 64  # the tiny DiT, read from its checkpoint
    torch_run = result["backends"]["torch"]
    assert torch_run["status"] == "ok" and torch_run["load_seconds"] > 0

    components = [(c["engine"], c["shape"]) for c in torch_run["components"]]
    assert components == [
        ("text_encoder", "positive prompt, 29 tokens"),
        ("caption_path", "positive prompt, 29 tokens"),
        ("text_encoder", "negative prompt, 1587 tokens"),
        ("caption_path", "negative prompt, 1587 tokens"),
        ("denoiser", "1×16×28×22, 32 caption slots"),  # cfg 2, lengths differ: two calls
        ("denoiser", "1×16×28×22, 1600 caption slots"),
        ("vae_decoder", "1×16×28×22 → 176×224 px"),
        ("denoiser", "1×16×54×42, 32 caption slots"),
        ("vae_decoder", "1×16×54×42 → 336×432 px"),
        ("denoiser", "1×16×108×84, 32 caption slots"),
        ("vae_decoder", "1×16×108×84 → 672×864 px"),
    ]
    assert all(c["seconds"]["n"] == 1 for c in torch_run["components"])
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v
                              for k, v in result["dit_config"].items()}  # fmt: skip
    tiny = DiTConfig(**fields)
    upscale = torch_run["components"][9]
    assert upscale["stages"] == ["upscale"]
    assert upscale["flops"] == dit_flops(tiny, 54 * 42, 32).denoiser
    assert upscale["fraction_of_bf16_peak"] is None  # no GPU, no peak

    e2e = torch_run["end_to_end"]
    assert e2e["repeats"] == 1 and e2e["images_per_second"] > 0
    parts = e2e["parts"]
    assert [p["name"] for p in parts] == ["text", "base", "refine", "upscale", "decode", "other"]
    stages = parts[1:4]
    assert [s["model_calls"] for s in stages] == [18, 16, 31]
    assert [s["steps"] for s in stages] == [9, 16, 16]
    assert [s["latent_shape"] for s in stages] == [[1, 16, 28, 22], [1, 16, 54, 42],
                                                   [1, 16, 108, 84]]  # fmt: skip
    assert stages[0]["denoiser_shapes"] == {"1×16×28×22, 32 caption slots": 9,
                                            "1×16×28×22, 1600 caption slots": 9}  # fmt: skip
    assert stages[2]["denoiser_shapes"] == {"1×16×108×84, 32 caption slots": 31}
    assert stages[2]["flops"] == 31 * dit_flops(tiny, 54 * 42, 32).denoiser
    assert e2e["final_latent_shape"] == [1, 16, 108, 84] and e2e["image_shape"] == [864, 672, 3]

    cache = torch_run["cache_effect"]
    assert [s["calls_uncached_run"] for s in cache["stages"]] == [18, 16, 31]
    assert [s["calls_saved"] for s in cache["stages"]] == [s["calls_skipped"] for s in stages]
    for s in cache["stages"]:
        assert s["calls_cached_run"] + s["calls_saved"] == s["calls_uncached_run"]
    assert [s["easycache"] is not None for s in cache["stages"]] == [False, True, True]
    assert cache["final_latent_max_abs_delta"] >= 0.0
    prompt = cache["prompt_cache"]
    assert (prompt["encoder_calls_first"], prompt["encoder_calls_repeat"]) == (2, 0)
    assert (prompt["caption_path_calls_first"], prompt["caption_path_calls_repeat"]) == (2, 0)

    base = result["baselines"]["diffusers_single_stage"]
    assert (base["width"], base["height"], base["steps"]) == (672, 864, 16)
    assert base["diffusers"]["transformer_calls"] == base["ours"]["dit_calls"] == 16
    assert base["final_latent_max_abs_delta"] <= 1e-4  # the same run on both sides
    assert math.isfinite(base["per_step_overhead_seconds"])
    assert result["baselines"]["torch_eager_multi_stage"]["speedup_vs_torch"] == {"torch": 1.0}

    memory = torch_run["memory"]  # the planner's activations beside the RSS each phase added
    assert memory["kind"] == "rss" and memory["baseline_bytes"] > 100 * 2**20
    phases = {p["name"]: p for p in memory["phases"]}
    assert list(phases) == ["text", "captions", "base", "base decode", "refine", "refine decode",
                            "upscale", "upscale decode"]  # fmt: skip
    decode = phases["upscale decode"]  # the run's largest: the 672×864 decode
    assert decode["predicted_peak_bytes"] > 100 * 2**20
    assert decode["predicted_peak_bytes"] == max(p["predicted_peak_bytes"] for p in phases.values())
    # within 16 MiB (16,777,216 B, under half of one 16-channel 672×864 map): measured inside a
    # pytest worker that ran other tests before (the fresh-process comparison,
    # tests/test_memory_plan.py, holds to 8 MiB)
    measured, predicted = decode["measured_peak_bytes"], decode["predicted_peak_bytes"]
    assert abs(measured - predicted) <= 16 * 2**20, (measured, predicted)
    assert parts[4]["memory"] == {"kind": "rss", "predicted_peak_bytes": max(
        phases[n]["predicted_peak_bytes"] for n in ("base decode", "refine decode",
                                                    "upscale decode")),
        "measured_peak_bytes": max(phases[n]["measured_peak_bytes"] for n in (
            "base decode", "refine decode", "upscale decode"))}  # fmt: skip
    assert parts[0]["memory"]["predicted_peak_bytes"] == phases["text"]["predicted_peak_bytes"]

    roof = result["roofline"]
    assert roof["gpu"] is None and roof["bf16_peak_flops"] is None
    assert [r["shape"] for r in roof["denoiser"]] == [c[1] for c in components if
                                                      c[0] == "denoiser"]  # fmt: skip
    assert _positive_seconds(result) > 40


def test_reference_run_markdown_and_chart(reference_run: tuple[Path, str]) -> None:
    path, md = reference_run
    for header in (
        "| backend | engine | shape | median ms | p90 ms | n | TFLOP/s | bf16 peak |",
        "| backend | device | runs | median s | p90 s | images/s | first run s | build/compile s | "
        "vs torch eager |",
        "| backend | part | latent | steps | DiT calls | cache skips | median s | p90 s | "
        "ms/step | DiT TFLOP/s |",
        "| run | size | steps | DiT calls | median s | ms/step |",
        "| backend | stage | EasyCache | DiT calls | calls saved | calls without cache | "
        "s cached | s uncached |",
        "| backend | denoiser call | GFLOP/call | median ms | TFLOP/s | bf16 peak |",
        "| backend | phase | kind | measured MiB | predicted MiB |",
    ):
        assert header in md.splitlines(), header
    assert "| torch | upscale | 16×108×84 | 16 | 31 | 0 |" in md
    with Image.open(path.with_suffix(".png")) as chart:
        assert chart.format == "PNG"
        assert chart.size == chart_size(1, 6) == (960, 170)


SMALL = {
    "name": "small",
    "prompts": {"positive": "a red fox in snow", "negative": "模糊，低清晰度"},
    "stages": [
        {"name": "base", "latent": {"source": "empty", "width": 128, "height": 96},
         "sampler": {"name": "euler"}, "scheduler": {"name": "simple", "steps": 3},
         "cfg": 2.0, "seed": 1, "preview": True},
        {"name": "up", "latent": {"source": "upscale", "scale": 2.0},
         "sampler": {"name": "euler"}, "scheduler": {"name": "simple", "steps": 4, "denoise": 0.5},
         "seed": 2, "cache": {"threshold": 0.3, "start_percent": 0.2, "end_percent": 0.95}},
    ],
}  # fmt: skip


def test_onnxruntime_against_torch_with_a_folder_built_by_the_bench(tmp_path: Path) -> None:
    """A small two-stage workflow: the bench builds the ONNX Runtime folder itself, records the
    build apart from the runs, and both backends make the same calls and latents."""
    wf = Workflow.from_dict(SMALL)
    result = run_bench(
        "tiny", wf, "onnxruntime", iters=1, warmup=0, repeats=1, engines_root=tmp_path / "eng"
    )
    assert result["settings"]["backends"] == ["torch", "onnxruntime"]
    assert result["settings"]["torch_added_as_baseline"] is True
    ort = result["backends"]["onnxruntime"]
    build = ort["build"]
    assert build["built_here"] is True and build["seconds"] > 0
    assert build["engines_built"] == ["text_encoder", "caption_path", "denoiser", "vae_decoder"]
    assert Path(build["folder"]).parent == tmp_path / "eng"
    by_backend = {
        b: [(s["model_calls"], s["calls_skipped"]) for s in r["end_to_end"]["parts"][1:3]]
        for b, r in result["backends"].items()
    }
    assert by_backend["onnxruntime"] == by_backend["torch"]
    assert by_backend["torch"][0] == (3, 0)  # cond and uncond of equal length: batched
    assert ort["end_to_end"]["parts"][1]["denoiser_shapes"] == {"2×16×12×16, 32 caption slots": 3}
    assert result["agreement"]["onnxruntime"]["final_latent_max_abs_delta_vs_torch"] < 1e-3
    assert [c["shape"] for c in ort["components"] if c["engine"] == "denoiser"] == [
        "2×16×12×16, 32 caption slots",
        "1×16×24×32, 32 caption slots",
    ]
    assert "speedup_vs_torch" in result["baselines"]["torch_eager_multi_stage"]
    assert result["baselines"]["diffusers_single_stage"]["steps"] == 4
    _positive_seconds(result)

    # a second bench on the same folder reuses every engine by cache key
    pipeline, again = engine_folder_pipeline(
        "onnxruntime", None, wf, "tiny", None, tmp_path / "eng", lambda msg: None
    )
    assert again["engines_reused"] == build["engines_built"] and again["engines_built"] == []
    assert pipeline.engines.backend == "onnxruntime"

    write_outputs(result, None, tmp_path / "o.md", tmp_path / "o.png")
    assert (tmp_path / "o.md").read_text(encoding="utf-8") == markdown(result)
    with Image.open(tmp_path / "o.png") as chart:
        assert chart.size == chart_size(2, 5)  # text, base, up, decode, other
    assert not (tmp_path / "o.json").exists()
