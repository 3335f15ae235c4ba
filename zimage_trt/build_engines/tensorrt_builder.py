"""Build a strongly typed TensorRT engine from an ONNX file, one optimization profile per stage.

Precision lives in the ONNX dtypes (and Q/DQ nodes), never in builder flags: on TensorRT 10.x
the network is created STRONGLY_TYPED; on 11.x strong typing is always on and the flag is
deprecated, so it is not passed. Written against the TensorRT 10.13 Python API (the stubs the
type check reads); the 11.x branch follows NVIDIA's headers and has not been run here.

The same function builds with TensorRT-RTX (``library="tensorrt_rtx"``), whose Python API is
TensorRT's where this module uses it. The seam, where the two differ: RTX networks are always
strongly typed, its plans are compiled ahead of time for the named compute capabilities
(``_set_rtx_targets``, typed by the generated ``tensorrt_rtx`` stubs) and cannot be deserialized
without a GPU — so the build facts (I/O names and dtypes, profiles) come from the network, never
from a deserialized engine — and it has no timing cache.

TensorRT is imported inside the functions: this module imports on machines without it, and
says what to run instead when a build is asked for there.
"""

from __future__ import annotations

import hashlib
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from zimage_trt.atomic import atomic_path
from zimage_trt.engines.manifest import Profile
from zimage_trt.engines.tensorrt_env import (
    RTX_COMPUTE_CAPABILITIES,
    TRT_TORCH_DTYPES,
    check_rtx_refit,
    dtype_name,
    require_tensorrt,
    require_tensorrt_rtx,
    torch_dtype,
    version_tuple,
)
from zimage_trt.errors import InputError, MissingFileError, RunError

if TYPE_CHECKING:
    import tensorrt
    import tensorrt_rtx

LIBRARIES = ("tensorrt", "tensorrt_rtx")
OPTIMIZATION_LEVELS = range(6)  # TensorRT's builder optimization levels 0…5 (default 3)
ProgressFn = Callable[[str, int, int], None]  # (phase, steps done, steps in phase)


class TensorRTBuildError(RunError):
    """TensorRT could not parse the ONNX file or build an engine from it."""


@dataclass(frozen=True)
class TensorRTBuildInfo:
    """What a build produced: the manifest's engine entry is made from this."""

    engine_path: Path
    engine_bytes: int
    sha256: str
    seconds: float
    tensorrt_version: str  # the library's version
    device_memory_size: int | None  # activation bytes (max over profiles); None: not loadable here
    inputs: dict[str, str]  # name → dtype name as in the manifest ("bfloat16", "int64", …)
    outputs: dict[str, str]
    profiles: tuple[str, ...]  # profile names in the plan's profile order
    refit_weights: tuple[str, ...] = ()  # refittable weight names (refittable builds only)
    weight_streaming: bool = False  # built with BuilderFlag.WEIGHT_STREAMING
    streamable_bytes: int | None = None  # the weights it can stream; None: not loadable here
    log: tuple[str, ...] = field(default=(), repr=False)  # TensorRT's warnings and errors
    library: str = "tensorrt"
    compute_capabilities: tuple[str, ...] = ()  # TensorRT-RTX: the GPUs the plan is for
    # the network's layers as the builder typed them: layer type → output dtype → count
    layers: dict[str, dict[str, int]] = field(default_factory=dict)


def _print_log(message: str) -> None:
    print(message, file=sys.stderr)


