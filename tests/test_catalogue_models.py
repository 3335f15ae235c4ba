"""Damaged, wrong or missing model files (issue 12, audit cases 66–84): each refused with one line
naming the file, the exit code of its kind (3 for a damaged, unreadable or missing file), no
traceback, and no image written.

The damaged files are made from the tiny model (the ``--model tiny`` folder, shared by every test
here): a case builds, in its scratch folder, a model folder of links to the tiny one with only the
damaged file copied. Cases refused before any network loads go through the ``refused`` fixture;
those that can only be found while loading (keys, shapes, NaN values, a GGUF's data) run through
``main(argv)`` here and assert the same things except "no model loaded".
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import Tensor

from tests.conftest import Case
from zimage_trt.cli import main
from zimage_trt.errors import InputError
from zimage_trt.models.lora import LoraMatchError, fuse_loras, load_lora
from zimage_trt.models.safetensors_io import (
    CheckpointError,
    read_safetensors_header,
    save_safetensors,
)
from zimage_trt.models.tiny import TinyPaths, tiny_model_dir
from zimage_trt.workflow import load_workflow

DIT = "transformer/diffusion_pytorch_model.safetensors"
INDEX = "diffusion_pytorch_model.safetensors.index.json"
REFETCH = "(an interrupted download?); download or copy it again"
GGUF_REFETCH = "it is truncated or damaged (an interrupted download?): download or copy it again"


@pytest.fixture(scope="module", autouse=True)
def _tiny_model() -> None:
    """The tiny model every case damages a copy of: the ``--model tiny`` folder, made once in
    zimage-trt's cache and only read here (cases link to it and copy what they damage)."""
    tiny_model_dir()


def _tiny() -> TinyPaths:
    return TinyPaths.at(tiny_model_dir())


class _Payload:
    """A pickle that runs ``touch pwned`` (in the current folder) when it is unpickled."""

    def __reduce__(self) -> tuple[Callable[[str], int], tuple[str]]:
        return (os.system, ("touch pwned",))


PICKLE = pickle.dumps(_Payload(), protocol=4)
_EMPTY = struct.pack("<Q", 8) + b"{}      "  # a well-formed safetensors file of no tensors


# ----------------------------------------------------------------------------------------------
# Building damaged files


def _model(d: Path, component: str | None = None, files: dict[str, bytes] | None = None) -> str:
    """``d/m``: the tiny model folder as links; ``component``'s folder is rebuilt from links to
    its files but its weights, and ``files`` (name → bytes) are written there instead."""
    src, root = tiny_model_dir(), d / "m"
    root.mkdir()
    for entry in src.iterdir():
        if entry.name != component:
            (root / entry.name).symlink_to(entry)
    if component is not None:
        (root / component).mkdir()
        for entry in (src / component).iterdir():
            if entry.name not in (files or {}) and not entry.name.endswith(".safetensors"):
                (root / component / entry.name).symlink_to(entry)
        for name, data in (files or {}).items():
            (root / component / name).write_bytes(data)
    return str(root)


def _dit_bytes() -> bytes:
    return (tiny_model_dir() / DIT).read_bytes()


def _header(data: bytes) -> dict[str, dict[str, object]]:
    (size,) = struct.unpack("<Q", data[:8])
    header: dict[str, dict[str, object]] = json.loads(data[8 : 8 + size])
    return header


def _with_header(data: bytes, edit: Callable[[dict[str, dict[str, object]]], None]) -> bytes:
    """``data`` (a safetensors file) with its JSON header edited, the tensor data unchanged."""
    (size,) = struct.unpack("<Q", data[:8])
    header = _header(data)
    edit(header)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + data[8 + size :]


def _offsets(header: dict[str, dict[str, object]], key: str) -> list[int]:
    offsets = header[key]["data_offsets"]
    assert isinstance(offsets, list)
    return [int(x) for x in offsets]


def _last_tensor(data: bytes) -> str:
    header = _header(data)
    header.pop("__metadata__", None)
    return max(header, key=lambda key: _offsets(header, key)[1])


