"""Shared helpers of the benchmark scripts: machine and versions, the GEMM rate, ALS flop counts,
a peak-RSS sampler, planted data, and markdown output.

Every benchmark measures its arithmetic floor in the same run as its timings: ``gemm_rate``
times a float64 matrix product on this machine, with BLAS limited to a given number of threads,
and ``als_flops`` counts the arithmetic one ALS iteration needs. ``floor seconds = flops / rate``;
the fraction of the floor reached is ``floor seconds / measured seconds`` (1.0 = at the limit).

Run from the repository root (the scripts put ``scripts/`` on ``sys.path`` themselves).
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
ANALYSIS = "\n## Analysis"


# -- machine and versions ------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> str:
    """The widest SIMD the CPU reports (it bounds the GEMM rate)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    for f in ("avx512f", "avx2", "avx", "sse4_2"):
        if f in flags:
            return f
    return "unknown"


def machine_info() -> dict[str, Any]:
    """Cores, memory, CPU model, OS and the BLAS-related environment of this machine."""
    import psutil

    return {
        "cpu": _cpu_model(),
        "simd": _cpu_flags(),
        "logical cores": os.cpu_count(),
        "physical cores": psutil.cpu_count(logical=False),
        "memory": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "os": f"{platform.system()} {platform.release()}",
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE", "(not set)"),
        "OPENBLAS_L2_SIZE": os.environ.get("OPENBLAS_L2_SIZE", "(not set)"),
    }


def _version(mod: str) -> str:
    try:
        m = __import__(mod)
        return str(getattr(m, "__version__", "?"))
    except Exception:  # noqa: BLE001 - optional packages may be missing
        return "not installed"


def versions() -> dict[str, str]:
    """Versions of python, numpy, the BLAS libraries loaded (NumPy's, and SciPy's, which the
    solver kernel calls), numba, scipy, pyarrow, dask, distributed, dmf, pyspark."""
    import os

    import numpy
    from threadpoolctl import threadpool_info

    import dmf.als.kernels  # noqa: F401 - loads SciPy's BLAS, so that it is listed

    blas = [
        f"{os.path.basename(i.get('filepath', '?'))}: {i.get('internal_api')} {i.get('version')} "
        f"({i.get('architecture')}, {i.get('threading_layer')})"
        for i in threadpool_info()
        if i.get("user_api") == "blas"
    ]
    return {
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "BLAS": "; ".join(blas) or "unknown",
        "numba": _version("numba"),
        "scipy": _version("scipy"),
        "pyarrow": _version("pyarrow"),
        "dask": _version("dask"),
        "distributed": _version("distributed"),
        "dmf": _version("dmf"),
        "pyspark": _version("pyspark"),
        "git": git_state(),
    }


def git_state() -> str:
    """The commit benchmarked, and whether dmf/ had uncommitted changes when it ran."""
    import subprocess

    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "dmf"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"{head} (dmf/ with uncommitted changes)" if dirty else head


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# -- the arithmetic floor ------------------------------------------------------------------------
def gemm_rate(threads: int = 1, n: int = 2048, repeats: int = 5) -> float:
    """Float64 GEMM rate of this machine in GFLOP/s, BLAS limited to ``threads`` threads.

    Best of ``repeats`` products of two (n, n) matrices, 2 n^3 flops each; the best run is the
    one least disturbed by other processes, and the rate the hardware can reach now.
    """
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n))
    b = rng.standard_normal((n, n))
    out = np.empty((n, n))
    best = float("inf")
    with threadpool_limits(limits=threads, user_api="blas"):
        np.matmul(a, b, out=out)  # warm up: thread pool, page faults
        for _ in range(repeats):
            t = time.perf_counter()
            np.matmul(a, b, out=out)
            best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best / 1e9


