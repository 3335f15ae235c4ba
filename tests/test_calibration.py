"""``zimage-trt calibrate`` (issue 16, first part): ModelOpt's FP8 and INT8 post-training
quantization of the tiny DiT, calibrated by running a workflow (two stages, cfg with a negative
prompt) — what is saved restores a DiT that computes exactly what the calibrated one did."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.test_serve import WORKFLOW
from zimage_trt.calibration.calibrate import CALIBRATION, calibrate, load, save, shipped_prompts
from zimage_trt.calibration.quantize import quant_config, quantizers, restore
from zimage_trt.cli import main
from zimage_trt.engines.manifest import weights_sha256
from zimage_trt.errors import FileError, InputError
from zimage_trt.runtime.pipeline import Pipeline
from zimage_trt.workflow import Workflow

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
    saved, state = load(tmp_path / "calib")
    assert saved["amax"]["file"].startswith("amax-") and saved["quantizers"] == 68
    fresh = _pipeline(workflow)
    restore(fresh.engines.denoiser.module, saved["config"], state)
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


def _export(module: torch.nn.Module, args: tuple[torch.Tensor, ...], **kwargs: object) -> object:
    import warnings

    from zimage_trt.calibration.onnx_qdq import OPSET, translation_table

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.onnx.export(module.eval(), args, dynamo=True, opset_version=OPSET,
                                 optimize=False, verbose=False,
                                 custom_translation_table=translation_table(), **kwargs)  # type: ignore[arg-type]  # fmt: skip


@pytest.fixture(scope="module")
def fp8_dit(workflow: Path) -> torch.nn.Module:
    pipeline = _pipeline(workflow)
    calibrated = calibrate(pipeline, "fp8", shipped_prompts()[:2])
    return calibrated.dit


def test_an_fp8_linear_exports_as_exactly_modelopt_s_fake_quantization(
    fp8_dit: torch.nn.Module, tmp_path: Path
) -> None:
    import numpy as np
    import onnx
    import onnxruntime as ort

    from zimage_trt.calibration.onnx_qdq import refill_amax

    class One(torch.nn.Module):
        def __init__(self, linear: torch.nn.Module) -> None:
            super().__init__()
            self.l = linear

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.l(x)  # type: ignore[no-any-return]

    linear = fp8_dit.layers[0].attention.qkv  # type: ignore[index, union-attr]
    x = torch.randn(8, linear.in_features, generator=torch.Generator().manual_seed(0)) * 3
    one = One(linear)
    program = _export(one, (x,))
    assert refill_amax(program.model, one) == 2  # type: ignore[attr-defined]
    path = tmp_path / "linear.onnx"
    program.save(str(path))  # type: ignore[attr-defined]
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert sorted(ops) == ["DequantizeLinear"] * 2 + ["QuantizeLinear"] * 2
    assert {i.name for i in graph.initializer} >= {"l.input_quantizer.amax",
                                                   "l.weight_quantizer.amax"}  # fmt: skip
    zero_points = [i for i in graph.node if i.op_type == "Constant"]
    assert any(a.t.data_type == onnx.TensorProto.FLOAT8E4M3FN for n in zero_points
               for a in n.attribute)  # fmt: skip

    def fake(t: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
        scale = amax / 448.0
        return (t / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale

    with torch.no_grad():
        expected = (
            fake(x, linear.input_quantizer.amax)
            @ fake(linear.weight, linear.weight_quantizer.amax).T
        )
        torch_out = linear(x)
    got = ort.InferenceSession(str(path)).run(None, {graph.input[0].name: x.numpy()})[0]
    assert np.array_equal(got, expected.numpy())  # the same arithmetic, bit for bit
    assert float(np.abs(got - torch_out.numpy()).max()) < 1e-5  # ModelOpt's: the matmul order


def test_the_fp8_denoiser_exports_as_standard_qdq_that_runs_everywhere(
    fp8_dit: torch.nn.Module, workflow: Path, tmp_path: Path
) -> None:
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx.reference import ReferenceEvaluator

    from zimage_trt.build_engines.networks import ShapePoint, networks
    from zimage_trt.calibration.onnx_qdq import refill_amax
    from zimage_trt.models.text_encoder import Qwen3Config
    from zimage_trt.models.vae import VAEConfig

    net = networks("fp32", fp8_dit.config, Qwen3Config(), VAEConfig())["denoiser"]  # type: ignore[arg-type]
    inputs = net.sample_inputs(ShapePoint(2, 40, 16, 16), torch.Generator().manual_seed(0))
    args = tuple(inputs[s.name] for s in net.inputs)
    program = _export(fp8_dit, args, dynamic_shapes=net.dynamic_shapes(ShapePoint(4, 128, 32, 32)),
                      input_names=[s.name for s in net.inputs],
                      output_names=[s.name for s in net.outputs])  # fmt: skip
    # 68 quantizers: the caption path's 20 (context refiner) run outside the denoiser graph
    assert refill_amax(program.model, fp8_dit) == 48  # type: ignore[attr-defined]
    path = tmp_path / "denoiser.onnx"
    program.save(str(path))  # type: ignore[attr-defined]
    graph = onnx.load(str(path)).graph
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) == 48
    with torch.no_grad():
        expected = fp8_dit(*args).numpy()
    feeds = {k: v.numpy() for k, v in inputs.items()}
    runs = {"onnxruntime": ort.InferenceSession(str(path)).run(None, feeds)[0],
            "reference": ReferenceEvaluator(str(path)).run(None, feeds)[0]}  # fmt: skip
    with torch.no_grad():  # the same DiT unquantized
        full = _pipeline(workflow).engines.denoiser.module(*args).numpy()  # type: ignore[operator]
    for name, got in runs.items():
        error = float(np.abs(got - expected).mean() / np.abs(expected).mean())
        off = float(np.abs(got - full).mean() / np.abs(expected).mean())
        print(
            f"fp8 denoiser, {name}: mean |Δ| vs ModelOpt's fake-quant {error:.3g}, vs the "
            f"unquantized DiT {off:.3g}"
        )
        assert got.shape == expected.shape and error < 0.1, name  # measured ≈ 0.05 (module doc)
        assert error < 0.6 * off, name  # it is the quantized model the graph computes
