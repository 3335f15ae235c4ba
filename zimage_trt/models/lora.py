"""LoRA files fused into the DiT's weights (original/ComfyUI key layout), as ComfyUI's LoraLoader.

A LoRA is fused once, before export or an eager run: ``W' = W + strength · (alpha/rank) ·
(up @ down)``, the product in float32, several LoRAs in order. The key names, weight-pair
suffixes, alpha, DoRA and full-weight diffs follow ComfyUI 0.18.1 (``comfy/lora.py``
``load_lora`` / ``model_lora_keys_unet``, ``comfy/weight_adapter/lora.py``,
``comfy/weight_adapter/base.py`` ``weight_decompose``) so a fused engine reproduces what a
ComfyUI user sees.

Names a LoRA module may have (the base name is the key without its weight suffix):

* ``diffusion_model.<path>`` and ``lora_unet_<path with . → _>`` on the original module tree,
  e.g. ``diffusion_model.layers.7.attention.qkv``; the bare ``<path>`` as well (ComfyUI maps
  bare names only where they equal the diffusers name; a bare ``layers.7.attention.qkv`` or
  ``x_embedder`` is an extension here). Parameters that are not ``.weight`` (pad tokens,
  biases) take the full key, for ``.diff`` patches.
* diffusers names under the prefixes ``diffusion_model.``, ``transformer.``, ``lycoris_`` (dots
  → underscores) and none: ``attention.to_q|to_k|to_v`` patch the row block 0/dim/2·dim
  (length dim) of the fused ``attention.qkv.weight``, ``attention.to_out.0`` is
  ``attention.out``, ``norm_q|norm_k`` are ``q_norm|k_norm``, ``all_final_layer.2-1`` is
  ``final_layer`` and ``all_x_embedder.2-1`` is ``x_embedder``.
* kohya names built on *diffusers* module names (``lora_unet_layers_0_attention_to_q``) are
  not ComfyUI names — ComfyUI skips them with "lora key not loaded" — so here they match
  nothing, and by default that is an error.
* text-encoder keys (``text_encoders.``, ``lora_te…``, ``text_encoder.``) are kept apart:
  ``text_encoders.qwen3_4b.transformer.<hf path>`` / ``text_encoders.transformer.<hf path>``
  (ComfyUI's names) patch a given text-encoder state dict; the rest match nothing.

Merge precision (``merge_dtype``). ComfyUI copies each patched weight to a compute dtype, adds
the deltas cast to that dtype, and rounds the sum to the stored dtype (round to nearest):

* ``"float16"``: what ComfyUI does on CUDA GPUs of compute capability ≥ 8, so for bf16 weights
  ``W' = bf16(fp16(W) + fp16(Δ))``. The default for bf16 and fp16 weights, because that is what
  ComfyUI users on GPUs get.
* ``"float32"``: ComfyUI on a CPU, ``W' = bf16(fp32(W) + Δ)``. The default for fp32 weights.

Besides up/down pairs (seven suffix families, ``<base>.alpha`` giving the scale alpha/rank with
rank = down.shape[0], 1 without alpha): LoCon's ``.lora_mid.weight`` (conv weights only, so
never in this DiT), DoRA's ``.dora_scale`` (ComfyUI's ``weight_decompose``, its choice of norms
included) and full deltas ``.diff``/``.diff_b`` (``.w_norm``/``.b_norm``). LoHa, LoKr, OFT,
GLoRA and ``set_weight`` raise an error. Where ComfyUI would only log a warning — a module
under two names, a pair and a diff for one module, half a pair, a delta of the wrong shape —
this module raises, naming the key, before any arithmetic.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeAlias

import torch
from torch import Tensor

from zimage_trt.models.dit import COMFY_PREFIX, original_to_diffusers

MergeDtype: TypeAlias = Literal["float32", "float16"]
# (lora, strength) or (lora, strength, text-encoder strength) — LoraLoader's strength_model and
# strength_clip; the text-encoder strength defaults to the model strength
LoraSpec: TypeAlias = tuple["LoRA", float] | tuple["LoRA", float, float]

TEXT_ENCODER_PREFIX = "text_encoders."  # fused text-encoder tensors come back under this prefix
IGNORE_HINT = "pass --lora-ignore-unmatched to skip them"
_LISTED_KEYS = 20
_MERGE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16}

# Weight-pair suffixes in ComfyUI's order of preference (LoRAAdapter.load): up, down, mid
_PAIR_FAMILIES: tuple[tuple[str, str, str | None], ...] = (
    (".lora_up.weight", ".lora_down.weight", ".lora_mid.weight"),
    ("_lora.up.weight", "_lora.down.weight", None),
    (".lora_B.weight", ".lora_A.weight", None),
    (".lora.up.weight", ".lora.down.weight", None),
    (".lora_B", ".lora_A", None),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight", None),
    (".lora_B.default.weight", ".lora_A.default.weight", None),
)
_ALPHA, _DORA = ".alpha", ".dora_scale"
# full-weight deltas: .w_norm/.b_norm are ComfyUI's older names of .diff/.diff_b
_DIFF_WEIGHT, _DIFF_BIAS = (".diff", ".w_norm"), (".diff_b", ".b_norm")
# other ComfyUI adapters; fusing them silently wrong or skipping them would both be worse
_UNSUPPORTED = {
    ".hada_": "LoHa",
    ".lokr_": "LoKr",
    ".oft_": "OFT",
    ".a1.weight": "GLoRA",
    ".a2.weight": "GLoRA",
    ".b1.weight": "GLoRA",
    ".b2.weight": "GLoRA",
    ".set_weight": "set_weight",
    ".reshape_weight": "reshape_weight",
}
_TEXT_ENCODER_KEY_PREFIXES = (TEXT_ENCODER_PREFIX, "lora_te", "text_encoder.", "text_encoder_2.")
_COMFY_TE_PREFIXES = ("text_encoders.qwen3_4b.transformer.", "text_encoders.transformer.")
_KOHYA_ON_DIFFUSERS = re.compile(r"^lora_unet_.*(_to_[qkv]|_to_out_0|_norm_[qk]|_2-1)$")


class LoraMatchError(ValueError):
    """LoRA keys that match no weight; ``unmatched`` maps each LoRA's name to its keys."""

    def __init__(self, message: str, unmatched: Mapping[str, Sequence[str]]) -> None:
        super().__init__(message)
        self.unmatched = {name: sorted(keys) for name, keys in unmatched.items()}


