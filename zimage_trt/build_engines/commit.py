"""A build writes into an engine folder the way a database commits a transaction.

- Every new file goes under a name no committed file uses: ``onnx/denoiser.onnx`` when that name
  is free, else ``onnx/denoiser-<cache key>.onnx`` (the same for plans, refit maps, the workflow
  and the tokenizer folder). Nothing that exists is overwritten, so the folder keeps serving
  with its old ``manifest.json`` while the build runs, is killed, or fails.
- Each finished engine is recorded in ``.pending/<engine>-<key>.json`` (its files and hashes):
  a rerun after an interrupted build reuses it, as it reuses the committed engines.
- ``manifest.json`` is renamed into place last: that rename is the commit. Only after it are the
  superseded files deleted — those the old manifest listed and the new one does not, and the
  pending records — never a file the builds did not write.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath

from pydantic import ValidationError

from zimage_trt.atomic import write_json, write_text
from zimage_trt.engines.manifest import (
    MANIFEST,
    EngineFile,
    FileRecord,
    Manifest,
    ManifestError,
    cache_key,
    file_record,
    verify_files,
    write_manifest,
)

PENDING = ".pending"
TAG = 12  # cache-key characters in a tagged file name
# a temporary file of zimage_trt.atomic (``.NAME.PID.HEX8.tmp``) left by a killed process
_TEMP = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.tmp$")


class Transaction:
    """One build's writes into ``out`` (whose committed manifest is ``previous``)."""

    def __init__(self, out: Path, previous: Manifest | None, log: Callable[[str], None]) -> None:
        self.out = out
        self.previous = previous
        self.log = log
        self.committed = _manifest_files(previous) if previous else set()
        _sweep_temps(out, log)

    def free(self, rel: str) -> bool:
        """Whether a new file may be written at ``rel``: nothing is there."""
        path = self.out / rel
        return not path.exists() and not path.is_symlink()

    def names(self, name: str, rels: Iterable[str], key: str) -> list[str]:
        """Relative names for the files of engine ``name`` (each file name starting with
        ``name.``): the plain ones when all are free, else all tagged with the cache key
        (``onnx/denoiser.onnx`` → ``onnx/denoiser-<key>.onnx``)."""
        plain = list(rels)
        if all(self.free(rel) for rel in plain):
            return plain
        tag = f"{name}-{key[:TAG]}."
        tagged = [PurePosixPath(rel) for rel in plain]
        return [str(r.with_name(r.name.replace(f"{name}.", tag, 1))) for r in tagged]

    def reusable(self, name: str, key: str) -> tuple[EngineFile, str] | None:
        """The engine ``name`` with cache key ``key`` if the folder already holds it whole:
        committed (the old manifest) or finished by an interrupted build (a pending record);
        with where it came from."""
        old = self.previous.engines.get(name) if self.previous else None
        if old is not None and old.cache_key == key and self._whole(name, old):
            return old, "up to date"
        record = self._pending_path(name, key)
        if not record.is_file():
            return None
        try:
            entry = EngineFile.model_validate_json(record.read_text(encoding="utf-8"))
        except (OSError, ValueError, ValidationError):
            return None
        if entry.cache_key != key or not self._whole(name, entry):
            return None
        return entry, "finished by an interrupted build"

    def finished(self, name: str, entry: EngineFile) -> None:
        """Record a finished engine, so an interrupted build's work is kept for the rerun."""
        write_json(self._pending_path(name, entry.cache_key), entry.model_dump(mode="json"))

    def place_text(self, stem: str, suffix: str, text: str) -> str:
        """Write ``text`` as ``stem+suffix`` when that name is free or already holds exactly
        this text, else as ``stem-<its sha-256>+suffix``; returns the relative name."""
        key = hashlib.sha256(text.encode("utf-8")).hexdigest()
        for rel in (f"{stem}{suffix}", f"{stem}-{key[:TAG]}{suffix}"):
            path = self.out / rel
            if path.is_file() and path.read_bytes() == text.encode("utf-8"):
                return rel
            if self.free(rel):
                write_text(path, text)
                return rel
        raise ManifestError(f"{self.out}: both {stem}{suffix} and its tagged name are taken")

    def place_folder(self, stem: str, source: Path) -> tuple[str, dict[str, FileRecord]]:
        """Copy the folder ``source`` to ``stem`` when that name is free or holds exactly the
        same files, else to ``stem-<hash of its files>``; returns its relative name and the
        records of its files (by their path in the engine folder)."""
        files = sorted(p for p in source.rglob("*") if p.is_file())
        records = {p.relative_to(source).as_posix(): file_record(p) for p in files}
        key = cache_key({n: r.model_dump() for n, r in records.items()})
        for rel in (stem, f"{stem}-{key[:TAG]}"):
            target = self.out / rel
            if target.is_dir() and _same_files(target, records):
                return rel, {f"{rel}/{n}": r for n, r in records.items()}
            if self.free(rel):
                tmp = self.out / f".{rel}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
                try:
                    shutil.copytree(source, tmp)
                    tmp.rename(target)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
                return rel, {f"{rel}/{n}": r for n, r in records.items()}
        raise ManifestError(f"{self.out}: both {stem}/ and its tagged name are taken")

    def commit(self, manifest: Manifest) -> list[str]:
        """Rename the new manifest into place, then delete what it superseded; returns the
        relative names deleted."""
        write_manifest(self.out, manifest)
        keep = _manifest_files(manifest)
        doomed = set(self.committed - keep)
        pending = self.out / PENDING
        records = sorted(pending.glob("*.json")) if pending.is_dir() else []
        for record in records:  # an interrupted build's engines, not taken into this manifest
            try:
                entry = EngineFile.model_validate_json(record.read_text(encoding="utf-8"))
            except (OSError, ValueError, ValidationError):
                entry = None
            if entry is not None:
                doomed |= set(entry.files) - keep
        deleted = []
        for rel in sorted(doomed):
            path = self.out / rel
            if path.is_file():
                path.unlink()
                deleted.append(rel)
        for record in records:
            record.unlink(missing_ok=True)
        for rel in sorted({str(Path(r).parent) for r in doomed} | {PENDING}, reverse=True):
            folder = self.out / rel
            if rel != "." and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        if deleted:
            self.log(f"deleted {len(deleted)} superseded file(s): {', '.join(deleted[:4])}"
                     + (", …" if len(deleted) > 4 else ""))  # fmt: skip
        return deleted

    def _pending_path(self, name: str, key: str) -> Path:
        return self.out / PENDING / f"{name}-{key[:TAG]}.json"

    def _whole(self, name: str, entry: EngineFile) -> bool:
        probe = Manifest.model_construct(engines={name: entry})
        try:
            verify_files(self.out, probe, [name])
        except ManifestError:
            return False
        return True


def _manifest_files(manifest: Manifest) -> set[str]:
    """Every file a manifest refers to, itself excepted."""
    files = set(manifest.files)
    for entry in manifest.engines.values():
        files |= set(entry.files)
    return files


def _same_files(folder: Path, records: dict[str, FileRecord]) -> bool:
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    return present == set(records) and all(
        file_record(folder / rel) == record for rel, record in records.items()
    )


def _sweep_temps(out: Path, log: Callable[[str], None]) -> None:
    """Delete temporary files and folders that a killed zimage-trt process left in the folder
    (their writer is no longer running): they are ours by name and never part of a committed
    folder."""
    if not out.is_dir():
        return
    for path in [out, *(p for p in out.iterdir() if p.is_dir())]:
        for temp in path.iterdir():
            match = _TEMP.match(temp.name)
            if match and not _alive(int(match[1])):
                if temp.is_dir():
                    shutil.rmtree(temp, ignore_errors=True)
                else:
                    temp.unlink(missing_ok=True)
                log(f"deleted {temp.relative_to(out)}, left by an interrupted build")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


__all__ = ["MANIFEST", "PENDING", "Transaction"]
