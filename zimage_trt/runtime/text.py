"""Prompt → Qwen hidden states, cached by text.

The text encoder is any callable ``(input_ids [1,L] int64, attention_mask [1,L] int64) →
hidden [1,L,C]`` (the engine of any backend). Encoded prompts are kept in an LRU cache keyed by
the prompt text: the long Chinese negative prompt is encoded once per process, not per request.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

import torch
from torch import Tensor

from zimage_trt.errors import InputError
from zimage_trt.models.tokenizer import PAD_ID, QwenTokenizer

TextEncoderFn = Callable[[Tensor, Tensor], Tensor]
V = TypeVar("V")


class LRUCache(Generic[V]):
    """Values by prompt text, least recently used evicted first; size 0 caches nothing."""

    def __init__(self, size: int) -> None:
        if size < 0:
            raise InputError(f"cache_size must be >= 0, got {size}")
        self.size = size
        self._items: OrderedDict[str, V] = OrderedDict()

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def get_or_make(self, key: str, make: Callable[[], V]) -> V:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = make()
        if self.size:
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        self._items.clear()


def attention_mask(ids: list[int]) -> list[int]:
    """ComfyUI's rule: 1 up to the first ``<|endoftext|>`` (the pad id), 0 from it on.

    Ordinary prompts contain no such token, so the mask is all ones (comfyui-semantics §3.3).
    """
    cut = ids.index(PAD_ID) if PAD_ID in ids else len(ids)
    return [1] * cut + [0] * (len(ids) - cut)


class PromptEncoder:
    """Tokenise, encode and cache prompts; ``encoder_calls`` counts real encoder runs."""

    def __init__(
        self,
        tokenizer: QwenTokenizer,
        encoder: TextEncoderFn,
        cache_size: int = 16,
        device: torch.device | str = "cpu",
    ) -> None:
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.device = device
        self.encoder_calls = 0
        self.cache: LRUCache[Tensor] = LRUCache(cache_size)

    def __call__(self, prompt: str) -> Tensor:
        """Hidden states [1, L, C] of the prompt wrapped in the chat template."""
        return self.cache.get_or_make(prompt, lambda: self._encode(prompt))

    def _encode(self, prompt: str) -> Tensor:
        ids = self.tokenizer.encode_prompt(prompt)
        input_ids = torch.tensor([ids], dtype=torch.int64, device=self.device)
        mask = torch.tensor([attention_mask(ids)], dtype=torch.int64, device=self.device)
        with torch.inference_mode():
            hidden = self.encoder(input_ids, mask)
        self.encoder_calls += 1
        return hidden
