"""Find and load Z-Image from every layout users hold it in.

Where the files are (`resolve_model`, `model_files` → `ModelFiles`):

* a diffusers folder (``transformer/``, ``text_encoder/``, ``tokenizer/``, ``vae/``,
  ``scheduler/``; weights single or sharded with a ``*.safetensors.index.json``);
* a Hugging Face repo id (``Tongyi-MAI/Z-Image-Turbo``, optionally ``@revision``) from the local
  HF cache, downloaded only when allowed (online, ``HF_HUB_OFFLINE`` unset, ``huggingface_hub``
  installed);
* ComfyUI single files (``z_image_turbo_bf16.safetensors``, ``qwen_3_4b.safetensors`` or a
  ``.gguf``, ``ae.safetensors``), with the tokenizer from the packaged BPE ranks;
* ``tiny``: the random-weight test model of `zimage_trt.models.tiny`.

What is in them (`load_dit`, `load_text_encoder_weights`, `load_vae_weights`): the layout is
read off the tensor names (ComfyUI/original vs diffusers DiT, HF-style Qwen3 under any prefix,
BFL vs diffusers VAE), converted with the networks' own key maps, and cast to the requested
dtype. Safetensors are read one tensor at a time (`LazyStateDict`), so the 6B DiT never sits in
memory twice; fp8 weights (plain, or ComfyUI's ``scaled_fp8`` with per-layer ``scale_weight``)
are dequantized at load exactly as ComfyUI's ``scaled_fp8_ops`` do: ``w.to(dtype) *
scale.to(dtype)``. GGUF files go through `zimage_trt.models.gguf`.
"""

from __future__ import annotations

import json
import os
import re
import struct
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from zimage_trt.models import dit as dit_keys
from zimage_trt.models import text_encoder as te_keys
from zimage_trt.models import vae as vae_keys
from zimage_trt.models.dit import DiTConfig, ZImageDiT
from zimage_trt.models.text_encoder import Qwen3TextEncoder
from zimage_trt.models.vae import FluxVAE
from zimage_trt.runtime.tokenizer import QwenTokenizer

DEFAULT_REPO = "Tongyi-MAI/Z-Image-Turbo"
LISTED_KEYS = 10  # how many keys an error message names before summarising

# Diffusers component folders and the stem of their weight files.
COMPONENTS = {"transformer": "diffusion_pytorch_model", "text_encoder": "model",
              "vae": "diffusion_pytorch_model"}  # fmt: skip
HF_PATTERNS = ("model_index.json", "transformer/*", "text_encoder/*", "tokenizer/*", "vae/*",
               "scheduler/*")  # fmt: skip

# Layout markers: the keys that identify each network (under any prefix).
DIT_ORIGINAL_MARKERS = ("cap_embedder.1.weight", "noise_refiner.0.attention.k_norm.weight")
DIT_DIFFUSERS_MARKERS = ("cap_embedder.1.weight", "layers.0.attention.to_q.weight")
TE_MARKERS = ("layers.0.self_attn.q_proj.weight", "layers.0.self_attn.q_norm.weight")
VAE_MARKERS = ("decoder.conv_in.weight", "encoder.conv_in.weight")
# What a wrong file probably is, for the hint in a layout error (suffixes of its keys).
_LOOKS_LIKE = (
    (("cap_embedder.1.weight",), "the Z-Image DiT"),
    (("self_attn.q_norm.weight",), "a Qwen3 text encoder"),
    (("self_attn.q_proj.weight",), "a language-model text encoder"),
    (("decoder.conv_in.weight",), "a VAE"),
    (("input_blocks.0.0.weight",), "a Stable Diffusion UNet"),
    (("double_blocks.0.img_attn.qkv.weight",), "a FLUX transformer"),
    ((".lora_down.weight", ".lora_A.weight", ".lora_B.weight"), "a LoRA"),
)

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
_DTYPE_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_MAX_HEADER = 100 * 2**20  # a safetensors header beyond this is a corrupt or foreign file


class CheckpointError(ValueError):
    """A checkpoint that is not what it should be (wrong network, missing keys, bad file)."""


class ModelNotFoundError(CheckpointError, FileNotFoundError):
    """The model's files are not where the reference says, and could not be fetched."""


def key_list(keys: Iterable[str]) -> str:
    """The first `LISTED_KEYS` keys (sorted), then ``… (+N more)``."""
    ordered = sorted(keys)
    listed = ", ".join(ordered[:LISTED_KEYS])
    rest = len(ordered) - LISTED_KEYS
    return listed + (f", … (+{rest} more)" if rest > 0 else "")


