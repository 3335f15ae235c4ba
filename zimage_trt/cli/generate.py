"""``zimage-trt generate`` and ``zimage-trt reproduce``: workflows run into images."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from zimage_trt.cli.common import RAW, examples, parse_bytes, progress_bars, stderr_log
from zimage_trt.errors import InputError
from zimage_trt.runtime.requests import GenerateRequest
from zimage_trt.text_table import text_table


def _summary(generation: Any, engines: Any) -> str:
    rows = [("part", "latent", "DiT calls", "cache skips", "seconds")]
    rows.append(("text", "", "", "", f"{generation.seconds['text']:.2f}"))
    for r in generation.stages:
        latent = "×".join(map(str, r.latent_shape[1:]))
        rows.append((r.name, latent, str(r.model_calls), str(r.calls_skipped), f"{r.seconds:.2f}"))
    rows.append(("decode", "", "", "", f"{generation.seconds['decode']:.2f}"))
    rows.append(("total", "", "", "", f"{sum(generation.seconds.values()):.2f}"))
    dtype = str(engines.dtype).removeprefix("torch.")
    if engines.quantization is not None:
        dtype += f", {engines.quantization}"
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


def _requests(args: argparse.Namespace) -> list[GenerateRequest]:
    """One request from the command line, or one per line of --prompts-file (JSON Lines: a
    string or an object with prompt, negative_prompt, trigger_word, seed)."""
    base = {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "trigger_word": args.trigger_word,
        "seed": args.seed,
    }
    if args.prompts_file is None:
        return [GenerateRequest(**base)]
    requests = []
    allowed = set(base)
    for n, line in enumerate(_lines(args.prompts_file), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{args.prompts_file}:{n}: not JSON ({exc.msg})") from None
        item = {"prompt": item} if isinstance(item, str) else item
        if not isinstance(item, dict) or set(item) - allowed:
            raise InputError(
                f"{args.prompts_file}:{n}: expected a string or an object with "
                f"keys {sorted(allowed)}, got {line.strip()[:80]!r}"
            )
        requests.append(GenerateRequest(**{**base, **item}, source=f"{args.prompts_file}:{n}"))
    if not requests:
        raise InputError(f"prompts file {args.prompts_file} holds no prompts")
    return requests


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not UTF-8 text ({exc.reason})") from None
    except IsADirectoryError:
        raise InputError(f"prompts file {path} is a folder, not a file") from None


def cmd_generate(args: argparse.Namespace) -> int:
    from zimage_trt.runtime.pipeline import Pipeline
    from zimage_trt.runtime.vae_tiles import VaeTiles

    requests = _requests(args)
    tiles = VaeTiles.parse(args.vae_tiles) if args.vae_tiles else None
    max_vram = parse_bytes(args.max_vram) if args.max_vram else None
    weight_budget = None
    if args.weight_streaming_budget is not None:
        from zimage_trt.engines.tensorrt_engines import WeightBudget

        weight_budget = WeightBudget.parse(args.weight_streaming_budget)
    pipeline = Pipeline.open(
        model=args.model,
        engines=args.engines,
        workflow=args.workflow,
        loras=[_parse_lora(text) for text in args.lora],
        negative_prompt_file=args.negative_prompt_file,
        backend=args.backend,
        device=args.device,
        dtype=args.dtype,
        compile=args.compile,
        compile_scope=args.compile_scope,
        gguf_in_memory=args.gguf_in_memory,
        resident_blocks=args.resident_blocks,
        text_encoder=args.text_encoder,
        vae_tiles=tiles,
        max_vram=max_vram,
        weight_budget=weight_budget,
        cuda_graphs=args.cuda_graphs,
        lora_ignore_unmatched=args.lora_ignore_unmatched,
        strict_model=True,
        requests=requests,
        output=args.out,
        # -q silences the progress bars, and an engine folder's checks; loading a model is
        # always reported
        log=stderr_log(args.quiet and args.engines is not None),
    )
    for request in requests:
        wf = pipeline.request_workflow(request)
        generation = pipeline.run(wf, progress=progress_bars(args.quiet))
        paths = pipeline.save(wf, generation, args.out)
        print(_summary(generation, pipeline.engines))
        _print_compile_stats(pipeline.engines)
        for path in paths:
            print(f"wrote {path}")
    return 0


def _print_compile_stats(engines: Any) -> None:
    from zimage_trt.engines.compiled import compile_stats

    stats = compile_stats(engines)
    if stats is None or not stats.report():
        return
    print(stats.table())
    print(f"compile: {stats.compile_seconds():.2f} s in first calls (included above)")
    for row in stats.problems():
        print(f"warning: {row.engine} {row.shapes}: {row.status}", file=sys.stderr)


def cmd_reproduce(args: argparse.Namespace) -> int:
    from zimage_trt.runtime.reproduce import reproduce

    result = reproduce(
        args.image,
        args.model,
        device=args.device,
        dtype=args.dtype,
        out=args.out,
        progress=progress_bars(args.quiet),
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
        choices=("torch", "onnxruntime", "tensorrt", "tensorrt-rtx"),
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


def add_generate_parser(sub: Any) -> None:
    p = sub.add_parser(
        "generate",
        formatter_class=RAW,
        help="run a workflow and write its images",
        description="Run a workflow (preset or YAML) end to end: prompts, every stage, the VAE; "
        "writes the image (and stage previews) under the workflow's output folder, with the "
        "workflow, prompts and seeds in the PNG, and prints a timing table.",
        epilog=examples(
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
        "--gguf-in-memory",
        action="store_true",
        help="keep a GGUF DiT quantized in memory (Q8_0: 1.06 bytes a weight, Q4_K: 0.56) and "
        "dequantize each layer as it runs, as ComfyUI-GGUF does (the same output; no LoRAs)",
    )
    p.add_argument(
        "--resident-blocks",
        type=int,
        default=None,
        metavar="N",
        help="keep N of the DiT's main blocks on the device and stream the others from CPU "
        "memory through two staging blocks, the next copied while one computes (torch backend; "
        "zimage-trt plan says how many fit)",
    )
    p.add_argument(
        "--text-encoder",
        choices=("resident", "released", "cpu"),
        default="resident",
        help="where the text encoder stays: on the device (default), released after encoding "
        "(it and the DiT take turns on the device; a new prompt brings it back), or on the CPU "
        "(torch backend)",
    )
    p.add_argument(
        "--max-vram",
        default=None,
        metavar="SIZE",
        help="a memory budget (8G, 12G, 512M …; RAM on a machine without a GPU): its plan "
        "(zimage-trt plan) places the networks, tiles the decode, and refuses what cannot fit "
        "(torch backend)",
    )
    p.add_argument(
        "--vae-tiles",
        default=None,
        metavar="TILE[:OVERLAP]",
        help="decode in tiles as ComfyUI's VAEDecodeTiled (pixels, e.g. 512:64; less memory "
        "for the decoder, seams blended as ComfyUI blends them)",
    )
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
        "--weight-streaming-budget",
        default=None,
        metavar="PCT|auto",
        help="with --engines built --weight-streaming: the share of each streaming engine's "
        "weights kept on the GPU (0–100 %%; the rest streamed from CPU memory as it runs), or "
        "auto (TensorRT's choice)",
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


def add_reproduce_parser(sub: Any) -> None:
    p = sub.add_parser(
        "reproduce",
        formatter_class=RAW,
        help="re-render an image from the workflow or ComfyUI graph embedded in it",
        description="Reads the workflow a zimage-trt PNG carries, or the ComfyUI graph of a "
        "ComfyUI PNG, renders it again and reports PSNR and SSIM against the original.",
        epilog=examples(
            "zimage-trt reproduce ComfyUI_00042_.png --model ~/models/Z-Image-Turbo",
            "zimage-trt reproduce out/zimage_00001_.png --model tiny",
        ),
    )
    p.add_argument("image", type=Path, metavar="PNG")
    _model_options(p)
    p.set_defaults(func=cmd_reproduce)
