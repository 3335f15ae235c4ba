"""A whole workflow on the torch backend with tiny random models of the real architectures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zimage_trt.engines.torch_engines import torch_engines
from zimage_trt.models.dit import DiTConfig, ZImageDiT
from zimage_trt.models.text_encoder import Qwen3Config, Qwen3TextEncoder
from zimage_trt.models.tokenizer import QwenTokenizer
from zimage_trt.models.vae import FluxVAE, VAEConfig
from zimage_trt.runtime.images import next_path, to_uint8
from zimage_trt.runtime.pipeline import Pipeline
from zimage_trt.sampling.guider import Cond
from zimage_trt.sampling.stage import sample_stage, stage_input_latent
from zimage_trt.workflow import Workflow


def _randomize(module: torch.nn.Module, seed: int, std: float = 0.02) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std + (1.0 if p.ndim == 1 else 0.0))
    return module


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    te_cfg = Qwen3Config.tiny()
    dit_cfg = DiTConfig.tiny()
    dit_cfg = DiTConfig(**{**dit_cfg.__dict__, "cap_feat_dim": te_cfg.hidden_size})
    engines = torch_engines(
        _randomize(ZImageDiT(dit_cfg), 1),
        _randomize(Qwen3TextEncoder(te_cfg), 2),
        _randomize(FluxVAE(VAEConfig.tiny()), 3, std=0.05),
    )
    return Pipeline(engines, QwenTokenizer.from_package())


def two_stage(**first: object) -> Workflow:
    stage1 = {
        "name": "base",
        "latent": {"source": "empty", "width": 64, "height": 48},
        "sampler": {"name": "euler_ancestral"},
        "scheduler": {"name": "flow_match_euler", "steps": 4},
        "cfg": 2.0,
        "seed": 11,
        "preview": True,
        **first,
    }
    stage2 = {
        "name": "up",
        "latent": {"source": "upscale", "scale": 2.0},
        "sampler": {"name": "dpmpp_sde"},
        "scheduler": {"name": "beta", "steps": 4, "denoise": 0.6},
        "shift": 7.0,
        "seed": 12,
        "cache": {"threshold": 0.3, "start_percent": 0.2, "end_percent": 0.95},
    }
    return Workflow.from_dict(
        {
            "prompts": {
                "positive": "一只猫",
                "trigger": "tiny",
                "negative": "模糊，低清晰度，噪点严重，网红脸",
            },
            "stages": [stage1, stage2],
            "output": {"prefix": "%date:yyyy%/run", "format": "png"},
        }
    )


def test_two_stage_workflow_end_to_end(pipeline: Pipeline, tmp_path: Path) -> None:
    wf = two_stage()
    steps: list[tuple[str, int, int]] = []
    gen = pipeline.run(wf, progress=lambda n, i, t: steps.append((n, i, t)))
    assert gen.image.shape == (96, 128, 3) and gen.image.dtype == np.uint8
    assert gen.latent.shape == (1, 16, 12, 16)
    base, up = gen.stages
    assert base.model_calls == 8  # 4 steps × (cond, uncond): separate calls, lengths differ
    assert up.model_calls + up.calls_skipped == 7  # dpmpp_sde: 3 steps × 2 + the last
    assert base.preview is not None and base.preview.shape == (48, 64, 3)
    assert steps[0] == ("base", 1, 4) and steps[-1] == ("up", 4, 4)
    paths = pipeline.save(wf, gen, tmp_path)
    assert [p.name for p in paths] == ["run_base_preview_00001_.png", "run_00001_.png"]
    saved = Image.open(paths[-1])
    assert np.array_equal(np.asarray(saved), gen.image)
    info = saved.info
    assert info["software"].endswith("(torch)")
    assert Workflow.from_yaml(info["zimage-trt.workflow"]).stages == wf.stages
    assert info["zimage-trt.prompt"] == "tiny, 一只猫"
    assert info["zimage-trt.negative_prompt"] == "模糊，低清晰度，噪点严重，网红脸"
    assert info["zimage-trt.seeds"] == "11,12"


def test_prompts_and_captions_are_computed_once(pipeline: Pipeline) -> None:
    wf = two_stage()
    before = (pipeline.prompts.encoder_calls, pipeline.caption_path_calls)
    pipeline.run(wf)
    pipeline.run(wf)
    after = (pipeline.prompts.encoder_calls, pipeline.caption_path_calls)
    assert after[0] - before[0] <= 2 and after[1] - before[1] <= 2
    pipeline.run(wf)
    assert (pipeline.prompts.encoder_calls, pipeline.caption_path_calls) == after


def test_cfg_one_runs_no_negative_prompt(pipeline: Pipeline) -> None:
    wf = two_stage(cfg=1.0)
    wf.prompts.negative = "这个负面提示不应被编码"
    calls = pipeline.prompts.encoder_calls
    gen = pipeline.run(wf)
    assert gen.stages[0].model_calls == 4
    assert pipeline.prompts.encoder_calls - calls <= 1  # at most the positive prompt


def test_pipeline_matches_the_stage_runner_on_the_modules(pipeline: Pipeline) -> None:
    """The engines' wiring (caption path → denoiser, v → x0) equals a direct composition."""
    wf = two_stage(cfg=1.0, preview=False)
    stage = wf.stages[0]
    gen = pipeline.run(Workflow.from_dict({**wf.to_dict(), "stages": [stage.model_dump()]}))
    dit = pipeline.engines.denoiser.module  # type: ignore[attr-defined]
    tok = QwenTokenizer.from_package()
    ids = torch.tensor([tok.encode_prompt(wf.prompts.positive_text)])
    with torch.inference_mode():
        hidden = pipeline.engines.text_encoder.module(ids, torch.ones_like(ids))  # type: ignore[attr-defined]
        cap, _ = dit.caption_tokens(hidden, torch.ones(ids.shape, dtype=torch.bool))

    def model(x, sigma, context, names):  # type: ignore[no-untyped-def]
        return dit(x, sigma, context, torch.ones(context.shape[:2], dtype=torch.bool))

    with torch.inference_mode():
        direct = sample_stage(
            stage.params(),
            stage_input_latent(stage.params(), None),
            model,
            Cond("cond", cap),
            None,
            model_dtype=torch.float32,
        )
    torch.testing.assert_close(gen.latent, direct.latent, atol=0, rtol=0)


