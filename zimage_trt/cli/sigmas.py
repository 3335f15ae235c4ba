"""``zimage-trt sigmas``: a noise schedule exactly as ComfyUI computes it."""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np
import yaml

from zimage_trt.cli.common import RAW, examples
from zimage_trt.sampling.model_sampling import FlowSampling
from zimage_trt.sampling.schedules import SCHEDULERS, calculate_sigmas


def _float32_list(values: Any) -> list[float]:
    """Shortest decimal that round-trips each float32 (what ComfyUI's tensors hold)."""
    return [float(str(np.float32(v))) for v in values]


def _parse_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, yaml.safe_load(value)


# ---- sigmas -------------------------------------------------------------------------------------
def cmd_sigmas(args: argparse.Namespace) -> int:

    options = dict(args.option)
    if args.scheduler == "flow_match_euler" and args.shift is not None:
        options.setdefault("shift", args.shift)
    shift = args.shift if args.shift is not None else 3.0
    sigmas = calculate_sigmas(
        args.scheduler, FlowSampling(shift), args.steps, args.denoise, **options
    )
    values = _float32_list(sigmas)
    if args.json:
        print(
            json.dumps(
                {
                    "scheduler": args.scheduler,
                    "steps": args.steps,
                    "denoise": args.denoise,
                    "shift": shift,
                    "options": options,
                    "sigmas": values,
                }
            )
        )
        return 0
    print(
        f"{args.scheduler}: {args.steps} steps, denoise {args.denoise}, shift {shift}"
        + (f", options {options}" if options else "")
        + f" → {len(values)} sigmas"
    )
    print(f"{'step':>4}  {'sigma':>12}  {'DiT t (1-σ)·1000':>17}")
    for i, s in enumerate(sigmas.tolist()):
        print(f"{i:>4}  {s:>12.9f}  {(1 - s) * 1000:>17.3f}")
    return 0


# ---- workflow -----------------------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "sigmas",
        formatter_class=RAW,
        help="print a noise schedule exactly as ComfyUI computes it",
        description="Print the sigmas a scheduler gives, as ComfyUI computes them (float32). "
        "Use it to check a ported workflow stage by stage.",
        epilog=examples(
            "zimage-trt sigmas --scheduler beta --shift 7 --steps 16 --denoise 0.6 --json",
            "zimage-trt sigmas --scheduler flow_match_euler --steps 9 --shift 3",
            "zimage-trt sigmas --scheduler flow_match_linear --steps 16 --denoise 0.7",
            "zimage-trt sigmas --scheduler beta --steps 20 -o alpha=0.5 -o beta=0.7",
            "zimage-trt sigmas --scheduler flow_match_euler --steps 9 -o use_dynamic_shifting=1",
        ),
    )
    p.add_argument(
        "--scheduler",
        required=True,
        choices=SCHEDULERS,
        metavar="NAME",
        help="one of: " + ", ".join(SCHEDULERS) + " (flow_match_linear is KSampler's "
        "'FlowMatchEulerDiscreteScheduler'; flow_match_euler is the custom "
        "'FlowMatchEulerDiscreteScheduler (Custom)' node)",
    )
    p.add_argument("--steps", type=int, required=True, help="sampling steps")
    p.add_argument(
        "--denoise",
        type=float,
        default=1.0,
        help="0..1; below 1 ComfyUI computes int(steps/denoise) steps and keeps the "
        "last steps+1 sigmas (default 1.0)",
    )
    p.add_argument(
        "--shift",
        type=float,
        default=None,
        help="model-sampling shift (ModelSamplingAuraFlow; Z-Image's own is 3.0); for "
        "flow_match_euler, the node's own shift input",
    )
    p.add_argument(
        "-o",
        "--option",
        type=_parse_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a scheduler parameter, e.g. alpha=0.6 (beta), "
        "rho=7 (karras), use_dynamic_shifting=true (flow_match_euler); repeatable",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_sigmas)
