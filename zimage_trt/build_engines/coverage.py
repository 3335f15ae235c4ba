"""Will TensorRT's ONNX parser take this graph? An op and data-type coverage check without TensorRT.

`check_tensorrt_coverage` walks a shape-inferred copy of an ONNX model (model-local functions
inlined, the subgraphs of If/Loop/Scan included) and returns a `CoverageReport`: every distinct
(op, dtype) pair with its count, and every `CoverageIssue` the parser would hit:

* ops outside its supported list (`trt_onnx_ops.txt`: onnx-tensorrt's operators.md, TensorRT
  10.15) and ops of any domain but the ONNX one (custom ops need a plugin);
* tensor types it lacks: complex types, DOUBLE (silently cast down to FLOAT: our graphs must not
  rely on float64), UINT16/32/64, INT16, STRING, FLOAT8 other than E4M3FN, UINT8 inside the
  network;
* the per-op restrictions of the list's header: BFLOAT16 Resize, Resize modes and antialias,
  computed Reduce*/Squeeze/Unsqueeze axes, RMSNormalization/RotaryEmbedding/Attention types,
  Attention's unsupported inputs, outputs and attributes, used LayerNormalization Mean/InvStdDev,
  unsorted TopK, ScatterND reductions; and a default-domain opset outside 9..24.

A node's dtype is the element type of its first input of a numeric type (float or integer,
complex and DOUBLE included), else of its first typed output, else of its first typed input
(BOOL or STRING), else "UNKNOWN": so Where(cond, x, y) counts as x's type, Not as BOOL.
A tensor of a bad type is reported once, at the first node that touches it (its producer, or its
first consumer for graph inputs and initializers). "Constant" axes are initializers and Constant
outputs only: this check folds nothing, so even Identity(initializer) counts as computed.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import onnx
import onnx.inliner
from onnx import TensorProto, helper

from zimage_trt.errors import InputError
from zimage_trt.text_table import text_table

OPS_FILE = "trt_onnx_ops.txt"
OPSET_RANGE = (9, 24)  # the ops file's header: TensorRT 10.15 parses these default-domain opsets
ONNX_DOMAINS = ("", "ai.onnx")
PROTOBUF_LIMIT = 2**31 - 1  # bytes; larger models only exist as a file with external data
SUMMARY_PROBLEMS = 3  # how many problems `CoverageReport.summary` spells out

_T = TensorProto
SUPPORTED_TYPES = frozenset(
    {
        _T.FLOAT,
        _T.FLOAT16,
        _T.BFLOAT16,
        _T.INT32,
        _T.INT64,
        _T.INT8,
        _T.INT4,
        _T.FLOAT8E4M3FN,
        _T.FLOAT4E2M1,
        _T.BOOL,
    }
)
COMPLEX_TYPES = frozenset({_T.COMPLEX64, _T.COMPLEX128})
NON_NUMERIC_TYPES = frozenset({_T.UNDEFINED, _T.BOOL, _T.STRING})
FLOAT_TYPES = frozenset({_T.FLOAT, _T.FLOAT16, _T.BFLOAT16})
FLOAT_ONLY_OPS = frozenset({"Attention", "RMSNormalization", "RotaryEmbedding"})
CONSTANT_AXES_OPS = frozenset({"Squeeze", "Unsqueeze"})  # and every Reduce*
RESIZE_MODES = ("nearest", "linear")
# Attention's optional inputs/outputs (by position) and attributes the parser rejects.
ATTENTION_INPUTS = {4: "past_key", 5: "past_value", 6: "nonpad_kv_seqlen"}
ATTENTION_OUTPUTS = {1: "present_key", 2: "present_value", 3: "qk_matmul_output"}
ATTENTION_ATTRS = ("softcap", "qk_matmul_output_mode")


@functools.cache
def load_supported_ops() -> frozenset[str]:
    """The ONNX ops TensorRT's parser supports (packaged `trt_onnx_ops.txt`, comments dropped)."""
    text = resources.files("zimage_trt.build_engines").joinpath(OPS_FILE).read_text("utf-8")
    lines = (line.strip() for line in text.splitlines())
    return frozenset(line for line in lines if line and not line.startswith("#"))


