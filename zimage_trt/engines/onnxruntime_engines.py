"""The ONNX Runtime backend: the exported graphs behind the engine interface.

Runs on any CPU (fp32 graphs; ONNX Runtime's CPU provider has no bf16 kernels) and on ORT's CUDA
provider where installed. Inputs are cast to the dtypes the graph declares and checked against
the built profiles before they reach the session.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from zimage_trt.engines.manifest import Profile, select_profile
from zimage_trt.engines.protocol import dtype_from_name
from zimage_trt.errors import InputError, UnavailableError


def onnxruntime_providers(device: torch.device) -> list[str]:
    """CUDA first on a CUDA device when ORT has it; a CUDA request without it is an error."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise UnavailableError(
                "device cuda requested, but this onnxruntime has no CUDAExecutionProvider "
                f"(it has: {', '.join(available)}); install onnxruntime-gpu or use --device cpu"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def ort_options() -> Any:
    """ONNX Runtime's session options for this project's graphs: quiet, and Q/DQ pairs computed
    as written (dequantize, then the float op) — ONNX Runtime 1.32 fuses an INT8 Q/DQ MatMul
    into its own integer kernels, whose rounding lies a step and more from the quantized math
    that TensorRT and ModelOpt compute."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    return options


class OnnxRuntimeEngine:
    def __init__(
        self,
        name: str,
        graph: Path,
        inputs: dict[str, str],
        outputs: dict[str, str],
        profiles: Sequence[Profile],
        *,
        device: torch.device,
        hint: str = "",
        weights: Mapping[str, Tensor] | None = None,
    ) -> None:
        """``weights``: initializers to replace by name (other LoRAs, ``engines.refit``)."""
        providers = onnxruntime_providers(device)
        if device.type == "cpu" and "bfloat16" in {*inputs.values(), *outputs.values()}:
            raise UnavailableError(
                f"engine {name!r} is a bf16 graph: ONNX Runtime's CPU provider cannot run bf16; "
                "run it on a GPU (--device cuda with onnxruntime-gpu) or build with "
                "--precision fp32"
            )
        self.name = name
        self.graph = graph
        self.providers = providers
        self._overrides: list[Any] = []
        self.session = self._session(weights or {})
        self.input_dtypes = {k: dtype_from_name(v) for k, v in inputs.items()}
        self.output_names = list(outputs)
        self.profiles = list(profiles)
        self.device = device
        self.hint = hint

    def _session(self, weights: Mapping[str, Tensor]) -> Any:
        import onnxruntime as ort

        options = ort_options()
        overrides = [_ort_value(t) for t in weights.values()]
        if weights:
            # in place of the external data, before graph optimization (add_initializer comes
            # after constant folding: a folded Transpose(weight) would keep the old value)
            options.add_external_initializers(list(weights), overrides)
        session = ort.InferenceSession(str(self.graph), options, providers=self.providers)
        self._overrides = overrides  # ORT reads the values in place: they outlive the session
        return session

    def refit(
        self, weights: Mapping[str, Tensor], more: Mapping[str, Tensor] | None = None
    ) -> None:
        """New values for the graph's weights (a LoRA switch between batches,
        ``runtime.loras``): ONNX Runtime fixes initializers when a session is made, so the
        session is made again with them (``more`` is TensorRT's concern, unused here)."""
        self.session = self._session(weights)

    def __call__(self, **inputs: Tensor) -> dict[str, Tensor]:
        missing = [n for n in self.input_dtypes if n not in inputs]
        if missing:
            raise InputError(f"engine {self.name!r} needs inputs {missing}")
        shapes = {n: tuple(inputs[n].shape) for n in self.input_dtypes}
        select_profile(self.name, self.profiles, shapes, self.hint)
        feeds = {n: to_numpy(inputs[n].to(dtype)) for n, dtype in self.input_dtypes.items()}
        outs = self.session.run(self.output_names, feeds)
        return {
            n: _from_numpy(o).to(self.device) for n, o in zip(self.output_names, outs, strict=True)
        }


def to_numpy(tensor: Tensor) -> np.ndarray:
    """A host array of ``tensor``; bf16 as ml_dtypes' bfloat16 (numpy has none)."""
    tensor = tensor.detach().contiguous().cpu()
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def _ort_value(tensor: Tensor) -> Any:
    import onnxruntime as ort

    array = np.ascontiguousarray(to_numpy(tensor))
    if array.dtype.name == "bfloat16":  # ORT takes bf16 as raw 16-bit words + the ONNX type
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array.view(np.uint16), 16)
    return ort.OrtValue.ortvalue_from_numpy(array)


def _from_numpy(array: np.ndarray) -> Tensor:
    array = np.ascontiguousarray(array)
    if array.dtype.name == "bfloat16":  # ml_dtypes' bfloat16, which torch cannot wrap directly
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)
