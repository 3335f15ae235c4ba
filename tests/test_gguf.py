"""GGUF files: ComfyUI-GGUF's float16 dequantization, its load-time rules, names, the writer.

Oracles, none of them the code under test:

- `reference`: ComfyUI-GGUF's arithmetic emulated in numpy from the GGML block layouts, written
  after ggml's ``dequantize_row_*`` loops: scales are float16 and every product, sum and
  difference is a float16 op (computed in float32, rounded to float16 — what torch's half
  kernels do on CPU and CUDA), in the order ComfyUI's kernels use;
- gguf's ``quants.quantize`` (the data) and float32 ``quants.dequantize`` (the values up to
  float16 rounding);
- gguf's llama.cpp tensor-name table and transformers' llama Q/K un-permute.

gguf 0.19 quantizes only F32/F16/BF16 and the legacy 32-value blocks, so the K-quants and IQ4
are checked on random blocks (random bytes with finite float16 scales).
"""

from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from torch import Tensor
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

import zimage_trt.models.gguf as gguf_module
import zimage_trt.models.gguf_quants as gguf_quants
from zimage_trt.models.dit import DiTConfig, ZImageDiT
from zimage_trt.models.dit_keys import config_from_state_dict as dit_config_from_state_dict
from zimage_trt.models.gguf import (
    DIT_PREFIX,
    hf_to_llama_name,
    llama_to_hf_name,
    load_gguf_state_dict,
    read_gguf,
    write_gguf,
)
from zimage_trt.models.gguf_quants import SUPPORTED_QTYPES, dequantize, quant_type
from zimage_trt.models.text_encoder import Qwen3Config, Qwen3TextEncoder
from zimage_trt.models.text_encoder_keys import load_text_encoder

F16, F32 = np.float16, np.float32
SUPPORTED = (
    "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS"
)
IQ4_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113])


# ----------------------------------------------------------------------------------------------
# The float16 reference: each returns (values [n, block] float16, |added/subtracted term|).


def mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (np.asarray(a).astype(F32) * np.asarray(b).astype(F32)).astype(F16)


def add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a.astype(F32) + b.astype(F32)).astype(F16)


def sub(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a.astype(F32) - b.astype(F32)).astype(F16)


def half_at(b: np.ndarray, offset: int) -> np.ndarray:
    return b[:, offset : offset + 2].copy().view(F16)[:, 0]


Reference = tuple[np.ndarray, np.ndarray]


def ref_q8_0(b: np.ndarray) -> Reference:
    y = mul(half_at(b, 0)[:, None], b[:, 2:34].copy().view(np.int8))
    return y, np.zeros(y.shape)


def ref_q4_0(b: np.ndarray, values: np.ndarray | None = None) -> Reference:
    n, d, qs = len(b), half_at(b, 0), b[:, 2:18].astype(np.int64)
    y = np.empty((n, 32), F16)
    for j in range(16):
        lo, hi = qs[:, j] & 15, qs[:, j] >> 4
        if values is None:
            lo, hi = lo - 8, hi - 8
        else:  # IQ4_NL: the nibble indexes a table
            lo, hi = values[lo], values[hi]
        y[:, j], y[:, j + 16] = mul(d, lo), mul(d, hi)
    return y, np.zeros(y.shape)


def ref_iq4_nl(b: np.ndarray) -> Reference:
    return ref_q4_0(b, IQ4_VALUES)


def ref_q4_1(b: np.ndarray) -> Reference:
    n, d, m, qs = len(b), half_at(b, 0), half_at(b, 2), b[:, 4:20].astype(np.int64)
    y = np.empty((n, 32), F16)
    for j in range(16):
        y[:, j] = add(mul(d, qs[:, j] & 15), m)
        y[:, j + 16] = add(mul(d, qs[:, j] >> 4), m)
    return y, np.abs(m.astype(F32))[:, None].repeat(32, 1)


