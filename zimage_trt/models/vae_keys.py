"""The Flux VAE's checkpoint layouts: the BFL/ComfyUI ``ae.safetensors`` keys ↔ diffusers'
``AutoencoderKL`` keys (decoder levels numbered the other way round, the attention projections
1×1 convs against linears), the architecture read off a state dict, and ``load_vae``."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from zimage_trt.models.vae import FluxVAE, VAEConfig

# (original BFL/ComfyUI name, diffusers name). Fields: {side} encoder|decoder, {p} weight|bias,
# {i}/{j} indices kept as they are, {up} the decoder level, which the original layout numbers from
# the highest resolution (up.0 runs last) and diffusers in execution order (up_blocks.0 runs
# first): up.N ↔ up_blocks.(levels − 1 − N), the same flip both ways.
_KEY_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("{side}.conv_in.{p}", "{side}.conv_in.{p}"),
    ("{side}.norm_out.{p}", "{side}.conv_norm_out.{p}"),
    ("{side}.conv_out.{p}", "{side}.conv_out.{p}"),
    ("{side}.mid.block_1.{res}.{p}", "{side}.mid_block.resnets.0.{res}.{p}"),
    ("{side}.mid.block_2.{res}.{p}", "{side}.mid_block.resnets.1.{res}.{p}"),
    ("{side}.mid.attn_1.norm.{p}", "{side}.mid_block.attentions.0.group_norm.{p}"),
    ("{side}.mid.attn_1.q.{p}", "{side}.mid_block.attentions.0.to_q.{p}"),
    ("{side}.mid.attn_1.k.{p}", "{side}.mid_block.attentions.0.to_k.{p}"),
    ("{side}.mid.attn_1.v.{p}", "{side}.mid_block.attentions.0.to_v.{p}"),
    ("{side}.mid.attn_1.proj_out.{p}", "{side}.mid_block.attentions.0.to_out.0.{p}"),
    ("encoder.down.{i}.block.{j}.{res}.{p}", "encoder.down_blocks.{i}.resnets.{j}.{res}.{p}"),
    (
        "encoder.down.{i}.block.{j}.nin_shortcut.{p}",
        "encoder.down_blocks.{i}.resnets.{j}.conv_shortcut.{p}",
    ),
    ("encoder.down.{i}.downsample.conv.{p}", "encoder.down_blocks.{i}.downsamplers.0.conv.{p}"),
    ("decoder.up.{up}.block.{j}.{res}.{p}", "decoder.up_blocks.{up}.resnets.{j}.{res}.{p}"),
    (
        "decoder.up.{up}.block.{j}.nin_shortcut.{p}",
        "decoder.up_blocks.{up}.resnets.{j}.conv_shortcut.{p}",
    ),
    ("decoder.up.{up}.upsample.conv.{p}", "decoder.up_blocks.{up}.upsamplers.0.conv.{p}"),
)
_FIELD_PATTERNS = {
    "side": "encoder|decoder",
    "p": "weight|bias",
    "res": "norm1|conv1|norm2|conv2",
    "i": r"\d+",
    "j": r"\d+",
    "up": r"\d+",
}
# The attention projections are 1×1 convs in the original layout and linears in diffusers'.
_ATTN_ORIGINAL = re.compile(r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")
_ATTN_DIFFUSERS = re.compile(
    r"^(encoder|decoder)\.mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$"
)


def _template_regex(template: str) -> re.Pattern[str]:
    pattern = re.escape(template)
    for name, field in _FIELD_PATTERNS.items():
        pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>{field})")
    return re.compile(f"^{pattern}$")


_ORIGINAL_TO_DIFFUSERS = tuple((_template_regex(o), d) for o, d in _KEY_TEMPLATES)
_DIFFUSERS_TO_ORIGINAL = tuple((_template_regex(d), o) for o, d in _KEY_TEMPLATES)


def _rename(key: str, rules: Iterable[tuple[re.Pattern[str], str]], levels: int) -> str | None:
    for regex, target in rules:
        match = regex.match(key)
        if match is not None:
            fields = match.groupdict()
            if "up" in fields:
                fields["up"] = str(levels - 1 - int(fields["up"]))
            return target.format(**fields)
    return None


def _num_levels(keys: Iterable[str], level_prefixes: tuple[str, str]) -> int:
    """Number of resolution levels: the highest encoder/decoder level index seen, plus one."""
    pattern = re.compile(rf"^(?:{'|'.join(map(re.escape, level_prefixes))})(\d+)\.")
    indices = [int(m.group(1)) for k in keys if (m := pattern.match(k)) is not None]
    return max(indices, default=-1) + 1


def _format_keys(keys: Iterable[str], limit: int = 20) -> str:
    keys = sorted(keys)
    more = f" … and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def original_to_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """BFL/ComfyUI ``ae.safetensors`` names → this module's (= diffusers') names.

    The attention q/k/v/proj_out 1×1-conv weights [C, C, 1, 1] become linear weights [C, C]
    (views, no copies). Raises ValueError naming every key the map does not know.
    """
    levels = _num_levels(sd, ("encoder.down.", "decoder.up."))
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in sd.items():
        new = _rename(key, _ORIGINAL_TO_DIFFUSERS, levels)
        if new is None:
            unknown.append(key)
            continue
        if _ATTN_ORIGINAL.match(key) and value.ndim == 4:
            value = value.reshape(value.shape[0], value.shape[1])
        out[new] = value
    if unknown:
        raise ValueError(
            f"not a Flux VAE state dict in the original layout: {len(unknown)} unknown keys: "
            f"{_format_keys(unknown)}"
        )
    return out


def diffusers_to_original(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of ``original_to_diffusers``: attention linear weights go back to 1×1 convs."""
    levels = _num_levels(sd, ("encoder.down_blocks.", "decoder.up_blocks."))
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in sd.items():
        new = _rename(key, _DIFFUSERS_TO_ORIGINAL, levels)
        if new is None:
            unknown.append(key)
            continue
        if _ATTN_DIFFUSERS.match(key) and value.ndim == 2:
            value = value[:, :, None, None]
        out[new] = value
    if unknown:
        raise ValueError(
            f"not a Flux VAE state dict in the diffusers layout: {len(unknown)} unknown keys: "
            f"{_format_keys(unknown)}"
        )
    return out


