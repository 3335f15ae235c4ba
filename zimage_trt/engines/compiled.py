"""The compiled torch backend: each engine behind ``torch.compile``, specialised per stage shape.

Every engine is compiled with static shapes (``dynamic=False``), so each stage shape gets its own
graph, compiled on its first call. Caption-length axes are padded up to a bucket (multiples of
``CAPTION_BUCKET`` tokens) with masked slots before the call and sliced back after it, so a new
prompt lands in a graph compiled for an earlier one; the models mask the padding as keys, which
makes it exact up to float summation order:

* text encoder: ``input_ids`` padded with id 0, ``attention_mask`` with 0; attention is causal,
  so positions before the padding never see it. ``hidden`` is sliced back to L.
* caption path: ``cap_feats`` zero-padded, ``cap_mask`` False; ``caption_tokens`` keeps slots
  up to ceil(L/32)·32 valid (real tokens, then the pad token) and zeroes the rest, so the
  outputs are sliced back to those ceil(L/32)·32 slots, which is what the eager call returns.
* denoiser: ``cap_tokens`` zero-padded, ``cap_valid`` False: masked keys, and the image tokens'
  RoPE position counts valid slots only.

Compile options: ``fullgraph=True``, so a graph break raises instead of running part of the
network eagerly, and a per-engine recompile limit (``RECOMPILE_LIMIT`` stage shapes) past which
dynamo raises instead of silently running eagerly. On CUDA the denoiser is compiled with
``mode="reduce-overhead"``: inductor plus CUDA graphs, one per stage shape, captured on its
second call (after the timed compile, so the capture counts as steady state) and replayed for
every later step. The other engines run once per prompt or per stage, so a captured graph would
never replay while its memory pool stays held; they get inductor's default mode. bf16 and SDPA
come from the eager engines (``torch_engines``); the DiT's QKV projection is one fused Linear in
the checkpoint layout already. The bucket trades compute for compiles: a 17-token prompt runs
the DiT with 256 caption slots instead of 32 (about 1.1× the tokens at 672×864, 2.2× at
176×224); pass a smaller ``bucket`` where prompts are few and steps many.

``CompileStats`` times the first call of every (engine, input shapes) key — the compile — and
counts calls and the graphs dynamo compiled for that key: exactly one is right; zero means the
call ran without a compiled graph, more than one means it recompiled.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from zimage_trt.engines.protocol import DTYPE_NAMES, ENGINE_IO, Engine, Engines
from zimage_trt.engines.torch_engines import TorchEngine, refit_module
from zimage_trt.errors import InputError
from zimage_trt.models.dit import SEQ_MULTIPLE
from zimage_trt.text_table import text_table

CAPTION_BUCKET = 256  # caption-length axes are padded up to a multiple of this many tokens
RECOMPILE_LIMIT = 64  # distinct stage shapes one engine may compile before dynamo refuses
BACKEND = "torch-compile"
SCOPES = ("whole", "regional")
REGIONAL_ENGINES = ("text_encoder", "caption_path", "denoiser")  # the networks with deep stacks

# the inputs whose axis 1 is the caption length, per engine (engines not listed are not padded)
_TOKEN_INPUTS = {
    "text_encoder": ("input_ids", "attention_mask"),
    "caption_path": ("cap_feats", "cap_mask"),
    "denoiser": ("cap_tokens", "cap_valid"),
}

Compiler = Callable[[nn.Module], Callable[..., Any]]
ShapeKey = tuple[tuple[str, tuple[int, ...], str], ...]  # (input, shape, dtype) per input


def _graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process (any backend, any function)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _limit_options() -> dict[str, Any]:
    """Per-call recompile limit where torch has one (2.13+); else raise the global limit."""
    if "isolate_recompiles" in inspect.signature(torch.compile).parameters:
        return {"recompile_limit": RECOMPILE_LIMIT, "isolate_recompiles": True}
    config: Any = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
    return {}


def torch_compiler(
    mode: str | None = None,
    backend: str = "inductor",
    scope: str = "whole",
    skip: Sequence[nn.Module] = (),
) -> Compiler:
    """``torch.compile`` with static shapes and no silent eager fallback; ``mode`` applies to the
    inductor backend only ("eager" / "aot_eager" trace without generating code, for tests).

    ``scope="regional"`` compiles each block of the module's repeated stacks in place (the DiT's
    30 layers and refiners, the encoder's 35 blocks) instead of the whole network: identical
    blocks share one compiled graph, so compile time no longer grows with depth (a 30-layer
    DiT on CPU: 15.3 s against 54.2 s for the whole network, steady state within 15 %); the glue
    between blocks runs eagerly. Modules without a repeated stack are compiled whole. ``skip``:
    blocks another engine owns and compiles with its own options (see ``compiled_engines``).
    """
    if scope not in SCOPES:
        raise InputError(f"compile scope {scope!r} is not one of: {', '.join(SCOPES)}")
    options: dict[str, Any] = {"dynamic": False, "fullgraph": True, "backend": backend}
    if backend == "inductor" and mode is not None:
        options["mode"] = mode
    # untyped: the stubs' overloads predate recompile_limit / isolate_recompiles
    compile_fn: Callable[..., Callable[..., Any]] = torch.compile

    def compile_module(module: nn.Module) -> Callable[..., Any]:
        blocks = repeated_blocks(module) if scope == "regional" else []
        if not blocks:
            return compile_fn(module, **options, **_limit_options())
        for block in blocks:
            if not any(block is other for other in skip):
                block.compile(**options, **_limit_options())
        return module

    return compile_module


def repeated_blocks(module: nn.Module) -> list[nn.Module]:
    """The members of every ModuleList of two or more blocks of one class (the stacks)."""
    blocks: list[nn.Module] = []
    for child in module.modules():
        if not isinstance(child, nn.ModuleList) or len(child) < 2:
            continue
        members = list(child)
        if len({type(block) for block in members}) == 1:
            blocks.extend(members)
    return blocks


def default_mode(engine: str, device: torch.device) -> str | None:
    """CUDA graphs for the denoiser on CUDA (the step loop replays them); default otherwise."""
    return "reduce-overhead" if engine == "denoiser" and device.type == "cuda" else None


@dataclass
class ShapeStats:
    """One engine at one input signature: its compile (first call) and how it was used."""

    engine: str
    shapes: str  # e.g. "1×16×28×22, 1, 1×256×3840, 1×256"
    compile_seconds: float
    calls: int
    graphs: int  # graphs dynamo compiled on this key's calls; 1 when all is well (whole scope)
    regional: bool = False  # blocks compiled one by one: a first call compiles ≥ 1 graph, or 0
    # when blocks of the same shape were compiled already (by another engine's call)
    first_graphs: int = -1  # graphs of the first call (-1: equal to graphs)

    @property
    def status(self) -> str:
        if not self.regional:
            if self.graphs == 1:
                return "compiled"
            if self.graphs == 0:
                return "not compiled (eager)"
            return f"recompiled {self.graphs - 1}×"
        later = self.graphs - self.first_graphs
        if later:
            return f"recompiled {later}×"
        return "compiled" if self.first_graphs else "compiled (blocks shared)"


class CompileStats:
    """Compile time and call counts per engine and input signature, in first-call order."""

    def __init__(self) -> None:
        self._rows: dict[tuple[str, ShapeKey], ShapeStats] = {}

    def __contains__(self, key: tuple[str, ShapeKey]) -> bool:
        return key in self._rows

    def record(
        self, engine: str, key: ShapeKey, seconds: float, graphs: int, regional: bool = False
    ) -> None:
        """One call: ``seconds`` counts only for a key's first call (its compile)."""
        row = self._rows.get((engine, key))
        if row is None:
            shapes = ", ".join("×".join(map(str, shape)) or "scalar" for _, shape, _ in key)
            self._rows[engine, key] = ShapeStats(
                engine, shapes, seconds, 1, graphs, regional, first_graphs=graphs
            )
        else:
            row.calls += 1
            row.graphs += graphs

    def report(self) -> list[ShapeStats]:
        return list(self._rows.values())

    def problems(self) -> list[ShapeStats]:
        """Keys that did not compile as they should: eager fallbacks and recompilations."""
        return [row for row in self._rows.values() if not row.status.startswith("compiled")]

    def compile_seconds(self, engine: str | None = None) -> float:
        """First-call seconds summed (of one engine, or all): subtract from wall time for the
        steady state."""
        return sum(r.compile_seconds for r in self._rows.values() if engine in (None, r.engine))

    def table(self) -> str:
        rows = [("engine", "input shapes", "compile s", "calls", "status")]
        rows += [
            (r.engine, r.shapes, f"{r.compile_seconds:.2f}", str(r.calls), r.status)
            for r in self._rows.values()
        ]
        return text_table(rows, right=(2, 3))


