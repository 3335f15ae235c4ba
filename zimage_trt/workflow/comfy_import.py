"""ComfyUI graphs → Workflow: API-format JSON, UI-format JSON, or a ComfyUI PNG.

``comfy_graph`` reads the source and turns a UI-format graph into the API form. One code path then
reads the API graph: from every SaveImage/PreviewImage back through VAEDecode to a sampler node,
one stage per sampler, stages ordered by the latent chain (empty → upscale → upscale …).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zimage_trt.sampling.latents import UPSCALE_METHODS
from zimage_trt.workflow.comfy_graph import (
    CONSTANT_NODES,
    FLOW_MATCH_DEFAULTS,
    FLOW_MATCH_NODE,
    SUPPORTED,
    ComfyImportError,
    Graph,
    cycle_text,
    id_order,
    is_link,
    normalize,
    prefix_templates,
    read_source,
)
from zimage_trt.workflow.spec import ZIMAGE_SHIFT, Workflow, WorkflowError

__all__ = ["SUPPORTED", "ComfyImportError", "import_graph"]


# Options always written for the custom node (the preset shows these), others only when changed.
FLOW_MATCH_SHOWN = (
    "shift",
    "time_shift_type",
    "base_shift",
    "max_shift",
    "num_train_timesteps",
    "use_dynamic_shifting",
)

# sampler_name (KSampler, KSamplerSelect) → (SamplerSpec name, Stage.noise_device)
SAMPLER_NAMES = {
    "euler": ("euler", "auto"),
    "euler_ancestral": ("euler_ancestral", "auto"),
    "dpmpp_sde": ("dpmpp_sde", "auto"),
    "dpmpp_sde_gpu": ("dpmpp_sde", "cuda"),
}
# KSampler/BasicScheduler scheduler names → SchedulerSpec names
SCHEDULER_NAMES = {
    "simple": "simple",
    "normal": "normal",
    "sgm_uniform": "sgm_uniform",
    "beta": "beta",
    "karras": "karras",
    "exponential": "exponential",
    "FlowMatchEulerDiscreteScheduler": "flow_match_linear",
}

SAMPLER_NODES = ("KSampler", "KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced")
SAMPLER_DISPLAY_NAMES = {"KSamplerAdvanced": "KSampler (Advanced)"}
SAMPLER_OUTPUTS = {
    "KSampler": ("LATENT",),
    "KSamplerAdvanced": ("LATENT",),
    "SamplerCustom": ("output", "denoised_output"),
    "SamplerCustomAdvanced": ("output", "denoised_output"),
}
MODEL_NODES = (
    "UNETLoader",
    "LoraLoader",
    "LoraLoaderModelOnly",
    "ModelSamplingAuraFlow",
    "EasyCache",
)
CLIP_NODES = ("CLIPLoader", "CLIPLoaderGGUF", "LoraLoader")
EMPTY_LATENT_NODES = ("EmptySD3LatentImage", "EmptyLatentImage")
SAMPLER_OBJECT_NODES = ("KSamplerSelect", "SamplerEulerAncestral", "SamplerDPMPP_SDE")
SIGMAS_NODES = ("BasicScheduler", "BetaSamplingScheduler", FLOW_MATCH_NODE)
OUTPUT_NODES = ("SaveImage", "PreviewImage")
TRIGGER_DELIMITER = ", "  # Prompts.positive_text joins trigger and prompt with this


def import_graph(source: str | Path | dict[str, Any]) -> Workflow:
    """A ComfyUI graph (API/UI JSON file, ComfyUI PNG, or parsed dict) as a Workflow.

    Raises ComfyImportError (a ValueError) naming the node, class and input at fault.
    """
    data, ui, name, where = read_source(source)
    nodes, muted = normalize(data, where)
    return _build(Graph(nodes, muted), name, prefix_templates(ui))


# ---------------------------------------------------------------------------------------------
# Graph → stages


@dataclass
class _ModelChain:
    transformer: str
    loras: list[dict[str, Any]]
    shift: float
    cache: dict[str, float] | None


@dataclass
class _Prompt:
    trigger: str | None
    positive: str
    encoder: str

    @property
    def text(self) -> str:
        return (
            f"{self.trigger}{TRIGGER_DELIMITER}{self.positive}" if self.trigger else self.positive
        )


@dataclass
class _Stage:
    node: str
    model: _ModelChain
    positive: _Prompt
    negative: _Prompt | None  # None where cfg == 1 (ComfyUI skips the uncond pass)
    spec: dict[str, Any]


def _build(g: Graph, name: str, prefix_templates: dict[str, str]) -> Workflow:
    outputs = sorted((n for n in g.nodes if g.cls(n) in OUTPUT_NODES), key=id_order)
    if not outputs:
        raise ComfyImportError("the graph has no SaveImage or PreviewImage node; nothing to run")
    decoded: dict[str, list[str]] = {}  # sampler → output nodes showing its decoded latent
    vaes: dict[str, str] = {}  # VAEDecode → vae_name
    for out in outputs:
        g.supported(out)
        decode, _ = g.link(out, "images", ("VAEDecode",))
        sampler = _sampler_output(g, decode, "samples")
        vae, _ = g.link(decode, "vae", ("VAELoader",))
        vaes[decode] = g.string(vae, "vae_name")
        decoded.setdefault(sampler, []).append(out)
    if len(set(vaes.values())) > 1:
        used = ", ".join(f"{v!r} (node {d})" for d, v in vaes.items())
        raise ComfyImportError(f"VAEDecode nodes use different VAEs: {used}; use one VAE")

    chain = _stage_chain(g, list(decoded))
    stages = [_read_stage(g, nid, latent) for nid, latent in chain]
    names: list[str] = []
    for i, stage in enumerate(stages):
        names.append(_stage_name(g, stage.node, i, names))
    _check_shared(stages, names)

    shifts = [ZIMAGE_SHIFT] + [s.model.shift for s in stages]
    specs = []
    for i, stage in enumerate(stages):
        spec = {**stage.spec, "name": names[i], "shift": stage.model.shift}
        if stage.model.cache is not None:
            # ComfyUI's EasyCache reads the sampling the previous run left patched (§9.4).
            spec["cache"] = {**stage.model.cache, "shift": shifts[i]}
        classes = [g.cls(o) for o in decoded.get(stage.node, [])]
        last = i == len(stages) - 1
        spec["preview"] = "PreviewImage" in classes or (not last and "SaveImage" in classes)
        specs.append(spec)

    first = stages[0]
    negatives = [s.negative for s in stages if s.negative is not None]
    output: dict[str, Any] = {}
    saves = [o for o in decoded.get(stages[-1].node, []) if g.cls(o) == "SaveImage"]
    if saves:
        output["prefix"] = prefix_templates.get(saves[0]) or g.string(saves[0], "filename_prefix")
    loras = [dict(lora) for lora in first.model.loras]
    if first.positive.trigger and len(loras) == 1:
        loras[0]["trigger"] = first.positive.trigger  # the phrase is that LoRA's activation
    data = {
        "name": name,
        "description": f"Imported from the ComfyUI graph {name!r}.",
        "models": {
            "transformer": first.model.transformer,
            "vae": next(iter(vaes.values())),
            "text_encoder": first.positive.encoder,
            "loras": loras,
        },
        "prompts": {
            "positive": first.positive.positive,
            "trigger": first.positive.trigger,
            "negative": negatives[0].text if negatives else None,
        },
        "stages": specs,
        "output": output,
    }
    try:
        return Workflow.from_dict(data, f"imported graph {name!r}")
    except WorkflowError as exc:
        raise ComfyImportError(str(exc)) from None


def _sampler_output(g: Graph, nid: str, name: str) -> str:
    """The sampler node whose main LATENT output feeds input ``name``."""
    src, slot = g.link(nid, name, SAMPLER_NODES)
    outputs = SAMPLER_OUTPUTS[g.cls(src)]
    if not 0 <= slot < len(outputs):
        raise ComfyImportError(
            f"{g.who(nid)}: input {name!r} takes output {slot} of {g.who(src)}, which has "
            f"{len(outputs)} output{'s' if len(outputs) > 1 else ''} ({', '.join(outputs)})"
        )
    if slot != 0:
        raise ComfyImportError(
            f"{g.who(nid)}: input {name!r} takes output {slot} ({outputs[slot]}) of "
            f"{g.who(src)}; only its first output ({outputs[0]!r}) can be imported"
        )
    return src


def _stage_chain(g: Graph, decoded: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """The sampler nodes in execution order, each with its latent source spec."""
    latent: dict[str, dict[str, Any]] = {}
    previous: dict[str, str | None] = {}
    todo = list(decoded)
    while todo:
        nid = todo.pop()
        if nid in previous:
            continue
        latent[nid], previous[nid] = _latent_source(g, nid)
        if previous[nid] is not None:
            todo.append(str(previous[nid]))
    _refuse_latent_cycles(previous)
    roots = sorted((n for n, p in previous.items() if p is None), key=id_order)
    if len(roots) != 1:
        raise ComfyImportError(
            f"the graph has {len(roots)} separate chains of stages (first samplers: nodes "
            f"{', '.join(roots)}); only one chain can be imported"
        )
    following: dict[str, list[str]] = {}
    for nid, prev in previous.items():
        if prev is not None:
            following.setdefault(prev, []).append(nid)
    for prev, nexts in following.items():
        if len(nexts) > 1:
            raise ComfyImportError(
                f"the graph branches after sampler node {prev}: nodes "
                f"{', '.join(sorted(nexts, key=id_order))} all continue from its latent; only "
                "one chain of stages can be imported"
            )
    order = [roots[0]]  # with no cycle and no branch, this reaches every sampler
    while order[-1] in following:
        order.append(following[order[-1]][0])
    return [(nid, latent[nid]) for nid in order]


def _refuse_latent_cycles(previous: dict[str, str | None]) -> None:
    """Refuse samplers whose latents go round in a loop (each fed, through upscales, by the one
    before it): such a chain has no first stage."""
    done: set[str] = set()
    for start in sorted(previous, key=id_order):
        path: list[str] = []
        nid: str | None = start
        while nid is not None and nid not in done:
            if nid in path:
                loop = cycle_text([*path[path.index(nid) :], nid])
                raise ComfyImportError(
                    f"the latents of sampler nodes {loop} form a cycle (each takes its "
                    "latent_image from the one before); the first stage needs an empty latent "
                    "(EmptySD3LatentImage)"
                )
            path.append(nid)
            nid = previous.get(nid)
        done.update(path)


def _latent_source(g: Graph, sampler: str) -> tuple[dict[str, Any], str | None]:
    """(LatentSource fields, previous sampler) for a sampler's latent_image input."""
    allowed = (*EMPTY_LATENT_NODES, "LatentUpscale", "LatentUpscaleBy", *SAMPLER_NODES)
    src, _ = g.link(sampler, "latent_image", allowed)
    kind = g.cls(src)
    if kind in EMPTY_LATENT_NODES:
        batch = g.integer(src, "batch_size")
        if batch != 1:
            raise ComfyImportError(
                f"{g.who(src)}: batch_size {batch} is not supported; only 1 can be imported"
            )
        size = {"width": g.integer(src, "width"), "height": g.integer(src, "height")}
        return {"source": "empty", **size}, None
    if kind in SAMPLER_NODES:  # the previous latent as it is: an upscale by 1 is the identity
        return {"source": "upscale", "scale": 1.0}, _sampler_output(g, sampler, "latent_image")
    method = g.string(src, "upscale_method")
    if method not in UPSCALE_METHODS:
        raise ComfyImportError(
            f"{g.who(src)}: upscale_method {method!r} is not supported; supported: "
            + ", ".join(UPSCALE_METHODS)
        )
    spec: dict[str, Any] = {"source": "upscale", "method": method}
    if kind == "LatentUpscaleBy":
        spec["scale"] = g.number(src, "scale_by")
    else:
        width, height = g.integer(src, "width"), g.integer(src, "height")
        if width <= 0 or height <= 0:
            raise ComfyImportError(
                f"{g.who(src)}: width {width} × height {height}: a side of 0 (keep the aspect "
                "ratio) is not supported; give both sides"
            )
        spec.update(width=width, height=height, crop=g.string(src, "crop"))
    return spec, _sampler_output(g, src, "samples")


