"""FP8 / INT8 post-training quantization of the DiT with NVIDIA ModelOpt, calibrated on the
workflow itself (``calibrate``), its state saved without pickle (``quantize``)."""
