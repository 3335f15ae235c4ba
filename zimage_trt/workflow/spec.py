"""The Workflow spec: everything a multi-stage Z-Image run needs, typed, validated, YAML in and out.

A workflow names its models, its prompts and an ordered list of stages. Each stage takes a latent
(empty, an upscale of the previous stage's, or an encoded image), a schedule, a sampler, a cfg and
a seed, and optionally EasyCache; latents pass from stage to stage in VAE space, as in ComfyUI.
"""

from __future__ import annotations

import datetime as _dt
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from torch import Tensor

from zimage_trt.atomic import write_text
from zimage_trt.errors import InputError
from zimage_trt.sampling.latents import MAX_SIDE, SIDE_MULTIPLE, UPSCALE_METHODS, VAE_SCALE
from zimage_trt.sampling.model_sampling import FlowSampling
from zimage_trt.sampling.noise import SEED_MAX
from zimage_trt.sampling.samplers import SAMPLERS
from zimage_trt.sampling.schedules import SCHEDULERS, calculate_sigmas
from zimage_trt.sampling.stage import CacheParams, LatentInput, StageParams
from zimage_trt.workflow.png_text import PNG_SIGNATURE

LORA_STRENGTH_MAX = 100.0
ZIMAGE_SHIFT = 3.0  # Z-Image-Turbo's own model-sampling shift (ComfyUI supported_models.ZImage)


class WorkflowError(InputError):
    """A workflow that does not validate; the message lists every bad field by its path."""


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraRef(_Spec):
    path: str
    # ComfyUI's LoraLoader range; NaN or inf would only surface as NaN latents mid-run
    strength: float = Field(default=1.0, ge=-LORA_STRENGTH_MAX, le=LORA_STRENGTH_MAX)
    strength_clip: float = Field(default=1.0, ge=-LORA_STRENGTH_MAX, le=LORA_STRENGTH_MAX)
    trigger: str | None = Field(default=None, description="the LoRA's activation phrase")


class Models(_Spec):
    transformer: str = "Tongyi-MAI/Z-Image-Turbo"
    vae: str | None = None
    text_encoder: str | None = None
    loras: list[LoraRef] = Field(default_factory=list)


class Prompts(_Spec):
    positive: str = ""
    trigger: str | None = None
    negative: str | None = None
    negative_file: str | None = None

    @model_validator(mode="after")
    def _one_negative(self) -> Prompts:
        if self.negative is not None and self.negative_file is not None:
            raise ValueError("give either 'negative' or 'negative_file', not both")
        return self

    @property
    def positive_text(self) -> str:
        """The text the encoder sees: ``"{trigger}, {prompt}"`` when a trigger word is set."""
        return f"{self.trigger}, {self.positive}" if self.trigger else self.positive

    def negative_text(self, base_dir: Path | None = None) -> str:
        if self.negative_file is None:
            return self.negative or ""
        path = Path(self.negative_file)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.is_file():
            raise WorkflowError(f"prompts.negative_file: no such file {str(path)!r}")
        return path.read_text(encoding="utf-8").strip()


class LatentSource(_Spec):
    """Where a stage's latent comes from.

    ``empty``: zeros of ``width``×``height`` px. ``upscale``: the previous stage's latent resized
    to ``width``×``height`` px or by ``scale`` (ComfyUI LatentUpscale / LatentUpscaleBy).
    ``image``: a picture VAE-encoded at ``width``×``height`` px.
    """

    source: Literal["empty", "upscale", "image"]
    width: int | None = Field(default=None, ge=SIDE_MULTIPLE, le=MAX_SIDE)
    height: int | None = Field(default=None, ge=SIDE_MULTIPLE, le=MAX_SIDE)
    scale: float | None = Field(default=None, gt=0.0, le=8.0)
    method: str = "nearest-exact"
    crop: Literal["disabled", "center"] = "disabled"
    image: str | None = None

    @field_validator("method")
    @classmethod
    def _known_method(cls, method: str) -> str:
        if method not in UPSCALE_METHODS:
            raise ValueError(
                f"unknown upscale method {method!r}; choose one of: " + ", ".join(UPSCALE_METHODS)
            )
        return method

    @model_validator(mode="after")
    def _complete(self) -> LatentSource:
        sized = self.width is not None and self.height is not None
        if (self.width is None) != (self.height is None):
            raise ValueError("give both width and height")
        if self.source in ("empty", "image") and not sized:
            raise ValueError(f"a {self.source!r} latent needs width and height (px)")
        if self.source == "image" and not self.image:
            raise ValueError("an 'image' latent needs the image path")
        if self.source == "upscale" and sized == (self.scale is not None):
            raise ValueError("an 'upscale' latent needs either width and height or scale, not both")
        if self.source != "upscale" and self.scale is not None:
            raise ValueError(f"'scale' applies to upscale latents, not {self.source!r}")
        return self


