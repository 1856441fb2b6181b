"""cluster.kind kubernetes, tested without a Kubernetes cluster (there is none here).

What is tested: the manifests dmf hands to Kubernetes, built by dask-kubernetes' own
``make_cluster_spec`` (installed with the ``kubernetes`` extra; these tests skip without it),
and that the scheduler and worker commands in them, run here as processes with the Secret's
files where the pods would mount them, make a cluster that speaks TLS only. Also the wiring:
the config, and the error when the extra is missing. Not tested: talking to the Kubernetes API
(creating the resources, port-forwarding), which needs a cluster and the operator.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import random_ratings

from dmf.config import load_config
from dmf.dist import tls
from dmf.dist.cluster import certificate_set, connect
from dmf.errors import ConfigError
from dmf.store import store_from_arrays

REPO = Path(__file__).resolve().parents[1]
DASK = str(Path(sys.executable).with_name("dask"))
ENVIRON = {
    "AWS_ACCESS_KEY_ID": "AKIATESTKEY",
    "AWS_SECRET_ACCESS_KEY": "not-a-real-secret-but-secret",
    "AWS_ENDPOINT_URL": "http://minio.storage:9000",
    "UNRELATED": "stays-home",
}


def raw_cluster(**kubernetes) -> dict:
    return {
        "cluster": {
            "kind": "kubernetes",
            "n_workers": 3,
            "threads_per_worker": 4,
            "memory_limit": "6GiB",
            "kubernetes": {
                "image": "registry.example/dmf:0.1.0",
                "resources": {"requests": {"cpu": "4"}, "limits": {"memory": "8Gi"}},
                "env": {"DMF_LOG": "info"},
                **kubernetes,
            },
        }
    }


@pytest.fixture(scope="module")
def made():
    """(config, certificate set, manifests) of one run named dmf-test."""
    pytest.importorskip("dask_kubernetes.operator", reason="needs pip install 'dmf[kubernetes]'")
    from dmf.dist.kubernetes import cluster_specs

    cfg = load_config(raw=raw_cluster())
    certs = tls.generate()
    return cfg, certs, cluster_specs(cfg.cluster, "dmf-test", certs, ENVIRON)


def pods(specs) -> dict[str, dict]:
    return {
        "scheduler": specs["cluster"]["spec"]["scheduler"]["spec"],
        "worker": specs["cluster"]["spec"]["worker"]["spec"],
    }


def env_of(container) -> dict[str, dict]:
    return {e["name"]: e for e in container["env"]}


TLS_ARGS = [
    "--tls-ca-file",
    "/etc/dmf/tls/ca.pem",
    "--tls-cert",
    "/etc/dmf/tls/cert.pem",
    "--tls-key",
    "/etc/dmf/tls/key.pem",
]


# ---------------------------------------------------------------------------------------------
# The manifests
# ---------------------------------------------------------------------------------------------
def test_the_cluster_is_dask_kubernetes_own_spec(made):
    from dask_kubernetes.operator import make_cluster_spec

    cfg, _, specs = made
    cluster = specs["cluster"]
    assert (cluster["apiVersion"], cluster["kind"]) == ("kubernetes.dask.org/v1", "DaskCluster")
    assert cluster["metadata"]["name"] == "dmf-test"
    assert cluster["spec"]["worker"]["replicas"] == 3
    plain = make_cluster_spec(name="dmf-test", n_workers=3)
    # The service and the probes are the operator's, untouched: the readiness probe reads the
    # dashboard's /health over HTTP, which TLS on the comm port does not change.
    assert cluster["spec"]["scheduler"]["service"] == plain["spec"]["scheduler"]["service"]
    for name, pod in pods(specs).items():
        (container,) = pod["containers"]
        assert container["image"] == "registry.example/dmf:0.1.0", name
        assert container["resources"] == {"requests": {"cpu": "4"}, "limits": {"memory": "8Gi"}}
        assert env_of(container)["DMF_LOG"] == {"name": "DMF_LOG", "value": "info"}
    probe = pods(specs)["scheduler"]["containers"][0]["readinessProbe"]
    assert probe == plain["spec"]["scheduler"]["spec"]["containers"][0]["readinessProbe"]


def test_the_scheduler_speaks_tls_only(made):
    _, _, specs = made
    (container,) = pods(specs)["scheduler"]["containers"]
    assert container["args"] == [
        "dask",
        "scheduler",
        "--host",
        "0.0.0.0",
        "--port",
        "8786",
        "--protocol",
        "tls",
        *TLS_ARGS,
        "--dashboard-address",
        ":8787",
    ]
    env = env_of(container)
    assert env["DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"]["value"] == "True"
    assert env["DASK_DISTRIBUTED__COMM__TLS__CA_FILE"]["value"] == "/etc/dmf/tls/ca.pem"
    assert "DASK_SCHEDULER_ADDRESS" not in env


def test_workers_find_the_scheduler_on_tls_and_present_the_certificate(made):
    _, _, specs = made
    (container,) = pods(specs)["worker"]["containers"]
    args = container["args"]
    assert args[:6] == ["dask", "worker", "--nthreads", "4", "--memory-limit", "6GiB"]
    assert args[6:12] == TLS_ARGS
    assert args[12:14] == ["--name", "$(DASK_WORKER_NAME)"]  # the operator's
    env = env_of(container)
    # Set in the container, so the operator does not add its tcp:// address.
    assert env["DASK_SCHEDULER_ADDRESS"]["value"] == "tls://dmf-test-scheduler:8786"
    for role in ("WORKER", "CLIENT"):
        assert env[f"DASK_DISTRIBUTED__COMM__TLS__{role}__CERT"]["value"] == "/etc/dmf/tls/cert.pem"
        assert env[f"DASK_DISTRIBUTED__COMM__TLS__{role}__KEY"]["value"] == "/etc/dmf/tls/key.pem"


def test_the_certificates_are_mounted_read_only_for_the_pod_user(made):
    _, _, specs = made
    for name, pod in pods(specs).items():
        (volume,) = pod["volumes"]
        assert volume["secret"]["secretName"] == "dmf-test-tls", name
        # Only the PEM files become files; the credentials stay out of the filesystem.
        assert [i["key"] for i in volume["secret"]["items"]] == ["ca.pem", "cert.pem", "key.pem"]
        assert volume["secret"]["defaultMode"] == 0o440  # owner root, group: the pod's fsGroup
        (mount,) = pod["containers"][0]["volumeMounts"]
        assert mount == {"name": volume["name"], "mountPath": "/etc/dmf/tls", "readOnly": True}
        ctx = pod["securityContext"]
        assert ctx["runAsNonRoot"] and ctx["runAsUser"] == ctx["fsGroup"] == 1000


def test_the_secret_holds_the_run_certificates_as_pem(made):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    _, certs, specs = made
    secret = specs["secret"]
    assert (secret["apiVersion"], secret["kind"], secret["type"]) == ("v1", "Secret", "Opaque")
    assert secret["metadata"]["name"] == "dmf-test-tls"
    data = secret["stringData"]
    assert (data["ca.pem"], data["cert.pem"], data["key.pem"]) == (certs.ca, certs.cert, certs.key)
    ca = x509.load_pem_x509_certificate(data["ca.pem"].encode())
    cert = x509.load_pem_x509_certificate(data["cert.pem"].encode())
    cert.verify_directly_issued_by(ca)
    key = serialization.load_pem_private_key(data["key.pem"].encode(), password=None)
    assert key.public_key() == cert.public_key()
    # One private key in the Secret, the certificate's: the CA's key was never kept.
    assert "".join(data.values()).count("PRIVATE KEY-----") == 2  # BEGIN and END of one


def test_credentials_travel_in_the_secret_not_in_the_cluster_spec(made):
    _, _, specs = made
    data = specs["secret"]["stringData"]
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        assert data[k] == ENVIRON[k]
    assert "UNRELATED" not in data and "AWS_SESSION_TOKEN" not in data  # unset: not passed
    text = json.dumps(specs["cluster"])
    assert ENVIRON["AWS_SECRET_ACCESS_KEY"] not in text and ENVIRON["AWS_ACCESS_KEY_ID"] not in text
    for pod in pods(specs).values():
        ref = env_of(pod["containers"][0])["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "dmf-test-tls", "key": "AWS_SECRET_ACCESS_KEY"}


def test_certificate_files_from_the_config_go_into_the_secret(tmp_path):
    pytest.importorskip("dask_kubernetes.operator", reason="needs pip install 'dmf[kubernetes]'")
    from dmf.dist.kubernetes import cluster_specs

    own = tls.generate()
    files = tls.write(own, tmp_path / "pki")
    cfg = load_config(raw=raw_cluster(), overrides=[f"cluster.security={json.dumps(files)}"])
    specs = cluster_specs(cfg.cluster, "dmf-own", certificate_set(cfg.cluster), {})
    assert specs["secret"]["stringData"]["cert.pem"] == own.cert


# ---------------------------------------------------------------------------------------------
# The pods' commands, run here: they make a TLS-only cluster
# ---------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_local(args: list[str], mount: Path, moves: dict[str, str]) -> list[str]:
    """A container's args for a process on this machine: the mounted files where ``mount`` has
    them, and the listening addresses of ``moves`` (old value -> new value) on loopback."""
    out = [a.replace("/etc/dmf/tls", str(mount)) for a in args]
    out = [moves.get(a, a) for a in out]
    return [DASK, *out[1:]] if out[0] == "dask" else out


def local_env(container: dict, secret: dict, mount: Path, **extra: str) -> dict[str, str]:
    """A container's environment as Kubernetes would give it, with ``mount`` for the files."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    for e in container["env"]:
        if "valueFrom" in e:
            env[e["name"]] = secret["stringData"][e["valueFrom"]["secretKeyRef"]["key"]]
        else:
            env[e["name"]] = e["value"].replace("/etc/dmf/tls", str(mount))
    env.update(extra)
    return env


