"""The real-width Z-Image DiT compiled by TensorRT-RTX, bf16, with the reference workflow's three
stage profiles, ahead of time on a machine without a GPU — under a memory cap, so that running
out of memory ends the build and not the machine.

    python benchmarks/export_full_size.py /work/fullsize/denoiser.onnx            # 30 blocks
    python benchmarks/rtx_full_size.py /work/fullsize/denoiser.onnx --cap 20G \\
        --target 8.9 --out benchmarks/results/

The graph comes from ``export_full_size.py`` (the builder's low-memory export route, random
weights; ``--layers N`` there exports a real-width slice of N main blocks). The build runs in a
child process; the cap is a cgroup memory limit where this machine lets us make one (cgroup v2
``memory.max`` or v1 ``memory.limit_in_bytes``), else ``RLIMIT_AS`` (``prlimit --as``). The
child's peak RSS (``wait4``), its wall time, the builder's phases, the plan size (or how it
ended) are appended to ``rtx-full-size.json`` and written as a table to ``rtx-full-size.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

NAME = "rtx-full-size"
CGROUPS = (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/memory"))


def parse_bytes(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text[-1:] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def make_cgroup(cap: int) -> tuple[Path, str] | None:
    """A fresh memory cgroup limited to ``cap`` bytes: (its folder, "cgroup v2"/"cgroup v1");
    None where this machine does not let us make one."""
    name = f"zimage-trt-rtx-build-{os.getpid()}"
    for root, limit, kind in ((CGROUPS[0], "memory.max", "cgroup v2"),
                              (CGROUPS[1], "memory.limit_in_bytes", "cgroup v1")):  # fmt: skip
        if not (root / limit).exists() and not (root / "cgroup.controllers").exists():
            continue
        folder = root / name
        try:
            folder.mkdir()
            (folder / limit).write_text(str(cap))
            if kind == "cgroup v1" and (folder / "memory.memsw.limit_in_bytes").exists():
                (folder / "memory.memsw.limit_in_bytes").write_text(str(cap))  # no swap either
            return folder, kind
        except OSError:
            if folder.exists():
                folder.rmdir()
    return None


def child(onnx_path: Path, plan_path: Path, targets: tuple[str, ...]) -> int:
    """The build itself (in the capped process): prints phases, then its figures as JSON."""
    sys.path.insert(0, str(Path(__file__).parent))
    from export_full_size import denoiser_profiles

    from zimage_trt.build_engines.tensorrt_builder import build_tensorrt_engine
    from zimage_trt.models.dit import DiTConfig

    graph = json.loads((onnx_path.parent / "figures.json").read_text())
    _, profiles = denoiser_profiles(DiTConfig(n_layers=graph["layers"]))
    start = time.time()

    def progress(phase: str, done: int, steps: int) -> None:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"[{time.time() - start:7.1f} s, peak RSS {rss:5.2f} GiB] {phase} {done}/{steps}",
              file=sys.stderr, flush=True)  # fmt: skip

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    info = build_tensorrt_engine(
        onnx_path, plan_path, profiles, library="tensorrt_rtx",
        compute_capabilities=targets, progress=progress, log=log,
    )  # fmt: skip
    by_dtype: dict[str, int] = {}
    for counts in info.layers.values():
        for dtype, n in counts.items():
            by_dtype[dtype] = by_dtype.get(dtype, 0) + n
    print(json.dumps({"plan_bytes": info.engine_bytes, "builder_seconds": round(info.seconds, 1),
                      "layers": sum(by_dtype.values()), "layers_by_dtype": by_dtype,
                      "profiles": list(info.profiles)}))  # fmt: skip
    return 0


def watch_rss(pid: int, samples: list[tuple[float, int, int]], stop: threading.Event) -> None:
    """The child's resident memory every 2 s: (seconds, anonymous bytes, file-backed bytes) —
    the file-backed part is the ONNX weights mapped from disk, which the kernel can drop."""
    start = time.time()
    while not stop.wait(2.0):
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        try:
            anon, file = (int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile"))
        except (KeyError, ValueError):
            continue
        samples.append((round(time.time() - start, 1), anon, file))


def run(args: argparse.Namespace) -> dict[str, Any]:
    cap = parse_bytes(args.cap)
    cgroup = make_cgroup(cap)
    how = f"{cgroup[1]} memory limit" if cgroup else "RLIMIT_AS (prlimit --as)"

    def enter_cap() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if cgroup:
            (cgroup[0] / "cgroup.procs").write_text(str(os.getpid()))
        else:
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    plan = args.onnx.with_suffix(".plan")
    command = [sys.executable, __file__, str(args.onnx), "--child", "--target", args.target]
    start = time.time()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, preexec_fn=enter_cap)
    samples: list[tuple[float, int, int]] = []
    stop = threading.Event()
    watcher = threading.Thread(target=watch_rss, args=(proc.pid, samples, stop), daemon=True)
    watcher.start()
    _, status, usage = os.wait4(proc.pid, 0)
    stop.set()
    seconds = time.time() - start
    out = proc.stdout.read() if proc.stdout else ""
    code = os.waitstatus_to_exitcode(status)
    graph = json.loads((args.onnx.parent / "figures.json").read_text())
    row: dict[str, Any] = {
        "graph": graph, "targets": args.target.split(","), "cap_bytes": cap, "cap": how,
        "exit": code, "seconds": round(seconds, 1), "peak_rss_bytes": usage.ru_maxrss * 1024,
        "peak_anon_bytes": max((a for _, a, _ in samples), default=0),
        "rss_timeline": samples[:: max(1, len(samples) // 60)],
    }  # fmt: skip
    if cgroup:
        for stat in ("memory.peak", "memory.max_usage_in_bytes"):  # page cache included
            if (cgroup[0] / stat).exists():
                row["cgroup_peak_bytes"] = int((cgroup[0] / stat).read_text())
        for events in ("memory.events", "memory.oom_control"):
            if (cgroup[0] / events).exists():
                row["cgroup_events"] = (cgroup[0] / events).read_text().split("\n")
        cgroup[0].rmdir()
    if code == 0:
        row.update(json.loads(out.strip().splitlines()[-1]))
        row["result"] = "built"
        plan.unlink()  # measured; 12 GB that nobody runs here
    elif code == -signal.SIGKILL:
        row["result"] = "killed at the memory cap (out of memory)"
    else:
        row["result"] = f"failed (exit {code})"
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("onnx", type=Path, help="the exported denoiser (export_full_size.py)")
    parser.add_argument("--cap", default="20G", help="memory cap for the build (default 20G)")
    parser.add_argument("--target", default="8.9", help="compute capabilities, e.g. 8.9,12.0")
    parser.add_argument("--out", type=Path, help="folder for rtx-full-size.json and .md")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--table-only",
        action="store_true",
        help="rewrite the table from the JSON in --out; build nothing",
    )
    args = parser.parse_args(argv)
    targets = tuple(args.target.split(","))
    if args.child:
        return child(args.onnx, args.onnx.with_suffix(".plan"), targets)
    if args.table_only:
        write_results(args.out, None)
        return 0
    row = run(args)
    row["command"] = "python benchmarks/rtx_full_size.py " + " ".join(
        [str(args.onnx), "--cap", args.cap, "--target", args.target]
    )
    print(json.dumps({k: v for k, v in row.items() if k != "rss_timeline"}, indent=1))
    if args.out:
        write_results(args.out, row)
    return 0 if row["exit"] == 0 else 1


def write_results(out: Path, row: dict[str, Any] | None) -> None:
    """Append ``row`` (None: none) to the JSON and write the table from every run in it."""
    from zimage_trt.atomic import write_json, write_text
    from zimage_trt.engines.tensorrt_env import require_tensorrt_rtx
    from zimage_trt.text_table import text_table

    path = out / f"{NAME}.json"
    data = json.loads(path.read_text()) if path.is_file() else {
        "library": {"name": "tensorrt_rtx", "version": require_tensorrt_rtx()},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                    "swap": "none", "gpu": "none"},
        "runs": [],
    }  # fmt: skip
    if row is not None:
        data["runs"].append(row)
        write_json(path, data)
    gib = 2**30
    table = [("main blocks", "params B", "ONNX data GiB", "targets", "cap GiB", "result",
              "wall s", "peak RSS GiB", "anon GiB", "plan GiB")]  # fmt: skip
    for r in data["runs"]:
        g = r["graph"]
        table.append((str(g["layers"]), f"{g['params'] / 1e9:.2f}", f"{g['data_bytes'] / gib:.2f}",
                      ",".join(r["targets"]), f"{r['cap_bytes'] / gib:.0f}", r["result"],
                      f"{r['seconds']:.0f}", f"{r['peak_rss_bytes'] / gib:.2f}",
                      f"{r['peak_anon_bytes'] / gib:.2f}" if "peak_anon_bytes" in r else "-",
                      f"{r['plan_bytes'] / gib:.2f}" if "plan_bytes" in r else "-"))  # fmt: skip
    commands = "\n".join(f"    {r['command']}" for r in data["runs"])
    write_text(out / f"{NAME}.md", (
        f"# TensorRT-RTX {data['library']['version']}: the real-width DiT, bf16, three stage "
        "profiles, built ahead of time without a GPU\n\n"
        f"{data['machine']['cores']} cores, {data['machine']['ram_bytes'] / gib:.0f} GiB RAM, no "
        "swap, no GPU; random weights (`benchmarks/export_full_size.py`), profiles of "
        "zimage-121101 (base 1-2×16×28×22, refine 1×16×54×42, upscale 1×16×108×84; captions "
        "1…4096 tokens). Peak RSS: the child's maximum resident set (`wait4`), which counts "
        "the ONNX weights mapped from disk; anon: the largest anonymous part sampled every 2 s "
        "(what the cap cannot reclaim).\n\n```\n"
        + text_table(table, right=(0, 1, 2, 4, 6, 7, 8, 9)) + "\n```\n\n"
        "Each graph: `python benchmarks/export_full_size.py DIR/denoiser.onnx --layers N` "
        "(streamed random weights, peak RSS ≈ 1 GiB, 3–5 min). Each build:\n\n"
        f"{commands}\n"
    ))  # fmt: skip
    print(f"wrote {path} and {NAME}.md")


if __name__ == "__main__":
    sys.exit(main())
