"""Nothing lost, nothing silently wrong: what dmf does with damaged, foreign or oversized input.

One small job (``dmf run`` on the quickstart config, then ``dmf recommend --out``) makes a synth
output, a store, a model with checkpoints and a recommendation output; the tests then damage
copies of them, or point dmf at things it did not write, and check that every read either
returns exactly what was written or stops with an error naming the file, and that nothing dmf
did not write is deleted.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_run import run

from dmf.cli import main
from dmf.config import load_config
from dmf.errors import ConfigError, DmfError, StoreError
from dmf.model.model import load
from dmf.store.layout import MANIFEST, Store, read_block_file
from dmf.store.storage import crc32

DMF = str(Path(sys.executable).with_name("dmf"))
QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def ingest_args(data: Path, store: Path, seed: int) -> list[str]:
    return [
        "ingest", str(QUICKSTART), "--no-cluster", "-q",
        "--set", f"synth.path={data}", "--set", f"store.path={store}",
        "--set", f"split.seed={seed}", "--set", "store.overwrite=true",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    """data/ (synth), store/, model/ (with checkpoints) and recs/ of one small run."""
    root = tmp_path_factory.mktemp("integrity")
    run(root)
    argv = ["recommend", str(root / "model"), "-n", "3", "--out", str(root / "recs")]
    assert main(argv) == 0
    return root


def copy_of(job: Path, tmp_path: Path, name: str) -> Path:
    out = tmp_path / name
    shutil.copytree(job / name, out)
    return out


def flip(path: Path, offset: int, xor: int = 0xFF) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= xor
    path.write_bytes(bytes(data))


def data_files(root: Path) -> list[Path]:
    """Every file of a directory that its manifest lists: not the manifests themselves (JSON:
    damage there is a parse error or a mismatch, tested elsewhere), nor a model's reports
    (history.csv, convergence.png, evaluation.json: views of model.json, never read back)."""
    skip = {"manifest.json", "model.json", "state.json", "_manifest.json", "synth.json"}
    reports = {"history.csv", "convergence.png", "evaluation.json"}
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.name not in skip and p.relative_to(root).parts[0] not in reports
    )


# ---------------------------------------------------------------------------------------------
# dmf clean and dmf verify know every kind of output dmf writes
# ---------------------------------------------------------------------------------------------
def test_clean_never_removes_committed_recommendations_or_synth_output(job, tmp_path, capsys):
    """``dmf clean`` once took the committed parts of a recommendation output and synth's
    ratings for leftovers (they have no store or model manifest) and deleted them."""
    for name in ("recs", "data"):
        d = copy_of(job, tmp_path, name)
        before = sorted(p.relative_to(d) for p in d.rglob("*"))
        assert main(["clean", str(d)]) == 0
        assert sorted(p.relative_to(d) for p in d.rglob("*")) == before
        assert main(["verify", str(d)]) == 0
    # A killed recommend leaves a part no manifest lists: that one goes.
    d = tmp_path / "recs"
    stray = d / "part-00099.0badf00d.parquet"
    stray.write_bytes(b"partial")
    assert main(["clean", str(d)]) == 0
    assert not stray.exists() and main(["verify", str(d)]) == 0


def test_clean_refuses_a_directory_that_holds_dmf_outputs_further_down(job, tmp_path, capsys):
    """``dmf clean`` of the directory above a store and a model would have counted every
    versioned file in them as a leftover: it names the output instead and deletes nothing."""
    for name in ("store", "model"):
        copy_of(job, tmp_path, name)
    n_files = sum(1 for p in tmp_path.rglob("*") if p.is_file())
    assert main(["clean", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "holds a" in err and str(tmp_path) in err
    assert sum(1 for p in tmp_path.rglob("*") if p.is_file()) == n_files


def test_clean_leaves_an_output_nested_inside_the_one_it_cleans(job, tmp_path, capsys):
    """Recommendations written into the model directory (``--out model/recs``): cleaning the
    model once took their committed parts for the model's leftovers."""
    model = copy_of(job, tmp_path, "model")
    shutil.copytree(job / "recs", model / "recs")
    stray = model / "user_factors" / "part-00009.0badf00d.parquet"  # a killed save's
    stray.write_bytes(b"partial")
    before = sorted(p for p in (model / "recs").rglob("*"))
    assert main(["clean", str(model)]) == 0
    assert not stray.exists()
    assert sorted(p for p in (model / "recs").rglob("*")) == before
    assert main(["verify", str(model / "recs")]) == 0


