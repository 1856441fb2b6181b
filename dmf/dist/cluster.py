"""Getting a Dask cluster: an embedded LocalCluster by default, or an existing one.

``connect(config)`` yields a :class:`distributed.Client`. A cluster it started (LocalCluster, a
dask-jobqueue cluster, a Kubernetes cluster) is closed at the end; a cluster it attached to
(``--address``, ``--scheduler-file``) is left running. The dashboard link is printed as soon as
the client is up.

Security: a Dask scheduler runs the code of anyone who can connect to it, as the workers' user.
The embedded LocalCluster listens on loopback only (scheduler, workers and dashboard), and
``cluster.security`` puts TLS on the connections (:func:`security_for`; by default a certificate
set made for the run for every cluster dmf starts, see :mod:`dmf.dist.tls`).

BLAS threads: distributed starts worker processes with OMP/MKL/OPENBLAS_NUM_THREADS=1, but workers
started by hand may not have it, so block tasks also run under :func:`blas_single_thread`.

This is Dask plumbing only: nothing here knows of ALS, the store or the model.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
from collections.abc import Iterator

from dmf.config import ClusterConfig, Config, TLSFiles
from dmf.dist import tls
from dmf.errors import ConfigError

log = logging.getLogger("dmf")

# The embedded cluster listens here only.
LOOPBACK = "127.0.0.1"

BLAS_ENV = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "VECLIB_MAXIMUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
}


@contextlib.contextmanager
def blas_single_thread() -> Iterator[None]:
    """One BLAS thread for the enclosed work (a Dask task already runs on its own thread).

    threadpoolctl limits the BLAS libraries loaded so far: a task function's module loads the
    libraries it calls (e.g. the solver's kernel, and with it SciPy's BLAS) when it is imported,
    which is when a worker unpickles the task, before the task runs."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def scheduler_workers(client) -> list[dict]:
    """The scheduler's record of every worker (address, memory_limit, status, ...).

    Newer versions of distributed list only the first few workers unless asked for all."""
    import inspect

    kwargs = (
        {"n_workers": -1}
        if "n_workers" in inspect.signature(client.scheduler_info).parameters
        else {}
    )
    return list(client.scheduler_info(**kwargs)["workers"].values())


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def dashboard_link(client) -> str | None:
    try:
        return client.dashboard_link
    except Exception:  # noqa: BLE001 - no dashboard (bokeh missing or disabled)
        return None


def with_overrides(
    cfg: ClusterConfig, address: str | None, scheduler_file: str | None
) -> ClusterConfig:
    """Apply --address / --scheduler-file (they win over the config)."""
    if address and scheduler_file:
        raise ConfigError("give either --address or --scheduler-file, not both")
    if address:
        return cfg.model_copy(update={"kind": "address", "address": address})
    if scheduler_file:
        return cfg.model_copy(update={"kind": "scheduler_file", "scheduler_file": scheduler_file})
    return cfg


def local_dashboard_address(value: str | None) -> str | None:
    """``cluster.dashboard_address`` for the embedded cluster: a port alone (``:8787``,
    ``8787``) listens on loopback, like the scheduler. (Dask itself would take ``:8787`` to mean
    every interface.)"""
    if value is None:
        return None
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = "", value
    return f"{host or LOOPBACK}:{port}"


def security_mode(cc: ClusterConfig) -> str | TLSFiles:
    """``none``, ``temporary`` or the files of ``cc.security``, once ``auto`` is decided: TLS
    with a certificate set made for the run for every cluster dmf starts that has sockets, and
    Dask's own configuration for a cluster dmf attaches to (it knows nothing of its
    certificates) or a LocalCluster of threads (in-process, no sockets)."""
    sec = cc.security
    starts = cc.kind in ("local", "jobqueue", "kubernetes")
    if sec == "auto":
        sec = "temporary" if starts and (cc.processes or cc.kind != "local") else "none"
    if sec == "temporary" and not starts:
        raise ConfigError(
            f"cluster.security 'temporary' makes certificates for a cluster dmf starts, not for "
            f"the one at {cc.address or cc.scheduler_file}: give the cluster's CA, certificate "
            "and key as cluster.security {ca_file, cert, key}"
        )
    if sec == "none" and cc.kind == "kubernetes":
        raise ConfigError("cluster.kind 'kubernetes' always uses TLS: cluster.security none")
    return sec


