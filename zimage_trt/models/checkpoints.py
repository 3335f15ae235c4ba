"""What is in a checkpoint: the three networks loaded from any layout (`load_dit`,
`load_text_encoder_weights`, `load_vae_weights`).

The layout is read off the tensor names (ComfyUI/original vs diffusers DiT, HF-style Qwen3 under
any prefix, BFL vs diffusers VAE), converted with the networks' own key maps, and cast to the
requested dtype. Safetensors are read lazily (`zimage_trt.models.safetensors_io`); GGUF files go
through `zimage_trt.models.gguf`; where the files are is `zimage_trt.models.model_files`'s job.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from zimage_trt.models import dit_keys, vae_keys
from zimage_trt.models import text_encoder_keys as te_keys
from zimage_trt.models.dit import DiTConfig, ZImageDiT
from zimage_trt.models.model_files import weight_files
from zimage_trt.models.safetensors_io import (
    CheckpointError,
    LazyStateDict,
    key_list,
    read_safetensors_header,
)
from zimage_trt.models.text_encoder import Qwen3TextEncoder
from zimage_trt.models.vae import FluxVAE

# Layout markers: the keys that identify each network (under any prefix).
DIT_ORIGINAL_MARKERS = ("cap_embedder.1.weight", "noise_refiner.0.attention.k_norm.weight")
DIT_DIFFUSERS_MARKERS = ("cap_embedder.1.weight", "layers.0.attention.to_q.weight")
TE_MARKERS = ("layers.0.self_attn.q_proj.weight", "layers.0.self_attn.q_norm.weight")
VAE_MARKERS = ("decoder.conv_in.weight", "encoder.conv_in.weight")
# What a wrong file probably is, for the hint in a layout error (suffixes of its keys).
_LOOKS_LIKE = (
    (("cap_embedder.1.weight",), "the Z-Image DiT"),
    (("self_attn.q_norm.weight",), "a Qwen3 text encoder"),
    (("self_attn.q_proj.weight",), "a language-model text encoder"),
    (("decoder.conv_in.weight",), "a VAE"),
    (("input_blocks.0.0.weight",), "a Stable Diffusion UNet"),
    (("double_blocks.0.img_attn.qkv.weight",), "a FLUX transformer"),
    ((".lora_down.weight", ".lora_A.weight", ".lora_B.weight"), "a LoRA"),
)


def _config_json(source: Path, class_names: Sequence[str]) -> dict[str, Any]:
    """A diffusers/transformers ``config.json`` beside the weights, if it describes one of
    ``class_names`` (``_class_name`` or ``model_type``)."""
    folder = source if source.is_dir() else source.parent
    path = folder / "config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise CheckpointError(f"{path}: unreadable config ({err})") from None
    names = {config.get("_class_name"), config.get("model_type")}
    return dict(config) if names & set(class_names) else {}


def _open_weights(
    source: str | Path, dtype: torch.dtype, gguf_kind: Literal["dit", "text_encoder"] | None
) -> tuple[Mapping[str, Tensor], str, dict[str, str]]:
    """(tensors, name for messages, file metadata) of a checkpoint in any supported format;
    ``gguf_kind`` None: this network has no GGUF form."""
    files = weight_files(source)
    if files[0].suffix == ".gguf":
        if gguf_kind is None:
            raise CheckpointError(f"{files[0]}: this network is not loaded from GGUF files")
        from zimage_trt.models.gguf import load_gguf_state_dict

        try:
            state_dict, _arch = load_gguf_state_dict(files[0], dtype, gguf_kind)
        except ValueError as err:
            raise CheckpointError(str(err)) from err
        return state_dict, str(files[0]), {}
    path = Path(source).expanduser()
    name = str(path if path.is_file() else files[0] if len(files) == 1 else path)
    lazy = LazyStateDict.open(files, dtype, name)
    return lazy, name, lazy.metadata


def stored_dtypes(source: str | Path) -> set[torch.dtype]:
    """The dtypes a checkpoint stores its floating-point tensors in, from its headers alone
    (none for a GGUF: its quantized values have no exact lower precision to keep)."""
    files = weight_files(source)
    if files[0].suffix == ".gguf":
        return set()
    found: set[torch.dtype] = set()
    for file in files:
        tensors, _ = read_safetensors_header(file)
        found |= {t.dtype for t in tensors.values() if t.dtype.is_floating_point}
    return found


def _shapes(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Shape-only stand-ins of a state dict (no data read for a `LazyStateDict`)."""
    if isinstance(sd, LazyStateDict):
        return sd.meta()
    return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in sd.items()}


