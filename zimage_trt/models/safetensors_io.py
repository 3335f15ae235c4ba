"""Safetensors files read one tensor at a time and written byte-for-byte reproducibly, and the
errors a bad checkpoint raises.

`LazyStateDict` indexes a checkpoint (one file or a sharded set) from its headers and reads each
tensor when asked for, cast to the load dtype, so the 6B DiT never sits in memory twice; fp8
weights (plain, or ComfyUI's ``scaled_fp8`` with per-layer ``scale_weight``) are dequantized
exactly as ComfyUI's ``scaled_fp8_ops`` do: ``w.to(dtype) * scale.to(dtype)``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from zimage_trt.atomic import atomic_path

LISTED_KEYS = 10  # how many keys an error message names before summarising

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
_DTYPE_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_MAX_HEADER = 100 * 2**20  # a safetensors header beyond this is a corrupt or foreign file


class CheckpointError(ValueError):
    """A checkpoint that is not what it should be (wrong network, missing keys, bad file)."""


class ModelNotFoundError(CheckpointError, FileNotFoundError):
    """The model's files are not where the reference says, and could not be fetched."""


def key_list(keys: Iterable[str]) -> str:
    """The first `LISTED_KEYS` keys (sorted), then ``… (+N more)``."""
    ordered = sorted(keys)
    listed = ", ".join(ordered[:LISTED_KEYS])
    rest = len(ordered) - LISTED_KEYS
    return listed + (f", … (+{rest} more)" if rest > 0 else "")


