#!/usr/bin/env bash
# Issue 24's GPU session for pre-tokenization, one command on one H100 or H200 (about 8 minutes):
#   1. the marked GPU tests of pre-tokenization (tests/test_pretokenize_gpu.py, slow ones last),
#   2. benchmarks/bench_pretokenize.py on the three presets (17x128 one clip per video, the UCF-101
#      sampling, 33x384x672), shards written: every full run as a fraction of the encoder alone
#      measured in the same run, then against the PyAV baseline, then host cores busy; the overlap
#      knobs (encoder_micro_batch, decode_stream_priority) and the encoder's profile at 17x128,
#   3. the encoder compiled (encoder_compile) against eager, and the compiled encoder's GPU test.
# Every step has its own time limit and the whole session a budget (BUDGET_S, default 500 s): a step
# gets min(its limit, what is left), a step with under 20 s left is skipped, so the session ends in time
# whatever hangs. Output, all tee'd: $OUT/session.log (environment, each step's exit code and time) and
# one log per step (the benchmark logs end with their JSON).
#
# Usage, from anywhere, on a GPU host with the project installed (`make setup`, or the offline wheels of
# docs/training.md; needs nvidia-dali-cuda130, PyAV, mosaicml-streaming):
#   OUT=/tmp/pretok-session bash benchmarks/gpu/pretokenize_session.sh
# Fill docs/BENCHMARKS.md's "not measured" rows of session 7 from the logs (each names its GPU).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/pretokenize-session-$(date +%Y%m%d-%H%M%S)}
BUDGET_S=${BUDGET_S:-500}
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
LOG="$OUT/session.log"
T0=$(date +%s)

say() { echo "$*" | tee -a "$LOG"; }

# step NAME LIMIT_S CMD...: run CMD under min(LIMIT_S, budget left) seconds, output tee'd to $OUT/NAME.log
step() {
    local name=$1 limit=$2 left
    shift 2
    left=$(( BUDGET_S - ($(date +%s) - T0) ))
    (( limit > left )) && limit=$left
    if (( limit < 20 )); then
        say "== $name: skipped, ${left}s of the ${BUDGET_S}s budget left"
        return
    fi
    say "== $name (limit ${limit}s): $*"
    local start rc
    start=$(date +%s)
    timeout --signal=INT --kill-after=10 "$limit" "$@" > >(tee "$OUT/$name.log") 2>&1
    rc=$?
    say "== $name: exit $rc after $(( $(date +%s) - start ))s$([[ $rc == 124 || $rc == 137 ]] && echo ' (time limit)')"
}

say "pretokenize GPU session, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), budget ${BUDGET_S}s"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; echo "host cores: $(nproc)"; } 2>&1 | tee -a "$LOG"
timeout 60 "$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib
for name in ("torch", "nvidia.dali", "av", "streaming", "numpy"):
    try:
        print(f"{name} {getattr(importlib.import_module(name), '__version__', '?')}")
    except Exception as e:  # a missing package is named, the steps that need it will fail on their own
        print(f"{name} MISSING: {e!r}")
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF

GPU_TESTS=tests/test_pretokenize_gpu.py
BENCH=(benchmarks/bench_pretokenize.py --encoder-memory-format contiguous --encoder-iters 10 --unique-videos 8)

# 1. GPU tests, fast ones (the slow: compile, benchmark smoke; the benchmark itself runs below)
step gpu_tests 130 "$PY" -m pytest -q -p no:cacheprovider -m "gpu and not slow" -rA "$GPU_TESTS"

# 2. The presets. 17x128: NVDEC 8 pipelines (auto) with whole-batch / 4-clip encoder launches x stream
#    priority 0 / -5 (decode beside a busy encoder on 64 clips each), the PyAV baseline, the profile.
step bench_17x128 140 "$PY" "${BENCH[@]}" --preset 17x128 --clips 256 --decode-pipelines 8 \
    --encoder-micro-batch 0,4 --decode-stream-priority 0,-5 --beside-clips 64 --profile-encoder
#    UCF-101 sampling (4 clips per video at 8 fps): whole-batch vs 4-clip launches, no beside runs.
step bench_ucf101 80 "$PY" "${BENCH[@]}" --preset ucf101 --clips 256 --decode-pipelines 8 \
    --encoder-micro-batch 0,4 --no-beside
#    33x384x672: the encoder-bound preset; NVDEC with 4 pipelines (auto at batch 4).
step bench_33x384x672 80 "$PY" "${BENCH[@]}" --preset 33x384x672 --clips 32 --decode-pipelines 4 --no-beside

# 3. What is cheap for the encoder itself: torch.compile (encoder alone, compiled vs eager) at 17x128,
#    then the compiled encoder's correctness test.
step bench_compile 90 "$PY" "${BENCH[@]}" --preset 17x128 --clips 64 --decode-pipelines "" --full none \
    --no-beside --encoder-compile both --encoder-batch-sizes 64
step gpu_tests_slow 60 "$PY" -m pytest -q -p no:cacheprovider -m "gpu and slow" -rA "$GPU_TESTS" -k compiled

say "session done in $(( $(date +%s) - T0 ))s; logs in $OUT"
