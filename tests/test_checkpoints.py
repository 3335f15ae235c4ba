"""Checkpoint discovery and loading: every layout gives the same weights; bad files fail clearly."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import Tensor

from zimage_trt.atomic import atomic_path
from zimage_trt.models import dit_keys
from zimage_trt.models.checkpoints import load_dit, load_text_encoder_weights, load_vae_weights
from zimage_trt.models.model_files import ModelFiles, model_files, resolve_model, weight_files
from zimage_trt.models.safetensors_io import (
    CheckpointError,
    LazyStateDict,
    ModelNotFoundError,
    _TensorInfo,
    read_safetensors_header,
    save_safetensors,
)
from zimage_trt.models.tiny import TinyPaths, make_tiny, tiny_dit_weights

F32 = torch.float32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyPaths:
    return make_tiny(tmp_path_factory.mktemp("tiny"))


def _read(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def test_diffusers_folder_and_comfyui_files_load_the_same_weights(tiny: TinyPaths) -> None:
    folder = resolve_model(tiny.root)
    single = ModelFiles(tiny.transformer, tiny.text_encoder, tiny.vae, origin="single files")
    dit = load_dit(folder.transformer, F32)
    _assert_same_state(dit, load_dit(single.transformer, F32))
    # and they are the weights make_tiny drew, in the module's (original) names
    expected = tiny_dit_weights()
    assert set(dit.state_dict()) == set(expected)
    for key, value in dit.state_dict().items():
        assert torch.equal(value, expected[key]), key
    _assert_same_state(
        load_text_encoder_weights(folder.text_encoder, F32),
        load_text_encoder_weights(single.text_encoder, F32),
    )
    vae = load_vae_weights(folder.vae, F32)
    _assert_same_state(vae, load_vae_weights(single.vae, F32))
    assert vae.config.norm_num_groups == 8  # from vae/config.json and from the file metadata


def test_dtype_and_frozen(tiny: TinyPaths) -> None:
    dit = load_dit(tiny.transformer, torch.bfloat16)
    assert {p.dtype for p in dit.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in dit.parameters()) and not dit.training
    # the tiny weights are bf16 values: casting them loses nothing
    reference = load_dit(tiny.transformer, F32)
    for (key, a), b in zip(dit.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(a.float(), b), key


def test_gguf_text_encoder_is_close(tiny: TinyPaths) -> None:
    gguf = load_text_encoder_weights(tiny.text_encoder_gguf, F32)
    full = load_text_encoder_weights(tiny.text_encoder, F32)
    assert gguf.config == full.config
    ref = full.state_dict()
    worst = 0.0
    for key, value in gguf.state_dict().items():
        if value.ndim == 1:  # norms are stored F32
            assert torch.equal(value, ref[key]), key
            continue
        # Q8_0: one fp16 scale amax/127 per 32 values, so the error is at most half a step
        # (plus fp16 rounding of d·q, as ComfyUI computes it)
        blocks = ref[key].reshape(-1, 32)
        step = blocks.abs().amax(dim=1, keepdim=True) / 127
        error = (value.reshape(-1, 32) - blocks).abs()
        assert bool((error <= 0.5 * step + 1e-3 * blocks.abs() + 1e-6).all()), key
        assert not torch.equal(value, ref[key]), key  # it really went through Q8_0
        worst = max(worst, float(error.max()))
    assert 0 < worst < 0.05
    ids = torch.tensor([[151644, 872, 198, 64, 8251, 151645, 198, 151644, 77091, 198]])
    mask = torch.ones_like(ids)
    # weight errors of ~0.3 % compound through the blocks: 1.5 % of the output's norm here
    out, ref_out = gguf(ids, mask), full(ids, mask)
    assert float((out - ref_out).norm() / ref_out.norm()) < 0.03


def test_gguf_dit(tiny: TinyPaths, tmp_path: Path) -> None:
    """A ComfyUI-GGUF DiT (architecture lumina2, original names under model.diffusion_model.)."""
    from zimage_trt.models.gguf import write_gguf

    weights = tiny_dit_weights()
    path = tmp_path / "z_image_turbo-Q8_0.gguf"
    write_gguf(
        path,
        {dit_keys.COMFY_PREFIX + k: v for k, v in weights.items()},
        "lumina2",
        lambda name, t: "Q8_0" if t.ndim == 2 and t.shape[-1] % 32 == 0 else "F32",
    )
    dit = load_dit(path, F32)
    assert set(dit.state_dict()) == set(weights)
    quantized = 0
    for key, value in dit.state_dict().items():
        reference = weights[key]
        if value.ndim == 2 and value.shape[-1] % 32 == 0:
            step = reference.abs().amax() / 127
            assert float((value - reference).abs().max()) <= 0.5 * float(step) + 1e-3, key
            quantized += int(not torch.equal(value, reference))
        else:
            assert torch.equal(value, reference), key
    assert quantized > 10


def _scaled_fp8(sd: dict[str, Tensor], prefix: str) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """ComfyUI's scaled-fp8 layout (2-D weights e4m3 with a per-tensor ``scale_weight``, the
    ``scaled_fp8`` marker), and the weights ComfyUI computes from it in float32."""
    out: dict[str, Tensor] = {prefix + "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    expected = {}
    for key, value in sd.items():
        if value.ndim == 2 and key.endswith(".weight") and "pad_token" not in key:
            scale = value.abs().amax() / 448.0
            quantized = (value / scale).to(torch.float8_e4m3fn)
            out[prefix + key] = quantized
            out[prefix + key.removesuffix("weight") + "scale_weight"] = scale.reshape(())
            expected[key] = quantized.float() * scale
        else:
            out[prefix + key] = value
            expected[key] = value
    return out, expected


def test_scaled_fp8_dit(tiny: TinyPaths, tmp_path: Path) -> None:
    stored, expected = _scaled_fp8(tiny_dit_weights(), dit_keys.COMFY_PREFIX)
    path = tmp_path / "z_image_turbo_fp8_scaled.safetensors"
    save_safetensors(path, stored)
    dit = load_dit(path, F32)
    assert set(dit.state_dict()) == set(expected)
    for key, value in dit.state_dict().items():
        assert torch.equal(value, expected[key]), key
    # in bf16 the product is ComfyUI's w.to(bf16) * scale.to(bf16)
    key = "layers.0.attention.qkv.weight"
    bf16 = load_dit(path, torch.bfloat16).state_dict()[key]
    prefixed = dit_keys.COMFY_PREFIX + key
    scale = stored[prefixed.removesuffix("weight") + "scale_weight"]
    assert torch.equal(bf16, stored[prefixed].to(torch.bfloat16) * scale.to(torch.bfloat16))


def test_plain_fp8_dit(tmp_path: Path) -> None:
    weights = tiny_dit_weights()
    stored = {k: v.to(torch.float8_e5m2) if v.ndim == 2 else v for k, v in weights.items()}
    path = tmp_path / "z_image_turbo_fp8_e5m2.safetensors"
    save_safetensors(path, stored)
    assert read_safetensors_header(path)[0]["x_embedder.weight"].dtype == torch.float8_e5m2
    for key, value in load_dit(path, F32).state_dict().items():
        assert torch.equal(value, stored[key].float()), key


def test_sharded_diffusers_transformer(tiny: TinyPaths, tmp_path: Path) -> None:
    folder = tmp_path / "transformer"
    folder.mkdir()
    shutil.copy(tiny.root / "transformer" / "config.json", folder)
    sd = _read(tiny.root / "transformer" / "diffusion_pytorch_model.safetensors")
    names = sorted(sd)
    shards = {
        "diffusion_pytorch_model-00001-of-00002.safetensors": names[: len(names) // 2],
        "diffusion_pytorch_model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    weight_map = {}
    for file, keys in shards.items():
        save_safetensors(folder / file, {k: sd[k] for k in keys})
        weight_map.update(dict.fromkeys(keys, file))
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert weight_files(folder) == [folder / f for f in shards]
    _assert_same_state(load_dit(folder, F32), load_dit(tiny.transformer, F32))
    _assert_same_state(load_dit(index, F32), load_dit(tiny.transformer, F32))

    (folder / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelNotFoundError) as err:
        load_dit(folder, F32)
    assert str(err.value) == (
        f"{index}: 1 shard(s) are missing: diffusion_pytorch_model-00002-of-00002.safetensors"
    )


def test_text_encoder_skips_the_unused_tensors(
    tiny: TinyPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The LM's last block and final norm are never read (lazy, per-tensor loading)."""
    read: list[str] = []
    original = LazyStateDict._read

    def recording(self: LazyStateDict, info: _TensorInfo) -> Tensor:
        read.append(info.stored_key)
        return original(self, info)

    monkeypatch.setattr(LazyStateDict, "_read", recording)
    encoder = load_text_encoder_weights(tiny.text_encoder, F32)
    assert encoder.config.num_hidden_layers == 4 and len(encoder.model.layers) == 3
    assert sorted(read) == sorted(encoder.state_dict())  # each used tensor read once
    assert not any(k.startswith("model.layers.3.") or k == "model.norm.weight" for k in read)


