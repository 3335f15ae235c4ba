"""Other LoRAs on a built folder without a rebuild: the DiT engines take new weights when they
load.

A folder's DiT engines (denoiser, caption path) hold the checkpoint's weights with the build's
LoRAs fused in. When a request asks for other LoRAs or other strengths and the engines are
refittable (ONNX Runtime: always; TensorRT: built with ``--refittable``), every weight that the
build's LoRAs or the request's touch is computed again from the base checkpoint — the request's
LoRAs fused exactly as a rebuild would fuse them, the build's undone by starting from the base
— and handed to the engines as they load: TensorRT's ``Refitter`` (``set_named_weights``, then
``refit_cuda_engine``), ONNX Runtime's initializer overrides. The base checkpoint is the
workflow's transformer (or ``--model``); it must be the one the folder was built from (its
sha-256 is compared with the manifest's), and nothing is written to the folder.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from zimage_trt.engines.manifest import (
    REFIT_SUFFIX,
    LoraRecord,
    Manifest,
    ManifestError,
    sha256_file,
    weights_sha256,
)
from zimage_trt.errors import MissingFileError
from zimage_trt.workflow import Workflow

if TYPE_CHECKING:
    from zimage_trt.models.dit import ZImageDiT
    from zimage_trt.models.sources import ModelSources

DIT_ENGINES = ("caption_path", "denoiser")  # the engines holding the DiT's weights
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class LoraSwap:
    """The weights to hand each DiT engine, and the LoRAs they then hold."""

    loras: list[LoraRecord]
    weights: dict[str, dict[str, Tensor]]  # engine → weight name → value in the engine's dtype
    seconds: float
    # every DiT weight with the new LoRAs: TensorRT may ask for weights it built together
    source: dict[str, Tensor]

    def describe(self) -> str:
        counts = ", ".join(f"{n} {len(w)}" for n, w in self.weights.items() if w)
        return (
            f"LoRAs swapped to {show_loras([(r.name, r.strength) for r in self.loras])}: "
            f"{sum(len(w) for w in self.weights.values())} weights ({counts}), computed in "
            f"{self.seconds:.1f} s"
        )


def show_loras(items: Sequence[tuple[str, float]]) -> str:
    return ", ".join(f"{n} at {s:g}" for n, s in items) or "none"


def same_loras(manifest: Manifest, wf: Workflow) -> bool:
    """The workflow asks for the LoRAs fused into the engines, at the same strengths."""
    wanted = [(lora.path, lora.strength) for lora in wf.models.loras]
    built = [(lora.name, lora.strength) for lora in manifest.weights.loras]
    return len(wanted) == len(built) and all(
        a == c and math.isclose(b, d) for (a, b), (c, d) in zip(wanted, built, strict=True)
    )


def swap_refusal(manifest: Manifest, folder: str | Path) -> str | None:
    """Why the folder's engines cannot take other LoRAs; None when they can."""
    if manifest.backend == "tensorrt-rtx":
        return "TensorRT-RTX engines are not refitted here (LoRA swaps are TensorRT's only)"
    if manifest.quantization is not None:
        return (
            f"its DiT engines are {manifest.quantization.precision}-calibrated and a LoRA change "
            "invalidates a calibration (calibrate with the LoRAs, then build)"
        )
    dit = [n for n in DIT_ENGINES if n in manifest.engines]
    fixed = [n for n in dit if not manifest.engines[n].refittable]
    if fixed or not dit:
        how = "built without --refittable" if manifest.backend == "tensorrt" else "no refit map"
        return f"its {' and '.join(fixed or DIT_ENGINES)} engines are not refittable ({how})"
    if manifest.weights.loras and manifest.weights.lora_keys is None:
        return "the manifest does not record which weights its LoRAs changed (an older build)"
    return None


