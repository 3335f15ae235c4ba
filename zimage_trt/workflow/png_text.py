"""The text chunks of a PNG (tEXt, zTXt, iTXt), read without decoding a single pixel.

ComfyUI keeps its graph in the 'prompt' and 'workflow' chunks, zimage-trt its workflow in
'zimage-trt.workflow'. The reader walks the chunks itself: memory stays bounded whatever the
file claims (a chunk is read only when it is a text chunk of at most ``MAX_TEXT_BYTES``, and a
compressed one is inflated only up to that size), chunks after the image data count as well as
those before it, and every damaged or hostile file is refused naming the file and what is wrong.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

from zimage_trt.errors import FileError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_TEXT_BYTES = 16 * 1024 * 1024  # one text chunk, inflated (ComfyUI's graphs are kilobytes)
MAX_TOTAL_TEXT_BYTES = 64 * 1024 * 1024  # all of them together (Pillow's MAX_TEXT_MEMORY)
TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")


class PngTextError(FileError):
    """A PNG whose chunks cannot be read: truncated, damaged, or a decompression bomb."""


def png_text(path: str | Path) -> dict[str, str]:
    """Every text chunk of the PNG at ``path``, keyword → text (the last of a repeated keyword
    wins, as in Pillow). Raises PngTextError naming the file for anything but a readable PNG."""
    path = Path(path)
    with open(path, "rb") as fp:
        if fp.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
            raise PngTextError(f"{path} is not a PNG (no PNG signature)")
        return _read_chunks(fp, path, os.fstat(fp.fileno()).st_size)


def png_text_bytes(data: bytes, name: str) -> dict[str, str]:
    """``png_text`` of a PNG held in memory (an upload); ``name`` names it in errors."""
    fp = io.BytesIO(data)
    if fp.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
        raise PngTextError(f"{name} is not a PNG (no PNG signature)")
    return _read_chunks(fp, Path(name), len(data))


def _read_chunks(fp: BinaryIO, path: Path, size: int) -> dict[str, str]:
    texts: dict[str, str] = {}
    total = 0
    while True:
        offset = fp.tell()
        header = fp.read(8)
        if len(header) < 8:
            raise _damaged(path, f"truncated at byte {offset + len(header)}, before its IEND chunk")
        length, kind = struct.unpack(">I4s", header)
        name = kind.decode("latin-1")
        if length > 0x7FFFFFFF or not kind.isalpha():
            raise _damaged(path, f"the chunk at byte {offset} is not a PNG chunk ({name!r}, "
                           f"{length} bytes)")  # fmt: skip
        if offset + 12 + length > size:  # refused before any reader allocates for it
            raise _damaged(path, f"its {name} chunk at byte {offset} claims {length} bytes; the "
                           f"file ends at byte {size}")  # fmt: skip
        if kind == b"IEND":
            return texts
        if kind not in TEXT_CHUNKS:
            fp.seek(length + 4, 1)  # the data and its CRC, unread
            continue
        if length > MAX_TEXT_BYTES:
            raise _damaged(path, f"its {name} chunk at byte {offset} is {length} bytes; a text "
                           f"chunk may hold at most {MAX_TEXT_BYTES} bytes")  # fmt: skip
        data, crc = fp.read(length), fp.read(4)
        if len(data) < length or len(crc) < 4:
            raise _damaged(path, f"its {name} chunk at byte {offset} claims {length} bytes; the "
                           "file ends before them")  # fmt: skip
        if zlib.crc32(kind + data) != struct.unpack(">I", crc)[0]:
            raise _damaged(path, f"its {name} chunk at byte {offset} fails its CRC check")
        key, text = _text_chunk(kind, data, path, offset)
        total += len(text)
        if total > MAX_TOTAL_TEXT_BYTES:
            raise _damaged(path, f"its text chunks hold more than {MAX_TOTAL_TEXT_BYTES} bytes")
        texts[key] = text


def _text_chunk(kind: bytes, data: bytes, path: Path, offset: int) -> tuple[str, str]:
    name = kind.decode("latin-1")
    key, sep, rest = data.partition(b"\0")
    where = f"its {name} chunk at byte {offset}"
    if not sep or not 1 <= len(key) <= 79:
        raise _damaged(path, f"{where} has no keyword (1–79 bytes, then a NUL byte)")
    keyword = key.decode("latin-1")
    where = f"its {name} chunk {keyword!r}"
    if kind == b"tEXt":
        return keyword, rest.decode("latin-1")
    if kind == b"zTXt":
        if rest[:1] != b"\0":
            raise _damaged(path, f"{where} uses an unknown compression method")
        return keyword, _inflate(rest[1:], path, where).decode("latin-1")
    if len(rest) < 2 or rest[1] != 0 or rest[0] not in (0, 1):
        raise _damaged(path, f"{where} has an unknown compression flag or method")
    compressed = rest[0] == 1
    _language, sep1, rest = rest[2:].partition(b"\0")
    _translated, sep2, text = rest.partition(b"\0")
    if not (sep1 and sep2):
        raise _damaged(path, f"{where} lacks its language tag or translated keyword")
    if compressed:
        text = _inflate(text, path, where)
    try:
        return keyword, text.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _damaged(path, f"{where} is not UTF-8 (byte {exc.start}: {exc.reason})") from None


def _inflate(data: bytes, path: Path, where: str) -> bytes:
    """zlib data inflated to at most MAX_TEXT_BYTES, never more in memory."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, MAX_TEXT_BYTES + 1)
    except zlib.error as exc:
        raise _damaged(path, f"{where} is not valid compressed data ({exc})") from None
    if len(out) > MAX_TEXT_BYTES or inflater.unconsumed_tail:
        raise _damaged(path, f"{where} inflates to more than {MAX_TEXT_BYTES} bytes (a "
                       "decompression bomb?)")  # fmt: skip
    if not inflater.eof:
        raise _damaged(path, f"{where} is cut short (its compressed data does not end)")
    return out


def _damaged(path: Path, why: str) -> PngTextError:
    return PngTextError(f"{path} is not a readable PNG ({why})")
