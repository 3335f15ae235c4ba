"""Where the text encoder and the DiT stay (issue 17): released between turns or on the CPU, or
placed by a ``--max-vram`` plan, a run gives the resident run's image to the bit; the plan is
followed, and what would pass the budget is refused with the numbers."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_memory_plan import _one_stage

from zimage_trt.bench.memory import _Meter, bench_memory
from zimage_trt.bench.run import run_bench
from zimage_trt.cli import main
from zimage_trt.engines.placement import OnCpu, Reload, TurnEngine, Turns
from zimage_trt.engines.tensorrt_engines import WeightBudget
from zimage_trt.errors import InputError
from zimage_trt.runtime.memory_plan import MIB
from zimage_trt.runtime.pipeline import Pipeline
from zimage_trt.runtime.preflight import phase_calls
from zimage_trt.workflow import Workflow

WF = _one_stage()  # 336×432, one step, cfg 2 with the 1,587-token negative prompt
# the tiny model's CPU plan for WF (fp32): everything resident 79,763,276 B at its peak (the
# decode), released 60,166,860 B (the decode); 70 MiB = 73,400,320 B lies between
BUDGET = 70 * MIB


@pytest.fixture(scope="module")
def resident() -> np.ndarray:
    pipeline = Pipeline.open(model="tiny", workflow=WF, device="cpu", log=lambda msg: None)
    return pipeline.run(WF).image


def _device(module: torch.nn.Module) -> str:
    return next(module.parameters()).device.type


def test_a_released_text_encoder_takes_turns_with_the_dit(resident: np.ndarray) -> None:
    logs: list[str] = []
    pipeline = Pipeline.open(model="tiny", workflow=WF, device="cpu", text_encoder="released",
                             log=logs.append)  # fmt: skip
    text, dit = pipeline.engines.text_encoder, pipeline.engines.denoiser
    assert isinstance(text, TurnEngine) and isinstance(dit, TurnEngine)
    assert _device(text.module) == "meta"  # never read beside the DiT
    assert np.array_equal(pipeline.run(WF).image, resident)
    turns = text.turns
    # both prompts encoded in one turn, then the DiT read again for the caption paths
    assert (turns.turns, turns.on) == (2, "DiT")
    assert (_device(text.module), _device(dit.module)) == ("meta", "cpu")
    assert np.array_equal(pipeline.run(WF).image, resident)
    assert turns.turns == 2  # the prompts cached: no turn
    assert sum(line.startswith("loading the DiT from") for line in logs) == 2
    with pytest.raises(InputError) as refused:
        dit.refit({})
    assert str(refused.value) == (
        "the DiT is released between its turns and read again from the model's files, which "
        "would drop LoRAs switched into it: switching LoRAs needs a budget that keeps it "
        "resident (a larger --max-vram)"
    )


def test_a_text_encoder_on_the_cpu_gives_the_same_image(resident: np.ndarray) -> None:
    pipeline = Pipeline.open(model="tiny", workflow=WF, device="cpu", text_encoder="cpu",
                             log=lambda msg: None)  # fmt: skip
    assert isinstance(pipeline.engines.text_encoder, OnCpu)
    assert np.array_equal(pipeline.run(WF).image, resident)


def test_turns_park_the_network_on_the_device_before_bringing_another() -> None:
    events: list[str] = []

    class Recorder:
        def __init__(self, name: str) -> None:
            self.name = name

        def park(self) -> None:
            events.append(f"park {self.name}")

        def bring(self) -> None:
            events.append(f"bring {self.name}")

    turns = Turns({"a": Recorder("a"), "b": Recorder("b")}, on="a")
    for name in ("a", "b", "b", "a"):
        turns.hold(name)
    assert events == ["park a", "bring b", "park b", "bring a"] and turns.turns == 2


def _write(wf: Workflow, path: Path) -> str:
    path.write_text(wf.to_yaml())
    return str(path)


def test_max_vram_follows_its_plan_and_refuses_what_passes_it(
    resident: np.ndarray, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    workflow = _write(WF, tmp_path / "one-stage.yaml")
    argv = ["generate", "--model", "tiny", "-w", workflow, "--device", "cpu", "-q"]
    assert main([*argv, "--max-vram", "70M", "--out", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    plan = (
        "plan: text encoder released after encoding (the prompt cache keeps its output)\n"
        "predicted peak: 57.4 MiB + 0.0 MiB (nothing) = 57.4 MiB of 70.0 MiB RAM"
    )
    assert plan in captured.err
    written = Path(captured.out.strip().splitlines()[-1].removeprefix("wrote "))
    assert np.array_equal(np.asarray(Image.open(written).convert("RGB")), resident)

    # the least of the ladder: released alone (a tile costs more than it saves here)
    assert main([*argv, "--max-vram", "40M"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "zimage-trt: error: --max-vram 40.0 MiB (RAM: planned for the CPU) is too little for "
        "zimage-121101 at DiT fp32, text encoder fp32: the smallest budget that works is "
        "57.4 MiB (text encoder released after encoding (the prompt cache keeps its output))"
    )
    assert main([*argv, "--max-vram", "70M", "--vae-tiles", "512"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "zimage-trt: error: --max-vram tiles the decode by its plan: pass it without --vae-tiles"
    )
    assert main([*argv, "--max-vram", "70M", "--compile"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "zimage-trt: error: --compile keeps every network whole on the device; this run places "
        "the text encoder released: run it eager (without --compile)"
    )


def test_a_pipeline_checks_each_workflow_against_its_budget_and_bench_measures_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pipeline = Pipeline.open(model="tiny", workflow=WF, device="cpu", max_vram=BUDGET,
                             log=lambda msg: None)  # fmt: skip
    assert pipeline.budget is not None and pipeline.budget.plan.strategy.text_encoder == "released"
    first = WF.stages[0]
    latent = first.latent.model_copy(update={"width": 448, "height": 576})
    larger = WF.model_copy(update={"stages": [first.model_copy(update={"latent": latent})]})
    with pytest.raises(InputError) as refused:
        pipeline.check(larger)
    assert str(refused.value) == (
        "workflow 'zimage-121101' needs 98.8 MiB at its base decode phase under this "
        "pipeline's memory plan (text encoder released after encoding (the prompt cache keeps "
        "its output)), more than --max-vram 70.0 MiB: ask for a smaller image or a shorter "
        "prompt, or open the pipeline for this workflow"
    )
    # bench's measurement: each call's activations, the turn that brought its network in
    # taken before the peak is reset (an RSS inside a test worker is too noisy to tell apart)
    events: list[str] = []
    bring, reset = Reload.bring, _Meter.reset

    def brought(self: Reload) -> None:
        events.append(f"bring {type(self.module).__name__}")
        bring(self)

    def reset_peak(self: _Meter) -> int:
        events.append("reset")
        return reset(self)

    monkeypatch.setattr(Reload, "bring", brought)
    monkeypatch.setattr(_Meter, "reset", reset_peak)
    memory = bench_memory(pipeline, WF)
    assert events[:4] == ["bring Qwen3TextEncoder", "reset", "reset", "bring ZImageDiT"]
    assert set(events[4:]) == {"reset"}
    text = {p["name"]: p for p in memory["phases"]}["text"]
    assert text["predicted_peak_bytes"] == 28_123_227  # the plan's, released or not


def test_max_vram_is_refused_where_no_plan_applies(tmp_path: Path) -> None:
    with pytest.raises(InputError) as refused:
        Pipeline.open(engines=tmp_path, max_vram=BUDGET)
    assert str(refused.value) == (
        "--max-vram plans the torch backend (--model): an engine folder's memory is set when it "
        "is built (--weight-streaming, --vae-tiles) and loaded (--weight-streaming-budget, "
        "--vae-tiles)"
    )
    with pytest.raises(InputError) as refused:
        Pipeline.open(model="tiny", weight_budget=WeightBudget(40.0))
    assert str(refused.value) == (
        "--weight-streaming-budget serves an engine folder built --weight-streaming (--engines "
        "DIR); the torch backend streams with --resident-blocks"
    )
    with pytest.raises(InputError) as refused:
        run_bench("tiny", WF, "torch,onnxruntime", max_vram=BUDGET)
    assert str(refused.value) == (
        "--max-vram plans the eager torch backend alone: pass --backends torch --skip-baseline "
        "(the other backends and diffusers' baseline follow no budget)"
    )


def test_a_server_plans_for_its_batch_sampled_together() -> None:
    """``--max-batch 3``: each denoiser call holds three runs' cond and uncond, padded to the
    longest caption slot (29 → 32, 1,587 → 1,600 tokens)."""
    one, three = (dict(phase_calls(WF, [29, 1587], n))["base"] for n in (1, 3))
    assert one == [("denoiser", {"latents": (1, 16, 54, 42), "cap_valid": (1, 32)}),
                   ("denoiser", {"latents": (1, 16, 54, 42), "cap_valid": (1, 1600)})]  # fmt: skip
    assert three == [("denoiser", {"latents": (6, 16, 54, 42), "cap_valid": (6, 1600)})]


def test_a_bf16_text_encoder_is_kept_in_bf16_and_upcast_block_by_block(tmp_path: Path) -> None:
    """The tiny model with its text encoder stored in bf16 (as Z-Image's Qwen3 is): under a
    --max-vram plan its weights stay bf16 (half the bytes) and each block is upcast as it runs;
    the image is the fp32-weights run's to the bit."""
    from safetensors.torch import load_file, save_file

    from zimage_trt.models.tiny import tiny_model_dir

    folder = tmp_path / "bf16-text"
    shutil.copytree(tiny_model_dir(), folder)
    weights = folder / "text_encoder" / "model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(weights).items()}, weights)
    wf = WF.model_copy(deep=True)
    wf.models.loras = []
    fp32 = Pipeline.open(model=str(folder), workflow=wf, device="cpu", log=lambda msg: None)
    logs: list[str] = []
    bf16 = Pipeline.open(model=str(folder), workflow=wf, device="cpu", max_vram=1 << 30,
                         log=logs.append)  # fmt: skip
    stored = {p.dtype for p in bf16.engines.text_encoder.module.parameters()}
    assert stored == {torch.bfloat16}
    assert {p.dtype for p in fp32.engines.text_encoder.module.parameters()} == {torch.float32}
    assert np.array_equal(bf16.run(wf).image, fp32.run(wf).image)
    assert bf16.budget is not None
    planner = bf16.budget.planner
    # the tiny encoder: 9,798,208 B in bf16 (19,596,416 in fp32); one upcast block 49,536 B
    assert (planner.weights["text encoder"], planner.upcast) == (9_798_208, 49_536)
    plan = next(line for line in logs if line.startswith("memory plan")).splitlines()
    assert plan[3] == "text encoder  bf16       9.3 MiB  RAM"


def test_upcast_per_block_computes_the_fp32_encoder_s_hidden_states_to_the_bit() -> None:
    import copy

    from zimage_trt.engines.placement import upcast_per_block
    from zimage_trt.models.text_encoder import Qwen3Config, Qwen3TextEncoder

    torch.manual_seed(0)
    fp32 = Qwen3TextEncoder(Qwen3Config.tiny())
    with torch.no_grad():  # the values a bf16 file holds
        for param in fp32.parameters():
            param.copy_(param.to(torch.bfloat16).float())
    kept = copy.deepcopy(fp32).to(torch.bfloat16)
    assert upcast_per_block(kept) == 49_536  # one block's 12,384 weights in fp32
    ids = torch.randint(0, 151_000, (2, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    with torch.inference_mode():
        got, expected = kept(ids, mask), fp32(ids, mask)
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    assert {p.dtype for p in kept.parameters()} == {torch.bfloat16}  # restored after each block


def test_serve_plans_for_its_max_batch(tmp_path: Path) -> None:
    import argparse

    from zimage_trt.cli.serve import add_serve_parser, source_from

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    workflow = _write(WF, tmp_path / "one-stage.yaml")
    args = parser.parse_args(["serve", "--model", "tiny", "-w", workflow, "--device", "cpu",
                              "--max-vram", "200M", "--max-batch", "3"])  # fmt: skip
    source = source_from(args)
    assert (source.max_vram, source.max_batch, source.weight_budget) == (200 * MIB, 3, None)
    pipeline = source.open(lambda msg: None)
    assert pipeline.budget is not None and pipeline.budget.planner.side_by_side == 3
    base = dict(pipeline.budget.planner.phases)["base"]
    assert base == [("denoiser", {"latents": (6, 16, 54, 42), "cap_valid": (6, 1600)})]
