"""Convergence plot written with every model: the objective and the RMSEs per iteration, the
iteration whose model is kept marked, the rank and regularisation in the title.

Drawn on a bare :class:`matplotlib.figure.Figure` with the Agg canvas: no display needed, and
pyplot's global state (its backend, in a notebook say) is never touched.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from typing import Any


def plot_history(history: list[dict[str, Any]], model: Mapping[str, Any] | None = None) -> bytes:
    """The convergence plot of ``history`` as PNG bytes.

    Parameters
    ----------
    history
        The per-iteration records of training (``iteration``, ``objective``, ``train_rmse``,
        ``validation_rmse``), as in ``model.json``.
    model
        The model's ``model.json`` document (or :meth:`dmf.model.model.Model.manifest`): its
        ``rank``, ``config.model`` (``reg``, ``reg_bias``, ``weighted_reg``) go in the title and
        its ``best_iteration`` (early stopping) is the iteration marked. Without it the title
        says nothing of them, and the iteration marked is found from ``history`` alone.
    """
    fig = convergence_figure(history, model)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def convergence_figure(history: list[dict[str, Any]], model: Mapping[str, Any] | None = None):
    """The :class:`matplotlib.figure.Figure` of :func:`plot_history`: the objective (log scale)
    on the left, train and validation RMSE on the right, the marked iteration (a star, labelled
    in the legend, and a dotted vertical line on both) and the title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.4))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    its = [h["iteration"] for h in history]
    ax1.plot(its, [_num(h.get("objective")) for h in history], marker="o")
    ax1.set_xlabel("iteration")
    ax1.set_ylabel("objective J")
    ax1.set_yscale("log")
    ax1.set_title("objective")
    if _implicit(history):
        # Implicit feedback: ranking quality of the validation users (no rating error).
        val = [_num(h.get("validation_ndcg")) for h in history]
        ax2.plot(its, val, marker="s", label="validation")
        ax2.set_ylabel("NDCG@k")
        ax2.set_title("validation NDCG (implicit feedback)")
    else:
        ax2.plot(its, [_num(h.get("train_rmse")) for h in history], marker="o", label="train")
        val = [_num(h.get("validation_rmse")) for h in history]
        if any(math.isfinite(v) for v in val):
            ax2.plot(its, val, marker="s", label="validation")
        ax2.set_ylabel("RMSE")
        ax2.set_title("RMSE")
    ax2.set_xlabel("iteration")
    if history:
        _mark(ax1, ax2, history, model)
    ax2.legend(loc="best", fontsize="small")
    fig.suptitle(title(model))
    fig.tight_layout()
    return fig


def marked_iteration(
    history: list[dict[str, Any]], model: Mapping[str, Any] | None = None
) -> tuple[int, str]:
    """(iteration, what it is) of the iteration the plot marks: the one early stopping kept
    (``best_iteration`` of ``model``); else the one of the lowest validation RMSE (the earliest
    on a tie); else, with no validation, the last one."""
    if model is not None and model.get("best_iteration") is not None:
        return int(model["best_iteration"]), "kept"
    if _implicit(history):
        scored = [
            (-_num(h.get("validation_ndcg")), h["iteration"])
            for h in history
            if math.isfinite(_num(h.get("validation_ndcg")))
        ]
        return (min(scored)[1], "best") if scored else (history[-1]["iteration"], "last")
    scored = [
        (_num(h.get("validation_rmse")), h["iteration"])
        for h in history
        if math.isfinite(_num(h.get("validation_rmse")))
    ]
    if scored:
        return min(scored)[1], "best"
    return history[-1]["iteration"], "last"


def title(model: Mapping[str, Any] | None) -> str:
    """``rank 8, reg 0.05, reg_bias 0.05, weighted (ALS-WR)`` from a ``model.json`` document;
    'convergence' without one."""
    if not model:
        return "convergence"
    m = (model.get("config") or {}).get("model") or {}
    parts = []
    if model.get("rank") is not None or m.get("rank") is not None:
        parts.append(f"rank {model.get('rank', m.get('rank'))}")
    reg = m.get("reg")
    if reg is not None:
        bias = m.get("reg_bias")
        parts.append(f"reg {reg:g}")
        parts.append(f"reg_bias {reg if bias is None else bias:g}")
    if "weighted_reg" in m:
        parts.append("weighted (ALS-WR)" if m["weighted_reg"] else "unweighted")
    return ", ".join(parts) or "convergence"


def _mark(ax1, ax2, history: list[dict[str, Any]], model: Mapping[str, Any] | None) -> None:
    """A star at the marked iteration on the RMSE curve it was chosen by (validation, else
    train), labelled in the legend, and a dotted vertical line there on both panels."""
    it, what = marked_iteration(history, model)
    rec = next((h for h in history if h["iteration"] == it), None)
    if rec is None:  # an iteration the history does not hold: the line alone
        y, curve = math.nan, "RMSE"
    elif _implicit(history):
        y, curve = _num(rec.get("validation_ndcg")), "validation NDCG"
    elif math.isfinite(_num(rec.get("validation_rmse"))):
        y, curve = _num(rec["validation_rmse"]), "validation RMSE"
    else:
        y, curve = _num(rec.get("train_rmse")), "train RMSE"
    words = {"kept": "kept (early stopping)", "best": "best", "last": "last"}[what]
    label = f"{words}: iteration {it}" + (f", {curve} {y:.4f}" if math.isfinite(y) else "")
    for ax in (ax1, ax2):
        ax.axvline(it, color="0.5", linestyle=":", linewidth=1)
    ax2.plot([it], [y], marker="*", markersize=14, color="tab:red", linestyle="", label=label)


def _implicit(history: list[dict[str, Any]]) -> bool:
    """A history of implicit-feedback training (it records NDCG, not RMSE)."""
    return any("validation_ndcg" in h for h in history)


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)
