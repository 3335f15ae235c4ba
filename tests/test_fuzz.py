"""Property-based fuzzing (hypothesis) of the three readers of untrusted workflow inputs: the
workflow YAML loader (what ``workflow validate`` runs), the ComfyUI importer (API and UI graphs)
and the PNG metadata reader (``workflow import`` and ``reproduce``).

The property: the only exceptions are the project's own (``ZimageError`` subclasses, each with
its exit code), and memory stays bounded: under ``MEMORY_LIMIT`` of Python allocations per
example (tracemalloc peak) and of growth of the process's peak RSS over the test (which also
sees torch and numpy buffers; the audit's ``denoise: 1e-9`` once took 23 GB).

Derandomized (a fixed seed per test, no example database), so CI sees the same examples every
run. Example counts:

- ``test_yaml_loader_on_arbitrary_text``: 150 (random text and bytes, YAML-looking or not)
- ``test_yaml_loader_on_random_documents``: 150 (random YAML mappings/lists/scalars)
- ``test_yaml_loader_on_mutated_workflows``: 300 (1–4 random edits of three valid workflows)
- ``test_importer_on_mutated_api_graphs``: 300 (1–4 edits of the reference API graph)
- ``test_importer_on_mutated_ui_graphs``: 300 (1–4 edits of the reference UI graph)
- ``test_importer_on_random_json``: 150 (random JSON documents as graph files)
- ``test_png_reader_on_mutated_pngs``: 250 (byte flips, truncations, chunk edits of a ComfyUI
  and a zimage-trt PNG, through ``workflow import``'s and ``reproduce``'s readers)
- ``test_png_reader_on_random_bytes``: 100 (random bytes, with and without a PNG signature)
"""

from __future__ import annotations

import copy
import json
import resource
import struct
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zimage_trt.errors import ZimageError
from zimage_trt.workflow import load_workflow
from zimage_trt.workflow.comfy_import import import_graph
from zimage_trt.workflow.summary import stage_table

DATA = Path(__file__).parent / "data"
API_GRAPH = json.loads((DATA / "comfy_api" / "zimage-121101.json").read_text(encoding="utf-8"))
UI_GRAPH = json.loads((DATA / "comfy_ui" / "zimage-121101.json").read_text(encoding="utf-8"))
MEMORY_LIMIT = 200 * 1024 * 1024  # bytes, per example


def _fuzz(examples: int) -> Callable[[Callable[..., None]], Callable[..., None]]:
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class Bounded:
    """Runs one example: only project errors escape, memory stays under MEMORY_LIMIT."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.rss = _peak_rss()

    def file(self, name: str, data: bytes) -> Path:
        path = self.folder / name
        path.write_bytes(data)
        return path

    def __call__(self, call: Callable[[], object], allowed: type[Exception] = ZimageError) -> None:
        tracemalloc.start()  # only while the example runs: hypothesis itself is not traced
        try:
            call()
        except allowed:
            pass  # the property: a project error (the CLI prints it, exit code 2–6)
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert peak < MEMORY_LIMIT, f"{peak / 2**20:.0f} MiB of Python allocations"
        grown = _peak_rss() - self.rss
        assert grown < MEMORY_LIMIT, f"the peak RSS grew by {grown / 2**20:.0f} MiB"


@pytest.fixture(scope="module")
def bounded(tmp_path_factory: pytest.TempPathFactory) -> Bounded:
    if tracemalloc.is_tracing():
        pytest.skip("tracemalloc is already tracing (python -X tracemalloc): peaks would mix")
    folder = tmp_path_factory.mktemp("fuzz")
    _warm_up(folder)  # imports and first-use caches: the RSS baseline is taken after them
    return Bounded(folder)


def _warm_up(folder: Path) -> None:
    from zimage_trt.runtime.reproduce import workflow_from_image

    for wf in WORKFLOWS:
        (folder / "w.yaml").write_text(yaml.safe_dump(wf))
        _validate(folder / "w.yaml")
    import_graph(copy.deepcopy(API_GRAPH))
    import_graph(copy.deepcopy(UI_GRAPH))
    for png in PNGS:
        (folder / "p.png").write_bytes(png)
        (import_graph if png is not PNGS[2] else workflow_from_image)(folder / "p.png")


# ---- values ----

EDGE_NUMBERS = [0, -1, 1, 2, 16, 64, 100, 10000, 100000, 2**31, 2**63, 2**64 - 1, 2**64, 10**30,
                10**400, -(10**30), 0.5, -0.0, 1e-9, 1e-300, 5e-324, 1e308, 1e300, 7.5, 16.0,
                float("nan"), float("inf"), float("-inf")]  # fmt: skip
EDGE_STRINGS = ["", " ", "empty", "upscale", "image", "euler", "euler_ancestral", "dpmpp_sde",
                "beta", "karras", "simple", "flow_match_euler", "flow_match_linear", "disabled",
                "center", "nearest-exact", "bislerp", "png", "jpg", "auto", "cpu", "cuda", "../x",
                "/abs/x", "%date:..%/x", "%date:yyyy%", "a\0b", "x" * 300, "é✓🎨", "NaN",
                "1e-9", "true", "null", "*", "0"]  # fmt: skip
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(EDGE_NUMBERS),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(EDGE_STRINGS),
    st.text(max_size=12),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


# ---- mutating nested data ----


def _paths(data: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every key path into nested dicts and lists, parents before children."""
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(
        data, list) else ()  # fmt: skip
    for key, child in items:
        yield (*prefix, key)
        yield from _paths(child, (*prefix, key))


