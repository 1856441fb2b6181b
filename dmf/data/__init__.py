"""Raw ratings in, a store out: readers, id maps, ingest, planted-truth synthesis, downloads.

May import :mod:`dmf.errors`, :mod:`dmf.config`, :mod:`dmf.store` and :mod:`dmf.dist`; never the
ALS maths, the model or training.
"""
