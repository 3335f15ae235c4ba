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
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zimage_trt.engines.protocol import Engines
from zimage_trt.engines.torch_engines import torch_engines
from zimage_trt.models.dit import DiTConfig, ZImageDiT
from zimage_trt.models.text_encoder import Qwen3Config, Qwen3TextEncoder
from zimage_trt.models.tokenizer import QwenTokenizer
from zimage_trt.models.vae import FluxVAE, VAEConfig
from zimage_trt.runtime.pipeline import Pipeline
from zimage_trt.workflow import load_workflow

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


def random_models(
    tiny: bool, device: torch.device, dtype: torch.dtype
) -> tuple[ZImageDiT, Qwen3TextEncoder, FluxVAE]:
    """The three networks, built on ``meta`` and materialised on ``device`` (no host copy)."""
    dit_cfg = DiTConfig.tiny() if tiny else DiTConfig()
    text_cfg = Qwen3Config.tiny() if tiny else Qwen3Config()
    vae_cfg = VAEConfig.tiny() if tiny else VAEConfig()
    with torch.device("meta"):
        dit, text, vae = ZImageDiT(dit_cfg), Qwen3TextEncoder(text_cfg), FluxVAE(vae_cfg)
    dit = random_init_(dit.to_empty(device=device).to(dtype), seed=1)
    text = random_init_(text.to_empty(device=device), seed=2)  # fp32 activations, as ComfyUI
    vae = random_init_(vae.to_empty(device=device).to(dtype), seed=3)
    return dit.eval(), text.eval(), vae.eval()


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
    stamp(result, partial=False)
    elapsed = result["gpu_bench"]["seconds"]
    write_outputs(result, *paths)
    print(markdown(result))
    for path in paths:
        print(f"wrote {path}")
    print(f"gpu_bench: {elapsed:.0f} s ({WEIGHTS_NOTE})")
    return 0


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
