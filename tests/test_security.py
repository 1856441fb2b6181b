"""Who can reach a cluster dmf uses: loopback binding, TLS, and a dashboard that is served.

Everything here is real: dmf's LocalCluster (worker processes), a `dask scheduler` and a
`dask worker` started as processes with TLS on loopback, HTTP requests to the dashboard, and TLS
handshakes. The certificates for the attach test are made here with `cryptography`, not by the
code under test.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import re
import socket
import ssl
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dask
import psutil
import pytest
import yaml
from conftest import random_ratings

from dmf.config import load_config
from dmf.dist import tls
from dmf.dist.cluster import connect
from dmf.errors import ConfigError
from dmf.model.model import Model
from dmf.store import store_from_arrays
from dmf.train import train

pytestmark = pytest.mark.cluster

DASK = str(Path(sys.executable).with_name("dask"))
LINE = re.compile(r"^dmf: (.*); dashboard: (\S+)$", re.M)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening() -> list[tuple[str, int]]:
    """(address, port) of every listening socket of this process and its children."""
    me = psutil.Process()
    found = []
    for proc in [me, *me.children(recursive=True)]:
        try:
            conns = proc.net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        found += [c.laddr[:2] for c in conns if c.status == psutil.CONN_LISTEN]
    return found


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    u, i, r = random_ratings(200, 120, 5_000, seed=5)
    return store_from_arrays(tmp_path_factory.mktemp("sec") / "store", u, i, r, n_blocks=2)


def raw_config(store, model_dir, **cluster) -> dict:
    return {
        "store": {"path": str(store.path)},
        "model": {"rank": 3, "reg": 0.1, "seed": 1},
        "train": {"iterations": 2, "progress": "off", "checkpoint_every": 0},
        "cluster": {"n_workers": 1, "memory_limit": "1GiB", **cluster},
        "output": {"model": str(model_dir), "plot": False},
    }


# ---------------------------------------------------------------------------------------------
# The embedded cluster: loopback only, and the dashboard is there
# ---------------------------------------------------------------------------------------------
def test_embedded_cluster_listens_on_loopback_only_and_serves_its_dashboard(
    store, tmp_path, capsys
):
    # A port alone, as configs/quickstart.yaml writes it (":8787"; port 0 here, so that no
    # other test's dashboard is in the way): dmf reads it as loopback, where Dask alone would
    # listen on every interface.
    cfg = load_config(raw=raw_config(store, tmp_path / "m", dashboard_address=":0"))
    before = set(listening())
    with connect(cfg) as client:
        ours = [a for a in listening() if a not in before]
        line = LINE.search(capsys.readouterr().err)
        assert line, "no dashboard line printed"
        link = line.group(2)
        with urllib.request.urlopen(link, timeout=30) as resp:
            status, ctype, body = resp.status, resp.headers["Content-Type"], resp.read().decode()
        scheduler = client.scheduler.address
    # Scheduler, nanny, worker and dashboard: all on loopback, none on 0.0.0.0 or another address.
    assert len(ours) >= 3, ours
    assert all(ipaddress.ip_address(host).is_loopback for host, _ in ours), ours
    port = int(re.match(r"http://127\.0\.0\.1:(\d+)/status$", link).group(1))
    assert ("127.0.0.1", port) in ours
    assert scheduler.startswith("tls://127.0.0.1:")  # auto: TLS for the cluster dmf starts
    # The dashboard itself, not distributed's "Dask needs bokeh>=3.1.0 for the dashboard".
    assert status == 200 and ctype.startswith("text/html")
    assert "<title>Dask Diagnostic UI</title>" in body
    assert "bokeh" in body and "needs bokeh" not in body


def test_dashboard_address_can_open_it_or_turn_it_off(store, tmp_path, capsys):
    cfg = load_config(raw=raw_config(store, tmp_path / "m", dashboard_address=None))
    with connect(cfg):
        pass
    assert "dashboard: off (cluster.dashboard_address is null)" in capsys.readouterr().err
    from dmf.dist.cluster import local_dashboard_address

    assert local_dashboard_address(":8787") == "127.0.0.1:8787"
    assert local_dashboard_address("8787") == "127.0.0.1:8787"
    assert local_dashboard_address("0.0.0.0:8787") == "0.0.0.0:8787"  # asked for: kept
    assert load_config().cluster.dashboard_address == "127.0.0.1:8787"


# ---------------------------------------------------------------------------------------------
# security: temporary -- the embedded cluster refuses whoever lacks the run's certificate
# ---------------------------------------------------------------------------------------------
def handshake_without_client_certificate(address: str) -> Exception | None:
    """Open a TLS connection to ``tls://host:port`` presenting no certificate, send a byte and
    read: the error the server's refusal causes, or None if it let us talk."""
    host, port = address.removeprefix("tls://").rsplit(":", 1)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # we do not check the server; it checks us
    try:
        with socket.create_connection((host, int(port)), timeout=10) as raw:
            with ctx.wrap_socket(raw) as s:
                s.sendall(b"\0")
                # TLS 1.3 reports a refused client certificate on the first read.
                if s.recv(1) == b"":
                    return ConnectionResetError("closed by the server")
    except (ssl.SSLError, OSError) as exc:
        return exc
    return None


