"""Workflows: the typed spec of a multi-stage run (``spec``), the presets and ``load_workflow``
(``presets``), what a workflow will do (``summary``), ComfyUI graphs turned into workflows
(``comfy_graph``, ``comfy_import``) and the model files a workflow names (``resolve``)."""

from zimage_trt.workflow.presets import load_workflow, preset_names, preset_path
from zimage_trt.workflow.spec import (
    ZIMAGE_SHIFT,
    CacheSpec,
    LatentSource,
    LoraRef,
    Models,
    Output,
    Prompts,
    SamplerSpec,
    SchedulerSpec,
    Stage,
    Workflow,
    WorkflowError,
)

__all__ = [
    "ZIMAGE_SHIFT",
    "CacheSpec",
    "LatentSource",
    "LoraRef",
    "Models",
    "Output",
    "Prompts",
    "SamplerSpec",
    "SchedulerSpec",
    "Stage",
    "Workflow",
    "WorkflowError",
    "load_workflow",
    "preset_names",
    "preset_path",
]
