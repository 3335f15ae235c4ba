"""``zimage-trt build --calibration`` (issue 16): the tiny DiT calibrated on the reference
workflow (its tiny LoRA fused) at FP8 — its attention's q/k/v and the text encoder too — and
INT8, built into ONNX Runtime folders beside the shared fp32 one (what is not quantized reused),
the Q/DQ graphs checked against ModelOpt's fake-quant model, run end to end, and compiled by the
real TensorRT-RTX builder (8.9 and 12.0; refused for 8.6)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import onnx
import pytest

from zimage_trt.build_engines.build import BuildResult
from zimage_trt.calibration.calibrate import calibrate, dependencies, load, save, shipped_prompts
from zimage_trt.calibration.quantize import restore
from zimage_trt.cli import main
from zimage_trt.engines.manifest import read_manifest
from zimage_trt.runtime.pipeline import Pipeline
from zimage_trt.workflow import Workflow, load_workflow
from zimage_trt.workflow.resolve import model_sources

QUIET = {"log": lambda msg: None}


@dataclass
class Calibrated:
    calibration: Path
    folder: Path  # the engine folder
    stdout: str  # the build's printed checks (the CLI's tables)


def _calibrated_folder(precision: str, built: BuildResult, tmp: Path) -> Calibrated:
    """Calibrate on the reference workflow's first stage (1 prompt, 2 steps: the same DiT and
    LoRA, in seconds; FP8 with the attention and the text encoder), then build the shared fp32
    folder's copy with the calibration through the CLI: only the quantized engines are made."""
    pipeline = Pipeline.open(model="tiny", workflow=_short(2), device="cpu", **QUIET)
    assert pipeline.workflow is not None
    sources = model_sources(pipeline.workflow, "tiny", **QUIET)
    everything = precision == "fp8"
    calibrated = calibrate(
        pipeline, precision, shipped_prompts()[:1], attention=everything,
        text_encoder=everything, dependencies=dependencies(sources, text_encoder=everything),
    )  # fmt: skip
    save(calibrated, tmp / "calibration")
    out = tmp / "engines"
    shutil.copytree(built.folder, out)
    argv = ["build", "--model", "tiny", "-w", "zimage-121101", "--backend", "onnxruntime",
            "--calibration", str(tmp / "calibration"), "--out", str(out), "-q"]  # fmt: skip
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(argv) == 0
    return Calibrated(tmp / "calibration", out, printed.getvalue())


def _short(steps: int) -> Workflow:
    """The reference workflow's first stage only, at ``steps`` steps."""
    wf = load_workflow("zimage-121101")
    first = wf.stages[0]
    scheduler = first.scheduler.model_copy(update={"steps": steps})
    return wf.model_copy(update={"stages": [first.model_copy(update={"scheduler": scheduler})]})


@pytest.fixture(scope="module")
def fp8(built: BuildResult, tmp_path_factory: pytest.TempPathFactory) -> Calibrated:
    return _calibrated_folder("fp8", built, tmp_path_factory.mktemp("fp8"))


@pytest.fixture(scope="module")
def int8(built: BuildResult, tmp_path_factory: pytest.TempPathFactory) -> Calibrated:
    return _calibrated_folder("int8", built, tmp_path_factory.mktemp("int8"))


def _qdq(graph: onnx.GraphProto) -> dict[str, int]:
    """Q/DQ nodes: quantize, dequantize, per-channel dequantize, and zero points by type."""
    types = {i.name: onnx.TensorProto.DataType.Name(i.data_type) for i in graph.initializer}
    counts = {"QuantizeLinear": 0, "DequantizeLinear": 0, "per_channel": 0}
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            counts[node.op_type] += 1
            axis = [a.i for a in node.attribute if a.name == "axis"]
            counts["per_channel"] += node.op_type == "DequantizeLinear" and axis == [0]
            if node.op_type == "QuantizeLinear":
                kind = types[node.input[2]]
                counts[kind] = counts.get(kind, 0) + 1
    return counts


