"""GGUF checkpoints (llama.cpp, city96/ComfyUI-GGUF) read, dequantized and written as ComfyUI does.

This module reads GGUF files (`read_gguf`), maps their tensor names (llama.cpp ↔ Hugging Face,
the Q/K row order, the DiT prefix), loads them as state dicts (`load_gguf_state_dict`) and writes
them (`write_gguf`, for tests and the tiny-model maker). The quantization types and `dequantize`,
whose torch kernels reproduce ComfyUI-GGUF's float16 arithmetic bit for bit, live in
`zimage_trt.models.gguf_quants` (which explains that arithmetic).

Load-time rules, as ComfyUI-GGUF's loader applies them (comfyui-semantics §13):

- the logical torch shape is the GGUF dims reversed, unless ``comfy.gguf.orig_shape.<name>``
  metadata gives it;
- when any tensor name starts with ``model.diffusion_model.``, only those tensors are kept, with
  the prefix stripped;
- 1-D BF16 tensors are dequantized to float32 at load;
- a text encoder's ``token_embd.weight`` with ≥ 65,536 rows is dequantized to float16 at load (so
  even an F32-stored embedding is rounded to float16);
- llama.cpp names map to Hugging Face names by ordered substring replacement (`LLAMA_SD_MAP`);
  the Q/K rows are un-permuted only for the ``llama`` architecture, never for ``qwen3`` (with
  the file's head counts; ComfyUI always assumes 32/8, which is what we fall back to);
- DiT files (architecture ``lumina2`` for Z-Image) keep the original/ComfyUI key names.

The ``gguf`` package (an optional dependency of the ``build`` extra) is needed to read and write
files; it is imported lazily so this module, and `dequantize`, work without it.
"""

from __future__ import annotations

import math
import os
import struct
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torch import Tensor

from zimage_trt.errors import FileError, MissingFileError, MissingLibraryError
from zimage_trt.models.gguf_quants import QUANT_TYPES, SUPPORTED_QTYPES, dequantize

if TYPE_CHECKING:
    from types import ModuleType

    from gguf import GGUFReader, GGUFWriter

GGUFKind = Literal["text_encoder", "dit"]
MetadataValue = str | int | float | bool

# ComfyUI-GGUF's llama-family text architectures (its TXT_ARCH_LIST minus T5, which is no Qwen).
TEXT_ARCHITECTURES = ("llama", "qwen2vl", "qwen3", "qwen3vl")
DIT_ARCHITECTURES = ("lumina2",)  # Z-Image's NextDiT is converted as "lumina2"
# ComfyUI-GGUF runs files without a llama.cpp architecture (stable-diffusion.cpp's, or its own old
# "pig"/"cow" tags) in a compatibility mode that detects the model from its keys.
_COMPAT_ARCHITECTURES = (None, "pig", "cow")
_LUMINA2_KEYS = ("cap_embedder.1.weight", "context_refiner.0.attention.qkv.weight")

DIT_PREFIX = "model.diffusion_model."
TOKEN_EMBD = "token_embd.weight"
TOKEN_EMBD_FP16_ROWS = 64 * 1024  # ComfyUI dequantizes a vocabulary this large to fp16 at load
ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."

# llama.cpp → Hugging Face names, applied in this order as substring replacements of every
# occurrence (ComfyUI-GGUF's LLAMA_SD_MAP). Order matters: "attn_q_norm." before "attn_q".
LLAMA_SD_MAP: tuple[tuple[str, str], ...] = (
    ("blk.", "model.layers."),
    ("attn_norm", "input_layernorm"),
    ("attn_q_norm.", "self_attn.q_norm."),
    ("attn_k_norm.", "self_attn.k_norm."),
    ("attn_v_norm.", "self_attn.v_norm."),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_norm", "post_attention_layernorm"),
    ("token_embd", "model.embed_tokens"),
    ("output_norm", "model.norm"),
    ("output.weight", "lm_head.weight"),
)
# ComfyUI un-permutes llama Q/K with these head counts whatever the file says; we read the file's
# metadata and fall back to them.
_LLAMA_DEFAULT_HEADS = (32, 8)

