"""Every example config in configs/ validates, and the quickstart's pieces fit together."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dmf.config import is_url, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
FILES = sorted(CONFIGS.glob("*.yaml"))


def test_the_examples_are_there():
    names = {f.name for f in FILES}
    assert {
        "quickstart.yaml",
        "movielens-1m.yaml",
        "movielens-25m.yaml",
        "cluster-scheduler-file.yaml",
    } <= names


@pytest.mark.parametrize("path", FILES, ids=[f.name for f in FILES])
def test_config_validates(path):
    cfg = load_config(path)
    # Every key in the file is a real key (load_config refuses unknown ones) and was read as
    # written: the validated config holds the file's values.
    raw = yaml.safe_load(path.read_text())
    dumped = cfg.to_dict()
    for section, values in raw.items():
        for key, value in values.items():
            got = dumped[section][key]
            if isinstance(value, dict):
                for k, v in value.items():
                    assert got[k] == v, f"{path.name}: {section}.{key}.{k}"
            elif isinstance(value, list):
                assert list(got) == value, f"{path.name}: {section}.{key}"
            else:
                assert got == value, f"{path.name}: {section}.{key}"
    # Local outputs land under runs/ at the top of the repository, not under configs/; an
    # example for a cluster that shares no disk (Kubernetes) puts them in object storage.
    for p in (cfg.store.path, cfg.output.model):
        if is_url(p):
            assert p.startswith("s3://"), p
            continue
        assert Path(cfg.resolve(p)).resolve().is_relative_to(CONFIGS.parent / "runs"), p


def test_quickstart_ingests_what_it_synthesizes():
    from dmf.data.synth import _validate

    cfg = load_config(CONFIGS / "quickstart.yaml")
    assert cfg.synth.enabled
    _validate(cfg.synth)  # the asked-for ratings fit in users x items
    # No data.source: ingest reads the synth output wherever synth.path points (test_run.py
    # checks that end to end).
    assert cfg.data.source is None
    assert cfg.data.format == cfg.synth.format == "parquet"
    assert (cfg.synth.n_users, cfg.synth.n_items, cfg.synth.n_ratings) == (2000, 500, 200_000)
    assert (cfg.split.method, cfg.split.test, cfg.split.validation) == ("random", 0.1, 0.05)
    assert (cfg.model.rank, cfg.model.reg, cfg.train.iterations) == (8, 0.05, 8)
    assert cfg.train.checkpoint_every >= 1 and cfg.store.overwrite
    assert (cfg.cluster.kind, cfg.cluster.n_workers, cfg.cluster.threads_per_worker) == (
        "local",
        2,
        1,
    )


def test_movielens_configs_point_where_the_download_unpacks():
    from dmf.data.movielens import RELEASES

    for name, variant in (("movielens-1m.yaml", "1m"), ("movielens-25m.yaml", "25m")):
        cfg = load_config(CONFIGS / name)
        assert cfg.data.preset == f"movielens-{variant}"
        # `dmf data movielens VARIANT` unpacks into data/<folder> at the top of the repository.
        expected = CONFIGS.parent / "data" / RELEASES[variant].folder
        assert Path(cfg.resolve(cfg.data.source)).resolve() == expected


def test_scheduler_file_config():
    cfg = load_config(CONFIGS / "cluster-scheduler-file.yaml")
    assert cfg.cluster.kind == "scheduler_file" and cfg.cluster.scheduler_file


def test_paths_from_set_are_relative_to_the_current_directory(tmp_path, monkeypatch):
    # In the file: relative to the file. On the command line: relative to where the user is.
    from dmf.config import load_config

    cfg_dir = tmp_path / "configs"
    cfg_dir.mkdir()
    (cfg_dir / "c.yaml").write_text("store:\n  path: ../runs/store\n")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    cfg = load_config(cfg_dir / "c.yaml", ["output.model=runs/m", "model.rank=4"])
    assert Path(cfg.resolve(cfg.store.path)) == tmp_path / "runs" / "store"
    assert Path(cfg.resolve(cfg.output.model)) == work / "runs" / "m"
    assert cfg.model.rank == 4