def _parity_lines(printed: str, engine: str) -> list[list[str]]:
    return [line.split() for line in printed.splitlines() if line.startswith(f"{engine} ")
            and "mean" in line]  # fmt: skip


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_a_calibrated_build_exports_standard_qdq_for_what_was_calibrated(
    precision: str, request: pytest.FixtureRequest, built: BuildResult
) -> None:
    case: Calibrated = request.getfixturevalue(precision)
    folder = case.folder
    manifest = read_manifest(folder)
    saved = load(case.calibration)
    q = manifest.quantization
    assert q is not None and manifest.precision == "fp32"
    fp8 = precision == "fp8"  # its attention q/k/v and text encoder quantized too
    assert (q.precision, q.quantizers, q.prompts, q.opset) == (precision, 86 if fp8 else 68, 1, 19)
    assert (q.attention, q.text_encoder, q.text_encoder_quantizers) == (
        (True, "fp8", 42) if fp8 else (False, None, 0)
    )
    assert q.calibration_sha256 == saved.sha256 and q.workflow == "zimage-121101"
    assert saved.record["stages"] == ["base"]  # calibrated on the first stage (see the fixture)
    assert q.exclude == ["x_embedder", "t_embedder", "cap_embedder", "final_layer"]
    shared = read_manifest(built.folder)
    quantized = {"caption_path": (10, 2), "denoiser": (24, 4)}  # Linears, attentions
    if fp8:
        quantized["text_encoder"] = (21, 0)  # 3 blocks of 7 Linears; the embedding kept
    for name in {"text_encoder", "vae_decoder"} - set(quantized):  # reused: same files
        assert manifest.engines[name] == shared.engines[name]
        assert f"{name}: reused (cache key matches, files verified)" in case.stdout
    zero = "FLOAT8E4M3FN" if fp8 else "INT8"
    for name, (linears, attentions) in quantized.items():
        entry = manifest.engines[name]
        assert entry.cache_key != shared.engines[name].cache_key and not entry.refittable
        graph = onnx.load(str(folder / entry.file)).graph
        counts = _qdq(graph)
        # one Q/DQ pair per input and per weight of every quantized Linear, and (FP8) per q, k
        # and v of every attention
        pairs = 2 * linears + 3 * attentions * fp8
        assert counts["QuantizeLinear"] == counts["DequantizeLinear"] == pairs, name
        assert counts[zero] == pairs and counts["per_channel"] == (
            0 if fp8 else linears
        )  # INT8 weights: a scale per output channel
        amax = {i.name for i in graph.initializer if i.name.endswith(".amax")}
        component = "text_encoder" if name == "text_encoder" else "transformer"
        assert len(amax) == pairs and amax <= set(saved.states[component]), name
        rows = _parity_lines(case.stdout, name)  # every profile corner, graph vs fake-quant
        assert len(rows) == {"caption_path": 3, "denoiser": 6, "text_encoder": 3}[name], name
        for row in rows:  # … max|Δ| limit "mean" mean-rel unquantized runner ok
            mean_rel, unquantized = float(row[-4]), float(row[-3])
            assert row[-2:] == ["onnxruntime", "ok"] and mean_rel < 0.1, row
            assert mean_rel < 0.9 * unquantized, row  # it is the quantized model it computes


def test_the_fp8_folder_generates_what_the_fake_quant_model_generates(fp8: Calibrated) -> None:
    """One stage of the reference workflow (1 step) from the ONNX Runtime folder against the
    torch backend with ModelOpt's fake quantization restored (DiT and text encoder), and the
    unquantized model."""
    short = _short(1)
    onnx_run = Pipeline.open(engines=fp8.folder, workflow=short, **QUIET)
    assert onnx_run.engines.quantization == (
        "DiT fp8 Q/DQ (attention q/k/v too), text encoder fp8 Q/DQ"
    )
    torch_run = Pipeline.open(model="tiny", workflow=short, device="cpu", **QUIET)
    full = torch_run.run(short).latent
    saved = load(fp8.calibration)
    for engine, component in ((torch_run.engines.denoiser, "transformer"),
                              (torch_run.engines.text_encoder, "text_encoder")):  # fmt: skip
        restore(engine.module, saved.config(component), saved.states[component])
    torch_run.clear_caches()  # the captions again, through the caption path's quantizers
    fake = torch_run.run(short).latent
    got = onnx_run.run(short).latent
    scale = float(fake.abs().mean())
    error, off = float((got - fake).abs().mean()) / scale, float((full - fake).abs().mean()) / scale
    print(f"fp8 folder, one stage: mean |Δ| vs fake-quant {error:.3g}, unquantized {off:.3g}")
    assert error < 0.1 and error < 0.5 * off


