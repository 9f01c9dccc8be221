#!/usr/bin/env bash
# Issue 26's GPU session for AR training throughput, one command on ONE H100 or H200 (about 9 minutes):
#   0. environment, and whether FlexAttention's FlashAttention-4 backend (FLASH) can run here: what
#      model.flex_kernel=auto picks for L, XL and 4B at every recipe length, and why;
#   1. the marked GPU tests of the kernel choice and the head padding (tests/test_model_gpu.py: auto on
#      this GPU, padded FA4 vs dense SDPA at head_dim 64/80/128, unpadded FA4 failing where padding is
#      used, 4B heads through the model; the FLASH ones skip themselves without flash-attn-4);
#   3. benchmarks/bench_ar_train_step.py at the recipe layouts, VideoAR / GPT tokens/s and MFU, most
#      important first: stage III (23,059 tokens) for L, XL, 4B; 65 frames (43,499) for L, 4B, XL; then
#      UCF-101, stage I and stage II for L. XL and 4B (and every size at 65 frames) recompute (full), as
#      their recipes do; L at stage III does not, so its MFU is the uncredited-recompute-free figure;
#   2. with flash-attn-4: the FLASH frame-table crash's suspected cause (docs/training.md#attention-kernels):
#      tests/dist_scripts/flash_frame_table.py as built (runs if the tables' slack is the fix) and with
#      --poison-slack (must crash: ties the crash to FA4 reading the tables past their end);
#   4. the compile cache, cold vs warm, VideoAR-L at stage III (benchmarks/bench_compile_cache.py)
#      in a fresh directory of its own (session 8 ran out of budget before it: SKIP the others to get it);
#   5. last, the asynchronous save's stall against a synchronous save, VideoAR-XL at stage III, with the
#      writer forked per save (the default) and with checkpoint.async_worker=persistent (about 4 minutes
#      each: a session of its own, SKIP="gpu_tests frame_table frame_table_poisoned train_step_stage3
#      train_step_65f train_step_L_short compile_cache" BUDGET_S=560).
# Every step has its own time limit and the whole session a budget (BUDGET_S, default 540 s): a step
# gets min(its limit, what is left), a step with under 20 s left is skipped, so the session ends in time
# whatever hangs; the benchmarks print each pair as soon as it is measured. SKIP="name ..." leaves steps
# out (a repeat session). Output, all tee'd:
# $OUT/session.log (environment, FLASH check, each step's exit code and time) and one log per step.
#
# Usage, from anywhere, on a GPU host with torch (2.11, CUDA) and megatron-core importable (DALI,
# DeepSpeed and streaming are not needed):
#   OUT=/tmp/ar-session bash benchmarks/gpu/ar_session.sh
# Fill docs/BENCHMARKS.md's "not measured" rows of issue 26 from the logs (each names its GPU).
#
# FLASH needs the 'flash' extra (setup.py), which is not on the GPU hosts unless its wheels are carried
# (Python 3.12, manylinux x86_64; the versions tested with torch 2.11.0+cu130, docs/training.md):
#   flash_attn_4-4.0.0b5, nvidia_cutlass_dsl-4.4.2, nvidia_cutlass_dsl_libs_cu13-4.4.2,
#   quack_kernels-0.3.5, apache_tvm_ffi-0.1.9, torch_c_dlpack_ext (and einops, typing_extensions),
#   staged as docs/training.md says ("GPU hosts without network": pip download of '.[flash]' on a
#   connected machine, then pip install --no-index --find-links; torch stays the host's own).
# Without them the session still runs: auto picks Triton (said in step 0), the FLASH tests skip.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
OUT=${OUT:-runs/ar-session-$(date +%Y%m%d-%H%M%S)}
BUDGET_S=${BUDGET_S:-540}
SKIP=${SKIP:-}   # step names to leave out, e.g. SKIP="gpu_tests compile_cache" on a repeat session
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# nvidia-cutlass-dsl keeps its `cutlass` package in nvidia_cutlass_dsl/python_packages/ and adds that
# folder through a .pth file, which a `pip install --target` folder on PYTHONPATH never reads: add it.
IFS=: read -r -a _entries <<< "$PYTHONPATH"
for _entry in "${_entries[@]}"; do
    [[ -d $_entry/nvidia_cutlass_dsl/python_packages ]] && PYTHONPATH="$PYTHONPATH:$_entry/nvidia_cutlass_dsl/python_packages"
done
mkdir -p "$OUT"
T0=$(date +%s)
# One compile cache for the session, outside $OUT (it is large and is not a result), empty at the start
# so that step 2's first run is cold (bench_compile_cache.py refuses a non-empty one). A CACHE given by
# the caller is kept; the session's own temporary one is removed at the end.
OWN_CACHE=""
if [[ -z ${CACHE:-} ]]; then
    CACHE=$(mktemp -d /tmp/videoar-ar-session-cache-XXXXXX)
    OWN_CACHE=$CACHE
fi

# shellcheck source=benchmarks/gpu/session_common.sh
source benchmarks/gpu/session_common.sh