# ----------------------------------------------------------------------------------------------
# Atomic writes


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path``, renamed onto it when the block succeeds (removed if it
    fails), so readers never see half a file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def save_safetensors(
    path: str | Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Write a safetensors file atomically, one tensor at a time (no second copy in memory).

    Written here rather than by ``safetensors.torch.save_file``, whose metadata order varies from
    run to run: these files are byte-for-byte reproducible (tensors and metadata sorted by name).
    """
    header: dict[str, Any] = {
        "__metadata__": dict(sorted({"format": "pt", **(metadata or {})}.items()))
    }
    offset = 0
    names = sorted(tensors)
    for name in names:
        tensor = tensors[name]
        if tensor.dtype not in _DTYPE_NAMES:
            raise ValueError(f"cannot save {name!r}: dtype {tensor.dtype} has no safetensors name")
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name in names:
            data = tensors[name].detach().to("cpu").contiguous().reshape(-1)
            f.write(data.view(torch.uint8).numpy().tobytes())


def write_text(path: str | Path, text: str) -> None:
    """UTF-8 text, written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data: Any, indent: int | None = 2) -> None:
    """JSON (``indent`` None: compact), written atomically."""
    separators = (",", ":") if indent is None else None
    write_text(
        path, json.dumps(data, indent=indent, separators=separators, ensure_ascii=False) + "\n"
    )


# ----------------------------------------------------------------------------------------------
# Reading safetensors lazily


@dataclass(frozen=True)
class _TensorInfo:
    file: Path
    stored_key: str
    dtype: torch.dtype
    shape: tuple[int, ...]


