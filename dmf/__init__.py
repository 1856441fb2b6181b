"""dmf: distributed matrix factorization (biased ALS) on Dask, for ratings larger than memory."""

__version__ = "0.1.0"
