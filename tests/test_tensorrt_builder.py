"""The TensorRT builder's calls, checked against the recording double (tests/tensorrt_double.py).

The double proves what we ask of TensorRT, not what TensorRT does with it.
"""

from __future__ import annotations

import hashlib
import sys
import types
from pathlib import Path

import pytest
import torch
from tensorrt_double import CACHE_MAGIC, FakeTensorRT, ParserErrorDesc, TensorDesc

from zimage_trt.build_engines.tensorrt_builder import TensorRTBuildError, build_tensorrt_engine
from zimage_trt.engines.manifest import Profile, ShapeRange
from zimage_trt.engines.tensorrt_env import gpu_identity, tensorrt_version

MISSING = (
    "TensorRT is not installed ({detail}); install it (`pip install tensorrt`, ≥ 10) on an "
    "NVIDIA GPU machine, or use the onnxruntime backend (`zimage-trt build --backend "
    "onnxruntime`), which will run instead"
)


def _range(lo: tuple[int, ...], opt: tuple[int, ...], hi: tuple[int, ...]) -> ShapeRange:
    return ShapeRange(min=lo, opt=opt, max=hi)


STAGES = [
    Profile(
        name="stage1",
        shapes={
            "latents": _range((1, 16, 22, 28), (1, 16, 22, 28), (2, 16, 22, 28)),
            "sigma": _range((1,), (1,), (2,)),
        },
    ),
    Profile(
        name="stage3",
        shapes={
            "latents": _range((1, 16, 84, 108), (1, 16, 84, 108), (2, 16, 96, 128)),
            "sigma": _range((1,), (1,), (2,)),
        },
    ),
]


def _install(monkeypatch: pytest.MonkeyPatch, version: str = "10.13.0.35") -> FakeTensorRT:
    trt = FakeTensorRT(version)
    trt.network_inputs = [
        TensorDesc("latents", "BF16", (-1, 16, -1, -1)),
        TensorDesc("sigma", "FLOAT", (-1,)),
    ]
    trt.network_outputs = [TensorDesc("v", "BF16", (-1, 16, -1, -1))]
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt


@pytest.fixture
def trt(monkeypatch: pytest.MonkeyPatch) -> FakeTensorRT:
    return _install(monkeypatch)


@pytest.fixture
def onnx(tmp_path: Path) -> Path:
    path = tmp_path / "denoiser.onnx"
    path.write_bytes(b"not read by the double")
    return path


def _events(trt: FakeTensorRT, kind: str) -> list[tuple[object, ...]]:
    return [e for e in trt.events if e[0] == kind]


def test_one_profile_per_stage_with_exact_dims(trt: FakeTensorRT, onnx: Path) -> None:
    info = build_tensorrt_engine(onnx, onnx.with_suffix(".plan"), STAGES, log=lambda m: None)
    config = trt.builders[0].configs[0]
    assert [p.shapes for p in config.profiles] == [
        {"latents": ((1, 16, 22, 28),) * 2 + ((2, 16, 22, 28),), "sigma": ((1,), (1,), (2,))},
        {
            "latents": ((1, 16, 84, 108), (1, 16, 84, 108), (2, 16, 96, 128)),
            "sigma": ((1,), (1,), (2,)),
        },
    ]
    assert info.profiles == ("stage1", "stage3")
    assert _events(trt, "parse_from_file") == [("parse_from_file", str(onnx))]


def test_strongly_typed_on_10_not_on_11(monkeypatch: pytest.MonkeyPatch, onnx: Path) -> None:
    trt10 = _install(monkeypatch, "10.13.0.35")
    build_tensorrt_engine(onnx, onnx.with_suffix(".plan"), STAGES, log=lambda m: None)
    assert _events(trt10, "create_network") == [("create_network", 1 << 1)]
    trt11 = _install(monkeypatch, "11.1.0.106")
    build_tensorrt_engine(onnx, onnx.with_suffix(".plan"), STAGES, log=lambda m: None)
    assert _events(trt11, "create_network") == [("create_network", 0)]
    # no weak-typing precision flag either way (11.x has none left to set)
    assert _events(trt10, "set_flag") == _events(trt11, "set_flag") == []