@dataclass(frozen=True, eq=False)
class LoRA:
    """A LoRA's tensors as stored, its display name and the sha256 of its content."""

    name: str
    tensors: Mapping[str, Tensor] = field(repr=False)
    sha256: str


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _state_dict_sha256(tensors: Mapping[str, Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_lora(source: str | os.PathLike[str] | Mapping[str, Tensor]) -> LoRA:
    """A LoRA from a ``.safetensors`` file (hashed by its bytes) or a state dict (hashed by
    its keys, dtypes, shapes and bytes)."""
    if isinstance(source, Mapping):
        tensors = dict(source)
        return LoRA("<state dict>", tensors, _state_dict_sha256(tensors))
    path = Path(source)
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA {str(path)!r}: only .safetensors LoRA files are supported")
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {str(path)!r} does not exist")
    from safetensors.torch import load_file  # a build-time dependency, not a runtime one

    return LoRA(path.name, load_file(path), _file_sha256(path))


def _spec_parts(spec: LoraSpec) -> tuple[LoRA, float, float]:
    if len(spec) == 3:
        return spec[0], float(spec[1]), float(spec[2])
    return spec[0], float(spec[1]), float(spec[1])


def lora_fingerprint(loras: Sequence[LoraSpec], *, merge_dtype: MergeDtype | None = None) -> str:
    """sha256 over the LoRAs' content hashes and strengths, in order (and the merge precision
    when given): the LoRA part of an engine cache key."""
    digest = hashlib.sha256(b"zimage-trt lora v1\n")
    for spec in loras:
        lora, strength, te_strength = _spec_parts(spec)
        digest.update(f"{lora.sha256} {strength.hex()} {te_strength.hex()}\n".encode())
    if merge_dtype is not None:
        digest.update(f"merge {merge_dtype}\n".encode())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Key maps: LoRA base name → the weight (and row block) it patches


@dataclass(frozen=True)
class _Target:
    key: str  # key in the caller's state dict
    rows: tuple[int, int] | None = None  # (start, length): a row block of a fused weight
    text_encoder: bool = False

    def describe(self) -> str:
        where = "" if self.rows is None else f" rows {self.rows[0]}:{self.rows[0] + self.rows[1]}"
        return f"{self.key!r}{where}"


def _dit_key_map(weights: Mapping[str, Tensor]) -> dict[str, _Target]:
    key_map: dict[str, _Target] = {}
    for key, tensor in weights.items():
        path = key.removeprefix(COMFY_PREFIX)
        if not path.endswith(".weight"):
            for base in (f"diffusion_model.{path}", path):
                key_map.setdefault(base, _Target(key))
            continue
        stem = path.removesuffix(".weight")
        target = _Target(key)
        for base in (f"diffusion_model.{stem}", "lora_unet_" + stem.replace(".", "_"), stem):
            key_map.setdefault(base, target)
        # the diffusers names of this weight (q, k, v row blocks for a fused qkv), from the
        # DiT's own key map so the two cannot disagree
        names = list(original_to_diffusers({path: torch.empty(tensor.shape, device="meta")}))
        for i, name in enumerate(names):
            rows = None
            if len(names) > 1:
                block = tensor.shape[0] // len(names)
                rows = (i * block, block)
            d = name.removesuffix(".weight")
            part = _Target(key, rows)
            lycoris = "lycoris_" + d.replace(".", "_")
            for base in (f"diffusion_model.{d}", f"transformer.{d}", lycoris, d):
                key_map.setdefault(base, part)
    return key_map


def _text_encoder_key_map(weights: Mapping[str, Tensor]) -> dict[str, _Target]:
    """ComfyUI's ``model_lora_keys_clip`` names for Qwen3 (``qwen3_4b.transformer.<hf key>``)."""
    key_map: dict[str, _Target] = {}
    for key in weights:
        if not key.endswith(".weight"):
            continue
        stem = key.removesuffix(".weight")
        if not stem.startswith(("model.", "lm_head")):
            stem = "model." + stem  # Qwen3Model layout: the decoder without its ``model.``
        for prefix in _COMFY_TE_PREFIXES:
            key_map.setdefault(prefix + stem, _Target(key, text_encoder=True))
    return key_map


def _is_text_encoder_key(key: str) -> bool:
    return key.startswith(_TEXT_ENCODER_KEY_PREFIXES)


# ----------------------------------------------------------------------------------------------
# Parsing a LoRA into patches


@dataclass(frozen=True)
class _Patch:
    lora: str
    base: str
    target: _Target
    strength: float
    up: Tensor | None = None
    down: Tensor | None = None
    mid: Tensor | None = None
    alpha: float | None = None
    dora_scale: Tensor | None = None
    diff: Tensor | None = None


def _all_suffixes() -> list[str]:
    suffixes = [_ALPHA, _DORA, *_DIFF_WEIGHT, *_DIFF_BIAS]
    for up, down, mid in _PAIR_FAMILIES:
        suffixes += [up, down] + ([mid] if mid else [])
    # longest first, so that a key is never split at a shorter suffix it happens to end with
    return sorted(suffixes, key=len, reverse=True)


_SUFFIXES = _all_suffixes()


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix in _SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], suffix
    return None


def _base_name(key: str) -> str:
    split = _split_key(key)
    return key if split is None else split[0]


def _check_unsupported(lora: LoRA) -> None:
    for key in lora.tensors:
        for marker, kind in _UNSUPPORTED.items():
            if marker in key:
                raise ValueError(
                    f"LoRA {lora.name!r}: key {key!r} is a {kind} adapter, which is not "
                    "supported (only LoRA/LoCon/DoRA pairs and .diff deltas are)"
                )


def _plan_lora(
    lora: LoRA,
    strength: float,
    te_strength: float,
    dit_map: Mapping[str, _Target],
    te_map: Mapping[str, _Target] | None,
    weights: Mapping[str, Tensor],
    te_weights: Mapping[str, Tensor] | None,
) -> tuple[list[_Patch], list[str], list[str]]:
    """Patches of one LoRA, its unmatched DiT keys and its unmatched text-encoder keys."""
    _check_unsupported(lora)
    modules: dict[str, dict[str, str]] = {}  # base → suffix → key
    unmatched: list[str] = []
    for key in lora.tensors:
        split = _split_key(key)
        if split is None:
            unmatched.append(key)
            continue
        base, suffix = split
        modules.setdefault(base, {})[suffix] = key

    patches: list[_Patch] = []
    seen: dict[_Target, str] = {}
    tensors = lora.tensors

    def add(patch: _Patch) -> None:
        if patch.target in seen:
            raise ValueError(
                f"LoRA {lora.name!r} patches {patch.target.describe()} twice: through "
                f"{seen[patch.target]!r} and {patch.base!r}"
            )
        seen[patch.target] = patch.base
        patches.append(patch)

    for base, module in modules.items():
        target = dit_map.get(base)
        if target is None and te_map is not None:
            target = te_map.get(base)
        if target is None:
            unmatched.extend(module.values())
            continue
        s = te_strength if target.text_encoder else strength
        used = {_ALPHA, _DORA} & module.keys()
        alpha = float(tensors[module[_ALPHA]].item()) if _ALPHA in module else None
        dora = tensors[module[_DORA]] if _DORA in module else None

        pair = next((f for f in _PAIR_FAMILIES if f[0] in module or f[1] in module), None)
        diff_suffix = next((x for x in _DIFF_WEIGHT if x in module), None)
        if pair is not None and diff_suffix is not None:
            raise ValueError(
                f"LoRA {lora.name!r}: {base!r} has both a low-rank pair and a full {diff_suffix} "
                "delta; ComfyUI would silently apply only the delta"
            )
        if pair is not None:
            up_s, down_s, mid_s = pair
            if up_s not in module or down_s not in module:
                have, lack = (up_s, down_s) if up_s in module else (down_s, up_s)
                raise ValueError(f"LoRA {lora.name!r}: {base + have!r} has no {base + lack!r}")
            mid = None
            used |= {up_s, down_s}
            if mid_s is not None and mid_s in module:
                mid = tensors[module[mid_s]]
                used.add(mid_s)
            up, down = tensors[module[up_s]], tensors[module[down_s]]
            patch = _Patch(lora.name, base, target, s, up, down, mid, alpha, dora)
            _check_pair_shapes(patch, _target_shape(target, weights, te_weights))
            add(patch)
        elif diff_suffix is not None:
            used.add(diff_suffix)
            diff = tensors[module[diff_suffix]]
            _check_diff_shape(lora.name, base + diff_suffix, diff, target, weights, te_weights)
            add(_Patch(lora.name, base, target, s, diff=diff))
        bias_suffix = next((x for x in _DIFF_BIAS if x in module), None)
        if bias_suffix is not None:
            bias_target = _bias_target(target, weights, te_weights)
            if bias_target is not None:
                used.add(bias_suffix)
                diff = tensors[module[bias_suffix]]
                name = base + bias_suffix
                _check_diff_shape(lora.name, name, diff, bias_target, weights, te_weights)
                add(_Patch(lora.name, name, bias_target, s, diff=diff))
        if dora is not None and pair is None:
            used.discard(_DORA)  # a magnitude without a pair to rescale: nothing uses it
        unmatched.extend(key for suffix, key in module.items() if suffix not in used)

    # The order of the patches on one weight changes its rounding. ComfyUI applies a LoRA's
    # patches in the order of its key map, where the fused weight's own names come before the
    # diffusers q, k, v blocks: whole weights first, then row blocks top-down (a stable sort).
    patches.sort(key=lambda p: -1 if p.target.rows is None else p.target.rows[0])
    dit_unmatched = [k for k in unmatched if not _is_text_encoder_key(k)]
    te_unmatched = [k for k in unmatched if _is_text_encoder_key(k)]
    return patches, dit_unmatched, te_unmatched


def _bias_target(
    target: _Target, weights: Mapping[str, Tensor], te_weights: Mapping[str, Tensor] | None
) -> _Target | None:
    if target.rows is not None or not target.key.endswith(".weight"):
        return None  # a row block (q/k/v of the bias-free qkv) or a non-weight parameter
    key = target.key.removesuffix(".weight") + ".bias"
    source = te_weights if target.text_encoder else weights
    if source is None or key not in source:
        return None
    return _Target(key, text_encoder=target.text_encoder)


def _target_shape(
    target: _Target, weights: Mapping[str, Tensor], te_weights: Mapping[str, Tensor] | None
) -> tuple[int, ...]:
    source = te_weights if target.text_encoder else weights
    assert source is not None  # a text-encoder target exists only with text-encoder weights
    shape = tuple(source[target.key].shape)
    if target.rows is not None:
        shape = (target.rows[1], *shape[1:])
    return shape


def _check_pair_shapes(patch: _Patch, shape: tuple[int, ...]) -> None:
    assert patch.up is not None and patch.down is not None
    up, down, mid = patch.up, patch.down, patch.mid
    rank = down.shape[0]
    if mid is not None:
        # LoCon: up [out, r, 1, 1] · mid [r, r, kh, kw] · down [r, in, 1, 1]; ComfyUI's
        # reshape takes the square rank-by-rank core for granted
        ok = (
            mid.ndim == 4
            and mid.shape[0] == mid.shape[1] == rank
            and up.flatten(1).shape[1] == rank
        )
        produced = (up.shape[0], down.shape[1], *mid.shape[2:]) if ok else None
    else:
        ok = up.ndim >= 2 and up.flatten(1).shape[1] == rank
        produced = (up.shape[0], down.flatten(1).shape[1]) if ok else None
    fits = (
        produced is not None
        and len(shape) >= 1
        and produced[0] == shape[0]
        and math.prod(produced[1:]) == math.prod(shape[1:])
    )
    if not fits:
        mid_text = "" if mid is None else f" @ mid {tuple(mid.shape)}"
        raise ValueError(
            f"LoRA {patch.lora!r} key {patch.base!r}: up {tuple(up.shape)}{mid_text} @ down "
            f"{tuple(down.shape)} does not fit {patch.target.describe()} of shape {shape}"
        )
    if patch.dora_scale is not None:
        _dora_shape(patch, shape)  # raises when the magnitude fits neither axis


def _check_diff_shape(
    lora: str,
    key: str,
    diff: Tensor,
    target: _Target,
    weights: Mapping[str, Tensor],
    te_weights: Mapping[str, Tensor] | None,
) -> None:
    shape = _target_shape(target, weights, te_weights)
    if tuple(diff.shape) != shape:
        raise ValueError(
            f"LoRA {lora!r} key {key!r}: delta of shape {tuple(diff.shape)} does not fit "
            f"{target.describe()} of shape {shape}"
        )


def _dora_shape(patch: _Patch, shape: tuple[int, ...]) -> tuple[bool, tuple[int, ...]]:
    """(on the output axis?, the shape the magnitude broadcasts as) — ComfyUI's rule: output
    axis when the magnitude's first dim equals the weight's rows, else the input axis."""
    assert patch.dora_scale is not None
    scale = patch.dora_scale
    ones = [1] * (len(shape) - 1)
    if scale.ndim >= 1 and scale.shape[0] == shape[0] and scale.numel() == shape[0]:
        return True, (shape[0], *ones)
    if len(shape) >= 2 and scale.numel() == shape[1]:
        return False, (1, shape[1], *ones[1:])
    raise ValueError(
        f"LoRA {patch.lora!r} key {patch.base + _DORA!r}: magnitude of shape "
        f"{tuple(scale.shape)} fits neither axis of {patch.target.describe()} of shape {shape}"
    )


# ----------------------------------------------------------------------------------------------
# Applying patches


def _lora_delta(patch: _Patch, shape: tuple[int, ...], device: torch.device) -> Tensor:
    """up @ down (through mid for LoCon) in float32, shaped as the target."""
    assert patch.up is not None and patch.down is not None
    up = patch.up.to(device=device, dtype=torch.float32)
    down = patch.down.to(device=device, dtype=torch.float32)
    if patch.mid is not None:
        mid = patch.mid.to(device=device, dtype=torch.float32)
        # Σ_s mid[r, s, h, w] · down[s, i] → the core-and-down factor [r, in, kh, kw]
        merged = torch.mm(down.transpose(0, 1).flatten(1), mid.transpose(0, 1).flatten(1))
        down = merged.reshape(down.shape[1], down.shape[0], *mid.shape[2:]).transpose(0, 1)
    return torch.mm(up.flatten(1), down.flatten(1)).reshape(shape)


def _apply_patch(weight: Tensor, patch: _Patch) -> None:
    """Add one patch to ``weight`` (the compute-dtype copy, or a row block of it) in place,
    with ComfyUI's operation order and dtypes."""
    shape = tuple(weight.shape)
    if patch.diff is not None:
        # ComfyUI casts a full delta to the compute dtype before scaling it
        weight += patch.strength * patch.diff.to(device=weight.device, dtype=weight.dtype)
        return
    assert patch.down is not None
    # alpha/rank as a Python float, then strength·scale, exactly as ComfyUI multiplies them
    scale = patch.alpha / patch.down.shape[0] if patch.alpha is not None else 1.0
    delta = _lora_delta(patch, shape, weight.device)
    if patch.dora_scale is None:
        weight += ((patch.strength * scale) * delta).to(weight.dtype)
        return
    _apply_dora(weight, patch, delta, scale)


def _apply_dora(weight: Tensor, patch: _Patch, delta: Tensor, scale: float) -> None:
    """DoRA as ComfyUI's ``weight_decompose``: rescale W + scale·Δ to the stored magnitude.

    On the output axis ComfyUI takes the norm of the *original* weight's rows, on the input
    axis the norm of the patched weight's columns; both reproduced as they are.
    """
    output_axis, magnitude_shape = _dora_shape(patch, tuple(weight.shape))
    assert patch.dora_scale is not None
    magnitude = patch.dora_scale.to(device=weight.device, dtype=torch.float32)
    magnitude = magnitude.reshape(magnitude_shape)
    patched = weight + (delta * scale).to(weight.dtype)
    ones = [1] * (weight.ndim - 1)
    if output_axis:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(weight.shape[0], *ones)
    else:
        columns = patched.transpose(0, 1)
        norm = columns.reshape(columns.shape[0], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(columns.shape[0], *ones).transpose(0, 1)
    norm = norm + torch.finfo(weight.dtype).eps
    patched *= (magnitude / norm).to(weight.dtype)
    if patch.strength != 1.0:
        patched -= weight
        weight += patch.strength * patched
    else:
        weight.copy_(patched)


def _compute_dtype(stored: torch.dtype, merge_dtype: MergeDtype | None, key: str) -> torch.dtype:
    if stored not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            f"cannot fuse a LoRA into {key!r} stored as {stored}: fuse into the bf16/fp32 "
            "weights before quantizing (ComfyUI rounds fp8 stochastically)"
        )
    if merge_dtype is None:
        return torch.float16 if stored in (torch.bfloat16, torch.float16) else torch.float32
    if merge_dtype not in _MERGE_DTYPES:
        raise ValueError(f"merge_dtype must be 'float32' or 'float16', got {merge_dtype!r}")
    return _MERGE_DTYPES[merge_dtype]


def _fused(
    key: str, weight: Tensor, patches: Sequence[_Patch], merge_dtype: MergeDtype | None
) -> Tensor:
    compute = _compute_dtype(weight.dtype, merge_dtype, key)
    if compute == torch.float16 and weight.dtype != torch.float16:
        limit = torch.finfo(torch.float16).max
        if weight.abs().max().item() > limit:
            raise ValueError(
                f"{key!r} holds values beyond float16's range, so the float16 merge would give "
                "inf; use merge_dtype='float32'"
            )
    work = weight.to(dtype=compute, copy=True)
    for patch in patches:
        rows = patch.target.rows
        view = work if rows is None else work.narrow(0, rows[0], rows[1])
        _apply_patch(view, patch)
    return work.to(weight.dtype)  # round to nearest, as ComfyUI for bf16/fp16/fp32


def _key_list(keys: Sequence[str]) -> str:
    keys = sorted(keys)
    listed = ", ".join(keys[:_LISTED_KEYS])
    rest = len(keys) - _LISTED_KEYS
    return listed + (f" … (+{rest} more)" if rest > 0 else "")


def _match_error(
    dit_unmatched: Mapping[str, Sequence[str]],
    te_unmatched: Mapping[str, Sequence[str]],
    te_given: bool,
) -> LoraMatchError:
    lines = []
    for name, keys in dit_unmatched.items():
        if keys:
            lines.append(
                f"LoRA {name!r}: {len(keys)} key(s) match no DiT weight: {_key_list(keys)}"
            )
    te_reason = "match no text-encoder weight" if te_given else "but no text-encoder weights"
    for name, keys in te_unmatched.items():
        if keys:
            lines.append(
                f"LoRA {name!r}: {len(keys)} text-encoder key(s) {te_reason}: {_key_list(keys)}"
            )
    bases = [_base_name(key) for keys in dit_unmatched.values() for key in keys]
    if any(_KOHYA_ON_DIFFUSERS.match(base) for base in bases):
        lines.append(
            "(kohya names built on diffusers module names, such as "
            "lora_unet_layers_0_attention_to_q, are not ComfyUI names: ComfyUI skips them too)"
        )
    lines.append(IGNORE_HINT)
    merged = {
        name: [*dit_unmatched.get(name, ()), *te_unmatched.get(name, ())]
        for name in {**dit_unmatched, **te_unmatched}
    }
    return LoraMatchError("\n".join(lines), merged)


def fuse_loras(
    weights: Mapping[str, Tensor],
    loras: Sequence[LoraSpec],
    *,
    ignore_unmatched: bool = False,
    merge_dtype: MergeDtype | None = None,
    text_encoder_weights: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Fuse ``loras`` (in order, each at its strength) into the DiT ``weights``.

    ``weights`` is an original/ComfyUI-layout state dict (``model.diffusion_model.`` prefix
    allowed). Returns new tensors for the changed keys only, in their stored dtypes; the input
    is not modified. ``merge_dtype`` picks the precision of the sum (module docstring; None:
    float16 for bf16/fp16 weights, float32 for fp32 weights).

    Text-encoder keys patch ``text_encoder_weights`` (a Qwen3 state dict in HF layout) at the
    spec's text-encoder strength, and their results come back under ``TEXT_ENCODER_PREFIX``
    (see ``split_text_encoder``); without text-encoder weights they count as unmatched.

    Every check runs before any arithmetic: keys that match nothing raise ``LoraMatchError``
    unless ``ignore_unmatched``; a delta whose shape does not fit its weight, an incomplete
    pair and an unsupported adapter (LoHa, LoKr, …) raise ``ValueError`` naming the key. A
    LoRA at strength 0 is skipped entirely, as ComfyUI's loader does.
    """
    dit_map = _dit_key_map(weights)
    te_map = None if text_encoder_weights is None else _text_encoder_key_map(text_encoder_weights)
    by_key: dict[tuple[bool, str], list[_Patch]] = {}
    dit_unmatched: dict[str, list[str]] = {}
    te_unmatched: dict[str, list[str]] = {}
    name_counts = Counter(_spec_parts(spec)[0].name for spec in loras)
    for index, spec in enumerate(loras):
        lora, strength, te_strength = _spec_parts(spec)
        if strength == 0.0 and te_strength == 0.0:
            continue
        patches, unmatched_dit, unmatched_te = _plan_lora(
            lora, strength, te_strength, dit_map, te_map, weights, text_encoder_weights
        )
        name = lora.name if name_counts[lora.name] == 1 else f"{lora.name} (#{index + 1})"
        dit_unmatched[name] = unmatched_dit
        te_unmatched[name] = unmatched_te
        for patch in patches:
            if patch.strength != 0.0:
                by_key.setdefault((patch.target.text_encoder, patch.target.key), []).append(patch)
    if not ignore_unmatched and any([*dit_unmatched.values(), *te_unmatched.values()]):
        raise _match_error(dit_unmatched, te_unmatched, text_encoder_weights is not None)

    out: dict[str, Tensor] = {}
    for (is_te, key), patches in by_key.items():
        if is_te:
            assert text_encoder_weights is not None
            out[TEXT_ENCODER_PREFIX + key] = _fused(
                key, text_encoder_weights[key], patches, merge_dtype
            )
        else:
            out[key] = _fused(key, weights[key], patches, merge_dtype)
    return out


def split_text_encoder(fused: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``fuse_loras``' result → (DiT tensors, text-encoder tensors under their own keys)."""
    dit: dict[str, Tensor] = {}
    text_encoder: dict[str, Tensor] = {}
    for key, tensor in fused.items():
        if key.startswith(TEXT_ENCODER_PREFIX):
            text_encoder[key.removeprefix(TEXT_ENCODER_PREFIX)] = tensor
        else:
            dit[key] = tensor
    return dit, text_encoder