class SamplerSpec(_Spec):
    name: str
    eta: float = Field(default=1.0, ge=0.0, le=100.0)
    s_noise: float = Field(default=1.0, ge=0.0, le=100.0)
    r: float = Field(default=0.5, gt=0.0, le=1.0)

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in SAMPLERS:
            raise ValueError(f"unknown sampler {name!r}; choose one of: " + ", ".join(SAMPLERS))
        return name


class SchedulerSpec(_Spec):
    """A schedule by name (see ``zimage-trt sigmas --help``), its steps and denoise.

    ``options`` are the scheduler's own parameters: ``alpha``/``beta`` for beta, ``rho`` for
    karras, the custom FlowMatch node's inputs for ``flow_match_euler``.
    """

    name: str
    steps: int = Field(ge=1, le=10000)
    denoise: float = Field(default=1.0, ge=0.0, le=1.0)
    options: dict[str, float | int | bool | str | None] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {name!r}; choose one of: " + ", ".join(SCHEDULERS))
        return name


class CacheSpec(_Spec):
    """EasyCache (ComfyUI node): skip DiT calls whose output barely changes inside a window.

    ``shift`` is the model-sampling shift that turns the percents into sigmas; ``None`` means the
    stage's own shift. ComfyUI itself reads the shift left patched by the *previous* sampling
    run (comfyui-semantics §9.4), so an imported graph sets it to reproduce ComfyUI's windows.
    """

    threshold: float = Field(gt=0.0, le=3.0)
    start_percent: float = Field(default=0.15, ge=0.0, le=1.0)
    end_percent: float = Field(default=0.95, ge=0.0, le=1.0)
    shift: float | None = Field(default=None, gt=0.0, le=100.0)

    @model_validator(mode="after")
    def _ordered(self) -> CacheSpec:
        if self.start_percent >= self.end_percent:
            raise ValueError(
                f"start_percent ({self.start_percent}) must be below end_percent "
                f"({self.end_percent})"
            )
        return self


class Stage(_Spec):
    name: str = ""
    latent: LatentSource
    sampler: SamplerSpec
    scheduler: SchedulerSpec
    shift: float = Field(
        default=ZIMAGE_SHIFT,
        gt=0.0,
        le=100.0,
        description="model-sampling shift (ModelSamplingAuraFlow)",
    )
    cfg: float = Field(default=1.0, ge=0.0, le=100.0)
    seed: int = Field(default=0, ge=0, le=SEED_MAX)
    add_noise: bool = True
    noise_device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto",
        description="where ancestral noise is drawn: auto = the latent's device "
        "(ComfyUI), cpu = reproducible on any machine, cuda = as a GPU ComfyUI run",
    )
    cache: CacheSpec | None = None
    preview: bool = False

    @model_validator(mode="after")
    def _schedule_computes(self) -> Stage:
        try:
            self.sigmas()
        except ValueError as exc:
            raise ValueError(f"scheduler: {exc}") from None
        return self

    @property
    def model_sampling(self) -> FlowSampling:
        return FlowSampling(shift=self.shift)

    def sigmas(self) -> Tensor:
        s = self.scheduler
        return calculate_sigmas(s.name, self.model_sampling, s.steps, s.denoise, **s.options)

    def cache_sampling(self) -> FlowSampling | None:
        """The model sampling EasyCache turns its percents into sigmas with, if caching."""
        if self.cache is None:
            return None
        return FlowSampling(shift=self.cache.shift if self.cache.shift is not None else self.shift)

    def params(self) -> StageParams:
        """This stage as the sampling loop takes it (``zimage_trt.sampling.stage``)."""
        src, s, c = self.latent, self.sampler, self.cache
        latent = LatentInput(
            src.source, src.width, src.height, src.scale, src.method, src.crop, src.image
        )
        cache_ms = self.cache_sampling()
        cache = None
        if c is not None and cache_ms is not None:
            cache = CacheParams(c.threshold, c.start_percent, c.end_percent, cache_ms)
        return StageParams(
            name=self.name,
            latent=latent,
            sigmas=self.sigmas(),
            sampler=s.name,
            model_sampling=self.model_sampling,
            cfg=self.cfg,
            seed=self.seed,
            add_noise=self.add_noise,
            eta=s.eta,
            s_noise=s.s_noise,
            r=s.r,
            noise_device=self.noise_device,
            cache=cache,
        )


