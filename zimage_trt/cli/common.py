"""What the command groups share: example epilogs, progress bars and log lines on stderr."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

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
