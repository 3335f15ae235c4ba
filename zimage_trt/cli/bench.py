"""The ``zimage-trt bench`` sub-command: its arguments, and the run that prints the markdown and
writes the JSON, markdown and chart."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from zimage_trt.bench.report import markdown, write_outputs
from zimage_trt.bench.run import BACKENDS, run_bench
from zimage_trt.cli.common import parse_bytes


def add_bench_parser(sub: Any) -> argparse.ArgumentParser:
    """The ``bench`` sub-command on an argparse sub-parsers object."""
    p: argparse.ArgumentParser = sub.add_parser(
        "bench",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="time each engine, the workflow end to end, baselines, caches and the roofline",
        description="Times each engine at each stage shape (median, p90 after warm-up), the "
        "workflow end to end per part with images/s, diffusers' ZImagePipeline and this "
        "project's eager torch backend as baselines on the same weights, EasyCache and the "
        "prompt cache, and DiT FLOPs against the GPU's bf16 peak. Prints markdown tables; "
        "--json/--md/--png write the figures. Nothing asserts a time.",
        epilog="examples:\n  zimage-trt bench --model tiny --workflow zimage-121101 "
        "--backends torch,onnxruntime --json out.json\n  zimage-trt bench --model "
        "~/models/Z-Image-Turbo --backends torch,tensorrt --engines engines/ --warmup 5 "
        "--json results/h100.json",
    )
    p.add_argument("--model", default=None, metavar="PATH|REPO|tiny",
                   help="model folder, Hugging Face repo id, or 'tiny' "
                   "(default: the workflow's models)")  # fmt: skip
    p.add_argument("-w", "--workflow", default="zimage-121101", metavar="NAME|FILE",
                   help="workflow preset or YAML file (default: zimage-121101)")  # fmt: skip
    p.add_argument("--backends", default="torch", metavar="LIST",
                   help=f"comma list of {', '.join(BACKENDS)} (default: torch)")  # fmt: skip
    p.add_argument("--engines", type=Path, action="append", default=[], metavar="DIR",
                   help="a built engine folder for onnxruntime/tensorrt (repeatable); without "
                   "one, a folder is built or reused under the cache")  # fmt: skip
    p.add_argument(
        "--warmup",
        type=int,
        default=1,
        metavar="N",
        help="untimed calls per component and untimed end-to-end runs (default 1)",
    )
    p.add_argument(
        "--iters",
        type=int,
        default=5,
        metavar="N",
        help="timed calls per component shape (default 5)",
    )
    p.add_argument(
        "--repeats", type=int, default=3, metavar="N", help="timed end-to-end runs (default 3)"
    )
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="write every figure")
    p.add_argument(
        "--md",
        type=Path,
        default=None,
        metavar="PATH",
        help="write the tables (default: beside --json)",
    )
    p.add_argument(
        "--png",
        type=Path,
        default=None,
        metavar="PATH",
        help="write the per-part chart (default: beside --json)",
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1")
    p.add_argument(
        "--dtype",
        default="auto",
        help="torch backend dtype: auto (bf16 on GPU, fp32 on CPU), bf16, fp32",
    )
    p.add_argument(
        "--skip-baseline",
        action="store_true",
        help="no diffusers baseline and no torch eager run unless asked for",
    )
    p.add_argument("--max-vram", default=None, metavar="SIZE",
                   help="the torch backend under this memory budget's plan (zimage-trt plan; "
                   "8G, 12G …; RAM without a GPU): its memory table shows the plan's "
                   "predictions beside what was measured")  # fmt: skip
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_bench)
    return p


def cmd_bench(args: argparse.Namespace) -> int:
    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    result = run_bench(
        args.model,
        args.workflow,
        args.backends,
        args.engines,
        device=args.device,
        dtype=args.dtype,
        warmup=args.warmup,
        iters=args.iters,
        repeats=args.repeats,
        skip_baseline=args.skip_baseline,
        max_vram=parse_bytes(args.max_vram) if args.max_vram else None,
        log=log,
    )
    md, png = args.md, args.png
    if args.json is not None:
        md = md or args.json.with_suffix(".md")
        png = png or args.json.with_suffix(".png")
    write_outputs(result, args.json, md, png)
    print(markdown(result))
    for path in (args.json, md, png):
        if path is not None:
            print(f"wrote {path}")
    return 0
