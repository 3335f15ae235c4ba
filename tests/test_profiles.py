"""Optimization profiles, network shapes and parity points, derived from the full-size configs.

Profile derivation needs the configs only (no weights, no export), so the numbers pinned here are
the ones the real Z-Image-Turbo build uses.
"""

from __future__ import annotations

import pytest
import torch

from zimage_trt.build_engines.networks import Network, ShapePoint, networks
from zimage_trt.build_engines.parity import parity_points, point_of
from zimage_trt.build_engines.profiles import (
    Span,
    StageShapes,
    bucket_stage,
    caption_span,
    engine_profiles,
    limits,
    parse_resolutions,
    resolution_stages,
    workflow_stages,
)
from zimage_trt.engines.manifest import Profile, ShapeRange, format_profiles
from zimage_trt.models.dit import DiTConfig
from zimage_trt.models.text_encoder import Qwen3Config
from zimage_trt.models.vae import VAEConfig
from zimage_trt.workflow import load_workflow

NETS = networks("bf16", DiTConfig(), Qwen3Config(), VAEConfig())
CAPTION = caption_span(4096, 50)


def reference_profiles() -> dict[str, list[Profile]]:
    return engine_profiles(NETS, workflow_stages(load_workflow("zimage-121101")), CAPTION)


def triple(profile: Profile) -> dict[str, tuple[tuple[int, ...], ...]]:
    return {name: (r.min, r.opt, r.max) for name, r in profile.shapes.items()}


# -- the reference workflow ------------------------------------------------------------------------


def test_reference_workflow_stages() -> None:
    stages = workflow_stages(load_workflow("zimage-121101"))
    assert [(s.name, s.height, s.width, s.max_batch, s.decode, s.encode) for s in stages] == [
        ("base", Span(28, 28, 28), Span(22, 22, 22), 2, True, False),
        ("refine", Span(54, 54, 54), Span(42, 42, 42), 1, True, False),
        ("upscale", Span(108, 108, 108), Span(84, 84, 84), 1, True, False),
    ]


def test_reference_workflow_profiles() -> None:
    profiles = reference_profiles()
    assert list(profiles) == ["text_encoder", "caption_path", "denoiser", "vae_decoder"]
    assert "vae_encoder" not in profiles  # no stage encodes an image

    (text,) = profiles["text_encoder"]
    assert text.name == "prompt"
    assert triple(text) == {
        "input_ids": ((1, 1), (1, 50), (1, 4096)),
        "attention_mask": ((1, 1), (1, 50), (1, 4096)),
    }
    (caption,) = profiles["caption_path"]
    assert caption.name == "prompt"
    assert triple(caption) == {
        "cap_feats": ((1, 1, 2560), (1, 50, 2560), (1, 4096, 2560)),
        "cap_mask": ((1, 1), (1, 50), (1, 4096)),
    }

    base, refine, upscale = profiles["denoiser"]
    assert [base.name, refine.name, upscale.name] == ["base", "refine", "upscale"]
    # stage 1 has cfg 2: cond and uncond may share a batch-2 call
    assert triple(base) == {
        "latents": ((1, 16, 28, 22), (1, 16, 28, 22), (2, 16, 28, 22)),
        "sigma": ((1,), (1,), (2,)),
        "cap_tokens": ((1, 32, 3840), (1, 64, 3840), (2, 4096, 3840)),
        "cap_valid": ((1, 32), (1, 64), (2, 4096)),
    }
    # cfg 1: batch 1 only
    assert triple(refine) == {
        "latents": ((1, 16, 54, 42), (1, 16, 54, 42), (1, 16, 54, 42)),
        "sigma": ((1,), (1,), (1,)),
        "cap_tokens": ((1, 32, 3840), (1, 64, 3840), (1, 4096, 3840)),
        "cap_valid": ((1, 32), (1, 64), (1, 4096)),
    }
    assert triple(upscale) == {
        "latents": ((1, 16, 108, 84), (1, 16, 108, 84), (1, 16, 108, 84)),
        "sigma": ((1,), (1,), (1,)),
        "cap_tokens": ((1, 32, 3840), (1, 64, 3840), (1, 4096, 3840)),
        "cap_valid": ((1, 32), (1, 64), (1, 4096)),
    }

    # three static decoder profiles: two previews and the final image
    decoder = profiles["vae_decoder"]
    assert [p.name for p in decoder] == ["base", "refine", "upscale"]
    assert [triple(p) for p in decoder] == [
        {"latents": ((1, 16, h, w),) * 3} for h, w in ((28, 22), (54, 42), (108, 84))
    ]