# the types gguf.quants can quantize (numpy), hence the ones `write_gguf` writes
WRITABLE_QTYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


def _import_gguf() -> ModuleType:
    try:
        import gguf
    except ModuleNotFoundError as error:
        raise MissingLibraryError(
            "reading or writing GGUF files needs the 'gguf' package: pip install gguf "
            "(or pip install 'zimage-trt[build]')"
        ) from error
    return gguf


# ----------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class GGUFTensor:
    """One stored tensor: GGUF name, GGML type name, logical torch shape, raw bytes.

    ``raw`` is a flat uint8 view of the memory-mapped file (read-only, never copied).
    """

    name: str
    qtype: str
    shape: tuple[int, ...]
    raw: np.ndarray

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """ComfyUI's runtime value of this tensor (`dequantize`), cast to ``dtype``."""
        return dequantize(self.raw, self.qtype, self.shape, dtype)


@dataclass(frozen=True)
class GGUFFile:
    """A GGUF file's architecture, scalar metadata and tensors (in file order, stored names)."""

    path: Path
    architecture: str | None
    metadata: dict[str, MetadataValue]
    tensors: dict[str, GGUFTensor]


def _string_field(reader: GGUFReader, key: str, path: Path) -> str | None:
    import gguf

    field = reader.get_field(key)
    if field is None:
        return None
    if field.types != [gguf.GGUFValueType.STRING]:
        raise ValueError(f"{path}: GGUF key {key} must be a string, got {field.types}")
    return str(field.contents())


def _orig_shape(reader: GGUFReader, name: str, path: Path) -> tuple[int, ...] | None:
    import gguf

    field = reader.get_field(ORIG_SHAPE_KEY + name)
    if field is None:
        return None
    if field.types != [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]:
        raise ValueError(
            f"{path}: {ORIG_SHAPE_KEY}{name} must be an array of int32, got {field.types}"
        )
    return tuple(int(v) for v in field.contents())


def _scalar_metadata(reader: GGUFReader) -> dict[str, MetadataValue]:
    import gguf

    # Arrays (the 151k-token vocabulary above all) are skipped: nothing here needs them.
    metadata: dict[str, MetadataValue] = {}
    for key, field in reader.fields.items():
        if len(field.types) == 1 and field.types[0] != gguf.GGUFValueType.ARRAY:
            metadata[key] = field.contents()
    return metadata


_DAMAGED = "it is truncated or damaged (an interrupted download?): download or copy it again"
# the fewest bytes a GGUF header entry takes: a metadata key/value (name length, type, a 1-byte
# value) and a tensor description (name length, dimension count, type, data offset)
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8
_GGUF_PREFIX = 24  # magic, version, tensor count, metadata count


