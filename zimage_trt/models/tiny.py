"""The tiny Z-Image: the real architectures at test size, in every layout users hold models in.

`make_tiny` writes, deterministically (fixed seeds), a complete diffusers-layout folder that
diffusers' ``ZImagePipeline`` and transformers load as they would Tongyi-MAI/Z-Image-Turbo, plus
the same weights as ComfyUI single files, a Q8_0 GGUF text encoder and a kohya LoRA::

    model_index.json
    transformer/   config.json, diffusion_pytorch_model.safetensors   (diffusers names)
    text_encoder/  config.json, model.safetensors                     (Qwen3ForCausalLM names)
    tokenizer/     tokenizer.json, tokenizer_config.json, vocab.json, merges.txt (real Qwen BPE)
    vae/           config.json, diffusion_pytorch_model.safetensors   (AutoencoderKL names)
    scheduler/     scheduler_config.json       (FlowMatchEulerDiscrete, shift 3, no dynamic shift)
    comfyui/       z_image_turbo_tiny.safetensors (original names, fused qkv),
                   qwen_3_4b_tiny.safetensors, qwen_3_4b_tiny-Q8_0.gguf, ae_tiny.safetensors (BFL)
    loras/         zimage_tiny_lora.safetensors  (kohya lora_unet_… names with alpha)

Weights are random, O(1) activations (norm weights near 1, matrices scaled by 1/√fan-in) and
exactly representable in bfloat16, stored as float32: a bf16 engine and the fp32 reference then
hold identical weights and differ by arithmetic only. The text encoder keeps the real 151,936-row
vocabulary, so real tokenizer ids work. `tiny_model_dir` makes the model once into the cache
(``$ZIMAGE_TRT_CACHE`` or ``~/.cache/zimage-trt``), which is what ``--model tiny`` means.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from zimage_trt.atomic import write_json
from zimage_trt.models import dit_keys, vae_keys
from zimage_trt.models.dit import DiTConfig, ZImageDiT
from zimage_trt.models.safetensors_io import save_safetensors
from zimage_trt.models.text_encoder import Qwen3Config
from zimage_trt.models.text_encoder_keys import parameter_shapes
from zimage_trt.models.tokenizer import FIRST_SPECIAL_ID
from zimage_trt.models.tokenizer_files import write_tokenizer
from zimage_trt.models.vae import FluxVAE, VAEConfig

TINY_VERSION = "2"  # bump whenever what make_tiny writes changes: it names the cache folder
CACHE_ENV = "ZIMAGE_TRT_CACHE"
TINY_MARKER = ".zimage-trt-tiny.json"  # marks a folder make_tiny wrote (it may write there again)
DIFFUSERS_VERSION = "0.36.0"  # the first diffusers with Z-Image
SEEDS = {"dit": 0, "text_encoder": 1, "vae": 2, "lora": 3}
LORA_RANK, LORA_ALPHA = 4, 2.0
LORA_LAYERS = (  # ComfyUI/original module paths; the caption path (context_refiner) included
    "layers.0.attention.qkv",
    "layers.1.feed_forward.w1",
    "noise_refiner.0.attention.out",
    "context_refiner.1.feed_forward.w2",
)


@dataclass(frozen=True)
class TinyPaths:
    """Where `make_tiny` put things; ``root`` is the diffusers folder."""

    root: Path
    transformer: Path
    text_encoder: Path
    text_encoder_gguf: Path
    vae: Path
    lora: Path

    @classmethod
    def at(cls, root: str | Path) -> TinyPaths:
        root = Path(root)
        comfy = root / "comfyui"
        return cls(
            root=root,
            transformer=comfy / "z_image_turbo_tiny.safetensors",
            text_encoder=comfy / "qwen_3_4b_tiny.safetensors",
            text_encoder_gguf=comfy / "qwen_3_4b_tiny-Q8_0.gguf",
            vae=comfy / "ae_tiny.safetensors",
            lora=root / "loras" / "zimage_tiny_lora.safetensors",
        )


# ----------------------------------------------------------------------------------------------
# Weights


def _is_norm(name: str) -> bool:
    # RMSNorm / GroupNorm scales (the DiT's caption RMSNorm is cap_embedder.0)
    return "norm" in name or name == "cap_embedder.0.weight"


def _random(
    shapes: Mapping[str, tuple[int, ...]], seed: int, init: Callable[[str, Tensor], Tensor]
) -> dict[str, Tensor]:
    """Standard-normal draws in ``shapes`` order, shaped by ``init``, rounded to bf16 values."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        value = init(name, torch.randn(shape, generator=generator))
        out[name] = value.to(torch.bfloat16).float()
    return out


def _fan_in_init(norm_std: float, other_std: float) -> Callable[[str, Tensor], Tensor]:
    def init(name: str, z: Tensor) -> Tensor:
        if _is_norm(name) and name.endswith("weight"):
            return 1.0 + norm_std * z
        if z.ndim >= 2 and not name.endswith("pad_token"):
            return z / float(z[0].numel()) ** 0.5  # fan-in: every dim but the output one
        return other_std * z  # biases, norm shifts, pad tokens

    return init