def read_safetensors_header(path: str | Path) -> tuple[dict[str, _TensorInfo], dict[str, str]]:
    """Tensor names, dtypes and shapes plus the ``__metadata__`` of a safetensors file, without
    reading any tensor data."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) != 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (size,) = struct.unpack("<Q", prefix)
            if size > _MAX_HEADER:
                raise CheckpointError(f"{path}: not a safetensors file (header of {size} bytes)")
            header = json.loads(f.read(size))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not a safetensors file ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    for key, entry in header.items():
        try:
            name, shape = entry["dtype"], tuple(int(d) for d in entry["shape"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: not a safetensors file (entry {key!r})") from None
        if name not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {name}")
        tensors[key] = _TensorInfo(path, key, _SAFETENSORS_DTYPES[name], shape)
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _is_fp8_marker(key: str) -> bool:
    # ComfyUI marks scaled-fp8 files with "<model prefix>scaled_fp8"
    return key.rsplit(".", 1)[-1] == "scaled_fp8"


def _quant_format(raw: Tensor) -> str:
    """The ``format`` of a ComfyUI ``.comfy_quant`` tensor (JSON as uint8 bytes)."""
    try:
        return str(json.loads(bytes(raw.tolist()).decode("utf-8")).get("format", ""))
    except (ValueError, AttributeError):
        return ""


class LazyStateDict(Mapping[str, Tensor]):
    """The tensors of a checkpoint (one safetensors file or a sharded set), each read from disk
    when asked for, cast to ``dtype`` (floating tensors only).

    fp8 weights are dequantized: with a ComfyUI scale (``<layer>.scale_weight``, or the newer
    ``<layer>.weight_scale``) to ``w.to(dtype) * scale.to(dtype)``, as ComfyUI's
    ``scaled_fp8_ops`` computes them, else to ``w.to(dtype)``. The scales, input scales, the
    ``scaled_fp8`` marker and ``.comfy_quant`` entries are not keys of the mapping.
    """

    def __init__(
        self,
        tensors: Mapping[str, _TensorInfo],
        dtype: torch.dtype,
        name: str,
        metadata: Mapping[str, str] | None = None,
        scales: Mapping[str, _TensorInfo] | None = None,
    ) -> None:
        self._tensors = dict(tensors)
        self._scales = dict(scales or {})
        self.dtype = dtype
        self.name = name  # the file (or index) named in error messages
        self.metadata = dict(metadata or {})
        self._handles: dict[Path, Any] = {}

    @classmethod
    def open(
        cls, files: Sequence[Path], dtype: torch.dtype, name: str | None = None
    ) -> LazyStateDict:
        """Index the safetensors ``files`` (shards of one checkpoint)."""
        raw: dict[str, _TensorInfo] = {}
        metadata: dict[str, str] = {}
        for file in files:
            tensors, meta = read_safetensors_header(file)
            raw.update(tensors)
            metadata.update(meta)
        label = name or (str(files[0]) if len(files) == 1 else f"{files[0].parent}")
        tensors, scales = {}, {}
        comfy_quant = [key for key in raw if key.endswith(".comfy_quant")]
        for key, info in raw.items():
            if key.endswith((".scale_weight", ".weight_scale")):
                scales[key.rsplit(".", 1)[0] + ".weight"] = info
            elif key.endswith(".weight_scale_2") or "quant_state.bitsandbytes" in key:
                raise CheckpointError(
                    f"{label}: {key!r} belongs to a 4-bit quantization (NVFP4 / bitsandbytes) "
                    "that zimage-trt does not load; use a bf16, fp8 or GGUF file"
                )
            elif not (
                _is_fp8_marker(key)
                or key.endswith((".scale_input", ".input_scale", ".comfy_quant"))
            ):
                tensors[key] = info
        out = cls(tensors, dtype, label, metadata, scales)
        # ComfyUI's mixed-precision files name each layer's format, per layer or in the metadata
        formats = {
            key.removesuffix(".comfy_quant"): _quant_format(out._read(raw[key]))
            for key in comfy_quant
        }
        if "_quantization_metadata" in metadata:
            try:
                layers = json.loads(metadata["_quantization_metadata"]).get("layers", {})
                formats.update({k: str(v.get("format", "")) for k, v in layers.items()})
            except (ValueError, AttributeError):
                raise CheckpointError(f"{label}: unreadable _quantization_metadata") from None
        for layer, fmt in sorted(formats.items()):
            if not fmt.startswith("float8"):
                raise CheckpointError(
                    f"{label}: layer {layer!r} is quantized as {fmt or 'an unknown format'}; "
                    "only float8 layers can be loaded"
                )
        return out

    def _read(self, info: _TensorInfo) -> Tensor:
        handle = self._handles.get(info.file)
        if handle is None:
            from safetensors import safe_open

            handle = self._handles[info.file] = safe_open(str(info.file), framework="pt")
        return handle.get_tensor(info.stored_key)

    def __getitem__(self, key: str) -> Tensor:
        info = self._tensors[key]
        tensor = self._read(info)
        if not (tensor.is_floating_point() or tensor.dtype in _FP8):
            return tensor
        scale_info = self._scales.get(key)
        if scale_info is not None:
            scale = self._read(scale_info).to(self.dtype)
            if scale.ndim == 1 and tensor.ndim > 1 and scale.numel() == tensor.shape[0]:
                scale = scale.reshape(-1, *([1] * (tensor.ndim - 1)))  # per output channel
            return tensor.to(self.dtype) * scale
        return tensor.to(self.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def stored_dtype(self, key: str) -> torch.dtype:
        return self._tensors[key].dtype

    def meta(self) -> dict[str, Tensor]:
        """Shape-only (``meta`` device) tensors in the load dtype: for reading a configuration or
        checking a key map without touching the data."""
        out = {}
        for key, info in self._tensors.items():
            dtype = info.dtype
            if info.dtype.is_floating_point:  # fp8 included
                dtype = self.dtype
            out[key] = torch.empty(info.shape, dtype=dtype, device="meta")
        return out

    def view(self, keys: Mapping[str, str]) -> LazyStateDict:
        """A view holding ``new name → stored name`` for the given keys (shares the files)."""
        out = LazyStateDict(
            {new: self._tensors[old] for new, old in keys.items()},
            self.dtype,
            self.name,
            self.metadata,
            {new: self._scales[old] for new, old in keys.items() if old in self._scales},
        )
        out._handles = self._handles
        return out


# ----------------------------------------------------------------------------------------------
# Which files hold a network


def _index_shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index}: not a safetensors index ({err})") from None
    shards = [index.parent / name for name in dict.fromkeys(weight_map.values())]
    missing = [p.name for p in shards if not p.is_file()]
    if missing:
        raise ModelNotFoundError(
            f"{index}: {len(missing)} shard(s) are missing: {key_list(missing)}"
        )
    return shards


def _folder_weights(folder: Path) -> Path | None:
    """The weights of a diffusers component folder: ``<stem>.safetensors.index.json`` or
    ``<stem>.safetensors`` (the diffusers / transformers stems), else a lone ``*.safetensors``."""
    for stem in dict.fromkeys(COMPONENTS.values()):
        for name in (f"{stem}.safetensors.index.json", f"{stem}.safetensors"):
            if (folder / name).is_file():
                return folder / name
    singles = sorted(folder.glob("*.safetensors"))
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return indexes[0]
    if len(singles) == 1:
        return singles[0]
    return None


def weight_files(source: str | Path) -> list[Path]:
    """The files holding a network: a safetensors file, the shards of an index, the weights of a
    diffusers component folder, or a ``.gguf`` file."""
    path = Path(source).expanduser()
    if path.is_dir():
        found = _folder_weights(path)
        if found is None:
            names = sorted({f"{s}.safetensors(.index.json)" for s in COMPONENTS.values()})
            raise ModelNotFoundError(
                f"{path}: no weights found (looked for {', '.join(names)} or a single "
                "*.safetensors file)"
            )
        path = found
    if not path.is_file():
        raise ModelNotFoundError(f"{path}: no such file")
    if path.name.endswith(".index.json"):
        return _index_shards(path)
    if path.suffix not in (".safetensors", ".gguf", ".sft"):
        raise CheckpointError(
            f"{path}: unsupported weight format {path.suffix!r} (use .safetensors or .gguf; "
            "pickled .bin/.pt/.ckpt checkpoints are not loaded)"
        )
    return [path]


def _config_json(source: Path, class_names: Sequence[str]) -> dict[str, Any]:
    """A diffusers/transformers ``config.json`` beside the weights, if it describes one of
    ``class_names`` (``_class_name`` or ``model_type``)."""
    folder = source if source.is_dir() else source.parent
    path = folder / "config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise CheckpointError(f"{path}: unreadable config ({err})") from None
    names = {config.get("_class_name"), config.get("model_type")}
    return dict(config) if names & set(class_names) else {}


def _open_weights(
    source: str | Path, dtype: torch.dtype, gguf_kind: Literal["dit", "text_encoder"] | None
) -> tuple[Mapping[str, Tensor], str, dict[str, str]]:
    """(tensors, name for messages, file metadata) of a checkpoint in any supported format;
    ``gguf_kind`` None: this network has no GGUF form."""
    files = weight_files(source)
    if files[0].suffix == ".gguf":
        if gguf_kind is None:
            raise CheckpointError(f"{files[0]}: this network is not loaded from GGUF files")
        from zimage_trt.models.gguf import load_gguf_state_dict

        try:
            state_dict, _arch = load_gguf_state_dict(files[0], dtype, gguf_kind)
        except ValueError as err:
            raise CheckpointError(str(err)) from err
        return state_dict, str(files[0]), {}
    path = Path(source).expanduser()
    name = str(path if path.is_file() else files[0] if len(files) == 1 else path)
    lazy = LazyStateDict.open(files, dtype, name)
    return lazy, name, lazy.metadata


def _shapes(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Shape-only stand-ins of a state dict (no data read for a `LazyStateDict`)."""
    if isinstance(sd, LazyStateDict):
        return sd.meta()
    return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in sd.items()}


