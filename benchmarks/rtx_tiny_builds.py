"""TensorRT-RTX builds of the tiny model, ahead of time on a machine without a GPU: every engine
of the reference workflow at fp32 and bf16, for each RTX target on its own and for all at once.

    python benchmarks/rtx_tiny_builds.py --out benchmarks/results/     # ~3 minutes on 2 cores

The ONNX graphs come from one ``build --backend tensorrt-rtx`` per precision (its own profiles
and checks); each engine is then compiled again per target. Writes ``rtx-tiny-builds.json`` and
``rtx-tiny-builds.md`` (engine × precision × targets → plan MiB, build seconds, layers). Plans
are not run: TensorRT-RTX needs an RTX-class GPU to deserialize them.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

from zimage_trt.atomic import write_json, write_text
from zimage_trt.build_engines.build import run_build
from zimage_trt.build_engines.plan import BuildOptions, plan_build
from zimage_trt.build_engines.tensorrt_builder import build_tensorrt_engine
from zimage_trt.engines.manifest import read_manifest
from zimage_trt.engines.tensorrt_env import RTX_DEFAULT_TARGETS, require_tensorrt_rtx
from zimage_trt.text_table import text_table
from zimage_trt.workflow import load_workflow

NAME = "rtx-tiny-builds"


def measure(work: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for precision in ("fp32", "bf16"):
        options = BuildOptions(backend="tensorrt-rtx", precision=precision, check_parity=False,
                               compute_capability=RTX_DEFAULT_TARGETS[0])  # fmt: skip
        plan = plan_build(options, model="tiny", workflow=load_workflow("zimage-121101"))
        folder = work / precision
        run_build(plan, options, folder, log=lambda msg: None)
        for name, entry in read_manifest(folder).engines.items():
            onnx = next(rel for rel in entry.files if rel.endswith(".onnx"))
            for targets in [(cc,) for cc in RTX_DEFAULT_TARGETS] + [RTX_DEFAULT_TARGETS]:
                info = build_tensorrt_engine(
                    folder / onnx, work / "plan", entry.profiles, library="tensorrt_rtx",
                    compute_capabilities=targets, log=lambda msg: None,
                )  # fmt: skip
                rows.append({
                    "engine": name, "precision": precision, "targets": list(targets),
                    "profiles": len(entry.profiles), "plan_bytes": info.engine_bytes,
                    "seconds": round(info.seconds, 3),
                    "layers": sum(n for by in info.layers.values() for n in by.values()),
                })  # fmt: skip
                size = f"{info.engine_bytes / 2**20:.2f} MiB, {info.seconds:.2f} s"
                print(f"{name} {precision} {','.join(targets)}: {size}", file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON and table")
    args = parser.parse_args(argv)
    version = require_tensorrt_rtx()
    with tempfile.TemporaryDirectory() as work:
        rows = measure(Path(work))
    machine = {"cpu": platform.processor() or platform.machine(), "gpu": "none"}
    command = "python benchmarks/rtx_tiny_builds.py --out benchmarks/results/"
    write_json(args.out / f"{NAME}.json", {
        "library": {"name": "tensorrt_rtx", "version": version}, "machine": machine,
        "model": "tiny (random weights, real architectures)", "workflow": "zimage-121101",
        "command": command, "rows": rows,
    })  # fmt: skip
    table = [("engine", "precision", "targets", "profiles", "plan MiB", "seconds", "layers")]
    table += [(r["engine"], r["precision"], ",".join(r["targets"]), str(r["profiles"]),
               f"{r['plan_bytes'] / 2**20:.2f}", f"{r['seconds']:.2f}", str(r["layers"]))
              for r in rows]  # fmt: skip
    write_text(args.out / f"{NAME}.md", (
        f"# TensorRT-RTX {version}: tiny-model plans built ahead of time, no GPU\n\n"
        f"`{command}` — plans compiled, never run (no RTX GPU here).\n\n```\n"
        + text_table(table, right=(3, 4, 5, 6)) + "\n```\n"
    ))  # fmt: skip
    print(f"wrote {args.out / NAME}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
