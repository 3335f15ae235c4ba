"""The installed TensorRT and the GPU a plan is for: version checks, dtype names between TensorRT,
torch and the manifest, and the GPU identity a plan is tied to. TensorRT is imported inside the
functions, so that this imports (and says what to run instead) on machines without it."""

from __future__ import annotations

import re

import torch

from zimage_trt.errors import UnavailableError

MIN_TENSORRT = (10, 0)

# TensorRT DataType member name → torch dtype (the types our graphs use at their boundaries).
TRT_TORCH_DTYPES: dict[str, torch.dtype] = {
    "FLOAT": torch.float32,
    "HALF": torch.float16,
    "BF16": torch.bfloat16,
    "INT64": torch.int64,
    "INT32": torch.int32,
    "INT8": torch.int8,
    "UINT8": torch.uint8,
    "BOOL": torch.bool,
}
_TORCH_TRT_NAMES = {dtype: name for name, dtype in TRT_TORCH_DTYPES.items()}


def missing_tensorrt_error(detail: str = "") -> UnavailableError:
    return UnavailableError(
        "TensorRT is not installed"
        + (f" ({detail})" if detail else "")
        + "; install it (`pip install tensorrt`, ≥ 10) on an NVIDIA GPU machine, or use the "
        "onnxruntime backend (`zimage-trt build --backend onnxruntime`), which will run instead"
    )


def require_tensorrt() -> str:
    """The installed TensorRT's version; a clear RuntimeError when there is none.

    Callers then ``import tensorrt as trt`` themselves, so that mypy types every call through
    the stubs (a module returned from here would be ``Any``).
    """
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise missing_tensorrt_error(str(exc)) from None
    version = getattr(trt, "__version__", None)
    if not isinstance(version, str):
        # tensorrt-stubs alone make `tensorrt` an importable, empty namespace package
        raise missing_tensorrt_error("only type stubs found")
    if version_tuple(version) < MIN_TENSORRT:
        raise UnavailableError(
            f"TensorRT {version} is too old; zimage-trt needs TensorRT "
            f"≥ {'.'.join(map(str, MIN_TENSORRT))}"
        )
    return version


def version_tuple(version: str) -> tuple[int, ...]:
    """``"10.13.0.35"`` → (10, 13, 0, 35); a part's non-numeric tail ends the tuple there
    (``"10.14.1b1"`` → (10, 14, 1))."""
    parts = []
    for part in version.split("."):
        match = re.match(r"\d+", part)
        if match is None:
            break
        parts.append(int(match.group()))
        if match.end() < len(part):
            break
    return tuple(parts)


def torch_dtype(trt_name: str) -> torch.dtype:
    """The torch dtype of a TensorRT DataType name (``"BF16"`` → torch.bfloat16)."""
    if trt_name not in TRT_TORCH_DTYPES:
        raise TypeError(
            f"TensorRT data type {trt_name!r} has no torch equivalent here; "
            f"supported: {', '.join(TRT_TORCH_DTYPES)}"
        )
    return TRT_TORCH_DTYPES[trt_name]


def trt_dtype_name(dtype: torch.dtype) -> str:
    """The TensorRT DataType name of a torch dtype (torch.bfloat16 → ``"BF16"``)."""
    if dtype not in _TORCH_TRT_NAMES:
        raise TypeError(
            f"{dtype} has no TensorRT data type here; supported: "
            + ", ".join(dtype_name(d) for d in _TORCH_TRT_NAMES)
        )
    return _TORCH_TRT_NAMES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """The manifest's dtype name (torch.bfloat16 → ``"bfloat16"``, torch.bool → ``"bool"``)."""
    return str(dtype).removeprefix("torch.")


def tensorrt_version() -> str:
    """The installed TensorRT version (RuntimeError naming the alternative when missing)."""
    return require_tensorrt()


def gpu_identity(device: int = 0) -> dict[str, str]:
    """The GPU a plan is built for (plans are specific to it): name, compute capability, CUDA."""
    if not torch.cuda.is_available():
        raise UnavailableError(
            "no CUDA GPU is visible to torch; TensorRT engines are built on the NVIDIA GPU that "
            "will run them (use `zimage-trt build --backend onnxruntime` elsewhere)"
        )
    props = torch.cuda.get_device_properties(device)
    return {
        "name": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "cuda": str(torch.version.cuda),
    }
