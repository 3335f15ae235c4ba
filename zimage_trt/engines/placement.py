"""Where the torch backend's text encoder and DiT stay between their calls, for a memory budget
(``runtime.memory_plan``'s strategies; ``torch_engines(text_encoder=…)``):

- ``resident``: on the device, always (the default);
- ``cpu``: the text encoder computes on the CPU (in fp32, as it does everywhere); its inputs go
  there and its hidden states come back to the device;
- ``released``: the text encoder and the DiT take turns on the device — the one called is
  brought in and the other parked: on a GPU in CPU memory (``Offload``), on the CPU released and
  read again from the model's files when next called (``Reload``). Each prompt is encoded once
  (the prompt cache), so turns are taken for new prompts only.

Each network computes with the same weights and the same code wherever it sits: the images are
those of the resident engines (tests/test_placement.py).

``upcast_per_block``: the text encoder's weights kept at the precision its file stores (bf16
for Z-Image's Qwen3) and computed in float32 as ever, as ComfyUI's ``manual_cast`` ops do — each
block's weights upcast just before it runs and dropped after, the embedding's rows as they are
looked up. bf16 → fp32 is exact, so the output is the float32 encoder's to the bit, in half the
memory (7.3 GiB instead of 14.6 for Qwen3-4B) plus one float32 block while it runs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Protocol

import torch
from torch import Tensor, nn

from zimage_trt.errors import InputError
from zimage_trt.models.text_encoder import Qwen3TextEncoder

TEXT_ENCODER_PLACEMENTS = ("resident", "released", "cpu")


class ModuleEngine(Protocol):
    """An engine over one module (``torch_engines.TorchEngine``)."""

    name: str
    module: nn.Module

    def __call__(self, **inputs: Tensor) -> dict[str, Tensor]: ...

    def refit(
        self, weights: Mapping[str, Tensor], more: Mapping[str, Tensor] | None = None
    ) -> None: ...


class Parking(Protocol):
    """How one network leaves the device and comes back."""

    def park(self) -> None: ...

    def bring(self) -> None: ...


class Offload:
    """Parked in CPU memory (a GPU's networks); every weight and buffer comes back as it left
    (a LoRA switched in while parked included)."""

    def __init__(self, module: nn.Module, device: torch.device) -> None:
        self.module, self.device = module, device

    def park(self) -> None:
        self.module.to("cpu")

    def bring(self) -> None:
        self.module.to(self.device)


class Reload:
    """Released (the CPU's networks: there is no other memory to park in) and made again by
    ``load`` — from the model's files — when next called."""

    def __init__(self, module: nn.Module, load: Callable[[], nn.Module]) -> None:
        self.module, self.load = module, load

    def park(self) -> None:
        self.module.to("meta")

    def bring(self) -> None:
        fresh = self.load()
        mine, theirs = dict(self.module.named_modules()), dict(fresh.named_modules())
        if mine.keys() != theirs.keys():
            raise InputError("the network read again has other modules than the one released")
        for name, module in mine.items():  # parameters and buffers, persistent or not
            module._parameters = theirs[name]._parameters
            module._buffers = theirs[name]._buffers


class Turns:
    """Networks that take turns on the device: calling one parks the one there before it. The
    lock is held over the whole call, so no network leaves while it computes."""

    def __init__(self, parked: Mapping[str, Parking], on: str | None) -> None:
        self.parked = dict(parked)
        self.on = on
        self.turns = 0  # how many times a network was brought in
        self.lock = threading.RLock()

    def hold(self, name: str) -> None:
        if self.on == name:
            return
        if self.on is not None:
            self.parked[self.on].park()
        self.parked[name].bring()
        self.on = name
        self.turns += 1


class TurnEngine:
    """An engine whose network takes turns on the device (``Turns``)."""

    def __init__(self, engine: ModuleEngine, member: str, turns: Turns) -> None:
        self.engine, self.member, self.turns = engine, member, turns
        self.name, self.module = engine.name, engine.module

    def hold(self) -> None:
        """Bring the network in now (``bench`` measures a call without the turn)."""
        with self.turns.lock:
            self.turns.hold(self.member)

    def __call__(self, **inputs: Tensor) -> dict[str, Tensor]:
        with self.turns.lock:  # re-entrant: held over the turn and the call
            self.hold()
            return self.engine(**inputs)

    def refit(
        self, weights: Mapping[str, Tensor], more: Mapping[str, Tensor] | None = None
    ) -> None:
        if isinstance(self.turns.parked[self.member], Reload):
            raise InputError(
                f"the {self.member} is released between its turns and read again from the "
                "model's files, which would drop LoRAs switched into it: switching LoRAs needs "
                "a budget that keeps it resident (a larger --max-vram)"
            )
        with self.turns.lock:
            self.engine.refit(weights, more)


class OnCpu:
    """The text encoder computing on the CPU beside networks on a GPU."""

    def __init__(self, engine: ModuleEngine, device: torch.device) -> None:
        self.engine, self.device = engine, device
        self.name, self.module = engine.name, engine.module

    def __call__(self, **inputs: Tensor) -> dict[str, Tensor]:
        out = self.engine(**{k: v.to("cpu") for k, v in inputs.items()})
        return {k: v.to(self.device) for k, v in out.items()}


def upcast_per_block(encoder: Qwen3TextEncoder, compute: torch.dtype = torch.float32) -> int:
    """Hooks on ``encoder`` (its weights in their stored dtype) that run each block with its
    weights upcast to ``compute`` and return the embedding's rows in ``compute`` (module
    docstring); returns the bytes one upcast block adds while it runs."""
    layers = encoder.model.layers

    def upcast(block: nn.Module, args: object) -> None:
        stored = {}
        for name, param in block.named_parameters():
            stored[name] = param.data
            param.data = param.data.to(compute)
        block.__dict__["_stored"] = stored

    def restore(block: nn.Module, args: object, out: Tensor) -> None:
        for name, param in block.named_parameters():
            param.data = block.__dict__["_stored"][name]
        del block.__dict__["_stored"]

    for block in layers:
        block.register_forward_pre_hook(upcast)
        block.register_forward_hook(restore)
    encoder.model.embed_tokens.register_forward_hook(lambda module, args, out: out.to(compute))
    return sum(p.numel() for p in layers[0].parameters()) * compute.itemsize
