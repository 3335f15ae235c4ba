"""``zimage-trt calibrate`` (issue 16, first part): ModelOpt's FP8 and INT8 post-training
quantization of the tiny DiT, calibrated by running a workflow (two stages, cfg with a negative
prompt) — what is saved restores a DiT that computes exactly what the calibrated one did."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.test_serve import WORKFLOW
from zimage_trt.calibration.calibrate import CALIBRATION, calibrate, load, save, shipped_prompts
from zimage_trt.calibration.quantize import quant_config, quantizers, restore
from zimage_trt.cli import main
from zimage_trt.engines.manifest import weights_sha256
from zimage_trt.engines.onnxruntime_engines import ort_options
from zimage_trt.errors import FileError, InputError
from zimage_trt.runtime.pipeline import Pipeline
from zimage_trt.workflow import Workflow, load_workflow

EXCLUDED = ["x_embedder", "cap_embedder.1", "t_embedder.mlp.0", "t_embedder.mlp.2",
            "final_layer.linear", "final_layer.adaLN_modulation.1"]  # fmt: skip


@pytest.fixture(scope="module")
def workflow(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("calibration") / "serve-test.yaml"
    path.write_text(WORKFLOW)
    return path


def _pipeline(workflow: Path) -> Pipeline:
    return Pipeline.open(model="tiny", workflow=workflow, device="cpu", log=lambda m: None)


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_a_calibration_restores_exactly_what_was_calibrated(
    precision: str, workflow: Path, tmp_path: Path
) -> None:
    pipeline = _pipeline(workflow)
    wf = pipeline.workflow
    assert isinstance(wf, Workflow)
    full = pipeline.run(wf).latent  # before quantizing
    seen: list[tuple[int, int]] = []
    calibrated = calibrate(pipeline, precision, shipped_prompts()[:2],
                           progress=lambda i, n: seen.append((i, n)))  # fmt: skip
    assert seen == [(1, 2), (2, 2)]
    record = calibrated.record
    assert record["precision"] == precision and record["workflow"] == "serve-test"
    assert record["excluded_modules"] == EXCLUDED
    assert record["prompts"]["count"] == 2 and len(record["prompts"]["sha256"]) == 64
    # 34 Linear layers (input and weight quantizer each) are quantized, 6 are not
    assert record["quantizers"] == len(calibrated.state) == 68
    assert set(calibrated.state) == {f"{n}.amax" for n in quantizers(calibrated.dit)}
    for key, amax in calibrated.state.items():
        assert torch.isfinite(amax).all() and (amax > 0).all(), key
        channels = precision == "int8" and key.endswith("weight_quantizer.amax")
        assert (amax.numel() > 1) == channels, key  # INT8 weights: a scale per output channel
    quantized = pipeline.run(wf).latent
    delta = float((quantized - full).abs().max())
    assert 1e-3 < delta < float(full.abs().max())  # quantized, and still the same image
    save(calibrated, tmp_path / "calib")
    saved = load(tmp_path / "calib")
    assert saved.record["amax"]["file"].startswith("amax-") and saved.record["quantizers"] == 68
    fresh = _pipeline(workflow)
    restore(fresh.engines.denoiser.module, saved.record["config"], saved.state)
    assert torch.equal(fresh.run(wf).latent, quantized)


def test_the_cli_writes_a_calibration_and_refuses_to_overwrite_it(
    workflow: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "calib"
    argv = ["calibrate", "--model", "tiny", "-w", str(workflow), "--precision", "fp8",
            "--calib-size", "1", "--exclude", "adaLN_modulation", "--out", str(out),
            "-q"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("calibrated 60 quantizers (fp8) in ")
    record = json.loads((out / CALIBRATION).read_text())
    assert record["exclude"] == ["x_embedder", "t_embedder", "cap_embedder", "final_layer",
                                 "adaLN_modulation"]  # fmt: skip
    adaln = [f"{stack}.{i}.adaLN_modulation.0" for stack in ("noise_refiner", "layers")
             for i in (0, 1)]  # fmt: skip
    assert record["excluded_modules"] == [*EXCLUDED[:4], *adaln, *EXCLUDED[4:]]
    from zimage_trt.models.tiny import tiny_model_dir

    transformer = sorted((tiny_model_dir() / "transformer").glob("*.safetensors"))
    assert record["depends_on"] == {"transformer": weights_sha256(transformer), "loras": []}
    before = sorted(p.name for p in out.iterdir())
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        f"zimage-trt: error: {out / CALIBRATION} exists; not overwritten (pass --force to "
        "replace it)"
    )
    assert sorted(p.name for p in out.iterdir()) == before
    amax = out / record["amax"]["file"]
    amax.write_bytes(amax.read_bytes()[:-1] + b"\0")
    with pytest.raises(FileError, match="missing or changed since"):
        load(out)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--calib-size", "0"], "--calib-size 0 is outside 1 … 4096"),
        (["--calib-size", "129"], "--calib-size 129 is more than the 128 prompts given"),
        (
            ["--quantize-attention"],
            "--quantize-attention is FP8 only (TensorRT's fused attention quantizes q/k/v to "
            "FP8; there is no INT8 attention): use --precision fp8",
        ),
        (
            ["--quantize-text-encoder"],
            "--quantize-text-encoder is FP8 only (Qwen3's INT8 activations need SmoothQuant, "
            "which is not offered): use --precision fp8",
        ),
        (
            ["--calib-size", "126", "--report"],
            "--report-prompts 4 is outside 1 … 2 (the prompts left after the first "
            "--calib-size 126 of 128)",
        ),
    ],
)
def test_bad_calibration_arguments_are_refused_naming_them(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["calibrate", "--model", "tiny", "--precision", "int8", "--out", str(tmp_path), *args]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == f"zimage-trt: error: {message}"


def test_an_empty_prompts_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "prompts.txt"
    empty.write_text("# nothing\n\n")
    argv = ["calibrate", "--model", "tiny", "--precision", "fp8", "--prompts", str(empty),
            "--out", str(tmp_path / "c")]  # fmt: skip
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        f"zimage-trt: error: --prompts {empty} holds no prompt (one per line; # for comments)"
    )


def test_a_calibration_for_other_exclusions_does_not_fit(workflow: Path) -> None:
    pipeline = _pipeline(workflow)
    calibrated = calibrate(pipeline, "int8", shipped_prompts()[:1])
    other = quant_config("int8", ["final_layer"])  # the embedders quantized too
    with pytest.raises(InputError) as refused:
        restore(_pipeline(workflow).engines.denoiser.module, other, calibrated.state)
    assert str(refused.value) == (
        "the calibration does not fit this DiT: 8 of its quantizer(s) not saved (first: "
        "cap_embedder.1.input_quantizer)"
    )


def test_the_shipped_prompts_are_128_english_and_chinese() -> None:
    prompts = shipped_prompts()
    chinese = [p for p in prompts if any("\u4e00" <= c <= "\u9fff" for c in p)]
    assert len(prompts) == len(set(prompts)) == 128
    assert len(chinese) == 64 and all(p.isascii() for p in prompts if p not in chinese)


@pytest.fixture(scope="module")
def calibrated_dits(workflow: Path) -> dict[str, torch.nn.Module]:
    """int8, and fp8 with the attention's q/k/v quantized too."""
    return {
        precision: calibrate(
            _pipeline(workflow), precision, shipped_prompts()[:1], attention=precision == "fp8"
        ).dit
        for precision in ("fp8", "int8")
    }


