"""Pixels out: the VAE image → uint8 exactly as ComfyUI saves it, named as ComfyUI names it,
written atomically, with the workflow that made it in the PNG's text chunks."""

from __future__ import annotations

import errno
import glob
import io
import os
import re
import tempfile
import uuid
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torch import Tensor

from zimage_trt import __version__
from zimage_trt.errors import WRITE_ERRNOS, FileError, InputError, MissingFileError, os_error
from zimage_trt.workflow import Workflow
from zimage_trt.workflow.png_text import PNG_SIGNATURE, PngTextError, png_text, png_text_bytes

FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
METADATA_WORKFLOW = "zimage-trt.workflow"  # not ComfyUI's "workflow"/"prompt" (JSON graphs)
NAME_MAX = 255  # bytes in one file name on the usual file systems
MAX_IMAGE_PIXELS = 2**25  # an input image's pixels (8K UHD fits): at most 128 MiB decoded
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK}


def to_uint8(image: Tensor) -> np.ndarray:
    """[1,3,H,W] VAE output in [−1, 1] → [H,W,3] uint8: clamp((x+1)/2), ×255, *truncated*
    (ComfyUI's ``process_output`` then ``SaveImage``'s numpy ``astype``)."""
    if image.ndim != 4 or image.shape[0] != 1 or image.shape[1] != 3:
        raise InputError(f"expected one RGB image [1,3,H,W], got {list(image.shape)}")
    pixels = ((image.float() + 1.0) / 2.0).clamp(0.0, 1.0)
    array = 255.0 * pixels[0].permute(1, 2, 0).cpu().numpy()
    return np.clip(array, 0, 255).astype(np.uint8)


def next_path(folder: Path, prefix: str, suffix: str) -> Path:
    """``{folder}/{prefix}_{counter:05}_.{suffix}`` with the next counter after every one taken
    (ComfyUI naming; the counter grows past 99999 with more digits); the prefix may hold
    sub-folders, which must stay inside ``folder``."""
    target = check_name(folder, prefix, suffix)
    base = Path(prefix).name
    pattern = re.compile(rf"{re.escape(base)}_(\d{{5,}})_\.{re.escape(suffix)}$")
    taken = [
        int(m.group(1))
        for p in target.parent.glob(f"{glob.escape(base)}_*_.{suffix}")
        if (m := pattern.match(p.name))
    ]
    return target.parent / f"{base}_{max(taken, default=0) + 1:05d}_.{suffix}"


def check_name(folder: Path, prefix: str, suffix: str) -> Path:
    """The first name ``prefix`` gives inside ``folder``, refused (``ValueError`` naming the
    prefix) when it escapes the folder, holds a NUL byte or a part too long for a file system."""
    if "\0" in prefix:
        raise InputError(f"output prefix {prefix!r} contains a NUL byte")
    name = f"{prefix}_00001_.{suffix}"
    long = [part for part in Path(name).parts if len(part.encode()) > NAME_MAX]
    if long:
        raise InputError(
            f"output prefix {prefix[:60]!r}…: the name part {long[0][:40]!r}… is "
            f"{len(long[0].encode())} bytes; file names hold at most {NAME_MAX}"
        )
    target = (folder / name).resolve()
    if folder.resolve() not in target.parents:
        raise InputError(f"output prefix {prefix!r} escapes the output folder {str(folder)!r}")
    return target


def open_image(path: str | Path, what: str = "") -> Image.Image:
    """The image at ``path``, read whole; a FileError naming it (and ``what`` it is, e.g. the
    workflow field) for anything that is not a readable image or has more than
    ``MAX_IMAGE_PIXELS`` pixels (refused from its header, before decoding)."""
    where = f"{what}: " if what else ""
    if not Path(path).is_file():
        raise MissingFileError(f"{where}{path}: no such file")
    with open(path, "rb") as fp:
        signed = fp.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE
    if signed:  # its chunks walked first: Pillow would allocate what a damaged length claims
        try:
            png_text(path)
        except PngTextError as exc:
            raise PngTextError(f"{where}{exc}") from None
    return _decode(path, str(path), where)


def read_image(data: bytes, name: str, what: str = "") -> Image.Image:
    """``open_image`` of an image held in memory (an upload); ``name`` names it in errors."""
    where = f"{what}: " if what else ""
    if data.startswith(PNG_SIGNATURE):
        try:
            png_text_bytes(data, name)
        except PngTextError as exc:
            raise PngTextError(f"{where}{exc}") from None
    return _decode(io.BytesIO(data), name, where)