def _read_files(files: TLSFiles) -> tls.CertificateSet:
    texts = {}
    for field in ("ca_file", "cert", "key"):
        path = getattr(files, field)
        try:
            with open(path) as fh:
                texts[field] = fh.read()
        except OSError as exc:
            raise ConfigError(f"cluster.security.{field}: cannot read {path}: {exc}") from exc
        if "-----BEGIN " not in texts[field]:
            raise ConfigError(f"cluster.security.{field}: {path} is not a PEM file")
    return tls.CertificateSet(ca=texts["ca_file"], cert=texts["cert"], key=texts["key"])


def certificate_set(cc: ClusterConfig) -> tls.CertificateSet | None:
    """The PEM texts that ``cc.security`` stands for (made now for ``temporary``), or None."""
    sec = security_mode(cc)
    if sec == "none":
        return None
    if sec == "temporary":
        return tls.generate()
    return _read_files(sec)


def security_for(cc: ClusterConfig):
    """The :class:`distributed.Security` of ``cc.security``, or None for Dask's own config."""
    sec = security_mode(cc)
    if sec == "none":
        return None
    if sec == "temporary":
        from distributed import Security

        return Security.temporary()
    _read_files(sec)  # a missing or wrong file is the config's error, named
    return tls.security_from_pem(sec.ca_file, sec.cert, sec.key)


def resolve_paths(config: Config, cc: ClusterConfig) -> ClusterConfig:
    """The paths of the YAML's ``cluster`` section made relative to the config file, like every
    path there. (Those of --set arrive absolute; --scheduler-file is applied after this.)"""
    update: dict = {}
    if cc.scheduler_file:
        update["scheduler_file"] = str(config.resolve(cc.scheduler_file))
    if isinstance(cc.security, TLSFiles):
        update["security"] = TLSFiles(
            ca_file=str(config.resolve(cc.security.ca_file)),
            cert=str(config.resolve(cc.security.cert)),
            key=str(config.resolve(cc.security.key)),
        )
    return cc.model_copy(update=update) if update else cc


def _attach(target: str, key: str, security, **client_kwargs):
    """Connect to a running scheduler; an unreachable one is the user's config error."""
    from distributed import Client

    try:
        return Client(security=security, **client_kwargs)
    except TypeError as exc:
        if "ssl_context" not in str(exc):
            raise
        error = ConfigError(
            f"{key}: {target} speaks TLS: give its CA, certificate and key as cluster.security "
            "{ca_file, cert, key}"
        )
    except OSError as exc:  # includes TimeoutError and distributed's CommClosedError
        hint = (
            " (with TLS: are cluster.security's certificates those of this cluster?)"
            if security is not None
            else ""
        )
        error = ConfigError(
            f"{key}: cannot reach {target}: {exc}. Is the scheduler running and reachable?{hint}"
        )
    # The half-made Client lives on in the dropped traceback's frames: finalise it now, on this
    # thread. Left to the garbage collector, its __del__ may run inside the IO-loop thread of
    # the next Client, and closing a loop from there deadlocks (distributed's LoopRunner).
    gc.collect()
    raise error


def _start_local(cc: ClusterConfig):
    from distributed import Client, LocalCluster

    security = security_for(cc)
    cluster = LocalCluster(
        n_workers=cc.n_workers,
        threads_per_worker=cc.threads_per_worker,
        memory_limit=cc.memory_limit,
        processes=cc.processes,
        # Scheduler, nannies and workers listen on loopback only: a Dask scheduler runs the
        # code of anyone who can connect to it. (Thread workers without TLS talk in-process,
        # inproc://, which has no host and no socket.)
        host=LOOPBACK if cc.processes or security is not None else None,
        dashboard_address=local_dashboard_address(cc.dashboard_address),
        local_directory=cc.local_directory,
        # Worker processes get one BLAS thread from their environment; thread workers
        # (processes: false) take no ``env`` argument at all (TypeError), and rely on
        # blas_single_thread in each task.
        **({"env": BLAS_ENV} if cc.processes else {}),
        **({"security": security} if security is not None else {}),
    )
    what = f"LocalCluster: {cc.n_workers} workers x {cc.threads_per_worker} threads"
    if security is not None:
        what += ", TLS"
    return cluster, Client(cluster), what


