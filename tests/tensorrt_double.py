"""A recording test double of the TensorRT Python API surface that zimage-trt calls.

What it is: a fake ``tensorrt`` module (``FakeTensorRT``) that a fixture puts into
``sys.modules["tensorrt"]``. It records every call the builder and the runtime make (``events``),
rejects arguments where TensorRT's bindings would (``Dims``, not tuples; a shape outside the
selected profile; an unbound tensor at execution), and "executes" an engine on host memory: it
reads the inputs from the addresses we bound, applies ``compute`` and writes the outputs to the
addresses we bound — so a test sees whether the right buffers were bound, not only that calls
were made.

``FakeTensorRT(library="tensorrt_rtx")`` is the same double as ``tensorrt_rtx``: its engines
create runtime configs (``create_runtime_config``) that carry a runtime cache, and a context made
from one with the EAGER specialisation "JIT-compiles" a kernel the first time it runs a profile
at a shape the cache does not hold (an event, and an entry the cache serializes), which is what
TensorRT-RTX's runtime cache is for.

What it is not: TensorRT. It checks our calls against our reading of the API; it proves nothing
about TensorRT itself (parsing, tactics, numerics, CUDA graphs). mypy against tensorrt-stubs
(``test_tensorrt_typecheck.py``) checks the calls' signatures, and a GPU run checks the rest.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import math
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

PLAN_MAGIC = b"FAKE-TRT-PLAN\n"
WS_SCRATCH = 512  # the scratch bytes a streaming engine's context needs beside its activations
RUNTIME_CACHE_MAGIC = b"FAKE-RTX-RUNTIME-CACHE\n"
CACHE_MAGIC = b"FAKE-TRT-TIMING-CACHE:"
_TORCH = {
    "FLOAT": torch.float32,
    "HALF": torch.float16,
    "BF16": torch.bfloat16,
    "INT64": torch.int64,
    "INT32": torch.int32,
    "INT8": torch.int8,
    "UINT8": torch.uint8,
    "BOOL": torch.bool,
}


class _Member:
    """An enum member as pybind11 exposes it: name, value, int(), ordering."""

    def __init__(self, owner: str, name: str, value: int) -> None:
        self.owner, self.name, self.value = owner, name, value

    def __int__(self) -> int:
        return self.value

    __index__ = __int__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Member) and (other.owner, other.value) == (
            self.owner,
            self.value,
        )

    def __hash__(self) -> int:
        return hash((self.owner, self.value))

    def __lt__(self, other: _Member) -> bool:
        return self.value < other.value

    def __gt__(self, other: _Member) -> bool:
        return self.value > other.value

    def __repr__(self) -> str:
        return f"<{self.owner}.{self.name}: {self.value}>"


def _enum(owner: str, **members: int) -> Any:
    return type(owner, (), {name: _Member(owner, name, v) for name, v in members.items()})


class Dims:
    """trt.Dims: built from a list of ints; len() and indexing, no tuple conversion on its own."""

    def __init__(self, shape: Sequence[int] = ()) -> None:
        if isinstance(shape, Dims) or not all(isinstance(d, int) for d in shape):
            raise TypeError(f"Dims takes a list of ints, got {shape!r}")
        self._dims = [int(d) for d in shape]

    def __len__(self) -> int:
        return len(self._dims)

    def __getitem__(self, index: int) -> int:
        return self._dims[index]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Dims):
            return self._dims == other._dims
        return isinstance(other, list | tuple) and self._dims == list(other)

    def __repr__(self) -> str:
        return f"Dims({self._dims})"

    def tuple(self) -> tuple[int, ...]:
        return tuple(self._dims)


@dataclass
class TensorDesc:
    """A network/engine I/O tensor: name, TensorRT dtype name, shape (-1 for dynamic dims)."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass
class ParserErrorDesc:
    node: int
    node_name: str
    node_operator: str
    desc: str