def check_gguf_header(path: Path) -> bool:
    """Refuse a GGUF file whose header counts cannot fit in it (a truncated or damaged header)
    before the ``gguf`` reader walks off its end. Returns whether the file starts with the GGUF
    magic; other files are left to the reader, which says what they are not."""
    with path.open("rb") as f:
        prefix = f.read(_GGUF_PREFIX)
        size = os.fstat(f.fileno()).st_size
    if prefix[:4] != b"GGUF":
        return False
    if len(prefix) < _GGUF_PREFIX:
        raise FileError(
            f"{path}: not a readable GGUF file (it ends after {size} bytes, inside its "
            f"{_GGUF_PREFIX}-byte header); {_DAMAGED}"
        )
    order = ">" if struct.unpack("<I", prefix[4:8])[0] & 0xFFFF == 0 else "<"
    tensors, kvs = struct.unpack(order + "QQ", prefix[8:])
    needed = _GGUF_PREFIX + tensors * _MIN_TENSOR_INFO_BYTES + kvs * _MIN_KV_BYTES
    if needed > size:
        raise FileError(
            f"{path}: not a readable GGUF file (its header lists {tensors} tensors and {kvs} "
            f"metadata entries, which need at least {needed} bytes; the file has {size}); "
            f"{_DAMAGED}"
        )
    return True


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Open a GGUF file memory-mapped: architecture, scalar metadata, tensors (not dequantized).

    A tensor's shape is its GGUF dims reversed (torch order), or ``comfy.gguf.orig_shape.<name>``
    when the file has it (ComfyUI-GGUF's converter reshapes tensors whose rows do not fill whole
    blocks).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"GGUF file not found: {path}")
    gguf = _import_gguf()
    magic = check_gguf_header(path)
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as error:  # ValueError, or IndexError past the end of a damaged file
        detail = str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"
        hint = f"; {_DAMAGED}" if magic else ""  # a GGUF file, but damaged
        raise FileError(f"{path}: not a readable GGUF file ({detail}){hint}") from error
    if reader.byte_order != "I":
        raise ValueError(f"{path}: big-endian GGUF files are not supported")
    tensors: dict[str, GGUFTensor] = {}
    for t in reader.tensors:
        shape = _orig_shape(reader, t.name, path)
        if shape is None:
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        elif math.prod(shape) != int(t.n_elements):
            raise ValueError(
                f"{path}: {ORIG_SHAPE_KEY}{t.name} = {shape} does not hold the tensor's "
                f"{int(t.n_elements)} values"
            )
        tensors[t.name] = GGUFTensor(
            name=t.name,
            qtype=t.tensor_type.name,
            shape=shape,
            raw=t.data.reshape(-1).view(np.uint8),
        )
    return GGUFFile(
        path=path,
        architecture=_string_field(reader, "general.architecture", path),
        metadata=_scalar_metadata(reader),
        tensors=tensors,
    )


# ----------------------------------------------------------------------------------------------
# Names


def llama_to_hf_name(name: str) -> str:
    """A llama.cpp tensor name in Hugging Face form (`LLAMA_SD_MAP`, every rule in order)."""
    for old, new in LLAMA_SD_MAP:
        name = name.replace(old, new)
    return name


def hf_to_llama_name(name: str) -> str:
    """The llama.cpp name that `llama_to_hf_name` maps back to ``name``; ValueError if none."""
    gguf_name = name
    for old, new in reversed(LLAMA_SD_MAP):
        gguf_name = gguf_name.replace(new, old)
    if llama_to_hf_name(gguf_name) != name:
        raise ValueError(f"tensor {name!r} has no llama.cpp name that maps back to it")
    return gguf_name


def _llama_rows(weight: Tensor, n_head: int, to_hf: bool) -> Tensor:
    """llama.cpp stores each Q/K head's rotary halves interleaved (pairs); HF stores them split."""
    rows = weight.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"{rows} Q/K rows cannot be split into {n_head} heads of rotary pairs")
    half = rows // n_head // 2
    # GGUF row h·2·half + 2i + j holds HF row h·2·half + j·half + i
    grouped = (n_head, half, 2) if to_hf else (n_head, 2, half)
    return weight.reshape(*grouped, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _llama_heads(metadata: Mapping[str, MetadataValue]) -> tuple[int, int]:
    heads = metadata.get("llama.attention.head_count", _LLAMA_DEFAULT_HEADS[0])
    kv_heads = metadata.get("llama.attention.head_count_kv", heads)
    return int(heads), int(kv_heads)


def _strip_dit_prefix(tensors: Mapping[str, GGUFTensor]) -> dict[str, GGUFTensor]:
    """ComfyUI-GGUF's prefix rule: if any name has ``model.diffusion_model.``, keep only those."""
    if not any(name.startswith(DIT_PREFIX) for name in tensors):
        return dict(tensors)
    return {n.removeprefix(DIT_PREFIX): t for n, t in tensors.items() if n.startswith(DIT_PREFIX)}


def _resolve_kind(
    path: Path, arch: str | None, names: Sequence[str], kind: GGUFKind | None
) -> tuple[GGUFKind, str]:
    """Which network the file holds, and its architecture (detected for compat files)."""
    if kind not in (None, "text_encoder", "dit"):
        raise ValueError(f"kind must be 'text_encoder', 'dit' or None, got {kind!r}")
    compat = arch in _COMPAT_ARCHITECTURES and kind != "text_encoder"
    if compat and all(key in names for key in _LUMINA2_KEYS):
        return "dit", "lumina2"
    if kind in (None, "text_encoder") and arch in TEXT_ARCHITECTURES:
        return "text_encoder", arch
    if kind in (None, "dit") and arch in DIT_ARCHITECTURES:
        return "dit", arch
    if kind == "text_encoder":
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not a supported text encoder "
            f"(supported: {', '.join(TEXT_ARCHITECTURES)})"
        )
    if kind == "dit":
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not a Z-Image DiT "
            f"(expected {', '.join(DIT_ARCHITECTURES)})"
        )
    raise ValueError(
        f"{path}: GGUF architecture {arch!r} is neither a supported text encoder "
        f"({', '.join(TEXT_ARCHITECTURES)}) nor a Z-Image DiT ({', '.join(DIT_ARCHITECTURES)})"
    )


