#!/usr/bin/env bash
# Issue 24's GPU session for pre-tokenization, one command on one H100 or H200 (about 8 minutes):
#   1. the marked GPU tests of pre-tokenization (tests/test_pretokenize_gpu.py),
#   2. the slow compiled-encoder test, which judges compiled and eager bf16 latents against an fp32 encode,
#   3. benchmarks/bench_pretokenize.py on the three presets (17x128 one clip per video, the UCF-101
#      sampling, 33x384x672), shards written: every full run as a fraction of the encoder alone
#      measured in the same run, then against the PyAV baseline, then host cores busy. New in session 8:
#      NVDEC decode beside the busy encoder from a decode process (its own CUDA context) and with the
#      encoder on a non-blocking stream, and full runs with decode_process on and off. Dropped, settled
#      by session 7: the stream-priority sweep (no effect), the encoder profile, compile at 17x128;
#   4. the compiled encoder (encoder_compile) against eager at 33x384x672, the encoder-bound preset, and
#      where the eager encoder's GPU time goes there (--profile-encoder; session 7 profiled only 17x128);
#   5. the prefetch depth (prefetch_batches 2 vs 4) with the UCF-101 sampling (added in session 12).
# Every step has its own time limit and the whole session a budget (BUDGET_S, default 480 s): a step
# gets min(its limit, what is left), a step with under 20 s left is skipped, so the session ends in time
# whatever hangs. Output, all tee'd: $OUT/session.log (environment, each step's exit code and time) and
# one log per step (the benchmark logs end with their JSON).
#
# Usage, from anywhere, on a GPU host with the project installed (`make setup`, or the offline wheels of
# docs/training.md; needs nvidia-dali-cuda130, PyAV, mosaicml-streaming):
#   OUT=/tmp/pretok-session bash benchmarks/gpu/pretokenize_session.sh
# Fill docs/BENCHMARKS.md's "not measured" rows of session 8 from the logs (each names its GPU).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
OUT=${OUT:-runs/pretokenize-session-$(date +%Y%m%d-%H%M%S)}
BUDGET_S=${BUDGET_S:-480}
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
T0=$(date +%s)

# shellcheck source=benchmarks/gpu/session_common.sh
source benchmarks/gpu/session_common.sh

# step NAME LIMIT_S CMD...: run CMD under min(LIMIT_S, budget left) seconds, output tee'd to $OUT/NAME.log
step() { step_in_budget "$@"; }

session_header "pretokenize GPU session"
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
# 2. The compiled encoder's correctness: compiled and eager bf16 latents against an fp32 encode.
step gpu_tests_slow 70 "$PY" -m pytest -q -p no:cacheprovider -m "gpu and slow" -rA "$GPU_TESTS" -k compiled

# 3. The presets. 17x128: NVDEC 8 pipelines (auto); decode beside the busy encoder (32 clips each) from
#    lanes in this process and from a decode process, the encoder on the default or a non-blocking stream,
#    whole-batch and 4-clip launches; full runs whole-batch / 4-clip x decode process off / on; PyAV.
step bench_17x128 200 "$PY" "${BENCH[@]}" --preset 17x128 --clips 256 --decode-pipelines 8 \
    --encoder-micro-batch 0,4 --beside-clips 32 --beside-decode thread,process --beside-encoder-stream default,side \
    --decode-process both
#    UCF-101 sampling (4 clips per video at 8 fps): whole-batch / 4-clip x decode process off / on.
step bench_ucf101 100 "$PY" "${BENCH[@]}" --preset ucf101 --clips 256 --decode-pipelines 8 \
    --encoder-micro-batch 0,4 --decode-process both --no-beside
#    33x384x672: the encoder-bound preset; NVDEC with 4 pipelines (auto at batch 4), decode process off / on.
step bench_33x384x672 90 "$PY" "${BENCH[@]}" --preset 33x384x672 --clips 32 --decode-pipelines 4 \
    --decode-process both --no-beside

# 4. The compiled encoder's speed where the encoder is the bound.
step bench_compile_33x384x672 90 "$PY" "${BENCH[@]}" --preset 33x384x672 --clips 8 --decode-pipelines "" \
    --full none --no-beside --encoder-compile both --profile-encoder --profile-batches 2

# 5. Batches in flight through NVDEC ahead of the encoder (the pipeline's prefetch depth; DALI's own queue
#    stays 1): 2 (the default) vs 4, 4-clip launches.
step bench_prefetch_ucf101 80 "$PY" "${BENCH[@]}" --preset ucf101 --clips 256 --decode-pipelines 8 \
    --encoder-micro-batch 4 --prefetch-batches 2,4 --no-beside

say "session done in $(( $(date +%s) - T0 ))s; logs in $OUT"