def _shapes_of(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def tiny_dit_weights() -> dict[str, Tensor]:
    """DiTConfig.tiny() weights, original/ComfyUI names (fused qkv)."""
    with torch.device("meta"):
        shapes = _shapes_of(ZImageDiT(DiTConfig.tiny()))
    return _random(shapes, SEEDS["dit"], _fan_in_init(0.2, 0.5))


def tiny_text_encoder_weights() -> dict[str, Tensor]:
    """Qwen3Config.tiny() as a whole language model (HF names): the encoder's blocks, the last
    block it never runs, and the final norm; the embedding is tied, so there is no LM head."""
    config = Qwen3Config.tiny()
    shapes = parameter_shapes(config)
    last = config.num_encoder_layers
    for name, shape in list(shapes.items()):
        if name.startswith("model.layers.0."):
            shapes[name.replace("layers.0.", f"layers.{last}.", 1)] = shape
    shapes["model.norm.weight"] = (config.hidden_size,)

    def init(name: str, z: Tensor) -> Tensor:
        if name.endswith("norm.weight"):
            return 1.0 + 0.3 * z
        if "embed_tokens" in name:
            return z
        return z / z.shape[1] ** 0.5

    return _random(shapes, SEEDS["text_encoder"], init)


def tiny_vae_weights() -> dict[str, Tensor]:
    """VAEConfig.tiny() weights, diffusers names."""
    with torch.device("meta"):
        shapes = _shapes_of(FluxVAE(VAEConfig.tiny()))
    return _random(shapes, SEEDS["vae"], _fan_in_init(0.2, 0.1))


def tiny_lora_weights(dit: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A rank-4 kohya LoRA (``lora_unet_<path>.lora_down/.lora_up/.alpha``) on a few layers,
    its deltas a few percent of the weights they patch."""
    generator = torch.Generator().manual_seed(SEEDS["lora"])
    out = {}
    for path in LORA_LAYERS:
        rows, cols = dit[path + ".weight"].shape
        base = "lora_unet_" + path.replace(".", "_")
        down = torch.randn(LORA_RANK, cols, generator=generator) / cols**0.5
        up = 0.2 * torch.randn(rows, LORA_RANK, generator=generator)
        out[base + ".lora_down.weight"] = down.to(torch.bfloat16).float()
        out[base + ".lora_up.weight"] = up.to(torch.bfloat16).float()
        out[base + ".alpha"] = torch.tensor(LORA_ALPHA)
    return out


# ----------------------------------------------------------------------------------------------
# Configs


def _transformer_config(config: DiTConfig) -> dict[str, Any]:
    return {
        "_class_name": "ZImageTransformer2DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "all_f_patch_size": [1],
        "all_patch_size": [config.patch_size],
        "axes_dims": list(config.axes_dims),
        "axes_lens": list(config.axes_lens),
        "cap_feat_dim": config.cap_feat_dim,
        "dim": config.dim,
        "in_channels": config.in_channels,
        "n_heads": config.n_heads,
        "n_kv_heads": config.n_heads,
        "n_layers": config.n_layers,
        "n_refiner_layers": config.n_refiner_layers,
        "norm_eps": config.norm_eps,
        "qk_norm": config.qk_norm,
        "rope_theta": config.rope_theta,
        "t_scale": config.t_scale,
    }


def _text_encoder_config(config: Qwen3Config) -> dict[str, Any]:
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": FIRST_SPECIAL_ID,
        "eos_token_id": FIRST_SPECIAL_ID + 2,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "hidden_size": config.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": config.intermediate_size,
        "max_position_embeddings": 40960,
        "max_window_layers": config.num_hidden_layers,
        "model_type": "qwen3",
        "num_attention_heads": config.num_attention_heads,
        "num_hidden_layers": config.num_hidden_layers,
        "num_key_value_heads": config.num_key_value_heads,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": config.rope_theta,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": config.vocab_size,
    }


def _vae_config(config: VAEConfig) -> dict[str, Any]:
    levels = len(config.block_out_channels)
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "block_out_channels": list(config.block_out_channels),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "force_upcast": True,
        "in_channels": config.in_channels,
        "latent_channels": config.latent_channels,
        "latents_mean": None,
        "latents_std": None,
        "layers_per_block": config.layers_per_block,
        "mid_block_add_attention": True,
        "norm_num_groups": config.norm_num_groups,
        "out_channels": config.out_channels,
        "sample_size": 1024,
        "scaling_factor": config.scaling_factor,
        "shift_factor": config.shift_factor,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "use_post_quant_conv": False,
        "use_quant_conv": False,
    }


MODEL_INDEX = {
    "_class_name": "ZImagePipeline",
    "_diffusers_version": DIFFUSERS_VERSION,
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen3Model"],
    "tokenizer": ["transformers", "Qwen2Tokenizer"],
    "transformer": ["diffusers", "ZImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": DIFFUSERS_VERSION,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": False,
}


def _gguf_qtype(name: str, tensor: Tensor) -> str:
    # llama.cpp's Q8_0 files keep norms (1-D) in F32
    return "Q8_0" if tensor.ndim == 2 and tensor.shape[-1] % 32 == 0 else "F32"


# ----------------------------------------------------------------------------------------------
# The model folder


def make_tiny(dir: str | Path, *, force: bool = False) -> TinyPaths:
    """Write the tiny model (see the module docstring) into ``dir``; every file atomically, the
    same bytes on every call. A folder that is not empty and holds no tiny model is refused unless
    ``force`` (then same-named files are replaced and nothing else is touched)."""
    paths = TinyPaths.at(dir)
    root = paths.root
    _claim_folder(root, force)
    dit = tiny_dit_weights()
    text_encoder = tiny_text_encoder_weights()
    vae = tiny_vae_weights()

    write_json(root / "model_index.json", MODEL_INDEX)
    write_json(root / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
    write_json(root / "transformer" / "config.json", _transformer_config(DiTConfig.tiny()))
    save_safetensors(
        root / "transformer" / "diffusion_pytorch_model.safetensors",
        dit_keys.original_to_diffusers(dit),
    )
    write_json(root / "text_encoder" / "config.json", _text_encoder_config(Qwen3Config.tiny()))
    save_safetensors(root / "text_encoder" / "model.safetensors", text_encoder)
    write_tokenizer(root / "tokenizer")
    write_json(root / "vae" / "config.json", _vae_config(VAEConfig.tiny()))
    save_safetensors(root / "vae" / "diffusion_pytorch_model.safetensors", vae)

    # ComfyUI single files; the original DiT checkpoints also carry the unused norm_final
    norm_final = torch.ones(DiTConfig.tiny().dim)
    save_safetensors(paths.transformer, {**dit, "norm_final.weight": norm_final})
    save_safetensors(paths.text_encoder, text_encoder)
    from zimage_trt.models.gguf import write_gguf

    config = Qwen3Config.tiny()
    paths.text_encoder_gguf.parent.mkdir(parents=True, exist_ok=True)
    write_gguf(
        paths.text_encoder_gguf,
        text_encoder,
        "qwen3",
        _gguf_qtype,
        {
            "general.name": "qwen_3_4b_tiny",
            "qwen3.block_count": config.num_hidden_layers,
            "qwen3.embedding_length": config.hidden_size,
            "qwen3.feed_forward_length": config.intermediate_size,
            "qwen3.attention.head_count": config.num_attention_heads,
            "qwen3.attention.head_count_kv": config.num_key_value_heads,
            "qwen3.attention.key_length": config.head_dim,
            "qwen3.attention.value_length": config.head_dim,
            "qwen3.rope.freq_base": config.rope_theta,
            "qwen3.attention.layer_norm_rms_epsilon": config.rms_norm_eps,
        },
    )
    # the group count leaves no trace in the weights: say it, for single-file loading
    save_safetensors(
        paths.vae,
        vae_keys.diffusers_to_original(vae),
        {"norm_num_groups": str(VAEConfig.tiny().norm_num_groups)},
    )
    save_safetensors(
        paths.lora,
        tiny_lora_weights(dit),
        {"ss_network_module": "networks.lora", "ss_network_dim": str(LORA_RANK),
         "ss_network_alpha": str(LORA_ALPHA)},
    )  # fmt: skip
    return paths


def _claim_folder(root: Path, force: bool) -> None:
    """Refuse a file, an unwritable folder, or a non-empty folder that is not a tiny model (no
    marker) unless ``force``; then mark the folder as a tiny model."""
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root} is a file, not a folder")
    marker = root / TINY_MARKER
    if root.is_dir() and not force and not marker.is_file():
        found = sorted(p.name for p in root.iterdir())
        if found:
            shown = ", ".join(found[:3]) + (", …" if len(found) > 3 else "")
            raise ValueError(
                f"{root} is not empty ({shown}) and holds no tiny model; make-tiny writes a "
                "whole model folder: name an empty or new folder, or pass --force to write into "
                "this one (files of the same names are replaced, nothing else is touched)"
            )
    try:
        root.mkdir(parents=True, exist_ok=True)
        write_json(marker, {"tiny_version": TINY_VERSION})
    except OSError as exc:
        raise ValueError(f"cannot write the tiny model to {root}: {exc.strerror}") from None


def cache_dir() -> Path:
    """zimage-trt's cache: ``$ZIMAGE_TRT_CACHE``, else ``$XDG_CACHE_HOME/zimage-trt``, else
    ``~/.cache/zimage-trt``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "zimage-trt"


def tiny_model_dir() -> Path:
    """The tiny model's folder in the cache, made on first use (``--model tiny``).

    It is written into a temporary folder beside its final place and renamed there, so the
    folder either exists complete or not at all; a process that loses a race to make it keeps
    the winner's (identical) copy.
    """
    target = cache_dir() / f"tiny-{TINY_VERSION}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        make_tiny(tmp)
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