def _parent(data: Any, path: tuple[Any, ...]) -> Any:
    for key in path[:-1]:
        data = data[key]
    return data


@st.composite
def mutated(draw: st.DrawFn, base: Any, keys: list[str]) -> Any:
    """``base`` after 1–4 random edits: a value replaced (by a random value, or by another
    value found in ``base``), a key or list item deleted, a key added (a random or a known
    name), a list item duplicated."""
    data = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 4))):
        paths = list(_paths(data))
        if not paths:
            break
        leaves = [p for p in paths if not isinstance(_parent(data, (*p, None)), dict | list)]
        path = draw(st.sampled_from(leaves if leaves and draw(st.booleans()) else paths))
        parent, key = _parent(data, path), path[-1]
        action = draw(st.sampled_from(["replace", "replace", "reuse", "delete", "add", "copy"]))
        if action == "replace":
            parent[key] = draw(values)
        elif action == "reuse":
            parent[key] = copy.deepcopy(_parent(data, (*draw(st.sampled_from(paths)), None)))
        elif action == "delete":
            del parent[key]
        elif action == "add" and isinstance(parent, dict):
            name = draw(st.sampled_from(keys) | st.text(max_size=8))
            parent[name] = draw(values)
        elif action == "copy" and isinstance(parent, list):
            parent.append(copy.deepcopy(parent[key]))
    return data


def _all_keys(data: Any) -> list[str]:
    return sorted({str(p[-1]) for p in _paths(data) if isinstance(p[-1], str)})


# ---- (a) the workflow YAML loader ----


def _validate(path: Path) -> None:
    """What ``workflow validate`` runs."""
    stage_table(load_workflow(path))


def _cheap() -> dict[str, Any]:
    return {"name": "cheap",
            "stages": [{"latent": {"source": "empty", "width": 64, "height": 64},
                        "sampler": {"name": "euler"}, "scheduler": {"name": "simple", "steps": 2},
                        "seed": 1}],
            "output": {"prefix": "cheap"}}  # fmt: skip


def _lora_cache() -> dict[str, Any]:
    data = _cheap()
    data["models"] = {"loras": [{"path": "l.safetensors", "strength": 0.8, "trigger": "t"}]}
    data["prompts"] = {"positive": "a cat", "negative": "blurry"}
    data["stages"][0]["cache"] = {"threshold": 0.2, "start_percent": 0.1}
    data["stages"][0]["scheduler"] = {"name": "beta", "steps": 4, "denoise": 0.5,
                                      "options": {"alpha": 0.6, "beta": 0.6}}  # fmt: skip
    data["stages"].append({"latent": {"source": "upscale", "scale": 2.0},
                           "sampler": {"name": "dpmpp_sde", "r": 0.4},
                           "scheduler": {"name": "flow_match_euler", "steps": 3,
                                         "options": {"shift": 3.0}}})  # fmt: skip
    return data


WORKFLOWS = [load_workflow("zimage-121101").to_dict(), _cheap(), _lora_cache()]
WORKFLOW_KEYS = sorted({k for wf in WORKFLOWS for k in _all_keys(wf)} | {
    "alpha", "beta", "rho", "sigma_min", "sigma_max", "mu", "start_at_step", "end_at_step",
    "num_train_timesteps", "time_shift_type", "use_karras_sigmas", "shift_terminal"})  # fmt: skip

