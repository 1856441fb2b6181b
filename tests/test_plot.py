"""The convergence plot: written with the model, the kept iteration marked where it is, the rank
and regularisation in the title."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from matplotlib.image import imread

from dmf.model.model import Model
from dmf.model.plot import convergence_figure, marked_iteration, plot_history, title

PNG = b"\x89PNG\r\n\x1a\n"


def history(n=8, validation=True):
    """Iterations 1..n: the objective and train RMSE fall; the validation RMSE is lowest at 5."""
    rows = []
    for it in range(1, n + 1):
        row = {"iteration": it, "objective": 1000.0 / it, "train_rmse": 1.0 / it**0.3}
        if validation:
            row["validation_rmse"] = 0.8 + 0.01 * (it - 5) ** 2
        rows.append(row)
    return rows


def small_model(hist, meta=None, weighted=True, reg_bias=None):
    rng = np.random.default_rng(0)
    return Model(
        3.5,
        pa.array(np.arange(4, dtype=np.int64)),
        pa.array(np.arange(3, dtype=np.int64)),
        rng.normal(size=(4, 2)).astype(np.float32),
        np.zeros(4, np.float32),
        rng.normal(size=(3, 2)).astype(np.float32),
        np.zeros(3, np.float32),
        config={"model": {"rank": 2, "reg": 0.05, "reg_bias": reg_bias, "weighted_reg": weighted}},
        history=hist,
        meta=meta,
    )


def star(fig):
    """The marker of the marked iteration (the RMSE panel's one-point line) and its label."""
    ax = fig.axes[1]
    stars = [line for line in ax.get_lines() if line.get_marker() == "*"]
    assert len(stars) == 1
    return stars[0]


def vlines_x(ax):
    return [
        line.get_xdata()[0]
        for line in ax.get_lines()
        if line.get_linestyle() == ":" and len(set(line.get_xdata())) == 1
    ]


def test_the_model_writes_the_plot(tmp_path):
    model = small_model(history(), meta={"best_iteration": 5})
    root = model.save(tmp_path / "model")
    png = (root / "convergence.png").read_bytes()
    assert png[:8] == PNG
    img = imread(io.BytesIO(png), format="png")
    assert img.shape[1] == 1000 and img.shape[0] >= 400  # 10 x 4.4 in at 100 dpi


def test_title_and_kept_iteration_from_model_json():
    hist = history()
    # Early stopping kept iteration 3 (with min_delta, not the lowest validation RMSE at 5).
    doc = small_model(hist, meta={"best_iteration": 3}).manifest()
    fig = convergence_figure(hist, doc)
    t = fig.texts[0].get_text()  # the suptitle
    assert t == "rank 2, reg 0.05, reg_bias 0.05, weighted (ALS-WR)"
    s = star(fig)
    assert list(s.get_xdata()) == [3]
    assert list(s.get_ydata()) == [pytest.approx(hist[2]["validation_rmse"])]
    assert s.get_label().startswith("kept (early stopping): iteration 3, validation RMSE 0.8400")
    # The label is in the legend, and both panels have the dotted line at x = 3.
    legend = [x.get_text() for x in fig.axes[1].get_legend().get_texts()]
    assert s.get_label() in legend
    assert vlines_x(fig.axes[0]) == [3] and vlines_x(fig.axes[1]) == [3]


def test_title_says_unweighted_and_a_separate_bias_penalty():
    doc = small_model(history(), weighted=False, reg_bias=0.5).manifest()
    assert title(doc) == "rank 2, reg 0.05, reg_bias 0.5, unweighted"
    assert title(None) == "convergence"


def test_without_early_stopping_the_lowest_validation_rmse_is_marked():
    hist = history()
    hist[7]["validation_rmse"] = hist[4]["validation_rmse"]  # a tie: the earlier one
    assert marked_iteration(hist) == (5, "best")
    fig = convergence_figure(hist, small_model(hist).manifest())
    assert list(star(fig).get_xdata()) == [5]
    assert star(fig).get_label().startswith("best: iteration 5")


def test_without_validation_the_last_iteration_is_marked():
    hist = history(6, validation=False)
    assert marked_iteration(hist) == (6, "last")
    fig = convergence_figure(hist)
    s = star(fig)
    assert list(s.get_xdata()) == [6]
    assert list(s.get_ydata()) == [pytest.approx(hist[-1]["train_rmse"])]
    assert [line.get_label() for line in fig.axes[1].get_lines()][0] == "train"
    assert "validation" not in [line.get_label() for line in fig.axes[1].get_lines()]


def test_plot_history_is_a_png_with_or_without_model_json():
    hist = history(3)
    assert plot_history(hist)[:8] == PNG
    assert plot_history(hist, small_model(hist, meta={"best_iteration": 2}).manifest())[:8] == PNG
