#!/usr/bin/env bash
# Typing set-up for CI (not a user's set-up step; run after `pip install -e ".[dev]"`): the
# TensorRT and TensorRT-RTX type stubs, so that `mypy zimage_trt` checks every TensorRT call and
# tests/test_tensorrt_typecheck.py runs rather than skips. tensorrt-stubs pins a tensorrt wheel
# whose libraries are not on PyPI, hence --no-deps; its stub files need a py.typed marker and two
# syntax repairs (scripts/tensorrt_stubs.py).
set -euo pipefail
python -m pip install -q --no-deps tensorrt-stubs==10.13.0.35.1
python "$(dirname "$0")/tensorrt_stubs.py"

# TensorRT-RTX ships no stubs and no py.typed: generate them from the installed bindings (stubgen,
# ~2,900 typed lines; it comes with mypy, so this runs after the dev install) into typings/, which
# pyproject's mypy_path names, and repair the one syntax defect they share with tensorrt-stubs.
stubs="$(dirname "$0")/../typings"
rm -rf "$stubs/tensorrt_rtx_bindings" "$stubs/tensorrt_rtx"
stubgen --inspect-mode --quiet -p tensorrt_rtx_bindings -o "$stubs"
python "$(dirname "$0")/tensorrt_stubs.py" --stub "$stubs/tensorrt_rtx_bindings/tensorrt_rtx.pyi"
mkdir -p "$stubs/tensorrt_rtx"
printf 'from tensorrt_rtx_bindings.tensorrt_rtx import *\n\n__version__: str\n' \
    > "$stubs/tensorrt_rtx/__init__.pyi"
echo "tensorrt_rtx stubs generated in typings/"
