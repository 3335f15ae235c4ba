"""GGML quantization types and ComfyUI-GGUF's dequantization kernels, in torch.

This module holds the GGML tensor types supported here (`QuantType`, `quant_type`,
`SUPPORTED_QTYPES`, `QUANT_TYPES`) and `dequantize`, which turns a tensor's stored bytes into its
values. Reading, naming, loading and writing GGUF files is `zimage_trt.models.gguf`'s, which
imports this module (never the reverse).

Users hold the Qwen3-4B text encoder, and sometimes the Z-Image DiT, as GGUF files. ComfyUI-GGUF
keeps those weights quantized and dequantizes them on every forward with torch kernels that read
each block scale ``d`` as float16 and *keep* it float16, so every product (``d·q``,
``d·sc·q − dmin·m`` …) is rounded to float16 before the cast to the compute dtype. `dequantize`
reproduces those kernels operation by operation (checked bit for bit against ComfyUI-GGUF's
``dequant.py`` at 795e451), so the weights equal ComfyUI's rather than gguf's float32 reference,
which differs from them by float16 rounding in most elements.

Only torch and numpy are needed here, never the ``gguf`` package.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor


class QuantType(NamedTuple):
    """A GGML tensor type: its name, GGML id, values per block and bytes per block."""

    name: str
    ggml_id: int
    block_size: int
    type_size: int


QUANT_TYPES = {
    q.name: q
    for q in (
        QuantType("F32", 0, 1, 4),
        QuantType("F16", 1, 1, 2),
        QuantType("BF16", 30, 1, 2),
        QuantType("Q8_0", 8, 32, 34),
        QuantType("Q4_0", 2, 32, 18),
        QuantType("Q4_1", 3, 32, 20),
        QuantType("Q5_0", 6, 32, 22),
        QuantType("Q5_1", 7, 32, 24),
        QuantType("Q2_K", 10, 256, 84),
        QuantType("Q3_K", 11, 256, 110),
        QuantType("Q4_K", 12, 256, 144),
        QuantType("Q5_K", 13, 256, 176),
        QuantType("Q6_K", 14, 256, 210),
        QuantType("IQ4_NL", 20, 32, 18),
        QuantType("IQ4_XS", 23, 256, 136),
    )
}
_QUANT_BY_ID = {q.ggml_id: q for q in QUANT_TYPES.values()}
SUPPORTED_QTYPES = tuple(QUANT_TYPES)
_PLAIN_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

# Blocks are dequantized this many values at a time so the integer temporaries of a 389M-value
# embedding stay small; blocks are independent, so chunking cannot change a value.
_CHUNK_VALUES = 1 << 22


def _unsupported(name: str) -> ValueError:
    return ValueError(
        f"unsupported GGUF tensor type {name}; supported: {', '.join(SUPPORTED_QTYPES)}"
    )


def quant_type(qtype: str | int) -> QuantType:
    """The `QuantType` for a GGML type name (``"Q8_0"``) or id (``8``, a GGMLQuantizationType)."""
    if isinstance(qtype, str):
        if qtype not in QUANT_TYPES:
            raise _unsupported(qtype)
        return QUANT_TYPES[qtype]
    if int(qtype) not in _QUANT_BY_ID:
        raise _unsupported(getattr(qtype, "name", f"(GGML type id {int(qtype)})"))
    return _QUANT_BY_ID[int(qtype)]


# ----------------------------------------------------------------------------------------------
# Dequantization: ComfyUI-GGUF's torch kernels. Every scale is float16 and every product and sum
# is a float16 tensor op (float32 arithmetic rounded to float16, on CPU and CUDA alike), in the
# order the kernels use. Layouts are GGML's (ggml-common.h).


def _f16(blocks: Tensor, offset: int) -> Tensor:
    """The float16 number at byte ``offset`` of every block, as an [n, 1] column."""
    return blocks[:, offset : offset + 2].view(torch.float16)


def _planes(packed: Tensor, bits: int) -> Tensor:
    """[..., k] bytes → [..., k·8/bits] fields: the lowest field of every byte, then the next …

    GGML packs nibbles and 2-bit crumbs this way: value j sits in byte j mod k.
    """
    mask = (1 << bits) - 1
    return torch.cat([(packed >> shift) & mask for shift in range(0, 8, bits)], dim=-1)


def _bitstream(packed: Tensor, bits: int) -> Tensor:
    """[..., k] bytes → [..., k·8/bits] fields in little-endian bit order: byte 0's first."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).flatten(-2)