def ref_q5(b: np.ndarray, with_min: bool) -> Reference:
    n, d = len(b), half_at(b, 0)
    m = half_at(b, 2) if with_min else np.zeros(n, F16)
    start = 4 if with_min else 2
    qh = b[:, start : start + 4].copy().view("<u4")[:, 0].astype(np.int64)
    qs = b[:, start + 4 : start + 20].astype(np.int64)
    y = np.empty((n, 32), F16)
    for j in range(16):
        x0 = (qs[:, j] & 15) | (((qh >> j) << 4) & 0x10)
        x1 = (qs[:, j] >> 4) | ((qh >> (j + 12)) & 0x10)
        if with_min:
            y[:, j], y[:, j + 16] = add(mul(d, x0), m), add(mul(d, x1), m)
        else:
            y[:, j], y[:, j + 16] = mul(d, x0 - 16), mul(d, x1 - 16)
    return y, np.abs(m.astype(F32))[:, None].repeat(32, 1)


def scale_min_k4(j: int, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if j < 4:
        return s[:, j] & 63, s[:, j + 4] & 63
    return (s[:, j + 4] & 15) | ((s[:, j - 4] >> 6) << 4), (s[:, j + 4] >> 4) | (
        (s[:, j] >> 6) << 4
    )


def ref_q45_k(b: np.ndarray, five_bits: bool) -> Reference:
    n, d, dmin = len(b), half_at(b, 0), half_at(b, 2)
    s = b[:, 4:16].astype(np.int64)
    qh = b[:, 16:48].astype(np.int64)
    qs = (b[:, 48:176] if five_bits else b[:, 16:144]).astype(np.int64)
    y, offset = np.empty((n, 256), F16), np.empty((n, 256))
    for chunk in range(4):  # 64 values: sub-block 2·chunk (low nibbles), then 2·chunk + 1 (high)
        for half in range(2):
            sc, m = scale_min_k4(2 * chunk + half, s)
            d_sc, dmin_m = mul(d, sc), mul(dmin, m)
            for lane in range(32):
                q = (qs[:, 32 * chunk + lane] >> (4 * half)) & 15
                if five_bits:
                    q = q + np.where(qh[:, lane] & (1 << (2 * chunk + half)), 16, 0)
                i = 64 * chunk + 32 * half + lane
                y[:, i] = sub(mul(d_sc, q), dmin_m)
                offset[:, i] = np.abs(dmin_m.astype(F32))
    return y, offset


def ref_q6_k(b: np.ndarray) -> Reference:
    n, d = len(b), half_at(b, 208)
    ql, qh = b[:, 0:128].astype(np.int64), b[:, 128:192].astype(np.int64)
    sc = b[:, 192:208].copy().view(np.int8).astype(np.int64)
    y = np.empty((n, 256), F16)
    for part in range(2):  # 128 values each
        for lane in range(32):
            lo0, lo1 = ql[:, 64 * part + lane], ql[:, 64 * part + lane + 32]
            hi = qh[:, 32 * part + lane]
            quads = (
                (lo0 & 15) | (((hi >> 0) & 3) << 4),
                (lo1 & 15) | (((hi >> 2) & 3) << 4),
                (lo0 >> 4) | (((hi >> 4) & 3) << 4),
                (lo1 >> 4) | (((hi >> 6) & 3) << 4),
            )
            for k, q in enumerate(quads):
                scale = sc[:, 8 * part + lane // 16 + 2 * k]
                y[:, 128 * part + 32 * k + lane] = mul(mul(d, scale), q - 32)
    return y, np.zeros(y.shape)


def ref_q3_k(b: np.ndarray) -> Reference:
    n, d = len(b), half_at(b, 108)
    hm, qs = b[:, 0:32].astype(np.int64), b[:, 32:96].astype(np.int64)
    # ggml unpacks the twelve scale bytes as three little-endian words with these masks
    aux = b[:, 96:108].copy().view("<u4").astype(np.int64)
    k1, k2, tmp = 0x03030303, 0x0F0F0F0F, aux[:, 2]
    words = (
        (aux[:, 0] & k2) | (((tmp >> 0) & k1) << 4),
        (aux[:, 1] & k2) | (((tmp >> 2) & k1) << 4),
        ((aux[:, 0] >> 4) & k2) | (((tmp >> 4) & k1) << 4),
        ((aux[:, 1] >> 4) & k2) | (((tmp >> 6) & k1) << 4),
    )
    scales = np.stack(words, 1).astype("<u4").view(np.int8).astype(np.int64) - 32
    y, i, sub_block, bit = np.empty((n, 256), F16), 0, 0, 1
    for part in range(2):
        for shift in range(0, 8, 2):
            for lanes in (range(16), range(16, 32)):
                dl = mul(d, scales[:, sub_block])
                sub_block += 1
                for lane in lanes:
                    low = (qs[:, 32 * part + lane] >> shift) & 3
                    y[:, i] = mul(dl, low - np.where(hm[:, lane] & bit, 0, 4))
                    i += 1
            bit <<= 1
    return y, np.zeros(y.shape)


def ref_q2_k(b: np.ndarray) -> Reference:
    n, d, dmin = len(b), half_at(b, 80), half_at(b, 82)
    scales, qs = b[:, 0:16].astype(np.int64), b[:, 16:80].astype(np.int64)
    y, offset, i, sub_block = np.empty((n, 256), F16), np.empty((n, 256)), 0, 0
    for part in range(2):
        for shift in range(0, 8, 2):
            for lanes in (range(16), range(16, 32)):
                sc = scales[:, sub_block]
                sub_block += 1
                dl, ml = mul(d, sc & 15), mul(dmin, sc >> 4)
                for lane in lanes:
                    y[:, i] = sub(mul(dl, (qs[:, 32 * part + lane] >> shift) & 3), ml)
                    offset[:, i] = np.abs(ml.astype(F32))
                    i += 1
    return y, offset


def ref_iq4_xs(b: np.ndarray) -> Reference:
    n, d = len(b), half_at(b, 0)
    scales_h = b[:, 2:4].copy().view("<u2")[:, 0].astype(np.int64)
    scales_l, qs = b[:, 4:8].astype(np.int64), b[:, 8:136].astype(np.int64)
    y = np.empty((n, 256), F16)
    for ib in range(8):
        ls = ((scales_l[:, ib // 2] >> (4 * (ib % 2))) & 15) | (((scales_h >> (2 * ib)) & 3) << 4)
        dl = mul(d, ls - 32)
        for j in range(16):
            byte = qs[:, 16 * ib + j]
            y[:, 32 * ib + j] = mul(dl, IQ4_VALUES[byte & 15])
            y[:, 32 * ib + j + 16] = mul(dl, IQ4_VALUES[byte >> 4])
    return y, np.zeros(y.shape)


REFERENCES: dict[str, Callable[[np.ndarray], Reference]] = {
    "Q8_0": ref_q8_0,
    "Q4_0": ref_q4_0,
    "Q4_1": ref_q4_1,
    "Q5_0": lambda b: ref_q5(b, with_min=False),
    "Q5_1": lambda b: ref_q5(b, with_min=True),
    "Q2_K": ref_q2_k,
    "Q3_K": ref_q3_k,
    "Q4_K": lambda b: ref_q45_k(b, five_bits=False),
    "Q5_K": lambda b: ref_q45_k(b, five_bits=True),
    "Q6_K": ref_q6_k,
    "IQ4_NL": ref_iq4_nl,
    "IQ4_XS": ref_iq4_xs,
}
# byte offsets of each block's float16 scales (d, and dmin/m where present)
SCALE_OFFSETS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2)}
SCALE_OFFSETS |= {"Q6_K": (208,), "IQ4_NL": (0,), "IQ4_XS": (0,)}
# a single float16 rounding of an exact product: the value IS fp16(float32 reference)
ONE_ROUNDING = ("Q8_0", "Q4_0", "Q5_0", "IQ4_NL")


def random_blocks(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """n blocks of random bytes whose float16 scales are finite, of both signs, of varied size."""
    q = quant_type(name)
    blocks = rng.integers(0, 256, (n, q.type_size), dtype=np.uint8)
    for offset in SCALE_OFFSETS[name]:
        scale = rng.uniform(1e-3, 1.0, n) * rng.choice([-1.0, 1.0], n)
        blocks[:, offset : offset + 2] = scale.astype(F16).view(np.uint8).reshape(n, 2)
    return blocks


def quantized_blocks(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """gguf.quants' blocks for a random tensor whose rows span three orders of magnitude."""
    x = rng.standard_normal((n, 32)) * np.logspace(-3, 0, n)[:, None]
    return gguf.quants.quantize(x.astype(F32), GGMLQuantizationType[name])


# ----------------------------------------------------------------------------------------------
# Dequantization


@pytest.mark.parametrize("name", ["F32", "F16", "BF16"])
def test_plain_types_are_exact_and_copied(name: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 10) * 100
    raw = gguf.quants.quantize(x.numpy(), GGMLQuantizationType[name])
    expected = {"F32": x, "F16": x.half().float(), "BF16": x.bfloat16().float()}[name]
    out = dequantize(raw, name, (6, 10), torch.float32)
    assert out.dtype == torch.float32 and torch.equal(out, expected)
    # the result owns its memory: writing to it leaves the stored data alone
    out.zero_()
    assert torch.equal(dequantize(raw, name, (6, 10)), expected)


@pytest.mark.parametrize("name", list(REFERENCES))
def test_block_types_reproduce_comfyui_float16_arithmetic(name: str) -> None:
    rng = np.random.default_rng(list(REFERENCES).index(name))
    q = quant_type(name)
    n = 48
    blocks = (
        random_blocks(name, n, rng) if name in SCALE_OFFSETS else quantized_blocks(name, n, rng)
    )
    shape = (n // 4, 4 * q.block_size)
    out = dequantize(blocks, name, shape, torch.float32)
    assert out.shape == shape and out.dtype == torch.float32
    expected, offset = REFERENCES[name](blocks)
    assert torch.equal(out, torch.from_numpy(expected.astype(F32).reshape(shape)))
    assert torch.equal(dequantize(blocks, name, shape, torch.float16), out.half())

    # gguf's float32 reference agrees to float16 rounding, but not exactly
    f32 = torch.from_numpy(gguf.quants.dequantize(blocks, GGMLQuantizationType[name]))
    f32 = f32.reshape(shape)
    bound = 2.0**-9 * (f32.abs() + 2 * torch.from_numpy(offset).float().reshape(shape)) + 2.0**-22
    assert ((out - f32).abs() <= bound).all()
    assert (out != f32).sum() > out.numel() // 10  # measured: 22 % (Q4_0) to 98 % (Q5_K)
    if name in ONE_ROUNDING:
        assert torch.equal(out, f32.half().float())
    else:  # intermediate float16 products change values beyond a final float16 cast
        assert (out != f32.half().float()).any()


def test_chunked_dequantization_equals_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = random_blocks("Q4_K", 9, np.random.default_rng(7))
    whole = dequantize(blocks, "Q4_K", (9, 256))
    monkeypatch.setattr(gguf_quants, "_CHUNK_VALUES", 512)  # two blocks per chunk, one left over
    assert torch.equal(dequantize(torch.from_numpy(blocks), "Q4_K", (9, 256)), whole)


def test_dequantize_rejects_unsupported_types_and_wrong_sizes() -> None:
    with pytest.raises(ValueError) as error:
        dequantize(np.zeros(40, np.uint8), "Q8_1", (32,))
    assert str(error.value) == f"unsupported GGUF tensor type Q8_1; supported: {SUPPORTED}"
    with pytest.raises(ValueError) as error:
        dequantize(np.zeros(66, np.uint8), GGMLQuantizationType.IQ2_XXS, (256,))
    assert str(error.value) == f"unsupported GGUF tensor type IQ2_XXS; supported: {SUPPORTED}"
    assert ", ".join(SUPPORTED_QTYPES) == SUPPORTED
    with pytest.raises(ValueError) as error:
        dequantize(np.zeros(33, np.uint8), "Q8_0", (32,))
    assert str(error.value) == "Q8_0 data for shape (32,) must be 34 bytes, got 33"
    with pytest.raises(ValueError) as error:
        dequantize(np.zeros(34, np.uint8), "Q8_0", (8, 5))
    assert str(error.value) == "Q8_0 stores blocks of 32 values; shape (8, 5) holds 40"


# ----------------------------------------------------------------------------------------------
# Text-encoder files


def q8_0_values(x: Tensor) -> Tensor:
    """ComfyUI's Q8_0 weight: one float16 rounding of gguf's exact float32 product d·q."""
    raw = gguf.quants.quantize(x.numpy(), GGMLQuantizationType.Q8_0)
    return torch.from_numpy(gguf.quants.dequantize(raw, GGMLQuantizationType.Q8_0)).half().float()


def q8_0_matrices(name: str, tensor: Tensor) -> str:
    return "Q8_0" if tensor.ndim == 2 else "F32"


def full_qwen3() -> tuple[Qwen3TextEncoder, dict[str, Tensor]]:
    """A randomized tiny encoder and the full-LM state dict a GGUF holds: the encoder's blocks
    plus the last block (which cannot reach hidden_states[-2]) and the final norm."""
    torch.manual_seed(0)
    config = Qwen3Config.tiny()
    encoder = Qwen3TextEncoder(config).eval()
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.normal_()
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[1]))
    state_dict = dict(encoder.state_dict())
    last = config.num_encoder_layers
    for key in [k for k in state_dict if k.startswith("model.layers.0.")]:
        state_dict[key.replace("layers.0.", f"layers.{last}.")] = torch.randn_like(state_dict[key])
    state_dict["model.norm.weight"] = 1 + 0.3 * torch.randn(config.hidden_size)
    return encoder, state_dict


def test_qwen3_round_trip_matches_llama_cpp_names_and_comfyui_values(tmp_path: Path) -> None:
    encoder, state_dict = full_qwen3()
    path = tmp_path / "qwen3-tiny-Q8_0.gguf"
    write_gguf(path, state_dict, "qwen3", q8_0_matrices)
    assert not [p.name for p in tmp_path.iterdir() if p != path]  # no temporary left behind

    # stored under llama.cpp's own names for qwen3, as Q8_0 matrices and F32 norms
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, Qwen3Config.tiny().num_hidden_layers)
    file = read_gguf(path)
    assert file.architecture == "qwen3"
    for key, value in state_dict.items():
        stem, suffix = key.rsplit(".", 1)
        gguf_name = f"{table.get_name(stem)}.{suffix}"
        assert hf_to_llama_name(key) == gguf_name and llama_to_hf_name(gguf_name) == key
        stored = file.tensors[gguf_name]
        assert stored.shape == tuple(value.shape)
        assert stored.qtype == ("Q8_0" if value.ndim == 2 else "F32")
    assert list(file.tensors) == [hf_to_llama_name(k) for k in state_dict]

    loaded, arch = load_gguf_state_dict(path)
    assert arch == "qwen3"
    assert list(loaded) == list(state_dict)
    for key, value in state_dict.items():
        expected = q8_0_values(value) if value.ndim == 2 else value
        assert loaded[key].dtype == torch.float32 and torch.equal(loaded[key], expected), key
    # qwen3 Q/K rows are used as stored (no llama un-permute)
    q_name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(loaded[q_name], file.tensors["blk.0.attn_q.weight"].dequantize())

    # the file loads into the encoder (config inferred: 4 blocks + final norm → 3 encoder blocks)
    quantized = load_text_encoder(loaded)
    assert quantized.config == Qwen3Config.tiny()
    ids = torch.randint(0, 151936, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        reference, out = encoder(ids, mask), quantized(ids, mask)
    # Q8_0 rounds each weight to a step of 1/127 of its 32-block's max |w|: 0.51-0.57 % rms
    # relative error per matrix here. The path holds 22 quantized matrices (embedding + 3 blocks
    # × 7) whose independent errors add roughly in quadrature: √22 · 0.55 % ≈ 2.6 %. Measured
    # 1.4-1.7 % over five token draws; bounded by 3 %, and above 0.5 % (the weights did change).
    relative = (out - reference).norm() / reference.norm()
    assert 5e-3 < relative < 3e-2


@pytest.mark.parametrize("rows, rounded", [(65536, True), (65535, False)])
def test_large_text_vocabulary_is_rounded_to_float16_at_load(
    tmp_path: Path, rows: int, rounded: bool
) -> None:
    torch.manual_seed(0)
    embedding = torch.randn(rows, 8)
    state_dict = {"model.embed_tokens.weight": embedding, "model.norm.weight": torch.randn(8)}
    write_gguf(tmp_path / "te.gguf", state_dict, "qwen3", lambda name, t: "F32")
    loaded, _ = load_gguf_state_dict(tmp_path / "te.gguf")
    expected = embedding.half().float() if rounded else embedding
    assert torch.equal(loaded["model.embed_tokens.weight"], expected)
    assert not torch.equal(embedding.half().float(), embedding)
    assert torch.equal(loaded["model.norm.weight"], state_dict["model.norm.weight"])

    # the rule belongs to text encoders: a DiT file keeps the same tensor as stored
    dit_file = tmp_path / "dit.gguf"
    write_gguf(dit_file, {"token_embd.weight": embedding}, "lumina2", lambda n, t: "F32")
    loaded, _ = load_gguf_state_dict(dit_file, kind="dit")
    assert torch.equal(loaded["token_embd.weight"], embedding)


def test_bf16_vectors_go_through_float32_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    norm, weight = torch.randn(32), torch.randn(64, 32)
    state_dict = {"model.norm.weight": norm, "model.layers.0.mlp.up_proj.weight": weight}
    write_gguf(tmp_path / "bf16.gguf", state_dict, "qwen3", lambda name, t: "BF16")
    stored = read_gguf(tmp_path / "bf16.gguf").tensors["output_norm.weight"]
    assert (stored.qtype, stored.shape) == ("BF16", (32,))
    loaded, _ = load_gguf_state_dict(tmp_path / "bf16.gguf")
    assert torch.equal(loaded["model.norm.weight"], norm.bfloat16().float())
    assert torch.equal(loaded["model.layers.0.mlp.up_proj.weight"], weight.bfloat16().float())
    loaded16, _ = load_gguf_state_dict(tmp_path / "bf16.gguf", dtype=torch.float16)
    assert loaded16["model.norm.weight"].dtype == torch.float16
    assert torch.equal(loaded16["model.norm.weight"], norm.bfloat16().float().half())


def test_llama_q_k_rows_are_unpermuted_as_transformers_does(tmp_path: Path) -> None:
    torch.manual_seed(0)
    heads, kv_heads, head_dim, width = 4, 2, 8, 32
    q, k = torch.randn(heads * head_dim, width), torch.randn(kv_heads * head_dim, width)
    v = torch.randn(kv_heads * head_dim, width)
    state_dict = {
        "model.layers.0.self_attn.q_proj.weight": q,
        "model.layers.0.self_attn.k_proj.weight": k,
        "model.layers.0.self_attn.v_proj.weight": v,
    }
    metadata = {"llama.attention.head_count": heads, "llama.attention.head_count_kv": kv_heads}
    write_gguf(tmp_path / "llama.gguf", state_dict, "llama", lambda n, t: "F32", metadata)
    file = read_gguf(tmp_path / "llama.gguf")
    assert file.metadata["llama.attention.head_count"] == heads
    processor = LlamaTensorProcessor()
    for name, hf, n_kv in (("attn_q", q, heads), ("attn_k", k, kv_heads)):
        stored = file.tensors[f"blk.0.{name}.weight"].dequantize().numpy()
        assert not np.array_equal(stored, hf.numpy())
        unpermuted = processor._reverse_permute_weights(stored, heads, n_kv)
        assert np.array_equal(unpermuted, hf.numpy())
    assert torch.equal(file.tensors["blk.0.attn_v.weight"].dequantize(), v)
    loaded, arch = load_gguf_state_dict(tmp_path / "llama.gguf")
    assert arch == "llama"
    for key, value in state_dict.items():
        assert torch.equal(loaded[key], value), key


# ----------------------------------------------------------------------------------------------
# DiT files


def q8_0_where_possible(name: str, tensor: Tensor) -> str:
    return "Q8_0" if tensor.ndim == 2 and tensor.shape[-1] % 32 == 0 else "F32"


@pytest.mark.parametrize("arch", ["lumina2", "pig"])
def test_dit_keeps_original_names_and_strips_the_comfyui_prefix(tmp_path: Path, arch: str) -> None:
    torch.manual_seed(0)
    dit = ZImageDiT(DiTConfig.tiny())
    original = dit.state_dict()
    state_dict = {DIT_PREFIX + key: value for key, value in original.items()}
    state_dict["stray.weight"] = torch.ones(4)  # unprefixed next to prefixed: ComfyUI drops it
    write_gguf(tmp_path / "dit.gguf", state_dict, arch, q8_0_where_possible)
    assert read_gguf(tmp_path / "dit.gguf").architecture == arch

    loaded, found = load_gguf_state_dict(tmp_path / "dit.gguf")
    assert found == "lumina2"  # "pig" (no llama.cpp architecture) is detected from the keys
    assert list(loaded) == list(original)
    for key, value in original.items():
        expected = value if q8_0_where_possible(key, value) == "F32" else q8_0_values(value)
        assert torch.equal(loaded[key], expected), key
    assert dit_config_from_state_dict(loaded) == DiTConfig.tiny()
    ZImageDiT(DiTConfig.tiny()).load_state_dict(loaded, strict=True)


def test_rows_that_do_not_fill_blocks_use_comfyui_orig_shape(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 24)  # 96 values = 3 Q8_0 blocks, but 24 is not a multiple of 32
    write_gguf(tmp_path / "w.gguf", {"w": x}, "lumina2", lambda n, t: "Q8_0")
    reader = gguf.GGUFReader(tmp_path / "w.gguf")
    assert reader.tensors[0].shape.tolist() == [32, 3]
    field = reader.get_field("comfy.gguf.orig_shape.w")
    assert field is not None and field.contents() == [4, 24]
    assert field.types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
    assert read_gguf(tmp_path / "w.gguf").tensors["w"].shape == (4, 24)
    loaded, _ = load_gguf_state_dict(tmp_path / "w.gguf")
    assert torch.equal(loaded["w"], q8_0_values(x.reshape(3, 32)).reshape(4, 24))

    with pytest.raises(ValueError) as error:
        write_gguf(tmp_path / "bad.gguf", {"w": torch.ones(3, 5)}, "lumina2", lambda n, t: "Q8_0")
    assert str(error.value) == "cannot write 'w' (3, 5) as Q8_0: 15 values do not fill blocks of 32"


# ----------------------------------------------------------------------------------------------
# Errors


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.gguf"
    with pytest.raises(FileNotFoundError) as error:
        load_gguf_state_dict(path)
    assert str(error.value) == f"GGUF file not found: {path}"


def test_not_a_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04" * 64)
    with pytest.raises(ValueError) as error:
        read_gguf(path)
    assert str(error.value) == f"{path}: not a readable GGUF file (GGUF magic invalid)"


def test_unsupported_architectures_name_file_and_architecture(tmp_path: Path) -> None:
    gemma = tmp_path / "gemma.gguf"
    write_gguf(gemma, {"output_norm.weight": torch.ones(8)}, "gemma3", lambda n, t: "F32")
    with pytest.raises(ValueError) as error:
        load_gguf_state_dict(gemma, kind="text_encoder")
    assert str(error.value) == (
        f"{gemma}: GGUF architecture 'gemma3' is not a supported text encoder "
        "(supported: llama, qwen2vl, qwen3, qwen3vl)"
    )
    with pytest.raises(ValueError) as error:
        load_gguf_state_dict(gemma)
    assert str(error.value) == (
        f"{gemma}: GGUF architecture 'gemma3' is neither a supported text encoder "
        "(llama, qwen2vl, qwen3, qwen3vl) nor a Z-Image DiT (lumina2)"
    )
    qwen = tmp_path / "qwen.gguf"
    write_gguf(qwen, {"model.norm.weight": torch.ones(8)}, "qwen3", lambda n, t: "F32")
    with pytest.raises(ValueError) as error:
        load_gguf_state_dict(qwen, kind="dit")
    assert (
        str(error.value)
        == f"{qwen}: GGUF architecture 'qwen3' is not a Z-Image DiT (expected lumina2)"
    )
    with pytest.raises(ValueError) as error:
        load_gguf_state_dict(qwen, kind="vae")  # type: ignore[arg-type]
    assert str(error.value) == "kind must be 'text_encoder', 'dit' or None, got 'vae'"


def test_unsupported_tensor_type_in_a_file_fails_before_loading(tmp_path: Path) -> None:
    path = tmp_path / "q8_1.gguf"
    writer = gguf.GGUFWriter(path, arch="qwen3")
    writer.add_tensor("output_norm.weight", np.ones(32, F32))
    q8_1 = GGMLQuantizationType.Q8_1
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((2, 40), np.uint8), raw_dtype=q8_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    file = read_gguf(path)
    assert (
        file.tensors["blk.0.attn_q.weight"].qtype,
        file.tensors["blk.0.attn_q.weight"].shape,
    ) == (
        "Q8_1",
        (2, 32),
    )
    with pytest.raises(ValueError) as error:
        load_gguf_state_dict(path)
    assert str(error.value) == (
        f"{path}: unsupported GGUF tensor type(s) Q8_1 (1 tensor(s), first "
        f"'blk.0.attn_q.weight'); supported: {SUPPORTED}"
    )


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"old")
    state_dict = {"a": torch.ones(32), "b": torch.ones(4, 256)}
    with pytest.raises(ValueError) as error:
        write_gguf(path, state_dict, "lumina2", lambda n, t: "F32" if n == "a" else "Q4_K")
    assert str(error.value) == (
        "cannot write 'b' as Q4_K: gguf.quants quantizes only "
        "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1"
    )
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


def test_without_the_gguf_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "w.gguf"
    write_gguf(path, {"w": torch.ones(2, 32)}, "lumina2", lambda n, t: "Q8_0")
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` fail
    message = (
        "reading or writing GGUF files needs the 'gguf' package: pip install gguf "
        "(or pip install 'zimage-trt[build]')"
    )
    with pytest.raises(ModuleNotFoundError) as error:
        read_gguf(path)
    assert str(error.value) == message
    with pytest.raises(ModuleNotFoundError) as error:
        write_gguf(tmp_path / "x.gguf", {"w": torch.ones(32)}, "lumina2", lambda n, t: "F32")
    assert str(error.value) == message

    # the module imports, and dequantizes, without it
    spec = importlib.util.spec_from_file_location("gguf_without_package", gguf_module.__file__)
    assert spec is not None and spec.loader is not None
    fresh = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gguf_without_package", fresh)
    spec.loader.exec_module(fresh)
    blocks = np.zeros((1, 34), np.uint8)
    blocks[0, :2] = np.array([0.5], F16).view(np.uint8)
    blocks[0, 2:] = np.arange(32, dtype=np.int8).view(np.uint8)
    assert torch.equal(fresh.dequantize(blocks, "Q8_0", (32,)), torch.arange(32) * 0.5)
