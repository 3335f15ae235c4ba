"""Reading a ComfyUI graph: the source, the node tables, and the API-form graph.

The source is an API/UI JSON file, a ComfyUI PNG (its 'prompt' and 'workflow' text chunks) or a
parsed dict. A UI-format graph (what "Save" writes) is first turned into the API form (what
"Queue" sends): widget values get their input names, Reroutes and frontend PrimitiveNodes dissolve
into links and literals, muted nodes drop out and bypassed nodes pass their input through.
``Graph`` then gives typed access to the API graph; every failure names the node, class and input.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any


class ComfyImportError(ValueError):
    """A ComfyUI graph that cannot be imported; the message names the node, class and input."""


FLOW_MATCH_NODE = "FlowMatchEulerDiscreteScheduler (Custom)"
SEED_CONTROL = "control_after_generate"  # the frontend's extra widget after seed widgets
SEED_CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")

# The custom FlowMatch node's widgets in INPUT_TYPES order with their defaults (semantics §5.2).
FLOW_MATCH_DEFAULTS: dict[str, Any] = {
    "steps": 9,
    "start_at_step": 0,
    "end_at_step": 9999,
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "shift_terminal": 0.0,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": False,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
    "device": "auto",
}

# Each supported class's widget inputs in INPUT_TYPES order: how a UI node's widgets_values map
# to input names. control_after_generate is the frontend's own entry after seed widgets.
WIDGETS: dict[str, tuple[str, ...]] = {
    "UNETLoader": ("unet_name", "weight_dtype"),
    "VAELoader": ("vae_name",),
    "CLIPLoader": ("clip_name", "type", "device"),
    "CLIPLoaderGGUF": ("clip_name", "type"),
    "LoraLoader": ("lora_name", "strength_model", "strength_clip"),
    "LoraLoaderModelOnly": ("lora_name", "strength_model"),
    "CLIPTextEncode": ("text",),
    "PrimitiveString": ("value",),
    "PrimitiveStringMultiline": ("value",),
    "PrimitiveInt": ("value", SEED_CONTROL),
    "PrimitiveFloat": ("value",),
    "StringConcatenate": ("string_a", "string_b", "delimiter"),
    "EmptySD3LatentImage": ("width", "height", "batch_size"),
    "EmptyLatentImage": ("width", "height", "batch_size"),
    "LatentUpscale": ("upscale_method", "width", "height", "crop"),
    "LatentUpscaleBy": ("upscale_method", "scale_by"),
    "KSampler": ("seed", SEED_CONTROL, "steps", "cfg", "sampler_name", "scheduler", "denoise"),
    "KSamplerAdvanced": (
        "add_noise",
        "noise_seed",
        SEED_CONTROL,
        "steps",
        "cfg",
        "sampler_name",
        "scheduler",
        "start_at_step",
        "end_at_step",
        "return_with_leftover_noise",
    ),
    "SamplerCustom": ("add_noise", "noise_seed", SEED_CONTROL, "cfg"),
    "SamplerCustomAdvanced": (),
    "KSamplerSelect": ("sampler_name",),
    "SamplerEulerAncestral": ("eta", "s_noise"),
    "SamplerDPMPP_SDE": ("eta", "s_noise", "r", "noise_device"),
    "BasicScheduler": ("scheduler", "steps", "denoise"),
    "BetaSamplingScheduler": ("steps", "alpha", "beta"),
    FLOW_MATCH_NODE: tuple(FLOW_MATCH_DEFAULTS),
    "RandomNoise": ("noise_seed", SEED_CONTROL),
    "CFGGuider": ("cfg",),
    "BasicGuider": (),
    "ModelSamplingAuraFlow": ("shift",),
    "EasyCache": ("reuse_threshold", "start_percent", "end_percent", "verbose"),
    "VAEDecode": (),
    "SaveImage": ("filename_prefix",),
    "PreviewImage": (),
    "Reroute": (),
    "PrimitiveNode": ("value", SEED_CONTROL),
}
SUPPORTED = tuple(WIDGETS)

CONSTANT_NODES = (
    "PrimitiveString",
    "PrimitiveStringMultiline",
    "PrimitiveInt",
    "PrimitiveFloat",
    "StringConcatenate",
)
FRONTEND_NODES = ("Reroute", "PrimitiveNode", "Note", "MarkdownNote")
MODE_MUTED, MODE_BYPASSED = 2, 4


# ---------------------------------------------------------------------------------------------
# Reading the source


def read_source(source: str | Path | dict[str, Any]) -> tuple[Any, Any, str]:
    """(graph data, the UI graph where a PNG carries it beside the prompt, workflow name)."""
    if isinstance(source, dict):
        return source, None, "imported"
    path = Path(source)
    if not path.is_file():
        raise ComfyImportError(f"no such file {str(path)!r}")
    raw = path.read_bytes()
    if not raw.startswith(b"\x89PNG"):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ComfyImportError(
                f"{path} is neither a PNG nor UTF-8 JSON: not a ComfyUI graph"
            ) from None
        return _parse_json(text, str(path)), None, path.stem
    prompt, workflow = _png_chunks(path)
    if prompt is not None:
        ui = _parse_json(workflow, f"{path} (workflow chunk)") if workflow is not None else None
        return _parse_json(prompt, f"{path} (prompt chunk)"), ui, path.stem
    if workflow is not None:
        return _parse_json(workflow, f"{path} (workflow chunk)"), None, path.stem
    raise ComfyImportError(f"{path}: the PNG has no ComfyUI 'prompt' or 'workflow' text chunk")


def _png_chunks(path: Path) -> tuple[str | None, str | None]:
    from PIL import Image  # only PNG imports need Pillow

    try:
        with Image.open(path) as img:
            img.load()
            info = dict(img.info)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ComfyImportError(f"{path} is not a readable PNG ({exc})") from None
    prompt, workflow = info.get("prompt"), info.get("workflow")
    return (
        prompt if isinstance(prompt, str) else None,
        workflow if isinstance(workflow, str) else None,
    )


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ComfyImportError(f"{where}: not valid JSON: {exc}") from None


def normalize(data: Any) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """API-form nodes {id: {class_type, inputs, _meta}} and the muted nodes {id: class}."""
    if isinstance(data, dict) and isinstance(data.get("nodes"), list):
        return _ui_to_api(data)
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict):
        data = data["prompt"]  # a /prompt request body
    if (
        isinstance(data, dict)
        and data
        and all(isinstance(n, dict) and "class_type" in n for n in data.values())
    ):
        return {str(k): v for k, v in data.items()}, {}
    raise ComfyImportError(
        "not a ComfyUI graph: expected the API format ({id: {class_type, inputs}}) or the UI "
        "format (nodes, links)"
    )


# ---------------------------------------------------------------------------------------------
# UI format → API format


_MISSING = object()
_ERROR = "_error"  # an input key no ComfyUI node has: a UI node that could not be read


def _ui_to_api(ui: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    _reject_packed_nodes(ui)
    nodes = {str(n["id"]): n for n in ui["nodes"]}
    links: dict[Any, tuple[str, int, str]] = {}  # link id → (from node, from slot, type)
    for link in ui.get("links") or []:
        if isinstance(link, list) and len(link) >= 6:
            links[link[0]] = (str(link[1]), int(link[2]), str(link[5]))
        elif isinstance(link, dict):
            links[link["id"]] = (
                str(link["origin_id"]),
                int(link["origin_slot"]),
                str(link["type"]),
            )

    def source(link_id: Any, depth: int = 0) -> Any:
        """A link's value in API form: [node, slot], a literal, or _MISSING."""
        if link_id is None or link_id not in links or depth > len(nodes):
            return _MISSING
        src, slot, kind = links[link_id]
        node = nodes.get(src)
        if node is None or node.get("mode") == MODE_MUTED:
            return [src, slot]  # reported when (if) the graph reader follows it
        if node.get("type") == "Reroute":
            ins = node.get("inputs") or [{}]
            return source(ins[0].get("link"), depth + 1)
        if node.get("type") == "PrimitiveNode":
            values = node.get("widgets_values") or []
            return values[0] if values else _MISSING
        if node.get("mode") == MODE_BYPASSED:
            # ComfyUI passes the input in the output's slot if its type matches, else the first
            # input of the output's type.
            ins = node.get("inputs") or []
            order = ([slot] if slot < len(ins) else []) + list(range(len(ins)))
            for i in order:
                if ins[i].get("link") is not None and ins[i].get("type") in (kind, "*"):
                    return source(ins[i]["link"], depth + 1)
            return _MISSING
        return [src, slot]

    api: dict[str, dict[str, Any]] = {}
    muted: dict[str, str] = {}
    for nid, node in nodes.items():
        cls = str(node.get("type"))
        if node.get("mode") == MODE_MUTED:
            muted[nid] = cls
            continue
        if cls in FRONTEND_NODES or node.get("mode") == MODE_BYPASSED:
            continue
        inputs = _widget_inputs(nid, cls, node.get("widgets_values"))
        for slot in node.get("inputs") or []:
            value = source(slot.get("link"))
            if value is not _MISSING:
                inputs[slot["name"]] = value
            elif slot.get("link") is not None:  # a dead end: no stale widget value either
                inputs.pop(slot["name"], None)
        api[nid] = {"class_type": cls, "inputs": inputs}
        if node.get("title"):
            api[nid]["_meta"] = {"title": node["title"]}
    return api, muted


