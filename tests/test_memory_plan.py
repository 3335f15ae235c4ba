"""The memory planner (issue 17): activations counted on the meta device equal the same count on
real tensors, the CPU prediction matches the RSS a fresh process really adds, the full-size
plans for 8 / 12 / 16 / 24 GiB, and the refusals naming the smallest budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zimage_trt.cli import main
from zimage_trt.errors import InputError
from zimage_trt.models.dit import DiTConfig, ZImageDiT
from zimage_trt.models.text_encoder import Qwen3Config
from zimage_trt.models.tokenizer import QwenTokenizer
from zimage_trt.models.vae import FluxVAE, VAEConfig, VAEDecoder
from zimage_trt.runtime.activation_peak import activation_peak
from zimage_trt.runtime.memory_plan import GIB, MIB, MemoryPlanner, Strategy
from zimage_trt.runtime.preflight import prompt_tokens
from zimage_trt.runtime.vae_tiles import VaeTiles
from zimage_trt.workflow import Workflow, load_workflow

TINY = (DiTConfig.tiny(), Qwen3Config.tiny(), VAEConfig.tiny())
FULL = (DiTConfig(), Qwen3Config(), VAEConfig())


def _tokens(wf: Workflow) -> list[int]:
    return prompt_tokens(wf, QwenTokenizer.from_package())


def test_meta_activations_equal_the_count_on_real_tensors() -> None:
    """The DiT (cfg batch of 2, a 64-token caption) and the VAE decoder: the same ops allocate
    the same bytes on ``meta`` as on the CPU, to the byte."""
    torch.manual_seed(0)
    for device in ("cpu", "meta"):
        with torch.device(device):
            dit, vae = ZImageDiT(TINY[0]), VAEDecoder(FluxVAE(TINY[2]))
        x, caption = (
            torch.randn(2, 16, 24, 20, device=device),
            torch.randn(2, 64, 64, device=device),
        )
        valid, sigma = (
            torch.ones(2, 64, dtype=torch.bool, device=device),
            torch.rand(2, device=device),
        )
        counted = (
            activation_peak(lambda: dit(x, sigma, caption, valid)),  # noqa: B023
            activation_peak(lambda: vae(x[:1])),  # noqa: B023
        )
        if device == "cpu":
            on_cpu = counted
    assert counted == on_cpu and counted[0] > 1_000_000 and counted[1] > 10_000_000


PROBE = """
import gc, json, sys, torch
torch.set_num_threads(1)
from zimage_trt.runtime.pipeline import Pipeline
from zimage_trt.runtime.vae_tiles import VaeTiles

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

pipeline = Pipeline.open(model="tiny", workflow=sys.argv[1], device="cpu", log=lambda m: None)
wf = pipeline.workflow
modes = (None, VaeTiles.parse(sys.argv[2]))
out = {}
for tiles in modes + modes:  # first calls (kernels chosen, buffers made), then measured
    pipeline.vae_tiles = tiles
    pipeline.clear_caches()  # the text encoder runs again
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak RSS back to the current RSS: the baseline, weights loaded
    base = status("VmRSS:")
    pipeline.run(wf)
    out[str(tiles)] = status("VmHWM:") - base
