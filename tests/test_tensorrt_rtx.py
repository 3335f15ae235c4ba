"""The real TensorRT-RTX builder (issue 13) on the tiny model, on this GPU-less machine: plans
compiled ahead of time for two RTX targets, at fp32 (the shared ONNX Runtime folder's graphs fed
to the builder) and at bf16 (a whole ``build --backend tensorrt-rtx`` through the CLI). No plan
is run here: TensorRT-RTX cannot deserialize one without a GPU, and the GPU this project
borrows (H200, SM90) is not a TensorRT-RTX target."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import tensorrt_rtx
from onnx import TensorProto, helper

from zimage_trt.build_engines.build import BuildResult
from zimage_trt.build_engines.tensorrt_builder import (
    TensorRTBuildError,
    TensorRTBuildInfo,
    build_tensorrt_engine,
)
from zimage_trt.cli import main
from zimage_trt.engines.manifest import Profile, read_manifest, sha256_file, verify_files

TARGETS = ("8.9", "12.0")
NO_GPU = "these engines were compiled by TensorRT-RTX for compute capabilities 8.9, 12.0"


@pytest.fixture(scope="module")
def fp32_plans(
    built: BuildResult, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, TensorRTBuildInfo]:
    """Every engine of the reference workflow's fp32 folder, compiled for 8.9 and 12.0."""
    out = tmp_path_factory.mktemp("rtx_fp32")
    manifest = read_manifest(built.folder)
    return {
        name: build_tensorrt_engine(
            built.folder / entry.file,
            out / f"{name}.plan",
            entry.profiles,
            library="tensorrt_rtx",
            compute_capabilities=TARGETS,
            log=lambda msg: None,
        )
        for name, entry in manifest.engines.items()
    }


def test_every_engine_compiles_for_two_targets_at_fp32(
    built: BuildResult, fp32_plans: dict[str, TensorRTBuildInfo]
) -> None:
    manifest = read_manifest(built.folder)
    assert sorted(fp32_plans) == ["caption_path", "denoiser", "text_encoder", "vae_decoder"]
    for name, info in fp32_plans.items():
        entry = manifest.engines[name]
        assert info.engine_path.stat().st_size == info.engine_bytes > 100_000, name
        assert sha256_file(info.engine_path) == info.sha256
        assert (info.library, info.compute_capabilities) == ("tensorrt_rtx", TARGETS)
        assert info.tensorrt_version == tensorrt_rtx.__version__
        # the build facts come from the network: the same names and dtypes as the ONNX graph
        assert (info.inputs, info.outputs) == (entry.inputs, entry.outputs), name
        assert info.profiles == tuple(p.name for p in entry.profiles)
        assert info.device_memory_size is None  # needs a deserialized engine, so a GPU
        # the build report's layers: an fp32 graph's matrix products all run in fp32
        assert set(info.layers["MATRIX_MULTIPLY"]) == {"float32"}, name
        assert sum(n for by in info.layers.values() for n in by.values()) > 100


def test_a_weight_streaming_plan_compiles_ahead_of_time(
    built: BuildResult, fp32_plans: dict[str, TensorRTBuildInfo], tmp_path: Path
) -> None:
    """TensorRT-RTX accepts BuilderFlag.WEIGHT_STREAMING without a GPU and compiles another
    plan; how much it can stream is read when a GPU loads it."""
    entry = read_manifest(built.folder).engines["caption_path"]
    info = build_tensorrt_engine(
        built.folder / entry.file, tmp_path / "streaming.plan", entry.profiles,
        library="tensorrt_rtx", compute_capabilities=TARGETS, weight_streaming=True,
        log=lambda msg: None,
    )  # fmt: skip
    assert (info.weight_streaming, info.streamable_bytes) == (True, None)
    assert info.engine_bytes > 100_000 and info.sha256 != fp32_plans["caption_path"].sha256


def test_the_targets_shape_the_plan(
    built: BuildResult, fp32_plans: dict[str, TensorRTBuildInfo], tmp_path: Path
) -> None:
    """Another target set compiles another plan (sizes stay close: benchmarks/results/
    rtx-tiny-builds.md)."""
    entry = read_manifest(built.folder).engines["caption_path"]
    one = build_tensorrt_engine(
        built.folder / entry.file, tmp_path / "one.plan", entry.profiles,
        library="tensorrt_rtx", compute_capabilities=("8.6",), log=lambda msg: None,
    )  # fmt: skip
    assert one.compute_capabilities == ("8.6",) and one.engine_bytes > 100_000
    assert one.sha256 != fp32_plans["caption_path"].sha256


