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
    assert cfg.synth.n_ratings == 200_000 and cfg.synth.tail_rank > 0  # data that overfits
    assert (cfg.split.method, cfg.split.test, cfg.split.validation) == ("random", 0.1, 0.05)
    # The quickstart shows what a user who changes nothing gets: the defaults of the model,
    # the training (but progress, spelled out) and the blocks.
    from dmf.config import BlocksConfig, ModelConfig, TrainConfig

    assert cfg.model == ModelConfig() and cfg.blocks == BlocksConfig()
    assert cfg.train == TrainConfig(progress=cfg.train.progress)
    assert cfg.store.overwrite
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


# ---------------------------------------------------------------------------------------------
# Every field documented; `dmf config show` and `dmf config schema`
# ---------------------------------------------------------------------------------------------
def config_fields(cls=None, prefix=""):
    """(dotted key, field) of every field of every section, recursively, through the sections
    a field's type holds (``EarlyStopping | None``, the TLS files of ``cluster.security``)."""
    import typing

    from pydantic import BaseModel

    from dmf.config import Config

    def sections(t):
        if isinstance(t, type) and issubclass(t, BaseModel):
            return [t]
        return [s for a in typing.get_args(t) for s in sections(a)]

    for name, field in (cls or Config).model_fields.items():
        if field.exclude:
            continue
        yield prefix + name, field
        for s in sections(field.annotation):
            yield from config_fields(s, f"{prefix}{name}.")


def test_every_config_field_has_a_description():
    keys = dict(config_fields())
    # The walk reaches the nested sections, not just the top.
    assert {"model.rank", "data.columns.user", "train.early_stopping.patience"} <= set(keys)
    assert {"cluster.security.ca_file", "cluster.kubernetes.image"} <= set(keys)
    missing = [k for k, f in keys.items() if not (f.description or "").strip()]
    assert not missing, f"config fields without a docstring: {', '.join(missing)}"


def run_cli(capsys, *argv):
    from dmf.cli import main

    rc = main(list(argv))
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


@pytest.mark.parametrize("path", FILES, ids=[f.name for f in FILES])
def test_config_show_round_trips(path, tmp_path, capsys):
    # A copy of the example, so that its relative paths resolve from tmp_path: the output,
    # saved next to it, is read by load_config (what `dmf run` does) into an equal config.
    src = tmp_path / path.name
    src.write_text(path.read_text())
    sets = ["model.rank=3", "train.progress=off", f"store.path={tmp_path / 'elsewhere'}"]
    out = run_cli(capsys, "config", "show", str(src), *(a for s in sets for a in ("--set", s)))
    shown = tmp_path / "shown.yaml"
    shown.write_text(out)
    cfg = load_config(src, sets)
    again = load_config(shown)
    assert again == cfg
    assert again.model.rank == 3 and again.train.progress == "off"
    # Every key is written out, defaults included.
    doc = yaml.safe_load(out)
    for key, _ in config_fields():
        node = doc
        for part in key.split("."):
            if node is None or (key.startswith("cluster.security.") and isinstance(node, str)):
                break  # an optional section that is off, or security given as a word
            assert part in node, f"{key} missing from dmf config show"
            node = node[part]


def test_config_show_absolute_paths_work_from_anywhere(tmp_path, capsys):
    src = tmp_path / "configs" / "c.yaml"
    src.parent.mkdir()
    src.write_text(
        "store: {path: ../runs/store}\noutput: {model: s3://bucket/model}\n"
        "data: {source: [a.csv, /abs/b.csv]}\n"
    )
    out = run_cli(capsys, "config", "show", str(src), "--absolute-paths")
    elsewhere = tmp_path / "other" / "shown.yaml"
    elsewhere.parent.mkdir()
    elsewhere.write_text(out)
    cfg, again = load_config(src), load_config(elsewhere)
    assert again.store.path == str(tmp_path / "runs" / "store")
    assert again.output.model == "s3://bucket/model"  # a URL stays as it is
    assert again.data.source == [str(src.parent / "a.csv"), "/abs/b.csv"]
    assert again.synth.path == cfg.resolve(cfg.synth.path)  # a default path too
    # The same config, wherever its paths are resolved from.
    assert resolved(again) == resolved(cfg)