def test_optimization_level_pool_limit_and_refit(trt: FakeTensorRT, onnx: Path) -> None:
    plan = onnx.with_suffix(".plan")
    info = build_tensorrt_engine(onnx, plan, STAGES, log=lambda m: None)
    config = trt.builders[0].configs[0]
    assert config.builder_optimization_level == 3
    assert _events(trt, "set_memory_pool_limit") == []
    assert config.flags == set()
    assert info.refit_weights == ()

    info = build_tensorrt_engine(
        onnx,
        plan,
        STAGES,
        optimization_level=5,
        memory_pool_limit=8 << 30,
        refittable=True,
        log=lambda m: None,
    )
    config = trt.builders[1].configs[0]
    assert config.builder_optimization_level == 5
    assert _events(trt, "set_memory_pool_limit") == [
        ("set_memory_pool_limit", "WORKSPACE", 8 << 30)
    ]
    assert _events(trt, "set_flag") == [("set_flag", "REFIT")]
    assert info.refit_weights == ("blocks.0.out.weight", "blocks.0.qkv.weight")


def test_build_info_describes_the_written_plan(trt: FakeTensorRT, onnx: Path) -> None:
    trt.device_memory = 123_456
    plan = onnx.parent / "engines" / "denoiser.plan"
    info = build_tensorrt_engine(onnx, plan, STAGES, log=lambda m: None)
    data = plan.read_bytes()
    assert info.engine_path == plan
    assert info.engine_bytes == len(data) > 0
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert info.tensorrt_version == "10.13.0.35"
    assert info.device_memory_size == 123_456
    assert info.inputs == {"latents": "bfloat16", "sigma": "float32"}
    assert info.outputs == {"v": "bfloat16"}
    assert info.seconds >= 0
    assert sorted(p.name for p in plan.parent.iterdir()) == ["denoiser.plan"]


def test_weight_streaming_is_a_builder_flag_and_its_streamable_bytes_are_read(
    trt: FakeTensorRT, onnx: Path
) -> None:
    plan = onnx.with_suffix(".plan")
    plain = build_tensorrt_engine(onnx, plan, STAGES, log=lambda m: None)
    assert (plain.weight_streaming, plain.streamable_bytes) == (False, None)
    info = build_tensorrt_engine(onnx, plan, STAGES, weight_streaming=True, log=lambda m: None)
    assert _events(trt, "set_flag") == [("set_flag", "WEIGHT_STREAMING")]
    assert (info.weight_streaming, info.streamable_bytes) == (True, 1 << 20)


def test_weight_streaming_needs_a_tensorrt_backend() -> None:
    from zimage_trt.build_engines.build import _options_record
    from zimage_trt.build_engines.plan import BuildOptions
    from zimage_trt.errors import InputError

    with pytest.raises(InputError) as refused:
        BuildOptions(backend="onnxruntime", weight_streaming=True).validate()
    assert str(refused.value) == (
        "--weight-streaming builds TensorRT engines (--backend tensorrt or tensorrt-rtx); the "
        "onnxruntime backend keeps every weight in memory"
    )
    # recorded in the cache key only when asked, so that folders built before keep theirs
    assert "weight_streaming" not in _options_record(BuildOptions(backend="tensorrt"))
    streaming = BuildOptions(backend="tensorrt", weight_streaming=True)
    assert _options_record(streaming)["weight_streaming"] is True


def test_timing_cache_loaded_and_saved(trt: FakeTensorRT, onnx: Path, tmp_path: Path) -> None:
    cache = tmp_path / "caches" / "h100-trt10.13.cache"
    plan = onnx.with_suffix(".plan")
    build_tensorrt_engine(onnx, plan, STAGES, timing_cache=cache, log=lambda m: None)
    assert cache.read_bytes() == CACHE_MAGIC + b"1"
    build_tensorrt_engine(onnx, plan, STAGES, timing_cache=cache, log=lambda m: None)
    assert cache.read_bytes() == CACHE_MAGIC + b"2"  # the second build started from the first's
    assert _events(trt, "create_timing_cache") == [
        ("create_timing_cache", b""),
        ("create_timing_cache", CACHE_MAGIC + b"1"),
    ]
    assert sorted(p.name for p in cache.parent.iterdir()) == [cache.name]


