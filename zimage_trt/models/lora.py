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
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal, TypeAlias

import torch
from torch import Tensor

from zimage_trt.errors import FileError, InputError, MissingFileError
from zimage_trt.models.lora_keys import (
    TEXT_ENCODER_PREFIX,
    LoRA,
    Patch,
    base_name,
    dit_key_map,
    dora_shape,
    plan_lora,
    text_encoder_key_map,
)
from zimage_trt.models.safetensors_io import CheckpointError, read_safetensors_header

MergeDtype: TypeAlias = Literal["float32", "float16"]
# (lora, strength) or (lora, strength, text-encoder strength) — LoraLoader's strength_model and
# strength_clip; the text-encoder strength defaults to the model strength
LoraSpec: TypeAlias = tuple["LoRA", float] | tuple["LoRA", float, float]

IGNORE_HINT = "pass --lora-ignore-unmatched to skip them"
_LISTED_KEYS = 20
_MERGE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16}
_KOHYA_ON_DIFFUSERS = re.compile(r"^lora_unet_.*(_to_[qkv]|_to_out_0|_norm_[qk]|_2-1)$")


class LoraMatchError(InputError):
    """LoRA keys that match no weight; ``unmatched`` maps each LoRA's name to its keys."""

    def __init__(self, message: str, unmatched: Mapping[str, Sequence[str]]) -> None:
        super().__init__(message)
        self.unmatched = {name: sorted(keys) for name, keys in unmatched.items()}


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
    its keys, dtypes, shapes and bytes).

    A file is refused unread unless it is ``.safetensors`` (pickles are never loaded); its header
    is checked against its size first (a truncated download is named as such), and a file that
    holds no tensors is refused."""
    if isinstance(source, Mapping):
        tensors = dict(source)
        return LoRA("<state dict>", tensors, _state_dict_sha256(tensors))
    path = Path(source)
    if path.suffix != ".safetensors":
        raise FileError(f"LoRA {str(path)!r}: only .safetensors LoRA files are supported")
    if not path.is_file():
        raise MissingFileError(f"LoRA file {str(path)!r} does not exist")
    try:
        header, _ = read_safetensors_header(path)  # a damaged file is named before it is read
    except CheckpointError as err:
        raise FileError(f"LoRA {err}") from err
    if not header:
        raise FileError(
            f"LoRA {path}: holds no tensors (an empty or unfinished file); use a LoRA that was "
            "saved completely, or leave it out"
        )
    from safetensors import SafetensorError
    from safetensors.torch import load_file  # a build-time dependency, not a runtime one

    try:
        tensors = load_file(path)
    except SafetensorError as err:  # the file changed since its header was checked
        raise FileError(f"LoRA {path}: unreadable safetensors file ({err})") from err
    return LoRA(path.name, tensors, _file_sha256(path), path)


def _check_finite(lora: LoRA, skip: Sequence[str]) -> None:
    """Refuse a LoRA holding NaN or Inf values, naming its first bad key (in sorted order); the
    keys in ``skip`` (unmatched, hence unused) are not looked at."""
    skipped = set(skip)
    for key in sorted(lora.tensors):
        tensor = lora.tensors[key]
        if key in skipped or not tensor.is_floating_point():
            continue
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            bad = tensor.numel() - int(finite.sum())
            raise FileError(
                f"LoRA {lora.source}: {key!r} holds {bad} NaN/Inf value(s) of "
                f"{tensor.numel()}; the file is damaged or was saved from a diverged training: "
                "use another copy or another LoRA"
            )


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
# Applying patches


def _lora_delta(patch: Patch, shape: tuple[int, ...], device: torch.device) -> Tensor:
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


def _apply_patch(weight: Tensor, patch: Patch) -> None:
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


def _apply_dora(weight: Tensor, patch: Patch, delta: Tensor, scale: float) -> None:
    """DoRA as ComfyUI's ``weight_decompose``: rescale W + scale·Δ to the stored magnitude.

    On the output axis ComfyUI takes the norm of the *original* weight's rows, on the input
    axis the norm of the patched weight's columns; both reproduced as they are.
    """
    output_axis, magnitude_shape = dora_shape(patch, tuple(weight.shape))
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
    key: str, weight: Tensor, patches: Sequence[Patch], merge_dtype: MergeDtype | None
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
    fused = work.to(weight.dtype)  # round to nearest, as ComfyUI for bf16/fp16/fp32
    overflowed = not fused.is_meta and not bool(torch.isfinite(fused).all())
    if overflowed and bool(torch.isfinite(weight).all()):  # not the weight's own NaN/Inf
        names = ", ".join(sorted({f"{p.lora} at {p.strength:g}" for p in patches}))
        raise InputError(
            f"fusing LoRA {names} into {key!r} gives NaN/Inf values in {compute}: lower the "
            "strength"
        )
    return fused


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
    bases = [base_name(key) for keys in dit_unmatched.values() for key in keys]
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
    dit_map = dit_key_map(weights)
    te_map = None if text_encoder_weights is None else text_encoder_key_map(text_encoder_weights)
    by_key: dict[tuple[bool, str], list[Patch]] = {}
    dit_unmatched: dict[str, list[str]] = {}
    te_unmatched: dict[str, list[str]] = {}
    name_counts = Counter(_spec_parts(spec)[0].name for spec in loras)
    for index, spec in enumerate(loras):
        lora, strength, te_strength = _spec_parts(spec)
        if strength == 0.0 and te_strength == 0.0:
            continue
        patches, unmatched_dit, unmatched_te = plan_lora(
            lora, strength, te_strength, dit_map, te_map, weights, text_encoder_weights
        )
        _check_finite(lora, [*unmatched_dit, *unmatched_te])
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
