"""Block-wise weight streaming for the torch backend's DiT: the first ``resident`` main blocks
live on the device; the others stay in (pinned) CPU memory and run through two staging blocks
on the device — while one computes, the next streamed block's weights are copied into the other
on a side stream (CUDA), so the copy overlaps the compute. The blocks compute exactly what the
resident DiT computes: the same weights, the same modules' code (tests/test_block_streaming.py).

Only ``layers`` (the 30 main blocks, 97 % of the weights) stream; the refiners, embedders and
final layer stay resident. The device holds ``resident + 2`` blocks' weights.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from zimage_trt.errors import InputError
from zimage_trt.models.dit import ZImageDiT


class _Stager(nn.Module):
    """The two staging blocks on the device and which streamed block each holds (a submodule of
    the DiT, so that moving the DiT moves them: ``engines.placement``)."""

    def __init__(self, template: nn.Module, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.slots = nn.ModuleList(copy.deepcopy(template).to(device) for _ in range(2))
        self.targets = [dict(slot.named_parameters()) | dict(slot.named_buffers())
                        for slot in self.slots]  # fmt: skip
        self.holds: list[int | None] = [None, None]
        self.ready: list[torch.cuda.Event | None] = [None, None]
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def load(self, slot: int, index: int, weights: dict[str, Tensor]) -> None:
        """Start copying block ``index``'s weights into ``slot`` (on the side stream)."""
        if self.holds[slot] == index:
            return
        target = self.targets[slot]
        if self.stream is None:
            with torch.no_grad():
                for name, value in weights.items():
                    target[name].copy_(value)
        else:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # slot is free
            with torch.cuda.stream(self.stream), torch.no_grad():
                for name, value in weights.items():
                    target[name].copy_(value, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.stream)
            self.ready[slot] = event
        self.holds[slot] = index

    def take(self, slot: int) -> nn.Module:
        """The slot's block, once its copy has landed."""
        event = self.ready[slot]
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
            self.ready[slot] = None
        block: nn.Module = self.slots[slot]
        return block


class StreamedBlock(nn.Module):
    """Stands in for one streamed block: its weights in CPU memory (not module state, so moving
    the DiT leaves them there); its forward runs them in a staging block, and starts the next
    streamed block's copy into the other one."""

    def __init__(self, order: int, stager: _Stager, streamed: list[dict[str, Tensor]]) -> None:
        super().__init__()
        self.order = order  # among the streamed blocks
        self.__dict__["_stager"] = stager
        self.__dict__["_streamed"] = streamed  # every streamed block's weights, in order

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        stager: _Stager = self.__dict__["_stager"]
        streamed: list[dict[str, Tensor]] = self.__dict__["_streamed"]
        slot = self.order % 2
        stager.load(slot, self.order, streamed[self.order])
        block = stager.take(slot)
        out = block(*args, **kwargs)
        after = (self.order + 1) % len(streamed)  # the next one; the first again next step
        stager.load(after % 2, after, streamed[after])
        return out


def stream_blocks(dit: ZImageDiT, resident: int, device: torch.device | str,
                  dtype: torch.dtype) -> ZImageDiT:  # fmt: skip
    """``dit`` placed on ``device`` in ``dtype`` with its main blocks past the first
    ``resident`` streamed from CPU memory (module docstring)."""
    device = torch.device(device)
    blocks = len(dit.layers)
    if blocks < 3:
        raise InputError(f"the DiT has {blocks} main blocks: streaming saves memory only with 3 "
                         "or more of them streamed (two are staged on the device)")  # fmt: skip
    if not 0 <= resident <= blocks - 3:
        raise InputError(
            f"resident blocks {resident} is outside 0 … {blocks - 3}: streaming {blocks} blocks "
            "through two staging blocks saves memory only with 3 or more of them streamed"
        )
    streamed: list[dict[str, Tensor]] = []
    template = dit.layers[resident]
    for i in range(resident, blocks):
        # held on the CPU (pinnable), whichever device the DiT arrived on
        state = {k: v.detach().to("cpu", dtype=dtype if v.is_floating_point() else v.dtype)
                 for k, v in dit.layers[i].state_dict().items()}  # fmt: skip
        if device.type == "cuda":
            state = {k: v.pin_memory() for k, v in state.items()}
        streamed.append(state)
    stager = _Stager(copy.deepcopy(template).to(dtype=dtype), device)
    for order, i in enumerate(range(resident, blocks)):
        dit.layers[i] = StreamedBlock(order, stager, streamed)
    dit.add_module("stager", stager)
    return dit.to(device=device, dtype=dtype)
