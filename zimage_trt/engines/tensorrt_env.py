"""The installed TensorRT and the GPU a plan is for: version checks, dtype names between TensorRT,
torch and the manifest, and the GPU identity a plan is tied to. TensorRT is imported inside the
functions, so that this imports (and says what to run instead) on machines without it."""

from __future__ import annotations

import re

import torch

from zimage_trt.errors import InputError, UnavailableError

MIN_TENSORRT = (10, 0)
# TensorRT-RTX's build targets (its ComputeCapability enum: RTX 20…50 series, L4/L40S, RTX PRO
# 6000 Blackwell, GB10); it has no data-centre Hopper or Blackwell target (H100/H200, B200).
RTX_COMPUTE_CAPABILITIES = ("7.5", "8.0", "8.6", "8.9", "12.0", "12.1")
# built for when no GPU is here to ask: RTX 30/40/50 series, L4/L40S, RTX PRO 6000 Blackwell
RTX_DEFAULT_TARGETS = ("8.6", "8.9", "12.0")
FP8_MIN_CAPABILITY = (8, 9)  # Ada: the first FP8 tensor cores (Hopper, Blackwell have them too)

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


def require_tensorrt_rtx() -> str:
    """The installed TensorRT-RTX's version; a clear error naming the extra when there is none.
    Callers then ``import tensorrt_rtx as trt`` themselves (typed by CI's generated stubs)."""
    try:
        import tensorrt_rtx
    except ImportError as exc:
        raise UnavailableError(
            f"TensorRT-RTX is not installed ({exc}); install it with "
            "`pip install 'zimage-trt[tensorrt-rtx]'` (it builds ahead of time, no GPU needed), "
            "or use the onnxruntime backend (`zimage-trt build --backend onnxruntime`)"
        ) from None
    return str(tensorrt_rtx.__version__)


def without_fp8(capabilities: tuple[str, ...]) -> list[str]:
    """Those of ``capabilities`` whose GPUs have no FP8 tensor cores (below Ada's 8.9)."""
    return [cc for cc in capabilities if version_tuple(cc) < FP8_MIN_CAPABILITY]


def fp8_refusal(capabilities: tuple[str, ...], where: str) -> InputError:
    bad = without_fp8(capabilities)
    return InputError(
        f"FP8 engines need compute capability ≥ 8.9 (Ada, Hopper, Blackwell: FP8 tensor cores); "
        f"{where} {', '.join(bad)} {'has' if len(bad) == 1 else 'have'} none: build there from "
        "an int8 calibration (zimage-trt calibrate --precision int8)"
    )


def rtx_targets(text: str | None, fp8: bool = False) -> tuple[tuple[str, ...], str]:
    """The compute capabilities a TensorRT-RTX build is for, and why: ``text`` ("8.9,12.0"),
    else this machine's GPU when TensorRT-RTX targets it, else ``RTX_DEFAULT_TARGETS``. For
    ``fp8`` engines a target without FP8 is refused, and left out of the defaults."""
    targets, why = _rtx_targets(text)
    if fp8 and without_fp8(targets):
        if text is not None or targets != RTX_DEFAULT_TARGETS:  # asked for, or this GPU
            raise fp8_refusal(targets, "--compute-capability" if text else "this GPU,")
        kept = tuple(cc for cc in targets if cc not in without_fp8(targets))
        return kept, f"{why}, less {', '.join(without_fp8(targets))} (no FP8)"
    return targets, why


def _rtx_targets(text: str | None) -> tuple[tuple[str, ...], str]:
    if text is not None:
        wanted = [part.strip() for part in text.split(",") if part.strip()]
        bad = [cc for cc in wanted if cc not in RTX_COMPUTE_CAPABILITIES]
        if bad or not wanted:
            raise InputError(
                f"--compute-capability {text!r}: {', '.join(bad) or 'none given'} is not a "
                f"TensorRT-RTX target; choose from {', '.join(RTX_COMPUTE_CAPABILITIES)}"
            )
        return tuple(dict.fromkeys(wanted)), "as asked"
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        here = f"{major}.{minor}"
        if here in RTX_COMPUTE_CAPABILITIES:
            return (here,), f"this machine's GPU ({torch.cuda.get_device_name(0)})"
        return RTX_DEFAULT_TARGETS, (
            f"this machine's GPU ({torch.cuda.get_device_name(0)}, {here}) is not a "
            "TensorRT-RTX target; built for the RTX defaults"
        )
    return RTX_DEFAULT_TARGETS, "no GPU here; built for the RTX defaults"


def check_rtx_refit() -> None:
    """A refittable TensorRT-RTX build needs a GPU at build time: refused up front without one."""
    if not torch.cuda.is_available():
        raise UnavailableError(
            "TensorRT-RTX cannot build refittable engines without a GPU: it compiles them with "
            'Myelin, which needs CUDA at build time (it fails with "MyelinCheckException … '
            'CHECK(status == CUDA_SUCCESS) failed"); build without --refittable here, or on the '
            "RTX GPU that will run them"
        )


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