def _find_prefix(keys: Iterable[str], markers: Sequence[str]) -> str | None:
    """The prefix under which all ``markers`` exist (``""`` for none), or None."""
    keys = set(keys)
    for key in keys:
        if key.endswith(markers[0]):
            prefix = key[: -len(markers[0])]
            if (not prefix or prefix.endswith(".")) and all(prefix + m in keys for m in markers):
                return prefix
    return None


def _select(sd: Mapping[str, Tensor], names: Mapping[str, str]) -> Mapping[str, Tensor]:
    """``new name → sd[old name]`` without reading anything from a `LazyStateDict`."""
    if isinstance(sd, LazyStateDict):
        return sd.view(names)
    return {new: sd[old] for new, old in names.items()}


def _strip(sd: Mapping[str, Tensor], prefix: str) -> Mapping[str, Tensor]:
    """The entries under ``prefix``, renamed without it (others, e.g. the VAE of an all-in-one
    checkpoint, are left out)."""
    if not prefix:
        return sd
    return _select(sd, {key[len(prefix) :]: key for key in sd if key.startswith(prefix)})


def _looks_like(keys: Iterable[str]) -> str:
    keys = list(keys)
    for suffixes, what in _LOOKS_LIKE:
        if any(k.endswith(suffixes) for k in keys):
            return f"; it looks like {what}"
    return ""


def _not_a(name: str, network: str, missing: Sequence[str], looked: str, keys: list[str]) -> str:
    sample = ", ".join(sorted(keys)[:3]) + (", …" if len(keys) > 3 else "")
    return (
        f"{name}: not a {network} checkpoint: missing keys {key_list(missing)} (looked for "
        f"{looked}); it holds {len(keys)} tensors ({sample}){_looks_like(keys)}"
    )


def _check_keys(
    name: str, what: str, found: Mapping[str, Tensor], expected: Mapping[str, Tensor]
) -> None:
    """Missing, unexpected or wrongly shaped tensors, named in the checkpoint's own layout."""
    missing = [k for k in expected if k not in found]
    if missing:
        raise CheckpointError(
            f"{name}: {what} is missing {len(missing)} key(s): {key_list(missing)}"
        )
    unexpected = [k for k in found if k not in expected]
    if unexpected:
        raise CheckpointError(
            f"{name}: {what} has {len(unexpected)} unexpected key(s): {key_list(unexpected)}"
        )
    wrong = [
        f"{k} {tuple(found[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in expected
        if tuple(found[k].shape) != tuple(expected[k].shape)
    ]
    if wrong:
        raise CheckpointError(
            f"{name}: {what} has {len(wrong)} tensor(s) of the wrong shape: {key_list(wrong)}"
        )


