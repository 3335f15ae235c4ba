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
from zimage_trt.text_table import text_table


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
    dtype = str(engines.dtype).removeprefix("torch.")
    table = text_table(rows, right=(1, 2, 3, 4))
    return f"{table}\n({engines.backend} backend on {engines.device}, {dtype})"


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

    wf = load_workflow(_generate_workflow(args))
    if args.negative_prompt_file is not None:
        if not args.negative_prompt_file.is_file():
            raise FileNotFoundError(f"negative prompt file {args.negative_prompt_file} not found")
        wf.prompts.negative, wf.prompts.negative_file = None, str(args.negative_prompt_file)
    if args.lora:
        wf.models.loras = [LoraRef(path=p, strength=w) for p, w in map(_parse_lora, args.lora)]
    jobs = _jobs(args)
    if args.engines is not None:
        if args.compile:
            raise ValueError(
                "--compile serves the torch backend (--model); an engine folder is compiled already"
            )
        pipeline = _engine_pipeline(args, wf)
    elif args.backend != "torch":
        raise ValueError(
            f"the {args.backend} backend serves a built engine folder: pass --engines DIR "
            f"(make one with `zimage-trt build --backend {args.backend} --out DIR …`)"
        )
    else:
        device = pick_device(args.device)
        pipeline = load_torch_pipeline(
            wf,
            args.model,
            device=device,
            dtype=pick_dtype(args.dtype, device),
            search=_search(args),
            lora_ignore_unmatched=args.lora_ignore_unmatched,
            compile=args.compile,
            compile_scope=args.compile_scope,
        )
    for job in jobs:
        job_wf = apply_overrides(wf.model_copy(deep=True), **job)
        generation = pipeline.run(job_wf, progress=_progress(args.quiet))
        paths = pipeline.save(job_wf, generation, args.out)
        print(_summary(generation, pipeline.engines))
        _print_compile_stats(pipeline.engines)
        for path in paths:
            print(f"wrote {path}")
    return 0


def _generate_workflow(args: argparse.Namespace) -> str | Path:
    """-w, else the workflow an engine folder was built for, else zimage-turbo."""
    if args.workflow is not None:
        return str(args.workflow)
    if args.engines is not None:
        from zimage_trt.runtime.manifest import read_manifest

        manifest = read_manifest(args.engines)
        if manifest.workflow_file:
            return args.engines / manifest.workflow_file
    return "zimage-turbo"


def _print_compile_stats(engines: Any) -> None:
    from zimage_trt.runtime.compiled import compile_stats

    stats = compile_stats(engines)
    if stats is None or not stats.report():
        return
    print(stats.table())
    print(f"compile: {stats.compile_seconds():.2f} s in first calls (included above)")
    for row in stats.problems():
        print(f"warning: {row.engine} {row.shapes}: {row.status}", file=sys.stderr)


def _search(args: argparse.Namespace) -> tuple[Path, ...]:
    """Where relative LoRA paths are looked for: the workflow file's folder, then here."""
    wf_file = Path(args.workflow) if args.workflow else None
    workflow_dir = wf_file.resolve().parent if wf_file and wf_file.is_file() else None
    return tuple(p for p in (workflow_dir, Path.cwd()) if p is not None)


def _engine_pipeline(args: argparse.Namespace, wf: Any) -> Any:
    """The pipeline of a built folder, refused with the reason if it does not fit."""
    from zimage_trt.runtime.backends import pick_device
    from zimage_trt.runtime.engine_folder import check_request, load_engine_folder
    from zimage_trt.runtime.manifest import read_manifest

    manifest = read_manifest(args.engines)
    if args.backend not in ("torch", manifest.backend):  # torch: the default, i.e. not chosen
        raise ValueError(
            f"--backend {args.backend} asked for, but {args.engines} holds "
            f"{manifest.backend} engines"
        )
    device = None if args.device == "auto" else pick_device(args.device)
    swap = None
    if check_request(manifest, wf, args.engines):  # other LoRAs: refit from the base DiT
        from zimage_trt.runtime.refit import plan_lora_swap

        swap = plan_lora_swap(
            manifest, args.engines, wf, model=args.model, search=_search(args),
            lora_ignore_unmatched=args.lora_ignore_unmatched, log=_info(args.quiet),
        )  # fmt: skip
    elif args.model is not None:
        raise ValueError(
            "--model with --engines names the base DiT for swapping LoRAs; the engines already "
            "hold the workflow's LoRAs, so it is not needed"
        )
    pipeline, _ = load_engine_folder(
        args.engines, device=device, cuda_graphs=args.cuda_graphs, swap=swap,
        log=_info(args.quiet),
    )  # fmt: skip
    pipeline.preflight(wf)
    return pipeline


def _info(quiet: bool) -> Callable[[str], None]:
    def log(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr, flush=True)

    return log


def _parse_bytes(text: str) -> int:
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    number, unit = text.rstrip("iBb").upper()[:-1], text.rstrip("iBb").upper()[-1:]
    if unit.isdigit():
        number, unit = number + unit, ""
    try:
        value = int(float(number) * units[unit])
    except (ValueError, KeyError):
        raise ValueError(f"memory size {text!r} is not a number with K, M or G (e.g. 8G)") from None
    if value <= 0:
        raise ValueError(f"memory size {text!r} must be positive")
    return value


