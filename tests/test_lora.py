"""LoRA fusion into the DiT's original-layout weights: ComfyUI's key names and math, and
diffusers' Z-Image LoRA conversion as the oracle for the formats both understand."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import torch
from diffusers import ZImageTransformer2DModel
from diffusers.loaders.lora_pipeline import ZImageLoraLoaderMixin
from safetensors.torch import save_file
from torch import Tensor

from zimage_trt.models.dit import DiTConfig, ZImageDiT
from zimage_trt.models.dit_keys import diffusers_to_original, original_to_diffusers
from zimage_trt.models.lora import (
    TEXT_ENCODER_PREFIX,
    LoRA,
    LoraMatchError,
    fuse_loras,
    load_lora,
    lora_fingerprint,
    split_text_encoder,
)

TINY = DiTConfig.tiny()
DIM = TINY.dim
QKV = "layers.0.attention.qkv.weight"
RANK = 4

# (up suffix, down suffix) of every weight-pair family ComfyUI reads
FAMILIES = [
    (".lora_up.weight", ".lora_down.weight"),
    ("_lora.up.weight", "_lora.down.weight"),
    (".lora_B.weight", ".lora_A.weight"),
    (".lora.up.weight", ".lora.down.weight"),
    (".lora_B", ".lora_A"),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
    (".lora_B.default.weight", ".lora_A.default.weight"),
]

# LoRA base name → (patched key, row block) in every naming scheme
NAMES: list[tuple[str, str, tuple[int, int] | None]] = [
    ("diffusion_model.layers.1.feed_forward.w2", "layers.1.feed_forward.w2.weight", None),
    ("diffusion_model.layers.0.attention.qkv", QKV, None),
    (
        "lora_unet_noise_refiner_0_adaLN_modulation_0",
        "noise_refiner.0.adaLN_modulation.0.weight",
        None,
    ),
    ("lora_unet_layers_1_attention_qkv", "layers.1.attention.qkv.weight", None),
    ("lora_unet_final_layer_linear", "final_layer.linear.weight", None),
    ("layers.0.attention.out", "layers.0.attention.out.weight", None),  # bare original
    ("x_embedder", "x_embedder.weight", None),
    ("cap_embedder.1", "cap_embedder.1.weight", None),
    ("transformer.layers.0.attention.to_k", QKV, (DIM, DIM)),
    ("diffusion_model.layers.1.attention.to_q", "layers.1.attention.qkv.weight", (0, DIM)),
    (
        "lycoris_context_refiner_1_attention_to_v",
        "context_refiner.1.attention.qkv.weight",
        (2 * DIM, DIM),
    ),
    ("noise_refiner.1.attention.to_v", "noise_refiner.1.attention.qkv.weight", (2 * DIM, DIM)),
    ("noise_refiner.1.attention.to_out.0", "noise_refiner.1.attention.out.weight", None),
    (
        "transformer.all_final_layer.2-1.adaLN_modulation.1",
        "final_layer.adaLN_modulation.1.weight",
        None,
    ),
    ("lycoris_all_x_embedder_2-1", "x_embedder.weight", None),
    ("diffusion_model.t_embedder.mlp.2", "t_embedder.mlp.2.weight", None),
]


@pytest.fixture(scope="module")
def base() -> dict[str, Tensor]:
    """Random tiny-DiT weights (fp32), norms and pad tokens included."""
    torch.manual_seed(0)
    weights = {k: v.detach().clone() for k, v in ZImageDiT(TINY).state_dict().items()}
    for key, value in weights.items():
        if value.ndim == 1 or key.endswith("pad_token"):
            value.copy_(1.0 + 0.2 * torch.randn_like(value))
    return weights


def _pair(out_dim: int, in_dim: int, seed: int, rank: int = RANK) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_dim, rank, generator=g), torch.randn(rank, in_dim, generator=g) * 0.1


def _rows(shape: torch.Size, rows: tuple[int, int] | None) -> tuple[int, int]:
    return (shape[0], shape[1]) if rows is None else (rows[1], shape[1])


def _expected(
    weight: Tensor, rows: tuple[int, int] | None, up: Tensor, down: Tensor, factor: float
) -> Tensor:
    """W + factor · (up @ down) on the row block, in float32."""
    out = weight.clone()
    block = out if rows is None else out[rows[0] : rows[0] + rows[1]]
    block += factor * (up @ down)
    return out


@pytest.mark.parametrize("family", FAMILIES, ids=[f[0] for f in FAMILIES])
@pytest.mark.parametrize(("name", "key", "rows"), NAMES, ids=[n[0] for n in NAMES])
def test_every_name_and_suffix_patches_its_weight_exactly(
    base: dict[str, Tensor],
    family: tuple[str, str],
    name: str,
    key: str,
    rows: tuple[int, int] | None,
) -> None:
    up, down = _pair(*_rows(base[key].shape, rows), seed=len(name))
    tensors = {name + family[0]: up, name + family[1]: down}
    with_alpha = FAMILIES.index(family) % 2 == 0
    if with_alpha:
        tensors[name + ".alpha"] = torch.tensor(2.0)
    fused = fuse_loras(base, [(load_lora(tensors), 0.75)])

    assert list(fused) == [key]  # nothing else changes
    factor = 0.75 * (2.0 / RANK if with_alpha else 1.0)
    assert torch.equal(fused[key], _expected(base[key], rows, up, down, factor))


def test_full_deltas_and_prefixed_weights(base: dict[str, Tensor]) -> None:
    g = torch.Generator().manual_seed(1)
    norm_k = "layers.1.attention.k_norm.weight"
    bias = "final_layer.linear.bias"
    tensors = {
        "transformer.layers.1.attention.norm_k.diff": torch.randn(TINY.head_dim, generator=g),
        "diffusion_model.x_pad_token.diff": torch.randn(1, DIM, generator=g),
        "diffusion_model.final_layer.linear.diff_b": torch.randn(TINY.patch_dim, generator=g),
        "lora_unet_layers_0_ffn_norm1.w_norm": torch.randn(DIM, generator=g),
    }
    # ComfyUI's own files prefix every key; the result keeps the caller's keys
    prefixed = {"model.diffusion_model." + k: v for k, v in base.items()}
    fused = fuse_loras(prefixed, [(load_lora(tensors), -0.5)])

    expected = {
        norm_k: "transformer.layers.1.attention.norm_k.diff",
        "x_pad_token": "diffusion_model.x_pad_token.diff",
        bias: "diffusion_model.final_layer.linear.diff_b",
        "layers.0.ffn_norm1.weight": "lora_unet_layers_0_ffn_norm1.w_norm",
    }
    assert sorted(fused) == sorted("model.diffusion_model." + k for k in expected)
    for key, lora_key in expected.items():
        want = base[key] + -0.5 * tensors[lora_key]
        assert torch.equal(fused["model.diffusion_model." + key], want), key


def _diffusers_fused(base: dict[str, Tensor], tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The LoRA converted by diffusers' Z-Image loader and merged into diffusers'
    ZImageTransformer2DModel as PEFT merges it (W += B @ A; the conversion folds alpha into A
    and B and diffusers then loads with scale 1), converted back to the original layout."""
    model = ZImageTransformer2DModel(
        all_patch_size=(TINY.patch_size,),
        all_f_patch_size=(1,),
        in_channels=TINY.in_channels,
        dim=TINY.dim,
        n_layers=TINY.n_layers,
        n_refiner_layers=TINY.n_refiner_layers,
        n_heads=TINY.n_heads,
        n_kv_heads=TINY.n_heads,
        norm_eps=TINY.norm_eps,
        qk_norm=TINY.qk_norm,
        cap_feat_dim=TINY.cap_feat_dim,
        rope_theta=TINY.rope_theta,
        t_scale=TINY.t_scale,
        axes_dims=list(TINY.axes_dims),
        axes_lens=list(TINY.axes_lens),
    )
    model.load_state_dict({k: v.clone() for k, v in original_to_diffusers(base).items()})
    converted = ZImageLoraLoaderMixin.lora_state_dict(dict(tensors))
    a_keys = [k for k in converted if k.endswith(".lora_A.weight")]
    assert len(a_keys) * 2 == len(converted)
    with torch.no_grad():
        for a_key in a_keys:
            module = a_key.removeprefix("transformer.").removesuffix(".lora_A.weight")
            b = converted[a_key.replace(".lora_A.", ".lora_B.")]
            model.get_submodule(module).weight += b @ converted[a_key]
    return diffusers_to_original(model.state_dict())


