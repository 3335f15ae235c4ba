"""The compact Flux VAE against diffusers' AutoencoderKL on the same (tiny, random) weights."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from torch import Tensor

from zimage_trt.models.vae import FluxVAE, VAEConfig, VAEDecoder, VAEEncoder
from zimage_trt.models.vae_keys import (
    config_from_state_dict,
    diffusers_to_original,
    is_original_layout,
    load_vae,
    original_to_diffusers,
)

# Reached: decode ≤ 6.5e-6, encode ≤ 7.5e-7. Not 0 because diffusers' attention hands a
# channels-last-strided tensor to the next conv, whose CPU kernel then sums in another order.
TOL = {"atol": 1e-5, "rtol": 0.0}


def diffusers_kwargs(config: VAEConfig) -> dict[str, object]:
    levels = len(config.block_out_channels)
    return {
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "down_block_types": ("DownEncoderBlock2D",) * levels,
        "up_block_types": ("UpDecoderBlock2D",) * levels,
        "block_out_channels": config.block_out_channels,
        "layers_per_block": config.layers_per_block,
        "latent_channels": config.latent_channels,
        "norm_num_groups": config.norm_num_groups,
        "scaling_factor": config.scaling_factor,
        "shift_factor": config.shift_factor,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "mid_block_add_attention": True,
    }


@pytest.fixture(scope="module")
def oracle() -> AutoencoderKL:
    torch.manual_seed(0)
    vae = AutoencoderKL(**diffusers_kwargs(VAEConfig.tiny())).eval()
    # Default init leaves every GroupNorm at weight 1, bias 0, which would hide a norm-key mix-up.
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return vae


@pytest.fixture(scope="module")
def diffusers_sd(oracle: AutoencoderKL) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in oracle.state_dict().items()}


@pytest.fixture(scope="module")
def ours(diffusers_sd: dict[str, Tensor]) -> FluxVAE:
    return load_vae(diffusers_sd, norm_num_groups=VAEConfig.tiny().norm_num_groups)


def test_config_read_off_the_weights(diffusers_sd: dict[str, Tensor]) -> None:
    tiny = VAEConfig.tiny()
    assert config_from_state_dict(diffusers_sd, norm_num_groups=8) == tiny
    assert config_from_state_dict(diffusers_to_original(diffusers_sd), norm_num_groups=8) == tiny
    assert tiny.downscale == 8 and tiny.latent_channels == 16


@pytest.mark.parametrize(("batch", "h", "w"), [(1, 4, 4), (2, 6, 10), (1, 5, 3)])
def test_decode_matches_diffusers(
    oracle: AutoencoderKL, ours: FluxVAE, batch: int, h: int, w: int
) -> None:
    torch.manual_seed(1)
    z = torch.randn(batch, 16, h, w)
    with torch.no_grad():
        ref = oracle.decode(z).sample
        got = VAEDecoder(ours)(z)
    assert got.shape == (batch, 3, 8 * h, 8 * w)
    torch.testing.assert_close(got, ref, **TOL)


@pytest.mark.parametrize(("batch", "height", "width"), [(2, 32, 32), (1, 40, 56)])
def test_encode_is_the_posterior_mean(
    oracle: AutoencoderKL, ours: FluxVAE, batch: int, height: int, width: int
) -> None:
    torch.manual_seed(2)
    image = torch.rand(batch, 3, height, width) * 2 - 1
    with torch.no_grad():
        posterior = oracle.encode(image).latent_dist
        got = VAEEncoder(ours)(image)
    assert got.shape == (batch, 16, height // 8, width // 8)
    torch.testing.assert_close(got, posterior.mode(), **TOL)
    torch.testing.assert_close(got, posterior.mean, **TOL)
    # The log-variance half is really dropped: the mean differs from the other half.
    assert not torch.allclose(posterior.mean, posterior.logvar)


def test_key_map_round_trip_is_exact(diffusers_sd: dict[str, Tensor]) -> None:
    original = diffusers_to_original(diffusers_sd)
    assert is_original_layout(original) and not is_original_layout(diffusers_sd)
    back = original_to_diffusers(original)
    assert back.keys() == diffusers_sd.keys()
    for key, value in diffusers_sd.items():
        assert back[key].shape == value.shape and torch.equal(back[key], value), key
    again = diffusers_to_original(back)
    assert again.keys() == original.keys()
    assert all(torch.equal(again[k], v) for k, v in original.items())


def test_key_map_names(diffusers_sd: dict[str, Tensor]) -> None:
    original = diffusers_to_original(diffusers_sd)
    # The decoder's levels are numbered in opposite orders; up.0 is the full-resolution level.
    pairs = {
        "decoder.up.0.block.2.conv1.weight": "decoder.up_blocks.3.resnets.2.conv1.weight",
        "decoder.up.3.block.0.norm1.bias": "decoder.up_blocks.0.resnets.0.norm1.bias",
        "decoder.up.1.upsample.conv.weight": "decoder.up_blocks.2.upsamplers.0.conv.weight",
        "decoder.up.1.block.0.nin_shortcut.weight": (
            "decoder.up_blocks.2.resnets.0.conv_shortcut.weight"
        ),
        "encoder.down.2.block.0.nin_shortcut.bias": (
            "encoder.down_blocks.2.resnets.0.conv_shortcut.bias"
        ),
        "encoder.down.0.downsample.conv.weight": "encoder.down_blocks.0.downsamplers.0.conv.weight",
        "encoder.mid.block_2.conv2.weight": "encoder.mid_block.resnets.1.conv2.weight",
        "decoder.mid.attn_1.norm.weight": "decoder.mid_block.attentions.0.group_norm.weight",
        "decoder.mid.attn_1.proj_out.bias": "decoder.mid_block.attentions.0.to_out.0.bias",
        "decoder.norm_out.weight": "decoder.conv_norm_out.weight",
    }
    for old, new in pairs.items():
        assert torch.equal(original[old], diffusers_sd[new]), old
    assert "encoder.down.3.downsample.conv.weight" not in original  # lowest level: no downsample
    assert "decoder.up.0.upsample.conv.weight" not in original  # full resolution: no upsample
    for proj, lin in [("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")]:
        conv = original[f"encoder.mid.attn_1.{proj}.weight"]
        width = VAEConfig.tiny().block_out_channels[-1]  # the mid block's, 32
        assert conv.shape == (width, width, 1, 1) == (32, 32, 1, 1)
        assert torch.equal(
            conv[:, :, 0, 0], diffusers_sd[f"encoder.mid_block.attentions.0.{lin}.weight"]
        )


def test_key_map_agrees_with_diffusers_single_file_converter(
    oracle: AutoencoderKL, diffusers_sd: dict[str, Tensor]
) -> None:
    # diffusers' own LDM → diffusers VAE conversion is an independent oracle for the map.
    converted = convert_ldm_vae_checkpoint(diffusers_to_original(diffusers_sd), oracle.config)
    assert converted.keys() == diffusers_sd.keys()
    assert all(torch.equal(converted[k], v) for k, v in diffusers_sd.items())


def test_original_layout_loads_to_identical_outputs(
    ours: FluxVAE, diffusers_sd: dict[str, Tensor]
) -> None:
    from_original = load_vae(diffusers_to_original(diffusers_sd), norm_num_groups=8)
    torch.manual_seed(3)
    z = torch.randn(2, 16, 6, 10)
    image = torch.rand(1, 3, 40, 24) * 2 - 1
    with torch.no_grad():
        assert torch.equal(from_original.decode(z), ours.decode(z))
        assert torch.equal(from_original.encode(image), ours.encode(image))


def test_real_config_has_diffusers_flux_names_and_shapes() -> None:
    with torch.device("meta"):
        ref = AutoencoderKL(**diffusers_kwargs(VAEConfig()))
        ours = FluxVAE(VAEConfig())
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert our_shapes == ref_shapes
    assert len(our_shapes) == 244
    assert sum(v.numel() for v in ours.state_dict().values()) == 83_819_683
    assert config_from_state_dict(ours.state_dict()) == VAEConfig()
    original = diffusers_to_original(ours.state_dict())
    assert tuple(original["decoder.mid.attn_1.q.weight"].shape) == (512, 512, 1, 1)
    assert tuple(original["decoder.up.3.upsample.conv.weight"].shape) == (512, 512, 3, 3)
    assert tuple(original["decoder.up.0.block.0.nin_shortcut.weight"].shape) == (128, 256, 1, 1)


def test_missing_keys_are_named(diffusers_sd: dict[str, Tensor]) -> None:
    partial = dict(diffusers_sd)
    del partial["decoder.mid_block.attentions.0.to_q.weight"]
    del partial["encoder.down_blocks.1.resnets.1.norm2.bias"]
    with pytest.raises(ValueError, match="diffusers layout") as err:
        load_vae(partial, norm_num_groups=8)
    assert str(err.value) == (
        "Flux VAE state dict (diffusers layout) has 2 missing keys: "
        "decoder.mid_block.attentions.0.to_q.weight, encoder.down_blocks.1.resnets.1.norm2.bias"
    )

    original = diffusers_to_original(diffusers_sd)
    del original["decoder.up.0.block.2.conv1.weight"]
    with pytest.raises(ValueError) as err:
        load_vae(original, norm_num_groups=8)
    assert str(err.value) == (
        "Flux VAE state dict (original BFL/ComfyUI layout) has 1 missing keys: "
        "decoder.up.0.block.2.conv1.weight"
    )


def test_foreign_keys_are_named(diffusers_sd: dict[str, Tensor]) -> None:
    original = diffusers_to_original(diffusers_sd)
    original["quant_conv.weight"] = torch.zeros(32, 32, 1, 1)  # an SD-style VAE, not Flux
    with pytest.raises(ValueError, match=r"1 unknown keys: quant_conv\.weight$"):
        load_vae(original, norm_num_groups=8)
    extra = dict(diffusers_sd)
    extra["post_quant_conv.bias"] = torch.zeros(16)
    with pytest.raises(ValueError, match=r"1 unexpected keys: post_quant_conv\.bias$"):
        load_vae(extra, norm_num_groups=8)


def test_exported_decoder_runs_at_another_shape(ours: FluxVAE) -> None:
    decoder = VAEDecoder(ours).eval()
    batch, h, w = torch.export.Dim("batch", max=8), torch.export.Dim("h"), torch.export.Dim("w")
    torch.manual_seed(4)
    example = torch.randn(2, 16, 4, 6)  # batch 1 would be specialised (0/1 rule)
    program = torch.export.export(
        decoder, (example,), dynamic_shapes={"latents": {0: batch, 2: h, 3: w}}
    )
    other = torch.randn(3, 16, 7, 5)
    with torch.no_grad():
        got = program.module()(other)
        want = decoder(other)
    assert got.shape == (3, 3, 56, 40)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0.0)


def test_exported_encoder_runs_at_another_shape(ours: FluxVAE) -> None:
    encoder = VAEEncoder(ours).eval()
    h, w = torch.export.Dim("h", min=2, max=256), torch.export.Dim("w", min=2, max=256)
    torch.manual_seed(5)
    example = torch.rand(1, 3, 32, 48) * 2 - 1
    program = torch.export.export(
        encoder, (example,), dynamic_shapes={"image": {2: 8 * h, 3: 8 * w}}
    )
    other = torch.rand(1, 3, 56, 24) * 2 - 1
    with torch.no_grad():
        got = program.module()(other)
        want = encoder(other)
    assert got.shape == (1, 16, 7, 3)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0.0)