def build_tensorrt_engine(
    onnx_path: Path,
    engine_path: Path,
    profiles: Sequence[Profile],
    *,
    optimization_level: int = 3,
    memory_pool_limit: int | None = None,
    refittable: bool = False,
    weight_streaming: bool = False,
    timing_cache: Path | None = None,
    progress: ProgressFn | None = None,
    log: Callable[[str], None] = _print_log,
    library: str = "tensorrt",
    compute_capabilities: Sequence[str] = (),
) -> TensorRTBuildInfo:
    """Parse ``onnx_path`` (external data beside it), build one profile per ``Profile`` (in
    order), write the plan atomically to ``engine_path`` and describe it.

    ``memory_pool_limit`` caps the builder's workspace (bytes); ``timing_cache`` (one file per
    GPU and TensorRT version, chosen by the caller) is read if present and rewritten after the
    build; ``progress`` receives (phase, steps done, steps) from TensorRT's progress monitor and
    may raise to cancel the build; ``log`` receives TensorRT's warnings and errors.
    ``weight_streaming``: the plan can keep part of its weights in CPU memory and stream them
    in as it runs (a budget set when it loads, ``engines.tensorrt_engines.WeightBudget``).
    ``library`` "tensorrt_rtx" builds with TensorRT-RTX for ``compute_capabilities`` ("8.9", …).
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    _check_arguments(onnx_path, profiles, optimization_level, memory_pool_limit)
    rtx = _check_library(library, compute_capabilities, refittable)
    if not rtx:
        version = require_tensorrt()
        import tensorrt as trt
    else:  # TensorRT's API where this module uses it (the module docstring)
        version = require_tensorrt_rtx()
        import tensorrt_rtx as trt  # type: ignore[no-redef]

    record = _BuildRecord()
    logger = _logger(log, record, trt)
    builder = trt.Builder(logger)
    flags = 0
    if not rtx and version_tuple(version) < (11,):
        # 10.x: strong typing is opt-in; 11.x: always on, the flag deprecated
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise TensorRTBuildError(
            f"TensorRT could not parse {onnx_path}:\n" + _parser_errors(parser)
        )
    _check_profiles(onnx_path, network, profiles)

    config = builder.create_builder_config()
    config.builder_optimization_level = optimization_level
    if memory_pool_limit is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, memory_pool_limit)
    if refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    if weight_streaming:  # needs a strongly typed network: it is one (above)
        config.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)
    for stage in profiles:
        profile = builder.create_optimization_profile()
        for name, shape_range in stage.shapes.items():
            profile.set_shape(
                name,
                trt.Dims(list(shape_range.min)),
                trt.Dims(list(shape_range.opt)),
                trt.Dims(list(shape_range.max)),
            )
        if config.add_optimization_profile(profile) < 0:
            raise TensorRTBuildError(f"TensorRT rejected optimization profile {stage.name!r}")
    if rtx:  # typed by the tensorrt_rtx stubs (CI generates them), the rest by TensorRT's
        _set_rtx_targets(cast("tensorrt_rtx.IBuilderConfig", config), compute_capabilities)
    elif timing_cache is not None:
        _load_timing_cache(config, timing_cache, log)
    if progress is not None:
        config.progress_monitor = _progress_monitor(progress, record, trt)

    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if record.progress_error is not None:
        raise record.progress_error
    if plan is None:
        errors = "\n".join(f"  {line}" for line in record.errors[-20:])
        memory = not errors or "memory" in errors.lower()  # the hint only where it may apply
        raise TensorRTBuildError(
            f"TensorRT could not build {engine_path.name} from {onnx_path}"
            + (f":\n{errors}" if errors else "")
            + (("\n" if errors else "; ") + "(out of GPU memory is the usual cause: lower the "
               "optimization level, set a memory-pool limit, or narrow the profiles)"
               if memory else "")
        )  # fmt: skip
    inputs, outputs = _io_dtypes(network)
    layers = layer_precisions(network)
    device_memory: int | None = None
    refit_weights: tuple[str, ...] = ()
    streamable: int | None = None
    if not rtx or refittable:  # a GPU is here (refittable RTX builds need one)
        runtime = trt.Runtime(logger)  # held while the engine lives (TensorRT's lifetime rule)
        engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise TensorRTBuildError(
                f"TensorRT cannot load the plan it just built for {engine_path}"
            )
        device_memory = int(
            engine.device_memory_size_v2
            if hasattr(engine, "device_memory_size_v2")
            else engine.device_memory_size
        )
        refit_weights = tuple(refit_weight_names(engine)) if refittable else ()
        streamable = int(engine.streamable_weights_size) if weight_streaming else None
        del engine, runtime

    if timing_cache is not None and not rtx:
        with atomic_path(timing_cache) as tmp:
            tmp.write_bytes(config.get_timing_cache().serialize())
    digest = hashlib.sha256(plan).hexdigest()
    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(plan)
    return TensorRTBuildInfo(
        engine_path=engine_path,
        engine_bytes=memoryview(plan).nbytes,
        sha256=digest,
        seconds=seconds,
        tensorrt_version=version,
        device_memory_size=device_memory,
        inputs=inputs,
        outputs=outputs,
        profiles=tuple(p.name for p in profiles),
        refit_weights=refit_weights,
        weight_streaming=weight_streaming,
        streamable_bytes=streamable,
        log=tuple(record.messages),
        library=library,
        compute_capabilities=tuple(compute_capabilities) if rtx else (),
        layers=layers,
    )


def refit_weight_names(engine: tensorrt.ICudaEngine) -> list[str]:
    """The names of every refittable weight of ``engine`` (the map a LoRA refit fills)."""
    require_tensorrt()
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)  # must outlive the refitter
    refitter = trt.Refitter(engine, logger)
    return sorted(refitter.get_all_weights())


def _check_arguments(
    onnx_path: Path,
    profiles: Sequence[Profile],
    optimization_level: int,
    memory_pool_limit: int | None,
) -> None:
    if isinstance(optimization_level, bool) or optimization_level not in OPTIMIZATION_LEVELS:
        raise InputError(
            f"optimization_level must be an integer from 0 to 5, got {optimization_level!r}"
        )
    if memory_pool_limit is not None and (
        isinstance(memory_pool_limit, bool)
        or not isinstance(memory_pool_limit, int)
        or memory_pool_limit <= 0
    ):
        raise InputError(
            f"memory_pool_limit must be a positive number of bytes (or None for TensorRT's "
            f"default), got {memory_pool_limit!r}"
        )
    if not profiles:
        raise InputError("at least one optimization profile is needed, got none")
    names = [p.name for p in profiles]
    if len(set(names)) != len(names):
        raise InputError(f"profile names must be unique, got {names}")
    for profile in profiles:
        for name, r in profile.shapes.items():
            ordered = all(lo <= mid <= hi for lo, mid, hi in zip(r.min, r.opt, r.max, strict=False))
            if not (len(r.min) == len(r.opt) == len(r.max)) or not ordered:
                raise InputError(
                    f"profile {profile.name!r}: {name} needs min ≤ opt ≤ max of one rank, got "
                    f"min {r.min}, opt {r.opt}, max {r.max}"
                )
    if not onnx_path.is_file():
        raise MissingFileError(f"ONNX file {onnx_path} does not exist")


def _check_library(library: str, compute_capabilities: Sequence[str], refittable: bool) -> bool:
    """True for TensorRT-RTX; refuses what cannot build before any work."""
    if library not in LIBRARIES:
        raise InputError(f"library {library!r} is not one of {', '.join(LIBRARIES)}")
    if library == "tensorrt":
        if compute_capabilities:
            raise InputError(
                "compute capabilities are chosen for TensorRT-RTX builds only; TensorRT builds "
                "for the GPU it runs on"
            )
        return False
    bad = [cc for cc in compute_capabilities if cc not in RTX_COMPUTE_CAPABILITIES]
    if bad or not compute_capabilities:
        raise InputError(
            f"TensorRT-RTX builds for one or more of {', '.join(RTX_COMPUTE_CAPABILITIES)}; got "
            f"{', '.join(bad) if bad else 'none'}"
        )
    if refittable:
        check_rtx_refit()
    return True


def _set_rtx_targets(
    config: tensorrt_rtx.IBuilderConfig, compute_capabilities: Sequence[str]
) -> None:
    """TensorRT-RTX: compile the plan ahead of time for each compute capability ("8.9" → SM89)."""
    import tensorrt_rtx

    config.num_compute_capabilities = len(compute_capabilities)
    for index, cc in enumerate(compute_capabilities):
        target = tensorrt_rtx.ComputeCapability.__members__["SM" + cc.replace(".", "")]
        if not config.set_compute_capability(target, index):
            raise TensorRTBuildError(f"TensorRT-RTX refused compute capability {cc}")


def _check_profiles(
    onnx_path: Path, network: tensorrt.INetworkDefinition, profiles: Sequence[Profile]
) -> None:
    """Every profile names exactly the network's inputs, with their rank and static dims."""
    inputs = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        inputs[tensor.name] = tuple(int(tensor.shape[d]) for d in range(len(tensor.shape)))
    for profile in profiles:
        missing = sorted(set(inputs) - set(profile.shapes))
        unknown = sorted(set(profile.shapes) - set(inputs))
        if missing or unknown:
            raise InputError(
                f"profile {profile.name!r} must name exactly the inputs of {onnx_path.name} "
                f"({', '.join(sorted(inputs))})"
                + (f"; missing {', '.join(missing)}" if missing else "")
                + (f"; unknown {', '.join(unknown)}" if unknown else "")
            )
        for name, dims in inputs.items():
            r = profile.shapes[name]
            static_ok = all(
                d < 0 or lo == hi == d for d, lo, hi in zip(dims, r.min, r.max, strict=False)
            )
            if len(r.min) != len(dims) or not static_ok:
                network_dims = "×".join("?" if d < 0 else str(d) for d in dims)
                raise InputError(
                    f"profile {profile.name!r}: {name} range {r} does not fit the network's "
                    f"input {network_dims} (rank and static dimensions must match)"
                )


