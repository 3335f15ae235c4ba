"""What the command groups share: example epilogs, progress bars and log lines on stderr."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from zimage_trt.errors import InputError

RAW = argparse.RawDescriptionHelpFormatter


def examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def progress_bars(quiet: bool) -> Callable[[str, int, int], None]:
    """One bar per stage on stderr (redrawn in place on a terminal)."""
    tty = sys.stderr.isatty()

    def show(stage: str, step: int, steps: int) -> None:
        if quiet or (not tty and step != steps):
            return
        filled = round(24 * step / steps)
        bar = "#" * filled + "." * (24 - filled)
        end = "\n" if step == steps else ""
        print(f"\r{stage:<12} [{bar}] {step}/{steps}", end=end, file=sys.stderr, flush=True)

    return show


def stderr_log(quiet: bool) -> Callable[[str], None]:
    def log(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr, flush=True)

    return log


def parse_bytes(text: str) -> int:
    """``8G``, ``12GiB``, ``512M``, ``0.42G``, ``1024`` → bytes (binary units)."""
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    number, unit = text.rstrip("iBb").upper()[:-1], text.rstrip("iBb").upper()[-1:]
    if unit.isdigit():
        number, unit = number + unit, ""
    try:
        value = int(float(number) * units[unit])
    except (ValueError, KeyError):
        raise InputError(f"memory size {text!r} is not a number with K, M or G (e.g. 8G)") from None
    if value <= 0:
        raise InputError(f"memory size {text!r} must be positive")
    return value
