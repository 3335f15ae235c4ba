"""Files written atomically: to a temporary name beside the target, then renamed onto it, so a
reader (or a crash) never sees half a file and a failed write leaves the old file as it was."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from zimage_trt.errors import WRITE_ERRNOS, os_error


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
    except OSError as exc:
        if exc.errno in WRITE_ERRNOS:  # a full disk, permissions: name the file being written
            raise os_error(exc, target) from exc
        raise
    finally:
        tmp.unlink(missing_ok=True)


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
