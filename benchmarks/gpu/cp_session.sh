#!/usr/bin/env bash
# Issue 25's GPU session for context parallelism, one command on one H100 (or H200; about 6 minutes):
#   1. the marked GPU tests of tests/test_model_context_parallel.py: compiled FlexAttention with the
#      query/key index tables' BlockMask = dense SDPA (fp32, bf16), the one-rank split path = the plain
#      path; on a host with 2+ GPUs also CP=2 = CP=1 on NCCL;
#   2. benchmarks/bench_ar_cp.py: the VideoAR-L stage-III step forced through the CP machinery at CP=1
#      against the plain step, same process, alternating rounds (goal: split / plain tokens/s >= 0.99),
#      without and with Random Frame Mask p = 0.1, and with model.flex_kernel=flash where flash-attn-4 is
#      installed.
# Every step has its own time limit and the whole session a budget (BUDGET_S, default 500 s), as in
# benchmarks/gpu/pretokenize_session.sh. Output, all tee'd: $OUT/session.log and one log per step.
#
# Usage, from anywhere, on a GPU host with the project installed (megatron-core among the dependencies):
#   OUT=/tmp/cp-session bash benchmarks/gpu/cp_session.sh
# Fill docs/BENCHMARKS.md's "not measured" rows of the context-parallelism section from the logs.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
OUT=${OUT:-runs/cp-session-$(date +%Y%m%d-%H%M%S)}
BUDGET_S=${BUDGET_S:-500}
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
T0=$(date +%s)

# shellcheck source=benchmarks/gpu/session_common.sh
source benchmarks/gpu/session_common.sh

# step NAME LIMIT_S CMD...: run CMD under min(LIMIT_S, budget left) seconds, output tee'd to $OUT/NAME.log
step() { step_in_budget "$@"; }

session_header "context-parallel GPU session"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; echo "host cores: $(nproc)"; } 2>&1 | tee -a "$LOG"
timeout 60 "$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib
for name in ("torch", "megatron.core", "numpy"):
    try:
        print(f"{name} {getattr(importlib.import_module(name), '__version__', '?')}")
    except Exception as e:  # a missing package is named, the steps that need it will fail on their own
        print(f"{name} MISSING: {e!r}")
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF


BENCH=(benchmarks/bench_ar_cp.py --layouts stage3 --size L --rounds 3 --iters 10)

# 1. GPU tests (the 2-GPU one skips itself on one GPU)
step gpu_tests 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rA tests/test_model_context_parallel.py

# 2. CP=1 through the machinery vs the plain step: Triton Flex kernels, then with RFM, then FLASH
step bench_cp1 120 "$PY" "${BENCH[@]}"
step bench_cp1_rfm 120 "$PY" "${BENCH[@]}" --p-mask 0.1
if "$PY" -c "import flash_attn.cute" 2>/dev/null; then
    step bench_cp1_flash 120 "$PY" "${BENCH[@]}" --flex-kernel flash
else
    say "== bench_cp1_flash: skipped, flash-attn-4 (flash_attn.cute) not installed"
fi

say "session done in $(( $(date +%s) - T0 ))s; logs in $OUT"
