"""One-GPU benchmark of the reference workflow at full size, ready to run on an H100/H200.

    python benchmarks/gpu_bench.py --out benchmarks/results/          # on the GPU, < 8 minutes
    python benchmarks/gpu_bench.py --tiny --device cpu --out /tmp/b   # the CPU dry run (a test)

The full-size architectures (6.15 B DiT, Qwen3-4B's 35 encoder blocks, the Flux VAE) are built
directly on the device with random weights scaled by 1/√fan-in, which keeps activations finite:
kernel times do not depend on weight values, so the timings are those of the real model. What
does depend on the weights is labelled: EasyCache's skip decisions on random weights are
synthetic, and the images are noise. Backends: torch eager and torch.compile (CUDA graphs per
stage shape), and TensorRT when ``tensorrt`` imports and ``--tensorrt-engines DIR`` names a built
folder (a full-size TensorRT build does not fit this script's time budget). Writes
``gpu_bench-<device>.json`` (+ .md and .png) into ``--out``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from zimage_trt.engines.protocol import Engines
from zimage_trt.engines.torch_engines import torch_engines
from zimage_trt.models.dit import DiTConfig, ZImageDiT
from zimage_trt.models.text_encoder import Qwen3Config, Qwen3TextEncoder
from zimage_trt.models.tokenizer import QwenTokenizer
from zimage_trt.models.vae import FluxVAE, VAEConfig
from zimage_trt.runtime.pipeline import Pipeline
from zimage_trt.workflow import Workflow, load_workflow

WEIGHTS_NOTE = (
    "random weights (normal, scaled by 1/sqrt(fan-in); norms near 1): kernel timings do not depend "
    "on weight values; EasyCache skip counts and latent deviations from random weights are "
    "synthetic; images are noise"
)


def random_init_(module: nn.Module, seed: int) -> nn.Module:
    """Fill every parameter in place on its device: matrices z/√fan-in, norm scales 1 + 0.2·z,
    embeddings z, everything else 0.02·z (biases, pad tokens)."""
    generator = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            z = torch.randn(param.shape, generator=generator, device=param.device)
            if ("norm" in name and name.endswith("weight")) or name == "cap_embedder.0.weight":
                value = 1.0 + 0.2 * z
            elif "embed_tokens" in name:
                value = z
            elif z.ndim >= 2 and not name.endswith("pad_token"):
                value = z / math.sqrt(z[0].numel())
            else:
                value = 0.02 * z
            param.copy_(value.to(param.dtype))
    return module.requires_grad_(False)


def model_configs(tiny: bool) -> tuple[DiTConfig, Qwen3Config, VAEConfig]:
    if tiny:
        return DiTConfig.tiny(), Qwen3Config.tiny(), VAEConfig.tiny()
    return DiTConfig(), Qwen3Config(), VAEConfig()


Net = TypeVar("Net", bound=nn.Module)


def random_network(make: Callable[[], Net], device: torch.device, dtype: torch.dtype,
                   seed: int) -> Net:  # fmt: skip
    """``make()``'s network built on ``meta`` and materialised on ``device`` in ``dtype`` (no
    host copy), its weights drawn from ``seed``."""
    with torch.device("meta"):
        module = make()
    module = module.to_empty(device=device).to(dtype)
    random_init_(module, seed)
    return module.eval()


def random_dit(tiny: bool, device: torch.device, dtype: torch.dtype) -> ZImageDiT:
    return random_network(lambda: ZImageDiT(model_configs(tiny)[0]), device, dtype, seed=1)


def random_text_encoder(tiny: bool, device: torch.device, dtype: torch.dtype) -> Qwen3TextEncoder:
    return random_network(lambda: Qwen3TextEncoder(model_configs(tiny)[1]), device, dtype, seed=2)


def random_vae(tiny: bool, device: torch.device, dtype: torch.dtype) -> FluxVAE:
    return random_network(lambda: FluxVAE(model_configs(tiny)[2]), device, dtype, seed=3)


def random_models(
    tiny: bool, device: torch.device, dtype: torch.dtype
) -> tuple[ZImageDiT, Qwen3TextEncoder, FluxVAE]:
    """The three networks on ``device``; the text encoder in fp32 (its activations, as
    ComfyUI's)."""
    return (random_dit(tiny, device, dtype), random_text_encoder(tiny, device, torch.float32),
            random_vae(tiny, device, dtype))  # fmt: skip


def engines_for(
    backend: str, dit: ZImageDiT, text: Qwen3TextEncoder, vae: FluxVAE, device: torch.device,
    dtype: torch.dtype, compile_backend: str | None,
) -> Engines:  # fmt: skip
    eager = torch_engines(dit, text, vae, device=device, dtype=dtype)
    if backend == "torch":
        return eager
    if backend == "torch-compile":
        from zimage_trt.engines.compiled import compiled_engines

        kwargs: dict[str, Any] = {}
        if compile_backend is not None:
            kwargs["compiler"] = lambda m: torch.compile(m, backend=compile_backend, dynamic=False)
        return compiled_engines(eager, **kwargs)
    raise ValueError(f"unknown backend {backend!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON/MD/PNG")
    parser.add_argument("--tiny", action="store_true", help="tiny configs (the CPU dry run)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backends", default="torch,torch-compile")
    parser.add_argument("--tensorrt-engines", type=Path, default=None, metavar="DIR")
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend (default inductor; the dry run uses eager)",
    )
    parser.add_argument(
        "--compile-scope",
        choices=("regional", "whole"),
        default="regional",
        help="regional (default): compile each DiT / encoder block once, so compile time does "
        "not grow with depth; whole: the whole networks",
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument(
        "--edge",
        default=None,
        metavar="SIZE[,SIZE…]",
        help="the memory budgets the edge part plans and runs, after the backends (issue 17; "
        "default 24G,16G,12G,8G at full size, each rung of the planner's ladder for --tiny; "
        "'none' skips it)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=420.0,
        help="seconds from the start: a backend not started by then is skipped (the JSON says "
        "so); the JSON is also written after each part of each backend, so a kill keeps what was "
        "done",
    )
    args = parser.parse_args(argv)
    return run(args)


def run(args: argparse.Namespace) -> int:
    from zimage_trt.bench import markdown, run_bench, write_outputs

    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f} s] {msg}", flush=True)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "gpu_bench: no CUDA device visible (use --tiny --device cpu for the dry run)"
        )
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    log(f"building {'tiny' if args.tiny else 'full-size'} random-weight networks on {device}")
    dit, text, vae = random_models(args.tiny, device, dtype)
    eager = Pipeline(torch_engines(dit, text, vae, device=device, dtype=dtype),
                     QwenTokenizer.load(None))  # fmt: skip
    backends = [b for b in args.backends.split(",") if b]
    engines_dirs: list[Path] = []
    tensorrt_note = _tensorrt_note(args.tensorrt_engines)
    if tensorrt_note is None:
        backends.append("tensorrt")
        engines_dirs.append(args.tensorrt_engines)
    compile_options = {"scope": args.compile_scope, "backend": args.compile_backend}
    name = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device)
    stem = "gpu_bench-" + "".join(c if c.isalnum() else "_" for c in name).strip("_")
    if args.tiny:
        stem += "-tiny"
    args.out.mkdir(parents=True, exist_ok=True)
    paths = [args.out / f"{stem}.{ext}" for ext in ("json", "md", "png")]

    def stamp(result: dict[str, Any], partial: bool) -> None:
        elapsed = time.perf_counter() - start
        result["gpu_bench"] = {
            "size": "tiny" if args.tiny else "full",
            "weights": WEIGHTS_NOTE,
            "synthetic": ["backends.*.cache_effect", "backends.*.end_to_end calls skipped"],
            "tensorrt": tensorrt_note or f"engines from {args.tensorrt_engines}",
            "compile": compile_options,
            "partial": partial,
            "seconds": round(elapsed, 1),
            "budget_seconds": args.budget,
            "over_budget": elapsed > args.budget,
        }

    def save_partial(result: dict[str, Any]) -> None:
        stamp(result, partial=True)
        write_outputs(result, paths[0], None, None)
        states = ", ".join(f"{b} {r['status']}" for b, r in result["backends"].items())
        log(f"wrote {paths[0]} (so far: {states})")

    wf = load_workflow("zimage-121101")
    wf.models.loras = []  # random weights: nothing to fuse a LoRA into
    result = run_bench(
        None, wf, backends, engines_dirs, device=str(device),
        dtype="bf16" if dtype == torch.bfloat16 else "fp32", warmup=args.warmup,
        iters=args.iters, repeats=args.repeats, skip_baseline=True, eager=eager,
        compile_options=compile_options, deadline=start + args.budget, on_backend=save_partial,
        log=log,
    )  # fmt: skip
    del eager, dit, text, vae  # the edge part measures its own networks alone
    if args.edge != "none":
        stamp(result, partial=True)  # the tables and chart now, should the edge part be cut
        write_outputs(result, *paths)
        edge_plans(args, wf, device, dtype, start + args.budget, result,
                   lambda: save_partial(result), log)  # fmt: skip
    stamp(result, partial=False)
    elapsed = result["gpu_bench"]["seconds"]
    write_outputs(result, *paths)
    print(markdown(result))
    for path in paths:
        print(f"wrote {path}")
    print(f"gpu_bench: {elapsed:.0f} s ({WEIGHTS_NOTE})")
    return 0