# step NAME LIMIT_S CMD...: run CMD under min(LIMIT_S, budget left) seconds, output tee'd to $OUT/NAME.log,
# unless NAME is in $SKIP
step() {
    if [[ " $SKIP " == *" $1 "* ]]; then
        say "== $1: skipped (SKIP)"
        return
    fi
    step_in_budget "$@"
}

session_header "AR GPU session (issue 26)"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; echo "host cores: $(nproc)"; } 2>&1 | tee -a "$LOG"

# 0. Versions, and FLASH: installed? usable here? what auto picks per size and recipe length.
timeout 90 "$PY" - <<'EOF' 2>&1 | grep -v -i "warn" | tee -a "$LOG"
import importlib
for name in ("torch", "megatron.core", "triton", "flash_attn", "cutlass", "quack"):
    try:
        print(f"{name} {getattr(importlib.import_module(name), '__version__', '?')}")
    except Exception as e:  # a missing package is named; what needs it says so below
        print(f"{name} MISSING: {type(e).__name__}: {e}")
import torch
from benchmarks.ar_common import LAYOUTS, MASKS
from videoar_megatron.model.config import MaskConfig
from videoar_megatron.model.attention import choose_flex_kernel, flash_blocker, flash_installed
from videoar_megatron.model.config import SIZES
device = torch.device("cuda")
print("cuda", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
print("FLASH (flash-attn-4) installed:", flash_installed())
for size in ("L", "XL", "4B"):
    head_dim = SIZES[size]["hidden_size"] // SIZES[size]["num_attention_heads"]
    blocker = flash_blocker(device, head_dim)
    print(f"{size} (head_dim {head_dim}): FLASH {'usable' if blocker is None else 'NOT usable: ' + blocker}")
    for name, layout in LAYOUTS.items() if blocker is None else ():
        k = choose_flex_kernel("auto", layout.seq_len, head_dim, torch.cuda.get_device_capability(), blocker,
                               frame_table=MaskConfig(**MASKS[name]).reads_frame_table)
        print(f"  auto at {name} ({layout.seq_len} tokens): {k.name} ({k.reason})")
EOF

# 1. GPU tests of this issue's kernel changes (FLASH ones skip without flash-attn-4).
step gpu_tests 110 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rA tests/test_model_gpu.py \
    -k "auto_kernel or flash_kernel or unpadded or 4b_heads or frame_table"

# 2. The FLASH frame-table crash, one process per case (a crash takes the CUDA context).
if "$PY" -c "import flash_attn.cute" 2>/dev/null; then
    step frame_table 150 "$PY" tests/dist_scripts/flash_frame_table.py
    step frame_table_poisoned 150 "$PY" tests/dist_scripts/flash_frame_table.py --poison-slack
else
    say "== frame_table: skipped, flash-attn-4 (flash_attn.cute) not installed"
fi

export TORCHINDUCTOR_CACHE_DIR="$CACHE" TRITON_CACHE_DIR="$CACHE/triton"

# 3. Train step vs GPT at the recipe layouts (warm-up 1: the first step compiles; median of 3).
STEP=(benchmarks/bench_ar_train_step.py --warmup 1 --iters 3)
step train_step_stage3 210 "$PY" "${STEP[@]}" --size L,XL,4B --layouts stage3 --recompute XL=full,4B=full
step train_step_65f 150 "$PY" "${STEP[@]}" --size L,4B,XL --layouts stage3_65f --recompute full
# The short layouts' steps take tens of milliseconds: 3 iterations left their ratios noisy (1.004 vs 0.876
# at UCF-101 in two calls, session 8), so these take the median of 20 after 3 warm-up steps.
step train_step_L_short 110 "$PY" benchmarks/bench_ar_train_step.py --warmup 3 --iters 20 --size L \
    --layouts ucf,stage1,stage2

# 4. Compile cache: cold then warm, two processes sharing a fresh directory (last: the goals' figures
#    above come first when the budget is short; the train steps above used $CACHE, not this one).
COLD_CACHE=$(mktemp -d /tmp/videoar-ar-session-cold-XXXXXX)
step compile_cache 280 "$PY" benchmarks/bench_compile_cache.py --size L --layout stage3 --steps 2 --cache-dir "$COLD_CACHE"
rm -rf "$COLD_CACHE"

# 5. Asynchronous save stall vs a synchronous save, forked writer then persistent worker (each run prints
#    its own synchronous baseline and the stall's phases).
CKPT=(benchmarks/bench_checkpoint.py --size XL --layout stage3 --rounds 1)
step checkpoint_fork 270 "$PY" "${CKPT[@]}" --work-dir "$(mktemp -d /tmp/videoar-ckpt-XXXXXX)"
step checkpoint_persistent 270 "$PY" "${CKPT[@]}" --set checkpoint.async_worker=persistent \
    --work-dir "$(mktemp -d /tmp/videoar-ckpt-XXXXXX)"
rm -rf /tmp/videoar-ckpt-*

[[ -n $OWN_CACHE ]] && rm -rf "$OWN_CACHE"
say "session done in $(( $(date +%s) - T0 ))s; logs in $OUT"
