"""``zimage-trt make-tiny``: the tiny random-weight Z-Image for tests and smoke runs."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from zimage_trt.cli.common import RAW, examples


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from zimage_trt.models.tiny import make_tiny

    paths = make_tiny(args.dir, force=args.force)
    print(
        f"wrote a tiny Z-Image (real architectures, random weights; its images are noise) to "
        f"{paths.root}"
    )
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "make-tiny",
        formatter_class=RAW,
        help="write a tiny random-weight Z-Image (real architectures) for tests and smoke runs",
        description="Writes a diffusers-layout folder with the real architectures at tiny sizes "
        "and deterministic random weights, the real Qwen tokenizer, the same weights as ComfyUI "
        "single files and a GGUF text encoder, and a tiny LoRA. Its images are noise.",
        epilog=examples("zimage-trt make-tiny ./tiny-zimage"),
    )
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty folder that holds no tiny model (same-named files are "
        "replaced, nothing else is touched)",
    )
    p.set_defaults(func=cmd_make_tiny)
