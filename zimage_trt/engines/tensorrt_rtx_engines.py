"""The TensorRT-RTX backend: ahead-of-time plans run behind the same engine interface as TensorRT.

TensorRT-RTX's runtime API is TensorRT's (profiles, shapes, tensor addresses, enqueue), so
``TensorRTRTXEngine`` is a ``TensorRTEngine`` that differs in two places only: the plan is
deserialized by ``tensorrt_rtx``, and each execution context is created from a runtime config
that carries the folder's runtime cache. TensorRT-RTX compiles shape-specialised kernels at run
time (JIT); ``RuntimeCache`` keeps them in one file per GPU architecture beside the engines
(``runtime-cache-sm89.rtxcache``), shared by every engine of the folder, so that the compile is
paid once per GPU and not at every start. Kernels are specialised eagerly (at a shape's first
call, not in the background) so that what the file holds after a run is what the next run needs.

Never run on an RTX GPU (none is reachable from where this was written; the H100/H200 are not
TensorRT-RTX targets): the calls are driven by the recording double (tests/tensorrt_double.py)
and typed by the stubs CI generates from the installed wheel.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from torch import Tensor

from zimage_trt.atomic import atomic_path
from zimage_trt.engines.manifest import Profile
from zimage_trt.engines.tensorrt_engines import TensorRTEngine
from zimage_trt.engines.tensorrt_env import require_tensorrt_rtx
from zimage_trt.errors import RunError, UnavailableError

if TYPE_CHECKING:
    import tensorrt
    import tensorrt_rtx

Log = Callable[[str], None]


def runtime_cache_path(folder: str | Path, compute_capability: str) -> Path:
    """The runtime cache file of one GPU architecture in an engine folder."""
    return Path(folder) / f"runtime-cache-sm{compute_capability.replace('.', '')}.rtxcache"


class RuntimeCache:
    """TensorRT-RTX's JIT-compiled kernels for one GPU, shared by the engines of a folder and
    kept in ``path`` (None: in memory only). Read when the first engine attaches it; written
    (atomically, only when it changed) by ``save``. A file TensorRT-RTX cannot use (another
    GPU, an older TensorRT-RTX, damage) is said so and replaced; a folder that cannot be
    written is said so once, and the kernels are then compiled again by the next process."""

    def __init__(self, path: Path | None, log: Log = lambda msg: None) -> None:
        self.path = path
        self.log = log
        self.loaded_bytes = 0  # what the file held when it was read
        self.writes = 0
        self._cache: tensorrt_rtx.IRuntimeCache | None = None
        self._saved = b""
        self._unwritable = False

    def attach(self, config: tensorrt_rtx.IRuntimeConfig) -> None:
        """Give one execution context's runtime config the shared cache (created, and filled
        from the file, at the first call)."""
        if self._cache is None:
            self._cache = config.create_runtime_cache()
            self._load(self._cache)
        if not config.set_runtime_cache(self._cache):
            raise RunError("TensorRT-RTX refused the runtime cache")

    def _load(self, cache: tensorrt_rtx.IRuntimeCache) -> None:
        if self.path is None:
            return
        if not self.path.is_file():
            self.log(f"runtime cache: none yet; the kernels compiled now are kept in {self.path}")
            return
        blob = self.path.read_bytes()
        if not cache.deserialize(blob):
            self.log(
                f"runtime cache {self.path}: TensorRT-RTX cannot use it (written for another "
                "GPU or by a newer TensorRT-RTX, or damaged); its kernels are compiled again "
                "and the file replaced"
            )
            return
        self._saved, self.loaded_bytes = blob, len(blob)
        self.log(f"runtime cache: {len(blob) / 2**20:.1f} MiB of compiled kernels from {self.path}")

    def save(self) -> bool:
        """Write the cache when it holds kernels the file does not; whether it was written."""
        if self._cache is None or self.path is None or self._unwritable:
            return False
        blob = bytes(cast("bytes", self._cache.serialize()))  # IHostMemory: a buffer
        if blob == self._saved:
            return False
        try:
            with atomic_path(self.path) as tmp:
                tmp.write_bytes(blob)
        except OSError as exc:
            self._unwritable = True
            self.log(
                f"runtime cache {self.path} cannot be written ({exc}); the kernels compiled in "
                "this process will be compiled again by the next one"
            )
            return False
        self._saved = blob
        self.writes += 1
        return True


class TensorRTRTXEngine(TensorRTEngine):
    """A TensorRT-RTX plan behind the engine interface (``TensorRTEngine``'s, with its shared
    activation block and profile selection). ``runtime_cache``: the folder's shared
    ``RuntimeCache``, saved after each call that met a new shape (a new JIT specialisation);
    None keeps one in memory for this engine. LoRA refit and CUDA graphs are TensorRT's only
    (``engines.folder`` refuses them for these engines before anything loads)."""

    LIBRARY = "TensorRT-RTX"

    def __init__(
        self,
        name: str,
        plan: bytes,
        profiles: Sequence[Profile],
        *,
        runtime_cache: RuntimeCache | None = None,
        **options: Any,
    ) -> None:
        self.runtime_cache = runtime_cache or RuntimeCache(None)
        super().__init__(name, plan, profiles, **options)

    def __call__(self, **inputs: Tensor) -> dict[str, Tensor]:
        known = len(self._slots)
        outputs = super().__call__(**inputs)
        if len(self._slots) != known:  # a new shape: TensorRT-RTX specialised kernels for it
            self.runtime_cache.save()
        return outputs

    def _deserialize(self, plan: bytes) -> tensorrt.ICudaEngine:
        version = require_tensorrt_rtx()
        import tensorrt_rtx as trt

        logger = trt.Logger(trt.Logger.WARNING)
        self._runtime_rtx = trt.Runtime(logger)
        engine = self._runtime_rtx.deserialize_cuda_engine(plan)
        if engine is None:
            raise UnavailableError(
                f"engine {self.name!r}: TensorRT-RTX {version} could not deserialize the plan "
                "(built by another TensorRT-RTX version or for other GPUs, or corrupt); rebuild it"
            )
        # The run-time calls from here on are TensorRT's API, shared with the base class.
        return cast("tensorrt.ICudaEngine", engine)

    def _new_context(self) -> tensorrt.IExecutionContext | None:
        import tensorrt_rtx as trt

        engine = cast("tensorrt_rtx.ICudaEngine", self._engine)  # what _deserialize loaded
        config = engine.create_runtime_config()
        config.set_execution_context_allocation_strategy(
            trt.ExecutionContextAllocationStrategy.USER_MANAGED
        )
        config.dynamic_shapes_kernel_specialization_strategy = (
            trt.DynamicShapesKernelSpecializationStrategy.EAGER
        )
        self.runtime_cache.attach(config)
        context = engine.create_execution_context(config)
        return cast("tensorrt.IExecutionContext | None", context)

    def _refit(self, weights: Mapping[str, Tensor], more: Mapping[str, Tensor]) -> None:
        raise UnavailableError(
            f"engine {self.name!r}: swapping LoRAs into TensorRT-RTX engines is not supported; "
            "rebuild the folder with the workflow's LoRAs"
        )