def try_client(address: str, **kwargs) -> None:
    """Connect a ``distributed.Client`` to ``address`` and leave. It runs on an event loop of
    its own that ends with it, so a failed attempt leaves no IO-loop thread behind."""
    from distributed import Client

    async def attempt():
        client = Client(address, asynchronous=True, timeout="3s", **kwargs)
        try:
            await client
        finally:
            await client.close()  # also after a failed start, while its loop still runs

    asyncio.run(attempt())


def test_temporary_tls_refuses_clients_without_the_certificate(store, tmp_path, capsys, caplog):
    from distributed import Security

    cfg = load_config(raw=raw_config(store, tmp_path / "m", security="temporary"))
    with connect(cfg) as client:
        address = client.scheduler.address
        assert address.startswith("tls://127.0.0.1:")
        assert client.submit(sum, [1, 2], pure=False).result(timeout=30) == 3
        with dask.config.set({"distributed.comm.timeouts.connect": "3s"}):
            # A plain client: no TLS context at all, so no connection.
            with pytest.raises((TypeError, OSError)):
                try_client(address)
            # Plain TCP to the TLS port: the scheduler does not answer it.
            with pytest.raises(OSError):
                try_client(address.replace("tls://", "tcp://"))
            # TLS with certificates of another CA: the client does not trust the scheduler...
            with pytest.raises(OSError):
                try_client(address, security=Security.temporary())
            # ... and the scheduler does not trust a client that trusts it, but presents a
            # certificate another CA signed.
            other = make_pki(tmp_path / "other", "intruder")
            intruder = Security(
                require_encryption=True,
                tls_ca_file=client.security.tls_ca_file,
                tls_client_cert=str(other["cert"]),
                tls_client_key=str(other["key"]),
            )
            with pytest.raises(OSError):
                try_client(address, security=intruder)
            # The refusal is the scheduler's (it runs in this process and logs it, from its own
            # thread: on a loaded machine a moment after the client gave up).
            refusal = (
                r"Listener on 'tls://127\.0\.0\.1:\d+': TLS handshake failed .*"
                r"certificate verify failed"
            )
            deadline = time.monotonic() + 10
            while not re.search(refusal, caplog.text) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert re.search(refusal, caplog.text), caplog.text
        # TLS presenting no certificate: the scheduler requires one (mutual TLS).
        refused = handshake_without_client_certificate(address)
        assert refused is not None, "the scheduler talked to a client with no certificate"
    assert "LocalCluster: 1 workers x 1 threads, TLS" in capsys.readouterr().err


def test_training_on_a_temporary_tls_cluster(store, tmp_path, capsys):
    cfg = load_config(raw=raw_config(store, tmp_path / "m", security="temporary"))
    model = train(store, cfg)
    assert len(model.history) == 2
    assert Model.load(tmp_path / "m").rank == 3
    assert ", TLS; dashboard: http://127.0.0.1:" in capsys.readouterr().err


def test_temporary_is_for_clusters_dmf_starts(store, tmp_path):
    with pytest.raises(ConfigError, match=r"cluster\.security 'temporary'"):
        load_config(
            raw={"cluster": {"kind": "address", "address": "tls://x:1", "security": "temporary"}}
        )
    cfg = load_config(raw=raw_config(store, tmp_path / "m", security="temporary"))
    with pytest.raises(ConfigError, match=r"cluster\.security 'temporary'.*tls://127\.0\.0\.1:9"):
        with connect(cfg, address="tls://127.0.0.1:9"):
            pass