def save_safetensors(
    path: str | Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Write a safetensors file atomically, one tensor at a time (no second copy in memory).

    Written here rather than by ``safetensors.torch.save_file``, whose metadata order varies from
    run to run: these files are byte-for-byte reproducible (tensors and metadata sorted by name).
    """
    header: dict[str, Any] = {
        "__metadata__": dict(sorted({"format": "pt", **(metadata or {})}.items()))
    }
    offset = 0
    names = sorted(tensors)
    for name in names:
        tensor = tensors[name]
        if tensor.dtype not in _DTYPE_NAMES:
            raise ValueError(f"cannot save {name!r}: dtype {tensor.dtype} has no safetensors name")
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name in names:
            data = tensors[name].detach().to("cpu").contiguous().reshape(-1)
            f.write(data.view(torch.uint8).numpy().tobytes())


# ----------------------------------------------------------------------------------------------
# Reading safetensors lazily


@dataclass(frozen=True)
class _TensorInfo:
    file: Path
    stored_key: str
    dtype: torch.dtype
    shape: tuple[int, ...]


def read_safetensors_header(path: str | Path) -> tuple[dict[str, _TensorInfo], dict[str, str]]:
    """Tensor names, dtypes and shapes plus the ``__metadata__`` of a safetensors file, without
    reading any tensor data."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) != 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (size,) = struct.unpack("<Q", prefix)
            if size > _MAX_HEADER:
                raise CheckpointError(f"{path}: not a safetensors file (header of {size} bytes)")
            header = json.loads(f.read(size))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not a safetensors file ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    for key, entry in header.items():
        try:
            name, shape = entry["dtype"], tuple(int(d) for d in entry["shape"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: not a safetensors file (entry {key!r})") from None
        if name not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {name}")
        tensors[key] = _TensorInfo(path, key, _SAFETENSORS_DTYPES[name], shape)
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _is_fp8_marker(key: str) -> bool:
    # ComfyUI marks scaled-fp8 files with "<model prefix>scaled_fp8"
    return key.rsplit(".", 1)[-1] == "scaled_fp8"


def _quant_format(raw: Tensor) -> str:
    """The ``format`` of a ComfyUI ``.comfy_quant`` tensor (JSON as uint8 bytes)."""
    try:
        return str(json.loads(bytes(raw.tolist()).decode("utf-8")).get("format", ""))
    except (ValueError, AttributeError):
        return ""


class LazyStateDict(Mapping[str, Tensor]):
    """The tensors of a checkpoint (one safetensors file or a sharded set), each read from disk
    when asked for, cast to ``dtype`` (floating tensors only).

    fp8 weights are dequantized: with a ComfyUI scale (``<layer>.scale_weight``, or the newer
    ``<layer>.weight_scale``) to ``w.to(dtype) * scale.to(dtype)``, as ComfyUI's
    ``scaled_fp8_ops`` computes them, else to ``w.to(dtype)``. The scales, input scales, the
    ``scaled_fp8`` marker and ``.comfy_quant`` entries are not keys of the mapping.
    """

    def __init__(
        self,
        tensors: Mapping[str, _TensorInfo],
        dtype: torch.dtype,
        name: str,
        metadata: Mapping[str, str] | None = None,
        scales: Mapping[str, _TensorInfo] | None = None,
    ) -> None:
        self._tensors = dict(tensors)
        self._scales = dict(scales or {})
        self.dtype = dtype
        self.name = name  # the file (or index) named in error messages
        self.metadata = dict(metadata or {})
        self._handles: dict[Path, Any] = {}

    @classmethod
    def open(
        cls, files: Sequence[Path], dtype: torch.dtype, name: str | None = None
    ) -> LazyStateDict:
        """Index the safetensors ``files`` (shards of one checkpoint)."""
        raw: dict[str, _TensorInfo] = {}
        metadata: dict[str, str] = {}
        for file in files:
            tensors, meta = read_safetensors_header(file)
            raw.update(tensors)
            metadata.update(meta)
        label = name or (str(files[0]) if len(files) == 1 else f"{files[0].parent}")
        tensors, scales = {}, {}
        comfy_quant = [key for key in raw if key.endswith(".comfy_quant")]
        for key, info in raw.items():
            if key.endswith((".scale_weight", ".weight_scale")):
                scales[key.rsplit(".", 1)[0] + ".weight"] = info
            elif key.endswith(".weight_scale_2") or "quant_state.bitsandbytes" in key:
                raise CheckpointError(
                    f"{label}: {key!r} belongs to a 4-bit quantization (NVFP4 / bitsandbytes) "
                    "that zimage-trt does not load; use a bf16, fp8 or GGUF file"
                )
            elif not (
                _is_fp8_marker(key)
                or key.endswith((".scale_input", ".input_scale", ".comfy_quant"))
            ):
                tensors[key] = info
        out = cls(tensors, dtype, label, metadata, scales)
        # ComfyUI's mixed-precision files name each layer's format, per layer or in the metadata
        formats = {
            key.removesuffix(".comfy_quant"): _quant_format(out._read(raw[key]))
            for key in comfy_quant
        }
        if "_quantization_metadata" in metadata:
            try:
                layers = json.loads(metadata["_quantization_metadata"]).get("layers", {})
                formats.update({k: str(v.get("format", "")) for k, v in layers.items()})
            except (ValueError, AttributeError):
                raise CheckpointError(f"{label}: unreadable _quantization_metadata") from None
        for layer, fmt in sorted(formats.items()):
            if not fmt.startswith("float8"):
                raise CheckpointError(
                    f"{label}: layer {layer!r} is quantized as {fmt or 'an unknown format'}; "
                    "only float8 layers can be loaded"
                )
        return out

    def _read(self, info: _TensorInfo) -> Tensor:
        handle = self._handles.get(info.file)
        if handle is None:
            from safetensors import safe_open

            handle = self._handles[info.file] = safe_open(str(info.file), framework="pt")
        return handle.get_tensor(info.stored_key)

    def __getitem__(self, key: str) -> Tensor:
        info = self._tensors[key]
        tensor = self._read(info)
        if not (tensor.is_floating_point() or tensor.dtype in _FP8):
            return tensor
        scale_info = self._scales.get(key)
        if scale_info is not None:
            scale = self._read(scale_info).to(self.dtype)
            if scale.ndim == 1 and tensor.ndim > 1 and scale.numel() == tensor.shape[0]:
                scale = scale.reshape(-1, *([1] * (tensor.ndim - 1)))  # per output channel
            return tensor.to(self.dtype) * scale
        return tensor.to(self.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def stored_dtype(self, key: str) -> torch.dtype:
        return self._tensors[key].dtype

    def meta(self) -> dict[str, Tensor]:
        """Shape-only (``meta`` device) tensors in the load dtype: for reading a configuration or
        checking a key map without touching the data."""
        out = {}
        for key, info in self._tensors.items():
            dtype = info.dtype
            if info.dtype.is_floating_point:  # fp8 included
                dtype = self.dtype
            out[key] = torch.empty(info.shape, dtype=dtype, device="meta")
        return out

    def view(self, keys: Mapping[str, str]) -> LazyStateDict:
        """A view holding ``new name → stored name`` for the given keys (shares the files)."""
        out = LazyStateDict(
            {new: self._tensors[old] for new, old in keys.items()},
            self.dtype,
            self.name,
            self.metadata,
            {new: self._scales[old] for new, old in keys.items() if old in self._scales},
        )
        out._handles = self._handles
        return out