def test_verify_names_a_damaged_file_in_every_kind_of_output(job, tmp_path, capsys):
    for name in ("store", "model", "recs", "data"):
        d = copy_of(job, tmp_path, name)
        assert main(["verify", str(d)]) == 0, name
        victim = data_files(d)[0]
        flip(victim, victim.stat().st_size // 2)
        capsys.readouterr()
        assert main(["verify", str(d)]) == 2, name
        assert victim.name in capsys.readouterr().err, name


def test_verify_checks_the_factor_files_a_checkpoint_names(job, tmp_path, capsys):
    """``dmf verify MODEL`` once passed with a flipped byte in a side file a checkpoint names
    (``--resume`` would have read it)."""
    d = copy_of(job, tmp_path, "model")
    sides = sorted((d / "work").rglob("*.npy"))
    assert sides, "the run kept no checkpoint side files"
    flip(sides[-1], sides[-1].stat().st_size - 3)
    assert main(["verify", str(d)]) == 2
    assert sides[-1].name in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Random damage: an error naming the file, or exactly the data written
# ---------------------------------------------------------------------------------------------
def read_store(path: Path) -> dict[str, object]:
    """Everything training and evaluation read from a store, as plain values."""
    store = Store.open(path)
    out: dict[str, object] = {}
    for side in ("user", "item"):
        for ref in store.block_refs(side):
            blk = read_block_file(ref)
            out[f"{side}-{ref.block}"] = (blk.indptr.tolist(), blk.cols.tolist(), blk.vals.tolist())
        out[f"{side}-ids"] = store.ids(side).to_pylist()
    for split in ("validation", "test"):
        out[split] = store.read_split(split).to_pylist()
    return out


def read_model(path: Path) -> dict[str, object]:
    model = load(path, in_memory=True)
    return {
        "users": (
            model.users.ids.to_pylist(),
            model.user_factors.tolist(),
            model.user_bias.tolist(),
        ),
        "items": (
            model.items.ids.to_pylist(),
            model.item_factors.tolist(),
            model.item_bias.tolist(),
        ),
    }


@pytest.fixture(scope="module")
def pristine(job, tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    for name in ("store", "model"):
        shutil.copytree(job / name, root / name)
    return root, {"store": read_store(root / "store"), "model": read_model(root / "model")}


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    kind=st.sampled_from(["store", "model"]),
    pick=st.integers(0, 10**6),
    at=st.integers(0, 10**9),
    xor=st.integers(1, 255),
)
def test_a_flipped_byte_anywhere_is_an_error_naming_the_file_or_changes_nothing(
    pristine, kind, pick, at, xor
):
    root, expected = pristine
    files = data_files(root / kind)
    # A model's factor files (its checkpoints' side files are tested above).
    files = [f for f in files if kind != "model" or f.parts[-2].endswith("_factors")]
    victim = files[pick % len(files)]
    original = victim.read_bytes()
    try:
        flip(victim, at, xor)
        try:
            got = (read_store if kind == "store" else read_model)(root / kind)
        except DmfError as exc:
            assert victim.name in str(exc), str(exc)
        else:
            assert got == expected[kind]
    finally:
        victim.write_bytes(original)


# ---------------------------------------------------------------------------------------------
# Overwrite replaces only what dmf wrote
# ---------------------------------------------------------------------------------------------
def test_store_overwrite_never_writes_over_a_directory_that_is_not_a_store(job, tmp_path, capsys):
    target = tmp_path / "not-a-store"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    argv = ingest_args(job / "data", target, seed=42)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(target) in err and "notes.txt" in err and "no store" in err
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]


# ---------------------------------------------------------------------------------------------
# Clear errors instead of tracebacks
# ---------------------------------------------------------------------------------------------
def test_a_block_referring_past_the_other_side_is_an_error_naming_the_file(job, tmp_path):
    """A block whose checksum matches (rewritten by something else) but whose item column
    points past the store's items: an error naming the file, not a ValueError of the solver."""
    d = copy_of(job, tmp_path, "store")
    store = Store.open(d)
    ref = store.block_ref("user", 1)
    table = pq.read_table(ref.location.url)
    items = table.column("item").to_numpy().copy()
    items[5] = store.n_items + 7
    table = table.set_column(table.schema.get_field_index("item"), "item", pa.array(items))
    pq.write_table(table, ref.location.url)
    manifest = json.loads((d / MANIFEST).read_text())
    raw = Path(ref.location.url).read_bytes()
    rel = next(
        k
        for k, e in manifest["files"].items()
        if e.get("path", k) == str(Path(ref.location.url).relative_to(d))
    )
    manifest["files"][rel].update(bytes=len(raw), crc32=crc32(raw))
    (d / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(StoreError) as err:
        read_block_file(Store.open(d).block_ref("user", 1))
    assert Path(ref.location.url).name in str(err.value) and "row 5" in str(err.value)


def _limit_file_size(n_bytes: int):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails: EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, n_bytes))

    return preexec