def _widget_inputs(nid: str, cls: str, values: Any) -> dict[str, Any]:
    """A UI node's widgets_values as named inputs (INPUT_TYPES order, seed controls skipped).

    A node with more values than widgets was saved by another version of its class: it gets an
    ``_error`` entry, raised only if the import reaches the node.
    """
    if cls not in WIDGETS or not values:
        return {}
    names = WIDGETS[cls]
    if isinstance(values, dict):
        return {k: v for k, v in values.items() if k in names and k != SEED_CONTROL}
    inputs: dict[str, Any] = {}
    pos = 0
    for name in names:
        if pos >= len(values):
            break
        if name == SEED_CONTROL:
            # Only present when the frontend added it; older saves may lack it.
            if isinstance(values[pos], str) and values[pos] in SEED_CONTROL_VALUES:
                pos += 1
            continue
        inputs[name] = values[pos]
        pos += 1
    if pos < len(values):
        inputs[_ERROR] = (
            f"node {nid} (class {cls!r}) has {len(values)} widget values, more than its "
            f"{len(names)} widgets ({', '.join(names)}); was it saved by another version of "
            "the node?"
        )
    return inputs


def _reject_packed_nodes(ui: dict[str, Any]) -> None:
    groups = (ui.get("extra") or {}).get("groupNodes") or {}
    subgraphs = {
        str(s.get("id")): str(s.get("name") or s.get("id"))
        for s in (ui.get("definitions") or {}).get("subgraphs") or []
    }
    for node in ui["nodes"]:
        kind = str(node.get("type"))
        if node.get("mode") == MODE_MUTED:
            continue
        if kind in subgraphs:
            name = subgraphs[kind]
        elif ">" in kind or kind in groups or kind.removeprefix("workflow/") in groups:
            name = kind
        else:
            continue
        raise ComfyImportError(
            f"node {node.get('id')} is a group node/subgraph ({name!r}); convert it to normal "
            "nodes in ComfyUI (right-click → Convert to nodes) before importing"
        )


