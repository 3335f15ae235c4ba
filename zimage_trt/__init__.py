"""zimage-trt: compiled inference for Z-Image-Turbo."""

__version__ = "0.1.0"
