"""``zimage-trt calibrate``: FP8 / INT8 calibration of the DiT on the workflow itself
(``zimage_trt.calibration``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from zimage_trt.cli.common import RAW, examples, progress_bars, stderr_log
from zimage_trt.errors import InputError, RunError

CALIB_SIZE_MAX = 4096


class QualityError(RunError):
    """A calibration below the quality asked for (``--min-psnr``): nothing is written."""


def add_parser(sub: Any) -> None:
    from zimage_trt.calibration.quantize import DEFAULT_EXCLUDE, PRECISIONS

    p = sub.add_parser(
        "calibrate",
        formatter_class=RAW,
        help="FP8 / INT8 calibration of the DiT (NVIDIA ModelOpt), on the workflow itself",
        description="Quantize the DiT's Linear layers (weights and inputs) to FP8 (E4M3, per "
        "tensor) or INT8 (per output channel weights, per tensor inputs) with NVIDIA ModelOpt's "
        "post-training quantization, calibrated by running the workflow — its stages, sigmas, "
        "sizes, cfg with the negative prompt, EasyCache — over --calib-size prompts (the shipped "
        "English and Chinese set, or --prompts), seed i for prompt i. Writes DIR/calibration.json "
        "(config, exclusions, hashes of the DiT, LoRAs and prompts) and the quantizers' amax "
        "values (safetensors). FP8 only: --quantize-attention adds q/k/v quantizers to every "
        "attention of the DiT; --quantize-text-encoder quantizes the Qwen3 text encoder's "
        "Linear layers too (calibrated on the same prompts and the negative prompt; 8 GB → 4 GB "
        "of weights at full size). Needs pip install 'zimage-trt[calibrate]'.",
        epilog=examples(
            "zimage-trt calibrate --model ~/models/Z-Image-Turbo -w zimage-121101 "
            "--precision fp8 --out calib-fp8/",
            "zimage-trt calibrate --model ~/models/Z-Image-Turbo -w zimage-121101 "
            "--precision fp8 --quantize-attention --quantize-text-encoder --out calib-fp8-all/",
            "zimage-trt calibrate --model tiny --precision int8 --calib-size 4 --out /tmp/c",
        ),
    )
    p.add_argument("--model", required=True, metavar="PATH|REPO|tiny", help="the model to quantize")
    p.add_argument("-w", "--workflow", default=None, help="preset or YAML (default zimage-turbo)")
    p.add_argument("--precision", required=True, choices=PRECISIONS)
    p.add_argument("--prompts", type=Path, default=None, metavar="FILE",
                   help="calibration prompts, one per line (default: the shipped 128)")  # fmt: skip
    p.add_argument("--calib-size", type=int, default=32, metavar="N",
                   help="prompts to run (default 32; the first N of the set)")  # fmt: skip
    p.add_argument(
        "--exclude",
        action="append",
        default=None,
        metavar="PATTERN",
        help="a module-name fragment to leave in full precision too (repeatable; always: "
        f"{', '.join(DEFAULT_EXCLUDE)}; e.g. adaLN_modulation, layers.0.)",
    )
    p.add_argument(
        "--quantize-attention",
        action="store_true",
        help="FP8 quantizers on the DiT attention's q, k and v (after RoPE) too",
    )
    p.add_argument(
        "--quantize-text-encoder",
        action="store_true",
        help="quantize the text encoder to FP8 too (every Linear, weights and inputs)",
    )
    p.add_argument(
        "--report",
        action="store_true",
        help="then render --report-prompts held-out prompts quantized and unquantized (same "
        "seeds): per-stage latent error, PSNR, SSIM; printed and kept in calibration.json",
    )
    p.add_argument(
        "--report-prompts",
        type=int,
        default=4,
        metavar="N",
        help="held-out prompts for --report (default 4: those after --calib-size)",
    )
    p.add_argument("--min-psnr", type=float, default=None, metavar="DB",
                   help="refuse to write a calibration whose worst held-out PSNR is below DB "
                   "(implies --report)")  # fmt: skip
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    p.add_argument("--out", type=Path, required=True, metavar="DIR")
    p.add_argument("--force", action="store_true", help="replace a calibration in DIR")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from zimage_trt.calibration.calibrate import (
        CALIBRATION,
        calibrate,
        dependencies,
        read_prompts,
        save,
        shipped_prompts,
    )
    from zimage_trt.calibration.quantize import DEFAULT_EXCLUDE, FP8_ONLY, modelopt_quantization
    from zimage_trt.runtime.pipeline import Pipeline
    from zimage_trt.workflow.resolve import model_sources

    for part in ("attention", "text_encoder"):
        if getattr(args, f"quantize_{part}") and args.precision != "fp8":
            raise InputError(FP8_ONLY[part])
    if not 1 <= args.calib_size <= CALIB_SIZE_MAX:
        raise InputError(f"--calib-size {args.calib_size} is outside 1 … {CALIB_SIZE_MAX}")
    if (args.out / CALIBRATION).exists() and not args.force:
        raise InputError(
            f"{args.out / CALIBRATION} exists; not overwritten (pass --force to replace it)"
        )
    prompts = read_prompts(args.prompts) if args.prompts else shipped_prompts()
    if len(prompts) < args.calib_size:
        raise InputError(
            f"--calib-size {args.calib_size} is more than the {len(prompts)} prompts given"
        )
    report = args.report or args.min_psnr is not None
    held_out = prompts[args.calib_size : args.calib_size + args.report_prompts]
    left = len(prompts) - args.calib_size
    if report and not 1 <= args.report_prompts <= left:
        raise InputError(
            f"--report-prompts {args.report_prompts} is outside 1 … {left} (the prompts left "
            f"after the first --calib-size {args.calib_size} of {len(prompts)})"
        )
    log = stderr_log(args.quiet)
    modelopt_quantization()  # a missing ModelOpt is said before any weight loads
    pipeline = Pipeline.open(model=args.model, workflow=args.workflow, device=args.device,
                             log=log)  # fmt: skip
    wf = pipeline.workflow
    assert wf is not None  # opened with one
    bar = progress_bars(args.quiet)
    exclude = (*DEFAULT_EXCLUDE, *(args.exclude or ()))
    log(f"calibrating {args.precision} on {args.calib_size} prompt(s); full precision: "
        f"{', '.join(exclude) or 'nothing'}")  # fmt: skip
    sources = model_sources(wf, args.model, log=lambda msg: None)
    calibrated = calibrate(
        pipeline, args.precision, prompts[: args.calib_size], exclude=exclude,
        attention=args.quantize_attention, text_encoder=args.quantize_text_encoder,
        dependencies=dependencies(sources, text_encoder=args.quantize_text_encoder),
        progress=lambda i, n: bar("calibrate", i, n),
    )  # fmt: skip
    record = calibrated.record
    if report:
        from zimage_trt.calibration.report import format_report, quality_report

        log(f"quality report: {len(held_out)} held-out prompt(s), quantized and unquantized")
        record["report"] = quality_report(
            pipeline, calibrated.models, held_out, args.calib_size,
            progress=lambda i, n: bar("report", i, n),
        )  # fmt: skip
        print(format_report(record["report"]))
        worst = record["report"]["psnr_db"]["min"]
        if args.min_psnr is not None and worst < args.min_psnr:
            raise QualityError(
                f"the calibration's worst held-out PSNR is {worst:.2f} dB, below --min-psnr "
                f"{args.min_psnr:g}: not written (leave more layers in full precision with "
                "--exclude, e.g. adaLN_modulation, or calibrate on more prompts)"
            )
    path = save(calibrated, args.out, force=args.force)
    extra = " (attention q/k/v too)" if args.quantize_attention else ""
    if record["text_encoder"] is not None:
        extra += f", and {record['text_encoder']['quantizers']} in the text encoder"
    print(
        f"calibrated {record['quantizers']} quantizers ({args.precision}){extra} in "
        f"{record['seconds']:.1f} s on {args.calib_size} prompt(s); "
        f"{len(record['excluded_modules'])} Linear layer(s) left in full precision; wrote {path}"
    )
    return 0