def _build(
    module_type: Callable[[Any], nn.Module], config: Any, weights: Mapping[str, Tensor]
) -> Any:
    with torch.device("meta"):
        module = module_type(config)
    module.load_state_dict(weights, strict=True, assign=True)
    module.requires_grad_(False)
    return module.eval()


# ----------------------------------------------------------------------------------------------
# The three networks


def _dit_config_overrides(config: DiTConfig, diffusers_config: Mapping[str, Any]) -> DiTConfig:
    """Hyper-parameters that leave no trace in the weights, from a diffusers ``config.json``."""
    fields: dict[str, Any] = {}
    for ours, theirs in (("n_heads", "n_heads"), ("rope_theta", "rope_theta"),
                         ("t_scale", "t_scale"), ("norm_eps", "norm_eps")):  # fmt: skip
        if theirs in diffusers_config:
            fields[ours] = type(getattr(config, ours))(diffusers_config[theirs])
    for name in ("axes_dims", "axes_lens"):
        if name in diffusers_config:
            fields[name] = tuple(int(v) for v in diffusers_config[name])
    if "all_patch_size" in diffusers_config:
        fields["patch_size"] = int(diffusers_config["all_patch_size"][0])
        fields["in_channels"] = config.patch_dim // fields["patch_size"] ** 2
    return replace(config, **fields)


def load_dit(
    source: str | Path, dtype: torch.dtype = torch.bfloat16, *, meta: bool = False
) -> ZImageDiT:
    """The Z-Image DiT from a ComfyUI/original single file (fused qkv, any key prefix such as
    ``model.diffusion_model.``), a diffusers ``transformer/`` folder or its (sharded) weights,
    an fp8 file or a GGUF, with its weights in ``dtype``. ``meta``: the same module on the
    ``meta`` device, without reading any weight (what the exporter traces)."""
    sd, name, _ = _open_weights(source, dtype, "dit")
    keys = list(sd)
    prefix = _find_prefix(keys, DIT_ORIGINAL_MARKERS)
    if prefix is not None:
        sd = _strip(sd, prefix)
        layout, to_original = "ComfyUI/original", dit_keys.normalize_original
    else:
        prefix = _find_prefix(keys, DIT_DIFFUSERS_MARKERS)
        if prefix is None:
            missing = [m for m in DIT_ORIGINAL_MARKERS if not any(k.endswith(m) for k in keys)]
            looked = (
                f"the ComfyUI/original layout: {', '.join(DIT_ORIGINAL_MARKERS)}, optionally "
                f"under a prefix such as {dit_keys.COMFY_PREFIX!r}; and the diffusers layout: "
                f"{', '.join(DIT_DIFFUSERS_MARKERS)}"
            )
            raise CheckpointError(_not_a(name, "Z-Image DiT", missing, looked, keys))
        sd = _strip(sd, prefix)
        layout, to_original = "diffusers", dit_keys.diffusers_to_original
    what = f"Z-Image DiT checkpoint ({layout} layout)"

    shapes = _shapes(sd)
    # What the architecture is read from; name it in the file's own layout if absent (Z-Image
    # always has q/k norms, whose width gives the head dim).
    required = (*dit_keys._REQUIRED_KEYS, "layers.0.attention.q_norm.weight")
    if layout == "diffusers":
        stand_ins = {k: torch.empty(3, device="meta") for k in required}
        names, found = list(dit_keys.original_to_diffusers(stand_ins)), shapes
    else:
        names, found = list(required), dit_keys.normalize_original(shapes)
    missing_required = [k for k in names if k not in found]
    if missing_required:
        raise CheckpointError(
            f"{name}: {what} is missing {len(missing_required)} key(s): "
            f"{key_list(missing_required)}"
        )
    probe = dict(shapes)
    if layout == "diffusers":  # stand-ins for absent k/v, so a gap is reported, not tripped on
        for key in shapes:
            if key.endswith(".attention.to_q.weight"):
                for part in ("to_k", "to_v"):
                    probe.setdefault(key.replace(".to_q.", f".{part}.", 1), shapes[key])
    config = dit_keys.config_from_state_dict(to_original(probe))
    config = _dit_config_overrides(
        config, _config_json(Path(source).expanduser(), ("ZImageTransformer2DModel",))
    )
    with torch.device("meta"):
        expected = ZImageDiT(config).to(dtype).state_dict()
    if layout == "diffusers":
        expected = dit_keys.original_to_diffusers(expected)
    _check_keys(name, what, found, expected)
    return _build(ZImageDiT, config, to_original(_shapes(sd) if meta else sd))


