"""Tiled VAE decoding (issue 17): ComfyUI's ``VAEDecodeTiled`` reproduced byte for byte
(``runtime/vae_tiles.py`` against numbers ComfyUI's own functions computed,
tests/comfy_reference.py), and the pipeline decoding in tiles when asked."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.comfy_reference import VAE_DECODE_TILED
from zimage_trt.errors import InputError
from zimage_trt.runtime.vae_tiles import VaeTiles, decode_tiled, tile_shapes


def _toy_decode(z: torch.Tensor) -> torch.Tensor:
    """[B, 16, h, w] → [B, 3, 8h, 8w]: each pixel depends on a 3×3 latent neighbourhood (so the
    tiles' edges differ from the whole), elementwise float32 arithmetic only (the same bytes on
    every machine)."""
    p = F.pad(z[:, :3], (1, 1, 1, 1), mode="replicate")
    ctx = p[..., :-2, 1:-1] - p[..., 2:, 1:-1] + 0.5 * (p[..., 1:-1, :-2] - p[..., 1:-1, 2:])
    y = z[:, :3] + ctx
    y = y / (1 + y.abs())
    return y.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)


def _latent(shape: tuple[int, ...]) -> torch.Tensor:
    """Values in [−1, 1) from integer arithmetic: the same on every machine."""
    n = torch.arange(torch.Size(shape).numel(), dtype=torch.int64)
    return (((n * 7919) % 1009).float() / 504.5 - 1.0).reshape(shape)


@pytest.mark.parametrize(("shape", "tile_size", "overlap"), list(VAE_DECODE_TILED))
def test_tiled_decoding_is_comfyui_s_byte_for_byte(
    shape: tuple[int, ...], tile_size: int, overlap: int
) -> None:
    """The final stage's 108×84 latent at VAE.decode's out-of-memory fallback (512/128), the
    node's defaults (512/64) and small tiles (64/16); a batch, one tile, tiles thinner than twice
    the ramp, a side thinner than it."""
    out = decode_tiled(_latent(shape), _toy_decode, VaeTiles(tile_size, overlap))
    sha, total = VAE_DECODE_TILED[(shape, tile_size, overlap)]
    assert out.shape == (shape[0], 3, 8 * shape[2], 8 * shape[3]) and out.dtype == torch.float32
    assert hashlib.sha256(out.numpy().tobytes()).hexdigest() == sha
    assert float(out.double().sum()) == total


def test_the_node_s_settings_are_checked_and_adjusted() -> None:
    assert VaeTiles().latent() == (64, 8)  # 512 / 64 px
    assert VaeTiles(128, 64).latent() == (16, 4)  # overlap > tile/4: tile // 4
    assert VaeTiles.parse("256") == VaeTiles(256, 64) and VaeTiles.parse("96:32").latent() == (
        12,
        3,
    )
    with pytest.raises(InputError) as bad:
        VaeTiles(32, 64)
    assert str(bad.value) == (
        "VAE tile size 32 is outside 64 … 4096 pixels (ComfyUI's VAEDecodeTiled)"
    )
    with pytest.raises(InputError, match=r"--vae-tiles 'big': give TILE or TILE:OVERLAP"):
        VaeTiles.parse("big")
    with pytest.raises(InputError, match=r"^VAE tile overlap 5000 is outside 0 … 4096 pixels"):
        VaeTiles.parse("512:5000")
    # 108×84 at 512/64 (64-latent tiles, overlapping by 8): tall 128×32 tiles start at columns
    # 0, 24, 48, 72 (the last 12 wide); wide 32×128 at rows 0 … 96 (the last 12 high); square
    # 64×64 at rows and columns 0 and 56 (the last 52 high, 28 wide)
    assert tile_shapes(108, 84, VaeTiles()) == [
        (12, 84), (32, 84), (52, 28), (52, 64), (64, 28), (64, 64), (108, 12), (108, 32)
    ]  # fmt: skip


def test_the_pipeline_decodes_in_tiles_when_asked() -> None:
    """The tiny model's decoder called on exactly the tiles ``tile_shapes`` names, the result the
    tiled decode of those calls; the real decoder's group norms see each tile alone, so the image
    differs from the whole decode (as in ComfyUI)."""
    from zimage_trt.runtime.images import to_uint8
    from zimage_trt.runtime.pipeline import Pipeline

    pipeline = Pipeline.open(model="tiny", workflow="zimage-121101", device="cpu",
                             log=lambda m: None)  # fmt: skip
    decoder = pipeline.engines.vae_decoder
    seen: list[tuple[int, int]] = []

    def spy(latents: torch.Tensor) -> dict[str, torch.Tensor]:
        seen.append(tuple(latents.shape[2:]))
        return decoder(latents=latents)

    pipeline.engines.vae_decoder = spy
    latent = _latent((1, 16, 28, 22)) * 2
    whole = pipeline.decode(latent)
    assert seen == [(28, 22)]
    seen.clear()
    tiles = VaeTiles(64, 32)  # 8-latent tiles, overlapping by 2
    pipeline.vae_tiles = tiles
    image = pipeline.decode(latent)
    assert (
        sorted(set(seen)) == tile_shapes(28, 22, tiles) and len(seen) == 20 + 26 + 20
    )  # tall, wide, square
    expected = decode_tiled(latent, lambda z: decoder(latents=z)["image"], tiles)
    assert (image == to_uint8(expected)).all() and image.shape == whole.shape == (224, 176, 3)
    assert (image != whole).any()


def test_a_reference_build_for_tiles_spans_every_piece_and_no_whole_latent() -> None:
    """``build --vae-tiles 512:64`` for the reference workflow: the decoder's three profiles, one
    per tiling, each spanning the pieces that tiling cuts from the three latents (108×84 → the
    tall tiling's 108×32 and 108×12 …) and none larger than its tile (a tile's activations, not
    the 108×84 decode's); the DiT's profiles are the workflow's."""
    from zimage_trt.build_engines.profiles import Span, tile_stages, workflow_stages
    from zimage_trt.workflow import load_workflow

    stages = workflow_stages(load_workflow("zimage-121101"))
    tiled = tile_stages(VaeTiles(), stages)
    assert [(t.name, t.height, t.width) for t in tiled] == [
        ("tiles 512:64 tall", Span(28, 108, 108), Span(12, 32, 32)),
        ("tiles 512:64 wide", Span(12, 32, 32), Span(22, 84, 84)),
        ("tiles 512:64 square", Span(28, 64, 64), Span(22, 64, 64)),
    ]
    assert {(t.decode, t.denoise, t.max_batch) for t in tiled} == {(True, False, 1)}
    for stage in stages:
        for h, w in tile_shapes(stage.height.opt, stage.width.opt, VaeTiles()):
            assert any(t.height.min <= h <= t.height.max and t.width.min <= w <= t.width.max
                       for t in tiled), (h, w)  # fmt: skip


@pytest.fixture(scope="module")
def tiled_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """An ONNX Runtime folder built ``--vae-tiles 128:32`` for a one-stage 336×432 workflow
    (no parity check: the test below compares images): its path, the workflow file, the
    build's printout."""
    import contextlib
    import io

    from tests.test_memory_plan import _one_stage
    from zimage_trt.cli import main

    root = tmp_path_factory.mktemp("tiled")
    path = root / "one-stage.yaml"
    path.write_text(_one_stage().to_yaml())
    out, printed = root / "engines", io.StringIO()
    argv = ["build", "--model", "tiny", "--backend", "onnxruntime", "-w", str(path),
            "--vae-tiles", "128:32", "--no-parity", "--out", str(out), "-q"]  # fmt: skip
    with contextlib.redirect_stdout(printed):
        assert main(argv) == 0
    return out, path, printed.getvalue()


def test_an_engine_folder_built_for_tiles_decodes_in_them(
    tiled_folder: tuple[Path, Path, str],
) -> None:
    """The folder decodes in those tiles (the torch backend's tiled image, within 2 levels);
    asked for other tiles it refuses before any work, naming the piece and the build that
    covers it."""
    from zimage_trt.engines.manifest import ProfileError
    from zimage_trt.runtime.pipeline import Pipeline
    from zimage_trt.workflow import load_workflow

    out, path, printed = tiled_folder
    decoder = [line for line in printed.splitlines() if line.startswith("vae_decoder  ")]
    assert decoder == [
        "vae_decoder   tiles 128:32 tall    latents          1×16×26×6   1×16×32×8   1×16×32×8",
        "vae_decoder   tiles 128:32 wide    latents          1×16×6×14   1×16×8×32   1×16×8×32",
        "vae_decoder   tiles 128:32 square  latents           1×16×6×6  1×16×16×16  1×16×16×16",
    ]  # no whole 54×42 decode: the engine holds a tile's activations
    wf, tiles, logs = load_workflow(str(path)), VaeTiles(128, 32), []
    engines = Pipeline.open(engines=out, log=logs.append)  # the tiles it was built for
    assert engines.vae_tiles == tiles
    assert "decoding in tiles 128:32 (the folder was built --vae-tiles)" in logs
    eager = Pipeline.open(model="tiny", workflow=wf, device="cpu", vae_tiles=tiles,
                          log=lambda m: None)  # fmt: skip
    got, ref = engines.run(wf).image, eager.run(wf).image
    assert got.shape == ref.shape == (432, 336, 3)
    assert int(np.abs(got.astype(int) - ref.astype(int)).max()) <= 2
    eager.vae_tiles = None
    assert int(np.abs(got.astype(int) - eager.run(wf).image.astype(int)).max()) > 2  # seams
    from zimage_trt.bench.measure import component_calls

    timed = [c.inputs["latents"].shape[2:] for c in component_calls(engines, wf)
             if c.engine == "vae_decoder"]  # fmt: skip
    assert sorted(timed) == tile_shapes(54, 42, tiles) and len(timed) == 12  # bench: the pieces
    with pytest.raises(ProfileError) as refused:
        Pipeline.open(engines=out, vae_tiles=VaeTiles(256, 32), log=lambda m: None)
    assert str(refused.value) == (
        "engine 'vae_decoder' was not built for latents 1×16×6×42; built profiles: tiles 128:32 "
        "tall: latents 1×16×26×6 … 1×16×32×8 (opt 1×16×32×8); tiles 128:32 wide: latents "
        "1×16×6×14 … 1×16×8×32 (opt 1×16×8×32); tiles 128:32 square: latents 1×16×6×6 … "
        "1×16×16×16 (opt 1×16×16×16). To cover it, build with: zimage-trt build --model MODEL "
        "--workflow zimage-121101.yaml --backend onnxruntime --caption-max 4096 --vae-tiles "
        "256:32 --out DIR"
    )


def test_serve_decodes_an_engine_folder_in_the_tiles_it_names(
    tiled_folder: tuple[Path, Path, str],
) -> None:
    import argparse

    from zimage_trt.cli.serve import add_serve_parser, source_from

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    out, _, _ = tiled_folder
    args = parser.parse_args(["serve", "--engines", str(out), "--vae-tiles", "128:32"])
    source = source_from(args)
    assert source.vae_tiles == VaeTiles(128, 32)
    assert source.open(lambda msg: None).vae_tiles == VaeTiles(128, 32)
    with pytest.raises(InputError) as refused:
        source_from(parser.parse_args(["serve", "--engines", str(out), "--vae-tiles", "12:4"]))
    assert str(refused.value) == (
        "VAE tile size 12 is outside 64 … 4096 pixels (ComfyUI's VAEDecodeTiled)"
    )
