"""TensorRT ONNX coverage: exact pairs and exact messages for small hand-built graphs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from zimage_trt.build_engines import coverage
from zimage_trt.build_engines.coverage import (
    CoverageIssue,
    check_tensorrt_coverage,
    load_supported_ops,
)

FLOAT, BF16 = TensorProto.FLOAT, TensorProto.BFLOAT16


def value(name: str, elem_type: int, shape: Sequence[int]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, list(shape))


def const(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array, name)


def model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    initializers: Sequence[onnx.TensorProto] = (),
    *,
    opset: int = 18,
    domains: Sequence[str] = (),
    functions: Sequence[onnx.FunctionProto] = (),
) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), list(initializers))
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in domains)]
    onnx_model = helper.make_model(graph, opset_imports=opsets, functions=list(functions))
    onnx.checker.check_model(onnx_model)
    return onnx_model


def issue(op: str, node: str, problem: str) -> CoverageIssue:
    return CoverageIssue(op, node, problem)


def test_supported_ops_file() -> None:
    ops = load_supported_ops()
    assert len(ops) == 158
    assert {"MatMul", "Resize", "RMSNormalization", "Attention", "Upsample"} <= ops
    assert not {"Col2Im", "DFT", "Swish", "SplitToSequence"} & ops


def clean_graph() -> onnx.ModelProto:
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["xw"], name="matmul"),
        helper.make_node("Add", ["xw", "b"], ["h"], name="bias"),
        helper.make_node("Add", ["h", "h"], ["h2"], name="double"),
        helper.make_node("Softmax", ["h2"], ["y"], name="softmax", axis=-1),
    ]
    weights = [const("w", np.ones((4, 3), np.float32)), const("b", np.zeros(3, np.float32))]
    return model(nodes, [value("x", FLOAT, [2, 4])], [value("y", FLOAT, [2, 3])], weights)


def test_clean_graph_passes_with_exact_counts() -> None:
    onnx_model = clean_graph()
    before = onnx_model.SerializeToString()
    report = check_tensorrt_coverage(onnx_model)
    assert report.ok and report.issues == []
    assert report.pairs == {("MatMul", "FLOAT"): 1, ("Add", "FLOAT"): 2, ("Softmax", "FLOAT"): 1}
    assert report.summary() == "4 ops, 3 (op, dtype) pairs, all parseable by TensorRT"
    assert report.format_table() == (
        "op       dtype  count  status\n"
        "-------  -----  -----  ------\n"
        "Add      FLOAT      2  ok\n"
        "MatMul   FLOAT      1  ok\n"
        "Softmax  FLOAT      1  ok"
    )
    assert onnx_model.SerializeToString() == before  # the check works on a copy


def test_path_with_external_data_is_read_without_the_data(tmp_path: Path) -> None:
    path = tmp_path / "clean.onnx"
    onnx.save_model(clean_graph(), path, save_as_external_data=True, location="clean.data",
                    size_threshold=0)  # fmt: skip
    (tmp_path / "clean.data").unlink()  # types only: the weights are never opened
    report = check_tensorrt_coverage(path)
    assert report.ok
    assert report.pairs == {("MatMul", "FLOAT"): 1, ("Add", "FLOAT"): 2, ("Softmax", "FLOAT"): 1}


def resize_graph(elem_type: int, *, cast_to_float: bool) -> onnx.ModelProto:
    scales = const("scales", np.array([1, 1, 2, 2], np.float32))
    if cast_to_float:
        nodes = [
            helper.make_node("Cast", ["x"], ["x32"], name="up", to=FLOAT),
            helper.make_node("Resize", ["x32", "", "scales"], ["y32"], name="resize"),
            helper.make_node("Cast", ["y32"], ["y"], name="down", to=elem_type),
        ]
    else:
        nodes = [helper.make_node("Resize", ["x", "", "scales"], ["y"], name="resize")]
    inputs, outputs = [value("x", elem_type, [1, 2, 4, 4])], [value("y", elem_type, [1, 2, 8, 8])]
    return model(nodes, inputs, outputs, [scales])


def test_bf16_resize_is_flagged() -> None:
    report = check_tensorrt_coverage(resize_graph(BF16, cast_to_float=False))
    problem = (
        "Resize 'resize': input 'x' is BFLOAT16; TensorRT's Resize needs Casts to FLOAT around "
        "it in BF16 graphs (as demoDiffusion does)"
    )
    assert not report.ok
    assert report.issues == [issue("Resize", "resize", problem)]
    assert report.pairs == {("Resize", "BFLOAT16"): 1}
    assert report.summary() == f"1 problem: {problem}"
    assert report.format_table() == (
        "op      dtype     count  status\n"
        "------  --------  -----  -------\n"
        "Resize  BFLOAT16      1  1 issue"
    )


def test_bf16_resize_between_casts_to_float_passes() -> None:
    report = check_tensorrt_coverage(resize_graph(BF16, cast_to_float=True))
    assert report.ok
    assert report.pairs == {("Cast", "BFLOAT16"): 1, ("Resize", "FLOAT"): 1, ("Cast", "FLOAT"): 1}


@pytest.mark.parametrize(
    ("attrs", "problem"),
    [
        ({"mode": "cubic"}, "mode 'cubic' is not supported; TensorRT's Resize allows nearest or "
         "linear"),
        ({"mode": "linear", "antialias": 1}, "antialias=1 is not supported by TensorRT's Resize "
         "(only 0)"),
    ],
)  # fmt: skip
def test_resize_modes(attrs: dict[str, Any], problem: str) -> None:
    scales = const("scales", np.array([1, 1, 2, 2], np.float32))
    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], name="resize", **attrs)
    onnx_model = model(
        [node], [value("x", FLOAT, [1, 2, 4, 4])], [value("y", FLOAT, [1, 2, 8, 8])], [scales]
    )
    assert check_tensorrt_coverage(onnx_model).issues == [
        issue("Resize", "resize", f"Resize 'resize': {problem}")
    ]


def test_complex_tensors_are_flagged() -> None:
    c64 = TensorProto.COMPLEX64
    node = helper.make_node("Mul", ["a", "b"], ["c"], name="complex_mul")
    onnx_model = model([node], [value("a", c64, [4]), value("b", c64, [4])], [value("c", c64, [4])])
    report = check_tensorrt_coverage(onnx_model)
    reason = (
        "is COMPLEX64; TensorRT has no complex types (write the math in real cos/sin arithmetic)"
    )
    assert report.issues == [
        issue("Mul", "complex_mul", f"Mul 'complex_mul': input 'a' {reason}"),
        issue("Mul", "complex_mul", f"Mul 'complex_mul': input 'b' {reason}"),
        issue("Mul", "complex_mul", f"Mul 'complex_mul': output 'c' {reason}"),
    ]
    assert report.pairs == {("Mul", "COMPLEX64"): 1}
    assert report.format_table().endswith("Mul  COMPLEX64      1  3 issues")
    assert report.summary().startswith("3 problems: Mul 'complex_mul': input 'a' is COMPLEX64;")


def test_graph_value_no_node_touches_is_checked() -> None:
    # An input wired straight to the output: no node to name, the value is still reported.
    c128 = TensorProto.COMPLEX128
    onnx_model = model([], [value("z", c128, [2])], [value("z", c128, [2])])
    assert check_tensorrt_coverage(onnx_model).issues == [
        issue("(graph)", "", "graph value 'z' is COMPLEX128; TensorRT has no complex types "
              "(write the math in real cos/sin arithmetic)")
    ]  # fmt: skip


def test_double_cast_is_flagged() -> None:
    nodes = [
        helper.make_node("Cast", ["x"], ["x64"], name="to_double", to=TensorProto.DOUBLE),
        helper.make_node("Cast", ["x64"], ["y"], name="to_float", to=FLOAT),
    ]
    report = check_tensorrt_coverage(
        model(nodes, [value("x", FLOAT, [3])], [value("y", FLOAT, [3])])
    )
    assert report.issues == [
        issue("Cast", "to_double", "Cast 'to_double': output 'x64' is DOUBLE; TensorRT casts "
              "DOUBLE down to FLOAT, losing the float64 precision")
    ]  # fmt: skip
    assert report.pairs == {("Cast", "FLOAT"): 1, ("Cast", "DOUBLE"): 1}


def test_types_tensorrt_lacks() -> None:
    nodes = [
        helper.make_node("Cast", ["x"], ["x8"], name="to_u8", to=TensorProto.UINT8),
        helper.make_node("Cast", ["x8"], ["x16"], name="to_u16", to=TensorProto.UINT16),
        helper.make_node("Cast", ["x16"], ["y"], name="to_float", to=FLOAT),
    ]
    # UINT8 is allowed as network I/O ('x'), not inside the network ('x8').
    inputs = [value("x", TensorProto.UINT8, [3])]
    report = check_tensorrt_coverage(model(nodes, inputs, [value("y", FLOAT, [3])]))
    assert report.issues == [
        issue("Cast", "to_u8", "Cast 'to_u8': output 'x8' is UINT8; TensorRT allows UINT8 only as "
              "a network input or output"),
        issue("Cast", "to_u16", "Cast 'to_u16': output 'x16' is UINT16; TensorRT has no UINT16 "
              "tensors"),
    ]  # fmt: skip


def test_unsupported_and_custom_ops_are_flagged() -> None:
    nodes = [
        helper.make_node("Col2Im", ["cols", "image", "block"], ["im"], name="col2im"),
        helper.make_node("FusedThing", ["im"], ["y"], name="fused", domain="com.example"),
    ]
    inits = [const("image", np.array([4, 4], np.int64)), const("block", np.array([2, 2], np.int64))]
    inputs = [value("cols", FLOAT, [1, 4, 9])]
    onnx_model = model(nodes, inputs, [value("y", FLOAT, [1, 1, 4, 4])], inits,
                       domains=["com.example"])  # fmt: skip
    report = check_tensorrt_coverage(onnx_model)
    assert report.issues == [
        issue("Col2Im", "col2im", "Col2Im 'col2im': op Col2Im is not supported by TensorRT's "
              "ONNX parser"),
        issue("FusedThing", "fused", "FusedThing 'fused': op of domain 'com.example' is a custom "
              "op; TensorRT parses only ONNX-domain ops without a plugin"),
    ]  # fmt: skip
    # Col2Im's dtype is its first input's (not its INT64 shapes'); FusedThing's input type is
    # Col2Im's inferred output type.
    assert report.pairs == {("Col2Im", "FLOAT"): 1, ("FusedThing", "FLOAT"): 1}


@pytest.mark.parametrize("axes_from", ["initializer", "Constant", "computed"])
def test_reduce_mean_axes_must_be_constant(axes_from: str) -> None:
    one = np.array([1], np.int64)
    nodes, inits = [], []
    if axes_from == "initializer":
        inits.append(const("axes", -one))
    elif axes_from == "Constant":
        nodes.append(helper.make_node("Constant", [], ["axes"], name="axes_const",
                                      value=const("v", -one)))  # fmt: skip
    else:
        inits.append(const("one", one))
        nodes.append(helper.make_node("Neg", ["one"], ["axes"], name="neg"))
    nodes.append(helper.make_node("ReduceMean", ["x", "axes"], ["y"], name="mean"))
    onnx_model = model(nodes, [value("x", FLOAT, [2, 3])], [value("y", FLOAT, [2, 1])], inits)
    report = check_tensorrt_coverage(onnx_model)
    if axes_from == "computed":
        assert report.issues == [
            issue("ReduceMean", "mean", "ReduceMean 'mean': axes 'axes' are computed, not an "
                  "initializer or Constant; TensorRT's ReduceMean needs constant axes")
        ]  # fmt: skip
    else:
        assert report.ok


def test_unsqueeze_axes_must_be_constant() -> None:
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], name="shape", start=0, end=1),
        helper.make_node("Unsqueeze", ["x", "shape"], ["y"], name="unsqueeze"),
    ]
    onnx_model = model(nodes, [value("x", FLOAT, [1])], [value("y", FLOAT, [1, 1])])
    assert check_tensorrt_coverage(onnx_model).issues == [
        issue("Unsqueeze", "unsqueeze", "Unsqueeze 'unsqueeze': axes 'shape' are computed, not an "
              "initializer or Constant; TensorRT's Unsqueeze needs constant axes")
    ]  # fmt: skip


def test_local_function_nodes_are_checked() -> None:
    body = [
        helper.make_node("Cast", ["a"], ["a64"], name="up", to=TensorProto.DOUBLE),
        helper.make_node("Cast", ["a64"], ["b"], name="down", to=FLOAT),
    ]
    block = helper.make_function("local.fn", "Block", ["a"], ["b"], body,
                                 [helper.make_opsetid("", 18)])  # fmt: skip
    call = helper.make_node("Block", ["x"], ["y"], name="block", domain="local.fn")
    onnx_model = model([call], [value("x", FLOAT, [2])], [value("y", FLOAT, [2])],
                       domains=["local.fn"], functions=[block])  # fmt: skip
    report = check_tensorrt_coverage(onnx_model)
    # Inlining renames the function's nodes and values (suffix "__1"): they keep their stem.
    assert report.issues == [
        issue("Cast", "up__1", "Cast 'up__1': output 'a64__1' is DOUBLE; TensorRT casts DOUBLE "
              "down to FLOAT, losing the float64 precision")
    ]  # fmt: skip
    assert report.pairs == {("Cast", "FLOAT"): 1, ("Cast", "DOUBLE"): 1}


def test_if_branches_are_checked_with_outer_constants() -> None:
    then_branch = helper.make_graph(
        [helper.make_node("Unsqueeze", ["x", "axes"], ["t"], name="then_unsqueeze")],
        "then", [], [value("t", FLOAT, [1, 2])],
    )  # fmt: skip
    else_branch = helper.make_graph(
        [helper.make_node("Resize", ["xb", "", "scales"], ["eb"], name="else_resize"),
         helper.make_node("Cast", ["eb"], ["e"], name="else_cast", to=FLOAT)],
        "else", [], [value("e", FLOAT, [2])],
    )  # fmt: skip
    nodes = [
        helper.make_node("Cast", ["x"], ["xb"], name="to_bf16", to=BF16),
        helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_branch,
                         else_branch=else_branch),
    ]  # fmt: skip
    inits = [const("axes", np.array([0], np.int64)), const("scales", np.ones(1, np.float32))]
    inputs = [value("cond", TensorProto.BOOL, []), value("x", FLOAT, [2])]
    report = check_tensorrt_coverage(model(nodes, inputs, [value("y", FLOAT, [1, 2])], inits))
    assert report.issues == [
        issue("Resize", "else_resize", "Resize 'else_resize': input 'xb' is BFLOAT16; TensorRT's "
              "Resize needs Casts to FLOAT around it in BF16 graphs (as demoDiffusion does)")
    ]  # fmt: skip
    # If's only input is BOOL: its dtype is its output's.
    assert report.pairs == {("Cast", "FLOAT"): 1, ("If", "FLOAT"): 1, ("Unsqueeze", "FLOAT"): 1,
                            ("Resize", "BFLOAT16"): 1, ("Cast", "BFLOAT16"): 1}  # fmt: skip


@pytest.mark.parametrize("use_mean", [False, True])
def test_layer_norm_with_mean_output_used(use_mean: bool) -> None:
    inits = [const("scale", np.ones(4, np.float32)), const("bias", np.zeros(4, np.float32))]
    outputs = ["y", "mean"] if use_mean else ["y"]
    node = helper.make_node("LayerNormalization", ["x", "scale", "bias"], outputs, name="ln")
    graph_outputs = [value("y", FLOAT, [2, 4])]
    if use_mean:
        graph_outputs.append(value("mean", FLOAT, [2, 1]))
    report = check_tensorrt_coverage(
        model([node], [value("x", FLOAT, [2, 4])], graph_outputs, inits)
    )
    expected = "LayerNormalization 'ln': outputs 'mean' (Mean/InvStdDev) are used; TensorRT's "
    expected += "LayerNormalization gives only Y"
    assert report.issues == ([issue("LayerNormalization", "ln", expected)] if use_mean else [])


def test_rms_norm_type_restriction() -> None:
    node = helper.make_node("RMSNormalization", ["x", "scale"], ["y"], name="rms")
    inputs = [value("x", BF16, [2, 4]), value("scale", BF16, [4])]
    assert check_tensorrt_coverage(model([node], inputs, [value("y", BF16, [2, 4])], opset=23)).ok
    double = TensorProto.DOUBLE
    inputs = [value("x", double, [2, 4]), value("scale", double, [4])]
    report = check_tensorrt_coverage(model([node], inputs, [value("y", double, [2, 4])], opset=23))
    assert [i.problem.split(";")[0] for i in report.issues] == [
        "RMSNormalization 'rms': input 'x' is DOUBLE",
        "RMSNormalization 'rms': input 'scale' is DOUBLE",
        "RMSNormalization 'rms': output 'y' is DOUBLE",
        "RMSNormalization 'rms': input 'x' is DOUBLE",
    ]
    assert report.issues[-1].problem == (
        "RMSNormalization 'rms': input 'x' is DOUBLE; TensorRT's RMSNormalization takes FLOAT, "
        "FLOAT16 or BFLOAT16"
    )
    assert report.summary().endswith("; … and 1 more")
    assert report.summary().startswith("4 problems: RMSNormalization 'rms': input 'x' is DOUBLE;")


def test_topk_and_scatternd_restrictions() -> None:
    int64 = TensorProto.INT64
    nodes = [
        helper.make_node("TopK", ["x", "k"], ["top", "idx"], name="topk", sorted=0),
        helper.make_node("ScatterND", ["x", "where", "top"], ["y"], name="scatter",
                         reduction="add"),
    ]  # fmt: skip
    inits = [const("k", np.array([2], np.int64)), const("where", np.array([[0], [1]], np.int64))]
    outputs = [value("y", FLOAT, [4]), value("idx", int64, [2])]
    report = check_tensorrt_coverage(model(nodes, [value("x", FLOAT, [4])], outputs, inits))
    assert report.issues == [
        issue("TopK", "topk", "TopK 'topk': sorted=0 is not supported; TensorRT's TopK needs "
              "sorted=1"),
        issue("ScatterND", "scatter", "ScatterND 'scatter': reduction 'add' is not supported; "
              "TensorRT's ScatterND allows only 'none'"),
    ]  # fmt: skip


def test_attention_restrictions() -> None:
    q, kv = value("q", FLOAT, [1, 2, 3, 8]), value("kv", FLOAT, [1, 2, 3, 8])
    past = value("past", FLOAT, [1, 2, 1, 8])
    node = helper.make_node("Attention", ["q", "kv", "kv", "", "past", "past"],
                            ["y", "present"], name="attn", softcap=30.0)  # fmt: skip
    outputs = [value("y", FLOAT, [1, 2, 3, 8]), value("present", FLOAT, [1, 2, 4, 8])]
    report = check_tensorrt_coverage(model([node], [q, kv, past], outputs, opset=23))
    assert [i.problem for i in report.issues] == [
        "Attention 'attn': input past_key 'past' is not supported by TensorRT's Attention",
        "Attention 'attn': input past_value 'past' is not supported by TensorRT's Attention",
        "Attention 'attn': output present_key 'present' is used; TensorRT's Attention gives only Y",
        "Attention 'attn': softcap=30.0 is not supported by TensorRT's Attention (only 0)",
    ]
    plain = helper.make_node("Attention", ["q", "kv", "kv"], ["y"], name="attn")
    assert check_tensorrt_coverage(model([plain], [q, kv], outputs[:1], opset=23)).ok


def test_in_memory_model_over_protobuf_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(coverage, "PROTOBUF_LIMIT", 100)
    with pytest.raises(
        ValueError,
        match=r"^the model is 0\.0 GiB in memory, over protobuf's 2 GiB "
        r"limit: save it with external data and pass the \.onnx path instead$",
    ):
        check_tensorrt_coverage(clean_graph())


@pytest.mark.parametrize("opset", [8, 25])
def test_opset_outside_tensorrt_range(opset: int) -> None:
    node = helper.make_node("Add", ["x", "x"], ["y"], name="add")
    onnx_model = model([node], [value("x", FLOAT, [2])], [value("y", FLOAT, [2])], opset=opset)
    assert check_tensorrt_coverage(onnx_model).issues == [
        issue(
            "(model)", "", f"model: ONNX opset {opset} is outside 9..24, the range TensorRT parses"
        )
    ]


class LinearRMSNormUpsample(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)
        self.weight = torch.nn.Parameter(torch.full((4,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear(x.permute(0, 2, 3, 1))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight
        return F.interpolate(h.permute(0, 3, 1, 2), scale_factor=2, mode="nearest")


def test_dynamo_export_passes(tmp_path: Path) -> None:
    path = tmp_path / "small.onnx"
    example = (torch.randn(1, 4, 8, 8),)
    torch.onnx.export(LinearRMSNormUpsample().eval(), example, path, dynamo=True,
                      opset_version=18, verbose=False)  # fmt: skip
    report = check_tensorrt_coverage(path)
    assert report.ok, report.summary()
    assert ("Resize", "FLOAT") in report.pairs and ("ReduceMean", "FLOAT") in report.pairs
    assert {dtype for _, dtype in report.pairs} == {"FLOAT"}