def try_client(address: str, **kwargs) -> None:
    """Connect a ``distributed.Client`` and leave, on an event loop that ends with it."""
    from distributed import Client

    async def attempt():
        client = Client(address, asynchronous=True, timeout="3s", **kwargs)
        try:
            await client
        finally:
            await client.close()

    asyncio.run(attempt())


def test_the_pod_commands_make_a_tls_only_cluster(made, tmp_path):
    import dask
    from distributed import Client

    cfg, certs, specs = made
    secret = specs["secret"]
    mount = tmp_path / "tls"  # what the Secret volume holds in a pod
    mount.mkdir()
    for item in pods(specs)["scheduler"]["volumes"][0]["secret"]["items"]:
        (mount / item["path"]).write_text(secret["stringData"][item["key"]])
    sched, dash = free_port(), free_port()
    (s_container,) = pods(specs)["scheduler"]["containers"]
    (w_container,) = pods(specs)["worker"]["containers"]
    s_args = as_local(
        s_container["args"],
        mount,
        {"0.0.0.0": "127.0.0.1", "8786": str(sched), ":8787": f"127.0.0.1:{dash}"},
    )
    address = f"tls://127.0.0.1:{sched}"
    w_args = as_local(w_container["args"], mount, {"8788": "127.0.0.1:0"})
    w_args = [a.replace("$(DASK_WORKER_NAME)", "dmf-test-worker-0") for a in w_args]
    w_args += ["--host", "127.0.0.1"]
    procs = []
    try:
        for args, container, extra in (
            (s_args, s_container, {}),
            (w_args, w_container, {"DASK_SCHEDULER_ADDRESS": address}),
        ):
            procs.append(
                subprocess.Popen(
                    args,
                    env=local_env(container, secret, mount, **extra),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
            if container is s_container:
                # The operator's readiness probe: the dashboard's /health, over plain HTTP.
                deadline = time.monotonic() + 60
                while True:
                    assert procs[0].poll() is None, "the scheduler command failed"
                    try:
                        with urllib.request.urlopen(
                            f"http://127.0.0.1:{dash}/health", timeout=5
                        ) as r:
                            assert r.read() == b"ok"
                            break
                    except OSError:
                        assert time.monotonic() < deadline, "the scheduler never became ready"
                        time.sleep(0.2)
        # dmf's client: the run's certificates (as KubernetesCluster.security holds them).
        with Client(address, security=certs.security(), timeout=30) as client:
            client.wait_for_workers(1, timeout=60)
            (worker,) = client.scheduler_info()["workers"].values()
            assert worker["name"] == "dmf-test-worker-0" and worker["nthreads"] == 4
            assert worker["memory_limit"] == 6 * 2**30
            assert client.submit(sum, [1, 2, 3], pure=False).result(timeout=30) == 6
            # The credentials reached the worker, from the Secret.
            secret_key = client.run(lambda: os.environ.get("AWS_SECRET_ACCESS_KEY"))
            assert list(secret_key.values()) == [ENVIRON["AWS_SECRET_ACCESS_KEY"]]
        # Without the certificates: no connection, on TLS or on plain TCP.
        with dask.config.set({"distributed.comm.timeouts.connect": "3s"}):
            with pytest.raises((TypeError, OSError)):
                try_client(address)
            with pytest.raises(OSError):
                try_client(address.replace("tls://", "tcp://"))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=30)


# ---------------------------------------------------------------------------------------------
# Wiring
# ---------------------------------------------------------------------------------------------
def test_without_the_extra_kind_kubernetes_is_a_config_error(monkeypatch):
    # As if dask-kubernetes were not installed: Python's own way to make an import fail.
    monkeypatch.setitem(sys.modules, "dask_kubernetes", None)
    monkeypatch.setitem(sys.modules, "dask_kubernetes.operator", None)
    cfg = load_config(raw=raw_cluster())
    with pytest.raises(ConfigError, match=r"pip install 'dmf\[kubernetes\]'"):
        with connect(cfg):
            pass


def test_dmf_says_how_to_install_the_extra(tmp_path):
    u, i, r = random_ratings(30, 20, 200, seed=3)
    store = store_from_arrays(tmp_path / "store", u, i, r, n_blocks=1)
    config = tmp_path / "k8s.yaml"
    config.write_text(json.dumps({**raw_cluster(), "store": {"path": str(store.path)}}))
    code = (
        "import sys; sys.modules['dask_kubernetes'] = None; "
        "from dmf.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "train", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'dmf[kubernetes]'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_without_kubernetes_credentials_the_error_says_so(monkeypatch, tmp_path):
    pytest.importorskip("dask_kubernetes.operator", reason="needs pip install 'dmf[kubernetes]'")
    # No kubeconfig and no service account: kr8s finds no cluster (and sends nothing anywhere).
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match=r"cluster\.kind 'kubernetes': cannot reach Kubernetes"):
        with connect(load_config(raw=raw_cluster())):
            pass
    # The event loop that would have served the cluster is gone too.
    assert not [t for t in threading.enumerate() if t.name == "dmf-kubernetes"]


def test_kubernetes_always_uses_tls():
    with pytest.raises(ConfigError, match=r"always uses TLS"):
        load_config(raw=raw_cluster(), overrides=["cluster.security=none"])


def test_example_config():
    cfg = load_config(REPO / "configs" / "kubernetes.yaml")
    assert cfg.cluster.kind == "kubernetes" and cfg.cluster.security == "auto"
    assert cfg.cluster.kubernetes.image and cfg.cluster.kubernetes.resources
