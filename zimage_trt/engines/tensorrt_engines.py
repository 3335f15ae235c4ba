"""The TensorRT backend: serialized plans behind the engine interface (``engines.protocol``).

A ``TensorRTEngine`` deserializes one plan, keeps one execution context per optimization profile
and, per call, picks the profile with ``manifest.select_profile``, sets the input shapes, binds
every tensor by address and enqueues on torch's current CUDA stream. Output buffers are allocated
once per (profile, input shapes) and reused, so the step loop allocates nothing; CUDA graphs can
replay a repeated shape. ``SharedActivations`` is the one activation block every engine of a
pipeline runs in (they run one after another).

The pure parts — dtype names, the binding plan, the buffer key — need no TensorRT and are tested
on any machine; the TensorRT calls sit in small methods that the tests drive through a recording
double (``tests/tensorrt_double.py``). Written against the TensorRT 10.x Python API (10.13 stubs);
the 11.x runtime API used here is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from zimage_trt.engines.manifest import Profile, ProfileError, Shape, select_profile
from zimage_trt.engines.protocol import ENGINE_IO
from zimage_trt.engines.tensorrt_env import dtype_name, require_tensorrt, torch_dtype
from zimage_trt.errors import InputError, RunError, UnavailableError

if TYPE_CHECKING:
    import tensorrt

BufferKey = tuple[int, tuple[tuple[str, Shape], ...]]


@dataclass(frozen=True)
class WeightBudget:
    """How much of a weight-streaming plan's streamable weights stay on the GPU (the rest is
    streamed in from CPU memory as the engine runs): a percent of them, or TensorRT's own
    choice (``auto``). Set when a plan built ``--weight-streaming`` loads."""

    percent: float | None  # None: TensorRT's automatic budget

    @classmethod
    def parse(cls, text: str) -> WeightBudget:
        if text.strip().lower() == "auto":
            return cls(None)
        try:
            value = float(text.strip().removesuffix("%"))
        except ValueError:
            raise InputError(
                f"weight streaming budget {text!r} is not auto or a percent of the streamable "
                "weights kept on the GPU (0–100, e.g. 40%)"
            ) from None
        if not 0 <= value <= 100:
            raise InputError(f"weight streaming budget {text!r} is outside 0 … 100 % (the share "
                             "of the streamable weights kept on the GPU)")  # fmt: skip
        return cls(value)

    def __str__(self) -> str:
        return "auto" if self.percent is None else f"{self.percent:g}%"

    def bytes_for(self, engine: tensorrt.ICudaEngine) -> int:
        if self.percent is None:
            return int(engine.get_weight_streaming_automatic_budget())
        return int(engine.streamable_weights_size * self.percent / 100)


@dataclass(frozen=True)
class TensorSpec:
    """One I/O tensor of an engine as the plan declares it."""

    name: str
    dtype: torch.dtype
    is_input: bool


@dataclass(frozen=True)
class Binding:
    """One tensor to bind for a call: its name, concrete shape and dtype."""

    name: str
    shape: Shape
    dtype: torch.dtype
    is_input: bool


def buffer_key(profile_index: int, shapes: Mapping[str, Sequence[int]]) -> BufferKey:
    """The key of one output-buffer set: the profile and every input's shape, order-free."""
    return profile_index, tuple(sorted((name, tuple(shape)) for name, shape in shapes.items()))


def binding_plan(
    profile: Profile,
    io: Sequence[TensorSpec],
    input_shapes: Mapping[str, Sequence[int]],
    output_shape: Callable[[str], Sequence[int]],
) -> list[Binding]:
    """Every tensor to bind for one call: the inputs (in ``io`` order) then the outputs.

    ``output_shape`` gives an output's shape once the input shapes are set (TensorRT's
    ``context.get_tensor_shape``). Raises ValueError for missing or unknown inputs, ProfileError
    for shapes outside ``profile``, RuntimeError for a data-dependent (negative) output dim.
    """
    inputs = [spec.name for spec in io if spec.is_input]
    missing = [name for name in inputs if name not in input_shapes]
    unknown = sorted(set(input_shapes) - set(inputs))
    if missing or unknown:
        raise InputError(
            f"inputs {sorted(input_shapes)} do not match the engine's inputs {inputs}"
            + (f"; missing {missing}" if missing else "")
            + (f"; unknown {unknown}" if unknown else "")
        )
    outside = [
        f"{name} {'×'.join(map(str, input_shapes[name]))} (profile: {profile.shapes[name]})"
        for name in inputs
        if name not in profile.shapes or not profile.shapes[name].covers(input_shapes[name])
    ]
    if outside:
        raise ProfileError(f"shapes outside profile {profile.name!r}: {'; '.join(outside)}")
    plan = [
        Binding(spec.name, tuple(input_shapes[spec.name]), spec.dtype, True)
        for spec in io
        if spec.is_input
    ]
    for spec in io:
        if spec.is_input:
            continue
        shape = tuple(int(d) for d in output_shape(spec.name))
        if any(d < 0 for d in shape):
            raise RunError(
                f"output {spec.name!r} has a data-dependent shape {shape}; "
                "the TensorRT backend needs shapes that follow from the input shapes"
            )
        plan.append(Binding(spec.name, shape, spec.dtype, False))
    return plan


