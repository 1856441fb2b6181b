"""Dask on Kubernetes, through the dask-kubernetes operator, always over TLS.

``cluster.kind: kubernetes`` (with ``pip install 'dmf[kubernetes]'``) creates, for one run:

- a Secret holding a certificate set made for the run (:func:`dmf.dist.tls.generate`: CA,
  certificate, key) and the credentials named in ``cluster.kubernetes.pass_env``;
- a DaskCluster resource, which the operator turns into a scheduler pod and service and
  ``cluster.n_workers`` worker pods. Its spec is dask-kubernetes' :func:`make_cluster_spec`,
  with the Secret mounted read-only into every pod, the scheduler on ``tls://`` only, and the
  ``--tls-*`` arguments and ``DASK_DISTRIBUTED__COMM__*`` variables that make the scheduler,
  the workers and any client inside the pods present the certificate and require it of their
  peers.

dmf connects with the same certificate, and deletes both resources at the end (the Secret is
owned by the DaskCluster, so deleting the cluster by hand removes it too).

dask-kubernetes' own ``KubeCluster`` cannot do this: it reaches the scheduler at a hard-coded
``tcp://`` address with an ``rpc`` that carries no TLS context, so it never connects to a TLS
scheduler. :class:`KubernetesCluster` creates the same DaskCluster resource that ``KubeCluster``
would, and uses the operator's public networking helpers to find (or port-forward) the
scheduler service.

:func:`cluster_specs` (config -> the two manifests) is pure, and tested without a Kubernetes
cluster; :class:`KubernetesCluster`, which talks to the Kubernetes API, is not tested here.

This is Dask plumbing only: nothing here knows of ALS, the store or the model.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import secrets
import threading
from collections.abc import Mapping
from typing import Any

from dmf.config import ClusterConfig
from dmf.dist import tls
from dmf.errors import ConfigError

log = logging.getLogger("dmf")

INSTALL_HINT = "cluster.kind 'kubernetes' needs dask-kubernetes: pip install 'dmf[kubernetes]'"
# Where every pod sees the run's certificate set.
TLS_MOUNT = "/etc/dmf/tls"
TLS_VOLUME = "dmf-tls"
PEM_FILES = {"ca_file": "ca.pem", "cert": "cert.pem", "key": "key.pem"}
# The user of docker/Dockerfile: the pods run as it, and the Secret's files belong to its group.
POD_UID = 1000
SCHEDULER_PORT = 8786  # the port make_cluster_spec's scheduler service exposes
DASHBOARD_PORT = 8787  # ... and its dashboard, which the pod's readiness probe reads


def require_operator():
    """dask-kubernetes' operator module, or a ConfigError saying how to install it."""
    try:
        import dask_kubernetes.operator as operator
    except ImportError as exc:
        raise ConfigError(f"{INSTALL_HINT} ({exc})") from exc
    return operator


def default_name() -> str:
    return f"dmf-{secrets.token_hex(4)}"


def _tls_paths() -> dict[str, str]:
    return {field: f"{TLS_MOUNT}/{name}" for field, name in PEM_FILES.items()}


def _tls_args() -> list[str]:
    p = _tls_paths()
    return ["--tls-ca-file", p["ca_file"], "--tls-cert", p["cert"], "--tls-key", p["key"]]


def _tls_env() -> list[dict[str, str]]:
    """Dask config for every process in the pods (clients made inside tasks included): TLS
    required, with the mounted certificate for each role."""
    p = _tls_paths()
    env = {
        "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True",
        "DASK_DISTRIBUTED__COMM__DEFAULT_SCHEME": "tls",
        "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": p["ca_file"],
    }
    for role in ("SCHEDULER", "WORKER", "CLIENT"):
        env[f"DASK_DISTRIBUTED__COMM__TLS__{role}__CERT"] = p["cert"]
        env[f"DASK_DISTRIBUTED__COMM__TLS__{role}__KEY"] = p["key"]
    return [{"name": k, "value": v} for k, v in env.items()]