def prefix_templates(ui: Any) -> dict[str, str]:
    """SaveImage prefixes as saved in the UI graph, by node id.

    The frontend expands ``%date:…%`` in the prompt it sends (and that a PNG's 'prompt' chunk
    holds); the UI graph keeps the template, which the runtime expands per run.
    """
    if not isinstance(ui, dict) or not isinstance(ui.get("nodes"), list):
        return {}
    templates = {}
    for node in ui["nodes"]:
        values = node.get("widgets_values")
        if node.get("type") == "SaveImage" and isinstance(values, list) and values:
            prefix = values[0]
            if isinstance(prefix, str) and re.fullmatch(r"([^%]|%date:[^%]*%)*", prefix):
                templates[str(node.get("id"))] = prefix
    return templates


# ---------------------------------------------------------------------------------------------
# Reading the API graph


def is_link(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], (str, int))
        and isinstance(value[1], int)
        and not isinstance(value[1], bool)
    )


class Graph:
    """Typed access to an API-form graph; every failure names the node, class and input."""

    def __init__(self, nodes: dict[str, dict[str, Any]], muted: dict[str, str]) -> None:
        self.nodes = nodes
        self.muted = muted

    def cls(self, nid: str) -> str:
        return str(self.nodes[nid].get("class_type"))

    def who(self, nid: str) -> str:
        return f"node {nid} (class {self.cls(nid)!r})"

    def title(self, nid: str) -> str | None:
        title = (self.nodes[nid].get("_meta") or {}).get("title")
        return title if isinstance(title, str) else None

    def supported(self, nid: str) -> None:
        error = (self.nodes[nid].get("inputs") or {}).get(_ERROR)
        if isinstance(error, str):
            raise ComfyImportError(error)
        if self.cls(nid) not in WIDGETS:
            raise ComfyImportError(
                f"{self.who(nid)} is not supported; supported classes: {', '.join(SUPPORTED)}"
            )

    def raw(self, nid: str, name: str) -> Any:
        inputs = self.nodes[nid].get("inputs") or {}
        if name not in inputs:
            raise ComfyImportError(
                f"{self.who(nid)} has no input {name!r} (missing or not connected)"
            )
        return inputs[name]

    def link(self, nid: str, name: str, allowed: tuple[str, ...]) -> tuple[str, int]:
        """The (node, output slot) feeding input ``name``; its class must be in ``allowed``."""
        value = self.raw(nid, name)
        if not is_link(value):
            raise ComfyImportError(
                f"{self.who(nid)}: input {name!r} must be connected to a node, got {value!r}"
            )
        src, slot = str(value[0]), int(value[1])
        if src not in self.nodes:
            if src in self.muted:
                raise ComfyImportError(
                    f"{self.who(nid)}: input {name!r} links to node {src} (class "
                    f"{self.muted[src]!r}), which is muted; unmute it or remove the link"
                )
            raise ComfyImportError(
                f"{self.who(nid)}: input {name!r} links to node {src}, which is not in the graph"
            )
        self.supported(src)
        if self.cls(src) not in allowed:
            raise ComfyImportError(
                f"{self.who(nid)}: input {name!r} comes from {self.who(src)}; expected one of: "
                + ", ".join(allowed)
            )
        return src, slot

    def value(self, nid: str, name: str) -> Any:
        """A widget input's value: a literal, or what a primitive/concatenate node gives."""
        if not is_link(self.raw(nid, name)):
            return self.raw(nid, name)
        src, _ = self.link(nid, name, CONSTANT_NODES)
        if self.cls(src) == "StringConcatenate":
            parts = [self.string(src, "string_a"), self.string(src, "string_b")]
            return self.string(src, "delimiter").join(parts)
        return self.value(src, "value")

    def _bad(self, nid: str, name: str, value: Any, kind: str) -> ComfyImportError:
        return ComfyImportError(f"{self.who(nid)}: input {name!r} must be {kind}, got {value!r}")

    def string(self, nid: str, name: str) -> str:
        value = self.value(nid, name)
        if not isinstance(value, str):
            raise self._bad(nid, name, value, "a string")
        return value

    def number(self, nid: str, name: str) -> float:
        value = self.value(nid, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._bad(nid, name, value, "a number")
        return float(value)

    def integer(self, nid: str, name: str) -> int:
        value = self.value(nid, name)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._bad(nid, name, value, "an integer")
        return value

    def flag(self, nid: str, name: str) -> bool:
        """A BOOLEAN widget or an "enable"/"disable" combo."""
        value = self.value(nid, name)
        if isinstance(value, bool):
            return value
        if value in ("enable", "disable"):
            return bool(value == "enable")
        raise self._bad(nid, name, value, "true/false or 'enable'/'disable'")