def _find_prefix(keys: Iterable[str], markers: Sequence[str]) -> str | None:
    """The prefix under which all ``markers`` exist (``""`` for none), or None."""
    keys = set(keys)
    for key in keys:
        if key.endswith(markers[0]):
            prefix = key[: -len(markers[0])]
            if (not prefix or prefix.endswith(".")) and all(prefix + m in keys for m in markers):
                return prefix
    return None


def _select(sd: Mapping[str, Tensor], names: Mapping[str, str]) -> Mapping[str, Tensor]:
    """``new name → sd[old name]`` without reading anything from a `LazyStateDict`."""
    if isinstance(sd, LazyStateDict):
        return sd.view(names)
    return {new: sd[old] for new, old in names.items()}


def _strip(sd: Mapping[str, Tensor], prefix: str) -> Mapping[str, Tensor]:
    """The entries under ``prefix``, renamed without it (others, e.g. the VAE of an all-in-one
    checkpoint, are left out)."""
    if not prefix:
        return sd
    return _select(sd, {key[len(prefix) :]: key for key in sd if key.startswith(prefix)})


def _looks_like(keys: Iterable[str]) -> str:
    keys = list(keys)
    for suffixes, what in _LOOKS_LIKE:
        if any(k.endswith(suffixes) for k in keys):
            return f"; it looks like {what}"
    return ""


def _not_a(name: str, network: str, missing: Sequence[str], looked: str, keys: list[str]) -> str:
    sample = ", ".join(sorted(keys)[:3]) + (", …" if len(keys) > 3 else "")
    return (
        f"{name}: not a {network} checkpoint: missing keys {key_list(missing)} (looked for "
        f"{looked}); it holds {len(keys)} tensors ({sample}){_looks_like(keys)}"
    )


def _check_keys(
    name: str, what: str, found: Mapping[str, Tensor], expected: Mapping[str, Tensor]
) -> None:
    """Missing, unexpected or wrongly shaped tensors, named in the checkpoint's own layout."""
    missing = [k for k in expected if k not in found]
    if missing:
        raise CheckpointError(
            f"{name}: {what} is missing {len(missing)} key(s): {key_list(missing)}"
        )
    unexpected = [k for k in found if k not in expected]
    if unexpected:
        raise CheckpointError(
            f"{name}: {what} has {len(unexpected)} unexpected key(s): {key_list(unexpected)}"
        )
    wrong = [
        f"{k} {tuple(found[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in expected
        if tuple(found[k].shape) != tuple(expected[k].shape)
    ]
    if wrong:
        raise CheckpointError(
            f"{name}: {what} has {len(wrong)} tensor(s) of the wrong shape: {key_list(wrong)}"
        )


def _build(
    module_type: Callable[[Any], nn.Module], config: Any, weights: Mapping[str, Tensor]
) -> Any:
    with torch.device("meta"):
        module = module_type(config)
    module.load_state_dict(weights, strict=True, assign=True)
    module.requires_grad_(False)
    return module.eval()


# ----------------------------------------------------------------------------------------------
# The three networks


