"""dmf.data.synth: planted truth, exact distinct counts, skew, determinism, formats, atomic output."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from dmf.cli import main
from dmf.config import SynthConfig
from dmf.data.synth import OutputExistsError, load_truth, synth, synth_files
from dmf.errors import ConfigError


def _cfg(**kw) -> SynthConfig:
    base = dict(n_users=300, n_items=120, n_ratings=6000, rank=3, noise=0.3, seed=7)
    base.update(kw)
    return SynthConfig(**base)


def _ratings_files(out) -> dict[str, Path]:
    """The rating files of a synth output by logical name, in order, as synth.json lists them;
    and checks that the ratings directory holds exactly those files, under versioned names."""
    files = {
        rel: Path(loc)
        for rel, loc in sorted(synth_files(out).items())
        if rel.startswith("ratings/")
    }
    token = json.loads((out / "synth.json").read_text())["version"]
    for rel, f in files.items():
        stem, ext = rel.rsplit(".", 1)
        assert f == out / f"{stem}.{token}.{ext}"
    assert sorted((out / "ratings").iterdir()) == sorted(files.values())
    return files


def _read(out, fmt="parquet"):
    files = list(_ratings_files(out).values())
    if fmt == "parquet":
        tables = [pq.read_table(f) for f in files]
    else:
        tables = [pacsv.read_csv(f) for f in files]
    cols = {
        k: np.concatenate([t.column(k).to_numpy() for t in tables]) for k in tables[0].schema.names
    }
    return cols, files


def test_counts_exact_pairs_distinct_and_truth_planted(tmp_path):
    cfg = _cfg(noise=0.2)
    summary = synth(cfg, tmp_path / "s", progress=False)
    r, files = _read(tmp_path / "s")
    u, i = r["user"], r["item"]
    assert len(u) == cfg.n_ratings == summary["n_ratings"]
    assert len(np.unique(u * cfg.n_items + i)) == cfg.n_ratings
    assert u.min() >= 0 and u.max() < cfg.n_users and i.min() >= 0 and i.max() < cfg.n_items
    assert r["rating"].dtype == np.float32 and r["timestamp"].dtype == np.int64
    # Sorted by (user, item) within the output.
    key = u * cfg.n_items + i
    assert (np.diff(key) > 0).all()

    t = load_truth(tmp_path / "s")
    assert t["U"].shape == (cfg.n_users, 3) and t["V"].shape == (cfg.n_items, 3)
    assert t["b"].shape == (cfg.n_users,) and t["c"].shape == (cfg.n_items,)
    assert float(t["mu"]) == cfg.mu and float(t["noise"]) == cfg.noise
    pred = t["mu"] + t["b"][u] + t["c"][i] + np.einsum("ij,ij->i", t["U"][u], t["V"][i])
    resid = r["rating"] - pred
    # The residual is the planted noise: mean ~0, sd ~ sigma, and it matches the summary.
    assert abs(resid.mean()) < 0.02
    assert resid.std() == pytest.approx(cfg.noise, rel=0.05)
    assert np.sqrt(np.mean(resid**2)) == pytest.approx(summary["noise_rmse"], rel=1e-4)
    # The signal is there: the truth explains most of the variance.
    assert np.var(resid) < 0.5 * np.var(r["rating"])
    written = json.loads((tmp_path / "s" / "synth.json").read_text())
    assert written["n_ratings"] == cfg.n_ratings and written["config"]["seed"] == 7
    assert written["ratings_files"] == ["ratings/part-00000.parquet"]
    # The manifest lists every file, with its size and checksum; nothing else is in the output.
    assert sorted(written["files"]) == ["ratings/part-00000.parquet", "truth.npz"]
    for entry in written["files"].values():
        assert (tmp_path / "s" / entry["path"]).stat().st_size == entry["bytes"]
    listed = {e["path"] for e in written["files"].values()} | {"synth.json"}
    on_disk = {str(p.relative_to(tmp_path / "s")) for p in (tmp_path / "s").rglob("*")}
    assert on_disk - {"ratings"} == listed


def test_skew_makes_heavy_users_and_popular_items(tmp_path):
    cfg = _cfg(n_users=2000, n_items=400, n_ratings=40_000, user_skew=1.0, item_skew=1.0)
    synth(cfg, tmp_path / "skew", progress=False)
    r, _ = _read(tmp_path / "skew")
    per_user = np.bincount(r["user"], minlength=cfg.n_users)
    per_item = np.bincount(r["item"], minlength=cfg.n_items)
    assert per_user.max() > 20 * np.median(per_user)
    assert per_item.max() > 10 * np.median(per_item)
    assert per_user.max() <= cfg.n_items  # a user rates an item at most once

    flat = _cfg(n_users=2000, n_items=400, n_ratings=40_000, user_skew=0.0, item_skew=0.0)
    synth(flat, tmp_path / "flat", progress=False)
    r, _ = _read(tmp_path / "flat")
    per_user = np.bincount(r["user"], minlength=cfg.n_users)
    per_item = np.bincount(r["item"], minlength=cfg.n_items)
    assert per_user.max() < 3 * np.median(per_user)
    assert per_item.max() < 1.5 * np.median(per_item)


def test_dense_users_and_full_matrix(tmp_path):
    # Heavy skew over few items: many users rate more than a quarter of all items (Gumbel path),
    # some rate all of them.
    cfg = _cfg(n_users=50, n_items=40, n_ratings=1500, user_skew=1.5, item_skew=1.2)
    synth(cfg, tmp_path / "dense", progress=False)
    r, _ = _read(tmp_path / "dense")
    per_user = np.bincount(r["user"], minlength=50)
    assert per_user.max() == 40 and per_user.sum() == 1500
    assert len(np.unique(r["user"] * 40 + r["item"])) == 1500
    # Every pair: the whole matrix.
    synth(_cfg(n_users=20, n_items=15, n_ratings=300), tmp_path / "full", progress=False)
    r, _ = _read(tmp_path / "full")
    assert len(np.unique(r["user"] * 15 + r["item"])) == 300


def test_too_many_ratings_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"synth\.n_ratings.*1200 distinct pairs"):
        synth(_cfg(n_users=30, n_items=40, n_ratings=1201), tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


def test_same_output_whatever_the_chunk_size_and_threads(tmp_path):
    cfg = _cfg(user_skew=1.2, item_skew=1.1, files=3)
    synth(cfg, tmp_path / "a", progress=False, chunk_ratings=1_000_000)
    synth(cfg, tmp_path / "b", progress=False, chunk_ratings=97, threads=3)
    synth(cfg, tmp_path / "c", progress=False, chunk_ratings=1, threads=1)
    ra, fa = _read(tmp_path / "a")
    for other in ("b", "c"):
        rb, fb = _read(tmp_path / other)
        # The same files (each version's names carry its own token).
        assert list(_ratings_files(tmp_path / "a")) == list(_ratings_files(tmp_path / other))
        for k in ra:
            np.testing.assert_array_equal(ra[k], rb[k])
        # File by file too, not only the concatenation.
        for x, y in zip(fa, fb, strict=True):
            assert pq.read_table(x).equals(pq.read_table(y))
    ta, tb = load_truth(tmp_path / "a"), load_truth(tmp_path / "b")
    np.testing.assert_array_equal(ta["U"], tb["U"])
    # Another seed gives other data.
    synth(_cfg(user_skew=1.2, item_skew=1.1, files=3, seed=8), tmp_path / "d", progress=False)
    rd, _ = _read(tmp_path / "d")
    assert not np.array_equal(ra["item"], rd["item"])


def test_round_and_clip_to_a_star_scale(tmp_path):
    cfg = _cfg(noise=1.0, round_to=0.5, clip=(1.0, 5.0))
    summary = synth(cfg, tmp_path / "s", progress=False)
    r, _ = _read(tmp_path / "s")
    x = r["rating"]
    assert x.min() == 1.0 and x.max() == 5.0  # noise 1.0 reaches both ends
    np.testing.assert_array_equal(x * 2, np.round(x * 2))
    assert set(np.unique(x)) <= {1.0 + 0.5 * k for k in range(9)}
    assert summary["rating_min"] == 1.0 and summary["rating_max"] == 5.0

    # Clip ends that are not multiples of round_to stay inside the range.
    synth(_cfg(noise=1.0, round_to=1.0, clip=(0.5, 4.5)), tmp_path / "t", progress=False)
    x = _read(tmp_path / "t")[0]["rating"]
    assert x.min() >= 0.5 and x.max() <= 4.5


def test_files_and_csv_format(tmp_path):
    cfg = _cfg(files=4, format="csv")
    synth(cfg, tmp_path / "csv", progress=False)
    by_name = _ratings_files(tmp_path / "csv")
    assert list(by_name) == [f"ratings/part-{k:05d}.csv" for k in range(4)]
    files = list(by_name.values())
    assert all(re.fullmatch(r"part-\d{5}\.\w+\.csv", f.name) for f in files)
    assert files[0].read_text().splitlines()[0] == '"user","item","rating","timestamp"'
    r, _ = _read(tmp_path / "csv", "csv")
    assert len(r["user"]) == cfg.n_ratings
    # Files hold contiguous user ranges with about equal counts.
    sizes = [pacsv.read_csv(f).num_rows for f in files]
    assert min(sizes) > 0.6 * cfg.n_ratings / 4
    pq_r, _ = (synth(_cfg(files=4), tmp_path / "pq", progress=False), None)
    rp, _ = _read(tmp_path / "pq")
    np.testing.assert_array_equal(rp["user"], r["user"])
    np.testing.assert_allclose(rp["rating"], r["rating"], rtol=1e-6)
    assert pq_r["ratings_files"][3] == "ratings/part-00003.parquet"


def test_more_files_than_users_with_ratings(tmp_path):
    synth(_cfg(n_users=2, n_items=5, n_ratings=3, files=4), tmp_path / "s", progress=False)
    files = list(_ratings_files(tmp_path / "s").values())
    assert len(files) == 4
    assert sum(pq.read_table(f).num_rows for f in files) == 3


def test_refuses_non_empty_output_unless_overwrite(tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    synth(_cfg(), out, progress=False)  # an empty directory is fine
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="not empty.*overwrite"):
        synth(_cfg(seed=1), out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    first = {str(p) for p in synth_files(out).values()}
    synth(_cfg(seed=1), out, overwrite=True, progress=False)
    # Overwrite replaces the previous synth output's files, and nothing else.
    assert (out / "keep.txt").read_text() == "mine"
    doc = json.loads((out / "synth.json").read_text())
    assert doc["config"]["seed"] == 1
    now = {str(p) for p in synth_files(out).values()}
    assert not first & now and not any(Path(p).exists() for p in first)
    assert {str(p) for p in out.rglob("*") if p.is_file()} == now | {
        str(out / "synth.json"),
        str(out / "keep.txt"),
    }
    # No temporary directories left next to it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_failure_leaves_no_output(tmp_path, monkeypatch):
    import dmf.data.synth as S

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(S.np, "savez", boom)  # fails after all ratings are written
    with pytest.raises(RuntimeError, match="disk full"):
        synth(_cfg(), tmp_path / "s", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_flags(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(
        ["synth", "--out", str(out), "--users", "100", "--items", "50", "--ratings", "1000",
         "--rank", "2", "--noise", "0.1", "--user-skew", "0.5", "--item-skew", "0.5",
         "--round-to", "0.5", "--clip", "1", "5", "--seed", "3", "--files", "2",
         "--format", "csv", "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    assert "1,000 ratings" in capsys.readouterr().out
    s = json.loads((out / "synth.json").read_text())
    assert s["config"]["clip"] == [1.0, 5.0] and s["config"]["format"] == "csv"
    assert len(list((out / "ratings").glob("*.csv"))) == 2
    # Non-empty output: an error naming the directory, exit status 2; --overwrite replaces it.
    assert (
        main(["synth", "--out", str(out), "--users", "10", "--items", "10", "--ratings", "20"]) == 2
    )
    assert str(out) in capsys.readouterr().err
    rc = main(["synth", "--out", str(out), "--users", "10", "--items", "10", "--ratings", "20",
               "--overwrite", "--no-progress"])  # fmt: skip
    assert rc == 0
    # A bad value is a config error naming the key.
    assert main(["synth", "--out", str(tmp_path / "bad"), "--noise", "-1"]) == 2
    assert "synth.noise" in capsys.readouterr().err


def test_cli_config_file(tmp_path, capsys):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        "synth:\n  enabled: true\n  path: data/synth\n  n_users: 40\n  n_items: 30\n"
        "  n_ratings: 500\n  rank: 2\n  seed: 5\n"
    )
    assert main(["synth", str(cfg), "--set", "synth.n_ratings=400", "--no-progress"]) == 0
    s = json.loads((tmp_path / "data" / "synth" / "synth.json").read_text())
    assert s["n_ratings"] == 400 and s["n_users"] == 40 and s["config"]["seed"] == 5
    # Flags override the file.
    out = tmp_path / "other"
    assert main(["synth", str(cfg), "--out", str(out), "--ratings", "100", "--no-progress"]) == 0
    assert json.loads((out / "synth.json").read_text())["n_ratings"] == 100


def test_successive_and_gumbel_sampling_agree_in_distribution():
    """The fast path (first distinct draws) and the dense path (Gumbel top-k) both sample items
    without replacement in proportion to popularity: inclusion frequencies must agree."""
    import dmf.data.synth as S

    plan = S._Plan(_cfg(n_users=20_000, n_items=30, n_ratings=60_000, item_skew=1.0))
    users = np.arange(20_000, dtype=np.int64)
    ks = np.full(20_000, 4, dtype=np.int64)
    u_parts, i_parts, rest = S._sample_sparse(plan, users, ks)
    assert len(rest) == 0
    fast = np.bincount(np.concatenate(i_parts), minlength=30) / 20_000
    _, gi = S._sample_gumbel(plan, users, ks)
    slow = np.bincount(gi, minlength=30) / 20_000
    assert fast.sum() == pytest.approx(4) and slow.sum() == pytest.approx(4)
    assert fast.max() > 3 * np.median(fast)  # popularity is skewed ...
    np.testing.assert_allclose(fast, slow, atol=0.02)  # ... the same way (sd of a diff ~0.005)


@pytest.mark.parametrize("rank", [1, 4, 16])
def test_truth_scales_do_not_depend_on_rank(tmp_path, rank):
    cfg = _cfg(
        n_users=3000, n_items=3000, n_ratings=10, rank=rank, factor_scale=0.6, bias_scale=0.2
    )
    synth(cfg, tmp_path / "s", progress=False)
    t = load_truth(tmp_path / "s")
    assert t["U"].dtype == np.float32
    interaction = np.einsum("ij,ij->i", t["U"], t["V"])  # independent (u_k, v_k) pairs
    assert interaction.std() == pytest.approx(0.6, rel=0.1)
    assert t["b"].std() == pytest.approx(0.2, rel=0.1)
    assert t["c"].std() == pytest.approx(0.2, rel=0.1)


def test_extreme_skew_still_gives_exact_counts(tmp_path):
    # Skew 100: almost every user's weight underflows to 0, and the few heavy users are capped
    # at n_items, so most ratings must be handed to users of weight 0.
    cfg = _cfg(n_users=3000, n_items=3, n_ratings=6000, user_skew=100.0, item_skew=3.0)
    summary = synth(cfg, tmp_path / "s", progress=False)
    r, _ = _read(tmp_path / "s")
    assert len(r["user"]) == 6000 == summary["n_ratings"]
    assert len(np.unique(r["user"] * 3 + r["item"])) == 6000
    assert np.bincount(r["user"]).max() == 3


def test_output_of_an_older_dmf_is_read_then_replaced(tmp_path):
    """Before synth versioned its files, synth.json listed them by name: such an output is
    read by listing it, and an overwrite deletes exactly the files it listed."""
    from dmf.config import load_config
    from dmf.data.readers import resolve_inputs

    out = tmp_path / "s"
    synth(_cfg(files=2), out, progress=False)
    # Rewrite it as an older dmf left it: fixed names, and "files" a list of them.
    doc = json.loads((out / "synth.json").read_text())
    for rel, entry in doc.pop("files").items():
        (out / entry["path"]).rename(out / rel)
    doc["files"] = doc.pop("ratings_files")
    del doc["version"]
    (out / "synth.json").write_text(json.dumps(doc))
    (out / "notes.txt").write_text("mine")
    cfg = load_config(raw={"data": {"source": str(out / "ratings")}})
    spec = resolve_inputs(cfg.data, cfg.resolve)
    assert [f.path.name for f in spec.files] == ["part-00000.parquet", "part-00001.parquet"]

    synth(_cfg(files=2, seed=8), out, overwrite=True, progress=False)
    now = {p for p in synth_files(out).values()}
    assert {p for p in out.rglob("*") if p.is_file()} == {Path(p) for p in now} | {
        out / "synth.json",
        out / "notes.txt",
    }
    assert load_truth(out)["U"].shape == (300, 3)