def _secure_pod(pod: dict[str, Any], secret_name: str) -> None:
    """Mount the certificate set into ``pod`` (a pod spec) read-only, and run it as the image's
    non-root user, whose group alone may read the files."""
    pod["securityContext"] = {
        "runAsNonRoot": True,
        "runAsUser": POD_UID,
        "runAsGroup": POD_UID,
        "fsGroup": POD_UID,
    }
    pod.setdefault("volumes", []).append(
        {
            "name": TLS_VOLUME,
            "secret": {
                "secretName": secret_name,
                "defaultMode": 0o440,
                # Only the PEM files: the credentials in the same Secret reach the pods as
                # environment variables, not as files.
                "items": [{"key": f, "path": f} for f in PEM_FILES.values()],
            },
        }
    )
    for container in pod["containers"]:
        container.setdefault("volumeMounts", []).append(
            {"name": TLS_VOLUME, "mountPath": TLS_MOUNT, "readOnly": True}
        )


def cluster_specs(
    cc: ClusterConfig, name: str, certs: tls.CertificateSet, environ: Mapping[str, str]
) -> dict[str, dict[str, Any]]:
    """The Kubernetes manifests of one run: ``{"secret": Secret, "cluster": DaskCluster}``.

    Pure: the same arguments give the same manifests.

    Parameters
    ----------
    cc
        The ``cluster`` section (``kubernetes`` sub-section, ``n_workers``,
        ``threads_per_worker``, ``memory_limit``).
    name
        The DaskCluster's name; the Secret is ``<name>-tls``.
    certs
        The run's certificate set; its PEM texts go into the Secret.
    environ
        Where the variables named in ``cluster.kubernetes.pass_env`` are read (the driver's
        ``os.environ``); those set go into the Secret and reach the pods through
        ``secretKeyRef``.
    """
    kc = cc.kubernetes
    secret_name = f"{name}-tls"
    passed = {k: environ[k] for k in kc.pass_env if k in environ}
    env = [{"name": k, "value": v} for k, v in kc.env.items()]
    env += [
        {"name": k, "valueFrom": {"secretKeyRef": {"name": secret_name, "key": k}}} for k in passed
    ]
    env += _tls_env()
    worker_command = [
        "dask",
        "worker",
        "--nthreads",
        str(cc.threads_per_worker),
        "--memory-limit",
        str(cc.memory_limit),
        *_tls_args(),
    ]
    spec = require_operator().make_cluster_spec(
        name=name,
        image=kc.image,
        n_workers=cc.n_workers,
        resources=kc.resources,
        env=env,
        worker_command=worker_command,
        scheduler_service_type=kc.scheduler_service_type,
    )
    spec = copy.deepcopy(spec)
    spec["metadata"]["labels"] = {"app.kubernetes.io/managed-by": "dmf"}

    scheduler = spec["spec"]["scheduler"]["spec"]
    scheduler["containers"][0]["args"] = [
        "dask",
        "scheduler",
        # All of the pod's interfaces (the service reaches it there), on TLS only.
        "--host",
        "0.0.0.0",
        "--port",
        str(SCHEDULER_PORT),
        "--protocol",
        "tls",
        *_tls_args(),
        "--dashboard-address",
        f":{DASHBOARD_PORT}",
    ]
    worker = spec["spec"]["worker"]["spec"]
    # The operator points workers at tcp://<name>-scheduler...:8786 unless the container sets
    # the address itself; the scheduler speaks TLS only.
    # (A new list: make_cluster_spec gives both pods the same one, and deepcopy keeps that.)
    worker["containers"][0]["env"] = [
        *worker["containers"][0]["env"],
        {"name": "DASK_SCHEDULER_ADDRESS", "value": f"tls://{name}-scheduler:{SCHEDULER_PORT}"},
    ]
    for pod in (scheduler, worker):
        _secure_pod(pod, secret_name)

    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": secret_name,
            "labels": {"app.kubernetes.io/managed-by": "dmf", "dask.org/cluster-name": name},
        },
        "type": "Opaque",
        "stringData": {
            PEM_FILES["ca_file"]: certs.ca,
            PEM_FILES["cert"]: certs.cert,
            PEM_FILES["key"]: certs.key,
            **passed,
        },
    }
    return {"secret": secret, "cluster": spec}