yaml_like = st.lists(
    st.sampled_from(["name: x\n", "stages:\n", "  - latent: {source: empty}\n", "- ", ": ",
                     "&a ", "*a ", "!!python/object:os.system ", "!!binary ", "[", "]", "{", "}",
                     "'", '"', "\t", "\n", "\0", "\ufeff", "%YAML 1.1\n", "---\n", "...\n",
                     "? ", "|\n", ">-\n", "#", "1e400", "0x1F", "2001-13-45", "<<: *a\n"])
    | st.text(max_size=10),
    max_size=30,
).map("".join)  # fmt: skip


@_fuzz(150)
@given(text=st.text(max_size=300) | yaml_like, raw=st.none() | st.binary(max_size=200))
def test_yaml_loader_on_arbitrary_text(bounded: Bounded, text: str, raw: bytes | None) -> None:
    data = text.encode("utf-8", "surrogatepass") if raw is None else raw
    bounded(lambda: _validate(bounded.file("w.yaml", data)))


@_fuzz(150)
@given(data=values)
def test_yaml_loader_on_random_documents(bounded: Bounded, data: Any) -> None:
    text = yaml.safe_dump(data, allow_unicode=True)
    bounded(lambda: _validate(bounded.file("w.yaml", text.encode("utf-8", "surrogatepass"))))


@_fuzz(300)
@given(data=st.sampled_from(WORKFLOWS).flatmap(lambda wf: mutated(wf, WORKFLOW_KEYS)))
def test_yaml_loader_on_mutated_workflows(bounded: Bounded, data: Any) -> None:
    text = yaml.safe_dump(data, allow_unicode=True, sort_keys=False)
    bounded(lambda: _validate(bounded.file("w.yaml", text.encode("utf-8", "surrogatepass"))))


# ---- (b) the ComfyUI importer ----

link_values = st.one_of(
    st.tuples(st.sampled_from([*API_GRAPH, "999", "", "x"]), st.sampled_from([0, 1, 2, 7, -1]))
    .map(list),
    st.sampled_from([["16", "x"], ["16", 0.5], ["16", True], ["16"], ["16", 0, 1], [None, 0],
                     [["16"], 0], [{"a": 1}, 0], [10**400, 0]]),
)  # fmt: skip
graph_values = values | link_values
API_KEYS = [*_all_keys(API_GRAPH), "class_type", "inputs", "_meta", "prompt", "nodes"]
UI_KEYS = [*_all_keys(UI_GRAPH), "origin_slot", "origin_id", "target_id", "groupNodes"]


@st.composite
def mutated_graph(draw: st.DrawFn, base: Any, keys: list[str]) -> Any:
    """``mutated`` with link-shaped values among the replacements."""
    data = draw(mutated(base, keys))
    for _ in range(draw(st.integers(0, 2))):
        paths = list(_paths(data))
        if paths:
            path = draw(st.sampled_from(paths))
            _parent(data, path)[path[-1]] = draw(graph_values)
    return data


@_fuzz(300)
@given(graph=mutated_graph(API_GRAPH, API_KEYS))
def test_importer_on_mutated_api_graphs(bounded: Bounded, graph: Any) -> None:
    bounded(lambda: import_graph(graph) if isinstance(graph, dict) else None)


@_fuzz(300)
@given(graph=mutated_graph(UI_GRAPH, UI_KEYS))
def test_importer_on_mutated_ui_graphs(bounded: Bounded, graph: Any) -> None:
    bounded(lambda: import_graph(graph) if isinstance(graph, dict) else None)


@_fuzz(150)
@given(data=values | mutated_graph(API_GRAPH, API_KEYS) | st.text(max_size=100))
def test_importer_on_random_json(bounded: Bounded, data: Any) -> None:
    text = json.dumps(data) if not isinstance(data, str) else data
    bounded(lambda: import_graph(bounded.file("g.json", text.encode("utf-8", "surrogatepass"))))


# ---- (c) the PNG metadata reader ----


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(*chunks: bytes) -> bytes:
    ihdr = _chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 0))
    idat = _chunk(b"IDAT", zlib.compress(b"\0" * 9 * 8))
    return b"\x89PNG\r\n\x1a\n" + ihdr + b"".join(chunks) + idat + _chunk(b"IEND", b"")


def _split(png: bytes) -> list[bytes]:
    """The signature, then each whole chunk."""
    parts, pos = [png[:8]], 8
    while pos < len(png):
        length = struct.unpack(">I", png[pos : pos + 4])[0]
        parts.append(png[pos : pos + 12 + length])
        pos += 12 + length
    return parts