def load_text_encoder_weights(
    source: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    num_hidden_layers: int | None = None,
    *,
    meta: bool = False,
) -> Qwen3TextEncoder:
    """The Qwen3 text encoder (its first ``num_hidden_layers − 1`` blocks) from a transformers
    ``text_encoder/`` folder or its (sharded) weights, a ComfyUI single file, or a GGUF, with its
    weights in ``dtype``. Keys may sit under any prefix; the final norm, the LM head and the last
    block are never read. ``num_hidden_layers`` defaults to the folder's ``config.json``, else to
    what the file holds (see `text_encoder.config_from_state_dict`). ``meta``: on the meta
    device, no weight read."""
    sd, name, _ = _open_weights(source, dtype, "text_encoder")
    keys = list(sd)
    prefix = _find_prefix(keys, TE_MARKERS)
    if prefix is None:
        missing = ["model." + m for m in TE_MARKERS if not any(k.endswith(m) for k in keys)]
        looked = (
            "the Hugging Face / ComfyUI Qwen3 layout: "
            + ", ".join("model." + m for m in TE_MARKERS)
            + ", with or without 'model.' and under any prefix"
        )
        raise CheckpointError(_not_a(name, "Qwen3 text-encoder", missing, looked, keys))
    if prefix == "model." or prefix.endswith(".model."):
        prefix = prefix.removesuffix("model.")  # keep HF's own "model." (lm_head sits beside it)
    sd = _strip(sd, prefix)

    hf = _config_json(Path(source).expanduser(), ("qwen3",))
    rope = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta") or 1e6
    layers = num_hidden_layers or hf.get("num_hidden_layers")
    shapes = _shapes(sd)
    try:
        config = te_keys.config_from_state_dict(
            shapes, layers, float(rope), float(hf.get("rms_norm_eps", 1e-6))
        )
        _, ignored = te_keys.convert_state_dict(shapes, config)
    except ValueError as err:
        raise CheckpointError(f"{name}: {err}") from None
    # the ignored tensors (LM head, final norm, last block) are never read
    skip = set(ignored)
    used = _select(sd, {k: k for k in sd if k not in skip})
    weights, _ = te_keys.convert_state_dict(_shapes(used) if meta else used, config)
    return _build(Qwen3TextEncoder, config, weights)


def load_vae_weights(
    source: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    norm_num_groups: int | None = None,
    *,
    meta: bool = False,
) -> FluxVAE:
    """The Flux VAE from a diffusers ``vae/`` folder or file, or the BFL/ComfyUI
    ``ae.safetensors`` (any key prefix, e.g. ``first_stage_model.``), with its weights in
    ``dtype``. The GroupNorm group count leaves no trace in the weights: it comes from
    ``norm_num_groups``, else the folder's ``config.json``, else the file's ``norm_num_groups``
    metadata (the tiny model's), else 32 (the real Flux VAE). ``meta``: on the meta device, no
    weight read."""
    sd, name, metadata = _open_weights(source, dtype, None)
    keys = list(sd)
    prefix = _find_prefix(keys, VAE_MARKERS)
    if prefix is None:
        missing = [m for m in VAE_MARKERS if not any(k.endswith(m) for k in keys)]
        looked = f"{', '.join(VAE_MARKERS)} (either layout), under any prefix"
        raise CheckpointError(_not_a(name, "Flux VAE", missing, looked, keys))
    sd = _strip(sd, prefix)
    config_json = _config_json(Path(source).expanduser(), ("AutoencoderKL",))
    groups = int(
        norm_num_groups
        or config_json.get("norm_num_groups")
        or metadata.get("norm_num_groups")
        or 32
    )
    try:
        config = vae_keys.load_vae(_shapes(sd), norm_num_groups=groups).config  # checks keys
    except ValueError as err:
        raise CheckpointError(f"{name}: {err}") from None
    config = replace(
        config,
        scaling_factor=float(config_json.get("scaling_factor", config.scaling_factor)),
        shift_factor=float(config_json.get("shift_factor", config.shift_factor)),
    )
    vae = vae_keys.load_vae(_shapes(sd) if meta else sd, config)
    vae.requires_grad_(False)
    return vae


# ----------------------------------------------------------------------------------------------
# Where the files are


