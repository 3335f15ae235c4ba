"""ModelOpt's post-training quantization of the DiT, as data: the config a precision names, the
quantizers it puts in, and their calibrated state saved and restored without pickle.

``quant_config`` is plain JSON (ModelOpt's rule list: every quantizer off, then the weight and
input quantizers of each Linear on in the precision's format — with ``attention``, the FP8
q/k/v quantizers of every ``models.dit.Attend`` too — then the exclusions off again);
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
from zimage_trt.models.dit import FULL_PRECISION_PARTS, Attend

if TYPE_CHECKING:
    from torch import Tensor, nn

PRECISIONS = ("fp8", "int8")
DEFAULT_EXCLUDE = FULL_PRECISION_PARTS  # NVIDIA's exclusions for FLUX / SD3
FORMATS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {  # (weights, inputs)
    # E4M3, one scale per tensor (amax / 448)
    "fp8": ({"num_bits": [4, 3], "axis": None}, {"num_bits": [4, 3], "axis": None}),
    # INT8: a scale per output channel for the weights, per tensor for the inputs
    "int8": ({"num_bits": 8, "axis": 0}, {"num_bits": 8, "axis": None}),
}
# the text encoder's token embedding stays in full precision (NVIDIA's LLM recipes: Linears only)
TEXT_ENCODER_EXCLUDE = ("embed_tokens",)
# the DiT's attention inputs after RoPE (ModelOpt's names, as in its diffusers plugin)
ATTENTION_QUANTIZERS = ("q_bmm_quantizer", "k_bmm_quantizer", "v_bmm_quantizer")
FP8_ONLY = {
    "attention": "--quantize-attention is FP8 only (TensorRT's fused attention quantizes q/k/v "
    "to FP8; there is no INT8 attention): use --precision fp8",
    "text_encoder": "--quantize-text-encoder is FP8 only (Qwen3's INT8 activations need "
    "SmoothQuant, which is not offered): use --precision fp8",
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


def quant_config(
    precision: str, exclude: Sequence[str] = DEFAULT_EXCLUDE, *, attention: bool = False
) -> dict[str, Any]:
    """ModelOpt's config for ``precision`` with ``exclude`` (module-name fragments) left out;
    ``attention``: the q/k/v quantizers too (FP8 only)."""
    if precision not in FORMATS:
        raise InputError(f"precision {precision!r} is not one of: {', '.join(PRECISIONS)}")
    if attention and precision != "fp8":
        raise InputError(FP8_ONLY["attention"])
    weights, inputs = FORMATS[precision]
    rules: list[dict[str, Any]] = [
        {"quantizer_name": "*", "enable": False},
        {"quantizer_name": "*weight_quantizer", "cfg": dict(weights)},
        {"quantizer_name": "*input_quantizer", "cfg": dict(inputs)},
    ]
    if attention:
        rules.append({"quantizer_name": "*[qkv]_bmm_quantizer", "cfg": dict(inputs)})
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
    _register_attend()
    with contextlib.redirect_stdout(io.StringIO()):  # its "Inserted N quantizers" (we say more)
        return mtq.quantize(dit, _modelopt_form(config), forward_loop=forward_loop)


def _register_attend() -> None:
    """Teach ModelOpt the DiT's ``Attend`` module: three quantizers on its q, k and v (off
    unless the config turns them on)."""
    from modelopt.torch.quantization.nn import QuantModule, QuantModuleRegistry, TensorQuantizer

    if Attend in QuantModuleRegistry:
        return

    class QuantAttend(QuantModule):
        def _setup(self) -> None:
            for name in ATTENTION_QUANTIZERS:
                setattr(self, name, TensorQuantizer())

        def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
            quantized = [
                getattr(self, n)(t) for n, t in zip(ATTENTION_QUANTIZERS, (q, k, v), strict=True)
            ]
            out: Tensor = super().forward(*quantized, mask)
            return out

    QuantModuleRegistry.register({Attend: "zimage_trt.Attend"})(QuantAttend)


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
def unquantized(*models: nn.Module) -> Iterator[None]:
    """The ``models``' quantizers switched off for the block: the full-precision models they
    came from."""
    held = [q for model in models for q in quantizers(model).values()]
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
