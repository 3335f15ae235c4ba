"""ONNX export that fits the full-size model in a 24 GB machine: the graph is traced from a
weightless copy of the network on the ``meta`` device, and the weights are streamed one tensor at
a time into a single external-data file beside it.

Every graph is exported the same way, tiny or 6 B (reference/export-notes.md measured the route
at full size):

1. build the export wrapper on ``meta`` in the target dtype and trace it with the dynamo exporter
   at opset 18, with one ``Dim`` per axis (batch, tokens, caption blocks, latent half-sides);
2. clean the graph up with the onnx-ir optimizer (constant folding, dead-code and shape-op
   simplification) while the weight initializers have no values, so nothing weight-derived is
   folded into new tensors and every initializer keeps its checkpoint name;
3. write each initializer from the weight mapping (which may load lazily) into
   ``<name>.onnx.data``, 64-byte aligned, and point the graph at it; write the graph.

Both files go to temporary names and are renamed at the end: a failed export leaves nothing.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from zimage_trt.build_engines.networks import Network, ShapePoint
from zimage_trt.errors import WRITE_ERRNOS, InputError, RunError, os_error

if TYPE_CHECKING:
    import onnx_ir as ir

OPSET = 18  # opset 23's Attention/RotaryEmbedding trip ONNX Runtime (export-notes.md §6)
ALIGN = 64
DATA_SUFFIX = ".data"


class ExportError(RunError):
    """The exporter or the graph clean-up failed; the message names the engine and the step."""


@dataclass(frozen=True)
class ExportResult:
    graph: Path
    data: Path
    seconds: float
    initializers: int
    data_bytes: int
    weight_names: tuple[str, ...] = ()  # the initializers streamed from ``weights``


def export_network(
    network: Network,
    meta_module: nn.Module,
    weights: Mapping[str, Tensor],
    path: Path,
    *,
    example: ShapePoint,
    limits: ShapePoint,
    opset: int = OPSET,
    translations: Mapping[Any, Any] | None = None,
    log: Callable[[str], None] = lambda msg: None,
) -> ExportResult:
    """Export ``meta_module`` (on the meta device) as ``path`` + ``path.data``.

    ``weights`` maps every parameter/buffer name of the module to its tensor (converted to the
    graph's dtype while streaming). ``example`` is the trace shape (no axis of size 1: the
    exporter would specialise it), ``limits`` the largest shape the graph must serve.
    ``translations``: the exporter's ``custom_translation_table`` for custom ops in the module
    (the Q/DQ stand-ins of a calibrated DiT, at ``opset`` 19).
    """
    start = time.perf_counter()
    names = [n for n, _ in meta_module.named_parameters()]
    names += [n for n, _ in meta_module.named_buffers()]
    missing = [n for n in names if n not in weights]
    if missing:
        raise ExportError(
            f"{network.name}: initializer {missing[0]!r} has no weight ({len(missing)} missing)"
        )
    model = _trace(network, meta_module, example, limits, opset, translations)
    log(f"{network.name}: traced in {time.perf_counter() - start:.1f} s; optimizing the graph")
    _optimize(network.name, model, set(weights))
    data_path = path.with_name(path.name + DATA_SUFFIX)
    with _atomic_pair(path, data_path) as (tmp_graph, tmp_data):
        streamed, size = _stream_weights(network.name, model, weights, tmp_data, data_path.name)
        _save_graph(model, tmp_graph)
    seconds = time.perf_counter() - start
    return ExportResult(path, data_path, seconds, len(streamed), size, tuple(streamed))


def module_weights(module: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer of ``module`` by name: what ``export_network`` streams."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def _meta_inputs(network: Network, point: ShapePoint) -> tuple[Tensor, ...]:
    return tuple(
        torch.empty(spec.shape(point), dtype=spec.dtype, device="meta") for spec in network.inputs
    )


def _trace(
    network: Network,
    module: nn.Module,
    example: ShapePoint,
    limits: ShapePoint,
    opset: int,
    translations: Mapping[Any, Any] | None,
) -> ir.Model:
    if any(1 in shape for shape in network.shapes(example).values()):
        raise InputError(f"{network.name}: the example shape {example} has an axis of size 1")
    quiet = io.StringIO()
    try:
        with (
            torch.no_grad(),
            warnings.catch_warnings(),
            contextlib.redirect_stdout(quiet),
            _quiet_loggers(),
        ):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module.eval(),
                _meta_inputs(network, example),
                dynamo=True,
                dynamic_shapes=network.dynamic_shapes(limits),
                input_names=[s.name for s in network.inputs],
                output_names=[s.name for s in network.outputs],
                opset_version=opset,
                optimize=False,
                verbose=False,
                custom_translation_table=dict(translations or {}),
            )
    except Exception as exc:  # the exporter raises many types; name the engine and step
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{network.name}: torch.onnx.export failed: {detail}") from exc
    assert program is not None
    return program.model  # an onnx_ir.Model


def _optimize(name: str, model: ir.Model, weight_names: set[str]) -> None:
    import onnxscript.optimizer

    graph = model.graph
    for init_name, value in graph.initializers.items():
        if init_name in weight_names:
            value.const_value = None  # weights are streamed later; never fold them
    try:
        with _quiet_loggers(), contextlib.redirect_stdout(io.StringIO()):
            onnxscript.optimizer.optimize(model)
    except Exception as exc:
        raise ExportError(f"{name}: graph optimization failed: {exc}") from exc


def _stream_weights(
    name: str, model: ir.Model, weights: Mapping[str, Tensor], data_file: Path, location: str
) -> tuple[list[str], int]:
    """Write every weight initializer into one aligned file; returns (their names, bytes). The
    graph's own constants stay inline: TensorRT and ONNX Runtime read shape and axes inputs from
    them."""
    import onnx_ir as ir

    graph = model.graph
    offset, streamed = 0, []
    base_dir = str(data_file.parent)
    with open(data_file, "wb") as f:
        for init_name, value in list(graph.initializers.items()):
            if init_name not in weights:
                if value.const_value is None:
                    raise ExportError(f"{name}: initializer {init_name!r} has no weight")
                continue  # a constant of the graph itself (shapes, axes, scalars): stays inline
            tensor = weights[init_name]
            if value.shape is None or value.dtype is None:
                raise ExportError(f"{name}: initializer {init_name!r} has no shape or type")
            expected = tuple(d if isinstance(d, int) else -1 for d in value.shape)
            if tuple(tensor.shape) != expected:
                raise ExportError(
                    f"{name}: weight {init_name!r} has shape {tuple(tensor.shape)}, the graph "
                    f"expects {expected}"
                )
            dtype = _torch_dtype(value.dtype)
            raw = tensor.detach().to("cpu", dtype).contiguous().reshape(-1).view(torch.uint8)
            f.write(b"\0" * (-offset % ALIGN))
            offset += -offset % ALIGN
            raw.numpy().tofile(f)
            value.const_value = ir.ExternalTensor(
                location, offset, raw.numel(), value.dtype, shape=value.shape, name=init_name,
                base_dir=base_dir,
            )  # fmt: skip
            offset += raw.numel()
            streamed.append(init_name)
    return streamed, offset


def _save_graph(model: ir.Model, path: Path) -> None:
    import onnx_ir

    onnx_ir.save(model, path)


def _torch_dtype(ir_dtype: ir.DataType | None) -> torch.dtype:
    import onnx_ir as ir

    table = {
        ir.DataType.FLOAT: torch.float32,  # a quantizer's amax too (fp32 in any graph)
        ir.DataType.BFLOAT16: torch.bfloat16,
        ir.DataType.FLOAT16: torch.float16,
        ir.DataType.INT64: torch.int64,
        ir.DataType.INT32: torch.int32,
        ir.DataType.BOOL: torch.bool,
        ir.DataType.DOUBLE: torch.float64,
    }
    if ir_dtype is None or ir_dtype not in table:
        raise ExportError(f"initializer of unsupported type {ir_dtype}")
    return table[ir_dtype]


@contextlib.contextmanager
def _atomic_pair(graph: Path, data: Path) -> Iterator[tuple[Path, Path]]:
    """Temp names for the graph and its data; both renamed on success, both removed on failure.
    The data is renamed first, so a graph never points at a missing data file."""
    graph.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    tmp_graph = graph.with_name(f".{graph.name}.{tag}")
    tmp_data = data.with_name(f".{data.name}.{tag}")
    try:
        yield tmp_graph, tmp_data
        os.replace(tmp_data, data)
        os.replace(tmp_graph, graph)
    except OSError as exc:
        if exc.errno in WRITE_ERRNOS:  # a full disk, permissions: name the file being written
            raise os_error(exc, data) from exc
        raise
    finally:
        tmp_graph.unlink(missing_ok=True)
        tmp_data.unlink(missing_ok=True)


@contextlib.contextmanager
def _quiet_loggers() -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "onnx_ir", "torch")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