def _export_and_run(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...],
                    path: Path) -> dict[str, Any]:  # fmt: skip
    """``module`` exported with the Q/DQ translation, then run by ONNX Runtime and ONNX's
    reference evaluator: the graph's Q/DQ op types and each runner's output."""
    import warnings

    import onnx
    import onnxruntime as ort
    from onnx.reference import ReferenceEvaluator

    from zimage_trt.calibration.onnx_qdq import OPSET, translation_table

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module.eval(), inputs, dynamo=True, opset_version=OPSET,
                                    optimize=False, verbose=False,
                                    custom_translation_table=translation_table())  # fmt: skip
    assert program is not None
    program.save(str(path))
    graph = onnx.load(str(path)).graph
    qdq = ("QuantizeLinear", "DequantizeLinear")
    feeds = {i.name: t.numpy() for i, t in zip(graph.input, inputs, strict=False)}
    return {
        "ops": sorted(n.op_type for n in graph.node if n.op_type in qdq),
        "onnxruntime": ort.InferenceSession(str(path), ort_options()).run(None, feeds)[0],
        "reference": ReferenceEvaluator(str(path)).run(None, feeds)[0],
    }


def _ulp_apart(a: torch.Tensor, b: torch.Tensor, ulps: int = 1) -> bool:
    """Every value of ``a`` within ``ulps`` float32 ulps (of the larger magnitude) of ``b``."""
    scale = torch.maximum(a.abs(), b.abs()).amax().clamp_min(1e-30)
    ulp = torch.finfo(torch.float32).eps * scale
    return bool(((a - b).abs() <= ulps * ulp).all())


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_a_qdq_linear_computes_modelopt_s_fake_quantization_and_exports_exactly(
    precision: str, calibrated_dits: dict[str, torch.nn.Module], tmp_path: Path
) -> None:
    """The export stand-in (calibration/onnx_qdq.py) of one quantized Linear: FP8 equals
    ModelOpt's fake quantization to the last bit of the scale (ONNX divides by amax/448 where
    ModelOpt multiplies by 448/amax and dequantizes by its inverse); INT8 within one step (an
    exact half rounds either way); and the exported
    Q/DQ graph computes what the stand-in computes, on ONNX Runtime and ONNX's reference
    evaluator."""
    import numpy as np

    from zimage_trt.calibration.onnx_qdq import QuantizedLinear, insert_qdq

    name = "layers.0.attention.qkv"
    modelopt = calibrated_dits[precision].get_submodule(name)
    state = {f"{name}.{q}.amax": getattr(modelopt, q).amax
             for q in ("input_quantizer", "weight_quantizer")}  # fmt: skip
    holder = torch.nn.Module()
    holder.layers = torch.nn.ModuleList([torch.nn.Module()])
    holder.layers[0].attention = torch.nn.Module()
    plain = torch.nn.Linear(modelopt.in_features, modelopt.out_features,
                            bias=modelopt.bias is not None)  # fmt: skip
    plain.load_state_dict({k: v for k, v in modelopt.state_dict().items() if "quantizer" not in k})
    holder.layers[0].attention.qkv = plain
    insert_qdq(holder, state, precision)
    standin = holder.get_submodule(name)
    assert isinstance(standin, QuantizedLinear)
    x = torch.randn(8, modelopt.in_features, generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad():
        expected, got = modelopt(x), standin(x)
        weights = (modelopt.weight_quantizer(modelopt.weight),
                   standin.weight_quantizer(standin.weight))  # fmt: skip
    step = (state[f"{name}.weight_quantizer.amax"] / 127).expand_as(modelopt.weight)
    if precision == "fp8":  # the same FP8 steps, times scales one float32 ulp apart at most
        assert _ulp_apart(*weights, ulps=2) and _ulp_apart(got, expected, ulps=64)
    else:
        off = (weights[0] - weights[1]).abs()
        assert bool((off <= step * 1.001).all())  # at most one step apart …
        assert int((off > step / 2).sum()) < off.numel() // 100  # … and rarely
    runs = _export_and_run(standin, (x,), tmp_path / "linear.onnx")
    assert runs["ops"] == ["DequantizeLinear"] * 2 + ["QuantizeLinear"] * 2
    for runner in ("onnxruntime", "reference"):  # the same quantization; the matmul's rounding
        assert float(np.abs(runs[runner] - got.numpy()).max()) < 1e-5, runner


def test_a_qdq_attention_computes_modelopt_s_fp8_q_k_v_quantization(
    calibrated_dits: dict[str, torch.nn.Module], tmp_path: Path
) -> None:
    """--quantize-attention's stand-in (``QuantizedAttend``) quantizes q, k and v as ModelOpt's
    quantized attention does (to the last bit of the scale), and its graph (three Q/DQ pairs
    before the attention) computes it."""
    import numpy as np

    from zimage_trt.calibration.onnx_qdq import QuantizedAttend, insert_qdq
    from zimage_trt.models.dit import Attend

    name = "layers.1.attention.attend"
    modelopt = calibrated_dits["fp8"].get_submodule(name)
    parts = ("q_bmm_quantizer", "k_bmm_quantizer", "v_bmm_quantizer")
    state = {f"{name}.{q}.amax": getattr(modelopt, q).amax for q in parts}
    assert all(a.numel() == 1 and float(a) > 0 for a in state.values())  # per tensor, calibrated
    holder = torch.nn.Module()
    holder.layers = torch.nn.ModuleList([torch.nn.Module(), torch.nn.Module()])
    holder.layers[1].attention = torch.nn.Module()
    holder.layers[1].attention.attend = Attend()
    holder.weight = torch.nn.Parameter(torch.zeros(1))  # insert_qdq reads the device from one
    insert_qdq(holder, state, "fp8")
    standin = holder.get_submodule(name)
    assert isinstance(standin, QuantizedAttend)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 12, 16, generator=g) * float(a) / 2 for a in state.values())
    mask = torch.ones(2, 1, 1, 12, dtype=torch.bool)
    mask[1, ..., 9:] = False  # the second item's last keys are padding
    with torch.no_grad():
        expected, got = modelopt(q, k, v, mask), standin(q, k, v, mask)
        plain = Attend()(q, k, v, mask)
        for part, t in zip(parts, (q, k, v), strict=True):  # the same FP8 steps (see above)
            # scales an ulp apart (amax/448 vs 1/(448/amax)): a step near ±448 lands up to two
            # float32 ulps of amax apart (seen on a saturated v)
            assert _ulp_apart(getattr(modelopt, part)(t), getattr(standin, part)(t), ulps=2), part
    assert _ulp_apart(got, expected, ulps=64) and not _ulp_apart(got, plain, ulps=10**4)
    runs = _export_and_run(standin, (q, k, v, mask), tmp_path / "attend.onnx")
    assert runs["ops"] == ["DequantizeLinear"] * 3 + ["QuantizeLinear"] * 3
    for runner in ("onnxruntime", "reference"):
        assert float(np.abs(runs[runner] - got.numpy()).max()) < 1e-5, runner


