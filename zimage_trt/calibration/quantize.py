"""ModelOpt's post-training quantization of the DiT, as data: the config a precision names, the
quantizers it puts in, and their calibrated state saved and restored without pickle.

``quant_config`` is plain JSON (ModelOpt's rule list: every quantizer off, then the weight and
input quantizers of each Linear on in the precision's format, then the exclusions off again);
``quantize`` hands it to ``mtq.quantize`` with a forward loop; ``quantizer_state`` reads every
enabled quantizer's calibrated buffers (its ``_amax``: per tensor, or per output channel for
INT8 weights) and ``restore`` puts a saved state back into a fresh DiT, so that the fake-quant
model it gives computes exactly what the calibrated one computed.
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from zimage_trt.errors import InputError, MissingLibraryError

if TYPE_CHECKING:
    from torch import Tensor, nn

PRECISIONS = ("fp8", "int8")
# NVIDIA's exclusions for FLUX / SD3 (ModelOpt's diffusers example), in this DiT's names: the
# embedders and the final layer stay in full precision
DEFAULT_EXCLUDE = ("x_embedder", "t_embedder", "cap_embedder", "final_layer")
FORMATS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {  # (weights, inputs)
    # E4M3, one scale per tensor (amax / 448)
    "fp8": ({"num_bits": [4, 3], "axis": None}, {"num_bits": [4, 3], "axis": None}),
    # INT8: a scale per output channel for the weights, per tensor for the inputs
    "int8": ({"num_bits": 8, "axis": 0}, {"num_bits": 8, "axis": None}),
}


def modelopt_quantization() -> Any:
    """``modelopt.torch.quantization``, or an error saying what to install."""
    try:
        with warnings.catch_warnings():  # its notice about an untested transformers version
            warnings.filterwarnings("ignore", message=r"transformers .* is not tested")
            import modelopt.torch.quantization as mtq
    except ImportError as exc:
        raise MissingLibraryError(
            f"calibration needs NVIDIA ModelOpt ({exc}): pip install 'zimage-trt[calibrate]'"
        ) from None
    return mtq


def quant_config(precision: str, exclude: Sequence[str] = DEFAULT_EXCLUDE) -> dict[str, Any]:
    """ModelOpt's config for ``precision`` with ``exclude`` (module-name fragments) left out."""
    if precision not in FORMATS:
        raise InputError(f"precision {precision!r} is not one of: {', '.join(PRECISIONS)}")
    weights, inputs = FORMATS[precision]
    rules: list[dict[str, Any]] = [
        {"quantizer_name": "*", "enable": False},
        {"quantizer_name": "*weight_quantizer", "cfg": dict(weights)},
        {"quantizer_name": "*input_quantizer", "cfg": dict(inputs)},
    ]
    rules += [{"quantizer_name": f"*{part}*", "enable": False} for part in exclude]
    return {"quant_cfg": rules, "algorithm": "max"}


def _modelopt_form(config: dict[str, Any]) -> dict[str, Any]:
    """The JSON config as ModelOpt takes it (an FP8 format's bits as a tuple)."""
    out = copy.deepcopy(config)
    for rule in out["quant_cfg"]:
        bits = rule.get("cfg", {}).get("num_bits")
        if isinstance(bits, list):
            rule["cfg"]["num_bits"] = tuple(bits)
    return out


def quantize(
    dit: nn.Module, config: dict[str, Any], forward_loop: Callable[[nn.Module], None] | None
) -> nn.Module:
    """Insert the config's quantizers into ``dit`` (in place) and calibrate them by running
    ``forward_loop`` (None: insert only, e.g. before ``restore``)."""
    mtq = modelopt_quantization()
    with contextlib.redirect_stdout(io.StringIO()):  # its "Inserted N quantizers" (we say more)
        return mtq.quantize(dit, _modelopt_form(config), forward_loop=forward_loop)


def quantizers(dit: nn.Module) -> dict[str, Any]:
    """Every enabled ModelOpt quantizer of ``dit`` by module name."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    return {
        name: module
        for name, module in dit.named_modules()
        if isinstance(module, TensorQuantizer) and module.is_enabled
    }


def quantizer_state(dit: nn.Module) -> dict[str, Tensor]:
    """``<quantizer>.amax`` → its calibrated value, for every enabled quantizer; a quantizer left
    uncalibrated (its module never ran in the forward loop) is an error naming it."""
    state = {}
    missing = []
    for name, quantizer in quantizers(dit).items():
        amax = quantizer.amax
        if amax is None:
            missing.append(name)
            continue
        state[f"{name}.amax"] = amax.detach().float().cpu().contiguous()
    if missing:
        raise InputError(
            f"{len(missing)} quantizer(s) saw no data in the calibration loop (first: "
            f"{missing[0]}); exclude their modules with --exclude"
        )
    return state


@contextlib.contextmanager
def unquantized(dit: nn.Module) -> Iterator[None]:
    """``dit``'s quantizers switched off for the block: the full-precision model it came from."""
    held = list(quantizers(dit).values())
    for quantizer in held:
        quantizer.disable()
    try:
        yield
    finally:
        for quantizer in held:
            quantizer.enable()


def restore(dit: nn.Module, config: dict[str, Any], state: dict[str, Tensor]) -> nn.Module:
    """``dit`` quantized by ``config`` with the saved ``state`` (``quantizer_state``)."""
    quantize(dit, config, None)
    held = quantizers(dit)
    wanted = {key.removesuffix(".amax") for key in state}
    if wanted != set(held):
        extra, lacking = sorted(wanted - set(held)), sorted(set(held) - wanted)
        parts = [f"{len(extra)} saved quantizer(s) it lacks (first: {extra[0]})"] if extra else []
        if lacking:
            parts.append(f"{len(lacking)} of its quantizer(s) not saved (first: {lacking[0]})")
        raise InputError("the calibration does not fit this DiT: " + "; ".join(parts))
    for name, quantizer in held.items():
        quantizer.amax = state[f"{name}.amax"].to(next(dit.parameters()).device)
    return dit