REFERENCE_TABLE = """\
engine        profile  input                   min          opt          max
text_encoder  prompt   input_ids               1×1         1×50       1×4096
                       attention_mask          1×1         1×50       1×4096
caption_path  prompt   cap_feats          1×1×2560    1×50×2560  1×4096×2560
                       cap_mask                1×1         1×50       1×4096
denoiser      base     latents          1×16×28×22   1×16×28×22   2×16×28×22
                       sigma                     1            1            2
                       cap_tokens        1×32×3840    1×64×3840  2×4096×3840
                       cap_valid              1×32         1×64       2×4096
denoiser      refine   latents          1×16×54×42   1×16×54×42   1×16×54×42
                       sigma                     1            1            1
                       cap_tokens        1×32×3840    1×64×3840  1×4096×3840
                       cap_valid              1×32         1×64       1×4096
denoiser      upscale  latents         1×16×108×84  1×16×108×84  1×16×108×84
                       sigma                     1            1            1
                       cap_tokens        1×32×3840    1×64×3840  1×4096×3840
                       cap_valid              1×32         1×64       1×4096
vae_decoder   base     latents          1×16×28×22   1×16×28×22   1×16×28×22
vae_decoder   refine   latents          1×16×54×42   1×16×54×42   1×16×54×42
vae_decoder   upscale  latents         1×16×108×84  1×16×108×84  1×16×108×84"""


def test_format_profiles_table() -> None:
    text = format_profiles(reference_profiles())
    assert text.splitlines()[0] == (
        "engine        profile  input                   min          opt          max"
    )
    assert text == REFERENCE_TABLE


def test_limits_of_the_reference_profiles() -> None:
    profiles = reference_profiles()
    assert limits(profiles["denoiser"], NETS["denoiser"]) == ShapePoint(2, 4096, 108, 84)
    assert limits(profiles["vae_decoder"], NETS["vae_decoder"]) == ShapePoint(1, 1, 108, 84)
    assert limits(profiles["text_encoder"], NETS["text_encoder"]) == ShapePoint(1, 4096, 2, 2)


# -- resolutions, buckets, shared profiles ---------------------------------------------------------


def test_parse_resolutions() -> None:
    assert parse_resolutions("1024x1024,768x1344") == [(1024, 1024), (768, 1344)]
    assert parse_resolutions(" 1024×768 , 16x16384") == [(1024, 768), (16, 16384)]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "1000x1024",
            "resolution 1000x1024: 1000 px must be a multiple of 16 between 16 and 16384",
        ),
        ("1024x0", "resolution 1024x0: 0 px must be a multiple of 16 between 16 and 16384"),
        ("16400x16", "resolution 16400x16: 16400 px must be a multiple of 16 between 16 and 16384"),
        ("1024", "resolution '1024' is not WIDTHxHEIGHT (e.g. 1024x1024)"),
        ("1024x1024,", "resolution '' is not WIDTHxHEIGHT (e.g. 1024x1024)"),
        ("1024*1024", "resolution '1024*1024' is not WIDTHxHEIGHT (e.g. 1024x1024)"),
        ("", "no resolutions given"),
        ("  ", "no resolutions given"),
    ],
)
def test_parse_resolutions_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_resolutions(text)
    assert str(info.value) == message


