"""Parity of each exported graph with its torch forward, at several values of every dynamic axis.

A graph that only works at its export shape is the known failure mode of Z-Image exports
(diffusers#12843), so the points are the min, opt and max corners of every profile, plus a
point off the profiles when an axis would otherwise be checked at one value only. fp32 graphs
run on ONNX Runtime; bf16 graphs, which ONNX Runtime's CPU provider cannot run, on ONNX's
reference evaluator (slow: tiny models only).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from zimage_trt.build_engines.networks import Network, ShapePoint
from zimage_trt.engines.manifest import Profile
from zimage_trt.engines.onnxruntime_engines import to_numpy
from zimage_trt.text_table import text_table

TOLERANCE = {"fp32": 1e-3, "bf16": 6e-2}  # max |Δ| relative to max(1, max |reference|)
# a Q/DQ graph against ModelOpt's fake-quant model: mean |Δ| relative to mean |reference| (one
# Linear agrees exactly; through a network, last-bit differences cross FP8/INT8 rounding steps:
# calibration/onnx_qdq.py)
QDQ_TOLERANCE = 0.1


@dataclass(frozen=True)
class ParityRow:
    engine: str
    point: ShapePoint
    output: str
    max_abs: float
    scale: float  # max(1, max |reference|)
    tolerance: float
    runner: str
    # Q/DQ graphs: the gated measure is mean |Δ| / mean |reference| (``mean_rel``); ``full_rel``
    # is the same measure against the unquantized model, for scale
    mean_rel: float | None = None
    full_rel: float | None = None

    @property
    def ok(self) -> bool:
        if self.mean_rel is not None:
            return bool(np.isfinite(self.mean_rel)) and self.mean_rel <= self.tolerance
        return bool(np.isfinite(self.max_abs)) and self.max_abs <= self.tolerance * self.scale

    @property
    def ratio(self) -> float:
        """The error over its limit (> 1: failed)."""
        if self.mean_rel is not None:
            return self.mean_rel / self.tolerance
        return self.max_abs / (self.tolerance * self.scale)

    def describe(self) -> str:
        """How far the graph is from torch, against the limit."""
        if self.mean_rel is not None:
            return (f"mean {self.mean_rel:.3g} relative (limit {self.tolerance:g}; the "
                    f"unquantized model is {self.full_rel:.3g} away)")  # fmt: skip
        return f"{self.max_abs:.3g} (limit {self.tolerance * self.scale:.3g})"


def point_of(net: Network, shapes: dict[str, tuple[int, ...]]) -> ShapePoint:
    """The ShapePoint whose shapes for ``net`` are ``shapes`` (unused axes get 2)."""
    axes = {"B": 1, "L": 2, "H": 2, "W": 2}
    for spec in net.inputs:
        for dim, size in zip(spec.dims, shapes[spec.name], strict=True):
            if dim in ("B", "L", "H", "W"):
                axes[str(dim)] = size
            elif dim == "Lc":
                axes["L"] = size
            elif dim in ("8H", "8W"):
                axes[str(dim)[1:]] = size // 8
    return ShapePoint(axes["B"], axes["L"], axes["H"], axes["W"])


def parity_points(net: Network, profiles: Sequence[Profile]) -> list[ShapePoint]:
    points: list[ShapePoint] = []
    for profile in profiles:
        for corner in ("min", "opt", "max"):
            shapes = {k: getattr(r, corner) for k, r in profile.shapes.items()}
            point = point_of(net, shapes)
            if point not in points:
                points.append(point)
    # every dynamic axis at two values at least: add a smaller point for single-valued ones
    dims = {d for spec in net.inputs for d in spec.dims if isinstance(d, str)}
    base = points[0]
    extra = base
    if "H" in dims or "8H" in dims:
        if len({p.height for p in points}) < 2:
            extra = ShapePoint(extra.batch, extra.tokens, _other(base.height), extra.width)
        if len({p.width for p in points}) < 2:
            extra = ShapePoint(extra.batch, extra.tokens, extra.height, _other(base.width))
    if ("L" in dims or "Lc" in dims) and len(
        {net.shapes(p)[_token_input(net)][1] for p in points}  # [B, L or Lc, …]
    ) < 2:
        extra = ShapePoint(extra.batch, max(1, base.tokens // 2), extra.height, extra.width)
    if extra != base:
        points.append(extra)
    return points


def _other(side: int) -> int:
    return side - 2 if side > 2 else side + 2


def _token_input(net: Network) -> str:
    return next(s.name for s in net.inputs if "L" in s.dims or "Lc" in s.dims)


def check_parity(
    net: Network,
    graph: Path,
    module: nn.Module,
    points: Sequence[ShapePoint],
    precision: str,
    seed: int = 0,
    unquantized: Callable[[], AbstractContextManager[object]] | None = None,
) -> list[ParityRow]:
    """Run the graph and the torch module on the same random inputs at each point.
    ``unquantized``: ``module`` is a fake-quant model and this switches its quantizers off —
    the rows measure the Q/DQ graph by mean error, with the full-precision model's beside it."""
    run, runner = _runner(graph, precision)
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for point in points:
        inputs = net.sample_inputs(point, generator)
        with torch.inference_mode():
            ref = module(*inputs.values())
            fulls: tuple[Tensor, ...] = ()
            if unquantized is not None:
                with unquantized():
                    full = module(*inputs.values())
                fulls = full if isinstance(full, tuple) else (full,)
        refs: tuple[Tensor, ...] = ref if isinstance(ref, tuple) else (ref,)
        outs = run(inputs)
        for i, (spec, expected, got) in enumerate(zip(net.outputs, refs, outs, strict=True)):
            exp = expected.float().numpy()
            got32 = np.asarray(got).astype(np.float32)
            if got32.shape != exp.shape:
                raise AssertionError(
                    f"{net.name} at {point}: output {spec.name} has shape {got32.shape}, "
                    f"torch gives {exp.shape}"
                )
            diff = float(np.abs(got32 - exp).max()) if exp.size else 0.0
            scale = max(1.0, float(np.abs(exp).max()) if exp.size else 1.0)
            if not fulls or exp.dtype == np.bool_ or spec.dtype == torch.bool:
                rows.append(
                    ParityRow(net.name, point, spec.name, diff, scale, TOLERANCE[precision], runner)
                )
                continue
            mean = max(float(np.abs(exp).mean()), 1e-12)
            rows.append(ParityRow(
                net.name, point, spec.name, diff, scale, QDQ_TOLERANCE, runner,
                mean_rel=float(np.abs(got32 - exp).mean()) / mean,
                full_rel=float(np.abs(fulls[i].float().numpy() - exp).mean()) / mean,
            ))  # fmt: skip
    return rows


