"""The service API every entry point calls: ``Pipeline.open`` makes its checks before any work,
``generate`` checks each request against what the pipeline holds and reports what ran."""

from __future__ import annotations

from pathlib import Path

import pytest

from zimage_trt.runtime.pipeline import Pipeline
from zimage_trt.runtime.requests import GenerateRequest
from zimage_trt.workflow import LoraRef, Workflow, load_workflow


def _first_stage_only() -> Workflow:
    """The reference workflow's base stage alone (176×224, cfg 2: 9 steps × cond + uncond)."""
    wf = load_workflow("zimage-121101")
    return wf.model_copy(update={"stages": wf.stages[:1]})


def test_the_pipeline_keeps_the_workflow_it_was_opened_for(reference_pipeline: Pipeline) -> None:
    wf = reference_pipeline.workflow
    assert wf is not None and wf.name == "zimage-121101"
    assert [(r.path, r.strength) for r in wf.models.loras] == [("zimage_lora.safetensors", 1.0)]
    assert reference_pipeline.manifest is None and reference_pipeline.lora_swap is None
    request = GenerateRequest(prompt="a cat", seed=[5, 6])
    ran = reference_pipeline.request_workflow(request)
    assert ran.prompts.positive == "a cat" and [s.seed for s in ran.stages][:2] == [5, 6]
    assert wf.prompts.positive != "a cat"  # the request changed a copy


def test_cache_stats_count_what_ran_and_what_the_caches_saved(
    reference_pipeline: Pipeline,
) -> None:
    reference_pipeline.clear_caches()
    first = reference_pipeline.generate(
        GenerateRequest(workflow=_first_stage_only(), prompt="a heron at dawn")
    )
    assert first.cache is not None  # cond and uncond each encoded and refined once
    assert (first.cache.text_encoder_calls, first.cache.caption_path_calls) == (2, 2)
    assert (first.cache.dit_calls, first.cache.dit_calls_skipped) == (18, 0)
    again = reference_pipeline.generate(
        GenerateRequest(workflow=_first_stage_only(), prompt="a heron at dawn", seed=11)
    )
    assert again.cache is not None
    assert (again.cache.text_encoder_calls, again.cache.caption_path_calls) == (0, 0)
    assert again.cache.dit_calls == 18 and again.workflow is not None
    assert again.workflow.stages[0].seed == 11


def test_a_request_for_other_loras_is_refused(reference_pipeline: Pipeline) -> None:
    wf = _first_stage_only()
    wf.models.loras = [LoraRef(path="zimage_lora.safetensors", strength=0.5)]
    with pytest.raises(ValueError) as err:
        reference_pipeline.generate(GenerateRequest(workflow=wf))
    assert str(err.value) == (
        "this pipeline holds LoRAs zimage_lora.safetensors at 1; the request asks for "
        "zimage_lora.safetensors at 0.5: open a pipeline with that workflow"
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"engines": "engines/", "compile": True},
            "--compile serves the torch backend (--model); an engine folder is compiled already",
        ),
        (
            {"model": "tiny", "backend": "tensorrt"},
            "the tensorrt backend serves a built engine folder: pass --engines DIR (make one "
            "with `zimage-trt build --backend tensorrt --out DIR …`)",
        ),
        (
            {"model": "tiny", "backend": "openvino"},
            "backend 'openvino' is not known; choose one of: torch, onnxruntime, tensorrt, "
            "tensorrt-rtx",
        ),
    ],
)
def test_open_refuses_what_cannot_run_before_loading_anything(
    options: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError) as err:
        Pipeline.open(workflow="zimage-121101", log=print, **options)  # type: ignore[arg-type]
    assert str(err.value) == message


def test_open_names_a_missing_negative_prompt_file(tmp_path: Path) -> None:
    missing = tmp_path / "negative.txt"
    with pytest.raises(FileNotFoundError) as err:
        Pipeline.open(model="tiny", negative_prompt_file=missing, log=print)
    assert str(err.value) == f"negative prompt file {missing} not found"