@dataclass(frozen=True)
class ModelFiles:
    """Where each part of a Z-Image model is: a diffusers component folder, a weights file
    (safetensors, an index of shards, GGUF) for each network; the tokenizer folder (None: the
    packaged Qwen BPE ranks); the scheduler config if the model has one; and whence it came."""

    transformer: Path
    text_encoder: Path
    vae: Path
    tokenizer: Path | None = None
    scheduler_config: Path | None = None
    origin: str = ""

    def load_tokenizer(self) -> QwenTokenizer:
        return QwenTokenizer.load(self.tokenizer)

    def weight_files(self) -> dict[str, list[Path]]:
        """Every file the weights are read from, per network (for cache keys)."""
        return {
            "transformer": weight_files(self.transformer),
            "text_encoder": weight_files(self.text_encoder),
            "vae": weight_files(self.vae),
        }


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, as ``huggingface_hub`` finds it."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser()
    return cache / "huggingface" / "hub"


_REPO_ID = re.compile(r"^([A-Za-z0-9][\w.-]*)/([\w.-]+)(?:@([\w./-]+))?$")


def _diffusers_missing(root: Path) -> list[str]:
    """What a Z-Image diffusers folder lacks (empty when complete)."""
    missing = []
    for component, stem in COMPONENTS.items():
        folder = root / component
        try:
            if folder.is_dir() and _folder_weights(folder) is not None:
                weight_files(folder)  # all shards present
                continue
        except CheckpointError:
            pass
        missing.append(f"{component}/{stem}.safetensors (or .safetensors.index.json + shards)")
    return missing


def _from_diffusers_folder(root: Path, origin: str) -> ModelFiles:
    missing = _diffusers_missing(root)
    if missing:
        raise ModelNotFoundError(
            f"{root}: not a complete Z-Image diffusers folder: missing {', '.join(missing)}"
        )
    tokenizer = root / "tokenizer"
    scheduler = root / "scheduler" / "scheduler_config.json"
    return ModelFiles(
        transformer=root / "transformer",
        text_encoder=root / "text_encoder",
        vae=root / "vae",
        tokenizer=tokenizer if (tokenizer / "tokenizer.json").is_file() else None,
        scheduler_config=scheduler if scheduler.is_file() else None,
        origin=origin,
    )


def _cached_snapshot(repo_dir: Path, revision: str | None) -> Path | None:
    snapshots = repo_dir / "snapshots"
    ref = repo_dir / "refs" / (revision or "main")
    if ref.is_file():
        commit = ref.read_text(encoding="utf-8").strip()
        return snapshots / commit if (snapshots / commit).is_dir() else None
    if revision is not None:
        return snapshots / revision if (snapshots / revision).is_dir() else None
    if not snapshots.is_dir():
        return None
    candidates = [p for p in snapshots.iterdir() if p.is_dir()]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def _from_hub(repo_id: str, revision: str | None, download: bool) -> ModelFiles:
    cache = hf_cache_dir()
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    label = repo_id + (f"@{revision}" if revision else "")
    snapshot = _cached_snapshot(repo_dir, revision)
    problem = "not in the cache"
    if snapshot is not None:
        missing = _diffusers_missing(snapshot)
        if not missing:
            return _from_diffusers_folder(snapshot, f"Hugging Face cache {label} ({snapshot})")
        problem = f"incomplete in the cache ({snapshot} lacks {', '.join(missing)})"
    how = (
        f"download it with `hf download {repo_id}` (huggingface_hub), or pass a local diffusers "
        "folder, or the ComfyUI single files (transformer, text_encoder, vae)"
    )
    why_offline = None
    if not download:
        why_offline = "downloading was not allowed"
    elif _env_flag("HF_HUB_OFFLINE"):
        why_offline = "HF_HUB_OFFLINE is set"
    if why_offline is None:
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            why_offline = "huggingface_hub is not installed (pip install huggingface_hub)"
    if why_offline is not None:
        raise ModelNotFoundError(
            f"model {label} is {problem} (looked in {repo_dir}) and {why_offline}: {how}"
        )
    try:
        path = snapshot_download(
            repo_id, revision=revision, cache_dir=cache, allow_patterns=list(HF_PATTERNS)
        )
    except Exception as err:  # network, auth, missing repo: all end the same way
        raise ModelNotFoundError(
            f"model {label} is {problem} (looked in {repo_dir}) and downloading it failed "
            f"({type(err).__name__}: {err}): {how}"
        ) from err
    return _from_diffusers_folder(Path(path), f"Hugging Face {label} (downloaded to {path})")


