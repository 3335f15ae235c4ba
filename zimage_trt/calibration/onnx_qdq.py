"""The Q/DQ form of a calibrated DiT (or text encoder), which the builder exports: each Linear a
calibration quantized becomes ``QuantizedLinear`` — its weight and its input fake-quantized by
one custom op, ``zimage_trt::fake_quant(x, amax, precision)`` — and each ``Attend`` whose
q/k/v it quantized a ``QuantizedAttend`` (the same op on q, k and v); ``translation_table``
turns that op into the ONNX form TensorRT runs explicitly quantized:
``DequantizeLinear(QuantizeLinear(x, scale, 0), scale)`` at opset 19 —

| precision | zero point   | scale          | axis                                   |
|-----------|--------------|----------------|----------------------------------------|
| fp8       | FLOAT8E4M3FN | amax / 448     | per tensor                             |
| int8      | INT8         | amax / 127     | weights per output channel, inputs per tensor |

ModelOpt's quantizers are not exported themselves: its FP8 export op needs a translation of its
own, and its INT8 CPU fake quantization cannot be traced by the dynamo exporter (data-dependent
branches). The stand-in is the same arithmetic in ONNX's terms, so it traces from the ``meta``
device like every graph here, and each quantizer's amax is a buffer named
``<quantizer>.amax`` — the saved calibration's own keys — streamed into the weights file.

One Linear computes what ModelOpt's fake quantization computes (FP8: the same steps, the scale
to its last bit — ONNX divides by amax/448 where ModelOpt multiplies by 448/amax; INT8: ONNX's
``QuantizeLinear`` saturates at −128 where ModelOpt's narrow range stops at −127, reached only
by an input beyond its calibrated amax). A whole network agrees with ModelOpt's model only
approximately: a last-bit difference in a matmul moves a value across a rounding step at the
next quantizer (6 % apart in FP8), and on the tiny random DiT those steps add up to a few per
cent — the reference evaluator and ONNX Runtime differ from each other by as much.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zimage_trt.errors import InputError
from zimage_trt.models.dit import Attend

OPSET = 19  # the first with FLOAT8E4M3FN in QuantizeLinear / DequantizeLinear
LEVELS = {"fp8": 448.0, "int8": 127.0}  # amax maps to this many steps: E4M3's max, INT8's


@torch.library.custom_op("zimage_trt::fake_quant", mutates_args=())
def fake_quant(x: Tensor, amax: Tensor, precision: str, channels: int) -> Tensor:
    """``x`` quantized to ``precision`` with ``scale = amax / LEVELS[precision]`` and back, as
    ONNX's QuantizeLinear / DequantizeLinear compute it; ``channels`` > 0: ``amax`` holds a
    scale per output channel ([channels, 1], broadcast along dim 0), 0: one for the tensor."""
    scale = (amax.float() / LEVELS[precision]).to(x.dtype)
    if precision == "fp8":
        steps = (x / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).to(x.dtype)
    else:
        steps = torch.round(x / scale).clamp(-128, 127)
    return steps * scale


@fake_quant.register_fake
def _(x: Tensor, amax: Tensor, precision: str, channels: int) -> Tensor:
    return torch.empty_like(x)


class Quantizer(nn.Module):
    """One calibrated quantizer: its amax (a buffer, saved and streamed by name) and format."""

    def __init__(self, amax: Tensor, precision: str) -> None:
        super().__init__()
        if precision not in LEVELS:
            raise InputError(f"precision {precision!r} is not one of: {', '.join(LEVELS)}")
        self.precision = precision
        self.channels = amax.shape[0] if amax.numel() > 1 else 0
        self.register_buffer("amax", amax)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = torch.ops.zimage_trt.fake_quant(x, self.amax, self.precision, self.channels)
        return out


class QuantizedLinear(nn.Module):
    """A Linear whose input and weight pass through their quantizers; its weight and bias keep
    their names (refit and the weights stream find them where the plain Linear had them)."""

    def __init__(self, linear: nn.Linear, input_amax: Tensor, weight_amax: Tensor,
                 precision: str) -> None:  # fmt: skip
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.input_quantizer = Quantizer(input_amax, precision)
        self.weight_quantizer = Quantizer(weight_amax, precision)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


class QuantizedAttend(Attend):
    """Attention whose q, k and v (after RoPE) pass through their quantizers (FP8)."""

    def __init__(self, q_amax: Tensor, k_amax: Tensor, v_amax: Tensor, precision: str) -> None:
        super().__init__()
        self.q_bmm_quantizer = Quantizer(q_amax, precision)
        self.k_bmm_quantizer = Quantizer(k_amax, precision)
        self.v_bmm_quantizer = Quantizer(v_amax, precision)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        return super().forward(self.q_bmm_quantizer(q), self.k_bmm_quantizer(k),
                               self.v_bmm_quantizer(v), mask)  # fmt: skip


# what each quantized module's quantizers are called, and the stand-in that replaces it
KINDS: dict[str, tuple[type[nn.Module], tuple[str, ...]]] = {
    "Linear": (nn.Linear, ("input_quantizer", "weight_quantizer")),
    "Attend": (Attend, ("q_bmm_quantizer", "k_bmm_quantizer", "v_bmm_quantizer")),
}


def quantized_modules(state: dict[str, Tensor]) -> dict[str, str]:
    """The modules a saved calibration state quantizes and their kinds (``KINDS``): its keys are
    ``<module>.<quantizer>.amax`` — a Linear's input and weight quantizers, an Attend's q, k and
    v quantizers — and every module has all of its kind's quantizers."""
    found: dict[str, set[str]] = {}
    for key in state:
        module, _, rest = key.rpartition(".")[0].rpartition(".")
        if not (key.endswith(".amax") and module and any(rest in q for _, q in KINDS.values())):
            raise InputError(f"the calibration state has a key this model cannot use: {key!r}")
        found.setdefault(module, set()).add(rest)
    kinds = {}
    for module, parts in sorted(found.items()):
        kind = next((k for k, (_, names) in KINDS.items() if parts == set(names)), None)
        if kind is None:
            raise InputError(f"the calibration quantizes only {', '.join(sorted(parts))} of "
                             f"{module}")  # fmt: skip
        kinds[module] = kind
    return kinds