def test_all_in_one_checkpoint(tiny: TinyPaths, tmp_path: Path) -> None:
    """One file holding all three networks under ComfyUI's prefixes: each loader takes its own."""
    combined = {}
    for prefix, path in (
        ("model.diffusion_model.", tiny.transformer),
        ("text_encoders.qwen3_4b.transformer.", tiny.text_encoder),
        ("first_stage_model.", tiny.vae),
    ):
        combined.update({prefix + k: v for k, v in _read(path).items()})
    path = tmp_path / "z_image_aio.safetensors"
    save_safetensors(path, combined, {"norm_num_groups": "8"})
    _assert_same_state(load_dit(path, F32), load_dit(tiny.transformer, F32))
    _assert_same_state(
        load_text_encoder_weights(path, F32), load_text_encoder_weights(tiny.text_encoder, F32)
    )
    _assert_same_state(load_vae_weights(path, F32), load_vae_weights(tiny.vae, F32))


# ----------------------------------------------------------------------------------------------
# Errors


SD_KEYS = (
    "model.diffusion_model.input_blocks.0.0.weight",
    "model.diffusion_model.input_blocks.0.0.bias",
    "model.diffusion_model.out.2.weight",
    "model.diffusion_model.time_embed.0.weight",
)


def test_not_a_zimage_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "sd15.safetensors"
    save_safetensors(path, {k: torch.zeros(2) for k in SD_KEYS})
    with pytest.raises(CheckpointError) as err:
        load_dit(path)
    assert str(err.value) == (
        f"{path}: not a Z-Image DiT checkpoint: missing keys cap_embedder.1.weight, "
        "noise_refiner.0.attention.k_norm.weight (looked for the ComfyUI/original layout: "
        "cap_embedder.1.weight, noise_refiner.0.attention.k_norm.weight, optionally under a "
        "prefix such as 'model.diffusion_model.'; and the diffusers layout: "
        "cap_embedder.1.weight, layers.0.attention.to_q.weight); it holds 4 tensors "
        "(model.diffusion_model.input_blocks.0.0.bias, "
        "model.diffusion_model.input_blocks.0.0.weight, model.diffusion_model.out.2.weight, …)"
        "; it looks like a Stable Diffusion UNet"
    )


