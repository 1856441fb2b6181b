"""The store on disk: its layout and manifest, rating blocks, and the storage module through
which every file dmf writes is committed.

May import :mod:`dmf.errors` and :mod:`dmf.config` only.
"""

from dmf.store.layout import Store, store_from_arrays

__all__ = ["Store", "store_from_arrays"]
