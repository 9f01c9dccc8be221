#!/bin/bash
# One node's torchrun, started by `srun --ntasks-per-node=1` from slurm/lib.sh (videoar_run_step).
# Arguments: the python module and its arguments, e.g. `videoar_megatron.cli train --recipe R ...`.
# `exec` so that torchrun itself receives the signals srun forwards; torchrun forwards SIGUSR1 and
# SIGTERM to its workers (--signals-to-handle) and gives them VIDEOAR_SHUTDOWN_TIMEOUT seconds to save.
# Per-rank logs: $VIDEOAR_LOG_DIR/node-<SLURM_NODEID>/<run>/attempt_0/<local rank>/{stdout,stderr}.log,
# also teed to the job's output file.
set -euo pipefail
: "${VIDEOAR_PYTHON:?}" "${VIDEOAR_RDZV_HOST:?}" "${VIDEOAR_LOG_DIR:?}" "${VIDEOAR_NNODES:?}" "${VIDEOAR_GPUS_PER_NODE:?}"
exec "$VIDEOAR_PYTHON" -m torch.distributed.run \
    --nnodes="$VIDEOAR_NNODES" --nproc-per-node="$VIDEOAR_GPUS_PER_NODE" \
    --rdzv-backend=c10d --rdzv-endpoint="$VIDEOAR_RDZV_HOST:${VIDEOAR_RDZV_PORT:-29500}" \
    --rdzv-id="${SLURM_JOB_ID:?}" --max-restarts=0 \
    --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
    --shutdown-timeout="${VIDEOAR_SHUTDOWN_TIMEOUT:-540}" \
    --log-dir="$VIDEOAR_LOG_DIR/node-${SLURM_NODEID:-0}" --redirects=3 --tee=3 \
    -m "$@"
