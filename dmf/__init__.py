"""dmf: distributed matrix factorization (biased ALS) on Dask, for ratings larger than memory."""

__version__ = "0.1.0"

# The Python API, loaded on first use so that `import dmf` (and the CLI) stays light.
_EXPORTS = {
    "ALS": "dmf.api",
    "ColdStart": "dmf.model.ids",
    "Model": "dmf.model.model",
    "load": "dmf.model.model",
    "Store": "dmf.store.layout",
}
__all__ = ["ALS", "ColdStart", "Model", "Store", "load", "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dmf' has no attribute {name!r}")