def resolve_model(ref: str | Path = DEFAULT_REPO, *, download: bool = True) -> ModelFiles:
    """The files of a Z-Image model named by ``ref``: a diffusers folder, a Hugging Face repo id
    (``owner/name`` or ``owner/name@revision``, from the local cache; fetched only if
    ``download`` and the environment allow), or ``tiny`` (the test model, made on first use).

    An existing path always wins over a repo id or ``tiny`` of the same spelling. Single files
    (ComfyUI) go through `model_files` instead.
    """
    path = Path(ref).expanduser()
    if path.is_dir():
        return _from_diffusers_folder(path.resolve(), f"diffusers folder {path.resolve()}")
    if path.is_file():
        raise CheckpointError(
            f"{path} is a single file; name all three networks with model_files(transformer=, "
            "text_encoder=, vae=) (the Workflow's models: section)"
        )
    text = str(ref)
    if text == "tiny":
        from zimage_trt.models.tiny import tiny_model_dir

        root = tiny_model_dir()
        return _from_diffusers_folder(root, f"tiny test model ({root})")
    match = _REPO_ID.match(text)
    if match is None:
        raise ModelNotFoundError(
            f"model {text!r} not found: it is neither a folder nor a Hugging Face repo id "
            "(owner/name)"
        )
    return _from_hub(f"{match[1]}/{match[2]}", match[3], download)


def _is_model_ref(ref: str | Path) -> bool:
    path = Path(ref).expanduser()
    if path.exists():
        return path.is_dir() and not _folder_weights(path)
    return str(ref) == "tiny" or _REPO_ID.match(str(ref)) is not None


def _find(ref: str | Path, search: Sequence[Path], subfolders: Sequence[str], role: str) -> Path:
    """``ref`` as given, else under each search folder (and its ComfyUI model sub-folders)."""
    path = Path(ref).expanduser()
    if path.exists() or path.is_absolute():
        if not path.exists():
            raise ModelNotFoundError(f"{role} {path}: no such file")
        return path
    looked = [path.resolve()]
    for base in search:
        for sub in ("", *subfolders):
            candidate = Path(base).expanduser() / sub / path
            if candidate.exists():
                return candidate
            looked.append(candidate)
    raise ModelNotFoundError(
        f"{role} {str(ref)!r} not found (looked in {', '.join(str(p) for p in looked)})"
    )


def model_files(
    transformer: str | Path,
    text_encoder: str | Path | None = None,
    vae: str | Path | None = None,
    tokenizer_dir: str | Path | None = None,
    search: Sequence[str | Path] = (),
) -> ModelFiles:
    """The files named by a Workflow's ``models:`` section.

    ``transformer`` is a single file (``z_image_turbo_bf16.safetensors``, fp8, ``.gguf``), a
    ``transformer/`` folder, or a whole model (anything `resolve_model` takes), whose text
    encoder and VAE ``text_encoder`` / ``vae`` then override. With a single-file transformer
    both are required (``qwen_3_4b.safetensors`` or ``.gguf``; ``ae.safetensors``). Relative
    names not found as given are looked up in each ``search`` folder and its ComfyUI model
    sub-folders (``diffusion_models``, ``text_encoders``, ``vae`` …). The tokenizer comes from
    ``tokenizer_dir``, else the model folder, else the packaged Qwen BPE ranks.
    """
    folders = [Path(p) for p in search]
    tokenizer = None
    if tokenizer_dir is not None:
        tokenizer = Path(tokenizer_dir).expanduser()
        if (tokenizer / "tokenizer" / "tokenizer.json").is_file():
            tokenizer = tokenizer / "tokenizer"
        if not (tokenizer / "tokenizer.json").is_file():
            raise ModelNotFoundError(f"tokenizer folder {tokenizer} has no tokenizer.json")
    if _is_model_ref(transformer):
        base = resolve_model(transformer)
        return ModelFiles(
            transformer=base.transformer,
            text_encoder=base.text_encoder
            if text_encoder is None
            else _find(text_encoder, folders, ("text_encoders", "clip"), "text encoder"),
            vae=base.vae if vae is None else _find(vae, folders, ("vae",), "VAE"),
            tokenizer=tokenizer or base.tokenizer,
            scheduler_config=base.scheduler_config,
            origin=base.origin,
        )
    if text_encoder is None or vae is None:
        missing = [n for n, v in (("text_encoder", text_encoder), ("vae", vae)) if v is None]
        raise CheckpointError(
            f"a single-file transformer ({transformer}) needs the other networks' files too: "
            f"give {' and '.join(missing)} (e.g. qwen_3_4b.safetensors, ae.safetensors)"
        )
    dit_path = _find(transformer, folders, ("diffusion_models", "unet", "checkpoints"), "DiT")
    te_path = _find(text_encoder, folders, ("text_encoders", "clip"), "text encoder")
    if tokenizer is None and (te_path.parent / "tokenizer" / "tokenizer.json").is_file():
        tokenizer = te_path.parent / "tokenizer"  # a text_encoder/ folder beside tokenizer/
    return ModelFiles(
        transformer=dit_path,
        text_encoder=te_path,
        vae=_find(vae, folders, ("vae",), "VAE"),
        tokenizer=tokenizer,
        origin="single files",
    )
