"""The contract between the builder and the runtime: an engine folder's ``manifest.json``.

The builder (``zimage_trt.build_engines``) writes it; ``generate --engines DIR`` reads it, checks
that every file is whole (sha-256), that the folder was built for this machine and for this
request, and that every shape the request needs lies inside a built optimization profile — all
before any work. Only json, hashlib, pydantic and the table formatter here: the runtime stays
lean.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from zimage_trt.errors import FileError, InputError
from zimage_trt.text_table import text_table

MANIFEST = "manifest.json"
REFIT_SUFFIX = ".refit.json"  # <engine>.refit.json: the weight names a refittable engine takes
FORMAT_VERSION = 2  # 2: every file hashed and inside the folder, the manifest checksummed
Shape = tuple[int, ...]


class ManifestError(FileError):
    """An engine folder that cannot serve: missing, corrupt, or built for something else."""


class ProfileError(InputError):
    """A request whose shapes lie outside every optimization profile built for an engine."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ShapeRange(_Model):
    """min/opt/max of one engine input (TensorRT's optimization-profile triple)."""

    min: Shape
    opt: Shape
    max: Shape

    def covers(self, shape: Sequence[int]) -> bool:
        return len(shape) == len(self.min) and all(
            lo <= s <= hi for lo, s, hi in zip(self.min, shape, self.max, strict=True)
        )

    def __str__(self) -> str:
        return f"{_dims(self.min)} … {_dims(self.max)} (opt {_dims(self.opt)})"


class Profile(_Model):
    """One optimization profile: a range for every input of one engine (named after its stage)."""

    name: str
    shapes: dict[str, ShapeRange]

    def covers(self, shapes: Mapping[str, Sequence[int]]) -> bool:
        return all(n in self.shapes and self.shapes[n].covers(s) for n, s in shapes.items())

    def distance(self, shapes: Mapping[str, Sequence[int]]) -> int:
        """How far the request is from this profile's opt (0: the shape it was tuned for)."""
        return sum(
            abs(a - b)
            for name, s in shapes.items()
            for a, b in zip(self.shapes[name].opt, s, strict=True)
        )


def select_profile(
    engine: str, profiles: Sequence[Profile], shapes: Mapping[str, Sequence[int]], hint: str = ""
) -> int:
    """Index of the profile serving ``shapes`` (the closest opt among those covering them).

    Raises ProfileError naming the engine, the requested shapes, every built range and, if given,
    the command that would build a covering profile.
    """
    covering = [i for i, p in enumerate(profiles) if p.covers(shapes)]
    if covering:
        return min(covering, key=lambda i: profiles[i].distance(shapes))
    requested = ", ".join(f"{name} {_dims(s)}" for name, s in shapes.items())
    built = "; ".join(
        f"{p.name}: " + ", ".join(f"{n} {r}" for n, r in p.shapes.items() if n in shapes)
        for p in profiles
    )
    message = f"engine {engine!r} was not built for {requested}; built profiles: {built or 'none'}"
    raise ProfileError(message + (f". To cover it, build with: {hint}" if hint else ""))


class FileRecord(_Model):
    sha256: str
    bytes: int


class EngineFile(_Model):
    """One engine of the folder: the file the runtime loads, every file it needs (graph,
    external data, plan) with its hash, its I/O dtypes, its profiles and its cache key."""

    file: str  # relative to the folder: the ONNX graph (onnxruntime) or the plan (tensorrt)
    files: dict[str, FileRecord]  # relative path → hash and size, ``file`` included
    inputs: dict[str, str]  # name → dtype ("float32", "bfloat16", "int64", "bool")
    outputs: dict[str, str]
    profiles: list[Profile]
    cache_key: str
    build_seconds: float = 0.0
    # its DiT weights can be replaced when the folder is loaded (another LoRA or strength):
    # ``<engine>.refit.json`` lists the names that take them (TensorRT: built --refittable;
    # ONNX Runtime: always, as initializer overrides)
    refittable: bool = False
    # built with TensorRT's WEIGHT_STREAMING: a budget at load keeps part of its weights on the
    # GPU and streams the rest in as it runs (``engines.tensorrt_engines.WeightBudget``)
    weight_streaming: bool = False


class LoraRecord(_Model):
    name: str
    sha256: str
    strength: float


class WeightsRecord(_Model):
    """What the engines hold: the checkpoint files' hashes and the LoRAs fused into the DiT."""

    origin: str
    sha256: dict[str, str]  # network → hash of its weight files
    loras: list[LoraRecord] = Field(default_factory=list)
    # the DiT weights those LoRAs changed (a swap restores them); None: not recorded
    lora_keys: list[str] | None = None