def test_resolution_profiles() -> None:
    stages = resolution_stages(parse_resolutions("1024x1024,768x1344"))
    profiles = engine_profiles(NETS, stages, CAPTION)
    square, portrait = profiles["denoiser"]
    assert (square.name, portrait.name) == ("1024x1024", "768x1344")
    # width × height in pixels → latents [B, 16, height/8, width/8]
    assert triple(square)["latents"] == ((1, 16, 128, 128), (1, 16, 128, 128), (2, 16, 128, 128))
    assert triple(portrait)["latents"] == ((1, 16, 168, 96), (1, 16, 168, 96), (2, 16, 168, 96))
    assert triple(portrait)["cap_valid"] == ((1, 32), (1, 64), (2, 4096))
    assert [triple(p)["latents"][2] for p in profiles["vae_decoder"]] == [
        (1, 16, 128, 128),
        (1, 16, 168, 96),
    ]
    no_cfg = engine_profiles(NETS, resolution_stages([(1024, 1024)], cfg=False), CAPTION)
    assert triple(no_cfg["denoiser"][0])["latents"][2] == (1, 16, 128, 128)


def test_bucket_opt_is_the_largest_stage_inside() -> None:
    stages = workflow_stages(load_workflow("zimage-121101"))
    bucket = bucket_stage("512x512-1024x1024", stages)
    assert bucket == StageShapes(
        "bucket 512x512-1024x1024", Span(64, 108, 128), Span(64, 84, 128), 2, decode=True
    )
    # no stage inside: the opt is the bucket's maximum
    small = bucket_stage("512x512-640x640", stages)
    assert (small.height, small.width) == (Span(64, 80, 80), Span(64, 80, 80))
    profile = engine_profiles(NETS, [bucket], CAPTION)["denoiser"][0]
    assert triple(profile)["latents"] == ((1, 16, 64, 64), (1, 16, 108, 84), (2, 16, 128, 128))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("512x512", "bucket '512x512' is not MINWxMINH-MAXWxMAXH (e.g. 512x512-1024x1024)"),
        (
            "512x512-768x768-1024x1024",
            "bucket '512x512-768x768-1024x1024' is not MINWxMINH-MAXWxMAXH "
            "(e.g. 512x512-1024x1024)",
        ),
        (
            "1024x1024-512x512",
            "bucket '1024x1024-512x512': the minimum 1024x1024 exceeds the maximum 512x512",
        ),
        (
            "512x1024-1024x512",
            "bucket '512x1024-1024x512': the minimum 512x1024 exceeds the maximum 1024x512",
        ),
        ("512x512-1024", "resolution '1024' is not WIDTHxHEIGHT (e.g. 1024x1024)"),
        (
            "500x512-1024x1024",
            "resolution 500x512: 500 px must be a multiple of 16 between 16 and 16384",
        ),
    ],
)
def test_bucket_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        bucket_stage(text, [])
    assert str(info.value) == message


def test_identical_stages_share_a_profile() -> None:
    def stage(name: str, batch: int) -> StageShapes:
        return StageShapes(name, Span.exactly(64), Span.exactly(48), batch, decode=True)

    profiles = engine_profiles(NETS, [stage("a", 1), stage("b", 1), stage("c", 2)], CAPTION)
    # the denoiser tells batch 1 from batch 2; the decoder (always batch 1) does not
    assert [p.name for p in profiles["denoiser"]] == ["a+b", "c"]
    assert [p.name for p in profiles["vae_decoder"]] == ["a+b+c"]
    assert triple(profiles["vae_decoder"][0]) == {"latents": ((1, 16, 64, 48),) * 3}


# -- caption ceiling -------------------------------------------------------------------------------


def test_caption_span() -> None:
    assert caption_span(4096, 50) == Span(1, 50, 4096)
    assert caption_span(64, 50) == Span(1, 50, 64)
    assert caption_span(64, 100) == Span(1, 64, 64)  # opt clamped to the ceiling
    assert caption_span(128, 0) == Span(1, 1, 128)
    with pytest.raises(ValueError) as info:
        caption_span(63, 50)
    assert str(info.value) == (
        "caption ceiling 63 tokens is too small; use at least 64 (default 4096)"
    )


