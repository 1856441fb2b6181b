"""The ALS mathematics: the normal equations of a row, a block's rows solved at once.

:mod:`dmf.als.equations` is the plain-NumPy row solver, written as the equations read;
:mod:`dmf.als.kernels` is the compiled kernel the trainer runs; :mod:`dmf.als.solver` solves a
block with either. Arrays in, arrays out: no Dask, Parquet or config.

May import :mod:`dmf.errors` and :mod:`dmf.store.blocks` (the block type) only.
"""
