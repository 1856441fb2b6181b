"""Convergence plot written with every model (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import io
from typing import Any


def plot_history(history: list[dict[str, Any]]) -> bytes:
    """The convergence plot of ``history`` as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [h["iteration"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(its, [h["objective"] for h in history], marker="o")
    ax1.set_xlabel("iteration")
    ax1.set_ylabel("objective J")
    ax1.set_yscale("log")
    ax1.set_title("objective")
    ax2.plot(its, [h["train_rmse"] for h in history], marker="o", label="train")
    val = [h.get("validation_rmse") for h in history]
    if any(v is not None for v in val):
        ax2.plot(
            its, [float("nan") if v is None else v for v in val], marker="s", label="validation"
        )
    ax2.set_xlabel("iteration")
    ax2.set_ylabel("RMSE")
    ax2.set_title("RMSE")
    ax2.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