def _read_stage(g: Graph, nid: str, latent: dict[str, Any]) -> _Stage:
    kind = g.cls(nid)
    spec: dict[str, Any] = {"latent": latent, "add_noise": True}
    guide = nid  # the node holding the model, cfg and conditioning inputs
    positive_input, negative_input = "positive", "negative"
    if kind == "SamplerCustomAdvanced":
        noise, _ = g.link(nid, "noise", ("RandomNoise",))
        spec["seed"] = g.integer(noise, "noise_seed")
        guide, _ = g.link(nid, "guider", ("CFGGuider", "BasicGuider"))
        if g.cls(guide) == "BasicGuider":
            positive_input, negative_input = "conditioning", ""
    else:
        spec["seed"] = g.integer(nid, "seed" if kind == "KSampler" else "noise_seed")
    if kind in ("KSamplerAdvanced", "SamplerCustom"):
        spec["add_noise"] = g.flag(nid, "add_noise")
    model = _model_chain(g, guide, "model")
    spec["cfg"] = g.number(guide, "cfg") if negative_input else 1.0
    if kind in ("KSampler", "KSamplerAdvanced"):
        spec["sampler"], spec["noise_device"] = _sampler_by_name(g, nid, "sampler_name")
        spec["scheduler"] = _ksampler_schedule(g, nid)
    else:
        spec["sampler"], spec["noise_device"] = _sampler_node(g, nid)
        spec["scheduler"] = _sigmas_node(g, nid, model.shift)
    positive = _conditioning(g, guide, positive_input)
    # cfg 1 runs no unconditional pass in ComfyUI, so the negative is never read.
    negative = None
    if negative_input and not math.isclose(spec["cfg"], 1.0):
        negative = _conditioning(g, guide, negative_input)
    return _Stage(nid, model, positive, negative, spec)