def test_a_write_that_finds_no_room_is_an_error_naming_the_file(job, tmp_path):
    """A full disk, a quota or (here, the one a test can set up) a file size limit: dmf says
    which file it could not write, and the store directory keeps no half-written store."""
    store = tmp_path / "store"
    cmd = [DMF, *ingest_args(job / "data", store, seed=42)]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_limit_file_size(16 * 1024),
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "cannot write" in proc.stderr and str(store) in proc.stderr, proc.stderr[-3000:]
    assert "File too large" in proc.stderr
    assert not (store / MANIFEST).exists()


def test_a_worker_memory_limit_no_worker_can_start_in_is_a_config_error():
    with pytest.raises(ConfigError, match=r"cluster.memory_limit.*below 256 MiB"):
        load_config(raw={"cluster": {"memory_limit": "1 KB"}})
    with pytest.raises(ConfigError, match=r"cluster.memory_limit.*not a size"):
        load_config(raw={"cluster": {"memory_limit": "lots"}})
    assert load_config(raw={"cluster": {"memory_limit": "512MiB"}}).cluster.memory_limit == "512MiB"


# ---------------------------------------------------------------------------------------------
# Config limits
# ---------------------------------------------------------------------------------------------
def alias_bomb(levels: int) -> str:
    lines = [
        "cluster:",
        "  kind: jobqueue",
        "  jobqueue:",
        "    options:",
        '      a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]',
    ]
    for k in range(1, levels + 1):
        refs = ", ".join([f"*a{k - 1}"] * 10)
        lines.append(f"      a{k}: &a{k} [{refs}]")
    return "\n".join(lines) + "\n"


def test_a_yaml_alias_bomb_is_a_config_error(tmp_path):
    """Six levels of ten aliases: a 600-byte file that expands to 10^7 values."""
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb(6))
    assert path.stat().st_size < 1000
    with pytest.raises(ConfigError, match=r"bomb.yaml expands to more than 100,000 values"):
        load_config(path)
    path.write_text(alias_bomb(2))  # 1,110 values: a config may use aliases
    assert len(load_config(path).cluster.jobqueue.options["a2"]) == 10
    with pytest.raises(ConfigError, match=r"--set value"):
        load_config(
            overrides=[
                "cluster.jobqueue.options="
                + "{a: &a [1,1,1,1,1,1,1,1,1,1], "
                + ", ".join(
                    f"b{k}: &b{k} [" + ", ".join([f"*{'a' if k == 0 else f'b{k - 1}'}"] * 10) + "]"
                    for k in range(6)
                )
                + "}"
            ]
        )