def _check_types(path: Path, tensors: Mapping[str, GGUFTensor]) -> None:
    """Fail before dequantizing anything when a tensor has a type without a kernel here."""
    bad = [t for t in tensors.values() if t.qtype not in QUANT_TYPES]
    if bad:
        types = sorted({t.qtype for t in bad})
        raise ValueError(
            f"{path}: unsupported GGUF tensor type(s) {', '.join(types)} "
            f"({len(bad)} tensor(s), first {bad[0].name!r}); "
            f"supported: {', '.join(SUPPORTED_QTYPES)}"
        )


def runtime_value(tensor: GGUFTensor, kind: GGUFKind, dtype: torch.dtype) -> Tensor:
    """The tensor as ComfyUI-GGUF computes it at run time, cast to ``dtype``."""
    big_vocabulary = tensor.name == TOKEN_EMBD and tensor.shape[0] >= TOKEN_EMBD_FP16_ROWS
    if kind == "text_encoder" and big_vocabulary:
        return tensor.dequantize(torch.float16).to(dtype)
    if len(tensor.shape) <= 1 and tensor.qtype == "BF16":
        return tensor.dequantize(torch.float32).to(dtype)
    return tensor.dequantize(dtype)


def open_dit_gguf(path: str | os.PathLike[str]) -> dict[str, GGUFTensor]:
    """A GGUF DiT's tensors by ComfyUI/original name (its prefix stripped), types checked."""
    file = read_gguf(path)
    tensors = _strip_dit_prefix(file.tensors)
    _resolve_kind(file.path, file.architecture, list(tensors), "dit")
    _check_types(file.path, tensors)
    return tensors


def load_gguf_state_dict(
    path: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    kind: GGUFKind | None = None,
) -> tuple[dict[str, Tensor], str]:
    """A GGUF checkpoint dequantized as ComfyUI-GGUF does, in Hugging Face / original key names.

    Returns ``(state_dict, architecture)``. ``kind`` None picks it from the architecture:
    ``llama``/``qwen2vl``/``qwen3``/``qwen3vl`` are text encoders (names mapped with
    `LLAMA_SD_MAP`, Q/K un-permuted for ``llama`` only), ``lumina2`` is the Z-Image DiT (names
    kept, ``model.diffusion_model.`` stripped). Every value is ComfyUI's runtime weight cast to
    ``dtype`` — float32 is ComfyUI's text-encoder compute dtype. For qwen2vl only the language
    model is loaded (ComfyUI also looks for a vision ``mmproj`` file).
    """
    file = read_gguf(path)
    tensors = _strip_dit_prefix(file.tensors)
    kind, arch = _resolve_kind(file.path, file.architecture, list(tensors), kind)
    _check_types(file.path, tensors)
    state_dict: dict[str, Tensor] = {}
    for name, tensor in tensors.items():
        value = runtime_value(tensor, kind, dtype)
        key = llama_to_hf_name(name) if kind == "text_encoder" else name
        if key in state_dict:
            raise ValueError(f"{file.path}: two tensors map to {key!r}")
        state_dict[key] = value
    if arch == "llama":
        heads, kv_heads = _llama_heads(file.metadata)
        for key, value in state_dict.items():
            if key.endswith(("q_proj.weight", "q_proj.bias")):
                state_dict[key] = _llama_rows(value, heads, to_hf=True)
            elif key.endswith(("k_proj.weight", "k_proj.bias")):
                state_dict[key] = _llama_rows(value, kv_heads, to_hf=True)
    return state_dict, arch


