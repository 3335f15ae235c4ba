"""The builder end to end on the tiny model: ONNX export, checks, the ONNX Runtime folder, and
generation from it against the torch backend (reference workflow, fp32)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import DoubleBuild
from zimage_trt.build_engines.build import BuildResult, run_build
from zimage_trt.build_engines.networks import ShapePoint, networks
from zimage_trt.build_engines.onnx_export import ExportError, export_network
from zimage_trt.build_engines.parity import check_parity
from zimage_trt.build_engines.plan import BuildOptions, plan_build
from zimage_trt.cli import main
from zimage_trt.engines.manifest import MANIFEST, ManifestError, read_manifest, sha256_file
from zimage_trt.models.checkpoints import load_vae_weights
from zimage_trt.models.model_files import resolve_model
from zimage_trt.models.tiny import tiny_model_dir
from zimage_trt.runtime.pipeline import Pipeline
from zimage_trt.workflow import Workflow, load_workflow

PROMPT = "a red fox in snow"


def test_every_graph_matches_torch_at_several_values_of_every_dynamic_axis(
    built: BuildResult,
) -> None:
    rows = [row for report in built.engines for row in report.parity]
    assert rows and all(row.ok for row in rows), [r for r in rows if not r.ok]
    assert max(row.max_abs / row.scale for row in rows) < 1e-4  # fp32 graphs: ~1e-5 measured
    denoiser = [row.point for row in rows if row.engine == "denoiser"]
    assert {p.batch for p in denoiser} == {1, 2}
    assert {p.tokens for p in denoiser} == {32, 4096}  # caption slots: min and the ceiling
    assert {(p.height, p.width) for p in denoiser} == {(28, 22), (54, 42), (108, 84)}
    prompts = {row.point.tokens for row in rows if row.engine == "text_encoder"}
    assert len(prompts) == 3 and {1, 4096} <= prompts
    assert {row.runner for row in rows} == {"onnxruntime"}


def test_every_graph_is_parseable_by_tensorrt(built: BuildResult) -> None:
    for report in built.engines:
        assert report.coverage is not None and report.coverage.ok, report.coverage.summary()
        dtypes = {dtype for _, dtype in report.coverage.pairs}
        assert "DOUBLE" not in dtypes  # RoPE comes from fp32 tables, not a float64 product


def test_manifest_records_files_versions_weights_and_profiles(built: BuildResult) -> None:
    out = built.folder
    manifest = read_manifest(out)
    assert manifest == built.manifest
    assert list(manifest.engines) == ["text_encoder", "caption_path", "denoiser", "vae_decoder"]
    assert manifest.backend == "onnxruntime" and manifest.precision == "fp32"
    assert set(manifest.versions) == {"zimage_trt", "torch", "onnx", "onnxruntime"}
    assert [(lora.name, lora.strength) for lora in manifest.weights.loras] == [
        ("zimage_lora.safetensors", 1.0)
    ]
    assert set(manifest.weights.sha256) == {"transformer", "text_encoder", "vae"}
    assert manifest.peak_rss_bytes > 0 and manifest.build_seconds > 0
    for name, entry in manifest.engines.items():
        # the graph and its one external-data file; the DiT engines' refit maps (other LoRAs)
        refit = {f"{name}.refit.json"} if name in ("caption_path", "denoiser") else set()
        assert set(entry.files) == {f"onnx/{name}.onnx", f"onnx/{name}.onnx.data"} | refit
        assert entry.refittable == bool(refit)
        for rel, record in entry.files.items():
            assert (out / rel).stat().st_size == record.bytes
            assert sha256_file(out / rel) == record.sha256
    denoiser = manifest.engines["denoiser"]
    assert [p.name for p in denoiser.profiles] == ["base", "refine", "upscale"]
    assert denoiser.profiles[0].shapes["latents"].max == (2, 16, 28, 22)  # cfg 2: batch 2
    assert denoiser.inputs == {"latents": "float32", "sigma": "float32",
                               "cap_tokens": "float32", "cap_valid": "bool"}  # fmt: skip
    saved = Workflow.load(out / "workflow.yaml")
    assert saved.prompts.negative == load_workflow("zimage-121101").prompts.negative_text()


def test_rebuilding_reuses_every_engine_whose_key_matches(built: BuildResult) -> None:
    options = BuildOptions(backend="onnxruntime", precision="fp32")
    plan = plan_build(options, model="tiny", workflow=load_workflow("zimage-121101"))
    again = run_build(plan, options, built.folder, log=lambda msg: None)
    assert [r.reused for r in again.engines] == [True, True, True, True]
    assert again.manifest.engines == built.manifest.engines


def test_onnxruntime_matches_the_torch_backend_on_the_reference_workflow(
    built: BuildResult,
) -> None:
    wf = load_workflow("zimage-121101")
    wf.prompts.positive = PROMPT
    ort_pipe = Pipeline.open(engines=built.folder, log=lambda msg: None)
    torch_pipe = Pipeline.open(
        model="tiny", workflow=wf, device="cpu", dtype="fp32", log=lambda msg: None
    )
    got = ort_pipe.run(wf)
    ref = torch_pipe.run(wf)
    assert [(s.model_calls, s.calls_skipped) for s in got.stages] == [
        (s.model_calls, s.calls_skipped) for s in ref.stages
    ]
    assert got.latent.shape == ref.latent.shape == (1, 16, 108, 84)
    delta = float((got.latent - ref.latent).abs().max())
    print(f"ONNX Runtime vs torch, final latent max |Δ| = {delta:.3g}")
    assert delta < 1e-3
    assert np.abs(got.image.astype(int) - ref.image.astype(int)).max() <= 2


def test_generate_from_the_engine_folder_writes_the_image_and_previews(
    built: BuildResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["generate", "--engines", str(built.folder), "--prompt", PROMPT,
                 "--out", str(tmp_path), "-q"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "(onnxruntime backend on cpu, float32)" in out
    paths = sorted(tmp_path.rglob("*.png"))
    sizes = sorted(Image.open(p).size for p in paths)
    assert sizes == [(176, 224), (336, 432), (672, 864)]


def test_a_truncated_engine_file_is_reported_not_run(built: BuildResult, tmp_path: Path) -> None:
    folder = tmp_path / "engines"
    shutil.copytree(built.folder, folder)
    data = folder / "onnx" / "denoiser.onnx.data"
    size = data.stat().st_size
    with open(data, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(ManifestError) as err:
        Pipeline.open(engines=folder)
    assert str(err.value) == (
        f"engine 'denoiser': {data} is {size - 100} bytes, the manifest says {size} "
        "(truncated or replaced); rebuild the folder"
    )
    with open(data, "r+b") as f:  # same size, one flipped byte
        f.truncate(size)
    with pytest.raises(ManifestError, match="does not match its sha-256"):
        Pipeline.open(engines=folder)


def test_a_manifest_for_another_backend_or_format_is_refused(
    built: BuildResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "engines"
    shutil.copytree(built.folder, folder)
    code = main(["generate", "--engines", str(folder), "--backend", "tensorrt", "-q"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        f"zimage-trt: error: --backend tensorrt asked for, but {folder} holds onnxruntime engines"
    )
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["format"] = 99
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="has format 99; this zimage-trt reads format 2"):
        Pipeline.open(engines=folder)


def test_a_shape_outside_the_profiles_fails_before_any_work(
    built: BuildResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wf = Workflow.load(built.folder / "workflow.yaml")
    wf.stages[0].latent.width = wf.stages[0].latent.height = 1024
    path = tmp_path / "big.yaml"
    wf.save(path)
    code = main(["generate", "--engines", str(built.folder), "-w", str(path),
                 "--out", str(tmp_path / "out"), "-q"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "engine 'denoiser' was not built for latents 2×16×128×128" not in err
    assert "engine 'denoiser' was not built for latents 1×16×128×128, cap_valid 1×32" in err
    assert "base: latents 1×16×28×22 … 2×16×28×22 (opt 1×16×28×22)" in err
    assert "To cover it, build with: zimage-trt build" in err
    assert not (tmp_path / "out").exists()


def test_build_dry_run_prints_the_profile_table(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["build", "--model", "tiny", "--resolutions", "1024x1024,768x1344",
                 "--backend", "onnxruntime", "--dry-run", "-q"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out.splitlines()
    assert (
        out[0] == "profiles for resolutions 1024x1024,768x1344 (fp32, captions up to 4096 tokens)"
    )
    assert out[1].split() == ["engine", "profile", "input", "min", "opt", "max"]
    rows = [line.split() for line in out]
    assert ["denoiser", "1024x1024", "latents", "1×16×128×128", "1×16×128×128",
            "2×16×128×128"] in rows  # fmt: skip
    assert ["denoiser", "768x1344", "latents", "1×16×168×96", "1×16×168×96",
            "2×16×168×96"] in rows  # fmt: skip
    assert out[-1] == "(dry run: nothing built)"


def _tiny_vae_parts(precision: str) -> tuple:  # type: ignore[type-arg]
    files = resolve_model(tiny_model_dir())
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    vae = load_vae_weights(files.vae, dtype)
    meta = load_vae_weights(files.vae, dtype, meta=True)
    net = networks(precision, *_configs(files, vae))["vae_decoder"]
    return net, vae, meta


def _configs(files, vae):  # type: ignore[no-untyped-def]
    from zimage_trt.models.checkpoints import load_dit, load_text_encoder_weights

    dit = load_dit(files.transformer, torch.float32, meta=True)
    text = load_text_encoder_weights(files.text_encoder, torch.float32, meta=True)
    return dit.config, text.config, vae.config


def test_bf16_graphs_run_on_the_reference_evaluator(tmp_path: Path) -> None:
    from zimage_trt.models.vae import VAEDecoder

    net, vae, meta = _tiny_vae_parts("bf16")
    weights = dict(VAEDecoder(vae).state_dict())
    result = export_network(
        net, VAEDecoder(meta), weights, tmp_path / "vae.onnx",
        example=ShapePoint(2, 2, 6, 4), limits=ShapePoint(1, 1, 16, 16),
    )  # fmt: skip
    points = [ShapePoint(1, 1, 8, 6), ShapePoint(1, 1, 12, 16)]
    rows = check_parity(net, result.graph, VAEDecoder(vae), points, "bf16")
    assert [row.runner for row in rows] == ["onnx reference evaluator"] * 2
    assert all(row.ok for row in rows), rows
    assert max(row.max_abs for row in rows) > 0  # bf16 rounding differs: a real comparison


def test_a_failed_export_leaves_no_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from zimage_trt.build_engines import onnx_export
    from zimage_trt.models.vae import VAEDecoder

    net, vae, meta = _tiny_vae_parts("fp32")
    weights = dict(VAEDecoder(vae).state_dict())
    weights.pop("decoder.conv_out.weight")
    with pytest.raises(
        ExportError, match=r"initializer 'decoder\.conv_out\.weight' has no weight \(1 missing\)"
    ):
        export_network(net, VAEDecoder(meta), weights, tmp_path / "vae.onnx",
                       example=ShapePoint(2, 2, 6, 4), limits=ShapePoint(1, 1, 16, 16))  # fmt: skip
    assert list(tmp_path.iterdir()) == []

    def broken_save(model: object, path: Path) -> None:
        path.write_bytes(b"half a graph")
        raise OSError("disk full")

    monkeypatch.setattr(onnx_export, "_save_graph", broken_save)
    with pytest.raises(OSError, match="disk full"):
        export_network(net, VAEDecoder(meta), dict(VAEDecoder(vae).state_dict()),
                       tmp_path / "vae.onnx", example=ShapePoint(2, 2, 6, 4),
                       limits=ShapePoint(1, 1, 16, 16))  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_full_size_parity_falls_back_to_a_real_width_slice() -> None:
    """What a 24 GB machine checks of the 6 B DiT and the 4 B text encoder: one block per stack,
    exported by the same route, against torch (run here on the tiny model's weights)."""
    from zimage_trt.build_engines.slice_parity import slice_parity, whole_graph_fits
    from zimage_trt.models.checkpoints import load_dit, load_text_encoder_weights

    options = BuildOptions(backend="onnxruntime", precision="fp32")
    plan = plan_build(options, model="tiny", workflow=load_workflow("zimage-121101"))
    files = plan.sources.files
    dit = load_dit(files.transformer, torch.float32)
    text = load_text_encoder_weights(files.text_encoder, torch.float32)
    assert whole_graph_fits("fp32", "auto", dit)  # tiny: the whole graph is checked
    assert not whole_graph_fits("fp32", "slice", dit)
    huge = torch.nn.Linear(1, 1)
    huge.weight = torch.nn.Parameter(torch.empty(60_000_000, 1, device="meta"))
    assert not whole_graph_fits("bf16", "auto", huge)
    for name, full in (("denoiser", dit), ("caption_path", dit), ("text_encoder", text)):
        rows = slice_parity(name, plan.configs, "fp32", full)
        assert rows and all(row.ok for row in rows), rows
        assert {row.runner for row in rows} == {"onnxruntime (real-width slice)"}
        assert max(row.max_abs for row in rows) < 1e-4


def test_the_vae_encoder_exports_with_dynamic_image_sides(tmp_path: Path) -> None:
    from zimage_trt.models.vae import VAEEncoder

    files = resolve_model(tiny_model_dir())
    vae = load_vae_weights(files.vae, torch.float32)
    meta = load_vae_weights(files.vae, torch.float32, meta=True)
    net = networks("fp32", *_configs(files, vae))["vae_encoder"]
    result = export_network(
        net, VAEEncoder(meta), dict(VAEEncoder(vae).state_dict()), tmp_path / "enc.onnx",
        example=ShapePoint(2, 2, 6, 4), limits=ShapePoint(1, 1, 16, 16),
    )  # fmt: skip
    points = [ShapePoint(1, 1, 8, 6), ShapePoint(1, 1, 16, 10)]
    rows = check_parity(net, result.graph, VAEEncoder(vae), points, "fp32")
    assert [r.point for r in rows] == points and all(r.ok for r in rows), rows
    assert max(r.max_abs for r in rows) < 1e-4


def test_a_tensorrt_build_through_the_recording_double(
    built_tensorrt_double: DoubleBuild,
) -> None:
    """build.py's TensorRT branch end to end against the recording double (see conftest): one
    plan per engine from the exported ONNX, one optimization profile per stage, the refit map,
    and a manifest that verifies."""
    result, trt = built_tensorrt_double.result, built_tensorrt_double.trt
    options, plan = built_tensorrt_double.options, built_tensorrt_double.plan
    manifest = read_manifest(result.folder)
    assert manifest.backend == "tensorrt" and manifest.versions["tensorrt"] == "10.13.0.35"
    assert manifest.machine["compute_capability"] == "9.0"
    denoiser = manifest.engines["denoiser"]
    assert denoiser.file == "denoiser.plan" and denoiser.refittable
    assert set(denoiser.files) == {"onnx/denoiser.onnx", "onnx/denoiser.onnx.data",
                                   "denoiser.plan", "denoiser.refit.json"}  # fmt: skip
    assert not manifest.engines["vae_decoder"].refittable  # only DiT engines are refit
    builds = [e for e in trt.events if e[0] == "build_serialized_network"]
    assert [e[1] for e in builds] == [4, 4, 4, 4]
    assert result.manifest.options["refittable"] is True
    # --weight-streaming: the text encoder's and the DiT's plans stream, the VAE's does not
    streaming = {name: entry.weight_streaming for name, entry in manifest.engines.items()}
    assert streaming == {"text_encoder": True, "caption_path": True, "denoiser": True,
                         "vae_decoder": False}  # fmt: skip
    assert result.manifest.options["weight_streaming"] is True
    flags = [e[1] for e in trt.events if e[0] == "set_flag"]
    assert sorted(flags) == ["REFIT"] * 2 + ["WEIGHT_STREAMING"] * 3
    # a refittable engine's cache key leaves the weights out
    from zimage_trt.build_engines.build import _engine_key

    net, profiles = plan.nets["denoiser"], plan.profiles["denoiser"]
    other = manifest.weights.model_copy(update={"sha256": {"transformer": "different"}})
    keys = {_engine_key("denoiser", net, profiles, options, w, manifest.versions,
                        manifest.machine) for w in (manifest.weights, other)}  # fmt: skip
    assert len(keys) == 1
    fixed = BuildOptions(backend="tensorrt", precision="bf16", refittable=False)
    keys = {_engine_key("denoiser", net, profiles, fixed, w, manifest.versions,
                        manifest.machine) for w in (manifest.weights, other)}  # fmt: skip
    assert len(keys) == 2


def test_tensorrt_plans_for_another_gpu_or_version_are_refused(
    built: BuildResult, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Plans are specific to a GPU and a TensorRT version: the folder is refused before any
    engine is read (with the recording double standing in for TensorRT)."""
    import sys

    import torch._dynamo  # before the double: dynamo probes find_spec("tensorrt")

    from tests.tensorrt_double import FakeTensorRT
    from zimage_trt.engines import tensorrt_env
    from zimage_trt.engines.folder import check_machine

    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT("10.13.0.35"))
    here = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "cuda": "13.0"}
    monkeypatch.setattr(tensorrt_env, "gpu_identity", lambda device=0: here)
    manifest = built.manifest.model_copy(update={
        "backend": "tensorrt", "versions": {**built.manifest.versions, "tensorrt": "10.13.0.35"},
        "machine": dict(here)})  # fmt: skip
    cuda = torch.device("cuda")
    check_machine(manifest, cuda)  # same GPU, same TensorRT: accepted
    other_gpu = manifest.model_copy(update={"machine": {**here, "name": "NVIDIA L40S",
                                                        "compute_capability": "8.9"}})  # fmt: skip
    with pytest.raises(ManifestError) as err:
        check_machine(other_gpu, cuda)
    assert str(err.value) == (
        "the engines were built for GPU 'NVIDIA L40S' (name); this machine has "
        "'NVIDIA H100 80GB HBM3': TensorRT plans are specific to the GPU, rebuild the folder here"
    )
    old = manifest.model_copy(update={"versions": {**manifest.versions, "tensorrt": "10.9.0.34"}})
    with pytest.raises(ManifestError, match=r"built with TensorRT 10\.9\.0\.34; this machine has "
                       r"TensorRT 10\.13\.0\.35: rebuild the folder here"):  # fmt: skip
        check_machine(old, cuda)
    with pytest.raises(ManifestError, match="TensorRT engines run on a CUDA device, not cpu"):
        check_machine(manifest, torch.device("cpu"))


def test_inspect_describes_a_folder_and_checks_it_against_this_machine(
    built: BuildResult, built_tensorrt_double: DoubleBuild, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    folder = built.folder
    assert main(["inspect", str(folder), "--verify"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{folder}: 4 onnxruntime engines, fp32, written 20")
    seconds = sum(e.build_seconds for e in built.manifest.engines.values())
    assert f"; {seconds:.1f} s of engine builds, peak RAM " in lines[0]
    assert lines[3] == f"weights: {built.manifest.weights.origin}"
    assert lines[4] == (
        "LoRAs: zimage_lora.safetensors at 1; other LoRAs or strengths: swapped in when the "
        "folder loads"
    )
    assert (
        lines[5]
        == "profiles from: workflow zimage-121101 (workflow.yaml); captions up to 4096 tokens"
    )
    rows = [line.split() for line in lines]
    assert rows[7][-2:] == ["streams", "weights"]
    assert rows[8][:2] == ["text_encoder", "onnx/text_encoder.onnx"]
    assert rows[8][3:] == ["1", "no", "no"]
    assert rows[10][:2] == ["denoiser", "onnx/denoiser.onnx"] and rows[10][3:] == ["3", "yes", "no"]
    assert ["denoiser", "base", "latents", "1×16×28×22", "1×16×28×22", "2×16×28×22"] in rows
    assert lines[-2:] == ["files: 10 verified (size and sha-256)",
                          "serves here: yes (onnxruntime on cpu)"]  # fmt: skip

    trt_folder = built_tensorrt_double.result.folder  # TensorRT plans; no TensorRT here
    assert main(["inspect", str(trt_folder)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == "built on: name Fake GPU, compute_capability 9.0, cuda 13.0"
    assert lines[4] == "LoRAs: none; other LoRAs or strengths: swapped in when the folder loads"
    rows = [line.split() for line in lines]
    assert [r[0] for r in rows if r[-2:] == ["yes", "yes"]] == ["caption_path", "denoiser"]
    streams_only = [r[0] for r in rows if r[-2:] == ["no", "yes"]]
    assert streams_only == ["text_encoder"]  # the VAE neither refits nor streams
    assert lines[-1].startswith("serves here: no: TensorRT is not installed")

    copy = tmp_path / "engines"
    shutil.copytree(folder, copy)
    (copy / "denoiser.refit.json").write_text("{}")
    assert main(["inspect", str(copy), "--verify"]) == 3
    assert "denoiser.refit.json is 2 bytes, the manifest says" in capsys.readouterr().err


def test_a_weight_streaming_budget_needs_engines_built_for_it(built: BuildResult) -> None:
    from zimage_trt.engines.folder import load_engine_folder
    from zimage_trt.engines.tensorrt_engines import WeightBudget

    with pytest.raises(ManifestError) as refused:
        load_engine_folder(built.folder, weight_budget=WeightBudget(40.0))
    assert str(refused.value) == (
        f"--weight-streaming-budget 40%: no engine of {built.folder} was built for weight "
        "streaming (zimage-trt build --backend tensorrt --weight-streaming)"
    )
