"""Where a Z-Image model's files are, in every layout users hold it in (`resolve_model`,
`model_files` → `ModelFiles`):

* a diffusers folder (``transformer/``, ``text_encoder/``, ``tokenizer/``, ``vae/``,
  ``scheduler/``; weights single or sharded with a ``*.safetensors.index.json``);
* a Hugging Face repo id (``Tongyi-MAI/Z-Image-Turbo``, optionally ``@revision``) from the local
  HF cache, downloaded only when allowed (online, ``HF_HUB_OFFLINE`` unset, ``huggingface_hub``
  installed);
* ComfyUI single files (``z_image_turbo_bf16.safetensors``, ``qwen_3_4b.safetensors`` or a
  ``.gguf``, ``ae.safetensors``), with the tokenizer from the packaged BPE ranks;
* ``tiny``: the random-weight test model of `zimage_trt.models.tiny`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from zimage_trt.models.safetensors_io import (
    CheckpointError,
    ModelNotFoundError,
    key_list,
    read_safetensors_header,
)
from zimage_trt.models.tokenizer import QwenTokenizer

DEFAULT_REPO = "Tongyi-MAI/Z-Image-Turbo"

# Diffusers component folders and the stem of their weight files.
COMPONENTS = {"transformer": "diffusion_pytorch_model", "text_encoder": "model",
              "vae": "diffusion_pytorch_model"}  # fmt: skip
HF_PATTERNS = ("model_index.json", "transformer/*", "text_encoder/*", "tokenizer/*", "vae/*",
               "scheduler/*")  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Which files hold a network


def _listed_shards(index: Path) -> list[Path]:
    """The shard files a ``*.safetensors.index.json`` names, in order of first mention."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = [str(name) for name in dict.fromkeys(weight_map.values())]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{index}: not a safetensors index ({err})") from None
    return [index.parent / name for name in names]


def _index_shards(index: Path) -> list[Path]:
    shards = _listed_shards(index)
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


def check_headers(files: Sequence[Path]) -> None:
    """Read the header of each weight file (no tensor data), so a truncated or damaged file is
    refused, named, before any network loads: a safetensors header against the file's size, a
    GGUF header's counts against it (the rest of a GGUF is checked when it is read)."""
    from zimage_trt.models.gguf import check_gguf_header

    for file in files:
        if file.suffix == ".gguf":
            check_gguf_header(file)
        else:
            read_safetensors_header(file)


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

    def checked(self) -> ModelFiles:
        """These files, once every weight file's header has been read (`check_headers`)."""
        for files in self.weight_files().values():
            check_headers(files)
        return self


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
        found = _folder_weights(folder) if folder.is_dir() else None
        if found is None:
            missing.append(f"{component}/{stem}.safetensors (or .safetensors.index.json + shards)")
        elif found.name.endswith(".index.json"):  # an unreadable index raises, naming it
            shards = _listed_shards(found)
            missing += [
                f"{component}/{shard.name} (shard {i} of {len(shards)} listed in {found.name})"
                for i, shard in enumerate(shards, 1)
                if not shard.is_file()
            ]
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
    ).checked()


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
    (ComfyUI) go through `model_files` instead. Every weight file's header is read here (as in
    `model_files`), so a missing shard, a truncated or a damaged file is refused, named, before
    any network loads.
    """
    path = Path(ref).expanduser()
    if path.is_dir():
        return _from_diffusers_folder(path.resolve(), f"diffusers folder {path.resolve()}")
    if path.is_file():
        weight_files(path)  # a pickle is refused as such
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
        ).checked()
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
    ).checked()