def is_original_layout(sd: Mapping[str, Tensor]) -> bool:
    """True for BFL/ComfyUI names (``decoder.up.0.block.0…``), False for diffusers names."""
    prefixes = ("encoder.down.", "decoder.up.", "encoder.mid.", "decoder.mid.")
    return any(k.startswith(prefixes) for k in sd)


def _to_diffusers_layout(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return original_to_diffusers(sd) if is_original_layout(sd) else dict(sd)


def config_from_state_dict(sd: Mapping[str, Tensor], norm_num_groups: int = 32) -> VAEConfig:
    """Read the architecture off the weight shapes (either layout).

    The GroupNorm group count leaves no trace in the weights, so it is an argument (32 for the
    real Flux VAE).
    """
    sd = _to_diffusers_layout(sd)
    levels = _num_levels(sd, ("encoder.down_blocks.", "decoder.up_blocks."))
    needed = [
        "decoder.conv_in.weight",
        "decoder.conv_out.weight",
        "encoder.conv_in.weight",
        *(f"decoder.up_blocks.{i}.resnets.0.conv2.weight" for i in range(levels)),
    ]
    missing = [k for k in needed if k not in sd]
    if levels == 0 or missing:
        raise ValueError(
            "cannot read the VAE architecture: missing keys "
            f"{_format_keys(missing or ['decoder.up_blocks.0.resnets.0.conv2.weight'])}"
        )
    # Decoder level i runs at block_out_channels[levels - 1 - i].
    widths = [sd[f"decoder.up_blocks.{i}.resnets.0.conv2.weight"].shape[0] for i in range(levels)]
    resnets_per_up_block = len(
        {k.split(".")[4] for k in sd if k.startswith("decoder.up_blocks.0.resnets.")}
    )
    return VAEConfig(
        in_channels=sd["encoder.conv_in.weight"].shape[1],
        out_channels=sd["decoder.conv_out.weight"].shape[0],
        latent_channels=sd["decoder.conv_in.weight"].shape[1],
        block_out_channels=tuple(reversed(widths)),
        layers_per_block=resnets_per_up_block - 1,
        norm_num_groups=norm_num_groups,
    )


def load_vae(
    sd: Mapping[str, Tensor], config: VAEConfig | None = None, norm_num_groups: int = 32
) -> FluxVAE:
    """A ``FluxVAE`` holding the given weights (either layout), in their dtype and device.

    The model is built on the ``meta`` device and the checkpoint tensors are assigned, not
    copied, so loading needs no second copy of the weights. Missing or unexpected keys raise a
    ValueError that names them in the layout the caller used.
    """
    original = is_original_layout(sd)
    weights = _to_diffusers_layout(sd)
    if config is None:
        config = config_from_state_dict(weights, norm_num_groups)
    with torch.device("meta"):
        model = FluxVAE(config)
    expected = model.state_dict().keys()
    missing = expected - weights.keys()
    unexpected = weights.keys() - expected
    if missing or unexpected:
        layout = "original BFL/ComfyUI" if original else "diffusers"
        if original:
            levels = len(config.block_out_channels)
            missing = {_rename(k, _DIFFUSERS_TO_ORIGINAL, levels) or k for k in missing}
            unexpected = {_rename(k, _DIFFUSERS_TO_ORIGINAL, levels) or k for k in unexpected}
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {_format_keys(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_format_keys(unexpected)}")
        raise ValueError(f"Flux VAE state dict ({layout} layout) has " + "; ".join(parts))
    model.load_state_dict(weights, strict=True, assign=True)
    return model.eval()