@dataclass
class AlsFlops:
    """Flops of one full ALS iteration (both half-iterations).

    ``floor``: the issue's arithmetic floor of the exact solve: per rating, the symmetric half
    of the augmented (rank+1)^2 Gram update, (rank+1)(rank+2)/2 multiply-adds = (rank+1)(rank+2)
    flops (the issue's ``nnz (rank+1)(rank+2)`` per half-iteration), and the right-hand side,
    2 (rank+1); per row a Cholesky factorisation, (rank+1)^3 / 3, plus two triangular solves,
    2 (rank+1)^2.

    ``executed``: what dmf's kernel (dmf/kernels.py) runs: for rows of at least rank+1 ratings
    the floor's arithmetic, plus the squared error from the Gram matrix (2 (rank+1)^2 a row),
    with the full Gram product, 2 (rank+1)^2 a rating, where the kernel uses dgemm (up to
    ``GEMM_MAX_K1`` unknowns); for a shorter row (L ratings) the Woodbury form instead: the L x L symmetric
    kernel, L (L+1) (rank+1), its Cholesky solve, L^3/3 + 2 L^2, and x and the residuals,
    4 L (rank+1). With many short rows ``executed`` is below ``floor``: the floor assumes the
    normal equations for every row.
    """

    floor: float
    executed: float


def als_flops(counts: np.ndarray, rank: int) -> AlsFlops:
    """Flops of one full iteration; ``counts``: the ratings of every row solved in it, users and
    items (``np.concatenate([store.counts("user"), store.counts("item")])``); empty rows cost
    nothing."""
    from dmf.als.kernels import GEMM_MAX_K1

    k1 = rank + 1
    n = np.asarray(counts, dtype=np.float64)
    n = n[n > 0]
    solve = k1**3 / 3 + 2 * k1**2
    gram_row = n * (k1 * (k1 + 1) + 2 * k1) + solve
    run_row = n * ((2 * k1 * k1 if k1 <= GEMM_MAX_K1 else k1 * (k1 + 1)) + 2 * k1) + solve
    short = n < k1
    woodbury_row = n * (n + 1) * k1 + n**3 / 3 + 2 * n**2 + 4 * n * k1
    floor = gram_row.sum()
    executed = np.where(short, woodbury_row, run_row + 2 * k1**2).sum()
    return AlsFlops(float(floor), float(executed))


# -- peak memory ---------------------------------------------------------------------------------
class PeakRSS:
    """Sample the RSS of this process and all its descendants in a background thread.

    Use as a context manager. ``peaks`` maps pid to (peak bytes, process name); ``driver`` is
    this process's peak; ``total`` the largest sum over all processes at one sample. Worker
    processes of a LocalCluster and a Spark JVM are descendants, so both are covered.
    """

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.peaks: dict[int, tuple[int, str]] = {}
        self.total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        procs = [me]
        try:
            procs += me.children(recursive=True)
        except psutil.Error:
            pass
        total = 0
        for p in procs:
            try:
                rss = p.memory_info().rss
                name = self.peaks.get(p.pid, (0, ""))[1] or " ".join(p.cmdline()[:3])[:80]
            except psutil.Error:
                continue
            total += rss
            if rss > self.peaks.get(p.pid, (0, ""))[0]:
                self.peaks[p.pid] = (rss, name)
        self.total = max(self.total, total)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def driver(self) -> int:
        return self.peaks.get(os.getpid(), (0, ""))[0]

    def of(self, pids: Iterable[int]) -> list[int]:
        return [self.peaks.get(p, (0, ""))[0] for p in pids]


def worker_pids(client) -> dict[str, int]:
    """Worker address -> pid of the worker process (not its nanny)."""
    return client.run(os.getpid)


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds consumed so far by the processes ``pids`` (0 for gone ones)."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def tree_cpu_seconds() -> float:
    """CPU seconds consumed so far by this process and all its living descendants."""
    import psutil

    me = psutil.Process()
    try:
        kids = me.children(recursive=True)
    except psutil.Error:
        kids = []
    return cpu_seconds([me.pid] + [k.pid for k in kids])


def gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f}"


