#!/bin/bash
# Train a dmf model on a SLURM allocation: one Dask scheduler, one Dask worker per task, and
# `dmf train` attached to them through a scheduler file on the shared filesystem.
#
#   sbatch scripts/slurm_train.sh configs/movielens-25m.yaml
#
# The store (store.path in the config) and the model directory must be on a filesystem every node
# sees: workers read their blocks from the store directly. Resubmitting the same job after it was
# killed (time limit, pre-emption) continues from the newest checkpoint (--resume).
#
#SBATCH --job-name=dmf-train
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --mem=64G
#SBATCH --time=04:00:00
#SBATCH --output=dmf-train-%j.log

set -euo pipefail
CONFIG=${1:?usage: sbatch scripts/slurm_train.sh CONFIG.yaml}
RUN_DIR=${DMF_RUN_DIR:-$PWD/runs/slurm-$SLURM_JOB_ID}
mkdir -p "$RUN_DIR"
SCHED_FILE=$RUN_DIR/scheduler.json

# One BLAS thread per Dask thread: the workers run one task per thread.
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1

# The scheduler runs beside the first worker; the dashboard listens on :8787 of that node.
dask scheduler --scheduler-file "$SCHED_FILE" --dashboard-address :8787 &
SCHED_PID=$!
while [ ! -s "$SCHED_FILE" ]; do sleep 1; done

# One worker per task, each with all its cores as threads and most of its memory.
MEM_PER_WORKER=$(( ${SLURM_MEM_PER_NODE:-65536} * 9 / 10 ))MB
srun --ntasks="$SLURM_NTASKS" dask worker \
    --scheduler-file "$SCHED_FILE" \
    --nthreads "$SLURM_CPUS_PER_TASK" --nworkers 1 \
    --memory-limit "$MEM_PER_WORKER" \
    --local-directory "${TMPDIR:-/tmp}" &
WORKERS_PID=$!

python - "$SCHED_FILE" "$SLURM_NTASKS" <<'PY'
import sys
from distributed import Client
with Client(scheduler_file=sys.argv[1]) as c:
    c.wait_for_workers(int(sys.argv[2]), timeout=600)
PY

# Resume when a checkpoint exists (a resubmitted job), else start fresh.
dmf train "$CONFIG" --scheduler-file "$SCHED_FILE" --resume

kill "$WORKERS_PID" "$SCHED_PID" 2>/dev/null || true
wait || true