def test_foreign_timing_cache_is_replaced(trt: FakeTensorRT, onnx: Path, tmp_path: Path) -> None:
    cache = tmp_path / "other-gpu.cache"
    cache.write_bytes(b"written by another GPU")
    logged: list[str] = []
    build_tensorrt_engine(
        onnx, onnx.with_suffix(".plan"), STAGES, timing_cache=cache, log=logged.append
    )
    assert logged == [
        f"timing cache {cache} was written for another GPU or TensorRT version, or is damaged; "
        "starting a new one"
    ]
    assert cache.read_bytes() == CACHE_MAGIC + b"1"


def test_parser_errors_reported_verbatim(trt: FakeTensorRT, onnx: Path) -> None:
    trt.parser_errors = [
        ParserErrorDesc(
            12, "/blocks.0/attn/Einsum", "Einsum", "Unsupported equation: bhqd,bhkd->bhqk"
        ),
        ParserErrorDesc(-1, "", "", "Failed to load external data: weights.bin"),
    ]
    with pytest.raises(TensorRTBuildError) as info:
        build_tensorrt_engine(onnx, onnx.with_suffix(".plan"), STAGES, log=lambda m: None)
    assert str(info.value) == (
        f"TensorRT could not parse {onnx}:\n"
        "  node 12 (/blocks.0/attn/Einsum, Einsum): Unsupported equation: bhqd,bhkd->bhqk\n"
        "  node -1: Failed to load external data: weights.bin"
    )


def test_failed_build_leaves_no_file(trt: FakeTensorRT, onnx: Path, tmp_path: Path) -> None:
    trt.build_fails = True
    plan = tmp_path / "out" / "denoiser.plan"
    plan.parent.mkdir()
    logged: list[str] = []
    with pytest.raises(TensorRTBuildError) as info:
        build_tensorrt_engine(
            onnx, plan, STAGES, timing_cache=tmp_path / "t.cache", log=logged.append
        )
    assert str(info.value) == (
        f"TensorRT could not build denoiser.plan from {onnx}:\n"
        "  Requested amount of GPU memory could not be allocated\n"
        "(out of GPU memory is the usual cause: lower the optimization level, set a "
        "memory-pool limit, or narrow the profiles)"
    )
    assert logged == [
        "[TensorRT WARNING] Tactic skipped: insufficient memory",
        "[TensorRT ERROR] Requested amount of GPU memory could not be allocated",
    ]
    assert list(plan.parent.iterdir()) == []
    assert not (tmp_path / "t.cache").exists()


def test_progress_forwarded_and_cancellable(trt: FakeTensorRT, onnx: Path) -> None:
    trt.phases = [("Building engine", 3), ("Tactic selection", 2)]
    seen: list[tuple[str, int, int]] = []
    build_tensorrt_engine(
        onnx,
        onnx.with_suffix(".plan"),
        STAGES,
        progress=lambda *a: seen.append(a),
        log=lambda m: None,
    )
    assert seen == [
        ("Building engine", 0, 3),
        ("Building engine", 1, 3),
        ("Building engine", 2, 3),
        ("Building engine", 3, 3),
        ("Tactic selection", 0, 2),
        ("Tactic selection", 1, 2),
        ("Tactic selection", 2, 2),
    ]

    def interrupt(phase: str, done: int, total: int) -> None:
        if done == 2:
            raise KeyboardInterrupt

    plan = onnx.parent / "cancelled.plan"
    with pytest.raises(KeyboardInterrupt):
        build_tensorrt_engine(onnx, plan, STAGES, progress=interrupt, log=lambda m: None)
    assert not plan.exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"optimization_level": 6}, "optimization_level must be an integer from 0 to 5, got 6"),
        ({"optimization_level": -1}, "optimization_level must be an integer from 0 to 5, got -1"),
        (
            {"optimization_level": True},
            "optimization_level must be an integer from 0 to 5, got True",
        ),
        (
            {"memory_pool_limit": 0},
            "memory_pool_limit must be a positive number of bytes (or None for TensorRT's "
            "default), got 0",
        ),
        ({"profiles": []}, "at least one optimization profile is needed, got none"),
        (
            {"profiles": [STAGES[0], STAGES[0]]},
            "profile names must be unique, got ['stage1', 'stage1']",
        ),
        (
            {
                "profiles": [
                    Profile(
                        name="bad",
                        shapes={
                            "latents": _range((1, 16, 30, 30), (1, 16, 22, 28), (1, 16, 40, 40)),
                            "sigma": _range((1,), (1,), (1,)),
                        },
                    )
                ]
            },
            "profile 'bad': latents needs min ≤ opt ≤ max of one rank, got min (1, 16, 30, 30), "
            "opt (1, 16, 22, 28), max (1, 16, 40, 40)",
        ),
    ],
)
def test_argument_validation(
    trt: FakeTensorRT, onnx: Path, kwargs: dict[str, object], message: str
) -> None:
    args: dict[str, object] = {"profiles": STAGES, **kwargs}
    profiles = args.pop("profiles")
    with pytest.raises(ValueError) as info:
        build_tensorrt_engine(onnx, onnx.with_suffix(".plan"), profiles, **args)
    assert str(info.value) == message
    assert trt.events == []  # refused before TensorRT was asked anything