def _truncated(data: bytes) -> bytes:
    return data[: len(data) * 6 // 10]


def _big_cap_embedder(header: dict[str, dict[str, object]]) -> None:
    header["cap_embedder.1.weight"]["shape"] = [2**20, 2**20]


def _past_eof(header: dict[str, dict[str, object]]) -> None:
    begin, end = _offsets(header, "cap_embedder.1.weight")
    header["cap_embedder.1.weight"]["data_offsets"] = [begin + 10**9, end + 10**9]


def _damaged_dit(d: Path, data: bytes) -> list[str]:
    """``generate --model`` on the tiny model with its diffusers DiT file replaced by ``data``."""
    return _generate(d, "--model", _model(d, "transformer", {Path(DIT).name: data}))


def _sharded(d: Path, drop: tuple[str, ...] = (), second_shard: bool = False) -> str:
    """A model whose DiT is an index and its shards: shard 1 of 2 only (shard 2 deleted), or a
    single shard missing the ``drop`` keys the index still lists."""
    weights = load_file(str(tiny_model_dir() / DIT))
    names = sorted(weights)
    if second_shard:
        shards = [f"diffusion_pytorch_model-0000{i}-of-00002.safetensors" for i in (1, 2)]
        weight_map = {k: shards[i >= len(names) // 2] for i, k in enumerate(names)}
    else:
        weight_map = dict.fromkeys(names, "diffusion_pytorch_model-00001-of-00001.safetensors")
    root = _model(d, "transformer", {INDEX: json.dumps({"weight_map": weight_map}).encode()})
    first = sorted(set(weight_map.values()))[0]
    kept = {k: weights[k] for k in names if weight_map[k] == first and k not in drop}
    save_safetensors(Path(root) / "transformer" / first, kept)
    return root


def _workflow(path: Path, **models: object) -> str:
    """A one-stage 64×64, one-step workflow with these models (and no LoRAs), written to path."""
    data = load_workflow("zimage-turbo").to_dict()
    data["models"] = {"loras": [], **{k: str(v) for k, v in models.items()}}
    data["stages"][0]["latent"].update(width=64, height=64)
    data["stages"][0]["scheduler"]["steps"] = 1
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return str(path)


def _single_files(d: Path, **replace: Path | bytes) -> str:
    """A single-file workflow (ComfyUI names) on the tiny files, ``replace`` naming other files
    (a path) or damaged copies (bytes) for transformer, text_encoder or vae."""
    tiny = _tiny()
    models: dict[str, object] = {
        "transformer": tiny.transformer,
        "text_encoder": tiny.text_encoder,
        "vae": tiny.vae,
    }
    for role, value in replace.items():
        if isinstance(value, bytes):
            target = d / (role + (".gguf" if role == "text_encoder" else ".safetensors"))
            target.write_bytes(value)
            value = target
        models[role] = value
    return _workflow(d / "w.yaml", **models)


def _gguf(edit: Callable[[bytes], bytes]) -> bytes:
    return edit(_tiny().text_encoder_gguf.read_bytes())


def _lora(d: Path, name: str, tensors: dict[str, Tensor] | None = None) -> str:
    """A LoRA file in ``d``: the tiny LoRA's tensors with ``tensors`` replacing or adding some."""
    base = load_file(str(_tiny().lora))
    path = d / name
    save_safetensors(path, {**base, **(tensors or {})})
    return str(path)


def _pickle(d: Path, name: str) -> str:
    (d / name).write_bytes(PICKLE)
    return str(d / name)


def _generate(d: Path, *more: str) -> list[str]:
    """``generate`` into ``d/out`` with the model-card workflow (no LoRA), with more arguments."""
    return ["generate", "-w", "zimage-turbo", "-p", "a cat", "-q", "--out", str(d / "out"), *more]


def _generate_wf(d: Path, workflow: str, *more: str) -> list[str]:
    return ["generate", "-w", workflow, "-p", "a cat", "-q", "--out", str(d / "out"), *more]


# ----------------------------------------------------------------------------------------------
# Refused before any network loads

#: a case's message, or a function giving it from the tiny model's file sizes
Message = str | Callable[[], str]


def _truncated_dit_message() -> str:
    data = _dit_bytes()
    return (
        f"{{d}}/m/{DIT}: truncated or damaged safetensors file: its header needs {len(data)} "
        f"bytes (to the end of tensor {_last_tensor(data)!r}), the file has "
        f"{len(_truncated(data))} {REFETCH}"
    )


def _header_cut_message() -> str:
    (size,) = struct.unpack("<Q", _dit_bytes()[:8])
    return (
        f"{{d}}/m/{DIT}: truncated safetensors file: its header needs {8 + size} bytes, the "
        f"file has 100 {REFETCH}"
    )


def _header_past_eof_message() -> str:
    return (
        f"{{d}}/m/{DIT}: truncated safetensors file: its header needs {8 + 90 * 2**20} bytes, "
        f"the file has {len(_dit_bytes())} {REFETCH}"
    )


def _huge_shape_message() -> str:
    begin, end = _offsets(_header(_dit_bytes()), "cap_embedder.1.weight")
    return (
        f"{{d}}/m/{DIT}: damaged safetensors file: tensor 'cap_embedder.1.weight' is F32 "
        f"[1048576, 1048576] (4398046511104 bytes) but its data_offsets [{begin}, {end}] hold "
        f"{end - begin} bytes; download or copy it again"
    )


def _offsets_past_eof_message() -> str:
    data = _with_header(_dit_bytes(), _past_eof)
    (size,) = struct.unpack("<Q", data[:8])
    end = _offsets(_header(data), "cap_embedder.1.weight")[1]
    return (
        f"{{d}}/m/{DIT}: truncated or damaged safetensors file: its header needs "
        f"{8 + size + end} bytes (to the end of tensor 'cap_embedder.1.weight'), the file has "
        f"{len(data)} {REFETCH}"
    )


def _gguf_count_message(tensors: int, kvs: int, needed: int) -> Callable[[], str]:
    def message() -> str:
        size = _tiny().text_encoder_gguf.stat().st_size
        return (
            f"{{d}}/text_encoder.gguf: not a readable GGUF file (its header lists {tensors} "
            f"tensors and {kvs} metadata entries, which need at least {needed} bytes; the file "
            f"has {size}); {GGUF_REFETCH}"
        )

    return message


def _truncated_lora_message() -> str:
    lora = _tiny().lora.read_bytes()
    return (
        f"LoRA {{d}}/lora.safetensors: truncated or damaged safetensors file: its header needs "
        f"{len(lora)} bytes (to the end of tensor {_last_tensor(lora)!r}), the file has "
        f"{len(_truncated(lora))} {REFETCH}"
    )


def _file_in(d: Path, name: str, data: bytes) -> str:
    (d / name).write_bytes(data)
    return str(d / name)


def _pickle_as(option: str, name: str) -> Callable[[Path], list[str]]:
    """``generate`` with a pickle as ``--model``, or as ``--lora`` on the tiny model folder."""

    def argv(d: Path) -> list[str]:
        model = [] if option == "--model" else ["--model", _model(d)]
        return _generate(d, *model, option, _pickle(d, name))

    return argv


def _pickle_message(name: str) -> str:
    suffix = Path(name).suffix
    return (
        f"{{d}}/{name}: unsupported weight format '{suffix}' (use .safetensors or .gguf; "
        "pickled .bin/.pt/.ckpt checkpoints are not loaded)"
    )


CASES: dict[str, tuple[Callable[[Path], list[str]], Message, int]] = {
    "66 generate: --model a folder that does not exist": (
        lambda d: _generate(d, "--model", "/nonexistent/model"),
        "model '/nonexistent/model' not found: it is neither a folder nor a Hugging Face repo "
        "id (owner/name)",
        3,
    ),
    "67 generate: --model a repo id not in the cache, HF_HUB_OFFLINE set": (
        lambda d: _generate(d, "--model", "someone/not-a-real-repo"),
        "model someone/not-a-real-repo is not in the cache (looked in "
        "{d}/hub/models--someone--not-a-real-repo) and HF_HUB_OFFLINE is set: download it with "
        "`hf download someone/not-a-real-repo` (huggingface_hub), or pass a local diffusers "
        "folder, or the ComfyUI single files (transformer, text_encoder, vae)",
        3,
    ),
    "68 generate: sharded DiT, shard 2 of 2 deleted": (
        lambda d: _generate(d, "--model", _sharded(d, second_shard=True)),
        "{d}/m: not a complete Z-Image diffusers folder: missing "
        "transformer/diffusion_pytorch_model-00002-of-00002.safetensors (shard 2 of 2 listed in "
        f"{INDEX})",
        3,
    ),
    "70 generate: DiT .safetensors truncated to 60 % (an interrupted download)": (
        lambda d: _damaged_dit(d, _truncated(_dit_bytes())),
        _truncated_dit_message,
        3,
    ),
    "71 generate: DiT truncated inside its header": (
        lambda d: _damaged_dit(d, _dit_bytes()[:100]),
        _header_cut_message,
        3,
    ),
    "71 generate: DiT header length 2^60": (
        lambda d: _damaged_dit(d, struct.pack("<Q", 2**60) + _dit_bytes()[8:]),
        f"{{d}}/m/{DIT}: not a safetensors file (header of 1152921504606846976 bytes)",
        3,
    ),
    "71 generate: DiT header length 90 MiB, past the end of the file": (
        lambda d: _damaged_dit(d, struct.pack("<Q", 90 * 2**20) + _dit_bytes()[8:]),
        _header_past_eof_message,
        3,
    ),
    "72 generate: DiT header claims cap_embedder.1.weight is 2^20×2^20": (
        lambda d: _damaged_dit(d, _with_header(_dit_bytes(), _big_cap_embedder)),
        _huge_shape_message,
        3,
    ),
    "73 generate: DiT data_offsets past the end of the file": (
        lambda d: _damaged_dit(d, _with_header(_dit_bytes(), _past_eof)),
        _offsets_past_eof_message,
        3,
    ),
    "74 generate: a pickle .pt as the workflow's transformer": (
        lambda d: _generate_wf(d, _single_files(d, transformer=Path(_pickle(d, "model.pt")))),
        _pickle_message("model.pt"),
        3,
    ),
    "74 generate: a pickle .bin as the workflow's text encoder": (
        lambda d: _generate_wf(d, _single_files(d, text_encoder=Path(_pickle(d, "model.bin")))),
        _pickle_message("model.bin"),
        3,
    ),
    "74 generate: a diffusers folder whose DiT is only a pickled .bin": (
        lambda d: _generate(
            d, "--model", _model(d, "transformer", {"diffusion_pytorch_model.bin": PICKLE})
        ),
        "{d}/m: not a complete Z-Image diffusers folder: missing "
        "transformer/diffusion_pytorch_model.safetensors (or .safetensors.index.json + shards)",
        3,
    ),
    "74 generate: a pickle renamed .safetensors as the workflow's transformer": (
        lambda d: _generate_wf(
            d, _single_files(d, transformer=Path(_pickle(d, "model.safetensors")))
        ),
        "{d}/model.safetensors: not a safetensors file (header of 647300224 bytes)",
        3,
    ),
    "74 generate: a pickle renamed .safetensors as a LoRA": (
        lambda d: _generate(d, "--model", _model(d), "--lora", _pickle(d, "lora.safetensors")),
        "LoRA {d}/lora.safetensors: not a safetensors file (header of 647300224 bytes)",
        3,
    ),
    "76 generate: GGUF text encoder truncated to 100 bytes": (
        lambda d: _generate_wf(d, _single_files(d, text_encoder=_gguf(lambda b: b[:100]))),
        "{d}/text_encoder.gguf: not a readable GGUF file (its header lists 46 tensors and 12 "
        f"metadata entries, which need at least 1284 bytes; the file has 100); {GGUF_REFETCH}",
        3,
    ),
    "76 generate: GGUF tensor count 2^62": (
        lambda d: _generate_wf(
            d,
            _single_files(
                d, text_encoder=_gguf(lambda b: b[:8] + struct.pack("<Q", 2**62) + b[16:])
            ),
        ),
        _gguf_count_message(2**62, 12, 110680464442257309876),
        3,
    ),
    "76 generate: GGUF metadata count 2^62": (
        lambda d: _generate_wf(
            d,
            _single_files(
                d, text_encoder=_gguf(lambda b: b[:16] + struct.pack("<Q", 2**62) + b[24:])
            ),
        ),
        _gguf_count_message(46, 2**62, 59951918239556043880),
        3,
    ),
    "82 generate: a LoRA truncated to 60 %": (
        lambda d: _generate(
            d,
            "--model",
            _model(d),
            "--lora",
            _file_in(d, "lora.safetensors", _truncated(_tiny().lora.read_bytes())),
        ),
        _truncated_lora_message,
        3,
    ),
    "83 generate: a LoRA that holds no tensors": (
        lambda d: _generate(
            d, "--model", _model(d), "--lora", _file_in(d, "empty.safetensors", _EMPTY)
        ),
        "LoRA {d}/empty.safetensors: holds no tensors (an empty or unfinished file); use a LoRA "
        "that was saved completely, or leave it out",
        3,
    ),
    "83 generate: --lora FILE:0.8x (a typo in the strength)": (
        lambda d: _generate(
            d, "--model", _model(d), "--lora", _lora(d, "style.safetensors") + ":0.8x"
        ),
        "LoRA file '{d}/style.safetensors:0.8x' not found (looked in {d})",
        3,
    ),
    "84 generate: --model FOLDER --lora a file that does not exist": (
        lambda d: _generate(d, "--model", _model(d), "--lora", "/nonexistent.safetensors"),
        "LoRA file '/nonexistent.safetensors' not found (looked in {d})",
        3,
    ),
}
for _suffix in (".ckpt", ".pt", ".bin"):
    CASES[f"74 generate: a pickle {_suffix} as --model"] = (
        _pickle_as("--model", f"model{_suffix}"),
        _pickle_message(f"model{_suffix}"),
        3,
    )
    CASES[f"74 generate: a pickle {_suffix} as a LoRA"] = (
        _pickle_as("--lora", f"lora{_suffix}"),
        f"LoRA '{{d}}/lora{_suffix}': only .safetensors LoRA files are supported",
        3,
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_refused_before_loading(
    case: str,
    refused: Callable[[Case], str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # where a pickle's payload would touch ./pwned
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # offline: nothing is made there
    build, message, code = CASES[case]
    refused((build, message if isinstance(message, str) else message(), code))
    assert not (tmp_path / "pwned").exists()


# ----------------------------------------------------------------------------------------------
# Refused while loading: the keys, shapes and values of a file are known only once it is read


def _nan_lora(d: Path) -> str:
    up = load_file(str(_tiny().lora))["lora_unet_layers_1_feed_forward_w1.lora_up.weight"]
    up[3, 1] = float("nan")
    up[7, 2] = float("inf")
    down = load_file(str(_tiny().lora))["lora_unet_noise_refiner_0_attention_out.lora_down.weight"]
    down[0, 0] = float("nan")  # sorts after the first bad key
    return _lora(
        d,
        "nan.safetensors",
        {
            "lora_unet_layers_1_feed_forward_w1.lora_up.weight": up,
            "lora_unet_noise_refiner_0_attention_out.lora_down.weight": down,
        },
    )


_W2 = "lora_unet_context_refiner_1_feed_forward_w2"
_NO_KEYS = {"foo.lora_up.weight": torch.zeros(4, 4), "foo.lora_down.weight": torch.zeros(4, 4)}
_EXTRA_KEYS = {
    "lora_unet_nothing_here.lora_up.weight": torch.zeros(4, 4),
    "lora_unet_nothing_here.lora_down.weight": torch.zeros(4, 4),
    "lora_unet_nope.alpha": torch.tensor(1.0),
}


def _only(d: Path, name: str, tensors: dict[str, Tensor]) -> str:
    save_safetensors(d / name, tensors)
    return str(d / name)


def _single_file_links(d: Path, **roles: Path) -> str:
    """A single-file workflow whose networks are links in ``d`` (``dit.safetensors`` …)."""
    models: dict[str, object] = {}
    for role, target in roles.items():
        link = d / f"{role}{target.suffix}"
        link.symlink_to(target)
        models[role] = link
    return _workflow(d / "w.yaml", **models)


_DIT_MARKERS = (
    "missing keys cap_embedder.1.weight, noise_refiner.0.attention.k_norm.weight (looked for "
    "the ComfyUI/original layout: cap_embedder.1.weight, noise_refiner.0.attention.k_norm.weight, "
    "optionally under a prefix such as 'model.diffusion_model.'; and the diffusers layout: "
    "cap_embedder.1.weight, layers.0.attention.to_q.weight)"
)

_T_EMBEDDER = ("t_embedder.mlp.0.bias", "t_embedder.mlp.2.bias", "t_embedder.mlp.2.weight")

LOADED: dict[str, tuple[Callable[[Path], list[str]], str, int]] = {
    "69 generate: the shard index lists 3 keys no shard holds": (
        lambda d: _generate(d, "--model", _sharded(d, drop=_T_EMBEDDER)),
        "{d}/m/transformer/diffusion_pytorch_model-00001-of-00001.safetensors: Z-Image DiT "
        "checkpoint (diffusers layout) is missing 3 key(s): t_embedder.mlp.0.bias, "
        "t_embedder.mlp.2.bias, t_embedder.mlp.2.weight",
        3,
    ),
    "75 generate: GGUF text encoder data truncated to 70 %": (
        lambda d: _generate_wf(
            d, _single_files(d, text_encoder=_gguf(lambda b: b[: len(b) * 7 // 10]))
        ),
        "{d}/text_encoder.gguf: not a readable GGUF file (cannot reshape array of size 3652828 "
        f"into shape (151936,34)); {GGUF_REFETCH}",
        3,
    ),
    "75 generate: a GGUF text encoder that is no GGUF": (
        lambda d: _generate_wf(d, _single_files(d, text_encoder=b"PK\x03\x04" * 64)),
        "{d}/text_encoder.gguf: not a readable GGUF file (GGUF magic invalid)",
        3,
    ),
    "77 generate: the DiT and VAE files swapped": (
        lambda d: _generate_wf(
            d,
            _single_file_links(
                d,
                transformer=_tiny().vae,
                text_encoder=_tiny().text_encoder,
                vae=_tiny().transformer,
            ),
        ),
        f"{{d}}/transformer.safetensors: not a Z-Image DiT checkpoint: {_DIT_MARKERS}; it holds "
        "240 tensors (decoder.conv_in.bias, decoder.conv_in.weight, decoder.conv_out.bias, …); "
        "it looks like a VAE",
        3,
    ),
    "78 generate: a LoRA whose keys match nothing": (
        lambda d: _generate(
            d, "--model", _model(d), "--lora", _only(d, "nothing.safetensors", _NO_KEYS)
        ),
        "LoRA 'nothing.safetensors': 2 key(s) match no DiT weight: foo.lora_down.weight, "
        "foo.lora_up.weight\npass --lora-ignore-unmatched to skip them",
        2,
    ),
    "78 generate: a LoRA with 3 extra keys": (
        lambda d: _generate(
            d, "--model", _model(d), "--lora", _lora(d, "extra.safetensors", _EXTRA_KEYS)
        ),
        "LoRA 'extra.safetensors': 3 key(s) match no DiT weight: lora_unet_nope.alpha, "
        "lora_unet_nothing_here.lora_down.weight, lora_unet_nothing_here.lora_up.weight\n"
        "pass --lora-ignore-unmatched to skip them",
        2,
    ),
    "79 generate: a LoRA of the wrong shapes": (
        lambda d: _generate(
            d,
            "--model",
            _model(d),
            "--lora",
            _lora(
                d,
                "shape.safetensors",
                {
                    f"{_W2}.lora_up.weight": torch.zeros(67, 4),
                    f"{_W2}.lora_down.weight": torch.zeros(4, 175),
                },
            ),
        ),
        f"LoRA 'shape.safetensors' key '{_W2}': up (67, 4) @ down (4, 175) does not fit "
        "'context_refiner.1.feed_forward.w2.weight' of shape (64, 170)",
        2,
    ),
    "79 generate: a LoRA whose A and B ranks differ": (
        lambda d: _generate(
            d,
            "--model",
            _model(d),
            "--lora",
            _lora(
                d,
                "rank.safetensors",
                {
                    f"{_W2}.lora_up.weight": torch.zeros(67, 9),
                    f"{_W2}.lora_down.weight": torch.zeros(7, 175),
                },
            ),
        ),
        f"LoRA 'rank.safetensors' key '{_W2}': up (67, 9) @ down (7, 175) does not fit "
        "'context_refiner.1.feed_forward.w2.weight' of shape (64, 170)",
        2,
    ),
    "81 generate: a LoRA whose weights are NaN": (
        lambda d: _generate(d, "--model", _model(d), "--lora", _nan_lora(d)),
        "LoRA {d}/nan.safetensors: 'lora_unet_layers_1_feed_forward_w1.lora_up.weight' holds 2 "
        "NaN/Inf value(s) of 680; the file is damaged or was saved from a diverged training: use "
        "another copy or another LoRA",
        3,
    ),
}


@pytest.mark.parametrize("case", sorted(LOADED))
def test_refused_while_loading(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exit code, the exact last line(s), no traceback, no image, nothing sampled."""
    build, message, code = LOADED[case]
    argv = build(tmp_path)
    capsys.readouterr()
    assert main(argv) == code
    err = capsys.readouterr().err
    lines = f"zimage-trt: error: {message}".replace("{d}", str(tmp_path)).splitlines()
    assert err.splitlines()[-len(lines) :] == lines
    assert "Traceback" not in err and "loading the VAE" not in err  # (loaded last) no step ran
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_84_tiny_substitutes_its_lora_for_a_missing_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--model tiny`` applies the tiny LoRA in place of the workflow's (documented): a LoRA
    file that does not exist is not looked for, and the run says so."""
    workflow = _workflow(tmp_path / "w.yaml")
    argv = _generate_wf(tmp_path, workflow, "--model", "tiny", "--lora", "/nonexistent.safetensors")
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert err.splitlines()[0] == (
        "--model tiny: applying the tiny LoRA in place of 1 workflow LoRA(s)"
    )
    assert "fused 1 LoRA(s) into 4 weights" in err.splitlines()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["zimage-turbo_00001_.png"]


# ----------------------------------------------------------------------------------------------
# The checks behind these refusals, one by one


def test_81_fused_weights_that_overflow_are_refused() -> None:
    """A finite LoRA whose delta overflows the weight's dtype is refused, naming weight and LoRA,
    rather than fused as Inf."""
    weights = {"layers.0.attention.out.weight": torch.zeros(8, 8)}
    huge = {
        "lora_unet_layers_0_attention_out.lora_up.weight": torch.full((8, 1), 3e38),
        "lora_unet_layers_0_attention_out.lora_down.weight": torch.full((1, 8), 2.0),
    }
    with pytest.raises(InputError) as err:
        fuse_loras(weights, [(load_lora(huge), 1.0)])
    assert str(err.value) == (
        "fusing LoRA <state dict> at 1 into 'layers.0.attention.out.weight' gives NaN/Inf "
        "values in torch.float32: lower the strength"
    )


def test_81_nan_in_unused_keys_is_not_looked_at() -> None:
    """Keys skipped with --lora-ignore-unmatched are never used, so their values do not count."""
    weights = {"layers.0.attention.out.weight": torch.zeros(8, 8)}
    lora = load_lora(
        {
            "lora_unet_layers_0_attention_out.lora_up.weight": torch.ones(8, 1),
            "lora_unet_layers_0_attention_out.lora_down.weight": torch.ones(1, 8),
            "lora_unet_elsewhere.lora_up.weight": torch.full((8, 1), float("nan")),
            "lora_unet_elsewhere.lora_down.weight": torch.ones(1, 8),
        }
    )
    fused = fuse_loras(weights, [(lora, 0.5)], ignore_unmatched=True)
    assert torch.equal(fused["layers.0.attention.out.weight"], torch.full((8, 8), 0.5))
    with pytest.raises(LoraMatchError, match="2 key"):  # not ignored: they match nothing
        fuse_loras(weights, [(lora, 0.5)])


def _gap(header: dict[str, dict[str, object]]) -> None:
    header["a"].update(data_offsets=[40, 48])
    header["b"].update(shape=[2, 4], data_offsets=[0, 32])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda data: data + b"\0\0",
            "damaged safetensors file: its header describes {n} bytes, the file has {n_plus_2}",
        ),
        (
            lambda data: _with_header(data, lambda h: h["b"].update(data_offsets=[8, 40])),
            "damaged safetensors file: tensor 'b' is F32 [4, 4] (64 bytes) but its data_offsets "
            "[8, 40] hold 32 bytes",
        ),
        (
            lambda data: _with_header(data, _gap),
            "damaged safetensors file: tensor 'a' at data_offsets [40, 48] leaves a gap after 'b'",
        ),
        (
            lambda data: _with_header(data, lambda h: h["a"].update(shape=[-2])),
            "not a safetensors file (entry 'a')",
        ),
    ],
    ids=["70 trailing bytes", "72 shape and offsets disagree", "73 a gap", "72 negative dim"],
)
def test_safetensors_header_checks(
    tmp_path: Path, edit: Callable[[bytes], bytes], message: str
) -> None:
    """The header is checked against the file as the safetensors reader would, each failure
    named (not left to the reader's "incomplete metadata, file not fully covered")."""
    path = tmp_path / "w.safetensors"
    save_safetensors(path, {"a": torch.ones(2), "b": torch.ones(4, 4)})
    n = path.stat().st_size
    path.write_bytes(edit(path.read_bytes()))
    with pytest.raises(CheckpointError) as err:
        read_safetensors_header(path)
    suffix = "" if message.startswith("not a") else "; download or copy it again"
    assert str(err.value) == f"{path}: {message.format(n=n, n_plus_2=n + 2)}{suffix}"
