"""The Flux VAE (``ae.safetensors``), compact and export-ready.

Z-Image uses the FLUX.1 autoencoder: an ``AutoencoderKL`` with 16 latent channels, levels of
(128, 256, 512, 512) channels, 2 resnets per encoder level (3 per decoder level), GroupNorm(32,
eps 1e-6) + SiLU, single-head self-attention in the middle blocks and no quant convs.

- ``VAEDecoder``: latents in VAE space [B, 16, h, w] → image [B, 3, 8h, 8w] in about [−1, 1],
  unclamped (the runtime applies ComfyUI's ``clamp((x + 1) / 2, 0, 1)``).
- ``VAEEncoder``: image [B, 3, H, W] in [−1, 1] → the posterior mean [B, 16, H/8, W/8]. ComfyUI's
  ``VAEEncode`` takes the mode (= mean) of the posterior, not a sample.

Neither applies the Flux latent format (shift 0.1159, scale 0.3611): the runtime's
``process_in`` / ``process_out`` do. Parameter names follow diffusers' ``AutoencoderKL``;
``original_to_diffusers`` / ``diffusers_to_original`` translate the BFL/ComfyUI layout. Forwards
take and return tensors only and read sizes from ``.shape`` alone, so every spatial and batch
axis stays symbolic under ``torch.export``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NORM_EPS = 1e-6  # every GroupNorm of this autoencoder


@dataclass(frozen=True)
class VAEConfig:
    """Architecture of the Flux VAE. Defaults are the real FLUX.1 ``ae.safetensors``."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    # The Flux latent format; recorded for the runtime, never applied inside this module.
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159

    @classmethod
    def tiny(cls) -> VAEConfig:
        """Same topology (4 levels, 16 latent channels, a shortcut conv) at test size."""
        return cls(block_out_channels=(32, 32, 64, 64), norm_num_groups=8)

    @property
    def downscale(self) -> int:
        """Pixels per latent element along each side (8 for 4 levels)."""
        return 2 ** (len(self.block_out_channels) - 1)


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=NORM_EPS)


class ResnetBlock(nn.Module):
    """norm → SiLU → conv → norm → SiLU → conv, plus a (1×1-projected when widths differ) skip."""

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Downsample(nn.Module):
    """Stride-2 3×3 conv after padding right and bottom by one (the LDM asymmetric padding)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest ×2 (an ONNX ``Resize``) followed by a 3×3 conv.

    The resize runs in fp32 whatever the dtype (nearest copies values, so this changes no number):
    TensorRT has no bf16 ``Resize``, and the exported graph then carries the casts around it.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x.float(), scale_factor=2.0, mode="nearest").to(x.dtype))


class MidAttention(nn.Module):
    """Single-head self-attention over all h·w positions, head dim = channels, residual added."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.group_norm = _group_norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # diffusers' ``to_out.0``

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # [B, h·w, C]
        q = self.to_q(tokens).unsqueeze(1)  # one head: [B, 1, h·w, C]
        k = self.to_k(tokens).unsqueeze(1)
        v = self.to_v(tokens).unsqueeze(1)
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        out = self.to_out[0](out)
        return x + out.transpose(1, 2).reshape(x.shape)


class MidBlock(nn.Module):
    """resnet → attention → resnet at the lowest resolution."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([MidAttention(channels, groups)])

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        x = self.attentions[0](x)
        return self.resnets[1](x)


class DownBlock(nn.Module):
    def __init__(
        self, in_channels: int, out_channels: int, num_resnets: int, groups: int, downsample: bool
    ) -> None:
        super().__init__()
        widths = [in_channels] + [out_channels] * num_resnets
        self.resnets = nn.ModuleList(
            [ResnetBlock(widths[i], widths[i + 1], groups) for i in range(num_resnets)]
        )
        self.downsamplers = nn.ModuleList([Downsample(out_channels)] if downsample else [])

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for down in self.downsamplers:
            x = down(x)
        return x


class UpBlock(nn.Module):
    def __init__(
        self, in_channels: int, out_channels: int, num_resnets: int, groups: int, upsample: bool
    ) -> None:
        super().__init__()
        widths = [in_channels] + [out_channels] * num_resnets
        self.resnets = nn.ModuleList(
            [ResnetBlock(widths[i], widths[i + 1], groups) for i in range(num_resnets)]
        )
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if upsample else [])

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for up in self.upsamplers:
            x = up(x)
        return x


class Encoder(nn.Module):
    """Image → posterior moments [B, 2·latent, H/8, W/8] (mean first, then log-variance)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        ch, groups = config.block_out_channels, config.norm_num_groups
        levels = len(ch)
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            [
                DownBlock(ch[max(i - 1, 0)], ch[i], config.layers_per_block, groups, i < levels - 1)
                for i in range(levels)
            ]
        )
        self.mid_block = MidBlock(ch[-1], groups)
        self.conv_norm_out = _group_norm(ch[-1], groups)
        self.conv_out = nn.Conv2d(ch[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latents [B, latent, h, w] → image [B, 3, 8h, 8w]."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        ch = tuple(reversed(config.block_out_channels))  # decoder runs widest level first
        groups, levels = config.norm_num_groups, len(ch)
        self.conv_in = nn.Conv2d(config.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], groups)
        # One resnet more per level than the encoder, as in the LDM/Flux decoder.
        self.up_blocks = nn.ModuleList(
            [
                UpBlock(
                    ch[max(i - 1, 0)],
                    ch[i],
                    config.layers_per_block + 1,
                    groups,
                    i < levels - 1,
                )
                for i in range(levels)
            ]
        )
        self.conv_norm_out = _group_norm(ch[-1], groups)
        self.conv_out = nn.Conv2d(ch[-1], config.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class FluxVAE(nn.Module):
    """The whole autoencoder; its state dict has exactly diffusers' ``AutoencoderKL`` keys."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def encode(self, image: Tensor) -> Tensor:
        """Posterior mean (= mode) in VAE space, without the Flux scale/shift."""
        return self.encoder(image)[:, : self.config.latent_channels]

    def decode(self, latents: Tensor) -> Tensor:
        """Image in about [−1, 1], unclamped."""
        return self.decoder(latents)


class VAEDecoder(nn.Module):
    """Export wrapper: ``latents`` [B, 16, h, w] → ``image`` [B, 3, 8h, 8w].

    Holds the shared ``decoder`` submodule, so its parameters keep their ``decoder.*`` names.
    """

    def __init__(self, vae: FluxVAE) -> None:
        super().__init__()
        self.decoder = vae.decoder

    def forward(self, latents: Tensor) -> Tensor:
        return self.decoder(latents)


class VAEEncoder(nn.Module):
    """Export wrapper: ``image`` [B, 3, H, W] → ``latents`` (posterior mean) [B, 16, H/8, W/8]."""

    def __init__(self, vae: FluxVAE) -> None:
        super().__init__()
        self.encoder = vae.encoder
        self.latent_channels = vae.config.latent_channels

    def forward(self, image: Tensor) -> Tensor:
        return self.encoder(image)[:, : self.latent_channels]


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