# -- parity points ---------------------------------------------------------------------------------


def test_parity_points_cover_every_denoiser_axis_twice() -> None:
    net = NETS["denoiser"]
    points = parity_points(net, reference_profiles()["denoiser"])
    assert len(points) == 9  # the 3 corners of 3 profiles, no extra point needed
    assert sorted({p.batch for p in points}) == [1, 2]
    assert sorted({net.shapes(p)["cap_valid"][1] for p in points}) == [32, 64, 4096]
    assert sorted({p.height for p in points}) == [28, 54, 108]
    assert sorted({p.width for p in points}) == [22, 42, 84]
    assert points[:3] == [
        ShapePoint(1, 32, 28, 22),
        ShapePoint(1, 64, 28, 22),
        ShapePoint(2, 4096, 28, 22),
    ]


def test_parity_points_add_an_off_profile_size_for_one_resolution() -> None:
    profiles = engine_profiles(NETS, resolution_stages([(1024, 1024)]), CAPTION)
    assert parity_points(NETS["denoiser"], profiles["denoiser"]) == [
        ShapePoint(1, 32, 128, 128),
        ShapePoint(1, 64, 128, 128),
        ShapePoint(2, 4096, 128, 128),
        ShapePoint(1, 32, 126, 126),
    ]
    assert parity_points(NETS["vae_decoder"], profiles["vae_decoder"]) == [
        ShapePoint(1, 2, 128, 128),
        ShapePoint(1, 2, 126, 126),
    ]


def test_parity_points_add_a_shorter_caption_for_a_fixed_length() -> None:
    stages = resolution_stages([(256, 256)])
    profiles = engine_profiles(NETS, stages, Span.exactly(64))
    assert parity_points(NETS["denoiser"], profiles["denoiser"]) == [
        ShapePoint(1, 64, 32, 32),
        ShapePoint(2, 64, 32, 32),
        ShapePoint(1, 32, 30, 30),
    ]


def test_point_of_inverts_shapes() -> None:
    point = ShapePoint(2, 64, 54, 42)
    assert point_of(NETS["denoiser"], NETS["denoiser"].shapes(point)) == point
    assert point_of(NETS["text_encoder"], {"input_ids": (1, 77), "attention_mask": (1, 77)}) == (
        ShapePoint(1, 77, 2, 2)
    )
    # the encoder's image is in pixels: 8× the latent
    assert point_of(NETS["vae_encoder"], {"image": (1, 3, 432, 336)}) == ShapePoint(1, 2, 54, 42)


# -- networks --------------------------------------------------------------------------------------


def test_shapes_at_a_point() -> None:
    point = ShapePoint(2, 40, 54, 42)  # 40 tokens → 64 caption slots
    assert NETS["denoiser"].shapes(point) == {
        "latents": (2, 16, 54, 42),
        "sigma": (2,),
        "cap_tokens": (2, 64, 3840),
        "cap_valid": (2, 64),
    }
    assert NETS["caption_path"].shapes(point) == {"cap_feats": (2, 40, 2560), "cap_mask": (2, 40)}
    assert NETS["vae_encoder"].shapes(point) == {"image": (2, 3, 432, 336)}


