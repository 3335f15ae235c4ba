"""Parity checks for graphs too big to run whole here: a real-width slice of the network.

The 6 B DiT or the 4 B text encoder cannot run as one ONNX Runtime session beside its torch
module in 24 GB of RAM. What can run: the same network with one block per stack (its widths, its
checkpoint's own weights for those blocks), exported by the same route and compared at two small
shapes. Together with the ONNX checker on the whole graph, this is the full-size build's check.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from zimage_trt.build_engines.networks import PRECISIONS, ShapePoint, networks
from zimage_trt.build_engines.onnx_export import export_network, module_weights
from zimage_trt.build_engines.parity import ParityRow, check_parity
from zimage_trt.errors import InputError
from zimage_trt.models.dit import CaptionPath, RopeTables, ZImageDiT, rope_table_lengths
from zimage_trt.models.text_encoder import Qwen3TextEncoder

BF16_WHOLE_GRAPH_MAX = 50_000_000  # parameters: beyond this the reference evaluator takes hours
M = TypeVar("M", bound=nn.Module)


def whole_graph_fits(precision: str, parity_mode: str, module: nn.Module) -> bool:
    """Whole-graph parity when an fp32 session and the module fit in half the free RAM (and,
    for bf16, the graph is small enough for ONNX's slow reference evaluator); else a slice.
    ``parity_mode`` "whole" or "slice" forces the choice."""
    if parity_mode != "auto":
        return parity_mode == "whole"
    n = sum(p.numel() for p in module.parameters())
    if precision == "bf16" and n > BF16_WHOLE_GRAPH_MAX:
        return False
    return 3 * 4 * n < available_ram_bytes() // 2


def available_ram_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30  # unknown: assume a small machine


def slice_parity(
    name: str, configs: dict[str, Any], precision: str, full: nn.Module
) -> list[ParityRow]:
    """Parity of a real-width slice of ``full`` (the whole DiT or text encoder) for engine
    ``name``; ``configs`` holds the three networks' configs ("dit", "text_encoder", "vae")."""
    dtype = PRECISIONS[precision]
    lim = ShapePoint(2, 64, 16, 16)
    configs = dict(configs)
    pair: tuple[nn.Module, nn.Module]
    if isinstance(full, ZImageDiT):
        configs["dit"] = cfg = replace(full.config, n_layers=1, n_refiner_layers=1)
        lengths = rope_table_lengths(lim.tokens, lim.height, lim.width)
        real = _load_slice(ZImageDiT(cfg), full, dtype)
        meta = _on_meta(lambda: ZImageDiT(cfg)).to(dtype)
        # tables after the dtype cast: they stay fp32
        real.rope_tables = RopeTables(cfg, lengths)
        meta.rope_tables = _on_meta(lambda: RopeTables(cfg, lengths))
        pair = (CaptionPath(real), CaptionPath(meta)) if name == "caption_path" else (real, meta)
    elif isinstance(full, Qwen3TextEncoder):
        configs["text_encoder"] = cfg_te = replace(full.config, num_hidden_layers=2)
        pair = (
            _load_slice(Qwen3TextEncoder(cfg_te), full, dtype),
            _on_meta(lambda: Qwen3TextEncoder(cfg_te)).to(dtype),
        )
    else:
        raise InputError(f"{name}: no slice defined for {type(full).__name__}")
    net = networks(precision, configs["dit"], configs["text_encoder"], configs["vae"])[name]
    with tempfile.TemporaryDirectory(prefix="zimage-trt-slice-") as tmp:
        graph = Path(tmp) / f"{name}-slice.onnx"
        export_network(net, pair[1], module_weights(pair[0]), graph,
                       example=ShapePoint(2, 40, 12, 10), limits=lim)  # fmt: skip
        points = [ShapePoint(1, 20, 8, 6), ShapePoint(2, 64, 12, 10)]
        rows = check_parity(net, graph, pair[0], points, precision)
    return [replace(r, runner=f"{r.runner} (real-width slice)") for r in rows]


def _on_meta(make: Callable[[], M]) -> M:
    with torch.device("meta"):
        return make()


def _load_slice(model: M, full: nn.Module, dtype: torch.dtype) -> M:
    """``model`` (fewer blocks) with ``full``'s weights under the same names."""
    state = full.state_dict()
    model.load_state_dict({k: state[k] for k in model.state_dict()}, strict=True)
    return model.to(dtype).eval()
