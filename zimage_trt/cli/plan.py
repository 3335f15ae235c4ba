"""``zimage-trt plan``: where every weight lives and what each phase of a workflow holds, for a
memory budget (``runtime.memory_plan``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from zimage_trt.cli.common import RAW, examples, parse_bytes
from zimage_trt.errors import InputError


def add_parser(sub: Any) -> None:
    from zimage_trt.runtime.memory_plan import DIT_PRECISIONS, TEXT_PRECISIONS

    p = sub.add_parser(
        "plan",
        formatter_class=RAW,
        help="a memory plan for a GPU (or RAM) budget: what fits where, per phase",
        description="Plan the workflow for --max-vram: each network's weights (precision, "
        "size, where they live: GPU, released after use, CPU, streamed block by block) and each "
        "phase's activations measured from the workflow's real shapes on the meta device (its "
        "latent sizes, cfg batching, caption lengths), with the predicted peak. The plan keeps "
        "the first of: everything resident; the text encoder released after encoding; and the "
        "decode in tiles; the text encoder on the CPU; the DiT streamed. A budget nothing "
        "meets is refused, naming the smallest that works. Without --model: Z-Image-Turbo's "
        "real configuration (nothing is read or downloaded). generate, bench and serve take "
        "--max-vram and follow the plan (the torch backend keeps a bf16 text encoder in bf16 "
        "and computes it in fp32, block by block).",
        epilog=examples(
            "zimage-trt plan -w zimage-121101 --max-vram 8G,12G,16G,24G",
            "zimage-trt plan -w zimage-121101 --max-vram 8G --dit-precision fp8 "
            "--text-encoder-precision fp8",
            "zimage-trt plan --model ~/models/Z-Image-Turbo --max-vram 12G --json plan.json",
        ),
    )
    p.add_argument(
        "--model",
        default=None,
        metavar="PATH|REPO|tiny",
        help="read the configurations from this model (default: Z-Image-Turbo's)",
    )
    p.add_argument("-w", "--workflow", default=None, help="preset or YAML (default zimage-turbo)")
    p.add_argument("--max-vram", required=True, metavar="SIZE[,SIZE…]",
                   help="the budget(s): 8G, 12G, 16GiB, 512M …")  # fmt: skip
    p.add_argument(
        "--device",
        choices=("auto", "cuda", "cpu"),
        default="auto",
        help="plan GPU memory (cuda) or RAM (cpu); auto: cuda if there is one",
    )
    p.add_argument("--dit-precision", choices=DIT_PRECISIONS, default="bf16",
                   help="the DiT's stored precision (fp8/int8: a calibrated build; q8_0/q4_k: a "
                   "GGUF file kept quantized)")  # fmt: skip
    p.add_argument("--text-encoder-precision", choices=TEXT_PRECISIONS, default="bf16")
    p.add_argument("--json", type=Path, default=None, metavar="FILE",
                   help="also write the plans as JSON")  # fmt: skip
    p.add_argument("--force", action="store_true", help="replace an existing --json file")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    import torch

    from zimage_trt.atomic import write_json
    from zimage_trt.models.tokenizer import QwenTokenizer
    from zimage_trt.runtime.memory_plan import MemoryPlanner, model_configs
    from zimage_trt.runtime.preflight import prompt_tokens
    from zimage_trt.runtime.requests import DEFAULT_WORKFLOW
    from zimage_trt.workflow import load_workflow

    budgets = [parse_bytes(part.strip()) for part in args.max_vram.split(",")]
    if args.json is not None and args.json.exists() and not args.force:
        raise InputError(f"{args.json} exists; not overwritten (pass --force to replace it)")
    wf = load_workflow(args.workflow or DEFAULT_WORKFLOW)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    configs = model_configs(args.model)
    tokens = prompt_tokens(wf, QwenTokenizer.from_package())
    planner = MemoryPlanner(wf, tokens, configs, device=device, dit_precision=args.dit_precision,
                            text_precision=args.text_encoder_precision)  # fmt: skip
    plans = []
    for text, budget in zip(args.max_vram.split(","), budgets, strict=True):
        plan = planner.plan(budget)
        label = f"{args.model or 'Z-Image-Turbo'} · {wf.name} · {device}"
        print(f"== {label} · --max-vram {text.strip()}")
        print(plan.table())
        print()
        plans.append({"model": args.model or "Z-Image-Turbo", "workflow": wf.name,
                      "tokens": tokens, **plan.as_json()})  # fmt: skip
    if args.json is not None:
        write_json(args.json, {"plans": plans})
        print(f"wrote {args.json}")
    return 0