def same_kind(given: torch.dtype, expected: torch.dtype) -> bool:
    """Whether an input of dtype ``given`` may be cast to the engine's ``expected`` dtype:
    floating to floating, integer or bool to integer or bool — never across (a float fed to
    token ids is a caller's mistake, not a precision choice)."""
    return given.is_floating_point == expected.is_floating_point and (
        given.is_complex == expected.is_complex
    )


class SharedActivations:
    """One activation block (uint8) that the execution contexts of several engines share.

    Each engine reserves its ``device_memory_size_v2``; the block is allocated at the first
    call with the largest reservation (and regrown if a bigger engine joins later —
    ``generation`` counts the allocations so that bound contexts and captured CUDA graphs know
    to rebind). Sharing is safe because the engines of a pipeline run one after another on one
    stream. torch's CUDA allocations are 512-byte aligned; TensorRT needs 256.
    """

    def __init__(self, device: torch.device | str = "cuda") -> None:
        self.device = torch.device(device)
        self.size = 0
        self.generation = 0
        self._block: Tensor | None = None

    def reserve(self, size: int) -> None:
        if size < 0:
            raise InputError(f"activation size must be ≥ 0 bytes, got {size}")
        self.size = max(self.size, size)

    def block(self) -> Tensor:
        if self._block is None or self._block.numel() < self.size:
            self._block = None  # free the smaller block before allocating its successor
            self._block = torch.empty(max(self.size, 1), dtype=torch.uint8, device=self.device)
            self.generation += 1
        return self._block

    def release(self) -> None:
        """Free the block (the next call allocates it again)."""
        self._block = None


@dataclass
class _Slot:
    """The buffers of one (profile, input shapes) key."""

    bindings: list[Binding]
    outputs: dict[str, Tensor]
    static_inputs: dict[str, Tensor] = field(default_factory=dict)  # CUDA graphs only
    runs: int = 0
    graph: torch.cuda.CUDAGraph | None = None


