"""Training on Dask: the typed state of the two sides, the half-step run on workers, the loop
with its stopping rules, and checkpoints.

May import every layer below it: :mod:`dmf.errors`, :mod:`dmf.config`, :mod:`dmf.store`,
:mod:`dmf.dist`, :mod:`dmf.als` and :mod:`dmf.model`.
"""

from dmf.train.loop import Trainer, train

__all__ = ["Trainer", "train"]
