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
from typing import Any, TypeGuard

from zimage_trt.errors import InputError
from zimage_trt.workflow.png_text import PNG_SIGNATURE, png_text


class ComfyImportError(InputError):
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


def read_source(source: str | Path | dict[str, Any]) -> tuple[Any, Any, str, str]:
    """(graph data, the UI graph where a PNG carries it beside the prompt, workflow name, where
    the graph came from for messages: the file, its chunk, or '' for a dict)."""
    if isinstance(source, dict):
        return source, None, "imported", ""
    path = Path(source)
    if not path.is_file():
        raise ComfyImportError(f"no such file {str(path)!r}")
    raw = path.read_bytes()
    if not raw.startswith(PNG_SIGNATURE):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ComfyImportError(
                f"{path} is neither a PNG nor UTF-8 JSON: not a ComfyUI graph"
            ) from None
        return _parse_json(text, str(path)), None, path.stem, str(path)
    prompt, workflow = _png_chunks(path)
    if prompt is not None:
        where = f"{path} (prompt chunk)"
        ui = None
        if workflow is not None:  # only its SaveImage prefixes are read: damage is no matter
            try:
                ui = _parse_json(workflow, f"{path} (workflow chunk)")
            except ComfyImportError:
                ui = None
        return _parse_json(prompt, where), ui, path.stem, where
    if workflow is not None:
        where = f"{path} (workflow chunk)"
        return _parse_json(workflow, where), None, path.stem, where
    raise ComfyImportError(f"{path}: the PNG has no ComfyUI 'prompt' or 'workflow' text chunk")


def _png_chunks(path: Path) -> tuple[str | None, str | None]:
    """The 'prompt' and 'workflow' text chunks, read without decoding the image (a damaged PNG
    is a PngTextError, a FileError naming it)."""
    info = png_text(path)
    return info.get("prompt"), info.get("workflow")


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise ComfyImportError(f"{where}: not a ComfyUI graph: JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, or an integer of more than 4300 digits
        raise ComfyImportError(f"{where}: not valid JSON: {exc}") from None


def normalize(data: Any, where: str = "") -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """API-form nodes {id: {class_type, inputs, _meta}} and the muted nodes {id: class};
    ``where`` names the source in the message for data that is no graph at all."""
    if isinstance(data, dict) and isinstance(data.get("nodes"), list):
        return _ui_to_api(data)
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict):
        data = data["prompt"]  # a /prompt request body
    if (
        isinstance(data, dict)
        and data
        and all(isinstance(n, dict) and "class_type" in n for n in data.values())
    ):
        nodes = {str(k): v for k, v in data.items()}
        for nid, node in nodes.items():
            _check_api_node(nid, node)
        return nodes, {}
    raise ComfyImportError(
        "not a ComfyUI graph: expected the API format ({id: {class_type, inputs}}) or the UI "
        "format (nodes, links)" + (f"; {where} holds neither" if where else "")
    )


def _check_api_node(nid: str, node: dict[str, Any]) -> None:
    """An API-form node's own fields have the types ComfyUI writes (its inputs are read later)."""
    cls = node["class_type"]
    if not isinstance(cls, str):
        raise ComfyImportError(f"node {nid}: 'class_type' must be a string, got {_short(cls)}")
    for key, what in (("inputs", "input names to values"), ("_meta", "fields such as 'title'")):
        if node.get(key) is not None and not isinstance(node[key], dict):
            raise ComfyImportError(
                f"node {nid} (class {cls!r}): {key!r} must be a mapping of {what}, got "
                f"{_kind(node[key])}"
            )