def _half(x: Tensor) -> Tensor:
    return x.to(torch.float16)  # small integers: exact


def _q8_0(b: Tensor) -> Tensor:
    return _f16(b, 0) * _half(b[:, 2:].view(torch.int8))


def _q4_0(b: Tensor) -> Tensor:
    q = _planes(b[:, 2:], 4).to(torch.int8) - 8
    return _f16(b, 0) * _half(q)


def _q4_1(b: Tensor) -> Tensor:
    return _f16(b, 0) * _half(_planes(b[:, 4:], 4)) + _f16(b, 2)


def _q5_0(b: Tensor) -> Tensor:
    q = (_planes(b[:, 6:], 4) | (_bitstream(b[:, 2:6], 1) << 4)).to(torch.int8) - 16
    return _f16(b, 0) * _half(q)


def _q5_1(b: Tensor) -> Tensor:
    q = _planes(b[:, 8:], 4) | (_bitstream(b[:, 4:8], 1) << 4)
    return _f16(b, 0) * _half(q) + _f16(b, 2)


def _k_scales_mins(packed: Tensor) -> tuple[Tensor, Tensor]:
    """The eight 6-bit scales and mins [n, 8] of a Q4_K/Q5_K block from their 12 bytes."""
    low_sc, low_m, rest = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat((low_sc & 0x3F, (rest & 0x0F) | ((low_sc >> 2) & 0x30)), dim=-1)
    mins = torch.cat((low_m & 0x3F, (rest >> 4) | ((low_m >> 2) & 0x30)), dim=-1)
    return scales, mins


def _k_affine(b: Tensor, q: Tensor, scale_bytes: int) -> Tensor:
    """fp16(fp16(fp16(d·sc)·q) − fp16(dmin·m)) for Q4_K/Q5_K, q as [n, 8, 32]."""
    sc, m = _k_scales_mins(b[:, scale_bytes : scale_bytes + 12])
    d_sc = (_f16(b, 0) * _half(sc)).unsqueeze(-1)
    dmin_m = (_f16(b, 2) * _half(m)).unsqueeze(-1)
    return (d_sc * _half(q) - dmin_m).flatten(1)


def _q4_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    # 4 chunks of 32 bytes; each holds sub-block 2i in its low and 2i+1 in its high nibbles
    q = _planes(b[:, 16:].reshape(n, 4, 32), 4).reshape(n, 8, 32)
    return _k_affine(b, q, 4)


def _q5_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    low = _planes(b[:, 48:].reshape(n, 4, 32), 4).reshape(n, 8, 32)
    high = _planes(b[:, 16:48], 1).reshape(n, 8, 32)  # bit s of byte l: sub-block s, value l
    return _k_affine(b, low | (high << 4), 4)


def _q6_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    low = _planes(b[:, 0:128].reshape(n, 2, 64), 4)  # per 128-value half
    high = _planes(b[:, 128:192].reshape(n, 2, 32), 2)
    q = (low | (high << 4)).to(torch.int8) - 32
    d_sc = (_f16(b, 208) * _half(b[:, 192:208].view(torch.int8))).unsqueeze(-1)
    return (d_sc * _half(q.reshape(n, 16, 16))).flatten(1)