def test_wrong_network_is_named(tiny: TinyPaths) -> None:
    with pytest.raises(CheckpointError) as err:
        load_dit(tiny.vae)
    assert str(err.value).endswith("; it looks like a VAE")
    with pytest.raises(CheckpointError) as err:
        load_text_encoder_weights(tiny.transformer)
    assert str(err.value).startswith(
        f"{tiny.transformer}: not a Qwen3 text-encoder checkpoint: missing keys "
        "model.layers.0.self_attn.q_norm.weight, model.layers.0.self_attn.q_proj.weight "
        "(looked for the Hugging Face / ComfyUI Qwen3 layout"
    )
    assert str(err.value).endswith("; it looks like the Z-Image DiT")
    with pytest.raises(CheckpointError) as err:
        load_vae_weights(tiny.text_encoder)
    assert str(err.value).startswith(
        f"{tiny.text_encoder}: not a Flux VAE checkpoint: missing keys decoder.conv_in.weight, "
        "encoder.conv_in.weight"
    )


def test_missing_keys_are_listed(tiny: TinyPaths, tmp_path: Path) -> None:
    sd = _read(tiny.transformer)
    path = tmp_path / "truncated.safetensors"
    save_safetensors(path, {k: v for k, v in sd.items() if k != "layers.0.ffn_norm2.weight"})
    with pytest.raises(CheckpointError) as err:
        load_dit(path)
    assert str(err.value) == (
        f"{path}: Z-Image DiT checkpoint (ComfyUI/original layout) is missing 1 key(s): "
        "layers.0.ffn_norm2.weight"
    )
    # all of block 0 but the weights the architecture is read from: 11 keys, 10 named
    needed = ("layers.0.attention.qkv.weight", "layers.0.attention.q_norm.weight")
    keep = {k: v for k, v in sd.items() if not k.startswith("layers.0.") or k in needed}
    assert len(sd) - len(keep) == 11
    save_safetensors(path, keep)
    with pytest.raises(CheckpointError) as err:
        load_dit(path)
    assert str(err.value) == (
        f"{path}: Z-Image DiT checkpoint (ComfyUI/original layout) is missing 11 key(s): "
        "layers.0.adaLN_modulation.0.bias, layers.0.adaLN_modulation.0.weight, "
        "layers.0.attention.k_norm.weight, layers.0.attention.out.weight, "
        "layers.0.attention_norm1.weight, layers.0.attention_norm2.weight, "
        "layers.0.feed_forward.w1.weight, layers.0.feed_forward.w2.weight, "
        "layers.0.feed_forward.w3.weight, layers.0.ffn_norm1.weight, … (+1 more)"
    )
    # without a key the architecture is read from, that key is named
    del sd["t_embedder.mlp.0.weight"]
    save_safetensors(path, sd)
    with pytest.raises(CheckpointError) as err:
        load_dit(path)
    assert str(err.value) == (
        f"{path}: Z-Image DiT checkpoint (ComfyUI/original layout) is missing 1 key(s): "
        "t_embedder.mlp.0.weight"
    )


