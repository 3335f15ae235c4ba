"""Prompt → Qwen hidden states, cached by text.

The text encoder is any callable ``(input_ids [1,L] int64, attention_mask [1,L] int64) →
hidden [1,L,C]`` (the engine of any backend). Encoded prompts are kept in an LRU cache keyed by
the prompt text: the long Chinese negative prompt is encoded once per process, not per request.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor

from zimage_trt.runtime.tokenizer import PAD_ID, QwenTokenizer

TextEncoderFn = Callable[[Tensor, Tensor], Tensor]


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
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.cache_size = cache_size
        self.device = device
        self.encoder_calls = 0
        self._cache: OrderedDict[str, Tensor] = OrderedDict()

    def __call__(self, prompt: str) -> Tensor:
        """Hidden states [1, L, C] of the prompt wrapped in the chat template."""
        hit = self._cache.get(prompt)
        if hit is not None:
            self._cache.move_to_end(prompt)
            return hit
        ids = self.tokenizer.encode_prompt(prompt)
        input_ids = torch.tensor([ids], dtype=torch.int64, device=self.device)
        mask = torch.tensor([attention_mask(ids)], dtype=torch.int64, device=self.device)
        with torch.inference_mode():
            hidden = self.encoder(input_ids, mask)
        self.encoder_calls += 1
        if self.cache_size:
            self._cache[prompt] = hidden
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return hidden

    def clear(self) -> None:
        self._cache.clear()