def _kind(value: Any) -> str:
    """A JSON value's kind, as a message names it: 'a list', 'a string', 'null' …"""
    kinds = {list: "a list", dict: "an object", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"the number {value!r}"
    return kinds.get(type(value), type(value).__name__)


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def cycle_text(path: list[str]) -> str:
    """A loop of node ids, given in the order each takes its value from the next and ending
    with the first again, as the data flows: ``"232 → 340 → 232"``, starting at the lowest id."""
    loop = list(reversed(path[:-1]))
    start = loop.index(min(loop, key=id_order))
    loop = loop[start:] + loop[:start]
    return " → ".join([*loop, loop[0]])


def id_order(nid: str) -> tuple[bool, int, str]:
    """Sort key for node ids: numbers by value first, then other ids as text."""
    number = nid.isascii() and nid.isdecimal() and len(nid) <= 18
    return (not number, int(nid) if number else 0, nid)


# ---------------------------------------------------------------------------------------------
# UI format → API format


_MISSING = object()
_ERROR = "_error"  # an input key no ComfyUI node has: a UI node that could not be read


class _Broken:
    """A UI input that cannot be given a value (its link runs in a loop); raised only if the
    import reads that input."""

    def __init__(self, why: str) -> None:
        self.why = why


def _ui_to_api(ui: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    nodes = _ui_nodes(ui)
    _reject_packed_nodes(ui, nodes)
    links = _ui_links(ui)

    def source(link_id: Any) -> Any:
        """A link's value in API form: [node, slot], a literal, _MISSING or _Broken."""
        passed: list[str] = []  # the Reroute/bypassed nodes on the way, each fed by the next
        while True:
            if link_id is None or link_id not in links:
                return _MISSING
            src, slot, kind = links[link_id]
            node = nodes.get(src)
            if node is None or node.get("mode") == MODE_MUTED:
                return [src, slot]  # reported when (if) the graph reader follows it
            if src in passed:
                loop = cycle_text([*passed[passed.index(src) :], src])
                return _Broken(f"passes through nodes {loop}, which form a cycle")
            passed.append(src)
            if node.get("type") == "Reroute":
                ins = node.get("inputs") or [{}]
                link_id = ins[0].get("link")
            elif node.get("type") == "PrimitiveNode":
                values = node.get("widgets_values")
                if isinstance(values, dict):
                    return values.get("value", _MISSING)
                return values[0] if values else _MISSING
            elif node.get("mode") == MODE_BYPASSED:
                # ComfyUI passes the input in the output's slot if its type matches, else the
                # first input of the output's type.
                ins = node.get("inputs") or []
                order = ([slot] if 0 <= slot < len(ins) else []) + list(range(len(ins)))
                link_id = next(
                    (
                        ins[i]["link"]
                        for i in order
                        if ins[i].get("link") is not None and ins[i].get("type") in (kind, "*")
                    ),
                    None,
                )
                if link_id is None:
                    return _MISSING
            else:
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


def _is_id(value: Any) -> TypeGuard[int | str]:
    """A node or link id as the UI writes it: a number, or a string (subgraph nodes)."""
    return isinstance(value, int | str) and not isinstance(value, bool)


def _ui_nodes(ui: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The UI graph's nodes by id, each checked to hold the fields the import reads with the
    types the frontend writes."""
    nodes: dict[str, dict[str, Any]] = {}
    for i, node in enumerate(ui["nodes"]):
        if not isinstance(node, dict):
            raise ComfyImportError(f"UI graph: nodes[{i}] is {_short(node)}, not a node object")
        if not _is_id(node.get("id")):
            where = f"UI graph: nodes[{i}] (class {_short(str(node.get('type')))})"
            if "id" not in node:
                raise ComfyImportError(f"{where} has no 'id'")
            raise ComfyImportError(
                f"{where} has id {_short(node['id'])}; a node id is a number or a string"
            )
        nid = str(node["id"])
        who = f"node {nid} (class {_short(str(node.get('type')))})"
        values = node.get("widgets_values")
        if values is not None and not isinstance(values, list | dict):
            raise ComfyImportError(f"{who}: 'widgets_values' must be a list, got {_kind(values)}")
        slots = node.get("inputs")
        if slots is not None and not isinstance(slots, list):
            raise ComfyImportError(f"{who}: 'inputs' must be a list of slots, got {_kind(slots)}")
        for j, slot in enumerate(slots or []):
            if not isinstance(slot, dict):
                raise ComfyImportError(f"{who}: inputs[{j}] is {_short(slot)}, not an input slot")
            if not isinstance(slot.get("name"), str):
                what = "no 'name'" if "name" not in slot else f"name {_short(slot['name'])}"
                raise ComfyImportError(
                    f"{who}: inputs[{j}] has {what}; an input slot is named by a string"
                )
            link = slot.get("link")
            if link is not None and not _is_id(link):
                raise ComfyImportError(
                    f"{who}: input {slot['name']!r} has link {_short(link)}; expected a link "
                    "id (a number) or null"
                )
        nodes[nid] = node
    return nodes


def _ui_links(ui: dict[str, Any]) -> dict[int | str, tuple[str, int, str]]:
    """link id → (from node, from slot, type), from the list form (schema 0) or objects (1)."""
    raw = ui.get("links")
    if raw is None:
        return {}
    if not isinstance(raw, list):
        raise ComfyImportError(f"UI graph: 'links' must be a list, got {_kind(raw)}")
    fields = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
    links: dict[int | str, tuple[str, int, str]] = {}
    for k, link in enumerate(raw):
        if link is None:
            continue
        if isinstance(link, list) and len(link) >= len(fields):
            entry = dict(zip(fields, link, strict=False))
        elif isinstance(link, dict):
            entry = link
        else:
            raise ComfyImportError(
                f"UI graph: links[{k}] is {_short(link)}; a link is [id, from node, from slot, "
                "to node, to slot, type] or an object with those fields"
            )
        lid, origin, target = entry.get("id"), entry.get("origin_id"), entry.get("target_id")
        name = f"link {lid}" if _is_id(lid) else f"UI graph: links[{k}]"
        ends = [f"from node {origin}"] if _is_id(origin) else []
        ends += [f"to node {target}"] if _is_id(target) else []
        if ends:
            name += f" ({' '.join(ends)})"
        missing = [f"{f!r}" for f in ("id", "origin_id", "origin_slot", "type") if f not in entry]
        if missing:
            raise ComfyImportError(f"{name} has no {', '.join(missing)}")
        slot = entry["origin_slot"]
        if not _is_id(lid):
            raise ComfyImportError(f"{name} has id {_short(lid)}; a link id is a number")
        if not _is_id(origin):
            raise ComfyImportError(f"{name}: origin node {_short(origin)} is not a node id")
        if isinstance(slot, bool) or not isinstance(slot, int):
            raise ComfyImportError(f"{name}: origin slot {_short(slot)} is not a slot number")
        links[lid] = (str(origin), slot, str(entry["type"]))
    return links


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


def _reject_packed_nodes(ui: dict[str, Any], nodes: dict[str, dict[str, Any]]) -> None:
    extra, definitions = ui.get("extra"), ui.get("definitions")
    groups = extra.get("groupNodes") if isinstance(extra, dict) else None
    if not isinstance(groups, dict):
        groups = {}
    packed = definitions.get("subgraphs") if isinstance(definitions, dict) else None
    subgraphs = {
        str(s.get("id")): str(s.get("name") or s.get("id"))
        for s in (packed if isinstance(packed, list) else [])
        if isinstance(s, dict)
    }
    for nid, node in nodes.items():
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
            f"node {nid} is a group node/subgraph ({name!r}); convert it to normal "
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
        if not isinstance(node, dict) or not _is_id(node.get("id")):
            continue
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
        if isinstance(inputs[name], _Broken):
            raise ComfyImportError(f"{self.who(nid)}: input {name!r} {inputs[name].why}")
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

    def value(self, nid: str, name: str, _within: tuple[str, ...] = ()) -> Any:
        """A widget input's value: a literal, or what a primitive/concatenate node gives.
        ``_within``: the constant nodes being read, each taking its value from the next."""
        if not is_link(self.raw(nid, name)):
            return self.raw(nid, name)
        src, _ = self.link(nid, name, CONSTANT_NODES)
        within = (*_within, nid)
        if src in within:
            loop = cycle_text([*within[within.index(src) :], src])
            raise ComfyImportError(
                f"{self.who(nid)}: input {name!r} links back to node {src}; nodes {loop} form "
                "a cycle"
            )
        if self.cls(src) == "StringConcatenate":
            parts = [self._string(src, "string_a", within), self._string(src, "string_b", within)]
            return self._string(src, "delimiter", within).join(parts)
        return self.value(src, "value", within)

    def _bad(self, nid: str, name: str, value: Any, kind: str) -> ComfyImportError:
        return ComfyImportError(
            f"{self.who(nid)}: input {name!r} must be {kind}, got {_short(value, 200)}"
        )

    def string(self, nid: str, name: str) -> str:
        return self._string(nid, name, ())

    def _string(self, nid: str, name: str, within: tuple[str, ...]) -> str:
        value = self.value(nid, name, within)
        if not isinstance(value, str):
            raise self._bad(nid, name, value, "a string")
        return value

    def number(self, nid: str, name: str) -> float:
        value = self.value(nid, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._bad(nid, name, value, "a number")
        try:
            return float(value)
        except OverflowError:
            raise self._bad(nid, name, value, "a number in the float range") from None

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