def test_missing_keys_in_diffusers_names(tiny: TinyPaths, tmp_path: Path) -> None:
    folder = tmp_path / "transformer"
    folder.mkdir()
    sd = _read(tiny.root / "transformer" / "diffusion_pytorch_model.safetensors")
    del sd["layers.1.attention.to_k.weight"], sd["all_final_layer.2-1.linear.bias"]
    save_safetensors(folder / "diffusion_pytorch_model.safetensors", sd)
    with pytest.raises(CheckpointError) as err:
        load_dit(folder)
    assert str(err.value) == (
        f"{folder / 'diffusion_pytorch_model.safetensors'}: Z-Image DiT checkpoint (diffusers "
        "layout) is missing 2 key(s): all_final_layer.2-1.linear.bias, "
        "layers.1.attention.to_k.weight"
    )


def test_text_encoder_missing_keys(tiny: TinyPaths, tmp_path: Path) -> None:
    sd = _read(tiny.text_encoder)
    del sd["model.layers.1.mlp.up_proj.weight"]
    path = tmp_path / "qwen.safetensors"
    save_safetensors(path, sd)
    with pytest.raises(CheckpointError) as err:
        load_text_encoder_weights(path)
    assert str(err.value) == (
        f"{path}: Qwen3 text-encoder checkpoint is missing 1 key(s): "
        "model.layers.1.mlp.up_proj.weight"
    )


def test_unsupported_files(tmp_path: Path) -> None:
    pickled = tmp_path / "model.ckpt"
    pickled.write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError) as err:
        load_dit(pickled)
    assert str(err.value) == (
        f"{pickled}: unsupported weight format '.ckpt' (use .safetensors or .gguf; pickled "
        ".bin/.pt/.ckpt checkpoints are not loaded)"
    )
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_dit(garbage)
    nvfp4 = tmp_path / "nvfp4.safetensors"
    save_safetensors(nvfp4, {"layers.0.attention.qkv.weight_scale_2": torch.ones(())})
    with pytest.raises(CheckpointError) as err:
        load_dit(nvfp4)
    assert str(err.value) == (
        f"{nvfp4}: 'layers.0.attention.qkv.weight_scale_2' belongs to a 4-bit quantization "
        "(NVFP4 / bitsandbytes) that zimage-trt does not load; use a bf16, fp8 or GGUF file"
    )
    with pytest.raises(ModelNotFoundError) as err:
        load_vae_weights(tmp_path / "nope.safetensors")
    assert str(err.value) == f"{tmp_path / 'nope.safetensors'}: no such file"


