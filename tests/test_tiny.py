"""The tiny model: a real diffusers/transformers layout, deterministic, made once into the cache."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from zimage_trt.models import dit_keys
from zimage_trt.models.checkpoints import load_dit, load_text_encoder_weights, load_vae_weights
from zimage_trt.models.model_files import resolve_model
from zimage_trt.models.tiny import TINY_VERSION, TinyPaths, make_tiny, tiny_model_dir
from zimage_trt.models.tokenizer import CHAT_TEMPLATE, QwenTokenizer

F32 = torch.float32
PROMPTS = [
    "",
    "a cat",
    "一只橘猫坐在窗台上，阳光明媚。",
    "mixed 中文 and English, numbers 12345 and 3.14159, émojis 🎨🚀",
    "line one\nline two\n\n  indented\ttab   spaces  ",
    "don't can't I'LL we've <|im_end|> inside",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyPaths:
    return make_tiny(tmp_path_factory.mktemp("tiny"))


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_diffusers_loads_the_transformer_and_vae(tiny: TinyPaths) -> None:
    from diffusers import AutoencoderKL, ZImageTransformer2DModel

    transformer, info = ZImageTransformer2DModel.from_pretrained(
        tiny.root / "transformer", output_loading_info=True
    )
    assert all(not keys for keys in info.values()), info
    ours = dit_keys.original_to_diffusers(load_dit(tiny.root / "transformer", F32).state_dict())
    theirs = transformer.state_dict()
    assert set(theirs) == set(ours)
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)

    vae, info = AutoencoderKL.from_pretrained(tiny.root / "vae", output_loading_info=True)
    assert all(not keys for keys in info.values()), info
    assert vae.config.norm_num_groups == 8 and vae.config.latent_channels == 16
    ours = load_vae_weights(tiny.root / "vae", F32).state_dict()
    assert set(vae.state_dict()) == set(ours)
    assert all(torch.equal(vae.state_dict()[k], ours[k]) for k in ours)


def test_transformers_loads_the_text_encoder(tiny: TinyPaths) -> None:
    from transformers import AutoModel, Qwen3Model

    model, info = AutoModel.from_pretrained(tiny.root / "text_encoder", output_loading_info=True)
    assert isinstance(model, Qwen3Model)
    assert all(not keys for keys in info.values()), info
    assert model.config.num_hidden_layers == 4
    ids = torch.tensor([[151644, 872, 198, 64, 8251, 151645, 198, 151644, 77091, 198, 151668]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        reference = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
    ours = load_text_encoder_weights(tiny.root / "text_encoder", F32)(ids, mask)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0.0)


def test_diffusers_pipeline_loads_the_folder(tiny: TinyPaths) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(tiny.root)
    assert {name: type(c).__name__ for name, c in pipe.components.items()} == {
        "scheduler": "FlowMatchEulerDiscreteScheduler",
        "text_encoder": "Qwen3Model",
        "tokenizer": "Qwen2Tokenizer",
        "transformer": "ZImageTransformer2DModel",
        "vae": "AutoencoderKL",
    }
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    config = pipe.scheduler.config  # type: ignore[attr-defined]
    assert (config.shift, config.use_dynamic_shifting) == (3.0, False)
    # diffusers' _encode_prompt renders the chat template with enable_thinking=True: the same
    # string ComfyUI tokenises
    text = pipe.tokenizer.apply_chat_template(
        [{"role": "user", "content": "a cat"}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=True,
    )
    assert text == CHAT_TEMPLATE.format(prompt="a cat")


def test_tokenizer_folder_gives_comfyui_ids(tiny: TinyPaths) -> None:
    from transformers import AutoTokenizer, Qwen2Tokenizer

    auto = AutoTokenizer.from_pretrained(tiny.root / "tokenizer")
    qwen2 = Qwen2Tokenizer.from_pretrained(tiny.root / "tokenizer")
    ours = QwenTokenizer.load(tiny.root)
    packaged = QwenTokenizer.from_package()
    for prompt in PROMPTS:
        template = CHAT_TEMPLATE.format(prompt=prompt)
        ids = ours.encode_prompt(prompt)
        assert ids == packaged.encode_prompt(prompt), prompt
        assert auto(template)["input_ids"] == ids, prompt
        assert qwen2(template)["input_ids"] == ids, prompt
    assert auto.convert_tokens_to_ids(["<think>", "</think>"]) == [151667, 151668]
    assert max(auto.get_vocab().values()) == 151668 < 151936  # the tiny vocabulary covers it


def test_activations_are_finite_and_order_one(tiny: TinyPaths) -> None:
    encoder = load_text_encoder_weights(tiny.text_encoder, F32)
    ids = torch.tensor([QwenTokenizer.from_package().encode_prompt("一只橘猫 a cat")])
    caption = encoder(ids, torch.ones_like(ids))
    dit = load_dit(tiny.transformer, F32)
    tokens, valid = dit.caption_tokens(caption, torch.ones(ids.shape))
    latents = torch.randn(1, 16, 12, 10, generator=torch.Generator().manual_seed(0))
    velocity = dit(latents, torch.tensor([0.7]), tokens, valid)
    image = load_vae_weights(tiny.vae, F32).decode(latents)
    for name, x in (("caption", caption), ("velocity", velocity), ("image", image)):
        assert bool(x.isfinite().all()), name
        assert 0.05 < float(x.std()) < 20.0, (name, float(x.std()))
    assert image.shape == (1, 3, 96, 80)


def test_cache_is_made_once_and_matches_make_tiny(
    tiny: TinyPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ZIMAGE_TRT_CACHE", str(tmp_path / "cache"))
    made = tiny_model_dir()
    assert made == tmp_path / "cache" / f"tiny-{TINY_VERSION}"
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [made.name]  # no temp folder left
    digests = _digests(made)
    assert digests == _digests(tiny.root)  # deterministic, byte for byte
    assert len(digests) == 18  # 17 model files and the make-tiny marker
    mtimes = {p: p.stat().st_mtime_ns for p in made.rglob("*")}
    assert tiny_model_dir() == made
    assert {p: p.stat().st_mtime_ns for p in made.rglob("*")} == mtimes
    files = resolve_model("tiny")
    assert (files.transformer, files.tokenizer) == (made / "transformer", made / "tokenizer")