class QuantizationRecord(_Model):
    """The DiT's engines (and the text encoder's, if calibrated) hold Q/DQ nodes from a
    ``zimage-trt calibrate`` folder."""

    precision: Literal["fp8", "int8"]
    calibration_sha256: str  # of its calibration.json (which names its amax file by hash)
    quantizers: int  # the DiT's
    exclude: list[str]  # module-name fragments left in full precision
    workflow: str  # what it was calibrated on
    prompts: int
    opset: int  # of the quantized engines' graphs (the others keep the options' opset)
    attention: bool = False  # the DiT's attention q/k/v quantized too (FP8)
    text_encoder: Literal["fp8"] | None = None  # the text encoder's Q/DQ precision, if any
    text_encoder_quantizers: int = 0

    def label(self) -> str:
        """What is quantized, in a few words: ``DiT fp8 Q/DQ (q/k/v too), text encoder fp8``."""
        text = f"DiT {self.precision} Q/DQ" + (" (attention q/k/v too)" if self.attention else "")
        return text + (f", text encoder {self.text_encoder} Q/DQ" if self.text_encoder else "")


class Manifest(_Model):
    format: int = FORMAT_VERSION
    backend: Literal["onnxruntime", "tensorrt", "tensorrt-rtx"]
    precision: Literal["fp32", "bf16"]  # the graphs' float type (Q/DQ: ``quantization``)
    quantization: QuantizationRecord | None = None
    created: str  # ISO time
    build_seconds: float
    peak_rss_bytes: int
    versions: dict[str, str]  # zimage_trt, torch, onnx, onnxruntime | tensorrt
    machine: dict[str, str]  # gpu name, compute capability (TensorRT); cpu / providers (ORT)
    # TensorRT-RTX: {"name": "tensorrt_rtx", "version": …} and the GPUs the plans were compiled
    # for, {"compute_capabilities": ["8.9", "12.0"]} (built ahead of time, on any machine)
    library: dict[str, str] | None = None
    targets: dict[str, list[str]] | None = None
    options: dict[str, Any]  # builder options (optimization level, pool limits, refit, opset…)
    weights: WeightsRecord
    workflow: str  # the workflow (or resolution list) the profiles came from
    workflow_file: str | None = None  # that workflow, saved in the folder: generate's default
    caption_max: int
    engines: dict[str, EngineFile]
    tokenizer: str | None = None  # tokenizer folder copied into the engine folder (None: packaged)
    # the folder's other files (the workflow, the tokenizer's files): relative path → hash, size
    files: dict[str, FileRecord] = Field(default_factory=dict)

    def profiles(self, engine: str) -> list[Profile]:
        return self.engines[engine].profiles

    def profiles_by_engine(self) -> dict[str, list[Profile]]:
        return {name: entry.profiles for name, entry in self.engines.items()}


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(paths: Iterable[str | Path]) -> str:
    """One hash for a network's weight files (the manifest's ``weights.sha256`` entries)."""
    return cache_key({"files": [sha256_file(p) for p in paths]})


def cache_key(parts: Mapping[str, Any]) -> str:
    """sha-256 of the canonical JSON of ``parts`` (sorted keys; tuples as lists)."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=_jsonable)
    return hashlib.sha256(text.encode()).hexdigest()


def manifest_checksum(data: Mapping[str, Any]) -> str:
    """sha-256 of the manifest's canonical JSON without its ``checksum`` field."""
    return cache_key({k: v for k, v in data.items() if k != "checksum"})