def _start_jobqueue(cc: ClusterConfig):
    from distributed import Client

    try:
        import dask_jobqueue
    except ImportError as exc:
        raise ConfigError(
            "cluster.kind 'jobqueue' needs dask-jobqueue: pip install 'dmf[jobqueue]'"
        ) from exc
    security = security_for(cc)
    options = dict(cc.jobqueue.options)
    if security is not None:
        # dask-jobqueue hands the certificates to the jobs (a temporary set through files in
        # its shared_temp_directory, which every node must see).
        options.setdefault("security", security)
    cls = getattr(dask_jobqueue, f"{cc.jobqueue.system.upper()}Cluster")
    cluster = cls(**options)
    cluster.scale(jobs=cc.jobqueue.jobs)
    what = f"{cc.jobqueue.system} cluster, {cc.jobqueue.jobs} jobs"
    return cluster, Client(cluster), what + (", TLS" if security is not None else "")


def _start_kubernetes(cc: ClusterConfig):
    from distributed import Client

    from dmf.dist.kubernetes import KubernetesCluster, require_operator

    require_operator()  # before anything is made: a missing extra is a config error
    cluster = KubernetesCluster(cc, certificate_set(cc), os.environ)
    try:
        client = Client(cluster.address, security=cluster.security, timeout="60s")
        client.wait_for_workers(1, timeout=cc.kubernetes.timeout)
    except BaseException:
        cluster.close()
        raise
    what = (
        f"Kubernetes DaskCluster {cluster.name} in namespace {cluster.namespace}: "
        f"{cc.n_workers} workers x {cc.threads_per_worker} threads, TLS"
    )
    return cluster, client, what


def _attach_to(cc: ClusterConfig):
    security = security_for(cc)
    tls_note = ", TLS" if security is not None else ""
    if cc.kind == "address":
        client = _attach(cc.address, "cluster.address (--address)", security, address=cc.address)
        return None, client, f"cluster at {cc.address}{tls_note}"
    if not os.path.isfile(cc.scheduler_file):
        raise ConfigError(f"cluster.scheduler_file: {cc.scheduler_file} does not exist")
    client = _attach(
        f"the scheduler of {cc.scheduler_file}",
        "cluster.scheduler_file (--scheduler-file)",
        security,
        scheduler_file=cc.scheduler_file,
    )
    return None, client, f"cluster from {cc.scheduler_file}{tls_note}"


@contextlib.contextmanager
def connect(
    config: Config | ClusterConfig,
    address: str | None = None,
    scheduler_file: str | None = None,
    quiet: bool = False,
):
    """Yield a Client for the configured cluster; close what we started, keep what we joined."""
    cc = config.cluster if isinstance(config, Config) else config
    if isinstance(config, Config):
        cc = resolve_paths(config, cc)
    cc = with_overrides(cc, address, scheduler_file)
    start = {
        "local": _start_local,
        "jobqueue": _start_jobqueue,
        "kubernetes": _start_kubernetes,
    }.get(cc.kind, _attach_to)
    cluster, client, what = start(cc)
    if cc.kind == "local" and cc.dashboard_address is None:
        link = "off (cluster.dashboard_address is null)"
    elif cc.kind == "kubernetes":  # reached through the service (or a port-forward)
        link = cluster.dashboard_link
    else:
        link = dashboard_link(client)
    _say(f"dmf: {what}; dashboard: {link or 'not available'}", quiet)
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


@contextlib.contextmanager
def maybe_connect(config: Config, client=None, address=None, scheduler_file=None, quiet=False):
    """Use ``client`` if given (a notebook's), else :func:`connect`."""
    if client is not None:
        yield client
    else:
        with connect(config, address, scheduler_file, quiet=quiet) as c:
            yield c
