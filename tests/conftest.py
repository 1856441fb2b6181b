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