def _ksampler_schedule(g: Graph, nid: str) -> dict[str, Any]:
    steps = g.integer(nid, "steps")
    denoise = 1.0
    if g.cls(nid) == "KSampler":
        denoise = g.number(nid, "denoise")
    else:
        start, end = g.integer(nid, "start_at_step"), g.integer(nid, "end_at_step")
        if start != 0 or end < steps:
            raise ComfyImportError(
                f"{g.who(nid)}: start_at_step {start} / end_at_step {end} is not supported; "
                f"only start_at_step 0 and end_at_step >= steps ({steps}) can be imported"
            )
    return {"name": _scheduler_name(g, nid), "steps": steps, "denoise": denoise}


def _scheduler_name(g: Graph, nid: str) -> str:
    name = g.string(nid, "scheduler")
    if name not in SCHEDULER_NAMES:
        raise ComfyImportError(
            f"{g.who(nid)}: scheduler {name!r} is not supported; supported schedulers: "
            + ", ".join(SCHEDULER_NAMES)
        )
    return SCHEDULER_NAMES[name]


def _sampler_by_name(g: Graph, nid: str, name: str) -> tuple[dict[str, Any], str]:
    sampler = g.string(nid, name)
    if sampler not in SAMPLER_NAMES:
        raise ComfyImportError(
            f"{g.who(nid)}: sampler {sampler!r} is not supported; supported samplers: "
            + ", ".join(SAMPLER_NAMES)
        )
    spec_name, device = SAMPLER_NAMES[sampler]
    return {"name": spec_name}, device  # ComfyUI's defaults: eta 1, s_noise 1, r 0.5