def test_uint8_conversion_truncates_like_comfyui() -> None:
    image = torch.tensor([-1.0, 0.0, 0.999, 1.5]).reshape(1, 1, 2, 2).expand(1, 3, 2, 2)
    assert to_uint8(image)[..., 0].tolist() == [[0, 127], [254, 255]]


def test_next_path_counts_and_refuses_escape(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "img_00007_.png").write_bytes(b"")
    assert next_path(tmp_path, "a/img", "png") == (tmp_path / "a" / "img_00008_.png").resolve()
    with pytest.raises(ValueError, match="escapes the output folder"):
        next_path(tmp_path, "../../etc/img", "png")


def test_fp16_is_refused() -> None:
    with pytest.raises(ValueError, match="float16 is not supported for the DiT or the VAE"):
        torch_engines(
            ZImageDiT(DiTConfig.tiny()),
            Qwen3TextEncoder(Qwen3Config.tiny()),
            FluxVAE(VAEConfig.tiny()),
            dtype=torch.float16,
        )


def test_nan_names_the_stage_and_step(pipeline: Pipeline) -> None:
    wf = two_stage(cfg=1.0, preview=False)
    real_model = pipeline.model
    calls = [0]

    def poisoned(x, sigma, context, names):  # type: ignore[no-untyped-def]
        calls[0] += 1
        v = real_model(x, sigma, context, names)
        return v * float("nan") if calls[0] == 2 else v

    pipeline.model = poisoned  # type: ignore[method-assign]
    try:
        with pytest.raises(FloatingPointError) as err:
            pipeline.run(wf)
    finally:
        del pipeline.model
    assert str(err.value).startswith(
        "stage 'base', step 3/4: sampler state x has NaN/Inf values at sigma "
    )


def test_call_api_overrides_prompt_and_seeds(pipeline: Pipeline) -> None:
    gen = pipeline("a lighthouse", workflow=two_stage(cfg=1.0, preview=False), seed=[3, 4])
    again = pipeline("a lighthouse", workflow=two_stage(cfg=1.0, preview=False), seed=[3, 4])
    other = pipeline("a lighthouse", workflow=two_stage(cfg=1.0, preview=False), seed=[5, 4])
    assert np.array_equal(gen.image, again.image)
    assert not torch.equal(gen.latent, other.latent)
    with pytest.raises(ValueError, match="3 seeds given for a workflow of 2 stage"):
        pipeline(workflow=two_stage(), seed=[1, 2, 3])


def test_metadata_inlines_the_negative_prompt_file() -> None:
    from zimage_trt.runtime.images import png_metadata
    from zimage_trt.workflow import load_workflow

    wf = load_workflow("zimage-121101")
    meta = png_metadata(wf, "torch")
    carried = Workflow.from_yaml(meta["zimage-trt.workflow"])
    assert carried.prompts.negative_file is None
    assert carried.prompts.negative == wf.prompts.negative_text()
    assert carried.stages == wf.stages
    assert meta["zimage-trt.seeds"] == "905124181980574,182450993364532,894355038471848"