def _dit_config_overrides(config: DiTConfig, diffusers_config: Mapping[str, Any]) -> DiTConfig:
    """Hyper-parameters that leave no trace in the weights, from a diffusers ``config.json``."""
    fields: dict[str, Any] = {}
    for ours, theirs in (("n_heads", "n_heads"), ("rope_theta", "rope_theta"),
                         ("t_scale", "t_scale"), ("norm_eps", "norm_eps")):  # fmt: skip
        if theirs in diffusers_config:
            fields[ours] = type(getattr(config, ours))(diffusers_config[theirs])
    for name in ("axes_dims", "axes_lens"):
        if name in diffusers_config:
            fields[name] = tuple(int(v) for v in diffusers_config[name])
    if "all_patch_size" in diffusers_config:
        fields["patch_size"] = int(diffusers_config["all_patch_size"][0])
        fields["in_channels"] = config.patch_dim // fields["patch_size"] ** 2
    return replace(config, **fields)


def load_dit(
    source: str | Path, dtype: torch.dtype = torch.bfloat16, *, meta: bool = False
) -> ZImageDiT:
    """The Z-Image DiT from a ComfyUI/original single file (fused qkv, any key prefix such as
    ``model.diffusion_model.``), a diffusers ``transformer/`` folder or its (sharded) weights,
    an fp8 file or a GGUF, with its weights in ``dtype``. ``meta``: the same module on the
    ``meta`` device, without reading any weight (what the exporter traces)."""
    sd, name, _ = _open_weights(source, dtype, "dit")
    keys = list(sd)
    prefix = _find_prefix(keys, DIT_ORIGINAL_MARKERS)
    if prefix is not None:
        sd = _strip(sd, prefix)
        layout, to_original = "ComfyUI/original", dit_keys.normalize_original
    else:
        prefix = _find_prefix(keys, DIT_DIFFUSERS_MARKERS)
        if prefix is None:
            missing = [m for m in DIT_ORIGINAL_MARKERS if not any(k.endswith(m) for k in keys)]
            looked = (
                f"the ComfyUI/original layout: {', '.join(DIT_ORIGINAL_MARKERS)}, optionally "
                f"under a prefix such as {dit_keys.COMFY_PREFIX!r}; and the diffusers layout: "
                f"{', '.join(DIT_DIFFUSERS_MARKERS)}"
            )
            raise CheckpointError(_not_a(name, "Z-Image DiT", missing, looked, keys))
        sd = _strip(sd, prefix)
        layout, to_original = "diffusers", dit_keys.diffusers_to_original
    what = f"Z-Image DiT checkpoint ({layout} layout)"

    shapes = _shapes(sd)
    # What the architecture is read from; name it in the file's own layout if absent (Z-Image
    # always has q/k norms, whose width gives the head dim).
    required = (*dit_keys.REQUIRED_KEYS, "layers.0.attention.q_norm.weight")
    if layout == "diffusers":
        stand_ins = {k: torch.empty(3, device="meta") for k in required}
        names, found = list(dit_keys.original_to_diffusers(stand_ins)), shapes
    else:
        names, found = list(required), dit_keys.normalize_original(shapes)
    missing_required = [k for k in names if k not in found]
    if missing_required:
        raise CheckpointError(
            f"{name}: {what} is missing {len(missing_required)} key(s): "
            f"{key_list(missing_required)}"
        )
    probe = dict(shapes)
    if layout == "diffusers":  # stand-ins for absent k/v, so a gap is reported, not tripped on
        for key in shapes:
            if key.endswith(".attention.to_q.weight"):
                for part in ("to_k", "to_v"):
                    probe.setdefault(key.replace(".to_q.", f".{part}.", 1), shapes[key])
    config = dit_keys.config_from_state_dict(to_original(probe))
    config = _dit_config_overrides(
        config, _config_json(Path(source).expanduser(), ("ZImageTransformer2DModel",))
    )
    with torch.device("meta"):
        expected = ZImageDiT(config).to(dtype).state_dict()
    if layout == "diffusers":
        expected = dit_keys.original_to_diffusers(expected)
    _check_keys(name, what, found, expected)
    return _build(ZImageDiT, config, to_original(_shapes(sd) if meta else sd))


