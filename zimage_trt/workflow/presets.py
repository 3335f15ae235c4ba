"""The presets shipped with the package (``zimage-121101``, the reference workflow, and
``zimage-turbo``, the model card's single stage), and ``load_workflow``: a preset by name or a
YAML file by path."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from zimage_trt.workflow.spec import Workflow, WorkflowError

PRESET_PACKAGE = "zimage_trt.workflow"
PRESET_DIR = "builtin"  # the preset YAML files (and the text files they name)


def preset_names() -> list[str]:
    root = resources.files(PRESET_PACKAGE).joinpath(PRESET_DIR)
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def preset_path(name: str) -> Path:
    return Path(str(resources.files(PRESET_PACKAGE).joinpath(PRESET_DIR).joinpath(f"{name}.yaml")))


def load_workflow(name_or_path: str | Path) -> Workflow:
    """A preset by name (``zimage-121101``) or a YAML file by path."""
    path = Path(name_or_path)
    if path.is_file():
        return Workflow.load(path)
    if str(name_or_path) in preset_names():
        return Workflow.load(preset_path(str(name_or_path)))
    raise WorkflowError(
        f"no workflow file or preset named {str(name_or_path)!r}; presets: "
        + ", ".join(preset_names())
    )