@dataclass(frozen=True)
class CoverageIssue:
    """One thing TensorRT's parser would reject or silently change."""

    op: str  # op type of the node concerned; "(graph)" or "(model)" when there is none
    node: str  # its name ("#k", its position in the walk, when unnamed); "" when there is none
    problem: str  # the full message, naming the node and the bad value


@dataclass
class CoverageReport:
    """Every (op, dtype) pair of a graph with its count, and every problem found."""

    pairs: dict[tuple[str, str], int]
    issues: list[CoverageIssue]
    issues_per_pair: dict[tuple[str, str], int] = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        return not self.issues

    def format_table(self) -> str:
        """A fixed-width table: op, dtype, count, status ("ok" or how many issues)."""
        rows = [
            (op, dtype, str(count), _status(self.issues_per_pair.get((op, dtype), 0)))
            for (op, dtype), count in sorted(self.pairs.items())
        ]
        header = ("op", "dtype", "count", "status")
        return text_table([header, *rows], right=(2,), rule=True)

    def summary(self) -> str:
        """One line: the counts when all is well, else the problems (the first few spelled out)."""
        if self.ok:
            return (
                f"{sum(self.pairs.values())} ops, {len(self.pairs)} (op, dtype) pairs, "
                "all parseable by TensorRT"
            )
        count = len(self.issues)
        shown = "; ".join(issue.problem for issue in self.issues[:SUMMARY_PROBLEMS])
        more = f"; … and {count - SUMMARY_PROBLEMS} more" if count > SUMMARY_PROBLEMS else ""
        return f"{count} problem{'s' if count != 1 else ''}: {shown}{more}"


def check_tensorrt_coverage(model: onnx.ModelProto | str | Path) -> CoverageReport:
    """Check an ONNX model (or the path of one; external data is not read) against TensorRT's
    ONNX parser: supported ops, data types and per-op restrictions. The model is not modified."""
    prepared = _prepare(model)
    walk = _Walk(load_supported_ops(), _used_names(prepared.graph))
    walk.opset(prepared)
    walk.graph(prepared.graph, {}, frozenset(), network=True)
    return CoverageReport(dict(walk.pairs), walk.issues, dict(walk.issues_per_pair))


