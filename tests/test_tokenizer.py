"""The Qwen tokenizer: ComfyUI's ids, and transformers' Qwen2 tokenizer as an independent oracle."""

from __future__ import annotations

import json
import time
import unicodedata
from pathlib import Path

import pytest

from zimage_trt.models.tokenizer import (
    FIRST_SPECIAL_ID,
    SPECIAL_TOKENS,
    QwenTokenizer,
)

SAMPLES = [
    "",
    "a cat",
    "A photo of an astronaut riding a horse on Mars, 8k, highly detailed.",
    "一只橘猫坐在窗台上，阳光明媚。",
    "动漫风，二次元，漫画风，插画风，低清晰度，模糊，失焦，噪点严重，网红脸，影楼风，stock photo",
    "mixed 中文 and English, numbers 12345 and 3.14159, émojis 🎨🚀",
    "line one\nline two\n\n  indented\ttab   spaces  ",
    "don't can't I'LL we've",
    "\\(escaped parens\\) and (real ones)",
    unicodedata.normalize("NFD", "café naïve Ångström"),
    "<|im_end|> inside a prompt",
]


@pytest.fixture(scope="module")
def tok() -> QwenTokenizer:
    return QwenTokenizer.from_package()


def test_comfyui_ids(tok: QwenTokenizer) -> None:
    """comfyui-semantics §3.2: ids measured in ComfyUI."""
    assert tok.encode_prompt("") == [151644, 872, 198, 151645, 198, 151644, 77091, 198]
    assert len(tok.encode_prompt("a cat")) == 10
    assert len(tok.encode_prompt("猫" * 2500)) == 2508
    assert (tok.encode("user"), tok.encode("\n"), tok.encode("assistant")) == (
        [872],
        [198],
        [77091],
    )


def test_chinese_sentence_ids(tok: QwenTokenizer) -> None:
    ids = tok.encode_prompt("一只橘猫坐在窗台上，阳光明媚。")
    assert ids == [
        151644,
        872,
        198,
        102292,
        114088,
        100472,
        104427,
        100237,
        108141,
        3837,
        104166,
        117716,
        1773,
        151645,
        198,
        151644,
        77091,
        198,
    ]
    assert tok.decode(ids[3:-5]) == "一只橘猫坐在窗台上，阳光明媚。"


def test_vocabulary_and_specials(tok: QwenTokenizer) -> None:
    assert tok.vocab_size == 151643 + len(SPECIAL_TOKENS) == 151665
    assert tok.specials["<|file_sep|>"] == 151664
    assert tok.encode("<|endoftext|>") == [FIRST_SPECIAL_ID]


@pytest.fixture(scope="module")
def hf_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """vocab.json + merges.txt (ComfyUI's qwen25_tokenizer format) derived from the BPE ranks."""
    from zimage_trt.models.tokenizer_files import bpe_merges, byte_level, packaged_ranks

    ranks = packaged_ranks()
    start = time.perf_counter()
    merges = [f"{byte_level(left)} {byte_level(right)}" for left, right in bpe_merges(ranks)]
    assert time.perf_counter() - start < 60
    folder = tmp_path_factory.mktemp("qwen25")
    (folder / "vocab.json").write_text(json.dumps({byte_level(t): r for t, r in ranks.items()}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def test_matches_transformers_qwen2_tokenizer(tok: QwenTokenizer, hf_files: Path) -> None:
    """ComfyUI tokenises with transformers' Qwen2Tokenizer from vocab.json + merges.txt."""
    from transformers import Qwen2Tokenizer

    hf = Qwen2Tokenizer.from_pretrained(
        str(hf_files),
        unk_token=None,
        bos_token=None,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    hf.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    assert hf.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(151643, 151665))
    for prompt in SAMPLES:
        template = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
        assert tok.encode(template) == hf(template)["input_ids"], prompt


def test_tokenizer_json_source_gives_the_same_ids(
    tok: QwenTokenizer, hf_files: Path, tmp_path: Path
) -> None:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    bpe = models.BPE.from_file(str(hf_files / "vocab.json"), str(hf_files / "merges.txt"))
    hf = Tokenizer(bpe)
    hf.normalizer = normalizers.NFC()
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(list(SPECIAL_TOKENS))
    folder = tmp_path / "model" / "tokenizer"
    folder.mkdir(parents=True)
    hf.save(str(folder / "tokenizer.json"))
    from_json = QwenTokenizer.load(tmp_path / "model")
    assert from_json.specials == tok.specials
    for prompt in SAMPLES:
        assert from_json.encode_prompt(prompt) == tok.encode_prompt(prompt)


def test_not_a_bpe_tokenizer_json(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"model": {"type": "Unigram", "vocab": []}}))
    with pytest.raises(ValueError) as err:
        QwenTokenizer.from_tokenizer_json(path)
    assert str(err.value) == f"{path}: not a byte-level BPE tokenizer.json (model.type 'Unigram')"


def test_added_tokens_match_comfyui_whatever_their_special_flag(tmp_path: Path) -> None:
    """Qwen3's tokenizer.json marks <tool_call>… as special: false; transformers (and ComfyUI)
    still match them as single ids. Qwen3's <think> is not in ComfyUI's set: plain text."""
    from zimage_trt.models.tokenizer_files import write_tokenizer

    write_tokenizer(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    for token in data["added_tokens"]:
        token["special"] = token["content"] in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    data["added_tokens"].append(
        {
            "id": 151667,
            "content": "<think>",
            "special": False,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
        }
    )
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    packaged = QwenTokenizer.from_package()
    from_json = QwenTokenizer.load(tmp_path)
    text = "<think> <tool_call>"
    assert from_json.encode(text) == packaged.encode(text) == [13708, 766, 29, 220, 151657]