def _sampler_node(g: Graph, nid: str) -> tuple[dict[str, Any], str]:
    src, _ = g.link(nid, "sampler", SAMPLER_OBJECT_NODES)
    kind = g.cls(src)
    if kind == "KSamplerSelect":
        return _sampler_by_name(g, src, "sampler_name")
    spec: dict[str, Any] = {"eta": g.number(src, "eta"), "s_noise": g.number(src, "s_noise")}
    if kind == "SamplerEulerAncestral":
        return {"name": "euler_ancestral", **spec}, "auto"
    device = g.string(src, "noise_device")
    if device not in ("gpu", "cpu"):
        raise ComfyImportError(f"{g.who(src)}: noise_device {device!r} is not 'gpu' or 'cpu'")
    spec.update(name="dpmpp_sde", r=g.number(src, "r"))
    return spec, "cuda" if device == "gpu" else "cpu"


def _sigmas_node(g: Graph, nid: str, shift: float) -> dict[str, Any]:
    src, _ = g.link(nid, "sigmas", SIGMAS_NODES)
    kind = g.cls(src)
    if kind == FLOW_MATCH_NODE:
        steps = g.integer(src, "steps")
        options = _flow_match_options(g, src)
        return {"name": "flow_match_euler", "steps": steps, "denoise": 1.0, "options": options}
    # These read the model's sampling: it must be the stage's own.
    scheduler_shift = _model_chain(g, src, "model").shift
    if scheduler_shift != shift:
        raise ComfyImportError(
            f"{g.who(src)} schedules with model shift {scheduler_shift} but sampler node {nid} "
            f"samples with shift {shift}; a stage has one shift, so connect both to the same "
            "model"
        )
    steps = g.integer(src, "steps")
    if kind == "BetaSamplingScheduler":
        options = {"alpha": g.number(src, "alpha"), "beta": g.number(src, "beta")}
        return {"name": "beta", "steps": steps, "denoise": 1.0, "options": options}
    return {"name": _scheduler_name(g, src), "steps": steps, "denoise": g.number(src, "denoise")}