# ----------------------------------------------------------------------------------------------
# Writing (tests and the tiny-model maker)


def _add_metadata(writer: GGUFWriter, metadata: Mapping[str, MetadataValue]) -> None:
    for key, value in metadata.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int) and value < 0:
            writer.add_int32(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_string(key, value)


def write_gguf(
    path: str | os.PathLike[str],
    state_dict: Mapping[str, Tensor],
    arch: str,
    qtype_for: Callable[[str, Tensor], str],
    metadata: Mapping[str, MetadataValue] | None = None,
) -> None:
    """Write ``state_dict`` as a GGUF file the way llama.cpp / ComfyUI-GGUF lay it out.

    ``qtype_for(name, tensor)`` picks each tensor's type among `WRITABLE_QTYPES` (``name`` is
    the state-dict key). For a llama-family ``arch`` the names become llama.cpp's (the inverse
    of `LLAMA_SD_MAP`; for ``llama`` the Q/K rows are permuted, with the head counts taken from
    ``metadata["llama.attention.head_count(_kv)"]``); other architectures keep the names. A
    tensor whose last dim is not a whole number of blocks is stored as rows of one block with
    ``comfy.gguf.orig_shape.<name>`` metadata, as ComfyUI-GGUF's converter does. ``metadata``
    adds scalar key/values. The file is written to a temporary name and renamed into place.
    """
    gguf = _import_gguf()
    path = Path(path)
    metadata = dict(metadata or {})
    heads = _llama_heads(metadata) if arch == "llama" else None
    if heads is not None and "llama.attention.head_count" not in metadata:
        raise ValueError("writing a llama GGUF needs metadata['llama.attention.head_count']")
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    writer = gguf.GGUFWriter(tmp_name, arch=arch)
    try:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_metadata(writer, metadata)
        for name, tensor in state_dict.items():
            qtype = qtype_for(name, tensor)
            if qtype not in WRITABLE_QTYPES:
                raise ValueError(
                    f"cannot write {name!r} as {qtype}: gguf.quants quantizes only "
                    f"{', '.join(WRITABLE_QTYPES)}"
                )
            gguf_name = name
            value = tensor.detach().to(device="cpu", dtype=torch.float32)
            if arch in TEXT_ARCHITECTURES:
                gguf_name = hf_to_llama_name(name)
            if heads is not None and name.endswith(("q_proj.weight", "q_proj.bias")):
                value = _llama_rows(value, heads[0], to_hf=False)
            elif heads is not None and name.endswith(("k_proj.weight", "k_proj.bias")):
                value = _llama_rows(value, heads[1], to_hf=False)
            data = value.numpy()
            if data.ndim == 0:
                raise ValueError(f"cannot write {name!r}: GGUF has no 0-d tensors")
            block = QUANT_TYPES[qtype].block_size
            if data.shape[-1] % block:
                if data.size % block:
                    raise ValueError(
                        f"cannot write {name!r} {tuple(data.shape)} as {qtype}: {data.size} "
                        f"values do not fill blocks of {block}"
                    )
                writer.add_array(ORIG_SHAPE_KEY + gguf_name, [int(d) for d in data.shape])
                data = data.reshape(-1, block)
            ggml_type = gguf.GGMLQuantizationType[qtype]
            writer.add_tensor(gguf_name, gguf.quants.quantize(data, ggml_type), raw_dtype=ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp_name, path)
    except BaseException:
        writer.close()
        Path(tmp_name).unlink(missing_ok=True)
        raise