def _decode(source: str | Path | BinaryIO, name: str, where: str) -> Image.Image:
    """Decoded whole, after its header says it has at most ``MAX_IMAGE_PIXELS`` pixels."""
    try:
        with Image.open(source) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise FileError(
                    f"{where}{name} is {image.width}×{image.height} pixels; input images may "
                    f"have at most {MAX_IMAGE_PIXELS:,} pixels"
                )
            image.load()
            return image
    except FileError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise FileError(f"{where}{name} is not a readable image ({exc})") from None


def check_inputs(wf: Workflow) -> None:
    """Before any work: every image a stage starts from exists and is a readable image."""
    for index, stage in enumerate(wf.stages):
        if stage.latent.source == "image" and stage.latent.image is not None:
            open_image(stage.latent.image, f"stages.{index}.latent.image").close()


def check_outputs(wf: Workflow, folder: str | Path | None = None) -> Path:
    """Before any work: the output folder (``folder``, else the workflow's) is a folder that
    exists or can be made, entries can be created in it, and every name the workflow saves
    (stage previews, the final image) stays inside it and fits the file system. Nothing is left
    behind; returns the folder."""
    root = Path(folder if folder is not None else wf.output.folder)
    existing = next(p for p in (root, *root.absolute().parents) if p.exists())
    if not existing.is_dir():
        where = "" if existing == root else f": {existing} is a file"
        raise InputError(f"output folder {root} is not a folder{where}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".zimage-trt-probe.", dir=existing))
    except OSError as exc:
        raise InputError(
            f"output folder {root} cannot be written ({exc.strerror} in {existing})"
        ) from None
    prefix = wf.output.render_prefix()
    names = [
        f"{prefix}_{stage.name or f'stage{i + 1}'}_preview"
        for i, stage in enumerate(wf.stages)
        if stage.preview
    ]
    for name in [*names, prefix]:
        check_name(root, name, wf.output.format)
    return root


def save_new_image(
    pixels: np.ndarray,
    folder: Path,
    prefix: str,
    suffix: str,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write the image under the next free ComfyUI name and return it. The name is claimed
    atomically: the image is written to a temporary file, then hard-linked to its name, which
    fails if another writer took that name first (the next counter is then tried). So concurrent
    writers into one folder never overwrite each other, and a reader never sees half an image."""
    fmt = _format(suffix)
    path = next_path(folder, prefix, suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        _encode(pixels, tmp, fmt, metadata)
        while True:
            try:
                _claim(tmp, path)
                return path
            except FileExistsError:
                path = next_path(folder, prefix, suffix)
    except OSError as exc:
        if exc.errno in WRITE_ERRNOS:  # a full disk, permissions: name the image
            raise os_error(exc, path) from exc
        raise
    finally:
        tmp.unlink(missing_ok=True)


def _claim(tmp: Path, path: Path) -> None:
    """``path`` becomes ``tmp``'s content, or FileExistsError if it exists (never replaced)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        # no hard links here (FAT, some network mounts): reserve the name, then fill it
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        os.replace(tmp, path)


def _format(suffix: str) -> str:
    fmt = FORMATS.get(suffix.lower())
    if fmt is None:
        raise InputError(f"unknown image format {suffix!r}; choose one of: " + ", ".join(FORMATS))
    return fmt


def png_bytes(pixels: np.ndarray, metadata: dict[str, str] | None = None) -> bytes:
    """The PNG ``save_new_image`` would write, as bytes (the server's responses)."""
    buffer = io.BytesIO()
    _encode(pixels, buffer, "PNG", metadata)
    return buffer.getvalue()


def _encode(
    pixels: np.ndarray, tmp: Path | io.BytesIO, fmt: str, metadata: dict[str, str] | None
) -> None:
    image = Image.fromarray(pixels)
    if fmt == "PNG":
        info = PngInfo()
        for key, value in (metadata or {}).items():
            info.add_itxt(key, value)
        image.save(tmp, format=fmt, pnginfo=info, compress_level=4)
    else:
        image.save(tmp, format=fmt, quality=95)


def png_metadata(wf: Workflow, backend: str) -> dict[str, str]:
    """Text chunks: the whole workflow (negative prompt inlined, so it travels with the image),
    the prompts and the seeds."""
    portable = wf.model_copy(deep=True)
    portable.prompts.negative_file = None
    portable.prompts.negative = wf.prompts.negative_text() or None
    return {
        "software": f"zimage-trt {__version__} ({backend})",
        METADATA_WORKFLOW: portable.to_yaml(),
        "zimage-trt.prompt": wf.prompts.positive_text,
        "zimage-trt.negative_prompt": portable.prompts.negative or "",
        "zimage-trt.seeds": ",".join(str(stage.seed) for stage in wf.stages),
    }
