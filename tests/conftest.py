"""Shared fixtures: real Dask clusters (worker processes) and small real stores on disk."""

from __future__ import annotations

import numpy as np
import pytest

from dmf.store.layout import Store, store_from_arrays


@pytest.fixture(scope="session")
def client():
    """A session-wide LocalCluster with two single-threaded worker processes."""
    from distributed import Client, LocalCluster

    from dmf.dist.cluster import BLAS_ENV

    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            memory_limit="2GiB",
            env=BLAS_ENV,
        ) as cluster,
        Client(cluster) as c,
    ):
        yield c


def random_ratings(n_users, n_items, nnz, seed=0, rank=3, noise=0.3):
    """Distinct (user, item) pairs with planted low-rank structure plus noise (float32)."""
    rng = np.random.default_rng(seed)
    nnz = min(nnz, n_users * n_items)
    keys = rng.choice(n_users * n_items, size=nnz, replace=False)
    u, i = keys // n_items, keys % n_items
    U = rng.normal(0, 0.6, (n_users, rank))
    V = rng.normal(0, 0.6, (n_items, rank))
    b = rng.normal(0, 0.3, n_users)
    c = rng.normal(0, 0.3, n_items)
    r = 3.5 + b[u] + c[i] + np.einsum("ij,ij->i", U[u], V[i]) + rng.normal(0, noise, nnz)
    return u.astype(np.int64), i.astype(np.int64), r.astype(np.float32)


def store_with_validation(path, n_users, n_items, nnz, seed, n_blocks, noise=0.3) -> Store:
    """Planted ratings with every fifth one held out as the validation split."""
    u, i, r = random_ratings(n_users, n_items, nnz, seed=seed, noise=noise)
    val = np.arange(len(u)) % 5 == 0
    return store_from_arrays(
        path,
        u[~val],
        i[~val],
        r[~val],
        n_users=n_users,
        n_items=n_items,
        n_blocks=n_blocks,
        held_out={"validation": (u[val], i[val], r[val])},
    )


@pytest.fixture
def small_store(tmp_path) -> Store:
    """60 users x 40 items, ~900 train ratings, 3 blocks a side, a test split."""
    u, i, r = random_ratings(60, 40, 1000, seed=1)
    test = np.arange(len(u)) % 10 == 0
    return store_from_arrays(
        tmp_path / "store",
        u[~test],
        i[~test],
        r[~test],
        n_users=60,
        n_items=40,
        n_blocks=3,
        held_out={"test": (u[test], i[test], r[test])},
    )


# -- a real S3 server on loopback ---------------------------------------------------------------


@pytest.fixture(scope="session")
def s3():
    """moto's standalone S3 server, on loopback: a real HTTP S3 endpoint (not an in-process
    mock). Its endpoint and test credentials are put in this process's environment, the
    standard way (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), so fsspec's S3 filesystem finds
    them, and so do LocalCluster worker processes started afterwards. Yields the endpoint URL."""
    import os

    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "dmf-test",
        "AWS_SECRET_ACCESS_KEY": "dmf-test-secret",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env["AWS_ENDPOINT_URL"]
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture
def s3_bucket(s3, request):
    """A fresh, empty bucket on the test S3 server, as ``s3://NAME``."""
    import re
    import uuid

    import fsspec

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    bucket = f"{name}-{uuid.uuid4().hex[:8]}"
    fs = fsspec.filesystem("s3")
    fs.mkdir(bucket)
    fs.invalidate_cache()
    return f"s3://{bucket}"


# Ratings that overfit as real ones do (tests/test_defaults.py, tests/test_tune.py): ~100k
# ratings of 3,000 users and 1,500 items, 28 a user on average, the median user far fewer.
REALISTIC = {
    "n_users": 3000,
    "n_items": 1500,
    "n_ratings": 100_000,
    "rank": 4,
    "factor_scale": 0.45,
    "tail_rank": 40,
    "tail_scale": 0.45,
    "noise": 0.75,
    "user_skew": 1.0,
    "item_skew": 1.0,
    "mu": 3.6,
    "bias_scale": 0.4,
    "clip": [1, 5],
    "round_to": 1,
    "seed": 1,
}