def _parser_errors(parser: tensorrt.OnnxParser) -> str:
    lines = []
    for i in range(parser.num_errors):
        error = parser.get_error(i)
        where = f"node {error.node()}"
        if error.node_name():
            where += f" ({error.node_name()}, {error.node_operator()})"
        lines.append(f"  {where}: {error.desc()}")
    return "\n".join(lines) or "  (the parser reported no details)"


def _io_dtypes(network: tensorrt.INetworkDefinition) -> tuple[dict[str, str], dict[str, str]]:
    """The network's inputs and outputs, name → manifest dtype name, as the builder typed them
    (no GPU needed, unlike asking a deserialized engine)."""

    def dtype(tensor: tensorrt.ITensor) -> str:
        return dtype_name(torch_dtype(tensor.dtype.name))

    inputs = {t.name: dtype(t) for t in map(network.get_input, range(network.num_inputs))}
    outputs = {t.name: dtype(t) for t in map(network.get_output, range(network.num_outputs))}
    return inputs, outputs


def layer_precisions(network: tensorrt.INetworkDefinition) -> dict[str, dict[str, int]]:
    """The network's layers as the builder sees them before fusion, by type and the dtype of
    their first output (strongly typed: the precision each runs at): {"MATRIX_MULTIPLY":
    {"bfloat16": 120}, …}. Fused layers need a deserialized engine (its inspector): GPU only."""
    counts: dict[str, dict[str, int]] = {}
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        name = layer.get_output(0).dtype.name if layer.num_outputs else "none"
        dtype = dtype_name(TRT_TORCH_DTYPES[name]) if name in TRT_TORCH_DTYPES else name.lower()
        by_dtype = counts.setdefault(layer.type.name, {})
        by_dtype[dtype] = by_dtype.get(dtype, 0) + 1
    return counts


