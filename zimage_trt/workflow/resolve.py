"""The model files and LoRA files a workflow names (or ``--model``: a folder, a Hugging Face
repo id or ``tiny``), found on disk: a workflow's references resolved into ``ModelSources``."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from zimage_trt.errors import MissingFileError
from zimage_trt.models.model_files import model_files, resolve_model
from zimage_trt.models.sources import ModelSources
from zimage_trt.workflow.spec import Workflow

TINY = "tiny"


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def model_sources(
    wf: Workflow,
    model: str | None = None,
    *,
    search: tuple[Path, ...] = (),
    log: Callable[[str], None] = _stderr,
) -> ModelSources:
    """The workflow's models (or ``model``: a folder, a repo id or ``tiny``) and its LoRAs."""
    if model == TINY:
        from zimage_trt.models.tiny import tiny_model_dir

        root = tiny_model_dir()
        loras = []
        if wf.models.loras:
            log(
                f"--model tiny: applying the tiny LoRA in place of {len(wf.models.loras)} "
                "workflow LoRA(s)"
            )
            tiny_lora = next((root / "loras").glob("*.safetensors"))
            loras = [(tiny_lora, lora.strength, lora.path) for lora in wf.models.loras[:1]]
        return ModelSources(resolve_model(root), loras)
    loras = [(_find_file(ref.path, search), ref.strength, ref.path) for ref in wf.models.loras]
    if model is not None:
        return ModelSources(resolve_model(model), loras)
    m = wf.models
    return ModelSources(model_files(m.transformer, m.text_encoder, m.vae, search=search), loras)


def _find_file(name: str, search: tuple[Path, ...]) -> Path:
    path = Path(name).expanduser()
    if path.is_file():
        return path
    for folder in search:
        for candidate in (folder / name, folder / "loras" / name):
            if candidate.is_file():
                return candidate
    looked = ", ".join(str(f) for f in search) or "the current folder"
    raise MissingFileError(f"LoRA file {name!r} not found (looked in {looked})")