def _q3_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    scales = b[:, 96:108]
    sc = (_planes(scales[:, 0:8], 4) | (_planes(scales[:, 8:12], 2) << 4)).to(torch.int8) - 32
    low = _planes(b[:, 32:96].reshape(n, 2, 32), 2).reshape(n, 256).to(torch.int8)
    high_clear = (_planes(b[:, 0:32], 1) ^ 1).to(torch.int8)  # a clear hmask bit subtracts 4
    q = low - (high_clear << 2)
    d_sc = (_f16(b, 108) * _half(sc)).unsqueeze(-1)
    return (d_sc * _half(q.reshape(n, 16, 16))).flatten(1)


def _q2_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    scales = b[:, 0:16]
    d_sc = (_f16(b, 80) * _half(scales & 0x0F)).unsqueeze(-1)
    dmin_m = (_f16(b, 82) * _half(scales >> 4)).unsqueeze(-1)
    q = _planes(b[:, 16:80].reshape(n, 2, 32), 2).reshape(n, 16, 16)
    return (d_sc * _half(q) - dmin_m).flatten(1)


_IQ4_VALUES = torch.tensor(
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=torch.int8
)


def _iq4_nl(b: Tensor) -> Tensor:
    q = _IQ4_VALUES.to(b.device)[_planes(b[:, 2:], 4).long()]
    return _f16(b, 0) * _half(q)


def _iq4_xs(b: Tensor) -> Tensor:
    n = b.shape[0]
    low = _bitstream(b[:, 4:8], 4)
    high = _bitstream(b[:, 2:4], 2)
    sc = (low | (high << 4)).to(torch.int8) - 32
    d_sc = (_f16(b, 0) * _half(sc)).unsqueeze(-1)
    q = _IQ4_VALUES.to(b.device)[_planes(b[:, 8:].reshape(n, 8, 16), 4).long()]
    return (d_sc * _half(q)).flatten(1)


_KERNELS: dict[str, Callable[[Tensor], Tensor]] = {
    "Q8_0": _q8_0,
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q2_K": _q2_k,
    "Q3_K": _q3_k,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
    "IQ4_NL": _iq4_nl,
    "IQ4_XS": _iq4_xs,
}


def _byte_tensor(raw: np.ndarray | Tensor) -> Tensor:
    """The bytes of ``raw`` as a flat uint8 tensor, sharing memory (no copy of a mapped file)."""
    if isinstance(raw, Tensor):
        return raw.contiguous().reshape(-1).view(torch.uint8)
    flat = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    with warnings.catch_warnings():
        # the mapping is read-only; nothing here writes through the shared tensor
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(flat)


def dequantize(
    raw: np.ndarray | Tensor,
    qtype: str | int,
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The values of a GGUF tensor as ComfyUI-GGUF computes them, cast to ``dtype``.

    ``raw`` is the stored data (any dtype, read as bytes), ``qtype`` a GGML type name or id and
    ``shape`` the logical torch shape. Block types are dequantized with float16 scales and
    float16 products, then cast; BF16/F16/F32 are converted directly. The result never shares
    memory with ``raw``.
    """
    quant = quant_type(qtype)
    data = _byte_tensor(raw)
    numel = math.prod(shape)
    if numel % quant.block_size:
        raise ValueError(
            f"{quant.name} stores blocks of {quant.block_size} values; shape {tuple(shape)} "
            f"holds {numel}"
        )
    n_blocks = numel // quant.block_size
    if data.numel() != n_blocks * quant.type_size:
        raise ValueError(
            f"{quant.name} data for shape {tuple(shape)} must be {n_blocks * quant.type_size} "
            f"bytes, got {data.numel()}"
        )
    if quant.name in _PLAIN_DTYPES:
        values = data.view(_PLAIN_DTYPES[quant.name]).reshape(tuple(shape))
        return values.to(dtype, copy=True)
    kernel = _KERNELS[quant.name]
    blocks = data.view(n_blocks, quant.type_size)
    out = torch.empty(n_blocks, quant.block_size, dtype=torch.float16, device=data.device)
    step = max(1, _CHUNK_VALUES // quant.block_size)
    for start in range(0, n_blocks, step):
        out[start : start + step] = kernel(blocks[start : start + step])
    return out.reshape(tuple(shape)).to(dtype)