def test_a_config_file_over_a_mebibyte_is_refused(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text("# " + "x" * (1 << 20) + "\nmodel: {rank: 4}\n")
    with pytest.raises(ConfigError, match=r"huge.yaml has 1,048,\d{3} bytes"):
        load_config(path)


# ---------------------------------------------------------------------------------------------
# Crash injection: a kill at every step of a commit leaves a complete old or new version
# ---------------------------------------------------------------------------------------------
# Runs a dmf command in this interpreter, counting its storage steps (each file written through
# the storage module, each rename before and after, each delete) and SIGKILLing itself at step
# KILL_AT (0: never; the count is printed at exit). Ingest runs its passes on threads and
# training on a threads-only LocalCluster, so that every step happens in this one process.
KILL_HARNESS = """\
import atexit, contextlib, os, signal, sys, threading

kill_at = int(sys.argv[1])
count = 0
lock = threading.Lock()


def step():
    global count
    with lock:
        count += 1
        if count == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


import dmf.store.storage as storage

real_open, real_replace, real_remove = storage.Target.open, os.replace, storage.Location.remove


@contextlib.contextmanager
def target_open(self, rel):
    with real_open(self, rel) as w:
        yield w
    step()


def replace(src, dst, **kw):
    step()
    real_replace(src, dst, **kw)
    step()


def remove(self):
    step()
    real_remove(self)


storage.Target.open, os.replace, storage.Location.remove = target_open, replace, remove
atexit.register(lambda: print(f"DMF_STEPS={count}", file=sys.stderr))
from dmf.cli import main

sys.exit(main(sys.argv[2:]))
"""


def killed_at(tmp_path: Path, n: int, *argv: str) -> tuple[int, int]:
    """Run ``dmf *argv`` killed at storage step ``n``: (return code, steps taken)."""
    script = tmp_path / "harness.py"
    script.write_text(KILL_HARNESS)
    proc = subprocess.run(
        [sys.executable, str(script), str(n), *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    steps = [int(x.split("=")[1]) for x in proc.stderr.split() if x.startswith("DMF_STEPS=")]
    if n == 0:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.returncode, (steps[0] if steps else -1)


def steps_to_kill(total: int) -> list[int]:
    """Every step under ``-m slow``; by default the first, the last four (the manifest and the
    deletes of the old version) and a few between."""
    if os.environ.get("DMF_EVERY_STEP"):
        return list(range(1, total + 1))
    between = np.linspace(2, total - 4, 4).astype(int).tolist() if total > 8 else []
    return sorted({1, *between, *range(max(1, total - 3), total + 1)})


def test_ingest_killed_at_any_step_leaves_the_old_store_or_the_new_one(job, tmp_path, capsys):
    """Re-ingest over a store, killed at each storage step: the store then opens as the old
    one or the new one (never a mix, never nothing), `dmf info` says which files are
    leftovers, and `dmf clean` removes them and nothing else."""
    old = tmp_path / "old"
    assert main(ingest_args(job / "data", old, seed=1)) == 0
    old_fp = Store.open(old).fingerprint
    scratch = tmp_path / "count"
    shutil.copytree(old, scratch)
    _, total = killed_at(tmp_path, 0, *ingest_args(job / "data", scratch, seed=2))
    new_fp = Store.open(scratch).fingerprint
    assert new_fp != old_fp and total > 10
    for n in steps_to_kill(total):
        store = tmp_path / f"store-{n}"
        shutil.copytree(old, store)
        code, _ = killed_at(tmp_path, n, *ingest_args(job / "data", store, seed=2))
        assert code == -signal.SIGKILL, f"step {n} of {total}"
        fp = Store.open(store).fingerprint
        assert fp in (old_fp, new_fp), f"step {n}: a store that is neither"
        assert main(["info", str(store)]) == 0
        assert main(["clean", str(store)]) == 0
        assert Store.open(store).leftovers() == [], f"step {n}"
        assert main(["verify", str(store)]) == 0
        assert Store.open(store).fingerprint == fp
        shutil.rmtree(store)


def train_args(store: Path, model: Path, *extra: str) -> list[str]:
    return [
        "train", str(QUICKSTART), "-q", *extra,
        "--set", f"store.path={store}", "--set", f"output.model={model}",
        "--set", "train.iterations=3", "--set", "cluster.processes=false",
        "--set", "cluster.dashboard_address=null", "--set", "output.plot=false",
    ]  # fmt: skip


def test_training_killed_at_any_step_resumes_to_the_same_model(job, tmp_path):
    """``dmf train`` killed at each storage step (side files, checkpoints, the model's export
    and manifest, the deletes after), then ``dmf train --resume``: the model equals, bit for
    bit, the one an uninterrupted run writes."""
    store = job / "store"
    _, total = killed_at(tmp_path, 0, *train_args(store, tmp_path / "reference"))
    reference = load(tmp_path / "reference", in_memory=True)
    assert total > 10
    for n in steps_to_kill(total):
        model = tmp_path / f"model-{n}"
        code, _ = killed_at(tmp_path, n, *train_args(store, model))
        assert code == -signal.SIGKILL, f"step {n} of {total}"
        assert main(train_args(store, model, "--resume")) == 0, f"step {n}"
        resumed = load(model, in_memory=True)
        for k in ("user_factors", "user_bias", "item_factors", "item_bias"):
            np.testing.assert_array_equal(
                getattr(resumed, k), getattr(reference, k), err_msg=f"{k}, step {n} of {total}"
            )
        shutil.rmtree(model)


# ---------------------------------------------------------------------------------------------
# Smaller promises
# ---------------------------------------------------------------------------------------------
def test_checkpoints_past_iteration_99999_are_ordered_by_number(tmp_path):
    """Names sort as text from iter-100000 on (``iter-100000`` < ``iter-99999``): pruning by
    name once deleted every new checkpoint as soon as it was written."""
    from dmf.store.storage import Location
    from dmf.train.checkpoint import list_checkpoints, write_checkpoint

    d = Location.of(tmp_path / "checkpoints")
    for it in (99_998, 99_999, 100_000, 100_001):
        write_checkpoint(d, it, {"x": np.arange(3) + it}, {"note": it}, keep=2)
    assert [c.name for c in list_checkpoints(d)] == ["iter-100000", "iter-100001"]


def test_recommend_never_writes_over_a_directory_it_did_not_write(job, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["recommend", str(job / "model"), "-n", "3", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "notes.txt" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    # Its own output it replaces.
    assert main(["recommend", str(job / "model"), "-n", "2", "--out", str(tmp_path / "r")]) == 0
    assert main(["recommend", str(job / "model"), "-n", "3", "--out", str(tmp_path / "r")]) == 0
    assert main(["verify", str(tmp_path / "r")]) == 0
