#!/bin/bash
# Submit a pretokenize array (one task per GPU) and its dependent merge job.
#   VIDEOAR_RECIPE=recipes/pretokenize/ucf101_17x128.yaml VIDEOAR_TASKS=64 slurm/pretokenize_submit.sh [sbatch args]
# VIDEOAR_TASKS  array size = number of workers (default 8); keep the recipe's num_partitions a multiple
#                of it (or 0 = one partition per task) and keep it fixed when resubmitting.
# Extra arguments (e.g. --partition=gpu --account=proj) go to both sbatch calls. Other knobs: see
# slurm/pretokenize.sbatch. Prints the two job ids.
set -euo pipefail
: "${VIDEOAR_RECIPE:?set VIDEOAR_RECIPE to a recipe YAML}"
tasks=${VIDEOAR_TASKS:-8}
if ! [[ $tasks =~ ^[1-9][0-9]*$ ]]; then
    echo "pretokenize_submit.sh: VIDEOAR_TASKS must be a positive integer, got '$tasks'" >&2
    exit 2
fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export VIDEOAR_RECIPE
array_job=$(sbatch --parsable --export=ALL --array="0-$((tasks - 1))" "$@" "$here/pretokenize.sbatch")
array_job=${array_job%%;*}
merge_job=$(sbatch --parsable --export=ALL --dependency="afterany:$array_job" "$@" "$here/pretokenize_merge.sbatch")
echo "array job $array_job ($tasks tasks), merge job ${merge_job%%;*}"