# ----------------------------------------------------------------------------------------------
# Finding the files


REVISION = "0123456789abcdef0123456789abcdef01234567"


def _fake_hub(tiny: TinyPaths, cache: Path, parts: tuple[str, ...]) -> Path:
    """A Hugging Face cache entry of the tiny model (snapshot files linked, as the hub does)."""
    repo = cache / "models--Tongyi-MAI--Z-Image-Turbo"
    snapshot = repo / "snapshots" / REVISION
    for part in parts:
        source = tiny.root / part
        files = [source] if source.is_file() else sorted(source.iterdir())
        for file in files:
            target = snapshot / file.relative_to(tiny.root)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(file)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


ALL_PARTS = ("model_index.json", "transformer", "text_encoder", "tokenizer", "vae", "scheduler")


def test_resolve_from_the_hf_cache(
    tiny: TinyPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snapshot = _fake_hub(tiny, tmp_path / "hub", ALL_PARTS)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files = resolve_model("Tongyi-MAI/Z-Image-Turbo")
    assert files == ModelFiles(
        transformer=snapshot / "transformer",
        text_encoder=snapshot / "text_encoder",
        vae=snapshot / "vae",
        tokenizer=snapshot / "tokenizer",
        scheduler_config=snapshot / "scheduler" / "scheduler_config.json",
        origin=f"Hugging Face cache Tongyi-MAI/Z-Image-Turbo ({snapshot})",
    )
    assert resolve_model(f"Tongyi-MAI/Z-Image-Turbo@{REVISION}").transformer == files.transformer
    _assert_same_state(load_dit(files.transformer, F32), load_dit(tiny.transformer, F32))
    assert files.load_tokenizer().encode_prompt("a cat")[:4] == [151644, 872, 198, 64]
    # HF_HOME/hub is the fallback when HF_HUB_CACHE is unset
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert resolve_model("Tongyi-MAI/Z-Image-Turbo") == files


def test_incomplete_cache_offline(
    tiny: TinyPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "hub"
    snapshot = _fake_hub(tiny, cache, ("model_index.json", "transformer", "text_encoder"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("Tongyi-MAI/Z-Image-Turbo")
    assert str(err.value) == (
        f"model Tongyi-MAI/Z-Image-Turbo is incomplete in the cache ({snapshot} lacks "
        "vae/diffusion_pytorch_model.safetensors (or .safetensors.index.json + shards)) "
        f"(looked in {cache / 'models--Tongyi-MAI--Z-Image-Turbo'}) and HF_HUB_OFFLINE is set: "
        "download it with `hf download Tongyi-MAI/Z-Image-Turbo` (huggingface_hub), or pass a "
        "local diffusers folder, or the ComfyUI single files (transformer, text_encoder, vae)"
    )
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("someone/Not-Cached", download=False)
    assert str(err.value).startswith(
        f"model someone/Not-Cached is not in the cache (looked in "
        f"{cache / 'models--someone--Not-Cached'}) and downloading was not allowed: "
    )


def test_download_when_allowed(
    tiny: TinyPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    cache = tmp_path / "hub"
    calls = []

    def fake_download(repo_id: str, **kwargs: object) -> str:
        calls.append((repo_id, kwargs))
        return str(_fake_hub(tiny, cache, ALL_PARTS))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    files = resolve_model("Tongyi-MAI/Z-Image-Turbo")
    assert calls == [
        (
            "Tongyi-MAI/Z-Image-Turbo",
            {
                "revision": None,
                "cache_dir": cache,
                "allow_patterns": [
                    "model_index.json",
                    "transformer/*",
                    "text_encoder/*",
                    "tokenizer/*",
                    "vae/*",
                    "scheduler/*",
                ],
            },
        )
    ]
    snapshot = cache / "models--Tongyi-MAI--Z-Image-Turbo" / "snapshots" / REVISION
    assert files.transformer == snapshot / "transformer"
    assert files.origin == f"Hugging Face Tongyi-MAI/Z-Image-Turbo (downloaded to {snapshot})"
    cached = resolve_model("Tongyi-MAI/Z-Image-Turbo", download=False)  # now from the cache
    assert cached == replace(
        files, origin=f"Hugging Face cache Tongyi-MAI/Z-Image-Turbo ({snapshot})"
    )
    assert len(calls) == 1

    def failing_download(repo_id: str, **kwargs: object) -> str:
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing_download)
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("someone/Other")
    assert str(err.value).startswith(
        f"model someone/Other is not in the cache (looked in {cache / 'models--someone--Other'})"
        " and downloading it failed (OSError: no network): download it with `hf download "
    )


def test_resolve_folder_and_errors(tiny: TinyPaths, tmp_path: Path) -> None:
    files = resolve_model(tiny.root)
    assert files.transformer == tiny.root.resolve() / "transformer"
    assert files.tokenizer == tiny.root.resolve() / "tokenizer"
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model(tmp_path)
    assert str(err.value) == (
        f"{tmp_path.resolve()}: not a complete Z-Image diffusers folder: missing "
        "transformer/diffusion_pytorch_model.safetensors (or .safetensors.index.json + shards), "
        "text_encoder/model.safetensors (or .safetensors.index.json + shards), "
        "vae/diffusion_pytorch_model.safetensors (or .safetensors.index.json + shards)"
    )
    with pytest.raises(CheckpointError, match="is a single file; name all three networks"):
        resolve_model(tiny.transformer)
    with pytest.raises(ModelNotFoundError, match="neither a folder nor a Hugging Face repo id"):
        resolve_model("no such thing")


def test_model_files(tiny: TinyPaths, tmp_path: Path) -> None:
    # the Workflow's models: section with ComfyUI names, found in a ComfyUI models folder
    models = tmp_path / "ComfyUI" / "models"
    for sub, file in (
        ("diffusion_models", tiny.transformer),
        ("text_encoders", tiny.text_encoder_gguf),
        ("vae", tiny.vae),
    ):
        (models / sub).mkdir(parents=True)
        (models / sub / file.name).symlink_to(file)
    files = model_files(
        tiny.transformer.name, tiny.text_encoder_gguf.name, tiny.vae.name, search=[models]
    )
    assert files == ModelFiles(
        transformer=models / "diffusion_models" / tiny.transformer.name,
        text_encoder=models / "text_encoders" / tiny.text_encoder_gguf.name,
        vae=models / "vae" / tiny.vae.name,
        tokenizer=None,
        origin="single files",
    )
    # a whole model with one network swapped
    mixed = model_files(tiny.root, vae=tiny.vae)
    assert (mixed.transformer, mixed.vae) == (tiny.root.resolve() / "transformer", tiny.vae)
    assert mixed.tokenizer == tiny.root.resolve() / "tokenizer"
    with pytest.raises(CheckpointError) as err:
        model_files(tiny.transformer, vae=tiny.vae)
    assert str(err.value) == (
        f"a single-file transformer ({tiny.transformer}) needs the other networks' files too: "
        "give text_encoder (e.g. qwen_3_4b.safetensors, ae.safetensors)"
    )
    with pytest.raises(ModelNotFoundError) as err:
        model_files("missing.safetensors", "te.safetensors", "ae.safetensors", search=[models])
    assert str(err.value) == (
        f"DiT 'missing.safetensors' not found (looked in {Path('missing.safetensors').resolve()}"
        f", {models / 'missing.safetensors'}, {models / 'diffusion_models/missing.safetensors'}, "
        f"{models / 'unet/missing.safetensors'}, {models / 'checkpoints/missing.safetensors'})"
    )


def test_atomic_writes_leave_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "weights.safetensors"
    save_safetensors(target, {"a": torch.ones(3)})
    before = target.read_bytes()
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half a file")
        raise RuntimeError("crash while writing")
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["weights.safetensors"]
    with pytest.raises(ValueError, match="has no safetensors name"):
        save_safetensors(target, {"c": torch.ones(2, dtype=torch.complex64)})
    assert target.read_bytes() == before