def _runner(graph: Path, precision: str):  # type: ignore[no-untyped-def]
    if precision == "fp32":
        import onnxruntime as ort

        from zimage_trt.engines.onnxruntime_engines import ort_options

        session = ort.InferenceSession(str(graph), ort_options(),
                                       providers=["CPUExecutionProvider"])  # fmt: skip

        def run_ort(inputs: dict[str, Tensor]) -> list[np.ndarray]:
            return list(session.run(None, {k: v.numpy() for k, v in inputs.items()}))

        return run_ort, "onnxruntime"
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(str(graph), new_ops=_fp32_accumulating_ops())

    def run_reference(inputs: dict[str, Tensor]) -> list[np.ndarray]:
        feeds = {k: to_numpy(v) for k, v in inputs.items()}
        return list(evaluator.run(None, feeds))

    return run_reference, "onnx reference evaluator"


# numpy reduces bf16 arrays in bf16, which no GPU kernel does (a GroupNorm's variance over a
# 64×64 map comes out wrong by whole units); these ops read and write bf16 but accumulate in fp32,
# as TensorRT's and torch's bf16 kernels do.
ACCUMULATING_OPS = ("Conv", "MatMul", "Gemm", "InstanceNormalization", "LayerNormalization",
                    "ReduceMean", "ReduceSum", "Softmax")  # fmt: skip


def _fp32_accumulating_ops() -> list[type]:
    import ml_dtypes
    from onnx.reference.ops import load_op

    def upcast(base: type) -> type:
        def _run(self: object, *args: object, **kwargs: object) -> tuple[object, ...]:
            bf16 = any(getattr(a, "dtype", None) == ml_dtypes.bfloat16 for a in args)
            if bf16:
                args = tuple(
                    a.astype(np.float32)
                    if isinstance(a, np.ndarray) and a.dtype == ml_dtypes.bfloat16
                    else a
                    for a in args
                )
            outs = base._run(self, *args, **kwargs)  # type: ignore[attr-defined]
            if not bf16:
                return tuple(outs)
            return tuple(
                o.astype(ml_dtypes.bfloat16)
                if isinstance(o, np.ndarray) and o.dtype == np.float32
                else o
                for o in outs
            )

        return type(base.__name__, (base,), {"op_domain": "", "_run": _run})

    return [upcast(load_op("", name)) for name in ACCUMULATING_OPS]


def format_parity(rows: Sequence[ParityRow]) -> str:
    qdq = any(r.mean_rel is not None for r in rows)
    header: tuple[str, ...] = ("engine", "B", "tokens", "latent", "output", "max |Δ|", "limit",
                               "runner", "")  # fmt: skip
    if qdq:  # measured by mean error against the fake-quant model (the unquantized beside it)
        header = (*header[:7], "mean rel", "unquantized", *header[7:])
    table = [header]
    for r in rows:
        p = r.point
        row: tuple[str, ...] = (
            r.engine, str(p.batch), str(p.tokens), f"{p.height}×{p.width}", r.output,
            f"{r.max_abs:.2e}", f"{r.tolerance * r.scale:.1e}", r.runner, "ok" if r.ok else "FAIL",
        )  # fmt: skip
        if qdq:
            limit = f"{r.tolerance:g} mean" if r.mean_rel is not None else row[6]
            means = ((f"{r.mean_rel:.3f}", f"{r.full_rel:.3f}") if r.mean_rel is not None
                     and r.full_rel is not None else ("", ""))  # fmt: skip
            row = (*row[:6], limit, *means, *row[7:])
        table.append(row)
    return text_table(table)