class Output(_Spec):
    folder: str = "output"
    prefix: str = "zimage"
    format: Literal["png", "jpg", "webp"] = "png"

    @field_validator("prefix")
    @classmethod
    def _stays_inside(cls, prefix: str) -> str:
        parts = Path(prefix).parts
        if not prefix or Path(prefix).is_absolute() or ".." in parts:
            raise ValueError(
                f"prefix {prefix!r} must be a relative path inside the output folder "
                "(no leading '/', no '..')"
            )
        return prefix

    def render_prefix(self, now: _dt.datetime | None = None) -> str:
        """Expand ComfyUI's ``%date:FORMAT%`` (yyyy, yy, MM, dd, hh, mm, ss) in the prefix."""
        now = now or _dt.datetime.now()
        tokens = {
            "yyyy": f"{now.year:04d}",
            "yy": f"{now.year % 100:02d}",
            "MM": f"{now.month:02d}",
            "dd": f"{now.day:02d}",
            "hh": f"{now.hour:02d}",
            "mm": f"{now.minute:02d}",
            "ss": f"{now.second:02d}",
        }

        def expand(match: re.Match[str]) -> str:
            return re.sub("yyyy|yy|MM|dd|hh|mm|ss", lambda t: tokens[t.group(0)], match.group(1))

        return re.sub(r"%date:([^%]*)%", expand, self.prefix)


