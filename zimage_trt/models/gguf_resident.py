"""A GGUF DiT whose Linear weights stay quantized in memory — Q8_0 at 1.06 bytes a value, Q4_K
at 0.56 — and are dequantized one layer at a time inside the forward, with ComfyUI-GGUF's
arithmetic (``gguf_quants.dequantize``: float16 block scales and products, then the compute
dtype). Each layer computes exactly what the dequantize-at-load model computes: the same
weight values, made just before use and dropped after (tests/test_gguf_resident.py).

Tensors the file keeps in a plain type (F32, F16, BF16: norms, biases, small embeddings) are
loaded as at load time; so is a quantized tensor that is not a Linear's weight.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zimage_trt.models import dit_keys
from zimage_trt.models.dit import ZImageDiT
from zimage_trt.models.gguf import open_dit_gguf, runtime_value
from zimage_trt.models.gguf_quants import dequantize
from zimage_trt.models.safetensors_io import CheckpointError

PLAIN = ("F32", "F16", "BF16")


class GGUFLinear(nn.Module):
    """A Linear whose weight is its GGUF blocks (a uint8 buffer, moved with the module) and is
    dequantized to ``dtype`` on every call; its bias (if any) is a plain parameter."""

    blocks: Tensor

    def __init__(self, blocks: Tensor, qtype: str, linear: nn.Linear, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("blocks", blocks)
        self.qtype, self.dtype = qtype, dtype
        self.out_features, self.in_features = linear.out_features, linear.in_features
        self.bias = linear.bias  # loaded with the plain tensors

    def weight_value(self) -> Tensor:
        """The weight as ComfyUI-GGUF computes it (what the dequantized model holds)."""
        return dequantize(self.blocks, self.qtype, (self.out_features, self.in_features),
                          self.dtype)  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight_value(), self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.qtype}, {self.blocks.numel()} B"


def load_dit_quantized(source: str | os.PathLike[str], dtype: torch.dtype) -> ZImageDiT:
    """The DiT of a ComfyUI-GGUF file (original layout) with its quantized Linear weights kept
    as GGUF blocks (``GGUFLinear``) and everything else loaded as ``load_dit`` loads it."""
    from zimage_trt.models.checkpoints import load_dit

    dit = load_dit(Path(source), dtype, meta=True)
    stored = open_dit_gguf(source)
    kept = dit_keys.normalize_original(dict.fromkeys(stored, torch.empty(0, device="meta")))
    tensors = {name: stored[name] for name in kept}  # norm_final (unused) left out
    modules = dict(dit.named_modules())
    plain: dict[str, Tensor] = {}
    for name, tensor in tensors.items():
        owner, _, leaf = name.rpartition(".")
        linear = modules.get(owner)
        if tensor.qtype in PLAIN or leaf != "weight" or not isinstance(linear, nn.Linear):
            plain[name] = runtime_value(tensor, "dit", dtype)
            continue
        if tuple(tensor.shape) != (linear.out_features, linear.in_features):
            raise CheckpointError(f"{source}: {name} has shape {tensor.shape}, the DiT "
                                  f"{tuple(linear.weight.shape)}")  # fmt: skip
        blocks = torch.from_numpy(np.array(tensor.raw, dtype=np.uint8))  # owned, not mapped
        parent, _, child = owner.rpartition(".")
        setattr(dit.get_submodule(parent) if parent else dit, child,
                GGUFLinear(blocks, tensor.qtype, linear, dtype))  # fmt: skip
    missing, unexpected = dit.load_state_dict(plain, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith(".blocks")]
    if missing or unexpected:
        raise CheckpointError(f"{source}: the GGUF DiT does not fit the model (missing "
                              f"{missing[:3]}, unexpected {unexpected[:3]})")  # fmt: skip
    return dit
