#!/usr/bin/env bash
# Typing set-up for CI (not a user's set-up step): the TensorRT type stubs, so that `mypy
# zimage_trt` checks every TensorRT call and tests/test_tensorrt_typecheck.py runs rather than
# skips. tensorrt-stubs pins a tensorrt wheel whose libraries are not on PyPI, hence --no-deps;
# its stub files need a py.typed marker and two syntax repairs (scripts/tensorrt_stubs.py).
set -euo pipefail
python -m pip install -q --no-deps tensorrt-stubs==10.13.0.35.1
python "$(dirname "$0")/tensorrt_stubs.py"
