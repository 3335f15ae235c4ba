"""Prompt encoding: ComfyUI's mask rule and the LRU prompt cache."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from zimage_trt.models.tokenizer import QwenTokenizer
from zimage_trt.runtime.text import PromptEncoder, attention_mask
from zimage_trt.workflow import load_workflow


class CountingEncoder:
    def __init__(self) -> None:
        self.seen: list[list[int]] = []

    def __call__(self, ids: Tensor, mask: Tensor) -> Tensor:
        self.seen.append(ids[0].tolist())
        return (ids.float() * mask.float()).unsqueeze(-1).expand(-1, -1, 4).clone()


@pytest.fixture(scope="module")
def tok() -> QwenTokenizer:
    return QwenTokenizer.from_package()


def test_mask_stops_at_the_first_endoftext() -> None:
    assert attention_mask([5, 6, 7]) == [1, 1, 1]
    assert attention_mask([5, 151643, 7, 151643]) == [1, 0, 0, 0]


def test_long_negative_prompt_is_encoded_once(tok: QwenTokenizer) -> None:
    negative = load_workflow("zimage-121101").prompts.negative_text()
    encoder = CountingEncoder()
    prompts = PromptEncoder(tok, encoder, cache_size=2)
    first = prompts(negative)
    assert first.shape[1] == len(tok.encode_prompt(negative)) > 1504  # longer than the RoPE table
    again = prompts(negative)
    assert again is first and prompts.encoder_calls == 1
    prompts("a cat")
    prompts("a dog")  # evicts the negative prompt (least recently used)
    prompts(negative)
    assert prompts.encoder_calls == 4
    assert encoder.seen[-1] == tok.encode_prompt(negative)


def test_empty_prompt_is_the_eight_template_tokens(tok: QwenTokenizer) -> None:
    encoder = CountingEncoder()
    hidden = PromptEncoder(tok, encoder)("")
    assert hidden.shape == (1, 8, 4)
    assert encoder.seen == [[151644, 872, 198, 151645, 198, 151644, 77091, 198]]


def test_cache_size_zero_disables_caching(tok: QwenTokenizer) -> None:
    prompts = PromptEncoder(tok, CountingEncoder(), cache_size=0)
    prompts("x")
    prompts("x")
    assert prompts.encoder_calls == 2
    with pytest.raises(ValueError, match=r"cache_size must be >= 0, got -1"):
        PromptEncoder(tok, CountingEncoder(), cache_size=-1)


def test_masked_tail_reaches_the_encoder(tok: QwenTokenizer) -> None:
    encoder = CountingEncoder()
    hidden = PromptEncoder(tok, encoder)("before<|endoftext|>after")
    ids = encoder.seen[0]
    cut = ids.index(151643)
    assert torch.all(hidden[0, cut:] == 0) and torch.all(hidden[0, :cut] != 0)