def resolved(cfg):
    """``cfg.to_dict()`` with each path of PATH_KEYS made absolute (URLs as they are)."""
    from dmf.config import PATH_KEYS

    doc = cfg.to_dict()
    for key in PATH_KEYS:
        *parents, last = key.split(".")
        node = doc
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(last), str):
            node[last] = cfg.resolve(node[last])
        elif isinstance(node, dict) and isinstance(node.get(last), list):
            node[last] = [cfg.resolve(v) for v in node[last]]
    return doc


def test_config_show_refuses_a_bad_config_naming_the_key(tmp_path, capsys):
    from dmf.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  rank: -1\n")
    assert main(["config", "show", str(bad)]) == 2
    assert "model.rank" in capsys.readouterr().err
    assert main(["config", "show", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_config_schema_lists_every_key(capsys):
    import json

    from dmf.config import Config, ModelConfig, TrainConfig

    rows = json.loads(run_cli(capsys, "config", "schema", "--json"))
    by_key = {r["key"]: r for r in rows}
    assert list(by_key) == [k for k, _ in config_fields()]
    assert all(r["doc"] and r["type"] for r in rows)
    assert by_key["model.rank"]["type"] == "int (>= 0)"
    assert by_key["model.rank"]["default"] == ModelConfig().rank
    assert by_key["train.progress"]["type"] == "auto | on | off"
    assert by_key["split.validation"]["type"] == "float (>= 0, < 1)"
    assert by_key["cluster.security.ca_file"]["default"] == "required"
    es = TrainConfig().early_stopping
    assert by_key["train.early_stopping"]["default"] == (es.model_dump() if es else None)
    assert by_key["model"]["default"] == Config().to_dict()["model"]
    text = run_cli(capsys, "config", "schema")
    for key, field in config_fields():
        assert f"\n{key}: " in "\n" + text, key
        # The description's first line is printed under the key, indented.
        assert "    " + field.description.strip().splitlines()[0] in text, key


# ---------------------------------------------------------------------------------------------
# on/off, yes/no: the words YAML 1.1 reads as booleans
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("word", "progress", "flag"),
    [("on", "on", True), ("off", "off", False), ("yes", "on", True), ("no", "off", False)],
)
def test_on_off_words_in_a_file_and_in_set(tmp_path, word, progress, flag):
    # PyYAML reads `on`, `off`, `yes`, `no` as booleans: the word fields get their word back,
    # the boolean fields take them as they are.
    p = tmp_path / "c.yaml"
    p.write_text(
        f"train:\n  progress: {word}\noutput:\n  plot: {word}\nstore:\n  overwrite: {word}\n"
    )
    assert yaml.safe_load(p.read_text())["train"]["progress"] is flag  # what YAML made of it
    cfg = load_config(p)
    assert (cfg.train.progress, cfg.output.plot, cfg.store.overwrite) == (progress, flag, flag)
    cfg = load_config(None, [f"train.progress={word}", f"output.plot={word}"])
    assert (cfg.train.progress, cfg.output.plot) == (progress, flag)
    # Quoted in YAML, the words are strings: the same values.
    p.write_text(f"train:\n  progress: '{progress}'\noutput:\n  plot: '{word}'\n")
    cfg = load_config(p)
    assert (cfg.train.progress, cfg.output.plot) == (progress, flag)


def test_progress_still_refuses_other_values_naming_the_key(tmp_path):
    from dmf.config import Config
    from dmf.errors import ConfigError

    for value in ("2", "maybe", "[on]"):
        with pytest.raises(ConfigError, match=r"train\.progress: Input should be 'auto', 'on' or"):
            load_config(None, [f"train.progress={value}"])
    cfg = Config()
    cfg.train.progress = False  # assignment is validated too
    assert cfg.train.progress == "off"