@dataclass
class _Error:
    """trt.ParserError: accessors are methods."""

    info: ParserErrorDesc

    def node(self) -> int:
        return self.info.node

    def node_name(self) -> str:
        return self.info.node_name

    def node_operator(self) -> str:
        return self.info.node_operator

    def desc(self) -> str:
        return self.info.desc

    def code(self) -> int:
        return 8  # ErrorCode.UNSUPPORTED_NODE


class ILogger:
    Severity = _enum("Severity", INTERNAL_ERROR=0, ERROR=1, WARNING=2, INFO=3, VERBOSE=4)
    INTERNAL_ERROR = Severity.INTERNAL_ERROR
    ERROR = Severity.ERROR
    WARNING = Severity.WARNING
    INFO = Severity.INFO
    VERBOSE = Severity.VERBOSE

    def __init__(self) -> None:
        pass

    def log(self, severity: _Member, msg: str) -> None:
        raise NotImplementedError


class Logger(ILogger):
    def __init__(self, min_severity: _Member = ILogger.WARNING) -> None:
        super().__init__()
        self.min_severity = min_severity
        self.lines: list[str] = []

    def log(self, severity: _Member, msg: str) -> None:
        if not severity > self.min_severity:
            self.lines.append(msg)


class IProgressMonitor:
    def __init__(self) -> None:
        pass

    def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
        raise NotImplementedError

    def step_complete(self, phase_name: str, step: int) -> bool:
        raise NotImplementedError

    def phase_finish(self, phase_name: str) -> None:
        raise NotImplementedError


@dataclass
class _Tensor:
    name: str
    dtype: _Member
    shape: Dims


@dataclass
class Network:
    flags: int
    inputs: list[_Tensor] = field(default_factory=list)
    outputs: list[_Tensor] = field(default_factory=list)

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    @property
    def num_outputs(self) -> int:
        return len(self.outputs)

    def get_input(self, index: int) -> _Tensor:
        return self.inputs[index]

    def get_output(self, index: int) -> _Tensor:
        return self.outputs[index]

    @property
    def num_layers(self) -> int:  # the double parses no layers: the build report lists none
        return 0


@dataclass
class OptimizationProfile:
    shapes: dict[str, tuple[tuple[int, ...], ...]] = field(default_factory=dict)

    def set_shape(self, input: str, min: Dims, opt: Dims, max: Dims) -> None:
        if not all(isinstance(d, Dims) for d in (min, opt, max)):
            raise TypeError(
                "set_shape(): incompatible function arguments (min/opt/max must be trt.Dims)"
            )
        self.shapes[input] = (min.tuple(), opt.tuple(), max.tuple())


class TimingCache:
    def __init__(self, entries: int, foreign: bool = False) -> None:
        self.entries = entries
        self.foreign = foreign  # another GPU's or TensorRT version's cache

    def serialize(self) -> bytes:
        return CACHE_MAGIC + str(self.entries).encode()


class BuilderConfig:
    def __init__(self, trt: FakeTensorRT) -> None:
        self._trt = trt
        self.builder_optimization_level = 3
        self.pool_limits: dict[str, int] = {}
        self.flags: set[str] = set()
        self.profiles: list[OptimizationProfile] = []
        self.timing_cache: TimingCache | None = None
        self.progress_monitor: IProgressMonitor | None = None

    def set_memory_pool_limit(self, pool: _Member, pool_size: int) -> None:
        self._trt.events.append(("set_memory_pool_limit", pool.name, pool_size))
        self.pool_limits[pool.name] = pool_size

    def set_flag(self, flag: _Member) -> None:
        self._trt.events.append(("set_flag", flag.name))
        self.flags.add(flag.name)

    def get_flag(self, flag: _Member) -> bool:
        return flag.name in self.flags

    def add_optimization_profile(self, profile: OptimizationProfile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, serialized_timing_cache: bytes) -> TimingCache:
        data = bytes(serialized_timing_cache)
        self._trt.events.append(("create_timing_cache", data))
        if data.startswith(CACHE_MAGIC):
            return TimingCache(int(data[len(CACHE_MAGIC) :]))
        return TimingCache(0, foreign=bool(data))

    def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
        if cache.foreign and not ignore_mismatch:
            return False
        self.timing_cache = cache
        return True

    def get_timing_cache(self) -> TimingCache:
        assert self.timing_cache is not None, "no timing cache was set"
        return self.timing_cache


