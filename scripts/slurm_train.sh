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
# Security: a Dask scheduler runs the code of anyone who can connect to it, as the job's user. So
# the scheduler and the workers speak TLS only, with a certificate set made for this job in
# $RUN_DIR/tls; the certificates and the scheduler file are readable by the job's user only, and
# only processes holding them (this job's workers and `dmf train`) are let in.
#
# Settings (environment variables, all optional):
#   DMF_RUN_DIR            where the scheduler file and certificates go (default runs/slurm-JOBID)
#   DMF_SCHEDULER_HOST     the address the scheduler listens on (default: this node's hostname)
#   DMF_SCHEDULER_PORT     its port (default 8786)
#   DMF_DASHBOARD_PORT     the dashboard's port on the same address (default 8787)
#   DMF_SCHEDULER_TIMEOUT  seconds the scheduler may take to start (default 60)
#   DMF_WORKERS_TIMEOUT    seconds the workers may take to connect (default 600)
#
#SBATCH --job-name=dmf-train
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --mem=64G
#SBATCH --time=04:00:00
#SBATCH --output=dmf-train-%j.log

set -euo pipefail
# Everything this job creates (certificates, scheduler file) is for the job's user only.
umask 077

CONFIG=${1:?usage: sbatch scripts/slurm_train.sh CONFIG.yaml}
RUN_DIR=${DMF_RUN_DIR:-$PWD/runs/slurm-${SLURM_JOB_ID:?not inside a SLURM job (no SLURM_JOB_ID)}}
HOST=${DMF_SCHEDULER_HOST:-$(hostname)}
PORT=${DMF_SCHEDULER_PORT:-8786}
DASHBOARD_PORT=${DMF_DASHBOARD_PORT:-8787}
SCHEDULER_TIMEOUT=${DMF_SCHEDULER_TIMEOUT:-60}
WORKERS_TIMEOUT=${DMF_WORKERS_TIMEOUT:-600}

fail() {
    echo "dmf slurm_train.sh: $*" >&2
    exit 1
}

mkdir -p "$RUN_DIR"
chmod 700 "$RUN_DIR"
SCHED_FILE=$RUN_DIR/scheduler.json
TLS_DIR=$RUN_DIR/tls
# A scheduler file left by an earlier job names a scheduler that is gone.
rm -f "$SCHED_FILE"

# A fresh certificate set: ca.pem, cert.pem, key.pem (0600, in a 0700 directory). The helper
# prints the `--set cluster.security=...` argument that gives them to dmf.
SECURITY_SET=$(python -m dmf.dist.tls "$TLS_DIR")
TLS_ARGS=(--tls-ca-file "$TLS_DIR/ca.pem" --tls-cert "$TLS_DIR/cert.pem" --tls-key "$TLS_DIR/key.pem")

# One BLAS thread per Dask thread: the workers run one task per thread.
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1

SCHED_PID=
WORKERS_PID=
cleanup() {
    # Only the processes this script started.
    for pid in $WORKERS_PID $SCHED_PID; do
        kill "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
}
trap cleanup EXIT

# The scheduler runs beside the first worker, on this node's address (not every interface), on
# TLS only. The dashboard (read-only, plain HTTP) listens on the same address.
dask scheduler --protocol tls --host "$HOST" --port "$PORT" "${TLS_ARGS[@]}" \
    --scheduler-file "$SCHED_FILE" --dashboard-address "$HOST:$DASHBOARD_PORT" &
SCHED_PID=$!

# Fail fast: a scheduler that dies (its port taken, say) or never writes its file ends the job
# now, not at its time limit.
deadline=$((SECONDS + SCHEDULER_TIMEOUT))
until [ -s "$SCHED_FILE" ]; do
    if ! kill -0 "$SCHED_PID" 2>/dev/null; then
        status=0
        wait "$SCHED_PID" || status=$?
        SCHED_PID=
        fail "the Dask scheduler exited (status $status) before it was up." \
            "Is port $PORT on $HOST taken? Set DMF_SCHEDULER_PORT to a free port." \
            "Its log is above."
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        fail "the Dask scheduler wrote no scheduler file ($SCHED_FILE) within" \
            "${SCHEDULER_TIMEOUT}s (DMF_SCHEDULER_TIMEOUT). Its log is above."
    fi
    sleep 1
done
chmod 600 "$SCHED_FILE"
ADDRESS=$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["address"])' "$SCHED_FILE")
echo "dmf slurm_train.sh: scheduler at $ADDRESS; dashboard at http://$HOST:$DASHBOARD_PORT/status"
if [ "${SLURM_JOB_NUM_NODES:-1}" -gt 1 ] && [[ $ADDRESS == tls://127.* ]]; then
    fail "the scheduler listens on $ADDRESS, which the other nodes cannot reach:" \
        "$HOST resolves to loopback. Set DMF_SCHEDULER_HOST to this node's network address."
fi

# One worker per task, each with all its cores as threads and most of its memory.
MEM_PER_WORKER=$(( ${SLURM_MEM_PER_NODE:-65536} * 9 / 10 ))MB
srun --ntasks="$SLURM_NTASKS" dask worker \
    --scheduler-file "$SCHED_FILE" "${TLS_ARGS[@]}" \
    --nthreads "$SLURM_CPUS_PER_TASK" --nworkers 1 \
    --memory-limit "$MEM_PER_WORKER" \
    --local-directory "${TMPDIR:-/tmp}" &
WORKERS_PID=$!

python - "$SCHED_FILE" "$SLURM_NTASKS" "$WORKERS_TIMEOUT" "$TLS_DIR" <<'PY'
import sys
from distributed import Client
from dmf.dist.tls import security_from_pem
sched_file, n, timeout, tls = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
security = security_from_pem(f"{tls}/ca.pem", f"{tls}/cert.pem", f"{tls}/key.pem")
with Client(scheduler_file=sched_file, security=security, timeout=60) as c:
    c.wait_for_workers(n, timeout=timeout)
PY

# Resume when a checkpoint exists (a resubmitted job), else start fresh.
dmf train "$CONFIG" --scheduler-file "$SCHED_FILE" --set "$SECURITY_SET" --resume
