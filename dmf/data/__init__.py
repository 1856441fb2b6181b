"""Raw ratings in, a store out: readers, id maps, ingest, planted-truth synthesis, downloads,
and the counter-based hashing (splitmix64) that ingest's split and synth's draws share.

May import :mod:`dmf.errors`, :mod:`dmf.config`, :mod:`dmf.store` and :mod:`dmf.dist`; never the
ALS maths, the model or training.
"""
