"""Block-wise weight streaming for the torch backend (issue 17): the DiT with its main blocks
streamed through two staging blocks computes exactly what the resident DiT computes, step after
step (the prefetch wraps around to the first streamed block)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from zimage_trt.engines.block_streaming import StreamedBlock, stream_blocks
from zimage_trt.errors import InputError
from zimage_trt.models.dit import DiTConfig, ZImageDiT


@pytest.mark.parametrize("resident", [0, 2])
def test_streamed_blocks_compute_what_resident_blocks_compute(resident: int) -> None:
    torch.manual_seed(0)
    dit = ZImageDiT(dataclasses.replace(DiTConfig.tiny(), n_layers=5)).eval()
    streamed = stream_blocks(copy.deepcopy(dit), resident, "cpu", torch.float32)
    stand_ins = [m for m in streamed.layers if isinstance(m, StreamedBlock)]
    assert len(stand_ins) == 5 - resident and not list(stand_ins[0].parameters())
    # the streamed blocks' weights are not module state: the DiT holds resident + 2 blocks (its
    # staging blocks a submodule, so that moving the DiT moves them)
    per_block = sum(p.numel() for p in dit.layers[0].parameters())
    held = sum(p.numel() for p in streamed.parameters())
    assert held == sum(p.numel() for p in dit.parameters()) - (5 - resident - 2) * per_block
    g = torch.Generator().manual_seed(1)
    for _ in range(2):  # a second step starts again from the first streamed block
        x, caption = torch.randn(2, 16, 12, 10, generator=g), torch.randn(2, 32, 64, generator=g)
        sigma, valid = torch.rand(2, generator=g), torch.ones(2, 32, dtype=torch.bool)
        with torch.no_grad():
            assert torch.equal(streamed(x, sigma, caption, valid), dit(x, sigma, caption, valid))


def test_streaming_that_saves_nothing_is_refused() -> None:
    dit = ZImageDiT(dataclasses.replace(DiTConfig.tiny(), n_layers=5))
    with pytest.raises(InputError) as refused:
        stream_blocks(dit, 3, "cpu", torch.float32)
    assert str(refused.value) == (
        "resident blocks 3 is outside 0 … 2: streaming 5 blocks through two staging blocks "
        "saves memory only with 3 or more of them streamed"
    )