class Engine:
    """trt.ICudaEngine over a fake plan (the JSON the double's builder wrote)."""

    def __init__(self, trt: FakeTensorRT, spec: dict[str, Any]) -> None:
        self._trt = trt
        self.spec = spec
        self.tensors = [(TensorDesc(n, d, tuple(s)), True) for n, d, s in spec["inputs"]] + [
            (TensorDesc(n, d, tuple(s)), False) for n, d, s in spec["outputs"]
        ]
        self.device_memory_size_v2 = spec["device_memory"]
        self.device_memory_size = spec["device_memory"]
        self.refittable = spec["refittable"]
        self.refitted: dict[str, torch.Tensor] = {}  # weights a Refitter replaced
        self.streamable_weights_size = spec.get("streamable", 0)
        self._budget = self.streamable_weights_size  # TensorRT's default: nothing streamed
        self.contexts: list[Context] = []

    @property
    def weight_streaming_budget_v2(self) -> int:
        return self._budget

    @weight_streaming_budget_v2.setter
    def weight_streaming_budget_v2(self, value: int) -> None:
        """Streaming needs scratch memory beside the activations (``WS_SCRATCH`` bytes here)."""
        if self.contexts:
            raise RuntimeError("weight_streaming_budget_v2 set after a context was created")
        self._trt.events.append(("weight_streaming_budget_v2", value))
        self._budget = value
        streams = value < self.streamable_weights_size
        self.device_memory_size_v2 = self.spec["device_memory"] + WS_SCRATCH * streams

    def get_weight_streaming_automatic_budget(self) -> int:
        return int(self.streamable_weights_size // 2)

    @property
    def num_io_tensors(self) -> int:
        return len(self.tensors)

    @property
    def num_optimization_profiles(self) -> int:
        return len(self.spec["profiles"])

    def _desc(self, name: str) -> tuple[TensorDesc, bool]:
        for desc, is_input in self.tensors:
            if desc.name == name:
                return desc, is_input
        raise KeyError(f"no tensor {name!r}")

    def get_tensor_name(self, index: int) -> str:
        return self.tensors[index][0].name

    def get_tensor_mode(self, name: str) -> _Member:
        mode = self._trt.TensorIOMode
        return mode.INPUT if self._desc(name)[1] else mode.OUTPUT

    def get_tensor_dtype(self, name: str) -> _Member:
        return getattr(self._trt.DataType, self._desc(name)[0].dtype)

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[Dims]:
        return [Dims(s) for s in self.spec["profiles"][profile_index]["shapes"][name]]

    def create_execution_context(self, strategy: _Member | RuntimeConfig | None = None) -> Context:
        if isinstance(strategy, RuntimeConfig):  # TensorRT-RTX: from a runtime config
            if self._trt.__name__ != "tensorrt_rtx" or strategy.engine is not self:
                raise TypeError("create_execution_context: a runtime config of another engine")
            context = Context(self, strategy.strategy, strategy)
            label = f"{strategy.strategy.name} via runtime config"
        else:
            context = Context(self, strategy)
            label = strategy.name if strategy else None
        self.contexts.append(context)
        self._trt.events.append(("create_execution_context", label))
        return context

    def create_runtime_config(self) -> RuntimeConfig:
        if self._trt.__name__ != "tensorrt_rtx":
            raise AttributeError("'ICudaEngine' object has no attribute 'create_runtime_config'")
        return RuntimeConfig(self)

    @property
    def kernel_id(self) -> str:
        """What identifies this plan's kernels in a runtime cache."""
        return hashlib.sha256(json.dumps(self.spec, sort_keys=True).encode()).hexdigest()[:12]


class RuntimeCache:
    """tensorrt_rtx.IRuntimeCache: the kernels compiled so far; it reads back only what a cache
    of the same GPU architecture (``FakeTensorRT.sm``) wrote."""

    def __init__(self, trt: FakeTensorRT) -> None:
        self._trt = trt
        self.kernels: set[str] = set()

    def serialize(self) -> bytes:
        data = {"sm": self._trt.sm, "kernels": sorted(self.kernels)}
        return RUNTIME_CACHE_MAGIC + json.dumps(data).encode()

    def deserialize(self, blob: bytes) -> bool:
        data = bytes(blob)
        self._trt.events.append(("runtime_cache.deserialize", len(data)))
        if not data.startswith(RUNTIME_CACHE_MAGIC):
            return False
        try:
            parsed = json.loads(data[len(RUNTIME_CACHE_MAGIC) :])
        except ValueError:
            return False
        if parsed.get("sm") != self._trt.sm:
            return False
        self.kernels = set(parsed["kernels"])
        return True


class RuntimeConfig:
    """tensorrt_rtx.IRuntimeConfig of one engine."""

    def __init__(self, engine: Engine) -> None:
        trt = engine._trt
        self.engine = engine
        self.strategy = trt.ExecutionContextAllocationStrategy.STATIC
        self.dynamic_shapes_kernel_specialization_strategy = (
            trt.DynamicShapesKernelSpecializationStrategy.LAZY
        )
        self.cache: RuntimeCache | None = None

    def set_execution_context_allocation_strategy(self, strategy: _Member) -> None:
        self.strategy = strategy

    def create_runtime_cache(self) -> RuntimeCache:
        self.engine._trt.events.append(("create_runtime_cache",))
        return RuntimeCache(self.engine._trt)

    def set_runtime_cache(self, cache: RuntimeCache) -> bool:
        if not isinstance(cache, RuntimeCache):
            raise TypeError("set_runtime_cache(cache: IRuntimeCache)")
        self.cache = cache
        return True


class Context:
    """trt.IExecutionContext: checks what TensorRT would check before executing."""

    def __init__(
        self, engine: Engine, strategy: _Member | None, config: RuntimeConfig | None = None
    ) -> None:
        self.engine = engine
        self.config = config
        self.user_managed = strategy is not None and strategy.name == "USER_MANAGED"
        self.profile = 0
        self.input_shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.device_memory: tuple[int, int] | None = None
        self.executions = 0

    def _event(self, *event: Any) -> None:
        self.engine._trt.events.append(event)

    def set_optimization_profile_async(self, profile_index: int, stream_handle: int) -> bool:
        self._event("set_optimization_profile_async", profile_index, stream_handle)
        self.profile = profile_index
        return True

    def set_device_memory(self, memory: int, size: int) -> None:
        self._event("set_device_memory", memory, size)
        if size < self.engine.device_memory_size_v2:
            raise ValueError(f"device memory of {size} bytes < {self.engine.device_memory_size_v2}")
        self.device_memory = (memory, size)

    def set_input_shape(self, name: str, shape: Sequence[int]) -> bool:
        self._event("set_input_shape", name, tuple(shape))
        low, _, high = self.engine.spec["profiles"][self.profile]["shapes"][name]
        if len(shape) != len(low) or not all(
            lo <= s <= hi for lo, s, hi in zip(low, shape, high, strict=True)
        ):
            return False  # TensorRT logs an error and refuses
        self.input_shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name: str) -> Dims:
        desc, is_input = self.engine._desc(name)
        if is_input:
            return Dims(list(self.input_shapes.get(name, desc.shape)))
        inputs = [d.name for d, i in self.engine.tensors if i]
        if any(n not in self.input_shapes for n in inputs):
            return Dims(list(desc.shape))
        return Dims(list(self.engine._trt.output_shapes(dict(self.input_shapes))[name]))

    def set_tensor_address(self, name: str, memory: int) -> bool:
        self._event("set_tensor_address", name, memory)
        self.addresses[name] = memory
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        trt = self.engine._trt
        trt.events.append(("execute_async_v3", self.profile, stream_handle))
        if self.user_managed and self.device_memory is None:
            raise RuntimeError("execute_async_v3: USER_MANAGED context has no device memory")
        unbound = [d.name for d, _ in self.engine.tensors if d.name not in self.addresses]
        unshaped = [d.name for d, i in self.engine.tensors if i and d.name not in self.input_shapes]
        if unbound or unshaped:
            raise RuntimeError(f"execute_async_v3: unbound {unbound}, unshaped {unshaped}")
        self._specialise()
        if trt.capturing is not None:  # a CUDA-graph capture records the launch, runs nothing
            trt.capturing.append((self, dict(self.addresses), dict(self.input_shapes)))
            return True
        self.run(self.addresses, self.input_shapes)
        return True

    def _specialise(self) -> None:
        """TensorRT-RTX with EAGER specialisation: compile this profile's kernel for these
        shapes unless the runtime cache holds it (then it is loaded from there)."""
        config = self.config
        if config is None or config.dynamic_shapes_kernel_specialization_strategy.name != "EAGER":
            return
        shapes = ";".join(f"{n}={list(s)}" for n, s in sorted(self.input_shapes.items()))
        kernel = f"{self.engine.kernel_id}/p{self.profile}/{shapes}"
        if config.cache is not None and kernel in config.cache.kernels:
            return
        self._event("jit_compile", kernel)
        if config.cache is not None:
            config.cache.kernels.add(kernel)

    def run(self, addresses: dict[str, int], input_shapes: dict[str, tuple[int, ...]]) -> None:
        """The engine's arithmetic on host memory: inputs read from, outputs written to the
        given addresses (what a replayed CUDA graph does with the captured ones)."""
        trt = self.engine._trt
        inputs = {
            d.name: _read(addresses[d.name], input_shapes[d.name], _TORCH[d.dtype])
            for d, is_input in self.engine.tensors
            if is_input
        }
        outputs = trt.compute(inputs)
        shapes = trt.output_shapes(dict(input_shapes))
        for desc, is_input in self.engine.tensors:
            if is_input:
                continue
            value = outputs[desc.name].to(_TORCH[desc.dtype]).contiguous()
            assert tuple(value.shape) == tuple(shapes[desc.name]), (desc.name, value.shape)
            ctypes.memmove(addresses[desc.name], value.data_ptr(), value.nbytes)
        self.executions += 1


