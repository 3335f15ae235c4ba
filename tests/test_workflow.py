"""The Workflow spec: presets carry the reference numbers, YAML round-trips, errors name fields."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import torch
from comfy_reference import (
    STAGE1_SEED,
    STAGE1_SIGMAS,
    STAGE2_EASYCACHE_WINDOW,
    STAGE2_SEED,
    STAGE2_SIGMAS,
    STAGE3_EASYCACHE_WINDOW,
    STAGE3_SEED,
    STAGE3_SIGMAS,
)

from zimage_trt.workflow import Workflow, WorkflowError, load_workflow, preset_names


def minimal(**stage: object) -> dict:
    base: dict = {
        "latent": {"source": "empty", "width": 64, "height": 64},
        "sampler": {"name": "euler"},
        "scheduler": {"name": "simple", "steps": 4},
    }
    base.update(stage)
    return {"stages": [base]}


def test_presets_are_listed() -> None:
    assert preset_names() == ["zimage-121101", "zimage-turbo"]


def test_reference_preset_numbers() -> None:
    wf = load_workflow("zimage-121101")
    s1, s2, s3 = wf.stages
    assert wf.latent_sizes() == [(28, 22), (54, 42), (108, 84)]
    assert (s1.latent.width, s1.latent.height) == (176, 224)
    assert (s2.latent.method, s2.latent.width, s2.latent.height) == ("nearest-exact", 336, 432)
    assert (s3.latent.method, s3.latent.scale) == ("nearest-exact", 2.0)
    assert [s.seed for s in wf.stages] == [STAGE1_SEED, STAGE2_SEED, STAGE3_SEED]
    assert [s.cfg for s in wf.stages] == [2.0, 1.0, 1.0]
    assert [s.shift for s in wf.stages] == [3.0, 7.0, 7.0]
    assert [s.sampler.name for s in wf.stages] == [
        "euler_ancestral",
        "euler_ancestral",
        "dpmpp_sde",
    ]
    assert [(s.scheduler.steps, s.scheduler.denoise) for s in wf.stages] == [
        (9, 1.0),
        (16, 0.7),
        (16, 0.6),
    ]
    assert s1.cache is None
    assert s2.cache is not None and s3.cache is not None
    assert (s2.cache.threshold, s2.cache.start_percent, s2.cache.end_percent) == (0.37, 0.45, 0.95)
    assert (s3.cache.threshold, s3.cache.start_percent, s3.cache.end_percent) == (0.12, 0.7, 0.95)
    assert [s.preview for s in wf.stages] == [True, True, False]
    assert wf.models.transformer == "z_image_turbo_bf16.safetensors"
    assert wf.models.vae == "ae.safetensors"
    assert [lora.strength for lora in wf.models.loras] == [1.0]
    assert wf.prompts.positive_text == f"{wf.prompts.trigger}, {wf.prompts.positive}"


@pytest.mark.parametrize(
    ("index", "expected"), [(0, STAGE1_SIGMAS), (1, STAGE2_SIGMAS), (2, STAGE3_SIGMAS)]
)
def test_reference_preset_schedules(index: int, expected: list[float]) -> None:
    sigmas = load_workflow("zimage-121101").stages[index].sigmas()
    assert sigmas.dtype == torch.float32
    torch.testing.assert_close(sigmas, torch.tensor(expected), atol=1e-6, rtol=0)


def test_reference_preset_cache_windows() -> None:
    """§9.4: stage 2's EasyCache sees shift 3 (0.785714/0.136364), stage 3's shift 7."""
    s2, s3 = load_workflow("zimage-121101").stages[1:]
    for stage, (start, end) in [(s2, STAGE2_EASYCACHE_WINDOW), (s3, STAGE3_EASYCACHE_WINDOW)]:
        ms = stage.cache_sampling()
        assert ms is not None and stage.cache is not None
        assert ms.percent_to_sigma(stage.cache.start_percent) == pytest.approx(start, abs=1e-6)
        assert ms.percent_to_sigma(stage.cache.end_percent) == pytest.approx(end, abs=1e-6)


def test_turbo_preset_is_the_diffusers_schedule() -> None:
    """ZImagePipeline (diffusers 0.42) default: float32 linspace(1, 1/N, N) shifted by 3, then 0."""
    wf = load_workflow("zimage-turbo")
    (stage,) = wf.stages
    assert (stage.latent.width, stage.latent.height, stage.cfg) == (1024, 1024, 1.0)
    assert stage.sampler.name == "euler"
    t = torch.linspace(1, 1 / 9, 9)
    expected = torch.cat([3 * t / (1 + 2 * t), torch.zeros(1)])
    torch.testing.assert_close(stage.sigmas(), expected, atol=1e-7, rtol=0)
    assert len(stage.sigmas()) - 1 == 9
    assert float(stage.sigmas()[-2]) == pytest.approx(3 / 11, abs=1e-7)  # 1/9 shifted by 3


def test_negative_template_ships_and_is_long() -> None:
    wf = load_workflow("zimage-121101")
    text = wf.prompts.negative_text()
    assert len(text) > 2000
    for word in (
        "动漫风",
        "二次元",
        "低清晰度",
        "模糊",
        "网红脸",
        "磨皮过度",
        "影楼风",
        "stock photo",
    ):
        assert word in text


def test_yaml_round_trip(tmp_path: Path) -> None:
    wf = load_workflow("zimage-121101")
    path = tmp_path / "wf.yaml"
    wf.save(path)
    again = Workflow.load(path)
    assert again == wf
    assert not list(tmp_path.glob(".*.tmp"))


def test_error_names_field_path_and_allowed_values() -> None:
    data = minimal(sampler={"name": "eulr"})
    with pytest.raises(WorkflowError) as err:
        Workflow.from_dict(data, "wf.yaml")
    assert str(err.value) == (
        "wf.yaml: 1 invalid field(s)\n"
        "  stages.0.sampler.name: unknown sampler 'eulr'; choose one of: "
        "euler, euler_ancestral, dpmpp_sde (got 'eulr')"
    )


def test_error_lists_every_bad_field() -> None:
    data = minimal(seed=-1, cfg=200, noise_device="tpu")
    with pytest.raises(WorkflowError) as err:
        Workflow.from_dict(data, "wf.yaml")
    msg = str(err.value)
    assert msg.startswith("wf.yaml: 3 invalid field(s)")
    assert "stages.0.seed: Input should be greater than or equal to 0 (got -1)" in msg
    assert "stages.0.cfg: Input should be less than or equal to 100 (got 200)" in msg
    assert "stages.0.noise_device: Input should be 'auto', 'cpu' or 'cuda' (got 'tpu')" in msg


def test_sizes_must_be_multiples_of_16() -> None:
    with pytest.raises(WorkflowError, match=r"72×64 px is not a multiple of 16 px"):
        Workflow.from_dict(minimal(latent={"source": "empty", "width": 72, "height": 64}))


def test_upscale_by_must_land_on_multiples_of_16() -> None:
    data = minimal()
    data["stages"].append({**data["stages"][0], "latent": {"source": "upscale", "scale": 1.5}})
    data["stages"][0]["latent"] = {"source": "empty", "width": 80, "height": 80}
    with pytest.raises(WorkflowError, match=r"stages\.1\.latent: 120×120 px is not a multiple"):
        Workflow.from_dict(data)


def test_first_stage_cannot_upscale() -> None:
    with pytest.raises(WorkflowError, match="the first stage has no previous latent to upscale"):
        Workflow.from_dict(minimal(latent={"source": "upscale", "scale": 2.0}))


def test_bad_scheduler_option_is_reported_at_the_stage() -> None:
    data = minimal(scheduler={"name": "beta", "steps": 4, "options": {"gamma": 1}})
    with pytest.raises(WorkflowError, match=r"stages\.0: scheduler: .*gamma"):
        Workflow.from_dict(data)


def test_cache_window_must_be_ordered() -> None:
    data = minimal(cache={"threshold": 0.2, "start_percent": 0.9, "end_percent": 0.5})
    with pytest.raises(WorkflowError, match=r"start_percent \(0.9\) must be below end_percent"):
        Workflow.from_dict(data)


def test_unknown_field_is_rejected() -> None:
    with pytest.raises(WorkflowError, match=r"stages\.0\.sedd: Extra inputs are not permitted"):
        Workflow.from_dict(minimal(sedd=1))


def test_negative_prompt_either_text_or_file() -> None:
    data = minimal()
    data["prompts"] = {"negative": "x", "negative_file": "y.txt"}
    with pytest.raises(WorkflowError, match="either 'negative' or 'negative_file', not both"):
        Workflow.from_dict(data)


def test_output_prefix_dates_and_escape() -> None:
    wf = load_workflow("zimage-121101")
    assert wf.output.render_prefix(dt.datetime(2025, 12, 11, 8, 5, 3)) == (
        "2025-12-11/ComfyUI_Image"
    )
    for bad in ("../up", "/abs/path", "a/../../b"):
        with pytest.raises(WorkflowError, match="must be a relative path inside the output"):
            Workflow.from_dict({**minimal(), "output": {"prefix": bad}})


def test_unknown_preset_lists_presets() -> None:
    with pytest.raises(WorkflowError) as err:
        load_workflow("zimage-999")
    assert str(err.value) == (
        "no workflow file or preset named 'zimage-999'; presets: zimage-121101, zimage-turbo"
    )
