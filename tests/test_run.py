"""`dmf run`: the whole job from the quickstart config, as the README's first command runs it."""

from __future__ import annotations

import json
from pathlib import Path

from dmf.cli import main
from dmf.store.layout import Store

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def run(tmp_path, *extra):
    args = [
        "run",
        str(QUICKSTART),
        "-q",
        "--set",
        f"synth.path={tmp_path / 'data'}",
        "--set",
        f"store.path={tmp_path / 'store'}",
        "--set",
        f"output.model={tmp_path / 'model'}",
        "--set",
        "synth.n_users=300",
        "--set",
        "synth.n_items=100",
        "--set",
        "synth.n_ratings=12000",
        "--set",
        "train.iterations=3",
        "--set",
        "cluster.dashboard_address=null",
        *extra,
    ]
    assert main(args) == 0


def test_run_synthesizes_ingests_trains_and_evaluates(tmp_path, capsys):
    run(tmp_path)
    out = capsys.readouterr().out
    assert "RMSE" in out and "NDCG@10" in out
    store = Store.open(tmp_path / "store")
    assert store.n_users == 300 and store.n_split("test") > 0
    model = tmp_path / "model"
    for name in ("model.json", "history.csv", "convergence.png", "evaluation.json"):
        assert (model / name).is_file(), name
    metrics = json.loads((model / "evaluation.json").read_text())
    assert 0.3 < metrics["rmse"] < 1.0  # noise sigma 0.5 in the quickstart's planted data

    # A second run reuses the store (same fingerprint), a changed synth section rebuilds it;
    # each trains afresh, replacing the finished model and its checkpoints.
    fp = store.fingerprint
    run(tmp_path)
    assert Store.open(tmp_path / "store").fingerprint == fp
    run(tmp_path, "--set", "synth.n_users=250")
    assert Store.open(tmp_path / "store").n_users == 250