def format_plan(name: str, info: TensorRTBuildInfo) -> str:
    """One engine's line of the build report: plan size, build seconds and targets, its layers by
    precision, and the four commonest layer types."""
    totals: dict[str, int] = {}
    for by_dtype in info.layers.values():
        for dtype, n in by_dtype.items():
            totals[dtype] = totals.get(dtype, 0) + n
    targets = ", ".join(info.compute_capabilities)
    where = f" for compute capabilities {targets}" if targets else ""
    precisions = ", ".join(f"{d} {n}" for d, n in sorted(totals.items(), key=lambda kv: -kv[1]))
    common = sorted(info.layers.items(), key=lambda kv: -sum(kv[1].values()))[:4]
    kinds = "; ".join(
        f"{kind} " + ", ".join(f"{d} {n}" for d, n in by_dtype.items()) for kind, by_dtype in common
    )
    layers = f"{sum(totals.values())} layers ({precisions}); most: {kinds}" if totals else (
        "no layers reported")  # fmt: skip
    return (
        f"{name}: {info.engine_bytes / 2**20:.1f} MiB plan in {info.seconds:.1f} s{where}; {layers}"
    )


def _load_timing_cache(
    config: tensorrt.IBuilderConfig, path: Path, log: Callable[[str], None]
) -> None:
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        log(
            f"timing cache {path} was written for another GPU or TensorRT version, or is "
            "damaged; starting a new one"
        )
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


@dataclass
class _BuildRecord:
    """What the TensorRT callbacks leave for the builder (they run on TensorRT's threads)."""

    messages: list[str] = field(default_factory=list)  # warnings and errors, as logged
    errors: list[str] = field(default_factory=list)
    progress_error: BaseException | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


def _logger(log: Callable[[str], None], record: _BuildRecord, trt: Any) -> tensorrt.ILogger:
    """A logger of library ``trt`` forwarding warnings and errors to ``log`` and ``record``."""

    class ForwardingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            if severity > trt.ILogger.Severity.WARNING:  # INFO and VERBOSE
                return
            line = f"[TensorRT {severity.name}] {msg}"
            with record.lock:
                record.messages.append(line)
                if severity != trt.ILogger.Severity.WARNING:
                    record.errors.append(msg)
            log(line)

    return ForwardingLogger()


def _progress_monitor(
    progress: ProgressFn, record: _BuildRecord, trt: Any
) -> tensorrt.IProgressMonitor:
    """Forwards the build phases of library ``trt`` to ``progress``. An exception from
    ``progress`` cannot cross TensorRT's threads: it cancels the build and the builder raises it
    afterwards."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._steps: dict[str, int] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            if parent_phase is not None:  # nested phases (hundreds with TensorRT-RTX): not shown
                return
            with record.lock:
                self._steps[phase_name] = num_steps
            self._report(phase_name, 0, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            with record.lock:
                total = self._steps.get(phase_name)
            if total is not None:  # steps are numbered 0 … num_steps-1
                self._report(phase_name, step + 1, total)
            return record.progress_error is None

        def phase_finish(self, phase_name: str) -> None:
            with record.lock:
                self._steps.pop(phase_name, None)

        def _report(self, phase: str, done: int, total: int) -> None:
            if record.progress_error is not None:
                return
            try:
                progress(phase, done, total)
            except BaseException as exc:  # raised again by build_tensorrt_engine
                record.progress_error = exc

    return Monitor()