class KubernetesCluster:
    """A DaskCluster resource and its TLS Secret, made for one run and deleted by :meth:`close`.

    ``address`` (``tls://...``), ``security`` (the certificate set, for the Client) and
    ``dashboard_link`` are set once the scheduler is up."""

    def __init__(self, cc: ClusterConfig, certs: tls.CertificateSet, environ: Mapping[str, str]):
        require_operator()
        self.name = cc.kubernetes.name or default_name()
        self.specs = cluster_specs(cc, self.name, certs, environ)
        self.security = certs.security()
        self.namespace = cc.kubernetes.namespace
        self.address: str | None = None
        self.dashboard_link: str | None = None
        self._cluster = None
        self._secret = None
        # kr8s binds its API client to the event loop it was made in: one loop, on a thread of
        # its own, serves the whole life of the cluster.
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, daemon=True, name="dmf-kubernetes"
        )
        self._thread.start()
        try:
            self._run(self._up(cc.kubernetes.timeout), timeout=cc.kubernetes.timeout + 60)
        except BaseException:
            self.close()
            raise

    def _run(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _up(self, timeout: float) -> None:
        import kr8s.asyncio
        from dask_kubernetes.operator.kubecluster.kubecluster import wait_for_service
        from dask_kubernetes.operator.networking import get_scheduler_address, wait_for_scheduler
        from kr8s.asyncio.objects import Secret, new_class

        try:
            api = await kr8s.asyncio.api(namespace=self.namespace)
        except Exception as exc:  # noqa: BLE001 - no kubeconfig, no service account, ...
            raise ConfigError(f"cluster.kind 'kubernetes': cannot reach Kubernetes: {exc}") from exc
        self.namespace = self.namespace or api.namespace
        dask_cluster = new_class("DaskCluster", "kubernetes.dask.org/v1", namespaced=True)
        self._cluster = await dask_cluster(self.specs["cluster"], namespace=self.namespace)
        try:
            await self._cluster.create()
        except Exception as exc:  # noqa: BLE001 - httpx.HTTPStatusError, kr8s.ServerError
            self._cluster = None
            raise ConfigError(
                f"cluster.kind 'kubernetes': cannot create DaskCluster {self.name} in namespace "
                f"{self.namespace}: {exc}. Is the dask-kubernetes operator installed there?"
            ) from exc
        manifest = copy.deepcopy(self.specs["secret"])
        manifest["metadata"]["ownerReferences"] = [
            {
                "apiVersion": "kubernetes.dask.org/v1",
                "kind": "DaskCluster",
                "name": self.name,
                "uid": self._cluster.metadata.uid,
            }
        ]
        self._secret = await Secret(manifest, namespace=self.namespace)
        await self._secret.create()

        service = f"{self.name}-scheduler"

        async def scheduler_up() -> tuple[str, str]:
            await wait_for_scheduler(self.name, self.namespace, timeout=timeout)
            await wait_for_service(service, self.namespace)
            comm = await get_scheduler_address(service, self.namespace)
            http = await get_scheduler_address(service, self.namespace, port_name="http-dashboard")
            return comm, http

        try:
            comm, http = await asyncio.wait_for(scheduler_up(), timeout)
        except asyncio.TimeoutError as exc:
            raise ConfigError(
                f"cluster.kind 'kubernetes': the scheduler of {self.name} was not up after "
                f"{timeout:g} s (cluster.kubernetes.timeout); see `kubectl describe pod -l "
                f"dask.org/cluster-name={self.name}`"
            ) from exc
        # The helpers say tcp:// whatever the scheduler speaks; ours speaks TLS only.
        self.address = "tls://" + comm.split("://", 1)[1]
        self.dashboard_link = f"http://{http.split('://', 1)[1]}/status"

    async def _down(self) -> None:
        import kr8s

        for obj in (self._cluster, self._secret):
            if obj is None:
                continue
            try:
                await obj.delete()
            except kr8s.NotFoundError:
                pass  # already gone (deleting the DaskCluster takes its Secret along)
            except Exception as exc:  # noqa: BLE001 - say what is left behind, and go on
                log.warning(
                    "could not delete %s %s in namespace %s: %s; delete it with kubectl",
                    obj.kind,
                    obj.name,
                    self.namespace,
                    exc,
                )
        self._cluster = self._secret = None

    def close(self) -> None:
        """Delete the DaskCluster and the Secret (what is left of them), and stop the loop."""
        if self._loop.is_closed():
            return
        try:
            self._run(self._down(), timeout=120)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()
