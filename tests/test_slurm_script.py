"""scripts/slurm_train.sh, run with bash on this machine as SLURM would run it.

SLURM is not installed here: the job's SLURM_* variables are set by hand, and a three-line `srun`
on PATH runs its command once (one task). Everything else is real: the script makes its
certificates, starts a `dask scheduler` and a `dask worker` with TLS on loopback, and runs
`dmf train` against them.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import random_ratings

from dmf.model.model import Model
from dmf.store import store_from_arrays

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "slurm_train.sh"
FAKE_SRUN = """#!/bin/bash
# SLURM is not installed on this machine: run the command once, as the job's one task.
while [[ $# -gt 0 && $1 == --* ]]; do shift; done
exec "$@"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_env(tmp_path: Path, port: int) -> dict[str, str]:
    """The environment of a one-node, one-task SLURM job, with the fake srun first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    srun = bin_dir / "srun"
    srun.write_text(FAKE_SRUN)
    srun.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DASK_", "DMF_"))}
    env.update(
        PATH=os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), env["PATH"]]),
        SLURM_JOB_ID="4242",
        SLURM_NTASKS="1",
        SLURM_JOB_NUM_NODES="1",
        SLURM_CPUS_PER_TASK="1",
        SLURM_MEM_PER_NODE="1500",
        TMPDIR=str(tmp_path),
        DMF_RUN_DIR=str(tmp_path / "run"),
        DMF_SCHEDULER_HOST="127.0.0.1",
        DMF_SCHEDULER_PORT=str(port),
        DMF_DASHBOARD_PORT=str(free_port()),
    )
    return env


def job_config(tmp_path: Path) -> Path:
    u, i, r = random_ratings(150, 100, 3_000, seed=8)
    store = store_from_arrays(tmp_path / "store", u, i, r, n_blocks=2)
    config = tmp_path / "job.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "store": {"path": str(store.path)},
                "model": {"rank": 3, "seed": 0},
                "train": {"iterations": 2, "progress": "off"},
                "output": {"model": str(tmp_path / "model"), "plot": False},
            }
        )
    )
    return config


def run_job(
    tmp_path: Path, port: int, timeout: float, watch: Path | None = None
) -> tuple[subprocess.CompletedProcess, float, dict]:
    """Run the script; also (the scheduler deletes its file when it stops) the mode and content
    of ``watch`` the first time it is seen complete while the job runs."""
    seen: dict = {}
    start = time.monotonic()
    with subprocess.Popen(
        ["bash", str(SCRIPT), str(job_config(tmp_path))],
        cwd=tmp_path,
        env=job_env(tmp_path, port),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        while watch is not None and not seen and proc.poll() is None:
            try:
                seen = {"mode": mode(watch), "json": json.loads(watch.read_text())}
            except (OSError, ValueError):  # not there yet, or half written
                time.sleep(0.05)
        try:
            out, err = proc.communicate(timeout=max(1.0, timeout - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"the job ran over {timeout} s:\n{out}\n{err}")
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return done, time.monotonic() - start, seen


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def assert_private_certificates(run_dir: Path) -> None:
    assert mode(run_dir) == 0o700
    assert mode(run_dir / "tls") == 0o700
    for name in ("ca.pem", "cert.pem", "key.pem"):
        assert mode(run_dir / "tls" / name) == 0o600, name
    assert (run_dir / "tls" / "key.pem").read_text().startswith("-----BEGIN PRIVATE KEY-----")


def test_a_taken_port_fails_the_job_at_once(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc, seconds, _ = run_job(tmp_path, port, timeout=90)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert seconds < 60, seconds
    assert f"Is port {port} on 127.0.0.1 taken? Set DMF_SCHEDULER_PORT" in proc.stderr, proc.stderr
    assert "the Dask scheduler exited" in proc.stderr
    assert not (tmp_path / "run" / "scheduler.json").exists()
    assert_private_certificates(tmp_path / "run")
    assert not (tmp_path / "model").exists()  # dmf train never ran


def test_the_job_trains_over_tls(tmp_path):
    port = free_port()
    run_dir = tmp_path / "run"
    sched_file = run_dir / "scheduler.json"
    proc, seconds, seen = run_job(tmp_path, port, timeout=180, watch=sched_file)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert seen["mode"] == 0o600  # while the job ran: the scheduler removes it at the end
    assert seen["json"]["address"] == f"tls://127.0.0.1:{port}"
    assert_private_certificates(run_dir)
    assert f"scheduler at tls://127.0.0.1:{port}" in proc.stdout
    # dmf train attached to the job's cluster with the job's certificates, and trained.
    assert f"cluster from {sched_file}, TLS" in proc.stderr, proc.stderr
    assert "LocalCluster" not in proc.stderr
    assert len(Model.load(tmp_path / "model").history) == 2
    # The script stopped what it started: nothing listens on the port any more. (SO_REUSEADDR
    # lets the bind past the closed connections' TIME_WAIT, never past a listener.)
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
    print(f"job took {seconds:.1f} s")