class Workflow(_Spec):
    name: str = "workflow"
    description: str = ""
    models: Models = Field(default_factory=Models)
    prompts: Prompts = Field(default_factory=Prompts)
    stages: list[Stage] = Field(min_length=1)
    output: Output = Field(default_factory=Output)

    @model_validator(mode="after")
    def _stages_chain(self) -> Workflow:
        if self.stages[0].latent.source == "upscale":
            raise ValueError(
                "stages.0.latent: the first stage has no previous latent to upscale; "
                "use source 'empty' or 'image'"
            )
        self.latent_sizes()  # raises on sizes that are not multiples of 16 px
        return self

    def latent_sizes(self) -> list[tuple[int, int]]:
        """Each stage's latent (height, width), following upscales from stage to stage, exactly as
        the run makes them (``sampling.latents``): an empty or encoded latent at its size, which
        must be a multiple of 16 px; LatentUpscale to its size with each side at least 64 px;
        LatentUpscaleBy rounding the scaled latent, at most MAX_SIDE px a side."""
        sizes: list[tuple[int, int]] = []
        for i, stage in enumerate(self.stages):
            src = stage.latent
            if src.scale is not None:
                h, w = sizes[-1]
                h, w = round(h * src.scale), round(w * src.scale)
                if max(h, w) * VAE_SCALE > MAX_SIDE:
                    raise ValueError(
                        f"stages.{i}.latent: scale {src.scale:g} makes {w * VAE_SCALE}×"
                        f"{h * VAE_SCALE} px; a side may be at most {MAX_SIDE} px"
                    )
            else:
                assert src.width is not None and src.height is not None
                if src.source == "upscale":  # LatentUpscale clamps each side to >= 64 px
                    h, w = max(src.height, 64) // VAE_SCALE, max(src.width, 64) // VAE_SCALE
                else:  # an empty or encoded latent is made at exactly this size
                    if src.height % SIDE_MULTIPLE or src.width % SIDE_MULTIPLE:
                        raise ValueError(_not_multiple(i, src.width, src.height))
                    h, w = src.height // VAE_SCALE, src.width // VAE_SCALE
            if (h * VAE_SCALE) % SIDE_MULTIPLE or (w * VAE_SCALE) % SIDE_MULTIPLE:
                raise ValueError(_not_multiple(i, w * VAE_SCALE, h * VAE_SCALE))
            sizes.append((h, w))
        return sizes

    # ---- YAML ----
    @classmethod
    def from_dict(cls, data: Any, source: str = "workflow") -> Workflow:
        if not isinstance(data, dict):
            raise WorkflowError(
                f"{source}: expected a mapping at the top level, got {type(data).__name__}"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise WorkflowError(format_validation_error(exc, source)) from None

    @classmethod
    def from_yaml(cls, text: str, source: str = "workflow") -> Workflow:
        return cls.from_dict(_parse_yaml(text, source), source)

    @classmethod
    def load(cls, path: str | Path) -> Workflow:
        """A workflow YAML file; every error names the file (and the line where YAML gives it),
        and a ComfyUI graph or PNG given instead gets the command that imports it."""
        path = Path(path)
        data = _parse_yaml(_read_workflow_text(path), str(path))
        try:
            wf = cls.from_dict(data, str(path))
        except WorkflowError as exc:
            kind = _comfy_graph_kind(data)
            if kind is None:
                raise
            raise WorkflowError(
                f"{exc}\n{path} is a ComfyUI graph ({kind} format), not a zimage-trt workflow; "
                f"import it first: zimage-trt workflow import {path} -o workflow.yaml"
            ) from None
        neg = wf.prompts.negative_file
        if neg is not None and not Path(neg).is_absolute():
            wf.prompts.negative_file = str((path.parent / neg).resolve())
        return wf

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    def to_yaml(self) -> str:
        return yaml.dump(
            self.to_dict(), Dumper=_BlockDumper, sort_keys=False, allow_unicode=True, width=100
        )

    def save(self, path: str | Path) -> None:
        """Write atomically: a temp file beside the target, then rename (an existing file is
        replaced, a folder refused)."""
        path = Path(path)
        if path.is_dir():
            raise ValueError(f"cannot write the workflow to {path}: it is a folder")
        write_text(path, self.to_yaml())


def _read_workflow_text(path: Path) -> str:
    """A workflow file's text: UTF-8, refused naming the file and line otherwise (a PNG with
    the command that imports the graph ComfyUI saved in it)."""
    raw = path.read_bytes()
    if raw.startswith(PNG_SIGNATURE):
        raise WorkflowError(
            f"{path} is a PNG image, not a workflow YAML file; to use the ComfyUI graph saved "
            f"in it, import it first: zimage-trt workflow import {path} -o workflow.yaml"
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise WorkflowError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
            f"{exc.start}: {exc.reason})"
        ) from None


def _parse_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load`` (no Python objects are ever constructed), every failure a
    WorkflowError naming ``source``."""
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "malformed"
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        column = f"column {mark.column + 1}" if mark is not None else ""
        context = ""
        if exc.context and exc.problem and exc.context_mark is not None:
            context = f"{exc.context} from line {exc.context_mark.line + 1}"
        detail = "; ".join(part for part in (column, context) if part)
        detail = f" ({detail})" if detail else ""
        raise WorkflowError(f"{where}: not valid YAML: {problem}{detail}") from None
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow
        line = text.count("\n", 0, exc.position) + 1
        problem = str(exc).splitlines()[0]
        raise WorkflowError(f"{source}:{line}: not valid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise WorkflowError(f"{source}: not valid YAML: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise WorkflowError(f"{source}: not a workflow: YAML nested too deeply") from None
    except ValueError as exc:  # a value YAML's constructors refuse: a 5000-digit int, 2001-13-45
        raise WorkflowError(f"{source}: not valid YAML: {exc}") from None


def _comfy_graph_kind(data: Any) -> str | None:
    """'API' or 'UI' where ``data`` is a ComfyUI graph rather than a workflow, else None."""
    if not isinstance(data, dict) or not data:
        return None
    if isinstance(data.get("nodes"), list) and "links" in data:
        return "UI"
    if all(isinstance(node, dict) and "class_type" in node for node in data.values()):
        return "API"
    return None


def _not_multiple(index: int, width: int, height: int) -> str:
    return (
        f"stages.{index}.latent: {width}×{height} px is not a multiple of {SIDE_MULTIPLE} px on "
        "both sides (the DiT patchifies 2×2 latents)"
    )


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (long negative prompts) as readable ``|`` blocks."""


def _represent_str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_BlockDumper.add_representer(str, _represent_str)


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: {exc.error_count()} invalid field(s)"]
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        scalar = isinstance(err["input"], str | int | float | bool) and err["type"] != "missing"
        got = f" (got {err['input']!r})" if scalar else ""
        lines.append(f"  {path}: {msg}{got}")
    return "\n".join(lines)
