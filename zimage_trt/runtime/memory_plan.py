"""A memory plan: where each network's weights live, at what precision, and what every phase of a
workflow holds at once — for a budget (``--max-vram``) the plan must fit, or the smallest budget
that would.

Weights are counted from the real configuration on the ``meta`` device, tensor by tensor, at
their stored precision (bf16 / fp32; FP8 and INT8 Q/DQ engines: one byte per quantized Linear
weight, NVIDIA's exclusions kept bf16; GGUF Q8_0 and Q4_K kept quantized in memory: 34 bytes
per 32 values and 144 per 256, 1-D tensors float32). Activations are measured per engine call
from the workflow's own shapes — its latent sizes, cfg batching and caption lengths — by
``activation_peak`` on the ``meta`` device.

The phases: ``text`` (the text encoder, per prompt), ``captions`` (the caption path), each
stage's denoising, each decode. The plan tries, in order, and keeps the first that fits:

1. everything resident;
2. the text encoder released after encoding (the prompt cache keeps its output; a new prompt
   loads it again);
3. and the decode in tiles (ComfyUI's VAEDecodeTiled, 512/64);
4. and the text encoder run on the CPU (GPU only);
5. the text encoder released (else on the CPU), the decode in tiles, and the DiT's blocks
   streamed from CPU memory: as many resident as fit, the others passing through two staging
   blocks (one computing, one arriving) (GPU only).

On a GPU the budget also covers ``CUDA_OVERHEAD`` (context, cuBLAS workspace: outside the
allocator); on the CPU the plan budgets RAM above the process's baseline.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zimage_trt.engines.protocol import Engines
from zimage_trt.errors import InputError
from zimage_trt.models.dit import FULL_PRECISION_PARTS, CaptionPath, DiTConfig, ZImageDiT
from zimage_trt.models.model_files import ModelFiles
from zimage_trt.models.text_encoder import Qwen3Config, Qwen3TextEncoder
from zimage_trt.models.tokenizer import QwenTokenizer
from zimage_trt.models.vae import FluxVAE, VAEConfig, VAEDecoder, VAEEncoder
from zimage_trt.runtime.activation_peak import activation_peak
from zimage_trt.runtime.preflight import EngineCall, phase_calls, prompt_tokens
from zimage_trt.runtime.vae_tiles import VaeTiles, decode_tiled, tile_shapes
from zimage_trt.text_table import text_table
from zimage_trt.workflow import Workflow

GIB, MIB = 2**30, 2**20
CUDA_OVERHEAD = 640 * MIB  # the CUDA context and cuBLAS / cuDNN workspaces, outside the allocator
BYTES = {"fp32": 4.0, "bf16": 2.0, "fp8": 1.0, "int8": 1.0, "q8_0": 34 / 32, "q4_k": 144 / 256}
GGUF = ("q8_0", "q4_k")
DIT_PRECISIONS = ("bf16", "fp32", "fp8", "int8", "q8_0", "q4_k")
TEXT_PRECISIONS = ("bf16", "fp32", "fp8", "q8_0", "q4_k")


def weight_bytes(model: nn.Module, precision: str, keep: Sequence[str] = ()) -> int:
    """``model``'s weights stored at ``precision`` (module docstring); ``keep``: module-name
    fragments whose Linears an FP8 / INT8 build leaves in bf16."""
    quantized = {f"{name}.weight" for name, module in model.named_modules()
                 if isinstance(module, nn.Linear) and not any(k in name for k in keep)}  # fmt: skip
    plain = BYTES["fp32" if precision in ("fp32", *GGUF) else "bf16"]  # what is not quantized
    total = 0.0
    for name, param in model.named_parameters():
        if precision in GGUF:
            stored = BYTES[precision] if param.ndim >= 2 else plain
        else:
            stored = (
                BYTES[precision] if precision in ("fp8", "int8") and name in quantized else plain
            )
        total += param.numel() * stored
    return int(total)


def format_bytes(n: float) -> str:
    """``12.34 GiB`` / ``512.0 MiB``."""
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB else f"{n / MIB:.1f} MiB"


@dataclass(frozen=True)
class Networks:
    """The three networks on ``meta`` in the compute dtype."""

    dit: ZImageDiT
    text_encoder: Qwen3TextEncoder
    vae: FluxVAE

    @classmethod
    def on_meta(cls, dit: DiTConfig, text: Qwen3Config, vae: VAEConfig,
                dtype: torch.dtype) -> Networks:  # fmt: skip
        with torch.device("meta"):
            return cls(ZImageDiT(dit).to(dtype), Qwen3TextEncoder(text).to(dtype),
                       FluxVAE(vae).to(dtype))  # fmt: skip

    def activations(self, engine: str, shapes: dict[str, tuple[int, ...]]) -> int:
        """The peak activation bytes of one engine call at ``shapes`` (``preflight``'s)."""
        dtype = next(self.dit.parameters()).dtype

        def empty(shape: tuple[int, ...], kind: torch.dtype = dtype) -> torch.Tensor:
            return torch.ones(shape, dtype=kind, device="meta")

        if engine == "text_encoder":
            ids = empty(shapes["input_ids"], torch.int64)
            return activation_peak(lambda: self.text_encoder(ids, ids))
        if engine == "caption_path":
            (b, n) = shapes["cap_mask"]
            feats, mask = empty((b, n, self.dit.config.cap_feat_dim)), empty((b, n), torch.bool)
            return activation_peak(lambda: CaptionPath(self.dit)(feats, mask))
        if engine == "denoiser":
            latents, (b, lc) = shapes["latents"], shapes["cap_valid"]
            caption = (b, lc, self.dit.config.dim)
            return activation_peak(lambda: self.dit(
                empty(latents), empty((b,), torch.float32), empty(caption),
                empty((b, lc), torch.bool),
            ))  # fmt: skip
        if engine == "vae_decoder":
            return activation_peak(lambda: VAEDecoder(self.vae)(empty(shapes["latents"])))
        return activation_peak(lambda: VAEEncoder(self.vae)(empty(shapes["image"])))


@dataclass(frozen=True)
class Placement:
    """One network's weights: precision, bytes, and where they live."""

    component: str
    precision: str
    bytes: int
    where: str
    on_device: int  # the bytes the budget holds at its peak phase


@dataclass(frozen=True)
class PhaseMemory:
    name: str
    calls: str  # the engine calls' shapes, shortly
    activations: int
    weights: int  # resident during the phase
    peak: int


@dataclass(frozen=True)
class Strategy:
    text_encoder: str = "resident"  # resident | released | cpu
    vae_tiles: VaeTiles | None = None
    dit_blocks: int | None = None  # resident DiT blocks when streaming (None: all)
    staged: int = 2  # streamed blocks pass through this many buffers (one computing, one arriving)

    def describe(self, blocks: int) -> list[str]:
        out = []
        if self.text_encoder == "released":
            out.append("text encoder released after encoding (the prompt cache keeps its output)")
        if self.text_encoder == "cpu":
            out.append("text encoder on the CPU")
        if self.vae_tiles is not None:
            out.append(f"decode in tiles ({self.vae_tiles}, ComfyUI's VAEDecodeTiled)")
        if self.dit_blocks is not None:
            out.append(f"DiT blocks streamed from CPU memory ({self.dit_blocks} of {blocks} "
                       f"resident, {self.staged} staged: one computing, one arriving)")  # fmt: skip
        return out or ["everything resident"]


@dataclass(frozen=True)
class MemoryPlan:
    budget: int
    device: str  # cuda | cpu
    overhead: int
    strategy: Strategy
    placements: list[Placement]
    phases: list[PhaseMemory]
    choices: list[str]

    @property
    def peak(self) -> int:
        """The most any phase holds (weights + activations), the overhead aside."""
        return max(p.peak for p in self.phases)

    @property
    def total(self) -> int:
        return self.peak + self.overhead

    def table(self) -> str:
        unit = "VRAM" if self.device == "cuda" else "RAM"
        weights = [("network", "precision", "weights", "lives")]
        weights += [(p.component, p.precision, format_bytes(p.bytes), p.where)
                    for p in self.placements]  # fmt: skip
        phases = [("phase", "calls", "activations", "weights held", "peak")]
        phases += [(p.name, p.calls, format_bytes(p.activations), format_bytes(p.weights),
                    format_bytes(p.peak)) for p in self.phases]  # fmt: skip
        extra = "CUDA context and workspaces" if self.device == "cuda" else "nothing"
        return "\n".join([
            text_table(weights), "", text_table(phases, right=(2, 3, 4)), "",
            f"plan: {'; '.join(self.choices)}",
            f"predicted peak: {format_bytes(self.peak)} + {format_bytes(self.overhead)} "
            f"({extra}) = {format_bytes(self.total)} of {format_bytes(self.budget)} {unit}",
        ])  # fmt: skip

    def as_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        tiles = self.strategy.vae_tiles
        data["strategy"]["vae_tiles"] = None if tiles is None else str(tiles)
        data.update(peak=self.peak, total=self.total)
        return data


@functools.cache
def _networks(configs: tuple[DiTConfig, Qwen3Config, VAEConfig], dtype: torch.dtype) -> Networks:
    return Networks.on_meta(*configs, dtype)


@functools.cache
def _activations(
    configs: tuple[DiTConfig, Qwen3Config, VAEConfig],
    dtype: torch.dtype,
    engine: str,
    shapes: tuple[tuple[str, tuple[int, ...]], ...],
) -> int:
    """``Networks.activations``, measured once per process for each call."""
    return _networks(configs, dtype).activations(engine, dict(shapes))


@functools.cache
def _tiled_activations(
    configs: tuple[DiTConfig, Qwen3Config, VAEConfig],
    dtype: torch.dtype,
    latents: tuple[int, ...],
    tiles: VaeTiles,
    blended_here: bool,
) -> int:
    """A tiled decode's peak: its largest tile's when the blending happens in other memory (on
    a GPU: CPU memory, as in ComfyUI); with ``blended_here`` (the CPU) the whole
    ``decode_tiled``, its buffers included."""
    if not blended_here:
        return max(
            _activations(configs, dtype, "vae_decoder", (("latents", (1, 16, h, w)),))
            for h, w in tile_shapes(latents[2], latents[3], tiles)
        )
    decoder = VAEDecoder(_networks(configs, dtype).vae)
    latent = torch.ones(latents, dtype=dtype, device="meta")
    return activation_peak(lambda: decode_tiled(latent, decoder, tiles, device="meta"))


def _short(calls: list[EngineCall]) -> str:
    shapes = sorted({"×".join(map(str, next(iter(s.values())))) for _, s in calls})
    return f"{calls[0][0]} " + ", ".join(shapes)


class MemoryPlanner:
    """One workflow on one model configuration at given precisions: ``predict`` a strategy's
    peak per phase, ``plan`` a budget (module docstring)."""

    def __init__(
        self,
        wf: Workflow,
        tokens: list[int],
        configs: tuple[DiTConfig, Qwen3Config, VAEConfig],
        *,
        device: str = "cuda",
        dit_precision: str = "bf16",
        text_precision: str = "bf16",
        dtype: torch.dtype | None = None,
        text_dtype: torch.dtype | None = None,
        side_by_side: int = 1,
        text_upcast: bool = False,
    ) -> None:
        """``dtype`` / ``text_dtype``: the activations' (default bf16 on a GPU, fp32 on the CPU;
        the torch backend runs its text encoder in fp32 everywhere, as ComfyUI does);
        ``side_by_side``: runs sampled together (a server's ``--max-batch``); ``text_upcast``:
        the text encoder's weights upcast to ``text_dtype`` one block at a time as it runs
        (``engines.placement.upcast_per_block``)."""
        if dit_precision not in DIT_PRECISIONS:
            raise InputError(f"DiT precision {dit_precision!r} is not one of {DIT_PRECISIONS}")
        if text_precision not in TEXT_PRECISIONS:
            raise InputError(f"text encoder precision {text_precision!r} is not one of "
                             f"{TEXT_PRECISIONS}")  # fmt: skip
        self.wf, self.configs, self.device = wf, configs, device
        self.dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
        self.text_dtype = text_dtype or self.dtype
        nets = _networks(configs, self.dtype)
        vae = "fp32" if self.dtype == torch.float32 else "bf16"
        self.precisions = {"DiT": dit_precision, "text encoder": text_precision, "VAE": vae}
        self.weights = {
            "DiT": weight_bytes(nets.dit, dit_precision, FULL_PRECISION_PARTS),
            "text encoder": weight_bytes(nets.text_encoder, text_precision),
            "VAE": weight_bytes(nets.vae, vae),
        }
        self.block = weight_bytes(nets.dit.layers[0], dit_precision, FULL_PRECISION_PARTS)
        self.blocks = len(nets.dit.layers)
        block = nets.text_encoder.model.layers[0]
        self.upcast = (
            text_upcast * sum(p.numel() for p in block.parameters()) * (self.text_dtype.itemsize)
        )
        self.dequant = 0  # GGUF: one Linear dequantized at a time inside the forward
        if dit_precision in GGUF:
            largest = max(m.weight.numel() for m in nets.dit.modules() if isinstance(m, nn.Linear))
            self.dequant = largest * self.dtype.itemsize
        self.side_by_side = side_by_side
        self.phases = phase_calls(wf, tokens, side_by_side)
        self.overhead = CUDA_OVERHEAD if device == "cuda" else 0

    def like(self, wf: Workflow, tokens: list[int]) -> MemoryPlanner:
        """This planner (model, device, precisions) for another workflow."""
        other = copy.copy(self)
        other.wf, other.phases = wf, phase_calls(wf, tokens, self.side_by_side)
        return other

    def held(self, s: Strategy) -> dict[str, int]:
        """The bytes of each network's weights the budget holds at most under ``s``."""
        dit = self.weights["DiT"]
        if s.dit_blocks is not None:
            dit -= (self.blocks - s.dit_blocks - s.staged) * self.block
        text = 0 if s.text_encoder == "cpu" else self.weights["text encoder"]
        return {"DiT": dit, "text encoder": text, "VAE": self.weights["VAE"]}

    def predict(self, s: Strategy) -> list[PhaseMemory]:
        """Every phase's activations, resident weights and peak under ``s``."""
        held = self.held(s)
        dit, text, vae = held["DiT"], held["text encoder"], held["VAE"]
        rows = []
        for name, calls in self.phases:
            engine = calls[0][0]
            if engine == "vae_decoder" and s.vae_tiles is not None:
                act = _tiled_activations(self.configs, self.dtype, calls[0][1]["latents"],
                                         s.vae_tiles, self.device == "cpu")  # fmt: skip
            elif engine == "text_encoder" and s.text_encoder == "cpu":
                act = 0
            else:
                act = max(self._activations(engine, shapes) for _, shapes in calls)
            if engine == "text_encoder":  # released: the DiT loads after the encoding
                resident = vae + {"resident": text + dit, "released": text,
                                  "cpu": dit}[s.text_encoder]  # fmt: skip
            else:
                resident = dit + vae + (text if s.text_encoder == "resident" else 0)
            if engine in ("denoiser", "caption_path"):
                act += self.dequant
            if engine == "text_encoder" and s.text_encoder != "cpu":
                act += self.upcast
            rows.append(PhaseMemory(name, _short(calls), act, resident, act + resident))
        return rows

    def _activations(self, engine: str, shapes: dict[str, tuple[int, ...]]) -> int:
        dtype = self.text_dtype if engine == "text_encoder" else self.dtype
        return _activations(self.configs, dtype, engine, tuple(sorted(shapes.items())))

    def ladder(self) -> list[Strategy]:
        """The strategies ``plan`` tries, in order."""
        tiles = VaeTiles()
        out = [Strategy(), Strategy("released"), Strategy("released", tiles)]
        if self.device == "cuda":
            out.append(Strategy("cpu", tiles))
            out += [Strategy(text, tiles, resident) for text in ("released", "cpu")
                    for resident in range(self.blocks - 3, -1, -1)]  # fmt: skip
        return out

    def plan(self, budget: int, others: Sequence[MemoryPlanner] = ()) -> MemoryPlan:
        """The first strategy whose peak (and overhead) fits ``budget`` bytes, for this
        workflow and ``others`` (``like``); InputError naming the smallest budget that works
        when none does."""
        ladder = self.ladder()

        def need(strategy: Strategy) -> int:
            rows = [r for p in (self, *others) for r in p.predict(strategy)]
            return max(r.peak for r in rows) + self.overhead

        needs = []
        for strategy in ladder:
            needs.append(need(strategy))
            if needs[-1] <= budget:
                return self._plan(budget, strategy, self.predict(strategy))
        least = min(needs)  # tiles, say, cost more than they save on a small image
        frugal = ladder[needs.index(least)]
        unit = "" if self.device == "cuda" else " (RAM: planned for the CPU)"
        raise InputError(
            f"--max-vram {format_bytes(budget)}{unit} is too little for {self.wf.name} at DiT "
            f"{self.precisions['DiT']}, text encoder {self.precisions['text encoder']}: the "
            f"smallest budget that works is {format_bytes(least)} "
            f"({'; '.join(frugal.describe(self.blocks))})"
        )

    def _plan(self, budget: int, s: Strategy, rows: list[PhaseMemory]) -> MemoryPlan:
        where = {
            "DiT": "GPU" if s.dit_blocks is None else (
                f"GPU: {s.dit_blocks} of {self.blocks} blocks (+{s.staged} staged), the rest "
                "streamed from CPU"),
            "text encoder": {"resident": "GPU", "released": "GPU while encoding, then released",
                             "cpu": "CPU"}[s.text_encoder],
            "VAE": "GPU",
        }  # fmt: skip
        if self.device == "cpu":
            where = {k: v.replace("GPU", "RAM") for k, v in where.items()}
        held = self.held(s)
        placements = [Placement(c, self.precisions[c], self.weights[c], where[c], held[c])
                      for c in self.weights]  # fmt: skip
        return MemoryPlan(budget, self.device, self.overhead, s, placements, rows,
                          s.describe(self.blocks))  # fmt: skip


def model_configs(model: str | None) -> tuple[DiTConfig, Qwen3Config, VAEConfig]:
    """The three networks' configurations: Z-Image-Turbo's own when ``model`` is None (nothing
    read), the tiny model's for ``tiny``, else read from the model's weight headers (a folder or
    a cached repo id, as ``generate --model`` takes it; nothing is downloaded)."""
    if model is None:
        return DiTConfig(), Qwen3Config(), VAEConfig()
    if model == "tiny":
        return DiTConfig.tiny(), Qwen3Config.tiny(), VAEConfig.tiny()
    from zimage_trt.models.model_files import resolve_model

    return configs_of_files(resolve_model(model, download=False))  # LoRAs change no size


def configs_of_files(files: ModelFiles) -> tuple[DiTConfig, Qwen3Config, VAEConfig]:
    """The configurations in a model's weight headers (no weight read)."""
    from zimage_trt.models.checkpoints import (
        load_dit,
        load_text_encoder_weights,
        load_vae_weights,
    )

    return (
        load_dit(files.transformer, torch.bfloat16, meta=True).config,
        load_text_encoder_weights(files.text_encoder, torch.bfloat16, meta=True).config,
        load_vae_weights(files.vae, torch.bfloat16, meta=True).config,
    )


def gguf_precision(path: str | Path) -> str:
    """The precision a GGUF DiT's Linear weights are kept at (their most common GGML type)."""
    from zimage_trt.models.gguf import open_dit_gguf

    kinds = Counter(t.qtype.lower() for t in open_dit_gguf(path).values() if len(t.shape) >= 2)
    kind = kinds.most_common(1)[0][0]
    if kind not in GGUF:
        raise InputError(f"{path} holds {kind.upper()} weights; the memory planner knows "
                         f"{', '.join(k.upper() for k in GGUF)}")  # fmt: skip
    return kind


def plan_budget(
    workflows: Sequence[Workflow],
    tokenizer: QwenTokenizer,
    files: ModelFiles,
    device: torch.device,
    dtype: torch.dtype,
    budget: int,
    *,
    gguf_in_memory: bool = False,
    side_by_side: int = 1,
    text_storage: torch.dtype = torch.float32,
) -> Budget:
    """The torch backend's plan for ``budget`` bytes that every one of ``workflows`` fits (the
    first is shown): the model's configurations from its files, its DiT at ``dtype`` (or kept
    quantized, ``gguf_in_memory``), its text encoder in ``text_storage`` (bf16: upcast block
    by block as it computes in fp32), as ``load_torch_engines`` loads them; ``side_by_side``:
    runs sampled together at the most."""
    precision = gguf_precision(files.transformer) if gguf_in_memory else (
        "fp32" if dtype == torch.float32 else "bf16")  # fmt: skip
    configs = configs_of_files(files)
    first, *more = [
        MemoryPlanner(wf, prompt_tokens(wf, tokenizer), configs,
                      device="cuda" if device.type == "cuda" else "cpu",
                      dit_precision=precision, dtype=dtype, text_dtype=torch.float32,
                      text_precision="bf16" if text_storage == torch.bfloat16 else "fp32",
                      text_upcast=text_storage == torch.bfloat16, side_by_side=side_by_side)
        for wf in workflows
    ]  # fmt: skip
    return Budget(first.plan(budget, more), first)


@dataclass(frozen=True)
class Budget:
    """A pipeline's memory budget: the plan it follows, and a check of each workflow it runs
    against it (another size or a longer prompt may need more than the planned one)."""

    plan: MemoryPlan
    planner: MemoryPlanner

    def check(self, wf: Workflow, tokens: list[int]) -> None:
        """InputError when ``wf`` (prompts of ``tokens`` tokens) would pass the budget."""
        planner = self.planner.like(wf, tokens)
        rows = planner.predict(self.plan.strategy)
        worst = max(rows, key=lambda r: r.peak)
        need = worst.peak + planner.overhead
        if need > self.plan.budget:
            raise InputError(
                f"workflow {wf.name!r} needs {format_bytes(need)} at its {worst.name} phase under "
                f"this pipeline's memory plan ({'; '.join(self.plan.choices)}), more than "
                f"--max-vram {format_bytes(self.plan.budget)}: ask for a smaller image or a "
                "shorter prompt, or open the pipeline for this workflow"
            )


def model_configs_of(engines: Engines) -> tuple[DiTConfig, Qwen3Config, VAEConfig]:
    """The configurations behind torch-backend engines (their modules carry them)."""
    found: dict[type, Any] = {}
    for engine in (engines.denoiser, engines.text_encoder, engines.vae_decoder):
        module = getattr(engine, "module", None)
        for part in module.modules() if isinstance(module, nn.Module) else ():
            config = getattr(part, "config", None)
            if isinstance(config, (DiTConfig, Qwen3Config, VAEConfig)):
                found.setdefault(type(config), config)
    if len(found) != 3:
        raise InputError(f"the {engines.backend} engines do not carry their networks' "
                         "configurations (the torch backend's do)")  # fmt: skip
    return found[DiTConfig], found[Qwen3Config], found[VAEConfig]