print(json.dumps(out))
"""
TILES = VaeTiles(128, 32)  # 16-latent tiles overlapping by 4: the 54×42 latent in 12 shapes


def _one_stage() -> Workflow:
    """The reference workflow's first stage at 336×432 (its decode sets the peak), 1 step, cfg 2
    with the 1,587-token negative prompt."""
    wf = load_workflow("zimage-121101")
    first = wf.stages[0]
    latent = first.latent.model_copy(update={"width": 336, "height": 432})
    scheduler = first.scheduler.model_copy(update={"steps": 1})
    stage = first.model_copy(update={"latent": latent, "scheduler": scheduler})
    return wf.model_copy(update={"stages": [stage]})


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's clear_refs")
def test_the_cpu_prediction_is_the_rss_a_run_adds(tmp_path: Path) -> None:
    """A fresh process runs the tiny model whole and with tiled decoding (each after a first run);
    the RSS each run adds above the baseline (imports, weights) matches the planner's largest
    phase within 8 MiB (8,388,608 bytes: the uint8 image conversions in numpy, allocator
    slack)."""
    wf = _one_stage()
    path = tmp_path / "one-stage.yaml"
    path.write_text(wf.to_yaml())
    # glibc's fixed mmap threshold: every block ≥ 128 KiB is mapped and unmapped with its tensor,
    # so RSS follows what lives (by default freed blocks stay in the heap for the next run)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    done = subprocess.run([sys.executable, "-c", PROBE, str(path), str(TILES)], env=env,
                          capture_output=True, text=True, timeout=300, check=True)  # fmt: skip
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    planner = MemoryPlanner(wf, _tokens(wf), TINY, device="cpu")
    tolerance = 8 * MIB
    for tiles in (None, TILES):
        predicted = max(row.activations for row in planner.predict(Strategy(vae_tiles=tiles)))
        got = measured[str(tiles)]
        print(f"tiles {tiles}: predicted {predicted:,} B, measured {got:,} B")
        assert abs(got - predicted) <= tolerance, (tiles, got, predicted)
    assert measured[str(TILES)] < measured["None"] - 10 * MIB  # tiles save memory


@pytest.fixture(scope="module")
def full_size() -> MemoryPlanner:
    wf = load_workflow("zimage-121101")
    return MemoryPlanner(wf, _tokens(wf), FULL, device="cuda")


def test_the_full_size_plans_for_8_to_24_gib(full_size: MemoryPlanner) -> None:
    """Z-Image-Turbo's real configuration on the meta device, bf16, the reference workflow."""
    assert full_size.weights == {"DiT": 12_309_817_472, "text encoder": 7_843_069_440,
                                 "VAE": 167_639_366}  # fmt: skip
    assert (full_size.block, full_size.blocks) == (361_820_672, 30)
    chosen = {gib: full_size.plan(gib * GIB) for gib in (8, 12, 16, 24)}
    assert chosen[24].strategy == Strategy()
    assert chosen[16].strategy == Strategy("released")
    assert chosen[12].strategy == Strategy("released", VaeTiles(), 25)
    assert chosen[8].strategy == Strategy("cpu", VaeTiles(), 14)
    for gib, plan in chosen.items():
        assert plan.total <= gib * GIB
        assert plan.peak == max(p.peak for p in plan.phases)
    # the peak of everything resident is the full-size decode (1,587-token captions aside)
    worst = max(chosen[24].phases, key=lambda p: p.peak)
    assert worst.name == "upscale decode" and worst.calls == "vae_decoder 1×16×108×84"
    with pytest.raises(InputError) as refused:
        full_size.plan(2 * GIB)
    assert str(refused.value) == (
        "--max-vram 2.00 GiB is too little for zimage-121101 at DiT bf16, text encoder bf16: "
        "the smallest budget that works is 3.28 GiB (text encoder on the CPU; decode in tiles "
        "(512:64, ComfyUI's VAEDecodeTiled); DiT blocks streamed from CPU memory (0 of 30 "
        "resident, 2 staged: one computing, one arriving))"
    )


def test_quantized_weights_are_counted_at_their_stored_size() -> None:
    wf = load_workflow("zimage-121101")
    sizes = {
        precision: MemoryPlanner(
            wf, [29, 1587], FULL, dit_precision=precision, text_precision=text
        ).weights
        for precision, text in (("fp8", "fp8"), ("q8_0", "q8_0"), ("q4_k", "q4_k"))
    }
    # FP8: one byte per quantized Linear weight, the embedders and final layer in bf16
    assert sizes["fp8"]["DiT"] == 6_167_783_552 and sizes["fp8"]["text encoder"] == 4_310_679_040
    assert sizes["q8_0"]["DiT"] == 6_542_639_328 and sizes["q4_k"]["DiT"] == 3_465_703_904


def test_the_cli_prints_and_writes_plans_and_refuses_a_budget_too_small(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "plan.json"
    argv = ["plan", "--model", "tiny", "-w", "zimage-121101", "--device", "cpu"]
    assert main([*argv, "--max-vram", "1G,200M", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "== tiny · zimage-121101 · cpu · --max-vram 200M" in printed
    assert "plan: everything resident" in printed
    plans = json.loads(out.read_text())["plans"]
    assert [p["budget"] for p in plans] == [GIB, 200 * MIB]
    assert plans[1]["strategy"] == {"text_encoder": "released", "vae_tiles": "512:64",
                                    "dit_blocks": None, "staged": 2}  # fmt: skip
    assert plans[0]["tokens"] == [29, 1587] and plans[0]["total"] == plans[0]["peak"]
    assert main([*argv, "--max-vram", "1G", "--json", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"zimage-trt: error: {out} exists; not overwritten (pass --force to replace it)"
    )
    from zimage_trt.models.tiny import tiny_model_dir

    folder = ["plan", "--model", str(tiny_model_dir()), "-w", "zimage-121101", "--device", "cpu"]
    assert main([*folder, "--max-vram", "1G"]) == 0  # configurations read from the weights
    from_folder = capsys.readouterr().out.strip().splitlines()
    from_tiny = printed.split("\n\n== ")[0].strip().splitlines()  # its 1G plan
    assert from_folder[1:] == from_tiny[1:]  # the same plan under another header
    assert main([*argv, "--max-vram", "10M"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(
        "zimage-trt: error: --max-vram 10.0 MiB (RAM: planned for the CPU) is too little for "
        "zimage-121101 at DiT bf16, text encoder bf16: the smallest budget that works is "
    ) and err.endswith(" MiB (text encoder released after encoding (the prompt cache keeps its "
                       "output); decode in tiles (512:64, ComfyUI's VAEDecodeTiled))")  # fmt: skip
