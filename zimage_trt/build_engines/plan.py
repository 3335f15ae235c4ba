"""What a build will make, derived before any weight is read (``zimage-trt build --dry-run``): the
options, the model sources, each network's configuration (read on the meta device), the stage
shapes from a workflow or a list of resolutions, and every engine's optimization profiles."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zimage_trt.build_engines.networks import PRECISIONS, Network, networks
from zimage_trt.build_engines.profiles import (
    CAPTION_MAX,
    Span,
    StageShapes,
    bucket_stage,
    caption_span,
    engine_profiles,
    resolution_stages,
    tile_stages,
    workflow_stages,
)
from zimage_trt.engines.manifest import Profile
from zimage_trt.errors import InputError
from zimage_trt.models.checkpoints import load_dit, load_text_encoder_weights, load_vae_weights
from zimage_trt.models.sources import ModelSources
from zimage_trt.runtime.vae_tiles import VaeTiles
from zimage_trt.workflow import Stage, Workflow
from zimage_trt.workflow.resolve import model_sources

if TYPE_CHECKING:
    from zimage_trt.calibration.calibrate import Calibration

BUILD_BACKENDS = ("onnxruntime", "tensorrt", "tensorrt-rtx")
Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class BuildOptions:
    backend: str = "onnxruntime"
    precision: str = "fp32"
    caption_max: int = CAPTION_MAX
    buckets: list[str] = field(default_factory=list)
    with_encoder: bool = False  # also build the VAE encoder (image inputs) for every stage
    vae_tiles: VaeTiles | None = None  # the VAE decoder built for decoding in these tiles only
    check_parity: bool = True
    parity_mode: str = "auto"  # auto | whole | slice (auto: slice when RAM forbids the whole)
    # TensorRT
    optimization_level: int = 3
    memory_pool_limit: int | None = None
    refittable: bool = False
    weight_streaming: bool = False  # the text encoder's and the DiT's engines stream weights
    timing_cache: Path | None = None
    lora_ignore_unmatched: bool = False
    # TensorRT-RTX: the GPUs' compute capabilities ("8.9,12.0"); None: this GPU, else defaults
    compute_capability: str | None = None
    # a ``zimage-trt calibrate`` folder: the DiT's engines are exported with its Q/DQ nodes
    calibration: Path | None = None
    quantization: str | None = None  # its precision (fp8 | int8), read by ``validate``

    def rtx_targets(self) -> tuple[tuple[str, ...], str]:
        """The TensorRT-RTX compute capabilities this build compiles for, and why."""
        from zimage_trt.engines.tensorrt_env import rtx_targets

        return rtx_targets(self.compute_capability, fp8=self.quantization == "fp8")

    def validate(self) -> None:
        if self.backend not in BUILD_BACKENDS:
            raise InputError(
                f"backend {self.backend!r} cannot be built; choose one of: "
                f"{', '.join(BUILD_BACKENDS)} (the torch backend needs no build)"
            )
        if self.precision not in PRECISIONS:
            raise InputError(
                f"precision {self.precision!r} is not supported; choose one of: "
                f"{', '.join(PRECISIONS)} (fp16 gives NaN / black images with Z-Image)"
            )
        if self.calibration is not None:
            self._validate_calibration()
        if self.weight_streaming and self.backend not in ("tensorrt", "tensorrt-rtx"):
            raise InputError(
                f"--weight-streaming builds TensorRT engines (--backend tensorrt or "
                f"tensorrt-rtx); the {self.backend} backend keeps every weight in memory"
            )
        if self.backend == "tensorrt-rtx":
            from zimage_trt.engines.tensorrt_env import check_rtx_refit

            self.rtx_targets()  # refuses a bad list before any work
            if self.refittable:
                check_rtx_refit()
            if self.timing_cache is not None:
                raise InputError(
                    "TensorRT-RTX has no timing cache (it has no effect there and forces a GPU "
                    "query); drop --timing-cache"
                )
        elif self.compute_capability is not None:
            raise InputError(
                f"--compute-capability is for --backend tensorrt-rtx; the {self.backend} backend "
                "builds for the machine it runs on"
            )
        if not 0 <= self.optimization_level <= 5:
            raise InputError(
                f"optimization level {self.optimization_level} is outside 0–5 (TensorRT's range)"
            )

    def _validate_calibration(self) -> None:
        from zimage_trt.calibration.calibrate import CALIBRATION, FORMAT

        assert self.calibration is not None
        path = self.calibration / CALIBRATION
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(
                f"--calibration {self.calibration}: no {CALIBRATION} there (make one with "
                "zimage-trt calibrate)"
            ) from None
        except (OSError, ValueError) as exc:
            raise InputError(f"--calibration {self.calibration}: unreadable ({exc})") from None
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise InputError(f"--calibration {self.calibration}: not a {FORMAT} record")
        self.quantization = str(record.get("precision"))
        if self.refittable:
            raise InputError(
                "--refittable with --calibration: a calibration holds for the weights it saw "
                "(a LoRA change invalidates it), so calibrated engines are not refit; build "
                "without --refittable"
            )
        if self.backend == "tensorrt" and self.quantization == "fp8":
            import torch

            from zimage_trt.engines.tensorrt_env import fp8_refusal, without_fp8

            if torch.cuda.is_available():
                here = "{}.{}".format(*torch.cuda.get_device_capability(0))
                if without_fp8((here,)):
                    raise fp8_refusal((here,), f"this GPU ({torch.cuda.get_device_name(0)}),")


@dataclass
class BuildPlan:
    """Everything a build will make, derived before any weight is read (``--dry-run``)."""

    sources: ModelSources
    source_label: str  # the workflow name or the resolution list
    stages: list[StageShapes]
    caption: Span
    nets: dict[str, Network]
    profiles: dict[str, list[Profile]]
    configs: dict[str, Any]
    workflow: Workflow | None = None  # saved in the folder as generate's default workflow
    calibration: Calibration | None = None  # the DiT's quantization (``--calibration``)


def plan_build(
    options: BuildOptions,
    *,
    model: str | None,
    workflow: Workflow | None = None,
    resolutions: Sequence[tuple[int, int]] = (),
    log: Log = _stderr,
) -> BuildPlan:
    options.validate()
    if workflow is None and not resolutions:
        raise InputError("give a workflow or a list of resolutions to build profiles for")
    wf = workflow if workflow is not None else Workflow(stages=[_dummy_stage()])
    sources = model_sources(wf, model, log=log)
    files = sources.files
    dtype = PRECISIONS[options.precision]
    # meta modules give the exact configs without reading a weight
    dit = load_dit(files.transformer, dtype, meta=True)
    text = load_text_encoder_weights(files.text_encoder, dtype, meta=True)
    vae = load_vae_weights(files.vae, dtype, meta=True)
    configs = {"dit": dit.config, "text_encoder": text.config, "vae": vae.config}
    nets = networks(options.precision, dit.config, text.config, vae.config)

    if resolutions:
        stages = resolution_stages(resolutions)
        label = "resolutions " + ",".join(f"{w}x{h}" for w, h in resolutions)
    else:
        stages = workflow_stages(wf)
        label = f"workflow {wf.name}"
    stages += [bucket_stage(b, stages) for b in options.buckets]
    if options.with_encoder:
        stages = [_with_encoder(s) for s in stages]
    if options.vae_tiles is not None:  # every decode is then a piece of a tiling
        tiled = tile_stages(options.vae_tiles, stages)
        stages = [dataclasses.replace(s, decode=False) for s in stages] + tiled
    opt_tokens = _prompt_tokens(files, wf) if workflow is not None else 128
    caption = caption_span(options.caption_max, opt_tokens)
    wanted = [n for n in nets if n != "vae_encoder" or any(s.encode for s in stages)]
    profiles = engine_profiles({n: nets[n] for n in wanted}, stages, caption)
    calibration = None
    if options.calibration is not None:
        from zimage_trt.calibration.calibrate import load

        calibration = load(options.calibration)
        calibration.check_fits(sources)
        q = calibration.manifest_record()
        log(f"calibration {options.calibration}: {q.label()}, "
            f"{q.quantizers + q.text_encoder_quantizers} quantizers "
            f"(sha-256 {calibration.sha256[:12]}…)")  # fmt: skip
    return BuildPlan(sources, label, stages, caption, nets, profiles, configs, workflow,
                     calibration)  # fmt: skip


def _dummy_stage() -> Stage:
    return Stage.model_validate(
        {"latent": {"source": "empty", "width": 64, "height": 64},
         "sampler": {"name": "euler"}, "scheduler": {"name": "simple", "steps": 1}}
    )  # fmt: skip


def _with_encoder(stage: StageShapes) -> StageShapes:
    return StageShapes(stage.name, stage.height, stage.width, stage.max_batch, stage.decode, True)


def _prompt_tokens(files: Any, wf: Workflow) -> int:
    """Tokens of the workflow's positive prompt in the chat template: the captions' opt."""
    return len(files.load_tokenizer().encode_prompt(wf.prompts.positive_text))