class TensorRTEngine:
    """A TensorRT plan behind the engine interface: ``engine(**inputs) -> {name: tensor}``.

    ``profiles`` are the manifest's, in the plan's profile order. Outputs are preallocated per
    (profile, input shapes) and returned as they are: the next call with the same shapes
    overwrites them, so ``clone_outputs=True`` is for engines whose outputs are kept (caption
    path, text encoder). ``cuda_graphs`` captures each shape key on its second call and replays
    it after (inputs are copied into static buffers). ``hint`` is appended to profile errors
    (the build command that would cover the request); ``io_dtypes`` (the manifest's tensor
    dtype names) are checked against the plan's. ``weights``: new values for refittable weights
    (other LoRAs, ``engines.refit``), refit into the plan before first use; ``more_weights``: where
    to take any further weight TensorRT asks for to refit them (weights it built together).
    ``weight_budget``: a plan built ``--weight-streaming`` keeps that much of its streamable
    weights on the GPU and streams the rest (set before any context: the activation block then
    holds the streaming scratch too).
    """

    LIBRARY = "TensorRT"  # in messages

    def __init__(
        self,
        name: str,
        plan: bytes,
        profiles: Sequence[Profile],
        *,
        device: torch.device | str = "cuda",
        runtime_memory: SharedActivations | None = None,
        clone_outputs: bool = False,
        cuda_graphs: bool = False,
        hint: str = "",
        io_dtypes: Mapping[str, str] | None = None,
        weights: Mapping[str, Tensor] | None = None,
        more_weights: Mapping[str, Tensor] | None = None,
        weight_budget: WeightBudget | None = None,
    ) -> None:
        if not profiles:
            raise InputError(f"engine {name!r}: no optimization profiles given")
        self.name = name
        self.profiles = list(profiles)
        self.device = torch.device(device)
        self.clone_outputs = clone_outputs
        self.cuda_graphs = cuda_graphs
        self.hint = hint
        self._check_device()
        self._engine = self._deserialize(plan)
        self.streamed: tuple[int, int] | None = None  # (weight bytes on the GPU, streamable)
        if weight_budget is not None:
            self._stream_weights(weight_budget)
        if weights:
            self._refit(weights, more_weights or {})
        self.io = self._read_io()
        self.input_names = tuple(s.name for s in self.io if s.is_input)
        self.output_names = tuple(s.name for s in self.io if not s.is_input)
        self._check_plan(io_dtypes or {})
        # Without a shared block the engine still owns one: its contexts share it, instead of
        # each context allocating the maximum over all profiles (TensorRT's STATIC default).
        self.memory = runtime_memory or SharedActivations(self.device)
        self.memory.reserve(self._activation_bytes())
        self._contexts: dict[int, tensorrt.IExecutionContext] = {}
        self._bound_generation: dict[int, int] = {}
        self._graph_generation = 0
        self._slots: dict[BufferKey, _Slot] = {}

    def __call__(self, **inputs: Tensor) -> dict[str, Tensor]:
        feeds = self._checked_inputs(inputs)
        shapes = {name: tuple(t.shape) for name, t in feeds.items()}
        index = select_profile(self.name, self.profiles, shapes, self.hint)
        context = self._context(index)
        for name, shape in shapes.items():
            # every call: the context may have served other shapes of its profile since
            if not context.set_input_shape(name, shape):
                raise RunError(f"engine {self.name!r}: {self.LIBRARY} refused {name} shape {shape}")
        key = buffer_key(index, shapes)
        slot = self._slots.get(key) or self._allocate(key, context, shapes)
        self._bind_memory(index, context)
        if self.cuda_graphs:
            self._run_graphed(slot, context, feeds)
        else:
            self._bind_and_execute(context, slot, feeds)
        slot.runs += 1
        if self.clone_outputs:
            return {name: t.clone() for name, t in slot.outputs.items()}
        return dict(slot.outputs)

    def _checked_inputs(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        missing = [n for n in self.input_names if n not in inputs]
        unknown = sorted(set(inputs) - set(self.input_names))
        if missing or unknown:
            raise InputError(
                f"engine {self.name!r} takes inputs {list(self.input_names)}"
                + (f"; missing {missing}" if missing else "")
                + (f"; unknown {unknown}" if unknown else "")
            )
        feeds = {}
        for spec in self.io:
            if not spec.is_input:
                continue
            tensor = inputs[spec.name]
            if not isinstance(tensor, Tensor):
                raise TypeError(
                    f"engine {self.name!r}: input {spec.name!r} must be a torch.Tensor, "
                    f"got {type(tensor).__name__}"
                )
            if not same_kind(tensor.dtype, spec.dtype):
                raise TypeError(
                    f"engine {self.name!r}: input {spec.name!r} is {dtype_name(tensor.dtype)}; "
                    f"the engine takes {dtype_name(spec.dtype)}"
                )
            if self.cuda_graphs:
                feeds[spec.name] = tensor  # copied into the static buffer
            else:
                feeds[spec.name] = tensor.to(self.device, spec.dtype).contiguous()
        return feeds

    def _allocate(
        self, key: BufferKey, context: tensorrt.IExecutionContext, shapes: Mapping[str, Shape]
    ) -> _Slot:
        profile = self.profiles[key[0]]
        bindings = binding_plan(profile, self.io, shapes, lambda n: self._output_shape(context, n))
        slot = _Slot(
            bindings=bindings,
            outputs={
                b.name: torch.empty(b.shape, dtype=b.dtype, device=self.device)
                for b in bindings
                if not b.is_input
            },
        )
        if self.cuda_graphs:
            slot.static_inputs = {
                b.name: torch.empty(b.shape, dtype=b.dtype, device=self.device)
                for b in bindings
                if b.is_input
            }
        self._slots[key] = slot
        return slot

    def _bind_and_execute(
        self, context: tensorrt.IExecutionContext, slot: _Slot, feeds: Mapping[str, Tensor]
    ) -> None:
        for name, tensor in [*feeds.items(), *slot.outputs.items()]:
            if not context.set_tensor_address(name, tensor.data_ptr()):
                raise RunError(
                    f"engine {self.name!r}: {self.LIBRARY} refused the address of {name}"
                )
        if not context.execute_async_v3(self._stream()):
            shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in feeds.items())
            raise RunError(f"engine {self.name!r}: {self.LIBRARY} execution failed for {shapes}")

    def _run_graphed(
        self, slot: _Slot, context: tensorrt.IExecutionContext, feeds: Mapping[str, Tensor]
    ) -> None:
        if self._graph_generation != self.memory.generation:
            # the activation block moved: graphs captured against the old one are stale, and
            # the rebound contexts get a plain warm-up run again before the next capture
            for other in self._slots.values():
                other.graph, other.runs = None, 0
            self._graph_generation = self.memory.generation
        for name, tensor in feeds.items():
            slot.static_inputs[name].copy_(tensor)
        if slot.graph is not None:
            slot.graph.replay()
            return
        # Eager first: this call's result, and any deferred TensorRT set-up (a changed input
        # shape of the shared context) done outside the capture, which could not hold it.
        self._bind_and_execute(context, slot, slot.static_inputs)
        if slot.runs >= 1:  # captured after one warm-up call
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # captures on a side stream, current inside
                self._bind_and_execute(context, slot, slot.static_inputs)
            slot.graph = graph

    # The seam between TensorRT and TensorRT-RTX (engines.tensorrt_rtx_engines): loading a plan
    # and creating an execution context; everything else is the same runtime API.

    def _deserialize(self, plan: bytes) -> tensorrt.ICudaEngine:
        require_tensorrt()
        import tensorrt as trt

        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        engine = self._runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise UnavailableError(
                f"engine {self.name!r}: TensorRT {trt.__version__} could not deserialize the "
                "plan (built by another TensorRT version or for another GPU, or corrupt); "
                "rebuild it"
            )
        return engine

    def _new_context(self) -> tensorrt.IExecutionContext | None:
        """A context whose activation memory we bind (``SharedActivations``)."""
        import tensorrt as trt

        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        return self._engine.create_execution_context(strategy)

    def refit(self, weights: Mapping[str, Tensor], more: Mapping[str, Tensor]) -> None:
        """New values for refittable weights of the loaded plan (a LoRA switch between
        batches, ``runtime.loras``): the work queued so far finishes first, and the CUDA graphs
        captured against the old weights are dropped."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._refit(weights, more)
        for slot in self._slots.values():
            slot.graph, slot.runs = None, 0

    def _refit(self, weights: Mapping[str, Tensor], more: Mapping[str, Tensor]) -> None:
        """Push new weight values into the plan: each in the dtype and size it was built with,
        plus whatever else TensorRT reports missing, then refit."""
        import tensorrt as trt

        refitter = trt.Refitter(self._engine, self._logger)
        held: list[Tensor] = []  # TensorRT reads the host copies until the refit returns

        def push(weight_name: str, tensor: Tensor) -> None:
            proto = refitter.get_weights_prototype(weight_name)
            if proto.size < 0:
                raise RunError(
                    f"engine {self.name!r}: {weight_name!r} is not a refittable weight of the plan"
                )
            host = tensor.detach().to("cpu", torch_dtype(proto.dtype.name)).contiguous()
            if host.numel() != proto.size:
                raise RunError(
                    f"engine {self.name!r}: weight {weight_name!r} has {host.numel()} values, "
                    f"the plan's has {proto.size}"
                )
            held.append(host)
            if not refitter.set_named_weights(
                weight_name, trt.Weights(proto.dtype, host.data_ptr(), host.numel())
            ):
                raise RunError(f"engine {self.name!r}: TensorRT refused weight {weight_name!r}")

        for weight_name, tensor in weights.items():
            push(weight_name, tensor)
        missing = sorted(refitter.get_missing_weights())
        unknown = [n for n in missing if n not in more]
        if unknown:
            raise RunError(
                f"engine {self.name!r}: TensorRT needs {len(unknown)} more weight(s) to refit, "
                f"not given: {', '.join(unknown[:5])}"
            )
        for weight_name in missing:
            push(weight_name, more[weight_name])
        if not refitter.refit_cuda_engine():
            raise RunError(f"engine {self.name!r}: TensorRT could not refit the plan")

    def _check_device(self) -> None:
        if self.device.type != "cuda":
            raise InputError(
                f"engine {self.name!r}: the {self.LIBRARY} backend runs on a CUDA device, got "
                f"{self.device}; use the onnxruntime or torch backend on CPU"
            )

    def _stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream

    def _read_io(self) -> list[TensorSpec]:
        engine = self._engine
        specs = []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            # by name: the enum is TensorRT's or TensorRT-RTX's, whichever loaded the plan
            is_input = engine.get_tensor_mode(name).name == "INPUT"
            specs.append(
                TensorSpec(name, torch_dtype(engine.get_tensor_dtype(name).name), is_input)
            )
        return specs

    def _check_plan(self, io_dtypes: Mapping[str, str]) -> None:
        """The plan and the manifest (profiles, and dtypes when given) must agree: a mismatch
        is never run."""
        engine = self._engine
        plan_dtypes = {spec.name: dtype_name(spec.dtype) for spec in self.io}
        differ = {n: d for n, d in io_dtypes.items() if plan_dtypes.get(n) != d}
        if differ:
            raise InputError(
                f"engine {self.name!r}: the manifest gives dtypes {differ}, the plan has "
                f"{ {n: plan_dtypes.get(n) for n in differ} }; rebuild"
            )
        if self.name in ENGINE_IO:
            want_in, want_out = ENGINE_IO[self.name]
            if set(self.input_names) != set(want_in) or set(self.output_names) != set(want_out):
                raise InputError(
                    f"engine {self.name!r}: the plan has inputs {list(self.input_names)} and "
                    f"outputs {list(self.output_names)}; expected {list(want_in)} and "
                    f"{list(want_out)} (wrong plan file?)"
                )
        if engine.num_optimization_profiles != len(self.profiles):
            raise InputError(
                f"engine {self.name!r}: the plan has {engine.num_optimization_profiles} "
                f"optimization profiles, the manifest lists {len(self.profiles)}; rebuild"
            )
        for index, profile in enumerate(self.profiles):
            if set(profile.shapes) != set(self.input_names):
                raise InputError(
                    f"engine {self.name!r}: profile {profile.name!r} names {sorted(profile.shapes)}"
                    f", the plan's inputs are {sorted(self.input_names)}"
                )
            for name, shape_range in profile.shapes.items():
                built = [_shape(d) for d in engine.get_tensor_profile_shape(name, index)]
                wanted = [shape_range.min, shape_range.opt, shape_range.max]
                if built != wanted:
                    raise InputError(
                        f"engine {self.name!r}: profile {index} ({profile.name}) gives {name} "
                        f"min/opt/max {wanted}, the plan was built with {built}; rebuild"
                    )

    def _stream_weights(self, budget: WeightBudget) -> None:
        engine = self._engine
        streamable = int(engine.streamable_weights_size)
        if streamable == 0:
            raise InputError(f"engine {self.name!r} was not built for weight streaming: rebuild "
                             "the folder with zimage-trt build --weight-streaming")  # fmt: skip
        kept = min(budget.bytes_for(engine), streamable)
        engine.weight_streaming_budget_v2 = kept
        self.streamed = (kept, streamable)

    def _activation_bytes(self) -> int:
        engine = self._engine
        if hasattr(engine, "device_memory_size_v2"):  # TensorRT ≥ 10.1
            return int(engine.device_memory_size_v2)
        return int(engine.device_memory_size)

    def _context(self, index: int) -> tensorrt.IExecutionContext:
        """The execution context of profile ``index``, created at its first use."""
        context = self._contexts.get(index)
        if context is None:
            context = self._new_context()
            if context is None:
                raise RunError(f"engine {self.name!r}: {self.LIBRARY} could not create a context")
            self._bind_memory(index, context)
            if not context.set_optimization_profile_async(index, self._stream()):
                raise RunError(f"engine {self.name!r}: {self.LIBRARY} refused profile {index}")
            self._contexts[index] = context
        return context

    def _bind_memory(self, index: int, context: tensorrt.IExecutionContext) -> None:
        block = self.memory.block()
        if self._bound_generation.get(index) == self.memory.generation:
            return
        if hasattr(self._engine, "device_memory_size_v2"):
            context.set_device_memory(block.data_ptr(), block.numel())
        else:  # TensorRT 10.0 binds the pointer alone
            setattr(context, "device_memory", block.data_ptr())  # noqa: B010
        self._bound_generation[index] = self.memory.generation

    @staticmethod
    def _output_shape(context: tensorrt.IExecutionContext, name: str) -> Shape:
        return _shape(context.get_tensor_shape(name))


def _shape(dims: tensorrt.Dims) -> Shape:
    # Dims has __len__/__getitem__ but no __iter__ in the stubs
    return tuple(int(dims[i]) for i in range(len(dims)))