def load_text_encoder_weights(
    source: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    num_hidden_layers: int | None = None,
    *,
    meta: bool = False,
) -> Qwen3TextEncoder:
    """The Qwen3 text encoder (its first ``num_hidden_layers − 1`` blocks) from a transformers
    ``text_encoder/`` folder or its (sharded) weights, a ComfyUI single file, or a GGUF, with its
    weights in ``dtype``. Keys may sit under any prefix; the final norm, the LM head and the last
    block are never read. ``num_hidden_layers`` defaults to the folder's ``config.json``, else to
    what the file holds (see `text_encoder.config_from_state_dict`). ``meta``: on the meta
    device, no weight read."""
    sd, name, _ = _open_weights(source, dtype, "text_encoder")
    keys = list(sd)
    prefix = _find_prefix(keys, TE_MARKERS)
    if prefix is None:
        missing = ["model." + m for m in TE_MARKERS if not any(k.endswith(m) for k in keys)]
        looked = (
            "the Hugging Face / ComfyUI Qwen3 layout: "
            + ", ".join("model." + m for m in TE_MARKERS)
            + ", with or without 'model.' and under any prefix"
        )
        raise CheckpointError(_not_a(name, "Qwen3 text-encoder", missing, looked, keys))
    if prefix == "model." or prefix.endswith(".model."):
        prefix = prefix.removesuffix("model.")  # keep HF's own "model." (lm_head sits beside it)
    sd = _strip(sd, prefix)

    hf = _config_json(Path(source).expanduser(), ("qwen3",))
    rope = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta") or 1e6
    layers = num_hidden_layers or hf.get("num_hidden_layers")
    shapes = _shapes(sd)
    try:
        config = te_keys.config_from_state_dict(
            shapes, layers, float(rope), float(hf.get("rms_norm_eps", 1e-6))
        )
        _, ignored = te_keys.convert_state_dict(shapes, config)
    except ValueError as err:
        raise CheckpointError(f"{name}: {err}") from None
    # the ignored tensors (LM head, final norm, last block) are never read
    skip = set(ignored)
    used = _select(sd, {k: k for k in sd if k not in skip})
    weights, _ = te_keys.convert_state_dict(_shapes(used) if meta else used, config)
    return _build(Qwen3TextEncoder, config, weights)


def load_vae_weights(
    source: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    norm_num_groups: int | None = None,
    *,
    meta: bool = False,
) -> FluxVAE:
    """The Flux VAE from a diffusers ``vae/`` folder or file, or the BFL/ComfyUI
    ``ae.safetensors`` (any key prefix, e.g. ``first_stage_model.``), with its weights in
    ``dtype``. The GroupNorm group count leaves no trace in the weights: it comes from
    ``norm_num_groups``, else the folder's ``config.json``, else the file's ``norm_num_groups``
    metadata (the tiny model's), else 32 (the real Flux VAE). ``meta``: on the meta device, no
    weight read."""
    sd, name, metadata = _open_weights(source, dtype, None)
    keys = list(sd)
    prefix = _find_prefix(keys, VAE_MARKERS)
    if prefix is None:
        missing = [m for m in VAE_MARKERS if not any(k.endswith(m) for k in keys)]
        looked = f"{', '.join(VAE_MARKERS)} (either layout), under any prefix"
        raise CheckpointError(_not_a(name, "Flux VAE", missing, looked, keys))
    sd = _strip(sd, prefix)
    config_json = _config_json(Path(source).expanduser(), ("AutoencoderKL",))
    groups = int(
        norm_num_groups
        or config_json.get("norm_num_groups")
        or metadata.get("norm_num_groups")
        or 32
    )
    try:
        config = vae_keys.load_vae(_shapes(sd), norm_num_groups=groups).config  # checks keys
    except ValueError as err:
        raise CheckpointError(f"{name}: {err}") from None
    config = replace(
        config,
        scaling_factor=float(config_json.get("scaling_factor", config.scaling_factor)),
        shift_factor=float(config_json.get("shift_factor", config.shift_factor)),
    )
    vae = vae_keys.load_vae(_shapes(sd) if meta else sd, config)
    vae.requires_grad_(False)
    return vae