def insert_qdq(model: nn.Module, state: dict[str, Tensor], precision: str) -> nn.Module:
    """``model`` (in place; real or on ``meta``) with every Linear and Attend the state names
    replaced by its stand-in holding its amax values (on ``meta``: their shapes only)."""
    meta = next(model.parameters()).is_meta
    for name, kind in quantized_modules(state).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, child, None)
        cls, parts = KINDS[kind]
        if not isinstance(module, cls) or isinstance(module, QuantizedAttend):
            raise InputError(f"the calibration quantizes {name}, which is not a {kind} here")
        amax = [state[f"{name}.{part}.amax"] for part in parts]
        if meta:
            amax = [torch.empty(a.shape, dtype=torch.float32, device="meta") for a in amax]
        if kind == "Linear":
            assert isinstance(module, nn.Linear)
            setattr(parent, child, QuantizedLinear(module, amax[0], amax[1], precision))
        else:
            setattr(parent, child, QuantizedAttend(amax[0], amax[1], amax[2], precision))
    return model


def translation_table() -> dict[Any, Any]:
    """``custom_translation_table`` for ``torch.onnx.export(dynamo=True)``: the stand-in's
    ``fake_quant`` as QuantizeLinear / DequantizeLinear."""
    import onnx
    from onnxscript import opset19

    op: Any = opset19  # traced by the exporter: its typed signatures do not apply here

    def zero(precision: str, channels: int) -> onnx.TensorProto:
        kind = onnx.TensorProto.FLOAT8E4M3FN if precision == "fp8" else onnx.TensorProto.INT8
        return onnx.helper.make_tensor("zero", kind, [channels] if channels else [],
                                       [0] * max(1, channels))  # fmt: skip

    def fake_quant(x: Any, amax: Any, precision: str, channels: int) -> Any:
        levels = op.Constant(value_float=LEVELS[precision])
        scale = op.CastLike(op.Div(amax, op.CastLike(levels, amax)), x)
        if channels:  # a scale per output channel: 1-D along axis 0, the [out, 1] amax flattened
            scale = op.Reshape(scale, op.Constant(value_ints=[-1]))
            point = op.Constant(value=zero(precision, channels))
            q = op.QuantizeLinear(x, scale, point, axis=0)
            return op.DequantizeLinear(q, scale, point, axis=0)
        point = op.Constant(value=zero(precision, 0))
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, point), scale, point)

    return {torch.ops.zimage_trt.fake_quant.default: fake_quant}
