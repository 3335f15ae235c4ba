"""Safetensors files read one tensor at a time and written byte-for-byte reproducibly, and the
errors a bad checkpoint raises.

`LazyStateDict` indexes a checkpoint (one file or a sharded set) from its headers and reads each
tensor when asked for, cast to the load dtype, so the 6B DiT never sits in memory twice; fp8
weights (plain, or ComfyUI's ``scaled_fp8`` with per-layer ``scale_weight``) are dequantized
exactly as ComfyUI's ``scaled_fp8_ops`` do: ``w.to(dtype) * scale.to(dtype)``.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from zimage_trt.atomic import atomic_path
from zimage_trt.errors import FileError, MissingFileError

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


class CheckpointError(FileError):
    """A checkpoint that is not what it should be (wrong network, missing keys, bad file)."""


class ModelNotFoundError(CheckpointError, MissingFileError):
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


_REFETCH = "download or copy it again"


def _damaged(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: damaged safetensors file: {what}; {_REFETCH}")


def _dims(path: Path, key: str, entry: Any) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype name, shape, data begin, data end) of a header entry, each checked for type."""
    try:
        name, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    except (KeyError, TypeError):
        raise CheckpointError(f"{path}: not a safetensors file (entry {key!r})") from None
    numbers = [*shape, *offsets] if isinstance(shape, list) and isinstance(offsets, list) else []
    if (
        not isinstance(name, str)
        or not numbers
        or len(offsets) != 2
        or not all(type(n) is int and n >= 0 for n in numbers)
    ):
        raise CheckpointError(f"{path}: not a safetensors file (entry {key!r})")
    return name, tuple(shape), offsets[0], offsets[1]


def read_safetensors_header(path: str | Path) -> tuple[dict[str, _TensorInfo], dict[str, str]]:
    """Tensor names, dtypes and shapes plus the ``__metadata__`` of a safetensors file, without
    reading any tensor data.

    The header is checked against the file as the ``safetensors`` reader would (each tensor's
    byte span fits its dtype and shape, the spans tile the data exactly, the file is as long as
    the header says), so a truncated download or a damaged header is refused here, naming the
    file and the sizes, before any weight is read."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) != 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (size,) = struct.unpack("<Q", prefix)
            if size > _MAX_HEADER:
                raise CheckpointError(f"{path}: not a safetensors file (header of {size} bytes)")
            raw = f.read(size)
    except IsADirectoryError:
        raise CheckpointError(f"{path}: a folder, not a safetensors file") from None
    if len(raw) < size:
        raise CheckpointError(
            f"{path}: truncated safetensors file: its header needs {8 + size} bytes, the file "
            f"has {file_size} (an interrupted download?); {_REFETCH}"
        )
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not a safetensors file ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: not a safetensors file (__metadata__ is not an object)")
    tensors = {}
    spans = []
    for key, entry in header.items():
        name, shape, begin, end = _dims(path, key, entry)
        if name not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {name}")
        dtype = _SAFETENSORS_DTYPES[name]
        needed = math.prod(shape) * dtype.itemsize
        if end - begin != needed:
            raise _damaged(
                path,
                f"tensor {key!r} is {name} {list(shape)} ({needed} bytes) but its data_offsets "
                f"[{begin}, {end}] hold {end - begin} bytes",
            )
        tensors[key] = _TensorInfo(path, key, dtype, shape)
        spans.append((begin, end, key))
    _, data_end, last = max(spans, default=(0, 0, ""), key=lambda span: span[1])
    if 8 + size + data_end > file_size:
        raise CheckpointError(
            f"{path}: truncated or damaged safetensors file: its header needs "
            f"{8 + size + data_end} bytes (to the end of tensor {last!r}), the file has "
            f"{file_size} (an interrupted download?); {_REFETCH}"
        )
    position, previous = 0, None
    for begin, end, key in sorted(spans):
        if begin != position:
            where = "the header" if previous is None else f"{previous!r}"
            how = "overlaps" if begin < position else "leaves a gap after"
            raise _damaged(path, f"tensor {key!r} at data_offsets [{begin}, {end}] {how} {where}")
        position, previous = end, key
    if 8 + size + data_end != file_size:
        raise _damaged(
            path, f"its header describes {8 + size + data_end} bytes, the file has {file_size}"
        )
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
        from safetensors import SafetensorError, safe_open

        try:
            handle = self._handles.get(info.file)
            if handle is None:
                handle = self._handles[info.file] = safe_open(str(info.file), framework="pt")
            return handle.get_tensor(info.stored_key)
        except SafetensorError as err:  # the file changed since its header was checked
            raise CheckpointError(
                f"{info.file}: unreadable safetensors file ({err}); {_REFETCH}"
            ) from err

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