def test_dynamic_shapes_share_one_dim_per_axis() -> None:
    dynamic = NETS["denoiser"].dynamic_shapes(ShapePoint(2, 4096, 108, 84))
    assert {name: sorted(axes) for name, axes in dynamic.items()} == {
        "latents": [0, 2, 3],
        "sigma": [0],
        "cap_tokens": [0, 1],
        "cap_valid": [0, 1],
    }
    batch = dynamic["latents"][0]
    assert batch is dynamic["sigma"][0]
    assert batch is dynamic["cap_tokens"][0]
    assert batch is dynamic["cap_valid"][0]
    assert dynamic["cap_tokens"][1] is dynamic["cap_valid"][1]
    assert (batch.__name__, batch.min, batch.max) == ("batch", 1, 2)
    slots = dynamic["cap_valid"][1]
    assert (slots.__name__, slots.min, slots.max) == ("32*caption_blocks", 32, 4096)
    height, width = dynamic["latents"][2], dynamic["latents"][3]
    assert (height.__name__, height.min, height.max) == ("2*half_height", 2, 108)
    assert (width.__name__, width.min, width.max) == ("2*half_width", 2, 84)


def test_dynamic_shapes_of_the_vae_encoder_are_in_pixels() -> None:
    dynamic = NETS["vae_encoder"].dynamic_shapes(ShapePoint(1, 1, 108, 84))
    image = dynamic["image"]
    assert sorted(image) == [0, 2, 3]
    assert (image[2].__name__, image[2].min, image[2].max) == ("16*half_height", 16, 864)
    assert (image[3].__name__, image[3].min, image[3].max) == ("16*half_width", 16, 672)
    assert (image[0].min, image[0].max) == (1, 2)  # batch is never narrower than 1…2


def test_sample_inputs_shapes_dtypes_and_padding() -> None:
    net: Network = NETS["denoiser"]
    inputs = net.sample_inputs(ShapePoint(2, 40, 4, 6), torch.Generator().manual_seed(0))
    assert {k: (tuple(v.shape), v.dtype) for k, v in inputs.items()} == {
        "latents": ((2, 16, 4, 6), torch.bfloat16),
        "sigma": ((2,), torch.float32),
        "cap_tokens": ((2, 64, 3840), torch.bfloat16),
        "cap_valid": ((2, 64), torch.bool),
    }
    assert bool(((inputs["sigma"] >= 0.05) & (inputs["sigma"] <= 0.95)).all())
    # the first item is whole, the second valid in whole blocks of 32 then padding
    assert inputs["cap_valid"].sum(dim=1).tolist() == [64, 32]
    assert inputs["cap_valid"][1, :32].all() and not inputs["cap_valid"][1, 32:].any()

    text = NETS["text_encoder"].sample_inputs(
        ShapePoint(2, 10, 2, 2), torch.Generator().manual_seed(0)
    )
    assert text["input_ids"].dtype == torch.int64 and tuple(text["input_ids"].shape) == (2, 10)
    assert int(text["input_ids"].min()) >= 0 and int(text["input_ids"].max()) < 1000
    assert text["attention_mask"].dtype == torch.int64
    assert text["attention_mask"].tolist() == [[1] * 10, [1] * 5 + [0] * 5]

    single = NETS["caption_path"].sample_inputs(
        ShapePoint(1, 7, 2, 2), torch.Generator().manual_seed(0)
    )
    assert tuple(single["cap_feats"].shape) == (1, 7, 2560)
    assert single["cap_mask"].dtype == torch.bool and bool(single["cap_mask"].all())


def test_sample_inputs_are_reproducible() -> None:
    net = NETS["caption_path"]
    first = net.sample_inputs(ShapePoint(2, 9, 2, 2), torch.Generator().manual_seed(3))
    second = net.sample_inputs(ShapePoint(2, 9, 2, 2), torch.Generator().manual_seed(3))
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_fp16_is_refused() -> None:
    with pytest.raises(ValueError) as info:
        networks("fp16", DiTConfig(), Qwen3Config(), VAEConfig())
    assert str(info.value) == (
        "precision 'fp16' is not supported; choose one of: fp32, bf16 "
        "(fp16 gives NaN / black images with Z-Image)"
    )


def test_profile_ranges_are_manifest_models() -> None:
    (text,) = reference_profiles()["text_encoder"]
    assert text.shapes["input_ids"] == ShapeRange(min=(1, 1), opt=(1, 50), max=(1, 4096))