def _small_api() -> bytes:
    graph = copy.deepcopy(API_GRAPH)
    graph["340"]["inputs"]["value"] = "a cat"
    return json.dumps(graph).encode()


PNGS = [
    # ComfyUI: prompt as tEXt, workflow as zTXt (the UI graph)
    _png(_chunk(b"tEXt", b"prompt\0" + _small_api()),
         _chunk(b"zTXt", b"workflow\0\0" + zlib.compress(json.dumps(UI_GRAPH).encode()))),
    # an iTXt prompt, compressed, after the image data
    _png()[:-12] + _chunk(b"iTXt", b"prompt\0\1\0en\0\0" + zlib.compress(_small_api()))
    + _chunk(b"IEND", b""),
    # zimage-trt: its workflow as iTXt
    _png(_chunk(b"iTXt", b"zimage-trt.workflow\0\0\0\0\0"
                + yaml.safe_dump(_cheap()).encode())),
]  # fmt: skip


@st.composite
def mutated_png(draw: st.DrawFn) -> bytes:
    """A PNG above after 1–3 edits: bytes flipped, the file cut short, a chunk's data replaced
    (its CRC fixed or not), a length field changed, a chunk added or dropped."""
    parts = _split(draw(st.sampled_from(PNGS)))
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(parts) - 1))
        part = parts[i]
        action = draw(st.sampled_from(["flip", "data", "length", "add", "drop", "cut"]))
        if action == "flip" and part:
            pos = draw(st.integers(0, len(part) - 1))
            part = part[:pos] + bytes([draw(st.integers(0, 255))]) + part[pos + 1 :]
        elif action == "data" and len(part) >= 12:
            kind = part[4:8]
            body = draw(st.binary(max_size=200) | st.just(zlib.compress(b"{" * 100_000)))
            if kind in (b"zTXt", b"iTXt") and b"\0" in part[8:] and draw(st.booleans()):
                head = part[8 : 8 + part[8:].index(b"\0") + (2 if kind == b"zTXt" else 1)]
                body = head + body
            part = _chunk(kind, body) if draw(st.booleans()) else part[:8] + body + part[-4:]
        elif action == "length" and len(part) >= 12:
            length = draw(
                st.sampled_from([0, 1, 2**31 - 1, 2**31, 2**32 - 1]) | st.integers(0, 500)
            )
            part = struct.pack(">I", length) + part[4:]
        elif action == "add":
            kind = draw(st.sampled_from([b"tEXt", b"zTXt", b"iTXt", b"IDAT", b"IEND", b"ab\0c"]))
            parts.insert(i, _chunk(kind, draw(st.binary(max_size=100))))
        elif action == "drop" and len(parts) > 1:
            part = b""
        elif action == "cut":
            part = part[: draw(st.integers(0, len(part)))]
        parts[i] = part
    return b"".join(parts)


def _read_png(bounded: Bounded, data: bytes) -> None:
    from zimage_trt.runtime.reproduce import workflow_from_image

    path = bounded.file("p.png", data)
    bounded(lambda: import_graph(path))  # workflow import
    bounded(lambda: workflow_from_image(path))  # reproduce, up to the render


@_fuzz(250)
@given(data=mutated_png())
def test_png_reader_on_mutated_pngs(bounded: Bounded, data: bytes) -> None:
    _read_png(bounded, data)


@_fuzz(100)
@given(data=st.binary(max_size=300), signed=st.booleans())
def test_png_reader_on_random_bytes(bounded: Bounded, data: bytes, signed: bool) -> None:
    _read_png(bounded, (b"\x89PNG\r\n\x1a\n" if signed else b"") + data)


def test_the_reference_inputs_pass_unchanged(bounded: Bounded) -> None:
    """The fuzzers start from inputs that import and validate: their edits make the errors."""
    for wf in WORKFLOWS:
        assert load_workflow(bounded.file("w.yaml", yaml.safe_dump(wf).encode())).to_dict() == (
            load_workflow(bounded.file("w.yaml", yaml.safe_dump(wf).encode())).to_dict()
        )
    assert import_graph(copy.deepcopy(API_GRAPH)).name == "imported"
    assert import_graph(copy.deepcopy(UI_GRAPH)).name == "imported"
    for png in PNGS[:2]:
        assert import_graph(bounded.file("p.png", png)).name == "p"
    from zimage_trt.runtime.reproduce import workflow_from_image

    assert workflow_from_image(bounded.file("p.png", PNGS[2]))[1] == "zimage-trt workflow"