# ---------------------------------------------------------------------------------------------
# Attaching to a TLS cluster with cluster.security files
# ---------------------------------------------------------------------------------------------
def make_pki(directory: Path, name: str) -> dict[str, Path]:
    """A CA and one certificate it signed (RSA), written as PEM files: ca.pem, cert.pem, key.pem."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def build(subject, issuer, public_key, signing_key, ca):
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .sign(signing_key, hashes.SHA256())
        )

    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca = build(f"{name} CA", f"{name} CA", ca_key.public_key(), ca_key, True)
    cert = build(name, f"{name} CA", key.public_key(), ca_key, False)
    directory.mkdir(parents=True)
    pem = serialization.Encoding.PEM
    files = {"ca_file": directory / "ca.pem", "cert": directory / "cert.pem"}
    files["key"] = directory / "key.pem"
    files["ca_file"].write_bytes(ca.public_bytes(pem))
    files["cert"].write_bytes(cert.public_bytes(pem))
    files["key"].write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return files


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory):
    """A `dask scheduler` and a `dask worker` on loopback speaking TLS with certificates of one
    CA: (address, scheduler file, directory holding tls/ca.pem, cert.pem, key.pem)."""
    from distributed import Client

    tmp = tmp_path_factory.mktemp("tlscluster")
    files = make_pki(tmp / "tls", "test-cluster")
    tls_args = ["--tls-ca-file", files["ca_file"], "--tls-cert", files["cert"]]
    tls_args += ["--tls-key", files["key"]]
    sched_file = tmp / "scheduler.json"
    port = free_port()
    procs, logs = [], []

    def spawn(name, *args):
        log = open(tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed in teardown
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [DASK, *map(str, args)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=tmp,
                start_new_session=True,
            )
        )

    try:
        spawn(
            "scheduler",
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            port,
            "--protocol",
            "tls",
            *tls_args,
            "--scheduler-file",
            sched_file,
            "--no-dashboard",
        )
        deadline = time.monotonic() + 60
        while not sched_file.is_file():
            assert procs[0].poll() is None, (tmp / "scheduler.log").read_text()
            assert time.monotonic() < deadline, "scheduler did not start"
            time.sleep(0.1)
        spawn(
            "worker",
            "worker",
            "--scheduler-file",
            sched_file,
            *tls_args,
            "--nthreads",
            "1",
            "--no-dashboard",
            "--memory-limit",
            "1GiB",
            "--host",
            "127.0.0.1",
        )
        address = json.loads(sched_file.read_text())["address"]
        assert address == f"tls://127.0.0.1:{port}"
        sec = tls.security_from_pem(*(str(files[k]) for k in ("ca_file", "cert", "key")))
        with Client(address, security=sec, timeout=30) as c:
            c.wait_for_workers(1, timeout=60)
        yield address, str(sched_file), tmp
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                os.killpg(p.pid, 15)
                p.wait(timeout=30)
        for log in logs:
            log.close()


def test_attach_with_security_files(tls_cluster, store, tmp_path, capsys):
    address, sched_file, tls_home = tls_cluster
    # A config file beside the certificates: relative paths are relative to the file.
    config = tls_home / "attach.yaml"
    raw = raw_config(store, tmp_path / "m")
    raw["cluster"]["security"] = {
        "ca_file": "tls/ca.pem",
        "cert": "tls/cert.pem",
        "key": "tls/key.pem",
    }
    config.write_text(yaml.safe_dump(raw))
    cfg = load_config(config)
    model = train(store, cfg, address=address)
    assert len(model.history) == 2
    model = train(store, cfg, scheduler_file=sched_file)
    assert len(model.history) == 2
    assert f"cluster at {address}, TLS" in capsys.readouterr().err


def test_dmf_train_attaches_with_security_from_set(tls_cluster, store, tmp_path):
    address, _, tls_home = tls_cluster
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(raw_config(store, tmp_path / "m")))
    sets = [f"cluster.security.{k}={tls_home / 'tls' / f}" for k, f in tls.FILE_NAMES.items()]
    proc = subprocess.run(
        [sys.executable, "-m", "dmf", "train", str(config), "--address", address]
        + [arg for s in sets for arg in ("--set", s)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert Model.load(tmp_path / "m").rank == 3


def test_attach_without_or_with_wrong_certificates_is_a_config_error(tls_cluster, store, tmp_path):
    address, _, _ = tls_cluster
    cfg = load_config(raw=raw_config(store, tmp_path / "m"))
    with pytest.raises(ConfigError, match=r"cluster\.address .*speaks TLS.*cluster\.security"):
        train(store, cfg, address=address, quiet=True)
    other = make_pki(tmp_path / "other", "someone-else")
    raw = raw_config(store, tmp_path / "m")
    raw["cluster"]["security"] = {k: str(v) for k, v in other.items()}
    with dask.config.set({"distributed.comm.timeouts.connect": "3s"}):
        with pytest.raises(ConfigError, match=r"cannot reach .*certificates"):
            train(store, load_config(raw=raw), address=address, quiet=True)
    raw["cluster"]["security"]["key"] = str(tmp_path / "missing.pem")
    with pytest.raises(ConfigError, match=r"cluster\.security\.key: cannot read .*missing\.pem"):
        train(store, load_config(raw=raw), address=address, quiet=True)


# ---------------------------------------------------------------------------------------------
# python -m dmf.dist.tls: the certificate set of the SLURM script
# ---------------------------------------------------------------------------------------------
def test_tls_helper_writes_a_private_certificate_set(tmp_path):
    from cryptography import x509

    out = tmp_path / "run" / "tls"
    proc = subprocess.run(
        [sys.executable, "-m", "dmf.dist.tls", str(out)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    key, _, value = proc.stdout.strip().partition("=")
    assert key == "cluster.security"
    paths = json.loads(value)
    assert paths == {k: str(out / f) for k, f in tls.FILE_NAMES.items()}
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    for p in paths.values():
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    ca = x509.load_pem_x509_certificate(Path(paths["ca_file"]).read_bytes())
    cert = x509.load_pem_x509_certificate(Path(paths["cert"]).read_bytes())
    cert.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    assert Path(paths["key"]).read_text().startswith("-----BEGIN PRIVATE KEY-----")
    # The override it prints is one dmf accepts.
    cfg = load_config(
        raw={"cluster": {"kind": "address", "address": "tls://h:1"}},
        overrides=[proc.stdout.strip()],
    )
    assert cfg.cluster.security.key == paths["key"]
