"""The activation memory of one network call, measured from its real shapes on the ``meta``
device (no weights, no arithmetic): every tensor an op allocates is counted from the op's
return until the last tensor sharing its storage is garbage — the bytes an allocator would hold
for them — and the peak of that sum is the call's activation peak.

Weights (and any tensor made before the count starts) are not activations: an op's output that
aliases one (a transpose of a weight) is not counted. Attention is counted as a fused kernel
(flash / memory-efficient attention on a GPU, TensorRT's fused MHA): its output only, not the
L×L score matrix a composite CPU path would build. A convolution holds a copy of its input
while it runs (oneDNN reorders it into a blocked layout; cuDNN's workspace is of that order).
The same count on real CPU tensors gives the same number (tests/test_memory_plan.py).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CONVOLUTIONS = (torch.ops.aten.convolution.default,)


class ActivationCount(TorchDispatchMode):
    """Counts the live bytes of the tensors ops return while it is active; ``peak`` is the most
    at any moment, ``live`` what is still held when it ends (the call's outputs)."""

    def __init__(self) -> None:
        super().__init__()
        self._storages: dict[int, list[int]] = {}  # storage → [bytes, tensors holding it]
        self.live = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        held = self._storages.get(key)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            self.live -= held[0]
            del self._storages[key]

    def __torch_dispatch__(
        self, func: Any, types: Any, args: Any = (), kwargs: Any = None
    ) -> Any:  # fmt: skip
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage()._cdata
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, Tensor)
        }
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, Tensor):
                continue
            key = tensor.untyped_storage()._cdata
            held = self._storages.get(key)
            if held is None:
                if key in inputs:  # a view of a weight or an input: nothing allocated
                    continue
                held = self._storages[key] = [tensor.untyped_storage().nbytes(), 0]
                self.live += held[0]
                self.peak = max(self.peak, self.live)
            held[1] += 1
            weakref.finalize(tensor, self._release, key)
        if func in CONVOLUTIONS:  # the kernel's copy of its input in its own layout, meanwhile
            self.peak = max(self.peak, self.live + args[0].untyped_storage().nbytes())
        return out


def _fused_attention(q: Tensor, k: Tensor, v: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """What a fused attention kernel allocates: its output."""
    return torch.empty((*q.shape[:-1], v.shape[-1]), dtype=q.dtype, device=q.device)


@contextlib.contextmanager
def fused_attention() -> Iterator[None]:
    """``F.scaled_dot_product_attention`` counted as a fused kernel for the block."""
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_attention  # type: ignore[assignment]
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def activation_peak(call: Callable[[], object]) -> int:
    """The peak activation bytes of ``call()`` (run without gradients, attention fused)."""
    with torch.no_grad(), fused_attention(), ActivationCount() as count:
        result = call()
        del result
    return count.peak
