# shellcheck shell=bash
# Shared logic of the sbatch scripts: videoar_env (repository, site file, python) for all of them;
# the rest for the multi-node training ones (train_ar.sbatch, train_tokenizer.sbatch).
# Sourced, never executed. sbatch copies a batch script into a spool directory, so scripts find the
# repository through VIDEOAR_HOME, else the directory `sbatch` was called from (SLURM_SUBMIT_DIR).
#
# Environment knobs (set them in the environment or in the site file):
#   VIDEOAR_HOME              repository checkout to run from (default: $SLURM_SUBMIT_DIR)
#   VIDEOAR_SITE_FILE         shell file sourced first: modules, NCCL / network settings, caches
#                             (default: $VIDEOAR_HOME/slurm/site.sh when it exists; see site.sh.example)
#   VIDEOAR_PYTHON            python with the project installed (default: $VIDEOAR_HOME/.venv/bin/python)
#   VIDEOAR_GPUS_PER_NODE     processes per node (default: $SLURM_GPUS_ON_NODE, else 8)
#   VIDEOAR_RDZV_PORT         c10d rendezvous port on the first host (default 29500)
#   VIDEOAR_SHUTDOWN_TIMEOUT  seconds torchrun waits for workers to save and exit after forwarding a
#                             signal before killing them (default 540; keep it under the --signal lead time)
#   VIDEOAR_SET               extra recipe overrides, space separated KEY=VALUE items
# Nothing here deletes anything; run directories are only ever created.

videoar_die() {
    echo "${VIDEOAR_SCRIPT:-videoar}: $*" >&2
    exit 2
}

# Resolve the repository, source the site file, find python, cd to the repository.
#   videoar_env SCRIPT_NAME
videoar_env() {
    VIDEOAR_SCRIPT=$1
    VIDEOAR_HOME=${VIDEOAR_HOME:-${SLURM_SUBMIT_DIR:-}}
    [[ -n $VIDEOAR_HOME && -f $VIDEOAR_HOME/slurm/lib.sh ]] ||
        videoar_die "cannot find the repository: set VIDEOAR_HOME (got '${VIDEOAR_HOME}'), or sbatch from the checkout"
    local site_file=${VIDEOAR_SITE_FILE:-$VIDEOAR_HOME/slurm/site.sh}
    if [[ -f $site_file ]]; then
        # shellcheck source=/dev/null
        source "$site_file"
    elif [[ -n ${VIDEOAR_SITE_FILE:-} ]]; then
        videoar_die "VIDEOAR_SITE_FILE=$VIDEOAR_SITE_FILE does not exist"
    fi
    VIDEOAR_PYTHON=${VIDEOAR_PYTHON:-$VIDEOAR_HOME/.venv/bin/python}
    [[ -x $VIDEOAR_PYTHON ]] || videoar_die "VIDEOAR_PYTHON=$VIDEOAR_PYTHON is not an executable python (run make setup)"
    export VIDEOAR_HOME VIDEOAR_PYTHON
    cd "$VIDEOAR_HOME" || videoar_die "cannot cd to $VIDEOAR_HOME"
}

# videoar_env, then the allocation of a multi-node job: node count and processes per node.
#   videoar_setup SCRIPT_NAME
videoar_setup() {
    videoar_env "$1"
    : "${SLURM_JOB_ID:?run this script under sbatch (SLURM_JOB_ID is not set)}"
    : "${SLURM_JOB_NODELIST:?SLURM_JOB_NODELIST is not set}"
    VIDEOAR_NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
    VIDEOAR_GPUS_PER_NODE=${VIDEOAR_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
    export VIDEOAR_NNODES VIDEOAR_GPUS_PER_NODE
}

# VIDEOAR_SET → the array VIDEOAR_OVERRIDES (--set KEY=VALUE ...).
videoar_overrides() {
    VIDEOAR_OVERRIDES=()
    local items item
    read -r -a items <<< "${VIDEOAR_SET:-}"
    for item in "${items[@]}"; do
        VIDEOAR_OVERRIDES+=(--set "$item")
    done
}

# The first host of the allocation, checked to resolve. Never falls back to localhost: a node that
# rendezvoused with itself would train alone and hang the others.
videoar_rendezvous_host() {
    command -v scontrol > /dev/null || videoar_die "scontrol not found: cannot find the first host of the allocation"
    local host
    host=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    [[ -n $host ]] || videoar_die "scontrol returned no host for SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST"
    getent hosts "$host" > /dev/null ||
        videoar_die "cannot resolve the rendezvous host '$host' (first host of SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST); refusing to fall back to localhost"
    VIDEOAR_RDZV_HOST=$host
    export VIDEOAR_RDZV_HOST
}

# Run one torchrun per node (slurm/torchrun_node.sh) in the background and wait for it, forwarding
# USR1/TERM from this batch shell to the job step: bash runs traps only between commands, so a
# foreground srun would defer them until it ended. Sets VIDEOAR_STEP_RC and VIDEOAR_GOT_SIGNAL.
#   videoar_run_step RUN_DIR PYTHON_MODULE_ARGS...
videoar_run_step() {
    local run_dir=$1
    shift
    mkdir -p "$run_dir/logs"
    export VIDEOAR_LOG_DIR=$run_dir/logs/job-$SLURM_JOB_ID
    VIDEOAR_GOT_SIGNAL=""
    trap 'videoar_forward USR1' USR1
    trap 'videoar_forward TERM' TERM
    srun --nodes="$VIDEOAR_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
        bash "$VIDEOAR_HOME/slurm/torchrun_node.sh" "$@" &
    VIDEOAR_STEP_PID=$!
    VIDEOAR_STEP_RC=0
    while :; do
        if wait "$VIDEOAR_STEP_PID"; then VIDEOAR_STEP_RC=0; else VIDEOAR_STEP_RC=$?; fi
        kill -0 "$VIDEOAR_STEP_PID" 2> /dev/null || break  # interrupted by a trap: wait again
    done
    trap - USR1 TERM
}

videoar_forward() {
    VIDEOAR_GOT_SIGNAL=$1
    echo "${VIDEOAR_SCRIPT}: received SIG$1, forwarding it to the job step (save and exit)" >&2
    kill -s "$1" "$VIDEOAR_STEP_PID" 2> /dev/null || true
}

# After the step: requeue when the trainer saved and asked for it (RUN_DIR/REQUEUE_REQUESTED), or when
# SLURM's time-limit warning (USR1) arrived. A TERM alone is a cancel or a preemption that SLURM
# requeues itself, so it is not requeued here. Returns the exit code for the batch script.
#   videoar_finish RUN_DIR
videoar_finish() {
    local run_dir=$1
    if [[ -f $run_dir/REQUEUE_REQUESTED || $VIDEOAR_GOT_SIGNAL == USR1 ]]; then
        echo "${VIDEOAR_SCRIPT}: step ended with $VIDEOAR_STEP_RC after a stop request; requeueing job $SLURM_JOB_ID" >&2
        scontrol requeue "$SLURM_JOB_ID"
        return 0
    fi
    return "$VIDEOAR_STEP_RC"
}
