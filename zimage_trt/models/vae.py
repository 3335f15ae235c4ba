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
``zimage_trt.models.vae_keys`` translates the BFL/ComfyUI layout and loads a state dict. Forwards
take and return tensors only and read sizes from ``.shape`` alone, so every spatial and batch
axis stays symbolic under ``torch.export``.
"""

from __future__ import annotations

from dataclasses import dataclass

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
        return cls(block_out_channels=(16, 16, 32, 32), norm_num_groups=8)

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
        self.config = config
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
