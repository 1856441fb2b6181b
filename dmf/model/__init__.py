"""The trained model and its uses: the model directory, raw-id lookup, predict, fold-in,
recommend (with item filters), the top users for items, similar items and users, and
evaluation.

May import :mod:`dmf.errors`, :mod:`dmf.config`, :mod:`dmf.store`, :mod:`dmf.dist` and
:mod:`dmf.als`; never the training loop.
"""

from dmf.model.model import Model, load

__all__ = ["Model", "load"]