def _flow_match_options(g: Graph, nid: str) -> dict[str, Any]:
    """The custom node's widgets as flow_match_euler options (§5.2); device is dropped."""
    values: dict[str, Any] = {}
    for name, default in FLOW_MATCH_DEFAULTS.items():
        if name in ("steps", "device"):
            continue
        if isinstance(default, bool):
            values[name] = g.flag(nid, name)
        elif isinstance(default, int):
            values[name] = g.integer(nid, name)
        elif isinstance(default, float):
            values[name] = g.number(nid, name)
        else:
            values[name] = g.string(nid, name)
    options = {name: values[name] for name in FLOW_MATCH_SHOWN}
    for name, value in values.items():
        if name not in options and value != FLOW_MATCH_DEFAULTS[name]:
            options[name] = value  # shift_terminal 0.0 (= off) stays out with the defaults
    return options


def _walk(g: Graph, nid: str, name: str, allowed: tuple[str, ...]) -> Iterator[str]:
    """The nodes up a MODEL or CLIP chain, nearest first."""
    seen: list[str] = []  # each node takes its input from the next
    src, _ = g.link(nid, name, allowed)
    while True:
        if src in seen:
            loop = cycle_text([*seen[seen.index(src) :], src])
            raise ComfyImportError(
                f"{g.who(src)}: the {name} chain loops back to itself; nodes {loop} form a cycle"
            )
        seen.append(src)
        yield src
        if g.cls(src) in ("UNETLoader", "CLIPLoader", "CLIPLoaderGGUF"):
            return
        src, _ = g.link(src, name, allowed)