def _prepare(model: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    """A copy with local functions inlined and every inferable type in value_info."""
    if isinstance(model, (str, Path)):
        # Types live in the graph; the weights of a >2 GB model stay on disk.
        model = onnx.load(str(model), load_external_data=False)
    else:
        size = model.ByteSize()
        if size > PROTOBUF_LIMIT:
            raise InputError(
                f"the model is {size / 2**30:.1f} GiB in memory, over protobuf's 2 GiB limit: "
                "save it with external data and pass the .onnx path instead"
            )
    if model.functions:
        model = onnx.inliner.inline_local_functions(model)
    # infer_shapes returns a new model: the caller's is never touched.
    return onnx.shape_inference.infer_shapes(model)


def _used_names(graph: onnx.GraphProto) -> set[str]:
    """Every value some node reads or some graph (the main one or a subgraph) returns."""
    used = {value.name for value in graph.output}
    for node in graph.node:
        used.update(node.input)
        for subgraph in _subgraphs(node):
            used |= _used_names(subgraph)
    return used


def _subgraphs(node: onnx.NodeProto) -> Iterable[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _elem_type(value: onnx.ValueInfoProto) -> int:
    """A value's tensor element type; UNDEFINED for unknown types, sequences and optionals."""
    return value.type.tensor_type.elem_type if value.type.HasField("tensor_type") else 0


def _type_name(elem_type: int) -> str:
    try:
        return TensorProto.DataType.Name(elem_type)
    except ValueError:  # a type newer than this onnx
        return f"type {elem_type}"


def _status(issues: int) -> str:
    return "ok" if issues == 0 else f"{issues} issue{'s' if issues != 1 else ''}"


def _node_dtype(node: onnx.NodeProto, types: dict[str, int]) -> str:
    inputs = [types.get(name, 0) for name in node.input if name]
    outputs = [types.get(name, 0) for name in node.output if name]
    numeric = [t for t in inputs if t not in NON_NUMERIC_TYPES]
    for candidates in (numeric, outputs, inputs):
        known = [t for t in candidates if t]
        if known:
            return _type_name(known[0])
    return "UNKNOWN"


def _type_problem(elem_type: int, network_io: bool) -> str | None:
    """Why TensorRT cannot hold a tensor of this type, or None when it can (or it is unknown)."""
    if elem_type in SUPPORTED_TYPES or elem_type == _T.UNDEFINED:
        return None
    if elem_type in COMPLEX_TYPES:
        return "TensorRT has no complex types (write the math in real cos/sin arithmetic)"
    if elem_type == _T.DOUBLE:
        return "TensorRT casts DOUBLE down to FLOAT, losing the float64 precision"
    if elem_type == _T.UINT8:
        return None if network_io else "TensorRT allows UINT8 only as a network input or output"
    return f"TensorRT has no {_type_name(elem_type)} tensors"


class _Walk:
    """The state of one check: counts and issues, gathered node by node across all graphs."""

    def __init__(self, supported: frozenset[str], used: set[str]) -> None:
        self.supported = supported
        self.used = used
        self.pairs: Counter[tuple[str, str]] = Counter()
        self.issues: list[CoverageIssue] = []
        self.issues_per_pair: Counter[tuple[str, str]] = Counter()
        self.typed: set[str] = set()  # tensors whose type was checked (each is reported once)
        self.position = 0

    def opset(self, model: onnx.ModelProto) -> None:
        low, high = OPSET_RANGE
        for opset in model.opset_import:
            if opset.domain in ONNX_DOMAINS and not low <= opset.version <= high:
                problem = (
                    f"model: ONNX opset {opset.version} is outside {low}..{high}, "
                    "the range TensorRT parses"
                )
                self.issues.append(CoverageIssue("(model)", "", problem))

    def graph(
        self,
        graph: onnx.GraphProto,
        outer: dict[str, int],
        outer_constants: frozenset[str],
        *,
        network: bool,
    ) -> None:
        """Walk one graph; `outer` and `outer_constants` are the enclosing scopes' values."""
        types = dict(outer)
        for value in (*graph.input, *graph.output, *graph.value_info):
            if _elem_type(value):
                types[value.name] = _elem_type(value)
        for tensor in (*graph.initializer, *(sparse.values for sparse in graph.sparse_initializer)):
            types[tensor.name] = tensor.data_type
        constants = set(outer_constants) | {tensor.name for tensor in graph.initializer}
        constants |= {sparse.values.name for sparse in graph.sparse_initializer}
        # Only the main graph's inputs and outputs are network I/O (where UINT8 may appear).
        network_io = {v.name for v in (*graph.input, *graph.output)} if network else set()
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ONNX_DOMAINS:
                constants.update(node.output)
            self.node(node, types, constants, network_io)
            for subgraph in _subgraphs(node):
                self.graph(subgraph, types, frozenset(constants), network=False)
        # Values no node touches, such as an input wired straight to an output.
        for name in (
            *(v.name for v in (*graph.input, *graph.output)),
            *(t.name for t in graph.initializer),
        ):
            self.tensor_type(None, "", "value", name, types, network_io)

    def node(
        self,
        node: onnx.NodeProto,
        types: dict[str, int],
        constants: set[str],
        network_io: set[str],
    ) -> None:
        self.position += 1
        name = node.name or f"#{self.position}"
        label = f"{node.op_type} '{name}'"
        pair = (node.op_type, _node_dtype(node, types))
        self.pairs[pair] += 1
        before = len(self.issues)
        if node.domain not in ONNX_DOMAINS:
            self.add(
                node,
                name,
                f"{label}: op of domain '{node.domain}' is a custom op; "
                "TensorRT parses only ONNX-domain ops without a plugin",
            )
        elif node.op_type not in self.supported:
            self.add(
                node, name, f"{label}: op {node.op_type} is not supported by TensorRT's ONNX parser"
            )
        for role, names in (("input", node.input), ("output", node.output)):
            for value in names:
                self.tensor_type(node, name, role, value, types, network_io)
        if node.domain in ONNX_DOMAINS:
            for problem in _restrictions(node, label, types, constants, self.used):
                self.add(node, name, problem)
        self.issues_per_pair[pair] += len(self.issues) - before

    def tensor_type(
        self,
        node: onnx.NodeProto | None,
        name: str,
        role: str,
        value: str,
        types: dict[str, int],
        network_io: set[str],
    ) -> None:
        if not value or value in self.typed or value not in types:
            return
        self.typed.add(value)
        problem = _type_problem(types[value], value in network_io)
        if problem:
            where = f"{node.op_type} '{name}': {role}" if node else "graph value"
            self.add(node, name, f"{where} '{value}' is {_type_name(types[value])}; {problem}")

    def add(self, node: onnx.NodeProto | None, name: str, problem: str) -> None:
        self.issues.append(CoverageIssue(node.op_type if node else "(graph)", name, problem))


def _restrictions(
    node: onnx.NodeProto, label: str, types: dict[str, int], constants: set[str], used: set[str]
) -> list[str]:
    """The header's per-op restrictions that this (ONNX-domain) node breaks."""
    op = node.op_type
    attrs = {attr.name: helper.get_attribute_value(attr) for attr in node.attribute}
    problems: list[str] = []
    if op == "Resize":
        x = node.input[0]
        if types.get(x) == _T.BFLOAT16:
            problems.append(
                f"{label}: input '{x}' is BFLOAT16; TensorRT's Resize needs Casts to "
                "FLOAT around it in BF16 graphs (as demoDiffusion does)"
            )
        mode = attrs.get("mode", b"nearest").decode()
        if mode not in RESIZE_MODES:
            problems.append(
                f"{label}: mode '{mode}' is not supported; TensorRT's Resize "
                f"allows {' or '.join(RESIZE_MODES)}"
            )
        if attrs.get("antialias", 0):
            problems.append(
                f"{label}: antialias={attrs['antialias']} is not supported by "
                "TensorRT's Resize (only 0)"
            )
    elif op.startswith("Reduce") or op in CONSTANT_AXES_OPS:
        # From opset 13 (ReduceSum, Squeeze, Unsqueeze) or 18 (the other Reduce*) axes are an
        # input; the parser needs its values at parse time.
        axes = node.input[1] if len(node.input) > 1 else ""
        if axes and axes not in constants:
            problems.append(
                f"{label}: axes '{axes}' are computed, not an initializer or "
                f"Constant; TensorRT's {op} needs constant axes"
            )
    elif op in FLOAT_ONLY_OPS:
        x = node.input[0]
        if types.get(x, 0) and types[x] not in FLOAT_TYPES:
            problems.append(
                f"{label}: input '{x}' is {_type_name(types[x])}; TensorRT's {op} "
                "takes FLOAT, FLOAT16 or BFLOAT16"
            )
        if op == "RotaryEmbedding" and len(node.input) > 3 and node.input[3]:
            ids = node.input[3]
            if types.get(ids, 0) and types[ids] != _T.INT64:
                problems.append(
                    f"{label}: position_ids '{ids}' is {_type_name(types[ids])}; "
                    "TensorRT's RotaryEmbedding needs INT64"
                )
        if op == "Attention":
            problems += _attention_problems(node, label, attrs, used)
    elif op == "LayerNormalization":
        extra = [value for value in node.output[1:] if value and value in used]
        if extra:
            problems.append(
                f"{label}: outputs {', '.join(repr(v) for v in extra)} (Mean/"
                "InvStdDev) are used; TensorRT's LayerNormalization gives only Y"
            )
    elif op == "TopK":
        if attrs.get("sorted", 1) != 1:
            problems.append(
                f"{label}: sorted={attrs['sorted']} is not supported; TensorRT's "
                "TopK needs sorted=1"
            )
    elif op == "ScatterND":
        reduction = attrs.get("reduction", b"none").decode()
        if reduction != "none":
            problems.append(
                f"{label}: reduction '{reduction}' is not supported; TensorRT's "
                "ScatterND allows only 'none'"
            )
    return problems


def _attention_problems(
    node: onnx.NodeProto, label: str, attrs: dict[str, object], used: set[str]
) -> list[str]:
    problems = [
        f"{label}: input {role} '{node.input[i]}' is not supported by TensorRT's Attention"
        for i, role in ATTENTION_INPUTS.items()
        if len(node.input) > i and node.input[i]
    ]
    problems += [
        f"{label}: output {role} '{node.output[i]}' is used; TensorRT's Attention gives only Y"
        for i, role in ATTENTION_OUTPUTS.items()
        if len(node.output) > i and node.output[i] in used
    ]
    problems += [
        f"{label}: {attr}={attrs[attr]} is not supported by TensorRT's Attention (only 0)"
        for attr in ATTENTION_ATTRS
        if attrs.get(attr, 0)
    ]
    return problems
