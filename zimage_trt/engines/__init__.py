"""The engine protocol (``protocol``: named tensors in, named tensors out) and its backends —
eager torch (``torch_engines``), ``torch.compile`` (``compiled``), ONNX Runtime
(``onnxruntime_engines``) and TensorRT (``tensorrt_engines``, ``tensorrt_env``) — with the
engine folder (``folder``), its manifest, the builder↔runtime contract (``manifest``), and LoRA
refits (``refit``)."""