def test_profiles_must_name_exactly_the_network_inputs(trt: FakeTensorRT, onnx: Path) -> None:
    wrong = Profile(
        name="stage1",
        shapes={
            "latents": STAGES[0].shapes["latents"],
            "timestep": _range((1,), (1,), (1,)),
        },
    )
    with pytest.raises(ValueError) as info:
        build_tensorrt_engine(onnx, onnx.with_suffix(".plan"), [wrong], log=lambda m: None)
    assert str(info.value) == (
        "profile 'stage1' must name exactly the inputs of denoiser.onnx (latents, sigma); "
        "missing sigma; unknown timestep"
    )
    static = Profile(
        name="stage1",
        shapes={
            "latents": _range((1, 8, 22, 28), (1, 8, 22, 28), (1, 8, 22, 28)),
            "sigma": _range((1,), (1,), (1,)),
        },
    )
    with pytest.raises(ValueError) as info:
        build_tensorrt_engine(onnx, onnx.with_suffix(".plan"), [static], log=lambda m: None)
    assert str(info.value) == (
        "profile 'stage1': latents range 1×8×22×28 … 1×8×22×28 (opt 1×8×22×28) does not fit "
        "the network's input ?×16×?×? (rank and static dimensions must match)"
    )
    assert _events(trt, "build_serialized_network") == []


def test_missing_onnx_file(trt: FakeTensorRT, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        build_tensorrt_engine(tmp_path / "absent.onnx", tmp_path / "x.plan", STAGES)
    assert str(info.value) == f"ONNX file {tmp_path / 'absent.onnx'} does not exist"


def test_missing_tensorrt_names_the_onnxruntime_backend(
    monkeypatch: pytest.MonkeyPatch, onnx: Path
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails as if not installed
    with pytest.raises(RuntimeError) as info:
        build_tensorrt_engine(onnx, onnx.with_suffix(".plan"), STAGES)
    assert str(info.value) == MISSING.format(
        detail="import of tensorrt halted; None in sys.modules"
    )
    with pytest.raises(RuntimeError) as info:
        tensorrt_version()
    assert "onnxruntime" in str(info.value)
    # tensorrt-stubs alone: `import tensorrt` finds an empty namespace package
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    with pytest.raises(RuntimeError) as info:
        tensorrt_version()
    assert str(info.value) == MISSING.format(detail="only type stubs found")
    assert not onnx.with_suffix(".plan").exists()


def test_old_tensorrt_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    _install(monkeypatch, "8.6.1")
    with pytest.raises(RuntimeError) as info:
        tensorrt_version()
    assert str(info.value) == "TensorRT 8.6.1 is too old; zimage-trt needs TensorRT ≥ 10.0"


def test_tensorrt_version(trt: FakeTensorRT) -> None:
    assert tensorrt_version() == "10.13.0.35"


def test_gpu_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError) as info:
        gpu_identity()
    assert str(info.value).startswith("no CUDA GPU is visible to torch;")
    props = types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    assert gpu_identity() == {
        "name": "NVIDIA H100 80GB HBM3",
        "compute_capability": "9.0",
        "cuda": "12.8",
    }
