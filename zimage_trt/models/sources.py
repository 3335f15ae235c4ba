"""Where a run's weights come from — the model files and the LoRAs to fuse — and the DiT with
those LoRAs fused in, as the torch backend runs it and the builder exports it."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from zimage_trt.models.checkpoints import load_dit
from zimage_trt.models.dit import ZImageDiT
from zimage_trt.models.lora import fuse_loras, load_lora
from zimage_trt.models.model_files import ModelFiles

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


@dataclass(frozen=True)
class ModelSources:
    """Where a run's weights come from: the model files and the LoRAs to fuse, each as
    (file, strength, the workflow's name for it)."""

    files: ModelFiles
    loras: list[tuple[Path, float, str]]


def load_fused_dit(
    sources: ModelSources,
    dtype: torch.dtype,
    *,
    lora_ignore_unmatched: bool = False,
    log: Log = _stderr,
) -> ZImageDiT:
    """The DiT with the sources' LoRAs fused in (in order, at their strengths); the LoRA files
    are read (and a damaged one refused) before the DiT."""
    loras = [(load_lora(path), strength) for path, strength, _ in sources.loras]
    log(f"loading the DiT from {sources.files.transformer}")
    dit = load_dit(sources.files.transformer, dtype)
    if loras:
        fused = fuse_loras(dit.state_dict(), loras, ignore_unmatched=lora_ignore_unmatched)
        dit.load_state_dict(fused, strict=False)
        log(f"fused {len(loras)} LoRA(s) into {len(fused)} weights")
    return dit


def lora_target_keys(sources: ModelSources, *, ignore_unmatched: bool = False) -> list[str]:
    """The DiT weights the sources' LoRAs change, found on the meta device (no weight is read;
    the LoRA files are)."""
    loras = [(load_lora(path), strength) for path, strength, _ in sources.loras]
    dit = load_dit(sources.files.transformer, torch.float32, meta=True)
    return sorted(fuse_loras(dit.state_dict(), loras, ignore_unmatched=ignore_unmatched))