def write_manifest(folder: str | Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` atomically with its checksum (the rename is a build's commit)."""
    from zimage_trt.atomic import write_json

    data = manifest.model_dump(mode="json")
    data["checksum"] = manifest_checksum(data)
    path = Path(folder) / MANIFEST
    write_json(path, data)
    return path


def read_manifest(folder: str | Path) -> Manifest:
    """The folder's manifest, checked: its format, its checksum (an edited manifest is refused)
    and that every file it names is listed with a hash and lies inside the folder."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ManifestError(
            f"{folder} is not an engine folder: no {MANIFEST} (build one with `zimage-trt build`)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path} is not valid JSON ({exc}); rebuild the folder") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path} is not a JSON object; rebuild the folder")
    if data.get("format") != FORMAT_VERSION:
        raise ManifestError(
            f"{path} has format {data.get('format')!r}; this zimage-trt reads format "
            f"{FORMAT_VERSION}: rebuild the folder"
        )
    if data.get("checksum") != manifest_checksum(data):
        raise ManifestError(
            f"{path} was changed after the build (its checksum does not match its contents); "
            "rebuild the folder"
        )
    try:
        manifest = Manifest.model_validate({k: v for k, v in data.items() if k != "checksum"})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "top level"
        raise ManifestError(f"{path}: {where}: {first['msg']}; rebuild the folder") from None
    _check_names(manifest, path)
    return manifest


def _check_names(manifest: Manifest, path: Path) -> None:
    """Every name a manifest uses is a relative path inside the folder, and every file the
    runtime opens is among the hashed ones."""
    named = [(f"engines.{n}.files", rel) for n, e in manifest.engines.items() for rel in e.files]
    named += [("files", rel) for rel in manifest.files]
    named += [(f"engines.{n}.file", e.file) for n, e in manifest.engines.items()]
    if manifest.workflow_file is not None:
        named.append(("workflow_file", manifest.workflow_file))
    if manifest.tokenizer is not None:
        named.append(("tokenizer", manifest.tokenizer))
    for where, rel in named:
        parts = PurePosixPath(rel).parts
        if not rel or rel.startswith(("/", "\\")) or "\\" in rel or ".." in parts or ":" in rel:
            raise ManifestError(
                f"{path}: {where} names {rel!r}, which is not a path inside the folder; "
                "rebuild the folder"
            )
    for name, entry in manifest.engines.items():
        if entry.file not in entry.files:
            raise ManifestError(
                f"{path}: engine {name!r} loads {entry.file!r}, which is not among its hashed "
                "files; rebuild the folder"
            )
    if manifest.workflow_file is not None and manifest.workflow_file not in manifest.files:
        raise ManifestError(
            f"{path}: workflow_file {manifest.workflow_file!r} is not among the hashed files; "
            "rebuild the folder"
        )
    if manifest.tokenizer is not None and not any(
        rel.startswith(f"{manifest.tokenizer}/") for rel in manifest.files
    ):
        raise ManifestError(
            f"{path}: the tokenizer folder {manifest.tokenizer!r} has no hashed files; "
            "rebuild the folder"
        )


def verify_files(folder: str | Path, manifest: Manifest, engines: Iterable[str] = ()) -> None:
    """Check size and sha-256 of each engine's files (all engines when none are named, and then
    the folder's other files too: workflow, tokenizer): a truncated, corrupt or replaced file is
    reported, never run. A file that resolves outside the folder (a link) is refused."""
    root = Path(folder)
    named = list(engines)
    for name in named or manifest.engines:
        for rel, record in manifest.engines[name].files.items():
            check_file(root / rel, record, f"engine {name!r}", inside=root)
    if not named:
        for rel, record in manifest.files.items():
            check_file(root / rel, record, "the folder", inside=root)


def check_file(path: Path, record: FileRecord, what: str, inside: Path | None = None) -> None:
    if not path.is_file():
        raise ManifestError(f"{what}: {path} is missing; rebuild the folder")
    if inside is not None and not path.resolve().is_relative_to(inside.resolve()):
        raise ManifestError(
            f"{what}: {path} leads outside the folder (to {path.resolve()}); rebuild the folder"
        )
    size = path.stat().st_size
    if size != record.bytes:
        raise ManifestError(
            f"{what}: {path} is {size} bytes, the manifest says {record.bytes} "
            "(truncated or replaced); rebuild the folder"
        )
    if sha256_file(path) != record.sha256:
        raise ManifestError(
            f"{what}: {path} does not match its sha-256 in {MANIFEST} (corrupt or replaced); "
            "rebuild the folder"
        )


def file_record(path: Path) -> FileRecord:
    return FileRecord(sha256=sha256_file(path), bytes=path.stat().st_size)


def format_profiles(profiles: dict[str, list[Profile]]) -> str:
    """The dry-run table: engine, profile, input, min, opt, max."""
    rows = [("engine", "profile", "input", "min", "opt", "max")]
    for engine, items in profiles.items():
        for profile in items:
            for i, (name, span) in enumerate(profile.shapes.items()):
                rows.append(
                    (
                        engine if i == 0 else "",
                        profile.name if i == 0 else "",
                        name,
                        _dims(span.min),
                        _dims(span.opt),
                        _dims(span.max),
                    )
                )
    return text_table(rows, right=(3, 4, 5))


def _dims(shape: Sequence[int]) -> str:
    return "×".join(str(s) for s in shape)


def _jsonable(value: object) -> object:
    if isinstance(value, tuple | set):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot hash {type(value).__name__} in a cache key")