def plan_lora_swap(
    manifest: Manifest,
    folder: str | Path,
    wf: Workflow,
    *,
    model: str | None = None,
    search: tuple[Path, ...] = (),
    lora_ignore_unmatched: bool = False,
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
) -> LoraSwap:
    """The weights that give ``folder``'s DiT engines the workflow's LoRAs (see the module)."""
    from zimage_trt.models.lora import fuse_loras, load_lora

    start = time.perf_counter()
    refusal = swap_refusal(manifest, folder)
    if refusal is not None:
        raise ManifestError(f"{folder}: cannot swap LoRAs: {refusal}")
    sources, dit = base_dit(manifest, folder, wf, model=model, search=search, log=log)
    base = dit.state_dict()
    loras = [(load_lora(path), strength) for path, strength, _ in sources.loras]
    fused = fuse_loras(base, loras, ignore_unmatched=lora_ignore_unmatched)
    keys = sorted({*fused, *(manifest.weights.lora_keys or ())})
    weights = {
        name: {k: fused.get(k, base[k]).contiguous() for k in names}
        for name, names in engine_targets(folder, manifest, keys).items()
    }
    records = [
        LoraRecord(name=label, sha256=sha256_file(path), strength=strength)
        for path, strength, label in sources.loras
    ]
    return LoraSwap(records, weights, time.perf_counter() - start, {**base, **fused})


def base_dit(
    manifest: Manifest,
    folder: str | Path,
    wf: Workflow,
    *,
    model: str | None = None,
    search: tuple[Path, ...] = (),
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
) -> tuple[ModelSources, ZImageDiT]:
    """The workflow's model sources (or ``model``'s) and the base DiT the folder's engines were
    built from, in the engines' precision: its sha-256 must be the manifest's."""
    from zimage_trt.models.checkpoints import load_dit
    from zimage_trt.workflow.resolve import model_sources

    try:
        sources = model_sources(wf, model, search=search, log=log)
    except FileNotFoundError as exc:
        raise MissingFileError(
            f"{exc}; swapping LoRAs on {folder} reads the LoRA files and the base DiT the "
            f"engines were built from ({manifest.weights.origin}): pass the DiT with --model"
        ) from None
    files = sources.files.weight_files()["transformer"]
    log(f"checking the base DiT ({', '.join(str(f) for f in files)}) against {folder}")
    if weights_sha256(files) != manifest.weights.sha256.get("transformer"):
        raise ManifestError(
            f"{folder}: the DiT at {sources.files.transformer} is not the one the engines were "
            f"built from ({manifest.weights.origin}); swapping LoRAs needs that checkpoint: pass "
            "it with --model"
        )
    return sources, load_dit(sources.files.transformer, PRECISION_DTYPES[manifest.precision])


def engine_targets(
    folder: str | Path, manifest: Manifest, keys: Sequence[str]
) -> dict[str, list[str]]:
    """Which of the DiT weights ``keys`` each DiT engine takes (from its refit map); a weight
    that no engine takes is refused."""
    maps = {name: refit_names(Path(folder), manifest, name) for name in DIT_ENGINES}
    homeless = [k for k in keys if not any(k in names for names in maps.values())]
    if homeless:
        raise ManifestError(
            f"{folder}: the LoRAs change {len(homeless)} weight(s) that no engine can take "
            f"(not refittable: {', '.join(homeless[:3])}); rebuild with this workflow"
        )
    return {name: [k for k in keys if k in names] for name, names in maps.items()}


def refit_names(folder: Path, manifest: Manifest, engine: str) -> set[str]:
    """The weight names the engine takes, from its refit map (one of its hashed files)."""
    maps = [rel for rel in manifest.engines[engine].files if rel.endswith(REFIT_SUFFIX)]
    if not maps:
        raise ManifestError(f"{folder}: engine {engine!r} has no refit map; rebuild the folder")
    path = folder / maps[0]
    try:
        return set(json.loads(path.read_text(encoding="utf-8"))["weights"])
    except (OSError, ValueError, KeyError) as exc:
        raise ManifestError(f"{path}: unreadable refit map ({exc}); rebuild the folder") from None
