"""``zimage-trt build`` and ``zimage-trt inspect``: engine folders made and looked into."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from zimage_trt.cli.common import RAW, examples, parse_bytes, stderr_log
from zimage_trt.errors import InputError


def cmd_inspect(args: argparse.Namespace) -> int:
    from zimage_trt.engines.folder import describe_folder

    print(describe_folder(args.dir, verify=args.verify))
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from zimage_trt.build_engines.build import run_build
    from zimage_trt.build_engines.parity import format_parity
    from zimage_trt.build_engines.plan import BuildOptions, plan_build
    from zimage_trt.build_engines.profiles import parse_resolutions
    from zimage_trt.build_engines.tensorrt_builder import format_plan
    from zimage_trt.engines.manifest import format_profiles
    from zimage_trt.runtime.vae_tiles import VaeTiles
    from zimage_trt.workflow import load_workflow

    if args.workflow is not None and args.resolutions is not None:
        raise InputError("give --workflow or --resolutions, not both")
    resolutions = parse_resolutions(args.resolutions) if args.resolutions else []
    wf = load_workflow(args.workflow or "zimage-121101") if not resolutions else None
    precision = args.precision or ("fp32" if args.backend == "onnxruntime" else "bf16")
    options = BuildOptions(
        backend=args.backend,
        precision=precision,
        caption_max=args.caption_max,
        buckets=list(args.bucket),
        vae_tiles=VaeTiles.parse(args.vae_tiles) if args.vae_tiles else None,
        with_encoder=args.with_encoder,
        check_parity=not args.no_parity,
        optimization_level=args.opt_level,
        memory_pool_limit=parse_bytes(args.memory_pool_limit) if args.memory_pool_limit else None,
        refittable=args.refittable,
        weight_streaming=args.weight_streaming,
        timing_cache=args.timing_cache,
        lora_ignore_unmatched=args.lora_ignore_unmatched,
        compute_capability=args.compute_capability,
        calibration=args.calibration,
    )
    log = stderr_log(args.quiet)
    plan = plan_build(options, model=args.model, workflow=wf, resolutions=resolutions, log=log)
    quantized = ""
    if plan.calibration is not None:
        quantized = f", {plan.calibration.manifest_record().label()}"
    print(
        f"profiles for {plan.source_label} ({precision}{quantized}, captions up to "
        f"{plan.caption.max} tokens)"
    )
    print(format_profiles(plan.profiles))
    if args.dry_run:
        print("(dry run: nothing built)")
        return 0
    if args.out is None:
        raise InputError("--out DIR is required (the engine folder to write)")
    result = run_build(plan, options, args.out, force=args.force, log=log)
    rows = [r for report in result.engines for r in report.parity]
    print()
    print("ONNX checks (TensorRT coverage per graph; parity with torch at each shape)")
    for report in result.engines:
        if report.reused:
            print(f"{report.name}: reused (cache key matches, files verified)")
        elif report.coverage is not None:
            print(f"{report.name}: {report.coverage.summary()}")
    if rows:
        print(format_parity(rows))
    plans = [(report.name, report.plan) for report in result.engines if report.plan is not None]
    if plans:
        print("\nTensorRT networks (layers by the precision the builder typed them; fused "
              "layers need a GPU: the engine inspector)")  # fmt: skip
        for name, info in plans:
            print(format_plan(name, info))
    m = result.manifest
    print(
        f"built {len(m.engines)} {m.backend} engines in {m.build_seconds:.1f} s, peak RAM "
        f"{m.peak_rss_bytes / 2**30:.2f} GiB → {result.folder}"
    )
    return 0


def add_build_parser(sub: Any) -> None:
    p = sub.add_parser(
        "build",
        formatter_class=RAW,
        help="export ONNX and build engines with one optimization profile per stage",
        description="Exports the text encoder, caption path, denoiser and VAE to ONNX (graph "
        "from the meta device, weights streamed into one external-data file), checks every "
        "graph (TensorRT op coverage; parity with torch at several shapes per dynamic axis), "
        "and builds TensorRT engines (or an ONNX Runtime folder) whose profiles cover every "
        "stage of the workflow. Engines whose cache key matches are reused.",
        epilog=examples(
            "zimage-trt build --model tiny --workflow zimage-121101 --backend onnxruntime "
            "--out engines/",
            "zimage-trt build --model ~/models/Z-Image-Turbo -w zimage-121101 --out engines/  "
            "# TensorRT, bf16",
            "zimage-trt build --model ~/models/Z-Image-Turbo --resolutions 1024x1024,768x1344 "
            "--dry-run",
        ),
    )
    p.add_argument(
        "--model",
        default=None,
        metavar="PATH|REPO|tiny",
        help="model folder, Hugging Face repo id, or 'tiny' (default: the workflow's)",
    )
    p.add_argument(
        "-w",
        "--workflow",
        default=None,
        metavar="NAME|FILE",
        help="derive profiles from this workflow (default: zimage-121101)",
    )
    p.add_argument(
        "--resolutions",
        default=None,
        metavar="WxH,…",
        help="derive single-stage profiles from these image sizes instead",
    )
    p.add_argument(
        "--bucket",
        action="append",
        default=[],
        metavar="WxH-WxH",
        help="add a dynamic profile spanning these sizes (repeatable)",
    )
    p.add_argument(
        "--vae-tiles",
        default=None,
        metavar="TILE[:OVERLAP]",
        help="build the VAE decoder for decoding in these tiles (pixels, e.g. 512:64; "
        "ComfyUI's VAEDecodeTiled): a profile per tiling in place of the whole-image ones, so "
        "that it holds a tile's activations; generate and serve then decode in them",
    )
    p.add_argument(
        "--backend",
        choices=("tensorrt", "tensorrt-rtx", "onnxruntime"),
        default="tensorrt",
        help="engines to build (default: tensorrt; tensorrt-rtx builds ahead of time for RTX "
        "GPUs, on any machine)",
    )
    p.add_argument(
        "--compute-capability",
        default=None,
        metavar="CC,…",
        help="tensorrt-rtx: the GPUs to compile for, e.g. 8.9,12.0 (7.5 8.0 8.6 8.9 12.0 12.1; "
        "default: this GPU, else 8.6,8.9,12.0)",
    )
    p.add_argument(
        "--precision",
        choices=("bf16", "fp32"),
        default=None,
        help="graph precision (default: bf16 for tensorrt and tensorrt-rtx, fp32 for "
        "onnxruntime); "
        "fp16 is refused (NaN images with Z-Image)",
    )
    p.add_argument(
        "--calibration",
        type=Path,
        default=None,
        metavar="DIR",
        help="a zimage-trt calibrate folder: the DiT engines (caption path, denoiser) get its "
        "FP8 / INT8 Q/DQ nodes (needs zimage-trt[calibrate]; FP8 needs compute capability ≥ 8.9)",
    )
    p.add_argument(
        "--caption-max",
        type=int,
        default=4096,
        metavar="N",
        help="longest prompt in tokens the engines serve (default 4096)",
    )
    p.add_argument(
        "--with-encoder",
        action="store_true",
        help="also build the VAE encoder for every stage (image inputs)",
    )
    p.add_argument(
        "--out", "-o", type=Path, default=None, metavar="DIR", help="the engine folder to write"
    )
    p.add_argument("--dry-run", action="store_true", help="print the profile table and stop")
    p.add_argument(
        "--force",
        action="store_true",
        help="build into a non-empty folder that is not an engine folder (nothing in it is "
        "replaced or deleted: the engines take names that are free)",
    )
    p.add_argument(
        "--no-parity",
        action="store_true",
        help="skip the torch-vs-ONNX parity check (coverage is always checked)",
    )
    p.add_argument(
        "--opt-level",
        type=int,
        default=3,
        metavar="0-5",
        help="TensorRT builder optimization level (default 3)",
    )
    p.add_argument(
        "--memory-pool-limit",
        default=None,
        metavar="SIZE",
        help="TensorRT workspace limit, e.g. 8G (default: TensorRT's)",
    )
    p.add_argument(
        "--refittable",
        action="store_true",
        help="TensorRT: refittable DiT engines (swap LoRAs without a rebuild; slower)",
    )
    p.add_argument(
        "--weight-streaming",
        action="store_true",
        help="TensorRT: text encoder and DiT engines that can keep part of their weights in "
        "CPU memory and stream them in as they run (generate --weight-streaming-budget); for "
        "GPUs their weights do not fit",
    )
    p.add_argument(
        "--timing-cache",
        type=Path,
        default=None,
        metavar="FILE",
        help="TensorRT timing cache to load and update (keep one per GPU)",
    )
    p.add_argument(
        "--lora-ignore-unmatched",
        action="store_true",
        help="skip LoRA keys that match no weight instead of failing",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_build)


def add_inspect_parser(sub: Any) -> None:
    p = sub.add_parser(
        "inspect",
        formatter_class=RAW,
        help="show what a built engine folder holds and whether it serves on this machine",
        description="Prints an engine folder's backend, precision, versions, GPU, weights and "
        "LoRAs (and whether other LoRAs can be swapped in), each engine's files and the profile "
        "table, then checks the folder against this machine. Reads no weights.",
        epilog=examples("zimage-trt inspect engines/", "zimage-trt inspect engines/ --verify"),
    )
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument("--verify", action="store_true", help="also check every file's sha-256")
    p.set_defaults(func=cmd_inspect)
