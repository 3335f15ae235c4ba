"""Workflow inputs refused with one clear message: YAML files, ComfyUI graphs (API and UI JSON)
and the PNGs they come in (issue 12, rows 15–49 and 120–121 of
``../shared/reference/reliability-audit.md``; case numbers in the ids).

Each case runs ``main(argv)`` in-process through the ``refused`` fixture (conftest.py): exit
code, the exact message, no traceback, no model loaded, nothing written in the scratch folder.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import Case
from zimage_trt.cli import main
from zimage_trt.workflow import load_workflow
from zimage_trt.workflow.comfy_graph import SUPPORTED
from zimage_trt.workflow.png_text import MAX_TEXT_BYTES

DATA = Path(__file__).parent / "data"
API_FILE = DATA / "comfy_api" / "zimage-121101.json"
UI_FILE = DATA / "comfy_ui" / "zimage-121101.json"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# ---- helpers: each writes a variant into the scratch folder and returns its path ----------------


def _yaml(path: Path, edit: dict[str, object]) -> str:
    """The reference workflow with ``edit`` applied ("stages.0.name": value …), written to path."""
    data = load_workflow("zimage-121101").to_dict()
    for dotted, value in edit.items():
        *parents, key = dotted.split(".")
        node: Any = data
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[int(key) if isinstance(node, list) else key] = value
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return str(path)


def _text(path: Path, text: str | bytes) -> str:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def _api(path: Path, edit: Callable[[dict[str, Any]], object]) -> str:
    """The reference API graph, edited in place by ``edit``, written to path."""
    graph = json.loads(API_FILE.read_text(encoding="utf-8"))
    edit(graph)
    path.write_text(json.dumps(graph), encoding="utf-8")
    return str(path)


def _inputs(**nodes: dict[str, object]) -> Callable[[dict[str, Any]], None]:
    """An ``_api`` edit replacing inputs: ``_inputs(n316={"cfg": 2})``."""

    def edit(graph: dict[str, Any]) -> None:
        for node, values in nodes.items():
            graph[node.removeprefix("n")]["inputs"].update(values)

    return edit


def _ui(path: Path, edit: Callable[[dict[str, Any]], object]) -> str:
    """The reference UI graph, edited in place by ``edit``, written to path."""
    graph = json.loads(UI_FILE.read_text(encoding="utf-8"))
    edit(graph)
    path.write_text(json.dumps(graph), encoding="utf-8")
    return str(path)


def _node(graph: dict[str, Any], nid: int) -> dict[str, Any]:
    return next(n for n in graph["nodes"] if isinstance(n, dict) and n.get("id") == nid)


def _link(graph: dict[str, Any], lid: int) -> list[Any]:
    return next(link for link in graph["links"] if link[0] == lid)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(path: Path, *chunks: bytes) -> str:
    """An 8×8 grey PNG with ``chunks`` (from ``_chunk``) before its pixels."""
    ihdr = _chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 0))
    idat = _chunk(b"IDAT", zlib.compress(b"\0" * 9 * 8))
    path.write_bytes(PNG_SIGNATURE + ihdr + b"".join(chunks) + idat + _chunk(b"IEND", b""))
    return str(path)


def _validate(build: Callable[[Path], str]) -> Callable[[Path], list[str]]:
    return lambda d: ["workflow", "validate", build(d)]


def _import(build: Callable[[Path], str]) -> Callable[[Path], list[str]]:
    return lambda d: ["workflow", "import", build(d)]


def _deleted(*nodes: str) -> Callable[[dict[str, Any]], None]:
    def edit(graph: dict[str, Any]) -> None:
        for node in nodes:
            del graph[node]

    return edit


def _reroute_cycle(graph: dict[str, Any]) -> None:
    """Reroute 351 (VAELoader → VAEDecode 306) fed by a new Reroute 352, which 351 feeds."""
    graph["nodes"].append({"id": 352, "type": "Reroute", "mode": 0,
                           "inputs": [{"name": "", "type": "*", "link": 90}],
                           "outputs": [{"name": "", "type": "VAE", "links": [91]}]})  # fmt: skip
    _node(graph, 351)["inputs"][0]["link"] = 91
    graph["links"] += [[90, 351, 0, 352, 0, "VAE"], [91, 352, 0, 351, 0, "VAE"]]


def _links_shifted(graph: dict[str, Any]) -> None:
    for link in graph["links"]:
        link[0] += 100000


def _dict_links(graph: dict[str, Any], drop: str) -> None:
    """Schema-1 links (objects), with field ``drop`` removed from link 25."""
    keys = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
    graph["links"] = [dict(zip(keys, link, strict=True)) for link in graph["links"]]
    del next(link for link in graph["links"] if link["id"] == 25)[drop]


def _without(graph: dict[str, Any], nid: int, key: str) -> None:
    del _node(graph, nid)[key]


def _input_without_name(graph: dict[str, Any]) -> None:
    del _node(graph, 276)["inputs"][3]["name"]


def _a_string_node(graph: dict[str, Any]) -> None:
    graph["nodes"][4] = "PrimitiveString"


def _slot(graph: dict[str, Any]) -> None:
    _link(graph, 25)[2] = "x"


def _inputs_a_list(graph: dict[str, Any]) -> None:
    graph["276"]["inputs"] = list(graph["276"]["inputs"].items())


def _latent_cycle(graph: dict[str, Any]) -> None:
    """The first sampler (316) takes its latent from the upscale of the second's (276)."""
    graph["316"]["inputs"]["latent_image"] = ["303", 0]