def bucket_length(length: int, bucket: int) -> int:
    """The smallest multiple of ``bucket`` that holds ``length`` tokens."""
    return -(-length // bucket) * bucket


def _pad_tokens(t: Tensor, length: int) -> Tensor:
    """Right-pad axis 1 with zeros (False for masks, id 0 for token ids)."""
    extra = length - t.shape[1]
    if extra == 0:
        return t
    return torch.cat([t, t.new_zeros((t.shape[0], extra, *t.shape[2:]))], dim=1)


class CompiledEngine:
    """A module behind the engine interface, compiled once and specialised per input shape.

    Caption-length axes are padded to a multiple of ``bucket`` before the call and the outputs
    sliced back, so prompts of different lengths share a graph (see the module docstring).
    ``cuda_graphs``: the compiled callable replays CUDA graphs, whose outputs live in a pool the
    next replay overwrites, so outputs are cloned (the pipeline keeps captions and the sampler
    keeps earlier velocities).
    """

    def __init__(
        self,
        name: str,
        module: nn.Module,
        *,
        stats: CompileStats,
        compiler: Compiler | None = None,
        bucket: int = CAPTION_BUCKET,
        device: torch.device | str = "cpu",
        cuda_graphs: bool = False,
        regional: bool = False,
    ) -> None:
        if name not in ENGINE_IO:
            raise InputError(f"unknown engine {name!r}; engines: {', '.join(ENGINE_IO)}")
        if bucket < 1 or bucket % SEQ_MULTIPLE:
            raise InputError(
                f"caption bucket must be a positive multiple of {SEQ_MULTIPLE} tokens, got {bucket}"
            )
        self.name = name
        self.module = module.eval()
        self.input_names, self.output_names = ENGINE_IO[name]
        self.stats = stats
        self.bucket = bucket
        self.device = torch.device(device)
        self.cuda_graphs = cuda_graphs
        self.regional = regional and bool(repeated_blocks(self.module))
        self.compiled = (compiler or torch_compiler())(self.module)

    def __call__(self, **inputs: Tensor) -> dict[str, Tensor]:
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise InputError(f"engine {self.name!r} needs inputs {missing}")
        args = {n: inputs[n] for n in self.input_names}
        token_inputs = _TOKEN_INPUTS.get(self.name, ())
        length = args[token_inputs[0]].shape[1] if token_inputs else 0
        for n in token_inputs:
            args[n] = _pad_tokens(args[n], bucket_length(length, self.bucket))
        # contiguous: a view's strides would be guarded on and could force a recompile
        feeds = [args[n].contiguous() for n in self.input_names]
        key: ShapeKey = tuple(
            (n, tuple(t.shape), DTYPE_NAMES.get(t.dtype, str(t.dtype)))
            for n, t in zip(self.input_names, feeds, strict=True)
        )
        first = (self.name, key) not in self.stats
        graphs = _graphs_compiled()
        start = self._clock() if first else 0.0
        with torch.inference_mode():
            if self.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            out = self.compiled(*feeds)
        outs: Sequence[Tensor] = out if isinstance(out, tuple) else (out,)
        outputs = dict(zip(self.output_names, outs, strict=True))
        if self.name == "text_encoder":
            outputs["hidden"] = outputs["hidden"][:, :length]
        elif self.name == "caption_path":
            slots = bucket_length(length, SEQ_MULTIPLE)  # what the unpadded call returns
            outputs = {n: t[:, :slots] for n, t in outputs.items()}
        if self.cuda_graphs:
            outputs = {n: t.clone() for n, t in outputs.items()}
        seconds = self._clock() - start if first else 0.0
        self.stats.record(self.name, key, seconds, _graphs_compiled() - graphs, self.regional)
        return outputs

    def refit(
        self, weights: Mapping[str, Tensor], more: Mapping[str, Tensor] | None = None
    ) -> None:
        """New weight values, in place (the compiled graphs read the module's storage)."""
        refit_module(self.name, self.module, weights)

    def _clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # time the work, not the launch
        return time.perf_counter()


def compiled_engines(
    engines: Engines,
    *,
    bucket: int = CAPTION_BUCKET,
    mode: str | None = None,
    compiler: Compiler | None = None,
    scope: str = "whole",
    backend: str = "inductor",
) -> Engines:
    """The eager ``torch`` engines, each compiled (see the module docstring); they share one
    ``CompileStats`` (``compile_stats(result)``).

    ``mode`` (a ``torch.compile`` mode) replaces every engine's default (``default_mode``);
    ``scope`` "regional" compiles the repeated blocks instead of whole networks (see
    ``torch_compiler``); ``backend`` is torch.compile's; ``compiler`` replaces ``torch.compile``
    altogether (tests pass an identity).
    """
    if engines.backend != "torch":
        raise InputError(
            f"only the eager torch engines can be compiled, got the {engines.backend} backend"
        )
    stats = CompileStats()
    # regional blocks are compiled in place, and the denoiser module holds the caption path's
    # refiner blocks too: those stay the caption path's, so the denoiser's CUDA graphs (whose
    # outputs the next replay overwrites) never run the caption path's blocks
    caption_blocks = repeated_blocks(getattr(engines.caption_path, "module", nn.Module()))

    def wrap(engine: Engine) -> CompiledEngine:
        if not isinstance(engine, TorchEngine):
            raise InputError(f"engine {engine.name!r} is not a torch module engine")
        engine_mode = mode or default_mode(engine.name, engines.device)
        # the VAE's stacks differ in width from level to level: it is compiled whole
        engine_scope = scope if engine.name in REGIONAL_ENGINES else "whole"
        cuda_graphs = compiler is None and engine_mode in ("reduce-overhead", "max-autotune")
        skip = caption_blocks if engine.name == "denoiser" else []
        return CompiledEngine(
            engine.name,
            engine.module,
            stats=stats,
            compiler=compiler or torch_compiler(engine_mode, backend, engine_scope, skip),
            bucket=bucket,
            device=engines.device,
            cuda_graphs=cuda_graphs and backend == "inductor" and engines.device.type == "cuda",
            regional=engine_scope == "regional" and compiler is None,
        )

    vae_encoder = engines.vae_encoder
    return replace(
        engines,
        text_encoder=wrap(engines.text_encoder),
        caption_path=wrap(engines.caption_path),
        denoiser=wrap(engines.denoiser),
        vae_decoder=wrap(engines.vae_decoder),
        vae_encoder=None if vae_encoder is None else wrap(vae_encoder),
        backend=BACKEND,
    )


def compile_stats(engines: Engines) -> CompileStats | None:
    """The compile statistics of ``compiled_engines``' result (None for other backends)."""
    engine = engines.denoiser
    return engine.stats if isinstance(engine, CompiledEngine) else None