def _parity_loras(base: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    shapes = {k: v.shape for k, v in base.items()}
    out: dict[str, dict[str, Tensor]] = {}

    kohya: dict[str, Tensor] = {}  # original module names, as kohya/sd-scripts write them
    for i, path in enumerate(
        ["layers.0.attention.out", "layers.1.feed_forward.w2", "noise_refiner.0.adaLN_modulation.0",
         "context_refiner.1.feed_forward.w3", "cap_embedder.1", "t_embedder.mlp.2"]
    ):  # fmt: skip
        name = "lora_unet_" + path.replace(".", "_")
        up, down = _pair(*shapes[path + ".weight"], seed=10 + i, rank=RANK + i % 2)
        kohya |= {f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down}
        kohya[f"{name}.alpha"] = torch.tensor(float(3 + i))
    out["kohya lora_unet + alpha"] = kohya

    diffusers_alpha: dict[str, Tensor] = {}  # diffusers module names, peft lora_A/lora_B
    diffusers_plain: dict[str, Tensor] = {}
    for i, (name, key) in enumerate(
        [("layers.0.attention.to_q", QKV), ("layers.0.attention.to_k", QKV),
         ("layers.1.attention.to_v", "layers.1.attention.qkv.weight"),
         ("noise_refiner.1.attention.to_out.0", "noise_refiner.1.attention.out.weight"),
         ("all_x_embedder.2-1", "x_embedder.weight"),
         ("all_final_layer.2-1.linear", "final_layer.linear.weight"),
         ("all_final_layer.2-1.adaLN_modulation.1", "final_layer.adaLN_modulation.1.weight")]
    ):  # fmt: skip
        up, down = _pair(*_rows(shapes[key], (0, DIM) if "to_" in name else None), seed=20 + i)
        diffusers_alpha |= {f"{name}.lora_B.weight": up, f"{name}.lora_A.weight": down}
        diffusers_alpha[f"{name}.alpha"] = torch.tensor(1.5 * (i + 1))
        up, down = _pair(*_rows(shapes[key], (0, DIM) if "to_" in name else None), seed=30 + i)
        diffusers_plain |= {
            f"transformer.{name}.lora_B.weight": up,
            f"transformer.{name}.lora_A.weight": down,
        }
    out["diffusers lora_A/B + alpha"] = diffusers_alpha
    out["diffusers transformer. lora_A/B"] = diffusers_plain

    # dot format with a fused qkv LoRA: diffusers splits B in three, ComfyUI patches qkv whole
    up, down = _pair(3 * DIM, DIM, seed=40)
    stem = "diffusion_model.context_refiner.0.attention.qkv"
    out["dot-format fused qkv"] = {
        f"{stem}.lora.up.weight": up,
        f"{stem}.lora.down.weight": down,
        f"{stem}.alpha": torch.tensor(8.0),
    }
    return out


@pytest.mark.parametrize(
    "fmt",
    [
        "kohya lora_unet + alpha",
        "diffusers lora_A/B + alpha",
        "diffusers transformer. lora_A/B",
        "dot-format fused qkv",
    ],
)
def test_matches_diffusers_conversion(base: dict[str, Tensor], fmt: str) -> None:
    tensors = _parity_loras(base)[fmt]
    fused = fuse_loras(base, [(load_lora(tensors), 1.0)])
    reference = _diffusers_fused(base, tensors)

    changed = {k for k in reference if not torch.equal(reference[k], base[k])}
    assert changed == set(fused)
    for key in fused:
        # diffusers scales A and B separately (alpha folded in), ComfyUI scales their product:
        # the same up to fp32 rounding (max |Δ| seen: 2.4e-7, one ulp of the largest weights)
        torch.testing.assert_close(fused[key], reference[key], atol=1e-6, rtol=0, msg=key)


def test_strengths_and_several_loras_in_order(base: dict[str, Tensor]) -> None:
    w1 = "layers.1.feed_forward.w1.weight"
    up1, down1 = _pair(DIM, DIM, seed=1)
    up2, down2 = _pair(*base[w1].shape, seed=2)
    up3, down3 = _pair(3 * DIM, DIM, seed=3)
    up4, down4 = _pair(*base[w1].shape, seed=4)
    first = load_lora({
        "transformer.layers.0.attention.to_v.lora_A.weight": down1,
        "transformer.layers.0.attention.to_v.lora_B.weight": up1,
        "diffusion_model.layers.1.feed_forward.w1.lora_A.weight": down2,
        "diffusion_model.layers.1.feed_forward.w1.lora_B.weight": up2,
    })  # fmt: skip
    second = load_lora({
        "lora_unet_layers_0_attention_qkv.lora_down.weight": down3,
        "lora_unet_layers_0_attention_qkv.lora_up.weight": up3,
        "lora_unet_layers_0_attention_qkv.alpha": torch.tensor(2.0),
        "lora_unet_layers_1_feed_forward_w1.lora_down.weight": down4,
        "lora_unet_layers_1_feed_forward_w1.lora_up.weight": up4,
    })  # fmt: skip
    fused = fuse_loras(base, [(first, 0.5), (second, -1.25)])

    qkv = _expected(base[QKV], (2 * DIM, DIM), up1, down1, 0.5)
    qkv = _expected(qkv, None, up3, down3, -1.25 * 2.0 / RANK)
    ffn = _expected(_expected(base[w1], None, up2, down2, 0.5), None, up4, down4, -1.25)
    assert sorted(fused) == sorted([QKV, w1])
    assert torch.equal(fused[QKV], qkv)
    assert torch.equal(fused[w1], ffn)
    # strength 0 skips a LoRA, as ComfyUI's loader does
    assert fuse_loras(base, [(first, 0.0)]) == {}


def test_float16_merge_is_comfyui_gpu_rounding(base: dict[str, Tensor]) -> None:
    bf16 = {k: v.to(torch.bfloat16) for k, v in base.items()}
    w2 = "layers.0.feed_forward.w2.weight"
    up1, down1 = _pair(*base[w2].shape, seed=5)
    up2, down2 = _pair(*base[w2].shape, seed=6)
    loras = [
        (load_lora({"diffusion_model.layers.0.feed_forward.w2.lora_up.weight": up1,
                    "diffusion_model.layers.0.feed_forward.w2.lora_down.weight": down1,
                    "diffusion_model.layers.0.feed_forward.w2.alpha": torch.tensor(3.0)}), 0.8),
        (load_lora({"layers.0.feed_forward.w2.lora_B.weight": up2,
                    "layers.0.feed_forward.w2.lora_A.weight": down2}), 0.3),
    ]  # fmt: skip
    delta1 = (0.8 * (3.0 / RANK)) * (up1 @ down1)
    delta2 = 0.3 * (up2 @ down2)

    gpu = fuse_loras(bf16, loras)[w2]  # the default for bf16 weights
    assert torch.equal(gpu, fuse_loras(bf16, loras, merge_dtype="float16")[w2])
    half = bf16[w2].to(torch.float16)
    half += delta1.to(torch.float16)
    half += delta2.to(torch.float16)
    assert gpu.dtype == torch.bfloat16
    assert torch.equal(gpu, half.to(torch.bfloat16))  # bf16(fp16(W) + fp16(Δ1) + fp16(Δ2))

    cpu = fuse_loras(bf16, loras, merge_dtype="float32")[w2]
    assert torch.equal(cpu, (bf16[w2].float() + delta1 + delta2).to(torch.bfloat16))
    differ = (gpu != cpu).sum().item()
    assert 0 < differ < gpu.numel() // 4  # double rounding moves a few elements by one ulp


def test_whole_weight_before_row_blocks_as_comfyui(base: dict[str, Tensor]) -> None:
    """ComfyUI applies a LoRA's fused-qkv patch before its to_q/to_k/to_v blocks, whatever the
    file order; in float16 the order shows in the rounding."""
    bf16 = {k: v.to(torch.bfloat16) for k, v in base.items()}
    up_k, down_k = _pair(DIM, DIM, seed=16)
    up_qkv, down_qkv = _pair(3 * DIM, DIM, seed=17)
    tensors = {  # the row block first in the file
        "transformer.layers.0.attention.to_k.lora_B.weight": up_k,
        "transformer.layers.0.attention.to_k.lora_A.weight": down_k,
        "diffusion_model.layers.0.attention.qkv.lora_B.weight": up_qkv,
        "diffusion_model.layers.0.attention.qkv.lora_A.weight": down_qkv,
    }
    fused = fuse_loras(bf16, [(load_lora(tensors), 1.0)])[QKV]

    whole_first = bf16[QKV].to(torch.float16)
    whole_first += (up_qkv @ down_qkv).to(torch.float16)
    whole_first[DIM : 2 * DIM] += (up_k @ down_k).to(torch.float16)
    block_first = bf16[QKV].to(torch.float16)
    block_first[DIM : 2 * DIM] += (up_k @ down_k).to(torch.float16)
    block_first += (up_qkv @ down_qkv).to(torch.float16)
    assert torch.equal(fused, whole_first.to(torch.bfloat16))
    assert not torch.equal(fused, block_first.to(torch.bfloat16))


def test_unmatched_keys_error_and_ignore(base: dict[str, Tensor]) -> None:
    up, down = _pair(DIM, DIM, seed=7)
    tensors = {
        "diffusion_model.layers.0.attention.out.lora_up.weight": up,
        "diffusion_model.layers.0.attention.out.lora_down.weight": down,
        # kohya names on diffusers modules are not ComfyUI names
        "lora_unet_layers_0_attention_to_q.lora_up.weight": up,
        "lora_unet_layers_0_attention_to_q.lora_down.weight": down,
        "lora_unet_layers_0_attention_to_q.alpha": torch.tensor(4.0),
        "diffusion_model.layers.9.attention.out.lora_A.weight": down,  # no such block
        "diffusion_model.layers.0.attention.out.scale": torch.tensor(1.0),  # unknown suffix
        "text_encoders.qwen3_4b.transformer.model.layers.0.self_attn.q_proj.lora_A.weight": down,
    }
    lora = load_lora(tensors)
    with pytest.raises(LoraMatchError) as info:
        fuse_loras(base, [(lora, 1.0)])
    assert str(info.value) == (
        "LoRA '<state dict>': 5 key(s) match no DiT weight: "
        "diffusion_model.layers.0.attention.out.scale, "
        "diffusion_model.layers.9.attention.out.lora_A.weight, "
        "lora_unet_layers_0_attention_to_q.alpha, "
        "lora_unet_layers_0_attention_to_q.lora_down.weight, "
        "lora_unet_layers_0_attention_to_q.lora_up.weight\n"
        "LoRA '<state dict>': 1 text-encoder key(s) but no text-encoder weights: "
        "text_encoders.qwen3_4b.transformer.model.layers.0.self_attn.q_proj.lora_A.weight\n"
        "(kohya names built on diffusers module names, such as "
        "lora_unet_layers_0_attention_to_q, are not ComfyUI names: ComfyUI skips them too)\n"
        "pass --lora-ignore-unmatched to skip them"
    )
    assert isinstance(info.value, ValueError)
    assert len(info.value.unmatched["<state dict>"]) == 6

    fused = fuse_loras(base, [(lora, 1.0)], ignore_unmatched=True)
    out = "layers.0.attention.out.weight"
    assert list(fused) == [out]
    assert torch.equal(fused[out], _expected(base[out], None, up, down, 1.0))


def test_unmatched_list_is_sorted_and_truncated(base: dict[str, Tensor]) -> None:
    tensors = {f"diffusion_model.missing_{i:02d}.diff": torch.zeros(1) for i in range(23)}
    with pytest.raises(LoraMatchError) as info:
        fuse_loras(base, [(LoRA("many.safetensors", tensors, "0" * 64), 1.0)])
    listed = ", ".join(f"diffusion_model.missing_{i:02d}.diff" for i in range(20))
    assert str(info.value) == (
        f"LoRA 'many.safetensors': 23 key(s) match no DiT weight: {listed} … (+3 more)\n"
        "pass --lora-ignore-unmatched to skip them"
    )


def test_text_encoder_keys_patch_given_text_encoder_weights(base: dict[str, Tensor]) -> None:
    te = {"model.layers.0.self_attn.q_proj.weight": torch.randn(16, 8)}
    up, down = _pair(16, 8, seed=8)
    te_key = "text_encoders.transformer.model.layers.0.self_attn.q_proj"
    tensors = {f"{te_key}.lora_up.weight": up, f"{te_key}.lora_down.weight": down}
    lora = load_lora(tensors)
    fused = fuse_loras(base, [(lora, 1.0, 0.25)], text_encoder_weights=te)

    dit, text_encoder = split_text_encoder(fused)
    assert dit == {}
    assert list(fused) == [TEXT_ENCODER_PREFIX + "model.layers.0.self_attn.q_proj.weight"]
    want = _expected(te["model.layers.0.self_attn.q_proj.weight"], None, up, down, 0.25)
    assert torch.equal(text_encoder["model.layers.0.self_attn.q_proj.weight"], want)
    # a key the text encoder lacks is reported on its own line
    missing = {"text_encoders.transformer.model.layers.7.mlp.up_proj.diff": torch.zeros(1)}
    with pytest.raises(
        LoraMatchError, match=r"1 text-encoder key\(s\) match no text-encoder weight"
    ):
        fuse_loras(base, [(load_lora(missing), 1.0)], text_encoder_weights=te)


def test_shape_and_format_errors(base: dict[str, Tensor]) -> None:
    up, down = _pair(DIM, DIM, seed=9)
    wrong = {  # a to_q LoRA the size of the whole qkv
        "transformer.layers.0.attention.to_q.lora_B.weight": torch.zeros(3 * DIM, RANK),
        "transformer.layers.0.attention.to_q.lora_A.weight": down,
    }
    with pytest.raises(ValueError) as info:
        fuse_loras(base, [(load_lora(wrong), 1.0)])
    assert str(info.value) == (
        "LoRA '<state dict>' key 'transformer.layers.0.attention.to_q': up (192, 4) @ down "
        "(4, 64) does not fit 'layers.0.attention.qkv.weight' rows 0:64 of shape (64, 64)"
    )
    bad_diff = {"diffusion_model.layers.0.ffn_norm2.diff": torch.zeros(DIM + 1)}
    with pytest.raises(ValueError, match=r"delta of shape \(65,\) does not fit"):
        fuse_loras(base, [(load_lora(bad_diff), 1.0)])
    lone = {"diffusion_model.layers.0.attention.out.lora_up.weight": up}
    with pytest.raises(
        ValueError,
        match=re.escape("has no 'diffusion_model.layers.0.attention.out.lora_down.weight'"),
    ):
        fuse_loras(base, [(load_lora(lone), 1.0)])
    loha = {"lora_unet_layers_0_attention_out.hada_w1_a": up}
    with pytest.raises(ValueError, match="is a LoHa adapter, which is not supported"):
        fuse_loras(base, [(load_lora(loha), 1.0)])
    up, down = _pair(*base["layers.0.feed_forward.w1.weight"].shape, seed=10)
    twice = {  # one module under two names: ComfyUI would keep one of them silently
        "transformer.layers.0.feed_forward.w1.lora_B.weight": up,
        "transformer.layers.0.feed_forward.w1.lora_A.weight": down,
        "lora_unet_layers_0_feed_forward_w1.lora_up.weight": up,
        "lora_unet_layers_0_feed_forward_w1.lora_down.weight": down,
    }
    with pytest.raises(
        ValueError, match=re.escape("patches 'layers.0.feed_forward.w1.weight' twice")
    ):
        fuse_loras(base, [(load_lora(twice), 1.0)])


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_dora_follows_comfyui_weight_decompose(base: dict[str, Tensor], strength: float) -> None:
    """Output axis: ComfyUI normalises by the original rows; input axis: by the patched
    columns. W' = W + s·((W + aΔ)·m/(‖·‖ + eps) − W)."""
    g = torch.Generator().manual_seed(11)
    up, down = _pair(DIM, DIM, seed=12)
    rows_scale = 1.0 + 0.1 * torch.randn(DIM, 1, generator=g)
    cols_scale = 1.0 + 0.1 * torch.randn(1, DIM, generator=g)
    tensors = {
        "transformer.layers.1.attention.to_k.lora_A.weight": down,
        "transformer.layers.1.attention.to_k.lora_B.weight": up,
        "transformer.layers.1.attention.to_k.alpha": torch.tensor(2.0),
        "transformer.layers.1.attention.to_k.dora_scale": rows_scale,
        "diffusion_model.layers.1.attention.out.lora_A.weight": down,
        "diffusion_model.layers.1.attention.out.lora_B.weight": up,
        "diffusion_model.layers.1.attention.out.dora_scale": cols_scale,
    }
    fused = fuse_loras(base, [(load_lora(tensors), strength)])
    eps = torch.finfo(torch.float32).eps

    qkv = "layers.1.attention.qkv.weight"
    w = base[qkv][DIM : 2 * DIM]
    patched = w + (up @ down) * (2.0 / RANK)
    scaled = patched * (rows_scale / (w.norm(dim=1, keepdim=True) + eps))
    want = base[qkv].clone()
    want[DIM : 2 * DIM] = scaled if strength == 1.0 else w + strength * (scaled - w)
    torch.testing.assert_close(fused[qkv], want, atol=1e-6, rtol=0)

    out = "layers.1.attention.out.weight"
    w = base[out]
    patched = w + up @ down
    scaled = patched * (cols_scale / (patched.norm(dim=0, keepdim=True) + eps))
    want = scaled if strength == 1.0 else w + strength * (scaled - w)
    torch.testing.assert_close(fused[out], want, atol=1e-6, rtol=0)


def test_locon_mid_on_a_conv_weight() -> None:
    g = torch.Generator().manual_seed(13)
    weights = {"conv.weight": torch.randn(8, 6, 3, 3, generator=g)}
    up = torch.randn(8, 3, 1, 1, generator=g)
    mid = torch.randn(3, 3, 3, 3, generator=g)
    down = torch.randn(3, 6, 1, 1, generator=g)
    tensors = {
        "diffusion_model.conv.lora_up.weight": up,
        "diffusion_model.conv.lora_mid.weight": mid,
        "diffusion_model.conv.lora_down.weight": down,
        "diffusion_model.conv.alpha": torch.tensor(1.5),
    }
    fused = fuse_loras(weights, [(load_lora(tensors), 0.5)])
    # Tucker product: Δ[o, i, h, w] = Σ_r,s up[o, r] mid[r, s, h, w] down[s, i]
    delta = torch.einsum("or,rshw,si->oihw", up[:, :, 0, 0], mid, down[:, :, 0, 0])
    # alpha / rank = 1.5 / 3, times strength 0.5
    torch.testing.assert_close(fused["conv.weight"], weights["conv.weight"] + 0.25 * delta)
    assert not torch.equal(fused["conv.weight"], weights["conv.weight"])


def test_safetensors_file_round_trip_and_fingerprint(
    base: dict[str, Tensor], tmp_path: Path
) -> None:
    up, down = _pair(*base["layers.1.feed_forward.w3.weight"].shape, seed=14)
    tensors = {
        "lora_unet_layers_1_feed_forward_w3.lora_up.weight": up.to(torch.bfloat16),
        "lora_unet_layers_1_feed_forward_w3.lora_down.weight": down.to(torch.bfloat16),
        "lora_unet_layers_1_feed_forward_w3.alpha": torch.tensor(2.0, dtype=torch.bfloat16),
    }
    path = tmp_path / "style.safetensors"
    save_file(tensors, path)
    from_file = load_lora(path)
    from_dict = load_lora(tensors)

    assert from_file.name == "style.safetensors"
    assert from_file.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert sorted(from_file.tensors) == sorted(tensors)
    a = fuse_loras(base, [(from_file, 0.7)])
    b = fuse_loras(base, [(from_dict, 0.7)])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    assert lora_fingerprint([(from_file, 0.7)]) == lora_fingerprint([(load_lora(path), 0.7)])
    prints = {
        lora_fingerprint([(from_file, 0.7)]),
        lora_fingerprint([(from_file, 0.7000001)]),
        lora_fingerprint([(from_file, 0.7), (from_dict, 1.0)]),
        lora_fingerprint([(from_dict, 1.0), (from_file, 0.7)]),
        lora_fingerprint([(from_file, 0.7)], merge_dtype="float32"),
    }
    assert len(prints) == 5
    with pytest.raises(ValueError, match=r"only \.safetensors"):
        load_lora(tmp_path / "style.ckpt")


def test_inputs_are_not_modified(base: dict[str, Tensor]) -> None:
    before = {k: v.clone() for k, v in base.items()}
    up, down = _pair(3 * DIM, DIM, seed=15)
    tensors = {"layers.0.attention.qkv.lora_B": up, "layers.0.attention.qkv.lora_A": down}
    fused = fuse_loras(base, [(load_lora(tensors), 1.0)])
    assert not torch.equal(fused[QKV], base[QKV])
    assert all(torch.equal(before[k], base[k]) for k in base)