def _primitive_cycle(graph: dict[str, Any]) -> None:
    graph["232"]["inputs"]["value"] = ["340", 0]
    graph["340"]["inputs"]["value"] = ["232", 0]


def _model_cycle(graph: dict[str, Any]) -> None:
    graph["270"]["inputs"]["model"] = ["274", 0]  # LoraLoader ← AuraFlow ← LoraLoader


def _unknown_class(graph: dict[str, Any]) -> None:
    graph["324"]["class_type"] = "AlignYourStepsScheduler"


def _prompt_png(path: Path, text: bytes, kind: bytes = b"tEXt") -> str:
    """A PNG whose 'prompt' chunk holds ``text`` (tEXt as is, zTXt compressed)."""
    if kind == b"zTXt":
        return _png(path, _chunk(b"zTXt", b"prompt\0\0" + zlib.compress(text, 9)))
    return _png(path, _chunk(kind, b"prompt\0" + text))


def _api_bytes() -> bytes:
    return API_FILE.read_bytes()


# ---- the catalogue -------------------------------------------------------------------------------

WF = "{d}/w.yaml"
WORKFLOW_HINT = "zimage-trt workflow import {d}/g.json -o workflow.yaml"

CASES: dict[str, Case] = {
    # ---- workflow YAML files (workflow validate) ----
    "15 workflow validate: malformed YAML": (
        _validate(lambda d: _text(d / "w.yaml", "name: x\nstages:\n  - a: b\n  c: [\n")),
        f"{WF}:4: not valid YAML: expected <block end>, but found '?' (column 3; while parsing "
        "a block collection from line 3)",
        2,
    ),
    "15 workflow validate: a tab as indentation": (
        _validate(lambda d: _text(d / "w.yaml", "name: x\n\tstages: []\n")),
        f"{WF}:2: not valid YAML: found character '\\t' that cannot start any token (column 1)",
        2,
    ),
    "15 workflow validate: a NUL byte": (
        _validate(lambda d: _text(d / "w.yaml", "name: x\nstages: a\0b\n")),
        f"{WF}:2: not valid YAML: unacceptable character #x0000: special characters are not "
        "allowed",
        2,
    ),
    "16 workflow validate: !!python/object/apply:os.system": (
        _validate(
            lambda d: _text(
                d / "w.yaml", f"name: !!python/object/apply:os.system ['touch {d}/MARKER']\n"
            )
        ),
        f"{WF}:1: not valid YAML: could not determine a constructor for the tag "
        "'tag:yaml.org,2002:python/object/apply:os.system' (column 7)",
        2,
    ),
    "16 workflow validate: !!python/object/new:subprocess.Popen": (
        _validate(
            lambda d: _text(
                d / "w.yaml",
                "name: x\nstages: !!python/object/new:subprocess.Popen "
                f"[['touch', '{d}/MARKER']]\n",
            )
        ),
        f"{WF}:2: not valid YAML: could not determine a constructor for the tag "
        "'tag:yaml.org,2002:python/object/new:subprocess.Popen' (column 9)",
        2,
    ),
    "17 workflow validate: billion laughs": (
        _validate(
            lambda d: _text(
                d / "w.yaml",
                "a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
                + "".join(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 10))
                + "stages: *a9\n",
            )
        ),
        f"{WF}: 19 invalid field(s)\n"
        + "".join(
            f"  stages.{i}: Input should be a valid dictionary or instance of Stage\n"
            for i in range(9)
        )
        + "".join(f"  a{i}: Extra inputs are not permitted\n" for i in range(10)).rstrip("\n"),
        2,
    ),
    "17 workflow validate: a top-level list": (
        _validate(lambda d: _text(d / "w.yaml", "- name: x\n- stages: []\n")),
        f"{WF}: expected a mapping at the top level, got list",
        2,
    ),
    "17 workflow validate: an empty file": (
        _validate(lambda d: _text(d / "w.yaml", "")),
        f"{WF}: expected a mapping at the top level, got NoneType",
        2,
    ),
    "17 workflow validate: an unknown key": (
        _validate(lambda d: _yaml(d / "w.yaml", {"stages.0.colour": "red"})),
        f"{WF}: 1 invalid field(s)\n  stages.0.colour: Extra inputs are not permitted (got 'red')",
        2,
    ),
    "17 workflow validate: stages []": (
        _validate(lambda d: _yaml(d / "w.yaml", {"stages": []})),
        f"{WF}: 1 invalid field(s)\n  stages: List should have at least 1 item after "
        "validation, not 0",
        2,
    ),
    "18 workflow validate: invalid UTF-8": (
        _validate(lambda d: _text(d / "w.yaml", b"name: x\nstages: \xff\n")),
        f"{WF}:2: not UTF-8 text (byte 0xff at offset 16: invalid start byte)",
        2,
    ),
    "18 workflow validate: a truncated UTF-8 sequence": (
        _validate(lambda d: _text(d / "w.yaml", "name: x\n\nprompts: {positive: é".encode()[:-1])),
        f"{WF}:3: not UTF-8 text (byte 0xc3 at offset 29: unexpected end of data)",
        2,
    ),
    "120 generate -w a ComfyUI API graph": (
        lambda d: [
            "generate",
            "--model",
            "tiny",
            "--out",
            str(d / "out"),
            "-w",
            _text(d / "g.json", _api_bytes()),
        ],
        "{d}/g.json: 30 invalid field(s)\n  stages: Field required\n"
        + "".join(
            f"  {node}: Extra inputs are not permitted\n"
            for node in json.loads(API_FILE.read_text(encoding="utf-8"))
        )
        + "{d}/g.json is a ComfyUI graph (API format), not a zimage-trt workflow; import it "
        f"first: {WORKFLOW_HINT}",
        2,
    ),
    "120 workflow validate: a ComfyUI UI graph": (
        _validate(lambda d: _text(d / "g.json", UI_FILE.read_bytes())),
        "{d}/g.json: 11 invalid field(s)\n  stages: Field required\n"
        "  id: Extra inputs are not permitted (got '6d1b7c4e-2a51-4f0e-9a0c-121101000000')\n"
        "  revision: Extra inputs are not permitted (got 0)\n"
        "  last_node_id: Extra inputs are not permitted (got 351)\n"
        "  last_link_id: Extra inputs are not permitted (got 42)\n"
        + "".join(
            f"  {key}: Extra inputs are not permitted\n"
            for key in ("nodes", "links", "groups", "config", "extra")
        )
        + "  version: Extra inputs are not permitted (got 0.4)\n"
        "{d}/g.json is a ComfyUI graph (UI format), not a zimage-trt workflow; import it "
        f"first: {WORKFLOW_HINT}",
        2,
    ),
    "121 workflow validate: a ComfyUI PNG": (
        _validate(lambda d: _prompt_png(d / "ComfyUI_00001_.png", _api_bytes())),
        "{d}/ComfyUI_00001_.png is a PNG image, not a workflow YAML file; to use the ComfyUI "
        "graph saved in it, import it first: zimage-trt workflow import "
        "{d}/ComfyUI_00001_.png -o workflow.yaml",
        2,
    ),
    # ---- ComfyUI graphs (workflow import) ----
    "29 workflow import: the VAELoader deleted": (
        _import(lambda d: _api(d / "g.json", _deleted("17"))),
        "node 306 (class 'VAEDecode'): input 'vae' links to node 17, which is not in the graph",
        2,
    ),
    "29 workflow import: the first sampler deleted": (
        _import(lambda d: _api(d / "g.json", _deleted("316"))),
        "node 337 (class 'VAEDecode'): input 'samples' links to node 316, which is not in the "
        "graph",
        2,
    ),
    "30 workflow import: a link to output 7 of a sampler": (
        _import(lambda d: _api(d / "g.json", _inputs(n337={"samples": ["316", 7]}))),
        "node 337 (class 'VAEDecode'): input 'samples' takes output 7 of node 316 (class "
        "'SamplerCustom'), which has 2 outputs (output, denoised_output)",
        2,
    ),
    "30 workflow import: a link to output 1 of a KSampler": (
        _import(lambda d: _api(d / "g.json", _inputs(n309={"samples": ["276", 1]}))),
        "node 309 (class 'VAEDecode'): input 'samples' takes output 1 of node 276 (class "
        "'KSampler'), which has 1 output (LATENT)",
        2,
    ),
    "30 workflow import: UI: a dangling link id": (
        _import(lambda d: _ui(d / "g.json", lambda g: _node(g, 325)["inputs"][5].update(link=999))),
        "node 325 (class 'SamplerCustom') has no input 'latent_image' (missing or not connected)",
        2,
    ),
    "31 workflow import: an unknown class in the chain": (
        _import(lambda d: _api(d / "g.json", _unknown_class)),
        "node 324 (class 'AlignYourStepsScheduler') is not supported; supported classes: "
        + ", ".join(SUPPORTED),
        2,
    ),
    "32 workflow import: a LoraLoader model-chain cycle": (
        _import(lambda d: _api(d / "g.json", _model_cycle)),
        "node 270 (class 'LoraLoader'): the model chain loops back to itself; nodes 270 → 274 → "
        "270 form a cycle",
        2,
    ),
    "33 workflow import: sampler latents forming a cycle": (
        _import(lambda d: _api(d / "g.json", _latent_cycle)),
        "the latents of sampler nodes 276 → 316 → 276 form a cycle (each takes its latent_image "
        "from the one before); the first stage needs an empty latent (EmptySD3LatentImage)",
        2,
    ),
    "34 workflow import: two PrimitiveStrings feeding each other": (
        _import(lambda d: _api(d / "g.json", _primitive_cycle)),
        "node 340 (class 'PrimitiveStringMultiline'): input 'value' links back to node 232; "
        "nodes 232 → 340 → 232 form a cycle",
        2,
    ),
    "34 workflow import: a StringConcatenate feeding itself": (
        _import(lambda d: _api(d / "g.json", _inputs(n341={"string_b": ["341", 0]}))),
        "node 341 (class 'StringConcatenate'): input 'string_b' links back to node 341; nodes "
        "341 → 341 form a cycle",
        2,
    ),
    "35 workflow import: UI: two Reroutes in a cycle": (
        _import(lambda d: _ui(d / "g.json", _reroute_cycle)),
        "node 306 (class 'VAEDecode'): input 'vae' passes through nodes 351 → 352 → 351, which "
        "form a cycle",
        2,
    ),
    "36 workflow import: UI: every link id off by 100000": (
        _import(lambda d: _ui(d / "g.json", _links_shifted)),
        "node 307 (class 'SaveImage') has no input 'images' (missing or not connected)",
        2,
    ),
    "37 workflow import: UI: a node without id": (
        _import(lambda d: _ui(d / "g.json", lambda g: _without(g, 276, "id"))),
        "UI graph: nodes[20] (class 'KSampler') has no 'id'",
        2,
    ),
    "37 workflow import: UI: an input without name": (
        _import(lambda d: _ui(d / "g.json", _input_without_name)),
        "node 276 (class 'KSampler'): inputs[3] has no 'name'; an input slot is named by a string",
        2,
    ),
    "37 workflow import: UI: a dict link without origin_slot": (
        _import(lambda d: _ui(d / "g.json", lambda g: _dict_links(g, "origin_slot"))),
        "link 25 (from node 350 to node 276) has no 'origin_slot'",
        2,
    ),
    "37 workflow import: UI: a node that is a string": (
        _import(lambda d: _ui(d / "g.json", _a_string_node)),
        "UI graph: nodes[4] is 'PrimitiveString', not a node object",
        2,
    ),
    "37 workflow import: API: inputs is a list": (
        _import(lambda d: _api(d / "g.json", _inputs_a_list)),
        "node 276 (class 'KSampler'): 'inputs' must be a mapping of input names to values, got "
        "a list",
        2,
    ),
    "38 workflow import: UI: link slot 'x'": (
        _import(lambda d: _ui(d / "g.json", _slot)),
        "link 25 (from node 350 to node 276): origin slot 'x' is not a slot number",
        2,
    ),
    "39 workflow import: width 100000": (
        _import(lambda d: _api(d / "g.json", _inputs(n300={"width": 100000}))),
        "imported graph 'g': 1 invalid field(s)\n  stages.0.latent.width: Input should be less "
        "than or equal to 16384 (got 100000)",
        2,
    ),
    "39 workflow import: cfg NaN": (
        _import(lambda d: _api(d / "g.json", _inputs(n316={"cfg": float("nan")}))),
        "imported graph 'g': 1 invalid field(s)\n  stages.0.cfg: Input should be less than "
        "or equal to 100 (got nan)",
        2,
    ),
    "39 workflow import: seed -1": (
        _import(lambda d: _api(d / "g.json", _inputs(n276={"seed": -1}))),
        "imported graph 'g': 1 invalid field(s)\n  stages.1.seed: Input should be greater than "
        "or equal to 0 (got -1)",
        2,
    ),
    "39 workflow import: steps -5": (
        _import(lambda d: _api(d / "g.json", _inputs(n324={"steps": -5}))),
        "imported graph 'g': 1 invalid field(s)\n  stages.2.scheduler.steps: Input should be "
        "greater than or equal to 1 (got -5)",
        2,
    ),
    "39 workflow import: prefix ../../etc/x": (
        _import(lambda d: _api(d / "g.json", _inputs(n307={"filename_prefix": "../../etc/x"}))),
        "imported graph 'g': 1 invalid field(s)\n  output.prefix: prefix '../../etc/x' must be a "
        "relative path inside the output folder (no leading '/', no '..') (got '../../etc/x')",
        2,
    ),
    "39 workflow import: prefix /etc/x": (
        _import(lambda d: _api(d / "g.json", _inputs(n307={"filename_prefix": "/etc/x"}))),
        "imported graph 'g': 1 invalid field(s)\n  output.prefix: prefix '/etc/x' must be a "
        "relative path inside the output folder (no leading '/', no '..') (got '/etc/x')",
        2,
    ),
    "39 workflow import: cfg 1e400 (an integer past the float range)": (
        _import(lambda d: _api(d / "g.json", _inputs(n316={"cfg": 10**400}))),
        "node 316 (class 'SamplerCustom'): input 'cfg' must be a number in the float range, got "
        + repr(10**400)[:199]
        + "…",
        2,
    ),
    # ---- PNG inputs (workflow import) ----
    "41 workflow import: a text file named .png": (
        _import(lambda d: _text(d / "text.png", "hello, not a graph\n")),
        "{d}/text.png: not valid JSON: Expecting value: line 1 column 1 (char 0)",
        2,
    ),
    "42 workflow import: JPEG bytes named .png": (
        _import(lambda d: _text(d / "photo.png", b"\xff\xd8\xff\xe0\0\x10JFIF\0" + b"\0" * 64)),
        "{d}/photo.png is neither a PNG nor UTF-8 JSON: not a ComfyUI graph",
        2,
    ),
    "47 workflow import: a zTXt bomb": (
        _import(lambda d: _prompt_png(d / "bomb.png", b" " * (MAX_TEXT_BYTES + 1), b"zTXt")),
        "{d}/bomb.png is not a readable PNG (its zTXt chunk 'prompt' inflates to more than "
        f"{MAX_TEXT_BYTES} bytes (a decompression bomb?))",
        3,
    ),
    "48 workflow import: a 2 MB tEXt prompt chunk": (
        _import(
            lambda d: _prompt_png(
                d / "big.png",
                json.dumps(
                    {"1": {"class_type": "Note", "inputs": {"text": "x" * 2_000_000}}}
                ).encode(),
            )
        ),
        "the graph has no SaveImage or PreviewImage node; nothing to run",
        2,
    ),
    "49 workflow import: a prompt chunk cut in half": (
        _import(lambda d: _prompt_png(d / "cut.png", _api_bytes()[: len(_api_bytes()) // 2])),
        "{d}/cut.png (prompt chunk): not valid JSON: Unterminated string starting at: "
        "line 104 column 15 (char 1860)",
        2,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_refused(case: str, refused: Callable[[Case], str]) -> None:
    refused(CASES[case])


@pytest.mark.parametrize("tag", ["python/object/apply:os.system", "python/object/new:os.system"])
def test_16_a_python_tag_constructs_nothing(tag: str, tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    path = _text(tmp_path / "w.yaml", f"name: !!{tag} ['touch {marker}']\nstages: []\n")
    assert main(["workflow", "validate", path]) == 2
    assert not marker.exists()


def test_31_an_unknown_class_off_the_chain_is_ignored(tmp_path: Path) -> None:
    def edit(graph: dict[str, Any]) -> None:
        graph["900"] = {"class_type": "SomeCustomNode", "inputs": {"x": ["16", 0]}}

    path = _api(tmp_path / "g.json", edit)
    assert main(["workflow", "import", path, "-o", str(tmp_path / "w.yaml")]) == 0
    assert load_workflow(tmp_path / "w.yaml").stages == load_workflow("zimage-121101").stages