# -- planted data --------------------------------------------------------------------------------
def planted_ratings(
    n_ratings: int,
    n_users: int | None = None,
    n_items: int | None = None,
    rank: int = 8,
    noise: float = 0.5,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """Distinct (user, item, rating) triples with planted biased low-rank structure.

    Users and items are drawn with mildly skewed popularity, duplicates removed (so a few less
    than ``n_ratings`` may come back). Default shape: n_users = n_ratings / 100 and
    n_items = n_ratings / 1000, i.e. 100 ratings per user and 1000 per item on average (the
    aspect of MovieLens 20M). Returns (users, items, ratings float32, n_users, n_items).
    """
    rng = np.random.default_rng(seed)
    n_users = n_users or max(10, n_ratings // 100)
    n_items = n_items or max(10, n_ratings // 1000)
    # Skewed draws: a power of a uniform puts more mass on low indices (popular rows).
    m = int(n_ratings * 1.05) + 1000
    u = (rng.random(m) ** 1.5 * n_users).astype(np.int64)
    i = (rng.random(m) ** 2.0 * n_items).astype(np.int64)
    key = np.unique(u * n_items + i)
    if len(key) > n_ratings:
        key = rng.choice(key, n_ratings, replace=False)
        key.sort()
    u, i = key // n_items, key % n_items
    del key
    scale = 0.5 / np.sqrt(max(rank, 1))
    U = rng.normal(0, 1, (n_users, rank)) * np.sqrt(scale)
    V = rng.normal(0, 1, (n_items, rank)) * np.sqrt(scale)
    b = rng.normal(0, 0.3, n_users)
    c = rng.normal(0, 0.3, n_items)
    r = np.empty(len(u), dtype=np.float32)
    step = 5_000_000  # bound the float64 temporaries
    for s in range(0, len(u), step):
        us, is_ = u[s : s + step], i[s : s + step]
        r[s : s + step] = (
            3.5
            + b[us]
            + c[is_]
            + np.einsum("ij,ij->i", U[us], V[is_])
            + rng.normal(0, noise, len(us))
        )
    return u, i, r, n_users, n_items


def split_test(n: int, fraction: float = 0.1, seed: int = 1) -> np.ndarray:
    """Boolean mask of the test ratings: a seeded random ``fraction`` of ``n``."""
    return np.random.default_rng(seed).random(n) < fraction


# -- markdown ------------------------------------------------------------------------------------
def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats are printed with 3 significant digits."""

    def fmt(x: Any) -> str:
        if isinstance(x, float):
            if x != x:
                return "-"
            return f"{x:.3g}" if abs(x) < 1e4 else f"{x:,.0f}"
        return str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def md_kv(title: str, d: dict[str, Any]) -> str:
    return md_table([title, "value"], d.items())


@dataclass
class Report:
    """A benchmark's markdown section: heading, provenance (machine, versions, command, date),
    then the sections the script adds."""

    title: str
    intro: str = ""
    parts: list[str] = field(default_factory=list)
    # Taken when the benchmark starts, so they describe the code that was measured.
    started: str = field(default_factory=now_utc)
    package_versions: dict[str, str] = field(default_factory=versions)

    def add(self, text: str) -> None:
        self.parts.append(text)

    def render(self) -> str:
        head = [f"# {self.title}", ""]
        if self.intro:
            head += [self.intro, ""]
        head += [
            f"Started: {self.started}; written: {now_utc()}",
            "",
            "Command (from the repository root):",
            "",
            "```",
            command_line(),
            "```",
            "",
            md_kv("machine", machine_info()),
            "",
            md_kv("package", self.package_versions),
            "",
        ]
        return "\n".join(head + [p + "\n" for p in self.parts])

    def write(self, name: str) -> Path:
        """Write docs/benchmarks_<name>.md atomically and return its path.

        A hand-written ``## Analysis`` section at the end of an existing file is kept, so a
        re-run refreshes the tables without losing the commentary (which may then be stale:
        it says which run it discusses)."""
        DOCS.mkdir(exist_ok=True)
        out = DOCS / f"benchmarks_{name}.md"
        text = self.render()
        if out.is_file():
            old = out.read_text()
            at = old.find(ANALYSIS)
            if at >= 0:
                text = text.rstrip("\n") + "\n\n" + old[at:]
        tmp = out.with_suffix(".md.tmp")
        tmp.write_text(text)
        os.replace(tmp, out)
        return out


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- memory and I/O over time, data kept in the pages (bench_exchange, bench_scale --model-scale) --
class RSSTimeline(PeakRSS):
    """A :class:`PeakRSS` that keeps every sample, so that peaks (and I/O) can be taken over a
    window of time, e.g. one half-step.

    Each sample is ``(time.time(), {pid: rss}, {pid: read_chars + write_chars})``: the second
    map counts the bytes each process passed through read/write system calls so far (files and
    sockets alike, page-cache hits included; ``/proc/PID/io``)."""

    def __init__(self, interval: float = 0.05):
        super().__init__(interval)
        self.samples: list[tuple[float, dict[int, int], dict[int, int]]] = []

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        procs = [me]
        try:
            procs += me.children(recursive=True)
        except psutil.Error:
            pass
        now = time.time()
        rss: dict[int, int] = {}
        io: dict[int, int] = {}
        for p in procs:
            try:
                r = p.memory_info().rss
                name = self.peaks.get(p.pid, (0, ""))[1] or " ".join(p.cmdline()[:3])[:80]
            except psutil.Error:
                continue
            try:
                c = p.io_counters()
                io[p.pid] = int(c.read_chars + c.write_chars)
            except (psutil.Error, AttributeError):
                pass
            rss[p.pid] = r
            if r > self.peaks.get(p.pid, (0, ""))[0]:
                self.peaks[p.pid] = (r, name)
        self.total = max(self.total, sum(rss.values()))
        self.samples.append((now, rss, io))

    def peaks_between(self, t0: float, t1: float, pids: Iterable[int]) -> list[int]:
        """Peak RSS of each of ``pids`` over the samples taken in [t0, t1] (0 if none)."""
        window = [s for s in self.samples if t0 <= s[0] <= t1]
        return [max((s[1].get(pid, 0) for s in window), default=0) for pid in pids]

    def io_between(self, t0: float, t1: float, pids: Iterable[int]) -> int:
        """Bytes the processes ``pids`` read and wrote through system calls in [t0, t1]: the
        difference between the last sample at or before t0 and the first at or after t1."""
        before = [s for s in self.samples if s[0] <= t0]
        after = [s for s in self.samples if s[0] >= t1]
        if not before or not after:
            return 0
        a, b = before[-1][2], after[0][2]
        return sum(max(0, b.get(p, 0) - a.get(p, 0)) for p in pids)


DATA_COMMENT = "<!-- bench-data {tag}\n{text}\n-->"


def embed_data(tag: str, data: Any) -> str:
    """``data`` as JSON inside an HTML comment (invisible on the rendered page), so that a later
    script (e.g. paper_scale.py) reads the measured numbers back from the page itself."""
    import json

    # "--" may only appear inside JSON strings (a command line's options): escape it there, so
    # that the comment cannot end early.
    text = json.dumps(data, sort_keys=True, default=str).replace("--", "-\\u002d")
    return DATA_COMMENT.format(tag=tag, text=text)


def read_data(path: Path, tag: str) -> Any | None:
    """The data :func:`embed_data` put in the page ``path`` under ``tag`` (None: none)."""
    import json
    import re

    if not Path(path).is_file():
        return None
    m = re.search(
        r"<!-- bench-data " + re.escape(tag) + r"\n(.*?)\n-->", Path(path).read_text(), re.S
    )
    return json.loads(m.group(1)) if m else None


def read_md_table(text: str, first_header: str) -> tuple[list[str], list[list[str]]] | None:
    """The first markdown table in ``text`` whose first header cell is ``first_header``: its
    header cells and rows of cells (strings, as written)."""
    lines = text.splitlines()
    for k, line in enumerate(lines):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.lstrip().startswith("|") and cells and cells[0] == first_header:
            header = cells
            rows = []
            for row in lines[k + 2 :]:
                if not row.lstrip().startswith("|"):
                    break
                rows.append([c.strip() for c in row.strip().strip("|").split("|")])
            return header, rows
    return None


def provenance() -> dict[str, str]:
    """When, how and on which commit a measurement ran (for sections a page keeps across runs)."""
    return {"date": now_utc(), "command": command_line(), "git": git_state(), "cpu": _cpu_model()}


def spark_session(threads: int, memory: str, app: str = "dmf-bench"):
    """A quiet Spark session in ``local[threads]``, as the Spark comparisons use it: Java 17
    (``JAVA_HOME`` found when unset), one BLAS thread per Spark task thread, as dmf's workers
    (netlib loads a native BLAS, libblas.so.3, when the system has one, e.g. Debian's
    libopenblas0-pthread; otherwise its slower Java one: :func:`bench_vs_spark.spark_blas`)."""
    from pyspark.sql import SparkSession

    if not os.environ.get("JAVA_HOME"):
        for cand in ("/usr/lib/jvm/java-17-openjdk-amd64", "/usr/lib/jvm/default-java"):
            if Path(cand).is_dir():
                os.environ["JAVA_HOME"] = cand
                break
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    spark = (
        SparkSession.builder.master(f"local[{threads}]")
        .appName(app)
        .config("spark.driver.memory", memory)
        .config("spark.sql.shuffle.partitions", str(max(4, 2 * threads)))
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.driver.extraJavaOptions", "-XX:+UseParallelGC")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    return spark
