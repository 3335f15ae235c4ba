"""The TensorRT runtime backend: its pure helpers, and its calls driven through the recording
double on host memory (tests/tensorrt_double.py). CUDA graphs need a GPU and are not run here."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from tensorrt_double import FakeCUDAGraph, FakeTensorRT, TensorDesc, fake_graph_capture

from zimage_trt.engines.manifest import Profile, ProfileError, ShapeRange
from zimage_trt.engines.tensorrt_engines import (
    Binding,
    SharedActivations,
    TensorRTEngine,
    TensorSpec,
    WeightBudget,
    binding_plan,
    buffer_key,
)
from zimage_trt.engines.tensorrt_env import dtype_name, torch_dtype, trt_dtype_name, version_tuple
from zimage_trt.errors import InputError


class HostTensorRTEngine(TensorRTEngine):
    """Test hook: the double executes on host memory, so this engine may run on the CPU."""

    def _check_device(self) -> None:
        pass

    def _stream(self) -> int:
        return 7


def _range(lo: tuple[int, ...], opt: tuple[int, ...], hi: tuple[int, ...]) -> ShapeRange:
    return ShapeRange(min=lo, opt=opt, max=hi)


PROFILES = [
    Profile(name="stage1", shapes={"latents": _range((1, 16, 2, 3), (1, 16, 2, 3), (1, 16, 4, 4))}),
    Profile(name="stage2", shapes={"latents": _range((1, 16, 5, 5), (1, 16, 6, 6), (2, 16, 8, 8))}),
]


def _vae_image(latents: torch.Tensor) -> torch.Tensor:
    return latents[:, :3].repeat_interleave(8, -1).repeat_interleave(8, -2) * 2 + 1


@pytest.fixture
def trt(monkeypatch: pytest.MonkeyPatch) -> FakeTensorRT:
    double = FakeTensorRT("10.13.0.35")
    double.output_shapes = lambda s: {
        "image": (s["latents"][0], 3, *(8 * d for d in s["latents"][2:]))
    }
    double.compute = lambda x: {"image": _vae_image(x["latents"])}
    monkeypatch.setitem(sys.modules, "tensorrt", double)
    return double


def _plan(
    trt: FakeTensorRT, profiles: list[Profile] = PROFILES, memory: int = 4096, streamable: int = 0
) -> bytes:
    return trt.make_plan(
        [TensorDesc("latents", "FLOAT", (-1, 16, -1, -1))],
        [TensorDesc("image", "FLOAT", (-1, 3, -1, -1))],
        [{n: (r.min, r.opt, r.max) for n, r in p.shapes.items()} for p in profiles],
        device_memory=memory,
        streamable=streamable,
    )


def _engine(trt: FakeTensorRT, **kwargs: object) -> HostTensorRTEngine:
    kwargs.setdefault("device", "cpu")
    return HostTensorRTEngine("vae_decoder", _plan(trt), PROFILES, **kwargs)


def test_dtype_mapping() -> None:
    pairs = {
        "FLOAT": torch.float32,
        "BF16": torch.bfloat16,
        "HALF": torch.float16,
        "INT64": torch.int64,
        "INT32": torch.int32,
        "BOOL": torch.bool,
    }
    for name, dtype in pairs.items():
        assert torch_dtype(name) is dtype
        assert trt_dtype_name(dtype) == name
    assert [dtype_name(d) for d in pairs.values()] == [
        "float32",
        "bfloat16",
        "float16",
        "int64",
        "int32",
        "bool",
    ]
    with pytest.raises(TypeError) as info:
        torch_dtype("FP8")
    assert str(info.value) == (
        "TensorRT data type 'FP8' has no torch equivalent here; supported: FLOAT, HALF, BF16, "
        "INT64, INT32, INT8, UINT8, BOOL"
    )
    with pytest.raises(TypeError) as info:
        trt_dtype_name(torch.float64)
    assert str(info.value) == (
        "torch.float64 has no TensorRT data type here; supported: float32, float16, bfloat16, "
        "int64, int32, int8, uint8, bool"
    )


def test_version_tuple() -> None:
    assert version_tuple("10.13.0.35") == (10, 13, 0, 35)
    assert version_tuple("11.1.0.106") == (11, 1, 0, 106)
    assert version_tuple("10.14.1b1") == (10, 14, 1)


def test_buffer_key_is_order_free() -> None:
    a = buffer_key(1, {"latents": [1, 16, 6, 6], "sigma": (1,)})
    b = buffer_key(1, {"sigma": [1], "latents": (1, 16, 6, 6)})
    assert a == b == (1, (("latents", (1, 16, 6, 6)), ("sigma", (1,))))
    assert buffer_key(0, {"latents": (1, 16, 6, 6), "sigma": (1,)}) != a


IO = [
    TensorSpec("latents", torch.bfloat16, True),
    TensorSpec("sigma", torch.float32, True),
    TensorSpec("v", torch.bfloat16, False),
]
DENOISER = Profile(
    name="stage2",
    shapes={
        "latents": _range((1, 16, 4, 4), (1, 16, 6, 6), (2, 16, 8, 8)),
        "sigma": _range((1,), (1,), (2,)),
    },
)


def test_binding_plan() -> None:
    shapes = {"sigma": (2,), "latents": (2, 16, 6, 8)}
    plan = binding_plan(DENOISER, IO, shapes, lambda name: (2, 16, 6, 8))
    assert plan == [
        Binding("latents", (2, 16, 6, 8), torch.bfloat16, True),
        Binding("sigma", (2,), torch.float32, True),
        Binding("v", (2, 16, 6, 8), torch.bfloat16, False),
    ]


def test_binding_plan_errors() -> None:
    with pytest.raises(ValueError) as info:
        binding_plan(DENOISER, IO, {"latents": (1, 16, 6, 6), "t": (1,)}, lambda n: ())
    assert str(info.value) == (
        "inputs ['latents', 't'] do not match the engine's inputs ['latents', 'sigma']; "
        "missing ['sigma']; unknown ['t']"
    )
    with pytest.raises(ProfileError) as perr:
        binding_plan(DENOISER, IO, {"latents": (1, 16, 6, 10), "sigma": (1,)}, lambda n: ())
    assert str(perr.value) == (
        "shapes outside profile 'stage2': latents 1×16×6×10 "
        "(profile: 1×16×4×4 … 2×16×8×8 (opt 1×16×6×6))"
    )
    with pytest.raises(RuntimeError) as rerr:
        binding_plan(DENOISER, IO, {"latents": (1, 16, 6, 6), "sigma": (1,)}, lambda n: (-1, 16))
    assert str(rerr.value) == (
        "output 'v' has a data-dependent shape (-1, 16); the TensorRT backend needs shapes "
        "that follow from the input shapes"
    )


def test_shared_activations_grow_to_the_largest() -> None:
    memory = SharedActivations("cpu")
    memory.reserve(1000)
    memory.reserve(300)
    first = memory.block()
    assert (first.numel(), first.dtype, memory.generation) == (1000, torch.uint8, 1)
    assert memory.block() is first
    memory.reserve(5000)
    assert (memory.block().numel(), memory.generation) == (5000, 2)
    with pytest.raises(ValueError) as info:
        memory.reserve(-1)
    assert str(info.value) == "activation size must be ≥ 0 bytes, got -1"


def test_call_picks_profile_binds_every_tensor_and_computes(trt: FakeTensorRT) -> None:
    engine = _engine(trt)
    latents = torch.randn(1, 16, 6, 7)
    out = engine(latents=latents)
    torch.testing.assert_close(out["image"], _vae_image(latents), rtol=0, atol=0)
    assert out["image"].shape == (1, 3, 48, 56)

    block = engine.memory.block()
    context = trt.engines[0].contexts[0]
    events = [e for e in trt.events if e[0] != "deserialize_cuda_engine"]
    assert events == [
        ("create_execution_context", "USER_MANAGED"),
        ("set_device_memory", block.data_ptr(), 4096),
        ("set_optimization_profile_async", 1, 7),  # stage2 covers 6×7, stage1 does not
        ("set_input_shape", "latents", (1, 16, 6, 7)),
        ("set_tensor_address", "latents", context.addresses["latents"]),
        ("set_tensor_address", "image", out["image"].data_ptr()),
        ("execute_async_v3", 1, 7),
    ]


def test_repeated_shape_reuses_the_output_buffer(trt: FakeTensorRT) -> None:
    engine = _engine(trt)
    first = engine(latents=torch.randn(1, 16, 3, 3))["image"]
    x = torch.randn(1, 16, 3, 3)
    second = engine(latents=x)["image"]
    assert second.data_ptr() == first.data_ptr()  # no allocation in the step loop
    torch.testing.assert_close(first, _vae_image(x), rtol=0, atol=0)  # overwritten, as documented
    third = engine(latents=torch.randn(1, 16, 4, 3))["image"]
    assert third.data_ptr() != first.data_ptr()
    assert len(trt.engines[0].contexts) == 1  # both shapes lie in stage1: one context
    shapes = [e[2] for e in trt.events if e[0] == "set_input_shape"]
    assert shapes == [(1, 16, 3, 3), (1, 16, 3, 3), (1, 16, 4, 3)]


def test_clone_outputs_keeps_earlier_results(trt: FakeTensorRT) -> None:
    engine = _engine(trt, clone_outputs=True)
    x1, x2 = torch.randn(1, 16, 3, 3), torch.randn(1, 16, 3, 3)
    first = engine(latents=x1)["image"]
    second = engine(latents=x2)["image"]
    assert first.data_ptr() != second.data_ptr()
    torch.testing.assert_close(first, _vae_image(x1), rtol=0, atol=0)
    torch.testing.assert_close(second, _vae_image(x2), rtol=0, atol=0)


def test_profiles_get_their_own_contexts(trt: FakeTensorRT) -> None:
    engine = _engine(trt)
    engine(latents=torch.randn(1, 16, 2, 3))
    engine(latents=torch.randn(2, 16, 8, 8))
    engine(latents=torch.randn(1, 16, 2, 3))
    profiles = [e[1] for e in trt.events if e[0] == "set_optimization_profile_async"]
    assert profiles == [0, 1]
    assert [e[1] for e in trt.events if e[0] == "execute_async_v3"] == [0, 1, 0]


def test_out_of_profile_shape_raises_profile_error(trt: FakeTensorRT) -> None:
    engine = HostTensorRTEngine(
        "vae_decoder", _plan(trt), PROFILES, device="cpu", hint="zimage-trt build --size 1024x1024"
    )
    with pytest.raises(ProfileError) as info:
        engine(latents=torch.randn(1, 16, 100, 100))
    assert str(info.value) == (
        "engine 'vae_decoder' was not built for latents 1×16×100×100; built profiles: "
        "stage1: latents 1×16×2×3 … 1×16×4×4 (opt 1×16×2×3); stage2: latents 1×16×5×5 … "
        "2×16×8×8 (opt 1×16×6×6). To cover it, build with: zimage-trt build --size 1024x1024"
    )
    assert [e for e in trt.events if e[0] == "execute_async_v3"] == []


def test_input_errors(trt: FakeTensorRT) -> None:
    engine = _engine(trt)
    with pytest.raises(ValueError) as info:
        engine(x=torch.zeros(1))
    assert str(info.value) == (
        "engine 'vae_decoder' takes inputs ['latents']; missing ['latents']; unknown ['x']"
    )
    with pytest.raises(TypeError) as terr:
        engine(latents=torch.zeros(1, 16, 2, 3, dtype=torch.int64))
    assert (
        str(terr.value)
        == "engine 'vae_decoder': input 'latents' is int64; the engine takes float32"
    )
    x = torch.randn(1, 16, 2, 3, dtype=torch.float64)  # floating: cast to the engine's dtype
    torch.testing.assert_close(engine(latents=x)["image"], _vae_image(x.float()), rtol=0, atol=0)
    x = torch.randn(1, 16, 4, 2).transpose(2, 3)  # non-contiguous: made contiguous
    torch.testing.assert_close(engine(latents=x)["image"], _vae_image(x), rtol=0, atol=0)


def test_cuda_graph_captured_after_one_warm_up_then_replayed(
    trt: FakeTensorRT, monkeypatch: pytest.MonkeyPatch
) -> None:
    FakeCUDAGraph.trt = trt
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeCUDAGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake_graph_capture)
    engine = _engine(trt, cuda_graphs=True)
    xs = [torch.randn(1, 16, 3, 3) for _ in range(4)]
    outs = [engine(latents=x)["image"].clone() for x in xs]
    for x, out in zip(xs, outs, strict=True):
        torch.testing.assert_close(out, _vae_image(x), rtol=0, atol=0)
    slot = next(iter(engine._slots.values()))
    assert slot.graph is not None and slot.graph.replays == 2  # calls 3 and 4
    assert trt.engines[0].contexts[0].executions == 4  # warm-up, eager + capture, 2 replays
    static, output = slot.static_inputs["latents"], slot.outputs["image"]
    assert [a for _, a, _ in slot.graph.launches] == [
        {"latents": static.data_ptr(), "image": output.data_ptr()}
    ]
    # the activation block regrows (a larger engine joined): the graph is dropped and recaptured
    engine.memory.reserve(1 << 20)
    engine(latents=xs[0])
    assert slot.graph is None and slot.runs == 1


def test_engines_share_one_activation_block(trt: FakeTensorRT) -> None:
    memory = SharedActivations("cpu")
    small = HostTensorRTEngine(
        "vae_decoder", _plan(trt, memory=1000), PROFILES, device="cpu", runtime_memory=memory
    )
    large = HostTensorRTEngine(
        "vae_decoder", _plan(trt, memory=5000), PROFILES, device="cpu", runtime_memory=memory
    )
    small(latents=torch.randn(1, 16, 2, 3))
    large(latents=torch.randn(1, 16, 2, 3))
    bound = [e[1:] for e in trt.events if e[0] == "set_device_memory"]
    assert bound == [(memory.block().data_ptr(), 5000)] * 2
    assert memory.generation == 1


def test_plan_and_manifest_must_agree(trt: FakeTensorRT) -> None:
    with pytest.raises(ValueError) as info:
        HostTensorRTEngine("vae_decoder", _plan(trt), PROFILES[:1], device="cpu")
    assert str(info.value) == (
        "engine 'vae_decoder': the plan has 2 optimization profiles, the manifest lists 1; rebuild"
    )
    shifted = [
        PROFILES[0],
        Profile(
            name="stage2", shapes={"latents": _range((1, 16, 5, 5), (1, 16, 6, 6), (2, 16, 9, 9))}
        ),
    ]
    with pytest.raises(ValueError) as info:
        HostTensorRTEngine("vae_decoder", _plan(trt), shifted, device="cpu")
    assert str(info.value) == (
        "engine 'vae_decoder': profile 1 (stage2) gives latents min/opt/max [(1, 16, 5, 5), "
        "(1, 16, 6, 6), (2, 16, 9, 9)], the plan was built with [(1, 16, 5, 5), (1, 16, 6, 6), "
        "(2, 16, 8, 8)]; rebuild"
    )
    with pytest.raises(ValueError) as info:
        HostTensorRTEngine(
            "vae_decoder",
            _plan(trt),
            PROFILES,
            device="cpu",
            io_dtypes={"latents": "float32", "image": "bfloat16"},
        )
    assert str(info.value) == (
        "engine 'vae_decoder': the manifest gives dtypes {'image': 'bfloat16'}, the plan has "
        "{'image': 'float32'}; rebuild"
    )
    with pytest.raises(ValueError) as info:
        HostTensorRTEngine("denoiser", _plan(trt), PROFILES, device="cpu")
    assert str(info.value) == (
        "engine 'denoiser': the plan has inputs ['latents'] and outputs ['image']; expected "
        "['latents', 'sigma', 'cap_tokens', 'cap_valid'] and ['v'] (wrong plan file?)"
    )


def test_corrupt_plan_and_cpu_device(trt: FakeTensorRT) -> None:
    with pytest.raises(RuntimeError) as info:
        HostTensorRTEngine("vae_decoder", b"\x00" * 64, PROFILES, device="cpu")
    assert str(info.value) == (
        "engine 'vae_decoder': TensorRT 10.13.0.35 could not deserialize the plan (built by "
        "another TensorRT version or for another GPU, or corrupt); rebuild it"
    )
    with pytest.raises(ValueError) as verr:
        TensorRTEngine("vae_decoder", _plan(trt), PROFILES, device="cpu")
    assert str(verr.value) == (
        "engine 'vae_decoder': the TensorRT backend runs on a CUDA device, got cpu; use the "
        "onnxruntime or torch backend on CPU"
    )


def test_missing_tensorrt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(RuntimeError) as info:
        HostTensorRTEngine("vae_decoder", b"", PROFILES, device="cpu")
    assert str(info.value).startswith("TensorRT is not installed (")
    assert str(info.value).endswith(
        "or use the onnxruntime backend (`zimage-trt build --backend onnxruntime`), which will "
        "run instead"
    )


def test_a_weight_budget_is_set_before_any_context_and_sizes_the_activation_block(
    trt: FakeTensorRT,
) -> None:
    """40 % of a plan's 1 MiB of streamable weights kept on the GPU: the budget is set on the
    engine before its first context, and the shared block then holds the streaming scratch
    (the double's 512 bytes) beside the 4,096 bytes of activations."""
    plan = _plan(trt, streamable=1 << 20)
    engine = HostTensorRTEngine("vae_decoder", plan, PROFILES, device="cpu",
                                weight_budget=WeightBudget.parse("40%"))  # fmt: skip
    assert engine.streamed == (419_430, 1_048_576)
    engine(latents=torch.randn(1, 16, 2, 3))
    names = [e[0] for e in trt.events if e[0] != "deserialize_cuda_engine"]
    assert names[:2] == ["weight_streaming_budget_v2", "create_execution_context"]
    assert [e[1:] for e in trt.events if e[0] == "set_device_memory"] == [
        (engine.memory.block().data_ptr(), 4096 + 512)
    ]
    auto = HostTensorRTEngine("vae_decoder", plan, PROFILES, device="cpu",
                              weight_budget=WeightBudget.parse("auto"))  # fmt: skip
    assert auto.streamed == (524_288, 1_048_576)  # TensorRT's choice (the double: half)
    whole = HostTensorRTEngine("vae_decoder", plan, PROFILES, device="cpu",
                               weight_budget=WeightBudget.parse("100"))  # fmt: skip
    assert whole.streamed == (1_048_576, 1_048_576) and whole._activation_bytes() == 4096


def test_weight_budgets_refused_with_their_reasons(trt: FakeTensorRT, tmp_path: Path) -> None:
    with pytest.raises(InputError) as refused:
        HostTensorRTEngine("vae_decoder", _plan(trt), PROFILES, device="cpu",
                           weight_budget=WeightBudget(50.0))  # fmt: skip
    assert str(refused.value) == (
        "engine 'vae_decoder' was not built for weight streaming: rebuild the folder with "
        "zimage-trt build --weight-streaming"
    )
    for text, message in (
        ("half", "weight streaming budget 'half' is not auto or a percent of the streamable "
                 "weights kept on the GPU (0–100, e.g. 40%)"),
        ("120%", "weight streaming budget '120%' is outside 0 … 100 % (the share of the "
                 "streamable weights kept on the GPU)"),
    ):  # fmt: skip
        with pytest.raises(InputError) as refused:
            WeightBudget.parse(text)
        assert str(refused.value) == message
    assert (
        str(WeightBudget.parse(" 37.5% ")) == "37.5%" and str(WeightBudget.parse("AUTO")) == "auto"
    )