EDGE_NOTE = (
    "one run per --max-vram budget, following its plan (torch backend); peaks: CUDA allocated / "
    "reserved above what the process held before the run's networks were made (none on the "
    "CPU); predicted: the plan's peak, CUDA context aside; latent delta against the first run"
)


def edge_plans(
    args: argparse.Namespace, wf: Workflow, device: torch.device, dtype: torch.dtype,
    deadline: float, result: dict[str, Any], save: Callable[[], None],
    log: Callable[[str], None],
) -> None:  # fmt: skip
    """Issue 17 on the device: each budget's memory plan (``runtime.memory_plan``) followed by
    the torch backend as ``generate --max-vram`` follows it (a bf16 text encoder kept in bf16 on
    a GPU), one run each: its seconds, its peak (CUDA: allocated and reserved above what the
    process held before its networks were made; the CPU: none, RSS holds the interpreter) beside
    the plan's prediction, and its final latent against the first run's (placement and tiles
    change no latent). Filled into ``result["edge"]`` run by run (``save`` after each)."""
    import gc

    from zimage_trt.cli.common import parse_bytes
    from zimage_trt.engines.placement import upcast_per_block
    from zimage_trt.errors import InputError
    from zimage_trt.runtime.memory_plan import Budget, MemoryPlanner, format_bytes
    from zimage_trt.runtime.preflight import prompt_tokens

    cuda = device.type == "cuda"
    tokenizer = QwenTokenizer.load(None)
    text_storage = torch.bfloat16 if cuda else torch.float32  # Z-Image's Qwen3 file is bf16
    planner = MemoryPlanner(
        wf, prompt_tokens(wf, tokenizer), model_configs(args.tiny), device=device.type,
        dit_precision="bf16" if dtype == torch.bfloat16 else "fp32", dtype=dtype,
        text_precision="bf16" if cuda else "fp32", text_dtype=torch.float32, text_upcast=cuda,
    )  # fmt: skip
    if args.edge is not None:
        budgets = [parse_bytes(part) for part in args.edge.split(",")]
    elif not args.tiny:
        budgets = [parse_bytes(size) for size in ("24G", "16G", "12G", "8G")]
    else:  # each rung at its own need: the plan keeps the first that fits
        needs = [max(r.peak for r in planner.predict(s)) + planner.overhead
                 for s in planner.ladder()]  # fmt: skip
        budgets = sorted(set(needs), reverse=True)[:3]
    out: dict[str, Any] = {"device": device.type, "runs": [], "note": EDGE_NOTE}
    result["edge"] = out
    first: torch.Tensor | None = None

    def text_encoder() -> Qwen3TextEncoder:  # stored as a file stores it, arriving on the CPU
        text = random_text_encoder(args.tiny, device, text_storage).to("cpu")
        if text_storage == torch.bfloat16:
            upcast_per_block(text)
        return text

    for budget in budgets:
        row: dict[str, Any] = {"budget_bytes": budget, "budget": format_bytes(budget)}
        out["runs"].append(row)
        if time.perf_counter() > deadline:
            row["status"] = "skipped: past the time budget"
            continue
        try:
            plan = planner.plan(budget)
        except InputError as exc:
            row["status"] = f"refused: {exc}"
            continue
        s = plan.strategy
        log(f"[edge] --max-vram {row['budget']}: {'; '.join(plan.choices)}")
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        held = torch.cuda.memory_allocated(device) if cuda else 0
        dit, text = random_dit(args.tiny, device, dtype), text_encoder()
        vae = random_vae(args.tiny, device, dtype)
        reload = (
            None
            if cuda
            else {  # released on the CPU: read again (here: made again)
                "text encoder": text_encoder,
                "DiT": lambda: random_dit(args.tiny, device, dtype),
            }
        )
        engines = torch_engines(dit, text, vae, device=device, dtype=dtype,
                                text_encoder_dtype=text_storage, resident_blocks=s.dit_blocks,
                                text_encoder_placement=s.text_encoder, reload=reload)  # fmt: skip
        del dit, text, vae
        pipeline = Pipeline(engines, tokenizer)
        pipeline.budget, pipeline.vae_tiles = Budget(plan, planner), s.vae_tiles
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        began = time.perf_counter()
        generation = pipeline.run(wf)
        row.update(status="ok", choices=plan.choices, seconds=time.perf_counter() - began,
                   predicted_peak_bytes=plan.peak, predicted_total_bytes=plan.total)  # fmt: skip
        if cuda:
            row["cuda_allocated_peak_bytes"] = torch.cuda.max_memory_allocated(device) - held
            row["cuda_reserved_peak_bytes"] = torch.cuda.max_memory_reserved(device) - held
        latent = generation.latent.float().cpu()
        if first is None:
            first = latent
        row["final_latent_max_abs_delta_vs_first"] = float((latent - first).abs().max())
        del pipeline, engines, generation
        save()


def _tensorrt_note(engines: Path | None) -> str | None:
    """None when TensorRT runs; else why not."""
    from zimage_trt.engines.tensorrt_engines import require_tensorrt

    try:
        require_tensorrt()
    except RuntimeError as exc:
        return f"not run: {exc}"
    if engines is None:
        return (
            "not run: no --tensorrt-engines folder (a full-size TensorRT build does not fit "
            "this script's time budget; build one with `zimage-trt build` first)"
        )
    return None


if __name__ == "__main__":
    sys.exit(main())