def _read(address: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A copy of the host tensor at ``address`` (the double runs on CPU memory)."""
    count = 1
    for d in shape:
        count *= d
    nbytes = count * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    raw = (ctypes.c_uint8 * nbytes).from_address(address)
    return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(shape).clone()


class FakeTensorRT(types.ModuleType):
    """The fake ``tensorrt`` module. Configure it, install it, then read ``events``.

    ``network_inputs``/``network_outputs``: what the "parsed ONNX" holds; ``parser_errors``:
    make parsing fail; ``build_fails``: the builder returns None (after logging an error);
    ``phases``: (name, steps) the build reports to a progress monitor; ``device_memory``: the
    engine's activation bytes; ``refit_weights``: name → (DataType name, element count) of the
    weights a refittable engine exposes; ``refit_together``: name → names a Refitter reports
    missing until they are set too (weights TensorRT built into one kernel);
    ``output_shapes``/``compute``: the engine's shape function and arithmetic at execution;
    ``capturing``: see ``FakeCUDAGraph``; ``read_onnx``: the parser reads the network's I/O and
    the refittable weights from the ONNX file it is given.
    """

    def __init__(self, version: str = "10.13.0.35", library: str = "tensorrt") -> None:
        super().__init__(library)
        self.__version__ = version
        self.sm = "8.9"  # TensorRT-RTX: the GPU architecture a runtime cache is written for
        major = int(version.split(".")[0])
        self.events: list[tuple[Any, ...]] = []
        self.network_inputs: list[TensorDesc] = []
        self.network_outputs: list[TensorDesc] = []
        self.parser_errors: list[ParserErrorDesc] = []
        self.build_fails = False
        self.phases: list[tuple[str, int]] = [("Building engine", 2)]
        self.device_memory = 4096
        self.streamable_weights = 1 << 20  # what a WEIGHT_STREAMING build can stream
        self.refit_weights: dict[str, tuple[str, int]] = {
            "blocks.0.qkv.weight": ("FLOAT", 12),
            "blocks.0.out.weight": ("FLOAT", 4),
        }
        self.refit_together: dict[str, list[str]] = {}
        self.read_onnx = False  # parse_from_file reads I/O and weights from the real ONNX file
        self.output_shapes: Callable[[dict[str, tuple[int, ...]]], dict[str, tuple[int, ...]]]
        self.output_shapes = self._same_as_first_input
        self.compute: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
        self.compute = self._copy_first_input
        self.builders: list[Builder] = []
        self.networks: list[Network] = []
        self.engines: list[Engine] = []
        # set while a (fake) CUDA graph captures: launches recorded as (context, addresses,
        # input shapes)
        self.capturing: list[tuple[Context, dict[str, int], dict[str, tuple[int, ...]]]] | None
        self.capturing = None

        self.Dims = Dims
        self.ILogger = ILogger
        self.Logger = Logger
        self.IProgressMonitor = IProgressMonitor
        self.DataType = _enum(
            "DataType",
            FLOAT=0,
            HALF=1,
            INT8=2,
            INT32=3,
            BOOL=4,
            UINT8=5,
            FP8=6,
            BF16=7,
            INT64=8,
        )
        self.TensorIOMode = _enum("TensorIOMode", NONE=0, INPUT=1, OUTPUT=2)
        self.NetworkDefinitionCreationFlag = _enum(
            "NetworkDefinitionCreationFlag", EXPLICIT_BATCH=0, STRONGLY_TYPED=1
        )
        flags = {"REFIT": 4, "STRIP_PLAN": 19, "WEIGHT_STREAMING": 21}
        if major < 11:  # the weak-typing flags are gone in 11
            flags |= {"FP16": 0, "INT8": 1, "TF32": 6, "BF16": 17}
        self.BuilderFlag = _enum("BuilderFlag", **flags)
        self.MemoryPoolType = _enum("MemoryPoolType", WORKSPACE=0, TACTIC_DRAM=4)
        self.ExecutionContextAllocationStrategy = _enum(
            "ExecutionContextAllocationStrategy", STATIC=0, ON_PROFILE_CHANGE=1, USER_MANAGED=2
        )
        if library == "tensorrt_rtx":
            self.DynamicShapesKernelSpecializationStrategy = _enum(
                "DynamicShapesKernelSpecializationStrategy", LAZY=0, EAGER=1, NONE=2
            )
        trt = self

        class BoundBuilder(Builder):
            def __init__(self, logger: ILogger) -> None:
                super().__init__(trt, logger)

        class BoundParser(OnnxParser):
            def __init__(self, network: Network, logger: ILogger) -> None:
                super().__init__(trt, network, logger)

        class BoundRuntime(Runtime):
            def __init__(self, logger: ILogger) -> None:
                super().__init__(trt, logger)

        self.Builder = BoundBuilder
        self.OnnxParser = BoundParser
        self.Runtime = BoundRuntime
        self.Weights = Weights

        class BoundRefitter(Refitter):
            def __init__(self, engine: Engine, logger: ILogger) -> None:
                super().__init__(trt, engine, logger)

        self.Refitter = BoundRefitter

    @staticmethod
    def _same_as_first_input(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError("set FakeTensorRT.output_shapes for engines that execute")

    @staticmethod
    def _copy_first_input(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError("set FakeTensorRT.compute for engines that execute")

    def make_plan(
        self,
        inputs: Sequence[TensorDesc],
        outputs: Sequence[TensorDesc],
        profiles: Sequence[dict[str, Sequence[Sequence[int]]]],
        *,
        device_memory: int | None = None,
        refittable: bool = False,
        streamable: int = 0,
    ) -> bytes:
        """A plan this double's Runtime deserializes (what its Builder writes); ``streamable``:
        the bytes of weights a weight-streaming plan can stream."""
        spec = {
            "version": self.__version__,
            "inputs": [[t.name, t.dtype, list(t.shape)] for t in inputs],
            "outputs": [[t.name, t.dtype, list(t.shape)] for t in outputs],
            "profiles": [
                {"shapes": {n: [list(s) for s in mom] for n, mom in p.items()}} for p in profiles
            ],
            "device_memory": self.device_memory if device_memory is None else device_memory,
            "refittable": refittable,
            "weights": {n: list(w) for n, w in self.refit_weights.items()} if refittable else {},
            "streamable": streamable,
        }
        return PLAN_MAGIC + json.dumps(spec).encode()


class Builder:
    def __init__(self, trt: FakeTensorRT, logger: ILogger) -> None:
        if not isinstance(logger, ILogger):
            raise TypeError("Builder(logger): logger must be a trt.ILogger")
        self._trt, self.logger = trt, logger
        self.configs: list[BuilderConfig] = []
        trt.builders.append(self)

    def create_network(self, flags: int = 0) -> Network:
        self._trt.events.append(("create_network", flags))
        network = Network(flags)
        self._trt.networks.append(network)
        return network

    def create_builder_config(self) -> BuilderConfig:
        config = BuilderConfig(self._trt)
        self.configs.append(config)
        return config

    def create_optimization_profile(self) -> OptimizationProfile:
        return OptimizationProfile()

    def build_serialized_network(self, network: Network, config: BuilderConfig) -> bytes | None:
        trt = self._trt
        trt.events.append(("build_serialized_network", config.builder_optimization_level))
        names = {t.name for t in network.inputs}
        for i, profile in enumerate(config.profiles):
            if set(profile.shapes) != names:
                self.logger.log(ILogger.ERROR, f"profile {i} does not cover every input")
                return None
        monitor = config.progress_monitor
        for phase, steps in trt.phases:
            if monitor is None:
                continue
            monitor.phase_start(phase, None, steps)
            for step in range(steps):
                if not monitor.step_complete(phase, step):
                    monitor.phase_finish(phase)
                    self.logger.log(ILogger.ERROR, "build cancelled by the progress monitor")
                    return None
            monitor.phase_finish(phase)
        if trt.build_fails:
            self.logger.log(ILogger.WARNING, "Tactic skipped: insufficient memory")
            self.logger.log(ILogger.ERROR, "Requested amount of GPU memory could not be allocated")
            return None
        if config.timing_cache is not None:
            config.timing_cache.entries += 1
        return trt.make_plan(
            [TensorDesc(t.name, t.dtype.name, t.shape.tuple()) for t in network.inputs],
            [TensorDesc(t.name, t.dtype.name, t.shape.tuple()) for t in network.outputs],
            [{n: [list(s) for s in mom] for n, mom in p.shapes.items()} for p in config.profiles],
            refittable="REFIT" in config.flags,
            streamable=trt.streamable_weights if "WEIGHT_STREAMING" in config.flags else 0,
        )


class OnnxParser:
    def __init__(self, trt: FakeTensorRT, network: Network, logger: ILogger) -> None:
        self._trt, self.network = trt, network
        self.errors: list[ParserErrorDesc] = []

    def parse_from_file(self, model: str) -> bool:
        if not isinstance(model, str):
            raise TypeError("parse_from_file(model: str)")
        trt = self._trt
        trt.events.append(("parse_from_file", model))
        self.errors = list(trt.parser_errors)
        if self.errors:
            return False
        if trt.read_onnx:
            _read_onnx(trt, model)
        for desc, target in [(d, self.network.inputs) for d in trt.network_inputs] + [
            (d, self.network.outputs) for d in trt.network_outputs
        ]:
            target.append(
                _Tensor(desc.name, getattr(trt.DataType, desc.dtype), Dims(list(desc.shape)))
            )
        return True

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, index: int) -> _Error:
        return _Error(self.errors[index])


_ONNX_TYPES = {1: "FLOAT", 16: "BF16", 7: "INT64", 9: "BOOL"}


def _read_onnx(trt: FakeTensorRT, model: str) -> None:
    """What TensorRT's parser takes from a real ONNX file: its I/O, and its initializers as the
    refittable weights (named after them, in their dtype and element count)."""
    import onnx

    graph = onnx.load(model, load_external_data=False).graph

    def descs(values: Any) -> list[TensorDesc]:
        out = []
        for v in values:
            dims = v.type.tensor_type.shape.dim
            shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)
            out.append(TensorDesc(v.name, _ONNX_TYPES[v.type.tensor_type.elem_type], shape))
        return out

    trt.network_inputs, trt.network_outputs = descs(graph.input), descs(graph.output)
    trt.refit_weights = {
        init.name: (_ONNX_TYPES[init.data_type], math.prod(init.dims))
        for init in graph.initializer
        if init.data_location == onnx.TensorProto.EXTERNAL  # weights, not the graph's constants
    }


class Runtime:
    def __init__(self, trt: FakeTensorRT, logger: ILogger) -> None:
        self._trt, self.logger = trt, logger

    def deserialize_cuda_engine(self, serialized_engine: bytes) -> Engine | None:
        data = bytes(serialized_engine)
        self._trt.events.append(("deserialize_cuda_engine", len(data)))
        if not data.startswith(PLAN_MAGIC):
            self.logger.log(ILogger.ERROR, "Serialization assertion failed: magic tag mismatch")
            return None
        engine = Engine(self._trt, json.loads(data[len(PLAN_MAGIC) :]))
        self._trt.engines.append(engine)
        return engine


class Weights:
    """trt.Weights(type, ptr, count): a view of host memory (the double reads it at refit)."""

    def __init__(self, type: _Member, ptr: int = 0, count: int = 0) -> None:
        self.dtype, self.ptr, self.size = type, ptr, count


class Refitter:
    """trt.Refitter: prototypes from the plan's weight table; ``set_named_weights`` checks
    dtype and size as TensorRT does and copies the values; ``refit_cuda_engine`` stores them in
    ``engine.refitted`` (name → tensor) and records the event."""

    def __init__(self, trt: FakeTensorRT, engine: Engine, logger: ILogger) -> None:
        if not engine.refittable:
            raise RuntimeError("Refitter: the engine was not built refittable")
        self._trt, self.engine = trt, engine
        self.pending: dict[str, torch.Tensor] = {}

    def get_all_weights(self) -> list[str]:
        return list(self.engine.spec["weights"])

    def get_weights_prototype(self, weights_name: str) -> Weights:
        if weights_name not in self.engine.spec["weights"]:
            return Weights(self._trt.DataType.FLOAT, 0, -1)
        dtype, count = self.engine.spec["weights"][weights_name]
        return Weights(getattr(self._trt.DataType, dtype), 0, count)

    def set_named_weights(self, name: str, weights: Weights) -> bool:
        proto = self.get_weights_prototype(name)
        if proto.size < 0 or weights.dtype != proto.dtype or weights.size != proto.size:
            return False
        self.pending[name] = _read(weights.ptr, (weights.size,), _TORCH[weights.dtype.name])
        return True

    def get_missing_weights(self) -> list[str]:
        together = self._trt.refit_together
        wanted = {m for n in self.pending for m in together.get(n, ())}
        return sorted(wanted - set(self.pending))

    def refit_cuda_engine(self) -> bool:
        if self.get_missing_weights():
            return False
        self.engine.refitted.update(self.pending)
        self._trt.events.append(("refit_cuda_engine", sorted(self.pending)))
        return True


class FakeCUDAGraph:
    """Stands in for torch.cuda.CUDAGraph with ``fake_graph_capture`` for torch.cuda.graph:
    launches inside the capture are recorded by the double, ``replay`` runs them again on the
    captured addresses — the host-memory analogue of a CUDA graph."""

    trt: FakeTensorRT  # set by the test

    def __init__(self) -> None:
        self.launches: list[tuple[Context, dict[str, int], dict[str, tuple[int, ...]]]] = []
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1
        for context, addresses, shapes in self.launches:
            context.run(addresses, shapes)


@contextlib.contextmanager
def fake_graph_capture(graph: FakeCUDAGraph) -> Iterator[None]:
    graph.trt.capturing = graph.launches
    try:
        yield
    finally:
        graph.trt.capturing = None
