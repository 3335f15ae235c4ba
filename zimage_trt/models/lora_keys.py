"""What a LoRA file holds and which weight each of its keys patches, for ``lora.py``.

The ``LoRA`` tensors, the weight-suffix families, the key maps from LoRA base names to DiT and
text-encoder weights (and row blocks of fused ones), and the parsing of one LoRA into checked
``Patch``es; the semantics are in ``zimage_trt.models.lora``'s docstring.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from zimage_trt.models.dit_keys import COMFY_PREFIX, original_to_diffusers

TEXT_ENCODER_PREFIX = "text_encoders."  # fused text-encoder tensors come back under this prefix

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


@dataclass(frozen=True, eq=False)
class LoRA:
    """A LoRA's tensors as stored, its display name, the sha256 of its content and the file it
    was read from (None for a state dict)."""

    name: str
    tensors: Mapping[str, Tensor] = field(repr=False)
    sha256: str
    path: Path | None = None

    @property
    def source(self) -> str:
        """The file, or the name of an in-memory LoRA, for error messages."""
        return self.name if self.path is None else str(self.path)


# ----------------------------------------------------------------------------------------------
# Key maps: LoRA base name → the weight (and row block) it patches


@dataclass(frozen=True)
class Target:
    key: str  # key in the caller's state dict
    rows: tuple[int, int] | None = None  # (start, length): a row block of a fused weight
    text_encoder: bool = False

    def describe(self) -> str:
        where = "" if self.rows is None else f" rows {self.rows[0]}:{self.rows[0] + self.rows[1]}"
        return f"{self.key!r}{where}"


def dit_key_map(weights: Mapping[str, Tensor]) -> dict[str, Target]:
    key_map: dict[str, Target] = {}
    for key, tensor in weights.items():
        path = key.removeprefix(COMFY_PREFIX)
        if not path.endswith(".weight"):
            for base in (f"diffusion_model.{path}", path):
                key_map.setdefault(base, Target(key))
            continue
        stem = path.removesuffix(".weight")
        target = Target(key)
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
            part = Target(key, rows)
            lycoris = "lycoris_" + d.replace(".", "_")
            for base in (f"diffusion_model.{d}", f"transformer.{d}", lycoris, d):
                key_map.setdefault(base, part)
    return key_map


def text_encoder_key_map(weights: Mapping[str, Tensor]) -> dict[str, Target]:
    """ComfyUI's ``model_lora_keys_clip`` names for Qwen3 (``qwen3_4b.transformer.<hf key>``)."""
    key_map: dict[str, Target] = {}
    for key in weights:
        if not key.endswith(".weight"):
            continue
        stem = key.removesuffix(".weight")
        if not stem.startswith(("model.", "lm_head")):
            stem = "model." + stem  # Qwen3Model layout: the decoder without its ``model.``
        for prefix in _COMFY_TE_PREFIXES:
            key_map.setdefault(prefix + stem, Target(key, text_encoder=True))
    return key_map


def _is_text_encoder_key(key: str) -> bool:
    return key.startswith(_TEXT_ENCODER_KEY_PREFIXES)


# ----------------------------------------------------------------------------------------------
# Parsing a LoRA into patches


@dataclass(frozen=True)
class Patch:
    lora: str
    base: str
    target: Target
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


def base_name(key: str) -> str:
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


def plan_lora(
    lora: LoRA,
    strength: float,
    te_strength: float,
    dit_map: Mapping[str, Target],
    te_map: Mapping[str, Target] | None,
    weights: Mapping[str, Tensor],
    te_weights: Mapping[str, Tensor] | None,
) -> tuple[list[Patch], list[str], list[str]]:
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

    patches: list[Patch] = []
    seen: dict[Target, str] = {}
    tensors = lora.tensors

    def add(patch: Patch) -> None:
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
            patch = Patch(lora.name, base, target, s, up, down, mid, alpha, dora)
            _check_pair_shapes(patch, _target_shape(target, weights, te_weights))
            add(patch)
        elif diff_suffix is not None:
            used.add(diff_suffix)
            diff = tensors[module[diff_suffix]]
            _check_diff_shape(lora.name, base + diff_suffix, diff, target, weights, te_weights)
            add(Patch(lora.name, base, target, s, diff=diff))
        bias_suffix = next((x for x in _DIFF_BIAS if x in module), None)
        if bias_suffix is not None:
            bias_target = _bias_target(target, weights, te_weights)
            if bias_target is not None:
                used.add(bias_suffix)
                diff = tensors[module[bias_suffix]]
                name = base + bias_suffix
                _check_diff_shape(lora.name, name, diff, bias_target, weights, te_weights)
                add(Patch(lora.name, name, bias_target, s, diff=diff))
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
    target: Target, weights: Mapping[str, Tensor], te_weights: Mapping[str, Tensor] | None
) -> Target | None:
    if target.rows is not None or not target.key.endswith(".weight"):
        return None  # a row block (q/k/v of the bias-free qkv) or a non-weight parameter
    key = target.key.removesuffix(".weight") + ".bias"
    source = te_weights if target.text_encoder else weights
    if source is None or key not in source:
        return None
    return Target(key, text_encoder=target.text_encoder)


def _target_shape(
    target: Target, weights: Mapping[str, Tensor], te_weights: Mapping[str, Tensor] | None
) -> tuple[int, ...]:
    source = te_weights if target.text_encoder else weights
    assert source is not None  # a text-encoder target exists only with text-encoder weights
    shape = tuple(source[target.key].shape)
    if target.rows is not None:
        shape = (target.rows[1], *shape[1:])
    return shape


def _check_pair_shapes(patch: Patch, shape: tuple[int, ...]) -> None:
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
        dora_shape(patch, shape)  # raises when the magnitude fits neither axis


def _check_diff_shape(
    lora: str,
    key: str,
    diff: Tensor,
    target: Target,
    weights: Mapping[str, Tensor],
    te_weights: Mapping[str, Tensor] | None,
) -> None:
    shape = _target_shape(target, weights, te_weights)
    if tuple(diff.shape) != shape:
        raise ValueError(
            f"LoRA {lora!r} key {key!r}: delta of shape {tuple(diff.shape)} does not fit "
            f"{target.describe()} of shape {shape}"
        )


def dora_shape(patch: Patch, shape: tuple[int, ...]) -> tuple[bool, tuple[int, ...]]:
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