def cmd_inspect(args: argparse.Namespace) -> int:
    from zimage_trt.runtime.engine_folder import describe_folder

    print(describe_folder(args.dir, verify=args.verify))
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from zimage_trt.build_engines.build import BuildOptions, plan_build, run_build
    from zimage_trt.build_engines.parity import format_parity
    from zimage_trt.build_engines.profiles import parse_resolutions
    from zimage_trt.runtime.manifest import format_profiles
    from zimage_trt.workflow import load_workflow

    if args.workflow is not None and args.resolutions is not None:
        raise ValueError("give --workflow or --resolutions, not both")
    resolutions = parse_resolutions(args.resolutions) if args.resolutions else []
    wf = load_workflow(args.workflow or "zimage-121101") if not resolutions else None
    precision = args.precision or ("bf16" if args.backend == "tensorrt" else "fp32")
    options = BuildOptions(
        backend=args.backend,
        precision=precision,
        caption_max=args.caption_max,
        buckets=list(args.bucket),
        with_encoder=args.with_encoder,
        check_parity=not args.no_parity,
        optimization_level=args.opt_level,
        memory_pool_limit=_parse_bytes(args.memory_pool_limit) if args.memory_pool_limit else None,
        refittable=args.refittable,
        timing_cache=args.timing_cache,
        lora_ignore_unmatched=args.lora_ignore_unmatched,
    )
    log = _info(args.quiet)
    plan = plan_build(options, model=args.model, workflow=wf, resolutions=resolutions, log=log)
    print(
        f"profiles for {plan.source_label} ({precision}, captions up to {plan.caption.max} tokens)"
    )
    print(format_profiles(plan.profiles))
    if args.dry_run:
        print("(dry run: nothing built)")
        return 0
    if args.out is None:
        raise ValueError("--out DIR is required (the engine folder to write)")
    result = run_build(plan, options, args.out, log=log)
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
    m = result.manifest
    print(
        f"built {len(m.engines)} {m.backend} engines in {m.build_seconds:.1f} s, peak RAM "
        f"{m.peak_rss_bytes / 2**30:.2f} GiB → {result.folder}"
    )
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
        choices=("torch", "onnxruntime", "tensorrt"),
        default="torch",
        help="torch (eager, from --model) or a compiled backend (from --engines)",
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
        default=None,
        metavar="NAME|FILE",
        help="preset name or YAML file (default: the workflow the --engines were built for, "
        "else zimage-turbo)",
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
        "--engines",
        type=Path,
        default=None,
        metavar="DIR",
        help="run the engines of a folder made by `zimage-trt build`; with other LoRAs than "
        "the folder's, refittable engines take them from the base DiT (the workflow's, or "
        "--model)",
    )
    p.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="TensorRT: capture the denoiser per stage shape and replay it",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch backend: torch.compile each engine per stage shape (CUDA graphs on GPU); "
        "compile time is reported separately",
    )
    p.add_argument(
        "--compile-scope",
        choices=("whole", "regional"),
        default="whole",
        help="with --compile: whole networks (default) or each DiT / encoder block, which "
        "compiles in a fraction of the time for deep models",
    )
    p.add_argument(
        "--lora-ignore-unmatched",
        action="store_true",
        help="skip LoRA keys that match no weight instead of failing",
    )
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "build",
        formatter_class=raw,
        help="export ONNX and build engines with one optimization profile per stage",
        description="Exports the text encoder, caption path, denoiser and VAE to ONNX (graph "
        "from the meta device, weights streamed into one external-data file), checks every "
        "graph (TensorRT op coverage; parity with torch at several shapes per dynamic axis), "
        "and builds TensorRT engines (or an ONNX Runtime folder) whose profiles cover every "
        "stage of the workflow. Engines whose cache key matches are reused.",
        epilog=_examples(
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
        "--backend",
        choices=("tensorrt", "onnxruntime"),
        default="tensorrt",
        help="engines to build (default: tensorrt)",
    )
    p.add_argument(
        "--precision",
        choices=("bf16", "fp32"),
        default=None,
        help="graph precision (default: bf16 for tensorrt, fp32 for onnxruntime); "
        "fp16 is refused (NaN images with Z-Image)",
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

    from zimage_trt.bench import add_bench_parser

    add_bench_parser(sub)

    p = sub.add_parser(
        "inspect",
        formatter_class=raw,
        help="show what a built engine folder holds and whether it serves on this machine",
        description="Prints an engine folder's backend, precision, versions, GPU, weights and "
        "LoRAs (and whether other LoRAs can be swapped in), each engine's files and the profile "
        "table, then checks the folder against this machine. Reads no weights.",
        epilog=_examples("zimage-trt inspect engines/", "zimage-trt inspect engines/ --verify"),
    )
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument("--verify", action="store_true", help="also check every file's sha-256")
    p.set_defaults(func=cmd_inspect)

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
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"zimage-trt: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