def test_psnr_and_ssim_measure_what_they_name() -> None:
    import math

    import numpy as np

    from zimage_trt.calibration.report import psnr, ssim

    rng = np.random.default_rng(0)
    a = rng.integers(20, 200, (32, 24, 3), dtype=np.uint8)
    assert psnr(a, a) == math.inf and ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert psnr(a, a + 10) == pytest.approx(10 * math.log10(255**2 / 100))  # 28.13 dB
    noisy = [np.clip(a + rng.normal(0, s, a.shape), 0, 255).astype(np.uint8) for s in (2, 20)]
    assert 0 < ssim(a, noisy[1]) < ssim(a, noisy[0]) < 1 and psnr(a, noisy[1]) < psnr(a, noisy[0])
    with pytest.raises(ValueError, match="SSIM needs images of 11×11 pixels at least"):
        ssim(a[:8], a[:8])


def test_the_quality_report_gates_what_is_written(
    workflow: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "calib"
    argv = ["calibrate", "--model", "tiny", "-w", str(workflow), "--precision", "fp8",
            "--calib-size", "1", "--report-prompts", "1", "--out", str(out), "-q"]  # fmt: skip
    assert main([*argv, "--min-psnr", "99"]) == 6
    captured = capsys.readouterr()
    assert captured.err.strip().startswith(
        "zimage-trt: error: the calibration's worst held-out PSNR is "
    ) and captured.err.strip().endswith(
        " dB, below --min-psnr 99: not written (leave more layers in full precision with "
        "--exclude, e.g. adaLN_modulation, or calibrate on more prompts)"
    )
    assert not out.exists() or not any(out.iterdir())
    assert main([*argv, "--report", "--quantize-attention", "--quantize-text-encoder"]) == 0
    table = capsys.readouterr().out.splitlines()
    stages = [s.name for s in load_workflow(workflow).stages]
    assert table[0].split() == ["seed", "prompt", "text", "enc", "Δ",
                                *[f for s in stages for f in (s, "Δ")],
                                "PSNR", "dB", "SSIM"]  # fmt: skip
    assert table[-1].startswith(
        "calibrated 86 quantizers (fp8) (attention q/k/v too), and 42 in the text encoder in "
    )
    record = json.loads((out / CALIBRATION).read_text())
    assert record["attention"] is True and record["text_encoder"]["quantizers"] == 42
    assert record["text_encoder"]["exclude"] == ["embed_tokens"]
    from zimage_trt.models.tiny import tiny_model_dir

    encoder = sorted((tiny_model_dir() / "text_encoder").glob("*.safetensors"))
    assert record["depends_on"]["text_encoder"] == weights_sha256(encoder)
    report = record["report"]
    assert 0 < report["text_encoder_error"] == report["rows"][0]["text_encoder_error"] < 1
    row = report["rows"][0]
    assert report["prompts"] == 1 and (row["seed"], row["prompt"]) == (1, shipped_prompts()[1])
    assert list(row["latent_error"]) == stages == list(report["latent_error"])
    assert all(0 < e < 1 for e in row["latent_error"].values())  # quantized, and close
    assert 10 < row["psnr_db"] < 99 and 0 < row["ssim"] < 1
    assert report["psnr_db"]["min"] == row["psnr_db"]