def test_the_cli_builds_a_bf16_folder_that_refuses_to_run_without_a_gpu(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "engines"
    argv = ["build", "--model", "tiny", "--backend", "tensorrt-rtx", "--compute-capability",
            "8.9,12.0", "--no-parity", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr()
    err = printed.err
    version = tensorrt_rtx.__version__
    report = printed.out.split("TensorRT networks (")[1].splitlines()[1:5]
    assert [line.split(": ")[0] for line in report] == [
        "text_encoder", "caption_path", "denoiser", "vae_decoder"
    ]  # fmt: skip
    for line in report:  # each: plan size and seconds, its targets, layers by precision
        assert " for compute capabilities 8.9, 12.0; " in line and "bfloat16" in line, line
    assert f"TensorRT-RTX {version}: compiling for compute capabilities 8.9, 12.0 (as asked)" in err
    manifest = read_manifest(out)
    assert (manifest.backend, manifest.precision) == ("tensorrt-rtx", "bf16")
    assert manifest.library == {"name": "tensorrt_rtx", "version": version}
    assert manifest.targets == {"compute_capabilities": list(TARGETS)}
    assert manifest.versions["tensorrt_rtx"] == version and manifest.machine == {}
    assert sorted(e.file for e in manifest.engines.values()) == [
        "caption_path.plan", "denoiser.plan", "text_encoder.plan", "vae_decoder.plan"
    ]  # fmt: skip
    for entry in manifest.engines.values():
        assert entry.files[entry.file].bytes == (out / entry.file).stat().st_size > 100_000
    assert manifest.engines["denoiser"].inputs["latents"] == "bfloat16"
    verify_files(out, manifest)

    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert (
        f"compiled by: tensorrt_rtx {version} for compute capabilities 8.9, 12.0 (ahead of time)"
        in shown
    )
    assert f"serves here: no: {NO_GPU}; this machine has no CUDA GPU to run them" in shown

    images = tmp_path / "images"
    assert main(["generate", "--engines", str(out), "--out", str(images), "-p", "a fox"]) == 4
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        f"zimage-trt: error: {NO_GPU}; this machine has no CUDA GPU to run them"
    )
    assert not images.exists()
    assert main(argv) == 0  # a rebuild reuses every plan
    assert capsys.readouterr().err.count("up to date") == 4


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (["--compute-capability", "9.0"], 2,
         "--compute-capability '9.0': 9.0 is not a TensorRT-RTX target; choose from 7.5, 8.0, "
         "8.6, 8.9, 12.0, 12.1"),
        (["--compute-capability", "8.9", "--backend", "onnxruntime"], 2,
         "--compute-capability is for --backend tensorrt-rtx; the onnxruntime backend builds "
         "for the machine it runs on"),
        (["--refittable"], 4,
         "TensorRT-RTX cannot build refittable engines without a GPU: it compiles them with "
         'Myelin, which needs CUDA at build time (it fails with "MyelinCheckException … '
         'CHECK(status == CUDA_SUCCESS) failed"); build without --refittable here, or on the '
         "RTX GPU that will run them"),
        (["--timing-cache", "t.cache"], 2,
         "TensorRT-RTX has no timing cache (it has no effect there and forces a GPU query); "
         "drop --timing-cache"),
    ],
)  # fmt: skip
def test_what_cannot_build_is_refused_before_any_work(
    extra: list[str], code: int, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "engines"
    argv = ["build", "--model", "tiny", "--backend", "tensorrt-rtx", "--out", str(out), *extra]
    assert main(argv) == code
    assert capsys.readouterr().err.splitlines()[-1] == f"zimage-trt: error: {message}"
    assert not out.exists()


def test_a_profile_it_rejects_fails_with_its_message(built: BuildResult, tmp_path: Path) -> None:
    """Ranges each sound on their own (ours are checked input by input) but contradicting each
    other across inputs: the prompt's tokens span 1…16 in cap_feats and 32…64 in cap_mask."""
    entry = read_manifest(built.folder).engines["caption_path"]
    bad = Profile.model_validate({"name": "bad", "shapes": {
        "cap_feats": {"min": [1, 1, 32], "opt": [1, 8, 32], "max": [1, 16, 32]},
        "cap_mask": {"min": [1, 32], "opt": [1, 48], "max": [1, 64]},
    }})  # fmt: skip
    plan = tmp_path / "bad.plan"
    with pytest.raises(TensorRTBuildError) as caught:
        build_tensorrt_engine(
            built.folder / entry.file, plan, [bad], library="tensorrt_rtx",
            compute_capabilities=("8.9",), log=lambda msg: None,
        )  # fmt: skip
    lines = str(caught.value).splitlines()
    assert lines[0] == f"TensorRT could not build bad.plan from {built.folder / entry.file}:"
    assert lines[1].startswith(
        "  IBuilder::buildSerializedNetwork: Error Code 4: API Usage Error (tokens: Input "
        "dimensions with this name have different constant values or have contradictory "
        "IOptimizationProfile kMIN/kMAX constraints."
    )
    assert len(lines) == 2 and not plan.exists()  # no out-of-memory hint for a usage error


def test_an_op_it_cannot_parse_fails_naming_the_node(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Frobnicate", ["x"], ["y"], name="block3/frob", domain="example.ops")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("example.ops", 1)]
    )
    path = tmp_path / "odd.onnx"
    onnx.save(model, path)
    profile = Profile.model_validate({"name": "p", "shapes": {"x": {"min": [1, 4], "opt": [1, 4],
                                                                    "max": [1, 4]}}})  # fmt: skip
    with pytest.raises(TensorRTBuildError) as caught:
        build_tensorrt_engine(
            path, tmp_path / "odd.plan", [profile], library="tensorrt_rtx",
            compute_capabilities=("8.9",), log=lambda msg: None,
        )  # fmt: skip
    message = str(caught.value)
    assert message.startswith(
        f"TensorRT could not parse {path}:\n  node 0 (block3/frob, Frobnicate)"
    )
    assert not (tmp_path / "odd.plan").exists()
