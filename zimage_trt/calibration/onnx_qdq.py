"""FP8 Q/DQ ONNX from a calibrated DiT: what the dynamo exporter needs to translate ModelOpt's
fake quantization into standard ONNX (the builder uses it; ``build --calibration`` is to come).

Under export, each enabled FP8 quantizer is one ``tensorrt::quantize_op(x, amax, 8, 4, …)``
call, which the exporter cannot translate; ``translation_table`` maps it to standard
``QuantizeLinear`` / ``DequantizeLinear`` (opset 19) with a FLOAT8E4M3FN zero point and ``scale =
amax / 448`` — TensorRT's explicit-quantization form. The exporter lifts each quantizer's amax as
a constant it cannot save (a fake tensor); ``refill_amax`` writes the calibrated value into each
and names it ``<quantizer>.amax``.

One quantized Linear exported this way computes exactly ModelOpt's FP8 fake quantization
(tests/test_calibration.py). A whole network agrees with the torch fake-quant model only
approximately: a last-bit difference in a matmul moves a value across an FP8 rounding step
(6 % apart at 3 mantissa bits) at the next quantizer, and on the tiny random DiT those steps add
up to a few per cent — the reference evaluator and ONNX Runtime differ from each other by as much.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from zimage_trt.errors import InputError

if TYPE_CHECKING:
    import onnx_ir as ir
    from torch import nn

OPSET = 19  # the first with FLOAT8E4M3FN in QuantizeLinear / DequantizeLinear
E4M3_MAX = 448.0
_LIFTED = re.compile(
    r"^(?P<module>.*)\.__dict__\['_modules'\]\['(?P<quantizer>\w+)'\]\.lifted_tensor_\d+$"
)


def translation_table() -> dict[Any, Any]:
    """``custom_translation_table`` for ``torch.onnx.export(dynamo=True)`` of an FP8 model."""
    import onnx
    import torch
    from onnxscript import opset19

    op: Any = opset19  # traced by the exporter: its typed signatures do not apply here

    zero = onnx.helper.make_tensor("zero", onnx.TensorProto.FLOAT8E4M3FN, [], [0.0])

    def quantize_op(
        x: Any,
        amax: Any,
        num_bits: int = 8,
        exponent_bits: int = 4,
        unsigned: bool = False,
        narrow_range: bool = False,
    ) -> Any:
        if (num_bits, exponent_bits) != (8, 4):
            raise InputError(
                f"only FP8 E4M3 quantizers export through this table (got {num_bits} bits, "
                f"{exponent_bits} exponent bits)"
            )
        scale = op.CastLike(op.Div(amax, op.CastLike(op.Constant(value_float=E4M3_MAX), amax)), x)
        point = op.Constant(value=zero)
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, point), scale)

    return {torch.ops.tensorrt.quantize_op.default: quantize_op}


def refill_amax(model: ir.Model, module: nn.Module) -> int:
    """Give every amax constant the exporter lifted from ``module``'s quantizers its calibrated
    value and the name ``<quantizer>.amax``; the count refilled."""
    import onnx_ir as ir

    from zimage_trt.calibration.quantize import quantizers

    held = quantizers(module)
    initializers = model.graph.initializers
    filled = 0
    for old in list(initializers):
        match = _LIFTED.match(old)
        if match is None:
            continue
        name = f"{match['module']}.{match['quantizer']}"
        if name not in held:
            raise InputError(f"the graph quantizes with {name}, which the module does not hold")
        value = initializers.pop(old)
        amax = held[name].amax.detach().float().cpu().numpy()
        if value.shape is not None:
            amax = amax.reshape(value.shape.numpy())
        value.const_value = ir.tensor(amax)
        value.name = f"{name}.amax"
        initializers[value.name] = value
        filled += 1
    return filled
