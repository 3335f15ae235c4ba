"""The ``zimage-trt`` command: one argparse app, one sub-command per task."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from zimage_trt import __version__


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


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
    from zimage_trt.runtime.model_sampling import FlowSampling
    from zimage_trt.runtime.schedules import calculate_sigmas

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
def cmd_workflow_show(args: argparse.Namespace) -> int:
    from zimage_trt.workflow import load_workflow

    sys.stdout.write(load_workflow(args.workflow).to_yaml())
    return 0


def cmd_workflow_list(args: argparse.Namespace) -> int:
    from zimage_trt.workflow import load_workflow, preset_names

    for name in preset_names():
        wf = load_workflow(name)
        print(f"{name:<16} {len(wf.stages)} stage(s)  {wf.description.split('.')[0]}")
    return 0


def cmd_workflow_validate(args: argparse.Namespace) -> int:
    from zimage_trt.summary import stage_table
    from zimage_trt.workflow import load_workflow

    wf = load_workflow(args.workflow)
    print(f"{args.workflow}: valid workflow {wf.name!r}, {len(wf.stages)} stage(s)")
    print(stage_table(wf))
    return 0


def cmd_workflow_import(args: argparse.Namespace) -> int:
    from zimage_trt.comfy import import_graph

    wf = import_graph(args.graph)
    if args.output is None:
        sys.stdout.write(wf.to_yaml())
    else:
        wf.save(args.output)
        print(f"wrote {args.output}: workflow {wf.name!r}, {len(wf.stages)} stage(s)")
    return 0


# ---- models and images ---------------------------------------------------------------------------
def cmd_make_tiny(args: argparse.Namespace) -> int:
    from zimage_trt.models.tiny import make_tiny

    paths = make_tiny(args.dir)
    print(
        f"wrote a tiny Z-Image (real architectures, random weights; its images are noise) to "
        f"{paths.root}"
    )
    return 0


def _progress(quiet: bool) -> Callable[[str, int, int], None]:
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


def _summary(generation: Any, engines: Any) -> str:
    rows = [("part", "latent", "DiT calls", "cache skips", "seconds")]
    rows.append(("text", "", "", "", f"{generation.seconds['text']:.2f}"))
    for r in generation.stages:
        latent = "×".join(map(str, r.latent_shape[1:]))
        rows.append((r.name, latent, str(r.model_calls), str(r.calls_skipped), f"{r.seconds:.2f}"))
    rows.append(("decode", "", "", "", f"{generation.seconds['decode']:.2f}"))
    rows.append(("total", "", "", "", f"{sum(generation.seconds.values()):.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]
    dtype = str(engines.dtype).removeprefix("torch.")
    return "\n".join([*lines, f"({engines.backend} backend on {engines.device}, {dtype})"])


def _parse_lora(text: str) -> tuple[str, float]:
    path, sep, strength = text.rpartition(":")
    if sep and path:
        try:
            return path, float(strength)
        except ValueError:
            pass
    return text, 1.0


def _jobs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One job from the command line, or one per line of --prompts-file (JSON Lines: a string or
    an object with prompt, negative_prompt, trigger_word, seed)."""
    base = {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "trigger_word": args.trigger_word,
        "seed": args.seed,
    }
    if args.prompts_file is None:
        return [base]
    jobs = []
    allowed = set(base)
    for n, line in enumerate(args.prompts_file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{args.prompts_file}:{n}: not JSON ({exc.msg})") from None
        item = {"prompt": item} if isinstance(item, str) else item
        if not isinstance(item, dict) or set(item) - allowed:
            raise ValueError(
                f"{args.prompts_file}:{n}: expected a string or an object with "
                f"keys {sorted(allowed)}, got {line.strip()[:80]!r}"
            )
        jobs.append({**base, **item})
    return jobs


def cmd_generate(args: argparse.Namespace) -> int:
    from zimage_trt.runtime.backends import load_torch_pipeline, pick_device, pick_dtype
    from zimage_trt.runtime.pipeline import apply_overrides
    from zimage_trt.workflow import LoraRef, load_workflow

    wf = load_workflow(args.workflow)
    if args.negative_prompt_file is not None:
        if not args.negative_prompt_file.is_file():
            raise FileNotFoundError(f"negative prompt file {args.negative_prompt_file} not found")
        wf.prompts.negative, wf.prompts.negative_file = None, str(args.negative_prompt_file)
    if args.lora:
        wf.models.loras = [LoraRef(path=p, strength=w) for p, w in map(_parse_lora, args.lora)]
    jobs = _jobs(args)
    device = pick_device(args.device)
    workflow_dir = Path(args.workflow).resolve().parent if Path(args.workflow).is_file() else None
    search = tuple(p for p in (workflow_dir, Path.cwd()) if p is not None)
    pipeline = load_torch_pipeline(
        wf,
        args.model,
        device=device,
        dtype=pick_dtype(args.dtype, device),
        search=search,
        lora_ignore_unmatched=args.lora_ignore_unmatched,
    )
    for job in jobs:
        job_wf = apply_overrides(wf.model_copy(deep=True), **job)
        generation = pipeline.run(job_wf, progress=_progress(args.quiet))
        paths = pipeline.save(job_wf, generation, args.out)
        print(_summary(generation, pipeline.engines))
        for path in paths:
            print(f"wrote {path}")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from zimage_trt.reproduce import reproduce

    result = reproduce(
        args.image,
        args.model,
        device=args.device,
        dtype=args.dtype,
        out=args.out,
        progress=_progress(args.quiet),
    )
    print(_summary(result.generation, result.engines))
    print(f"source {args.image}: workflow from its {result.source}")
    print(f"PSNR {result.psnr:.2f} dB, SSIM {result.ssim:.4f} against the original")
    for path in result.generation.paths:
        print(f"wrote {path}")
    return 0


# ---- the parser ---------------------------------------------------------------------------------
def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        metavar="PATH|REPO|tiny",
        help="model folder, Hugging Face repo id (from the local cache), or 'tiny' "
        "(default: the workflow's models section)",
    )
    p.add_argument(
        "--out",
        "-o",
        type=Path,
        default=None,
        metavar="DIR",
        help="output folder (default: the workflow's)",
    )
    p.add_argument(
        "--backend",
        choices=("torch",),
        default="torch",
        help="engine backend (compiled backends arrive with `zimage-trt build`)",
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1")
    p.add_argument(
        "--dtype",
        default="auto",
        help="DiT/VAE compute dtype: auto (bf16 on GPU, "
        "fp32 on CPU), bf16, fp32; fp16 is refused (NaN images with Z-Image)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="zimage-trt",
        formatter_class=raw,
        description="Compiled inference for Z-Image-Turbo with ComfyUI-identical sampling.",
        epilog=_examples(
            "zimage-trt workflow show zimage-121101",
            "zimage-trt workflow import my_graph.json -o my_workflow.yaml",
            "zimage-trt sigmas --scheduler beta --shift 7 --steps 16 --denoise 0.6",
        ),
    )
    parser.add_argument("--version", action="version", version=f"zimage-trt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from zimage_trt.runtime.schedules import SCHEDULERS

    p = sub.add_parser(
        "sigmas",
        formatter_class=raw,
        help="print a noise schedule exactly as ComfyUI computes it",
        description="Print the sigmas a scheduler gives, as ComfyUI computes them (float32). "
        "Use it to check a ported workflow stage by stage.",
        epilog=_examples(
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

    w = sub.add_parser(
        "workflow",
        formatter_class=raw,
        help="show, validate and import workflows",
        description="Workflows are YAML files (or built-in presets) describing a whole "
        "multi-stage run.",
        epilog=_examples(
            "zimage-trt workflow list",
            "zimage-trt workflow show zimage-121101 > mine.yaml",
            "zimage-trt workflow validate mine.yaml",
            "zimage-trt workflow import ComfyUI_00001_.png -o mine.yaml",
        ),
    )
    wsub = w.add_subparsers(dest="workflow_command", required=True, metavar="ACTION")
    q = wsub.add_parser(
        "list",
        help="list the built-in presets",
        formatter_class=raw,
        epilog=_examples("zimage-trt workflow list"),
    )
    q.set_defaults(func=cmd_workflow_list)
    q = wsub.add_parser(
        "show",
        help="print a preset or a workflow file as YAML",
        formatter_class=raw,
        epilog=_examples(
            "zimage-trt workflow show zimage-121101", "zimage-trt workflow show ./mine.yaml"
        ),
    )
    q.add_argument("workflow", metavar="NAME|FILE")
    q.set_defaults(func=cmd_workflow_show)
    q = wsub.add_parser(
        "validate",
        help="check a workflow and print its stages",
        formatter_class=raw,
        epilog=_examples(
            "zimage-trt workflow validate mine.yaml", "zimage-trt workflow validate zimage-121101"
        ),
    )
    q.add_argument("workflow", metavar="NAME|FILE")
    q.set_defaults(func=cmd_workflow_validate)
    q = wsub.add_parser(
        "import",
        formatter_class=raw,
        help="convert a ComfyUI graph (API JSON, UI JSON or PNG) into a workflow",
        description="Reads ComfyUI's API-format JSON, its UI workflow JSON, or a PNG ComfyUI "
        "saved (its embedded graph), follows the graph back from every SaveImage/PreviewImage "
        "and writes the equivalent workflow.",
        epilog=_examples(
            "zimage-trt workflow import workflow_api.json -o mine.yaml",
            "zimage-trt workflow import ComfyUI_00001_.png",
        ),
    )
    q.add_argument("graph", type=Path, metavar="GRAPH")
    q.add_argument(
        "-o", "--output", type=Path, default=None, help="write the YAML here (default: print it)"
    )
    q.set_defaults(func=cmd_workflow_import)
    p = sub.add_parser(
        "generate",
        formatter_class=raw,
        help="run a workflow and write its images",
        description="Run a workflow (preset or YAML) end to end: prompts, every stage, the VAE; "
        "writes the image (and stage previews) under the workflow's output folder, with the "
        "workflow, prompts and seeds in the PNG, and prints a timing table.",
        epilog=_examples(
            "zimage-trt generate --model tiny --workflow zimage-121101 --prompt 'a red fox in "
            "snow' --out out/   # smoke run: its images are noise",
            "zimage-trt generate --model Tongyi-MAI/Z-Image-Turbo -p 'a red fox' --seed 7",
            "zimage-trt generate -w zimage-121101 --model ~/models/Z-Image-Turbo --lora "
            "style.safetensors:0.8 --trigger-word 'zstyle'",
            "zimage-trt generate -w mine.yaml --prompts-file prompts.jsonl --out batch/",
        ),
    )
    p.add_argument(
        "-w",
        "--workflow",
        default="zimage-turbo",
        metavar="NAME|FILE",
        help="preset name or YAML file (default: zimage-turbo)",
    )
    p.add_argument("-p", "--prompt", default=None, help="replace the positive prompt")
    p.add_argument(
        "--trigger-word",
        default=None,
        metavar="T",
        help="LoRA trigger word, joined as '{trigger}, {prompt}' ('' removes it)",
    )
    negative = p.add_mutually_exclusive_group()
    negative.add_argument(
        "-n",
        "--negative-prompt",
        default=None,
        metavar="T",
        help="replace the negative prompt (used where cfg > 1)",
    )
    negative.add_argument(
        "--negative-prompt-file",
        type=Path,
        default=None,
        metavar="F",
        help="read the negative prompt from a UTF-8 text file",
    )
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:STRENGTH]",
        help="use this LoRA instead of the workflow's (repeatable; strength 1.0)",
    )
    p.add_argument(
        "--seed",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="seeds of the first stages, in order",
    )
    p.add_argument(
        "--prompts-file",
        type=Path,
        default=None,
        metavar="JSONL",
        help="batch: one prompt per line, a JSON string or an object with prompt, "
        "negative_prompt, trigger_word, seed",
    )
    _model_options(p)
    p.add_argument(
        "--lora-ignore-unmatched",
        action="store_true",
        help="skip LoRA keys that match no weight instead of failing",
    )
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "reproduce",
        formatter_class=raw,
        help="re-render an image from the workflow or ComfyUI graph embedded in it",
        description="Reads the workflow a zimage-trt PNG carries, or the ComfyUI graph of a "
        "ComfyUI PNG, renders it again and reports PSNR and SSIM against the original.",
        epilog=_examples(
            "zimage-trt reproduce ComfyUI_00042_.png --model ~/models/Z-Image-Turbo",
            "zimage-trt reproduce out/zimage_00001_.png --model tiny",
        ),
    )
    p.add_argument("image", type=Path, metavar="PNG")
    _model_options(p)
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser(
        "make-tiny",
        formatter_class=raw,
        help="write a tiny random-weight Z-Image (real architectures) for tests and smoke runs",
        description="Writes a diffusers-layout folder with the real architectures at tiny sizes "
        "and deterministic random weights, the real Qwen tokenizer, the same weights as ComfyUI "
        "single files and a GGUF text encoder, and a tiny LoRA. Its images are noise.",
        epilog=_examples("zimage-trt make-tiny ./tiny-zimage"),
    )
    p.add_argument("dir", type=Path, metavar="DIR")
    p.set_defaults(func=cmd_make_tiny)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError) as exc:
        print(f"zimage-trt: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
