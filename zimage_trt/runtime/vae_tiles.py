"""Tiled VAE decoding as ComfyUI's ``VAEDecodeTiled`` node computes it, for memory budgets that
cannot hold the decoder's activations for the whole image (the 672×864 decode is the largest
activation of the reference workflow).

ComfyUI's arithmetic, restated:

- the node takes ``tile_size`` and ``overlap`` in pixels (defaults 512 and 64; an overlap more
  than a quarter of the tile becomes ``tile_size // 4``) and divides both by the VAE's 8;
- the latent is decoded three times — tiles of ``(2·t, t/2)``, ``(t/2, 2·t)`` and ``(t, t)``
  latent rows × columns — and the three images averaged, ``(a + b + c) / 3``;
- within one tiling, tiles start every ``tile − overlap`` along each axis (one tile when the
  side fits), the last ones cut short at the edge; each decoded tile is weighted by a mask
  that ramps ``1/f, 2/f, … 1`` over ``f = 8·overlap`` pixels at both ends of each axis (not
  when ``f`` reaches the tile's side), multiplied in place row by row as ComfyUI does (the
  float32 rounding included), and the weighted sum divided by the summed masks;
- a latent that fits one tile is decoded whole.

``decode_tiled`` gives the raw decoder output (before ``(x + 1) / 2``), like ComfyUI's
``decode_tiled_`` before ``process_output``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from zimage_trt.errors import InputError

SCALE = 8  # the Flux VAE's pixels per latent side
TILE_RANGE = (64, 4096)  # the node's tile_size input, in pixels
OVERLAP_RANGE = (0, 4096)  # its overlap input


@dataclass(frozen=True)
class VaeTiles:
    """``VAEDecodeTiled``'s two settings, in pixels."""

    tile_size: int = 512
    overlap: int = 64

    def __post_init__(self) -> None:
        for name, value, (low, high) in (("size", self.tile_size, TILE_RANGE),
                                         ("overlap", self.overlap, OVERLAP_RANGE)):  # fmt: skip
            if not low <= value <= high:
                raise InputError(
                    f"VAE tile {name} {value} is outside {low} … {high} pixels (ComfyUI's "
                    "VAEDecodeTiled)"
                )

    @classmethod
    def parse(cls, text: str) -> VaeTiles:
        """``TILE`` or ``TILE:OVERLAP`` in pixels (``512``, ``512:64``)."""
        tile, _, overlap = text.partition(":")
        try:
            sizes = int(tile), int(overlap) if overlap else cls.overlap
        except ValueError:
            raise InputError(
                f"--vae-tiles {text!r}: give TILE or TILE:OVERLAP in pixels, e.g. 512:64"
            ) from None
        return cls(*sizes)

    def latent(self) -> tuple[int, int]:
        """(tile, overlap) in latent units, after the node's adjustment."""
        overlap = self.tile_size // 4 if self.tile_size < self.overlap * 4 else self.overlap
        return self.tile_size // SCALE, overlap // SCALE

    def __str__(self) -> str:
        return f"{self.tile_size}:{self.overlap}"


def _feather(mask: Tensor, fade: int) -> None:
    """ComfyUI's tile mask, in place: a ramp over ``fade`` rows at both ends of each axis."""
    for dim in (2, 3):
        if fade >= mask.shape[dim]:
            continue
        for t in range(fade):
            weight = (t + 1) / fade
            mask.narrow(dim, t, 1).mul_(weight)
            mask.narrow(dim, mask.shape[dim] - 1 - t, 1).mul_(weight)


def _starts(side: int, length: int, overlap: int) -> range:
    """Where one tiling's tiles start along an axis ``side`` long: every ``length − overlap``
    when the tile does not cover it, else once."""
    return range(0, side - overlap, length - overlap) if side > length else range(1)


def _windows(
    height: int, width: int, tile: tuple[int, int], overlap: int
) -> list[tuple[int, int, int, int]]:
    """(row, column, rows, columns) of every tile of one tiling, the last tiles cut short at
    the edge."""
    starts = (_starts(height, tile[0], overlap), _starts(width, tile[1], overlap))
    return [(y, x, min(tile[0], height - y), min(tile[1], width - x))
            for y, x in itertools.product(*starts)]  # fmt: skip


def piece_sides(side: int, length: int, overlap: int) -> set[int]:
    """The lengths of the pieces one tiling (tiles ``length`` long, ``overlap`` shared) cuts
    along an axis ``side`` long; the two axes are cut independently."""
    return {min(length, side - start) for start in _starts(side, length, overlap)}


def tiled(
    latent: Tensor,
    decode: Callable[[Tensor], Tensor],
    tile: tuple[int, int],
    overlap: int,
    channels: int = 3,
    device: str = "cpu",
) -> Tensor:
    """One tiling: ``latent`` [B, C, h, w] decoded in (rows, columns) ``tile`` pieces that share
    ``overlap`` latent rows / columns, blended in float32 on ``device`` (ComfyUI's intermediate
    device: the CPU)."""
    if min(tile) <= overlap:
        raise InputError(f"a VAE tile of {tile} latents cannot overlap by {overlap}")
    batch, _, height, width = latent.shape
    output = torch.empty(batch, channels, height * SCALE, width * SCALE, device=device)
    for b in range(batch):
        item = latent[b : b + 1]
        if height <= tile[0] and width <= tile[1]:
            output[b : b + 1] = decode(item).float().to(device)
            continue
        total = torch.zeros(1, channels, height * SCALE, width * SCALE, device=device)
        weights = torch.zeros_like(total)
        for y, x, rows, cols in _windows(height, width, tile, overlap):
            piece = decode(item[:, :, y : y + rows, x : x + cols]).float().to(device)
            mask = torch.ones_like(piece)
            _feather(mask, overlap * SCALE)
            window = (slice(None), slice(None), slice(y * SCALE, y * SCALE + piece.shape[2]),
                      slice(x * SCALE, x * SCALE + piece.shape[3]))  # fmt: skip
            total[window].add_(piece * mask)
            weights[window].add_(mask)
        output[b : b + 1] = total / weights
    return output


def decode_tiled(
    latent: Tensor, decode: Callable[[Tensor], Tensor], tiles: VaeTiles, device: str = "cpu"
) -> Tensor:
    """``latent`` decoded as ``VAEDecodeTiled`` with ``tiles`` does: three tilings averaged (on
    ``device``)."""
    tile, overlap = tiles.latent()
    tall, wide, square = (tiled(latent, decode, size, overlap, device=device)
                          for size in tilings(tile))  # fmt: skip
    return (tall + wide + square) / 3.0


def tilings(tile: int) -> tuple[tuple[int, int], ...]:
    """The three (rows, columns) tile sizes ComfyUI averages, in its order."""
    return (tile * 2, tile // 2), (tile // 2, tile * 2), (tile, tile)


def tile_shapes(height: int, width: int, tiles: VaeTiles) -> list[tuple[int, int]]:
    """Every (rows, columns) latent piece ``decode_tiled`` decodes for an ``height``×``width``
    latent: what a decoder engine's profile must admit."""
    tile, overlap = tiles.latent()
    shapes: set[tuple[int, int]] = set()
    for size in tilings(tile):
        if height <= size[0] and width <= size[1]:
            shapes.add((height, width))
        else:
            shapes.update((r, c) for _, _, r, c in _windows(height, width, size, overlap))
    return sorted(shapes)
