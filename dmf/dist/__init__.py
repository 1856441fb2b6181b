"""Dask plumbing: getting a cluster, running tasks on it, one BLAS thread per Dask thread.

Knows nothing of ALS or of the store. May import :mod:`dmf.errors` and :mod:`dmf.config` only.
"""