def _model_chain(g: Graph, nid: str, name: str) -> _ModelChain:
    """UNET, LoRAs (in load order), shift and EasyCache on the way to ``nid``'s model input.

    Nearer patches override farther ones, as in ComfyUI (the last object patch wins).
    """
    shift: float | None = None
    cache: dict[str, float] | None = None
    loras: list[dict[str, Any]] = []
    transformer = ""
    for src in _walk(g, nid, name, MODEL_NODES):
        kind = g.cls(src)
        if kind == "UNETLoader":
            transformer = g.string(src, "unet_name")
        elif kind == "ModelSamplingAuraFlow" and shift is None:
            shift = g.number(src, "shift")
        elif kind == "EasyCache" and cache is None:
            cache = {
                "threshold": g.number(src, "reuse_threshold"),
                "start_percent": g.number(src, "start_percent"),
                "end_percent": g.number(src, "end_percent"),
            }
        elif kind in ("LoraLoader", "LoraLoaderModelOnly"):
            lora = {"path": g.string(src, "lora_name"), "strength": g.number(src, "strength_model")}
            # A model-only LoRA leaves the text encoder alone.
            lora["strength_clip"] = g.number(src, "strength_clip") if kind == "LoraLoader" else 0.0
            loras.insert(0, lora)
    return _ModelChain(transformer, loras, ZIMAGE_SHIFT if shift is None else shift, cache)


def _conditioning(g: Graph, nid: str, name: str) -> _Prompt:
    """The prompt behind a conditioning input; ``trigger, prompt`` splits into its two parts."""
    enc, _ = g.link(nid, name, ("CLIPTextEncode",))
    encoder = ""
    for src in _walk(g, enc, "clip", CLIP_NODES):
        if g.cls(src) != "LoraLoader":
            encoder = g.string(src, "clip_name")
    text = g.raw(enc, "text")
    if is_link(text):
        src, _ = g.link(enc, "text", CONSTANT_NODES)
        if g.cls(src) == "StringConcatenate" and g.string(src, "delimiter") == TRIGGER_DELIMITER:
            trigger = g.string(src, "string_a")
            if trigger:
                return _Prompt(trigger, g.string(src, "string_b"), encoder)
    return _Prompt(None, g.string(enc, "text"), encoder)


def _check_shared(stages: list[_Stage], names: list[str]) -> None:
    """All stages must run the same models and prompts: a Workflow has one set of each."""
    first = stages[0]
    negatives = [(i, s.negative) for i, s in enumerate(stages) if s.negative is not None]
    for i, stage in enumerate(stages):
        checks: list[tuple[str, Any, Any, int]] = [
            ("transformer", stage.model.transformer, first.model.transformer, 0),
            ("LoRAs", stage.model.loras, first.model.loras, 0),
            ("text encoder", stage.positive.encoder, first.positive.encoder, 0),
            ("positive prompt", stage.positive.text, first.positive.text, 0),
        ]
        if stage.negative is not None:
            j, negative = negatives[0]
            checks.append(("text encoder", stage.negative.encoder, first.positive.encoder, 0))
            checks.append(("negative prompt", stage.negative.text, negative.text, j))
        for what, mine, theirs, j in checks:
            if mine != theirs:
                raise ComfyImportError(
                    f"stage {names[i]!r} (node {stage.node}) uses {what} {mine!r}, but stage "
                    f"{names[j]!r} (node {stages[j].node}) uses {theirs!r}; all stages must "
                    "share the same models and prompts (the negative where cfg > 1)"
                )


def _stage_name(g: Graph, nid: str, index: int, taken: list[str]) -> str:
    """A slug of the sampler's own title, else stage1, stage2, …"""
    title = g.title(nid) or ""
    if title in (g.cls(nid), SAMPLER_DISPLAY_NAMES.get(g.cls(nid))):
        title = ""  # the API format always carries a title: the class's display name
    name = re.sub(r"[^\w]+", "-", title.strip().lower()).strip("-") or f"stage{index + 1}"
    return f"{name}-{index + 1}" if name in taken else name
