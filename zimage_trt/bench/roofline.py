"""The roofline's numbers: FLOPs of one DiT forward from its config and token counts, the dense
bf16 peaks of known GPUs, and achieved TFLOP/s against them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from zimage_trt.errors import InputError
from zimage_trt.models.dit import SEQ_MULTIPLE, DiTConfig

# Dense (no sparsity) bf16 tensor peaks, FLOP/s, matched against torch's device name.
GPU_BF16_PEAK: dict[str, float] = {
    "H100": 989.4e12,
    "H200": 989.4e12,
    "H800": 989.4e12,
    "A100": 312e12,
    "L40S": 362e12,
    "RTX 4090": 165.2e12,
}
GPU_PEAK_SOURCES: dict[str, str] = {
    "H100": "speed-anchors §5.1: H100 SXM5 dense bf16",
    "H200": "speed-anchors §5.1: same tensor peaks as H100 (same GH100 die)",
    "H800": "speed-anchors §5.1: assumed equal to H100 SXM (not verified)",
    "A100": "NVIDIA A100 datasheet: dense bf16",
    "L40S": "NVIDIA L40S datasheet: dense bf16",
    "RTX 4090": "NVIDIA Ada whitepaper: dense bf16, fp32 accumulate",
}
# H100 PCIe and NVL boards run lower clocks than the SXM5 peak above: left untabulated rather
# than overstated.
_H100_NOT_SXM = ("PCIE", "NVL")


def _padded(n: int) -> int:
    return -(-n // SEQ_MULTIPLE) * SEQ_MULTIPLE


@dataclass(frozen=True)
class DiTFlops:
    """FLOPs of one DiT forward (batch 1) by part; multiply-add = 2 FLOPs."""

    main: float  # the n_layers joint blocks on image + caption tokens
    noise_refiner: float  # refiner blocks on the image tokens
    context_refiner: float  # refiner blocks on the caption slots (the caption path)
    image_embed: float  # patch embedder and final layer
    caption_embed: float  # caption embedder

    @property
    def total(self) -> float:
        """The whole forward as the reference model runs it (speed-anchors §5.2)."""
        return (
            self.main
            + self.noise_refiner
            + self.context_refiner
            + self.image_embed
            + self.caption_embed
        )

    @property
    def denoiser(self) -> float:
        """What the denoiser engine computes per call (the caption path runs once per prompt)."""
        return self.main + self.noise_refiner + self.image_embed

    @property
    def caption_path(self) -> float:
        return self.context_refiner + self.caption_embed


def dit_flops(cfg: DiTConfig, image_tokens: int, caption_tokens: int) -> DiTFlops:
    """FLOPs per DiT forward at these token counts, padded to 32 as the model runs them.

    Per block and token the linear layers cost 2·(4·D² + 3·D·F) (fused qkv, out, SwiGLU), and
    attention 4·L²·D over its L tokens (scores and weighted sum, all heads). The per-sample
    timestep and adaLN MLPs (< 1 GFLOP) are left out.
    """
    if image_tokens < 1:
        raise InputError(f"image_tokens must be >= 1, got {image_tokens}")
    if caption_tokens < 1:
        raise InputError(f"caption_tokens must be >= 1, got {caption_tokens}")
    d, f = cfg.dim, cfg.ffn_dim
    per_token = 2.0 * (4 * d * d + 3 * d * f)

    def blocks(count: int, n: int) -> float:
        return count * (per_token * n + 4.0 * n * n * d)

    image, caption = _padded(image_tokens), _padded(caption_tokens)
    return DiTFlops(
        main=blocks(cfg.n_layers, image + caption),
        noise_refiner=blocks(cfg.n_refiner_layers, image),
        context_refiner=blocks(cfg.n_refiner_layers, caption),
        # the patch embedder and the final layer see the real tokens only (padding comes after)
        image_embed=2.0 * 2 * cfg.patch_dim * d * image_tokens,
        caption_embed=2.0 * cfg.cap_feat_dim * d * caption,
    )


def roofline_flops(cfg: DiTConfig, image_tokens: int, caption_tokens: int) -> float:
    """FLOPs of one DiT forward (main and refiner blocks, attention, embedders), batch 1."""
    return dit_flops(cfg, image_tokens, caption_tokens).total


def image_tokens(cfg: DiTConfig, latent_h: int, latent_w: int) -> int:
    return (latent_h // cfg.patch_size) * (latent_w // cfg.patch_size)


def gpu_bf16_peak(name: str | None) -> tuple[float, str] | None:
    """(dense bf16 FLOP/s, source) of a GPU by its device name; None when not tabulated."""
    if not name:
        return None
    upper = name.upper()
    for key in sorted(GPU_BF16_PEAK, key=len, reverse=True):
        if key.upper() in upper:
            if key == "H100" and any(tag in upper for tag in _H100_NOT_SXM):
                return None
            return GPU_BF16_PEAK[key], GPU_PEAK_SOURCES[key]
    return None


def flops_rate(
    flops: float | None, seconds: float, peak: tuple[float, str] | None
) -> dict[str, Any]:
    """FLOPs, achieved TFLOP/s and fraction of the bf16 peak of a call that took ``seconds``
    (all None without a FLOP count; the fraction None without a tabulated peak)."""
    if flops is None:
        return {"flops": None, "tflops_per_s": None, "fraction_of_bf16_peak": None}
    achieved = flops / seconds
    return {
        "flops": flops,
        "tflops_per_s": achieved / 1e12,
        "fraction_of_bf16_peak": achieved / peak[0] if peak is not None else None,
    }
