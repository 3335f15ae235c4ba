"""Full-size DiT denoiser export (bf16) by the builder's route: graph from the meta device, weights
streamed into one external-data file. No checkpoint is needed: the weights come from a lazy
mapping that makes each tensor when it is written (as a checkpoint read would), so this measures
the export route's own time and peak RAM at full size. Usage:

    python benchmarks/export_full_size.py /tmp/denoiser.onnx   # needs ~12 GB of free disk
    python benchmarks/export_full_size.py /tmp/slice.onnx --layers 8   # a real-width slice
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import Tensor, nn

from zimage_trt.build_engines.coverage import check_tensorrt_coverage
from zimage_trt.build_engines.networks import Network, ShapePoint, networks
from zimage_trt.build_engines.onnx_export import export_network
from zimage_trt.build_engines.profiles import caption_span, engine_profiles, limits, workflow_stages
from zimage_trt.engines.manifest import Profile
from zimage_trt.models.dit import DiTConfig, RopeTables, ZImageDiT, rope_table_lengths
from zimage_trt.models.text_encoder import Qwen3Config
from zimage_trt.models.vae import VAEConfig
from zimage_trt.workflow import load_workflow


class LazyRandom(Mapping[str, Tensor]):
    """name → a fresh random tensor of the parameter's shape, made when it is read."""

    def __init__(self, module: nn.Module, extra: dict[str, Tensor]) -> None:
        self.shapes = {n: (p.shape, p.dtype) for n, p in module.named_parameters()}
        self.extra = extra

    def __getitem__(self, key: str) -> Tensor:
        if key in self.extra:
            return self.extra[key]
        shape, dtype = self.shapes[key]
        return (torch.randn(shape) * 0.02).to(dtype)

    def __iter__(self) -> Iterator[str]:
        return iter([*self.shapes, *self.extra])

    def __len__(self) -> int:
        return len(self.shapes) + len(self.extra)


def denoiser_profiles(cfg: DiTConfig) -> tuple[Network, list[Profile]]:
    """The bf16 denoiser network and its three stage profiles for zimage-121101 (captions up to
    4096 tokens), as ``zimage-trt build`` makes them."""
    net = networks("bf16", cfg, Qwen3Config(), VAEConfig())["denoiser"]
    stages = workflow_stages(load_workflow("zimage-121101"))
    return net, engine_profiles({"denoiser": net}, stages, caption_span(4096, 32))["denoiser"]


def export_denoiser(
    path: Path, cfg: DiTConfig, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Export the denoiser of ``cfg`` (random weights) to ``path``; its figures."""
    net, profiles = denoiser_profiles(cfg)
    lim = limits(profiles, net)
    lengths = rope_table_lengths(lim.tokens, lim.height, lim.width)
    with torch.device("meta"):
        meta = ZImageDiT(cfg).to(torch.bfloat16)
        meta.rope_tables = RopeTables(cfg, lengths)
    tables = {f"rope_tables.{n}": b for n, b in RopeTables(cfg, lengths).named_buffers()}
    start = time.time()
    result = export_network(net, meta, LazyRandom(meta, tables), path,
                            example=ShapePoint(2, 40, 12, 10), limits=lim, log=log)  # fmt: skip
    return {
        "params": sum(p.numel() for p in meta.parameters()),
        "weights": result.initializers,
        "data_bytes": result.data_bytes,
        "seconds": round(time.time() - start, 1),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="the .onnx file to write (data beside it)")
    parser.add_argument("--layers", type=int, default=None,
                        help="main blocks (default: 30; fewer: a real-width slice)")  # fmt: skip
    args = parser.parse_args(argv)
    cfg = DiTConfig() if args.layers is None else DiTConfig(n_layers=args.layers)
    figures = export_denoiser(args.path, cfg)
    figures["layers"] = cfg.n_layers
    (args.path.parent / "figures.json").write_text(json.dumps(figures))  # rtx_full_size.py reads it
    print(f"params {figures['params'] / 1e9:.3f} B; {figures['weights']} weights, "
          f"{figures['data_bytes'] / 2**30:.2f} GiB data; {figures['seconds']:.0f} s; "
          f"peak RSS {figures['peak_rss_bytes'] / 2**30:.2f} GiB")  # fmt: skip
    onnx.checker.check_model(str(args.path))
    print("onnx checker ok;", check_tensorrt_coverage(args.path).summary())


if __name__ == "__main__":
    main()