@pytest.mark.parametrize(
    ("precision", "engine", "quantize_layers"),
    [("fp8", "caption_path", 26), ("fp8", "text_encoder", 42), ("int8", "caption_path", 20)],
)
def test_tensorrt_rtx_compiles_the_qdq_graphs_strongly_typed(
    precision: str, engine: str, quantize_layers: int, request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:  # fmt: skip
    from zimage_trt.build_engines.tensorrt_builder import build_tensorrt_engine

    case: Calibrated = request.getfixturevalue(precision)
    entry = read_manifest(case.folder).engines[engine]
    info = build_tensorrt_engine(
        case.folder / entry.file, tmp_path / f"{engine}.plan", entry.profiles,
        library="tensorrt_rtx", compute_capabilities=("8.9", "12.0"), log=lambda m: None,
    )  # fmt: skip
    typed = {dtype: sum(kinds.get(dtype, 0) for kinds in info.layers.values())
             for dtype in ("fp8", "int8")}  # fmt: skip
    # the builder types each quantize layer's output in the calibration's format, nothing else
    assert typed == {kind: quantize_layers if kind == precision else 0 for kind in ("fp8", "int8")}
    assert info.engine_bytes > 1_000_000 and info.compute_capabilities == ("8.9", "12.0")


def _refusal(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err.strip().removeprefix("zimage-trt: error: ")


def test_what_a_calibration_cannot_build_is_refused_before_any_work(
    fp8: Calibrated, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    build = ["build", "--model", "tiny", "-w", "zimage-121101", "--out", str(tmp_path / "out"),
             "--calibration", str(fp8.calibration)]  # fmt: skip
    assert _refusal([*build, "--backend", "tensorrt-rtx", "--compute-capability", "8.6,8.9"],
                    capsys) == (
        "FP8 engines need compute capability ≥ 8.9 (Ada, Hopper, Blackwell: FP8 tensor cores); "
        "--compute-capability 8.6 has none: build there from an int8 calibration (zimage-trt "
        "calibrate --precision int8)"
    )  # fmt: skip
    assert _refusal([*build, "--backend", "tensorrt-rtx", "--refittable"], capsys) == (
        "--refittable with --calibration: a calibration holds for the weights it saw (a LoRA "
        "change invalidates it), so calibrated engines are not refit; build without --refittable"
    )
    no_lora = ["build", "--model", "tiny", "--resolutions", "256x256", "--backend",
               "onnxruntime", "--calibration", str(fp8.calibration), "--out",
               str(tmp_path / "out")]  # fmt: skip
    assert _refusal(no_lora, capsys) == (
        f"the calibration in {fp8.calibration} was made with the LoRAs "
        "zimage_lora.safetensors@1; this build fuses none: a LoRA change invalidates a "
        "calibration (calibrate again with this workflow)"
    )
    assert _refusal([*build[:-1], str(tmp_path)], capsys) == (
        f"--calibration {tmp_path}: no calibration.json there (make one with zimage-trt calibrate)"
    )
    other = tmp_path / "other-encoder"  # the same calibration, made for another text encoder
    shutil.copytree(fp8.calibration, other)
    record = json.loads((other / "calibration.json").read_text())
    record["depends_on"]["text_encoder"] = "0" * 64
    (other / "calibration.json").write_text(json.dumps(record))
    assert _refusal([*build[:-1], str(other), "--backend", "onnxruntime", "-q"], capsys) == (
        f"the calibration in {other} quantizes other text encoder weights (sha-256 "
        "000000000000…); calibrate with this text encoder"
    )
    assert not (tmp_path / "out").exists()


def test_the_defaults_leave_rtx_targets_without_fp8_out() -> None:
    from zimage_trt.engines.tensorrt_env import rtx_targets

    assert rtx_targets(None, fp8=True) == (
        ("8.9", "12.0"),
        "no GPU here; built for the RTX defaults, less 8.6 (no FP8)",
    )
    assert rtx_targets("8.6", fp8=False)[0] == ("8.6",)  # INT8 runs there


def test_inspect_names_the_quantization_and_refuses_lora_swaps(
    fp8: Calibrated, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", str(fp8.folder)]) == 0
    shown = capsys.readouterr().out
    sha = load(fp8.calibration).sha256[:12]
    assert (
        "quantization: DiT fp8 Q/DQ (attention q/k/v too), text encoder fp8 Q/DQ, 128 quantizers "
        "calibrated on zimage-121101 with 1 prompt(s); "
        "full precision: x_embedder, t_embedder, cap_embedder, final_layer (calibration sha-256 "
        f"{sha}…)"
    ) in shown
    assert (
        "other LoRAs or strengths: a rebuild (its DiT engines are fp8-calibrated and a LoRA "
        "change invalidates a calibration (calibrate with the LoRAs, then build))"
    ) in shown
