"""The ``zimage-trt`` command: one argparse app, one module per command group, each parsing its
arguments, calling the service (``zimage_trt.runtime``, ``build_engines``, ``bench``) and
printing what it returns."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from zimage_trt import __version__
from zimage_trt.cli import bench, engines, generate, models, sigmas, workflow
from zimage_trt.cli.common import RAW, examples


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zimage-trt",
        formatter_class=RAW,
        description="Compiled inference for Z-Image-Turbo with ComfyUI-identical sampling.",
        epilog=examples(
            "zimage-trt workflow show zimage-121101",
            "zimage-trt workflow import my_graph.json -o my_workflow.yaml",
            "zimage-trt sigmas --scheduler beta --shift 7 --steps 16 --denoise 0.6",
        ),
    )
    parser.add_argument("--version", action="version", version=f"zimage-trt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sigmas.add_parser(sub)
    workflow.add_parser(sub)
    generate.add_generate_parser(sub)
    engines.add_build_parser(sub)
    generate.add_reproduce_parser(sub)
    bench.add_bench_parser(sub)
    engines.add_inspect_parser(sub)
    models.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"zimage-trt: error: {exc}", file=sys.stderr)
        return 2
