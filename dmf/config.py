"""The YAML config: typed sections with documented fields.

A config file has the sections ``data``, ``synth``, ``store``, ``split``, ``blocks``, ``model``,
``train``, ``cluster``, ``evaluate``, ``output``, ``storage`` and ``tune``. Every field has a default, so an empty file is
valid (it trains on nothing, and says so). Unknown keys and bad values raise
:class:`dmf.errors.ConfigError` naming the dotted key, e.g. ``model.reg: Input should be greater
than or equal to 0``.

``--set key.path=value`` overrides are applied to the raw mapping before validation, so they are
checked exactly like values from the file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from dmf.errors import ConfigError


class Section(BaseModel):
    # A field's docstring (the string literal under it) is its description: `dmf config
    # schema` prints it, and tests/test_configs.py checks that every field has one.
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, use_attribute_docstrings=True
    )


def yaml_words(true: str, false: str) -> BeforeValidator:
    """A validator giving back the words that YAML 1.1 (PyYAML) turned into booleans: ``on``,
    ``yes`` and ``true`` are read as ``True``, ``off``, ``no`` and ``false`` as ``False``, so
    ``progress: off`` reaches the field as ``False``. For a field whose allowed words include
    such a pair: ``True`` becomes the word ``true``, ``False`` the word ``false``, e.g.
    ``Annotated[Literal["auto", "on", "off"], ON_OFF]``; in a file and in ``--set`` alike (both
    are parsed as YAML)."""

    def word(value: Any) -> Any:
        if value is True:
            return true
        if value is False:
            return false
        return value

    return BeforeValidator(word)


ON_OFF = yaml_words("on", "off")


class Columns(Section):
    """Where each field is in the raw input: a column name, or a 0-based position."""

    user: str | int = "user"
    """The raw user id: a column name from the header, or a 0-based position."""
    item: str | int = "item"
    """The raw item id: a column name from the header, or a 0-based position."""
    rating: str | int | None = "rating"
    """The rating, a number: a column name from the header, or a 0-based position. For implicit
    feedback (``model.feedback: implicit``) it is the event's weight (plays, seconds watched);
    ``null``: the input has no such column and every event counts 1."""
    timestamp: str | int | None = None
    """The time of the rating (integer, float or date): a column name or a 0-based position. Needed
    by ``split.method: temporal``; ``data.duplicates: last`` keeps the latest by it. ``null``:
    the input has no times."""


class DataConfig(Section):
    """Raw ratings to ingest."""

    source: str | list[str] | None = None
    """File, directory or glob (or a list of them). Relative paths are relative to the config file."""
    format: Literal["auto", "csv", "tsv", "parquet"] = "auto"
    """How the input files are read: ``csv`` (any delimiter), ``tsv`` (tab-separated unless
    ``delimiter`` says otherwise), ``parquet``, or ``auto``: Parquet for a ``.parquet``, ``.pq``
    or ``.parq`` name or a file that starts like one, else CSV. A ``preset`` decides it for its
    release."""
    preset: (
        Literal[
            "movielens-100k",
            "movielens-1m",
            "movielens-10m",
            "movielens-20m",
            "movielens-25m",
            "movielens-32m",
        ]
        | None
    ) = None
    """Reads a MovieLens release's ratings file with the right delimiter, columns and header."""
    delimiter: str | None = None
    """Field separator for CSV; may be several characters (MovieLens 1M/10M use ``::``)."""
    header: bool | Literal["auto"] = "auto"
    """Whether CSV files start with a line of column names. ``auto``: yes when ``columns`` are given
    by name; with positions, yes unless the first line's rating field is a number. Columns given
    by name need a header."""
    columns: Columns = Field(default_factory=Columns)
    """Where user, item, rating and timestamp are in each row (by name or 0-based position)."""
    compression: Literal["auto", "none", "gzip", "zstd"] = "auto"
    """Compression of CSV files: ``gzip``, ``zstd``, ``none``, or ``auto``: from the file's first
    bytes, else its suffix (``.gz``, ``.zst``). Parquet files carry their own."""
    id_type: Literal["auto", "int", "string"] = "auto"
    """How raw user and item ids are read. ``auto``: a side's ids are integers when every one
    of them, over the whole input, is a canonical integer (ASCII digits without a leading zero,
    after an optional ``-``; ``0`` but not ``-0``, ``+1`` or ``1_0``; within int64), else the
    exact strings: ``007`` and ``7`` are two ids, never one. Among numbers, ids written with a
    decimal point or an exponent (``3.0``, as pandas writes a float column) are numbers, which
    must be whole and within int64. In Parquet the column's type decides: a string column stays
    strings. ``int``: every id must be such an integer (or a whole float in a Parquet float
    column); the first that is not is an error naming its line or row. ``string``: every id is
    its exact text (a Parquet integer column's in decimal)."""
    max_id_length: int = Field(default=1024, ge=1)
    """Longest string id accepted, in UTF-8 bytes; a longer one is an error naming its line or
    row (integer ids are held in 8 bytes whatever their digits). The item side's id map lives
    on the driver and grows with the total length of the item ids."""
    duplicates: Literal["error", "last", "mean", "sum"] | None = None
    """Policy for repeated (user, item) pairs: fail, keep the latest by timestamp (then by input
    order), average them, or add them up (``sum``: repeated events of implicit feedback). Unset:
    ``error`` for explicit ratings, ``sum`` under ``model.feedback: implicit``."""
    invalid_ratings: Literal["error", "drop"] = "error"
    """Policy for NaN, infinite or null ratings."""
    rating_range: tuple[float, float] | None = None
    """Inclusive valid range of ratings, e.g. [0.5, 5]."""
    out_of_range: Literal["error", "drop", "clip"] = "error"
    """Policy for a rating outside ``rating_range``: fail naming its line (``error``), leave it out
    (``drop``), or move it to the nearer bound (``clip``). The store's manifest counts the
    dropped and clipped ones. Unused without ``rating_range``."""
    batch_rows: int = Field(default=1_000_000, ge=1)
    """Rows per streaming batch; memory use of ingest scales with this, not with the input."""
    id_partition_rows: int = Field(default=5_000_000, ge=1)
    """Rows per user-id range: ingest ranks user ids range by range, one task per range, so
    no process holds every raw id (:mod:`dmf.data.idpartition`). A task's memory scales with
    this; the store is the same whatever its value."""


class SynthConfig(Section):
    """Planted-truth ratings, written by ``dmf synth`` or by ``dmf run`` when ``data.source`` is
    missing."""

    implicit: bool = False
    """Planted-preference events instead of ratings (implicit feedback, ``dmf synth
    --implicit``): each event row's item is drawn with probability proportional to popularity
    x exp(beta u_i . v_j), its rating is a count (1 + geometric), and favourite items come
    again as repeated rows; the truth also records each user's top items (``top_items``)."""
    enabled: bool = False
    """Synthetic input: ``dmf run`` writes the planted ratings to ``path`` first (again when these
    settings change), and ingest reads them when ``data.source`` is not set."""
    path: str = "runs/synth"
    """Directory (or URL) the ratings (``ratings/``), the true factors (``truth.npz``) and
    ``synth.json`` are written to; relative to the config file. ``dmf synth --out`` overrides it."""
    n_users: int = Field(default=10_000, ge=1)
    """Number of users the ratings are spread over (rows of the rating matrix)."""
    n_items: int = Field(default=2_000, ge=1)
    """Number of items (columns of the rating matrix)."""
    n_ratings: int = Field(default=500_000, ge=1)
    """Number of ratings written, each a distinct (user, item) pair: at most ``n_users`` x
    ``n_items``. Under ``implicit``: the number of event rows (pairs may repeat)."""
    rank: int = Field(default=8, ge=0)
    """Rank of the true factors u_i and v_j (0: biases and noise only)."""
    noise: float = Field(default=0.5, ge=0)
    """Standard deviation sigma of Gaussian noise added to each rating."""
    user_skew: float = Field(default=0.5, ge=0)
    """Zipf-like exponent of user activity (0 = uniform)."""
    item_skew: float = Field(default=0.8, ge=0)
    """Zipf-like exponent of item popularity (0 = uniform)."""
    mu: float = 3.5
    """Global mean of the ratings, before clipping and rounding."""
    bias_scale: float = Field(default=0.3, ge=0)
    """Standard deviation of the true user and item biases."""
    factor_scale: float = Field(default=0.5, ge=0)
    """Standard deviation of the true interaction u_i . v_j (whatever the rank)."""
    tail_rank: int = Field(default=0, ge=0)
    """Extra true dimensions beyond ``rank``, with a decaying spectrum (the k-th has variance
    proportional to 1/k): signal a rank-``rank`` model cannot fully capture, as in real
    ratings."""
    tail_scale: float = Field(default=0.0, ge=0)
    """Standard deviation of the tail dimensions' interaction, all of them together."""
    round_to: float | None = None
    """Round ratings to a multiple of this (e.g. 0.5 or 1) after clipping."""
    clip: tuple[float, float] | None = None
    """Inclusive range [low, high] every rating is clipped to, before rounding; ``null``: ratings
    are unbounded."""
    seed: int = 0
    """Seed of every random draw: the same seed and settings give the same ratings, whatever the
    number of files or the chunk size."""
    files: int = Field(default=1, ge=1)
    """Number of output files the ratings are spread over."""
    format: Literal["parquet", "csv"] = "parquet"
    """File format of the ratings written: ``parquet`` or ``csv`` (with a header line)."""


class StoreConfig(Section):
    """Where the store of ingested ratings lives, and when ingest may replace it."""

    path: str = "runs/store"
    """Directory (or URL, e.g. ``s3://bucket/store``) of the store that ingest writes and training
    reads; relative to the config file. ``dmf train --store`` overrides it."""
    overwrite: bool = False
    """Replace an existing store. Without it, writing into a non-empty directory is refused."""
    force: bool = False
    """Replace the store even while training runs hold claims on it (``_claims/``); those runs
    then fail when they next read it. Without it, ingest refuses, naming the runs."""


class SplitConfig(Section):
    """Which ratings are held out, chosen at ingest: the store records them, so changing this
    section means ingesting again."""

    method: Literal["none", "random", "user", "temporal"] = "random"
    """``random``: each rating independently (seeded hash); ``user``: a fraction of each user's
    ratings; ``temporal``: the latest ratings by timestamp."""
    validation: float = Field(default=0.05, ge=0, lt=1)
    """Fraction of the ratings held out as the validation split, in [0, 1): training records its
    RMSE every iteration and ``train.early_stopping`` watches it. 0: no validation split."""
    test: float = Field(default=0.1, ge=0, lt=1)
    """Fraction of the ratings held out as the test split, in [0, 1): never trained on, evaluated by
    ``dmf run`` and ``dmf evaluate``. 0: no test split."""
    seed: int = 42
    """Seed of the hash that picks the held-out ratings (and of a temporal split's sample of
    timestamps): another seed holds out other ratings."""

    @model_validator(mode="after")
    def _fractions(self) -> SplitConfig:
        if self.validation + self.test >= 1:
            raise ValueError("validation + test must be below 1")
        return self


class BlocksConfig(Section):
    """How each side (users, items) is cut into blocks at ingest; each half-step runs one task a
    block. The store records them, so changing this section means ingesting again."""

    target_ratings: int = Field(default=1_000_000, ge=1)
    """Target number of train ratings per block; a block in a worker's memory takes about 12
    bytes a rating (the solver's own working set is a few hundred KiB)."""
    n_blocks: int | None = Field(default=None, ge=1)
    """If set, overrides target_ratings: this many blocks per side (fewer if there are fewer rows)."""
    min_blocks: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    """At least this many blocks per side (fewer only if there are fewer rows), so that a small
    store still gives every worker thread a block to solve: a 1M-rating store in one block left
    one of two workers idle. ``auto``: the worker threads of the cluster that ingests (for a
    store made on threads beside a cluster dmf starts, ``cluster.n_workers`` x
    ``cluster.threads_per_worker``). The blocks change the speed of training, never its result,
    so this is not part of the store's fingerprint: a store made on another cluster is reused."""


class ModelConfig(Section):
    """The biased matrix factorization model: rank, regularisation, initialisation."""

    rank: int = Field(default=10, ge=0)
    """Number of latent factors of each user and item (k in u_i . v_j); 0 fits the biases alone. The
    factors' memory grows with k, the solve of a row with about k^3."""
    reg: float = Field(default=0.1, ge=0)
    """lambda: L2 penalty on the factor vectors."""
    reg_bias: float | None = Field(default=None, ge=0)
    """L2 penalty on the biases; defaults to ``reg``."""
    weighted_reg: bool = True
    """ALS-WR (Zhou et al. 2008, Spark's regParam): each row's penalty is scaled by its number of
    train ratings. Unset under ``feedback: implicit`` it is ``false``, as in implicit and
    LensKit (the penalty is lambda |x|^2 for every row)."""
    feedback: Literal["explicit", "implicit"] = "explicit"
    """``explicit``: ratings, fitted where observed. ``implicit``: events (plays, clicks,
    purchases), Hu, Koren & Volinsky (2008): every user-item cell is fitted, with preference
    p = 1 where the summed events r > 0 (else 0) and confidence c = 1 + alpha r (see
    ``confidence``); the objective sums c (p - u_i . v_j)^2 over all cells. ``mu`` is 0."""
    alpha: float = Field(default=1.0, ge=0)
    """Implicit feedback: the confidence's slope, c = 1 + alpha r (``confidence: linear``) or
    c = 1 + alpha log(1 + r / eps) (``log``). Spark's and implicit's default is 1.0; Hu et al.
    used 40 on counts of TV watching."""
    confidence: Literal["linear", "log"] = "linear"
    """Implicit feedback: how the summed events r of a cell become its confidence (``alpha``)."""
    eps: float = Field(default=1.0, gt=0)
    """Implicit feedback, ``confidence: log``: the scale of r in c = 1 + alpha log(1 + r / eps)."""
    biases: bool = True
    """Fit the user and item biases b_i and c_j. Unset under ``feedback: implicit`` it is
    ``false`` (u_i . v_j alone, as Spark, implicit and LensKit fit implicit feedback); explicit
    ratings are always fitted with biases."""
    dtype: Literal["float32", "float64"] = "float32"
    """Storage type of the factors; normal equations are always accumulated in float64."""
    clip: bool = True
    """Clip predictions (``predict``, ``evaluate``, the validation RMSE of training) to the
    rating range: ``data.rating_range`` when set, else the lowest and highest train rating.
    ``false`` returns the raw ``mu + b_i + c_j + u_i . v_j``. Ranking is unaffected."""
    init_scale: float = Field(default=0.1, gt=0)
    """Item factors start as N(0, init_scale^2 / rank), from ``seed``."""
    seed: int = 0
    """Seed of the initial item factors: the same seed gives the same model, whatever the number of
    blocks, workers or tasks."""

    @property
    def effective_reg_bias(self) -> float:
        return self.reg if self.reg_bias is None else self.reg_bias

    @property
    def implicit(self) -> bool:
        return self.feedback == "implicit"

    @model_validator(mode="after")
    def _implicit_defaults(self) -> ModelConfig:
        # Defaults that follow the feedback, when not set: written straight into the instance
        # (not by assignment, which would validate again), so `dmf config show` prints them.
        if self.implicit:
            for name in ("weighted_reg", "biases"):
                if name not in self.model_fields_set:
                    object.__setattr__(self, name, False)
        return self


class EarlyStopping(Section):
    """Early stopping on the validation RMSE (``split.validation`` must hold ratings out)."""

    patience: int = Field(default=3, ge=1)
    """Stop after this many iterations without a better validation RMSE; keep the best model."""
    min_delta: float = Field(default=0.0, ge=0)
    """Smallest decrease of the validation RMSE (in rating units) that counts as better than the
    best so far; a smaller one counts towards ``patience``."""
    min_iterations: int = Field(default=6, ge=1)
    """Never stop before this iteration. ALS's validation RMSE often rises over the first
    iterations before it falls, as the factors grow from their small initial values: without
    this, patience could end a run there and keep its first iteration."""


class TrainConfig(Section):
    """The ALS iterations, their stopping rules, checkpoints and progress display."""

    iterations: int = Field(default=20, ge=0)
    """Most ALS iterations to run, each a user half-step then an item half-step; ``tolerance`` and
    ``early_stopping`` may stop training sooner."""
    tolerance: float = Field(default=0.0, ge=0)
    """Stop when the relative decrease of the objective over an iteration is below this."""
    early_stopping: EarlyStopping | None = Field(default_factory=EarlyStopping)
    """Stop when the validation RMSE no longer improves (``{patience, min_delta,
    min_iterations}``), and keep the model of the best iteration; needs ``split.validation``
    (without one it is off, and the log says so). On by default. ``null``: no early stopping,
    the model of the last iteration is kept."""
    checkpoint_every: int = Field(default=1, ge=0)
    """Write a checkpoint every N iterations (0: never)."""
    keep_checkpoints: int = Field(default=2, ge=1)
    """Number of newest checkpoints kept in the model directory's ``checkpoints/``; older ones are
    deleted as new ones are written."""
    cache_blocks: Literal["auto", "always", "never"] = "auto"
    """Keep rating blocks in worker memory between iterations (``auto``: when they fit in half the
    cluster's memory), or read them from disk every half-iteration."""
    progress: Annotated[Literal["auto", "on", "off"], ON_OFF] = "auto"
    """Progress bars per half-iteration: ``auto`` shows them only on a terminal."""
    stall_warning: float = Field(default=600.0, gt=0)
    """Seconds without a finished task (a block's solve, exchange or export) after which a
    warning says whether workers are paused for lack of memory. Training keeps waiting, unless
    every worker stays paused, running nothing, for two such periods: then it stops with an
    error naming ``cluster.memory_limit`` (a paused worker starts nothing until its memory
    drops)."""
    retries: int = Field(default=2, ge=0)
    """How often Dask reruns a block task whose worker died."""
    solver: Literal["cholesky", "cg"] = "cholesky"
    """How each row's normal equations are solved: ``cholesky`` exactly (the objective never
    increases), or, for implicit feedback, ``cg``: ``cg_steps`` conjugate-gradient steps from
    the row's previous factors (Takacs et al. 2011, implicit's default), cheaper at high rank
    but inexact: the history records the objective it reaches."""
    cg_steps: int = Field(default=3, ge=1)
    """Conjugate-gradient steps per row and half-step under ``solver: cg``."""
    validation_users: int = Field(default=2000, ge=1)
    """Implicit feedback: the validation metric of every iteration (NDCG at ``evaluate.k`` over
    all items, train items excluded) is computed on at most this many validation users, a
    seeded sample spread over the user blocks: ranking every item costs items x rank per
    user."""
    exchange: Literal["auto", "broadcast", "partitioned"] = "auto"
    """How each half-step's tasks get the side held fixed: ``broadcast`` (the whole side, one
    copy per worker: the fast path), ``partitioned`` (each block only the rows its ratings
    reference, routed through files, so a worker never holds a whole side), or ``auto``:
    broadcast when the side takes at most a quarter of a worker's memory_limit. Either gives
    the same model, to the last bit."""
    lease_seconds: float = Field(default=60.0, gt=0)
    """Lifetime of a run's leases without a heartbeat: its exclusive lease on the model
    directory (``_writer.lease``) and its claim on the store (``_claims/``), refreshed every
    third of this. A killed run's model directory can be taken over this long after it died
    (:mod:`dmf.store.lease`)."""


class JobqueueConfig(Section):
    """Workers started as batch jobs by dask-jobqueue (``cluster.kind: jobqueue``)."""

    system: Literal["slurm", "pbs", "sge", "lsf"] = "slurm"
    """Batch system the workers run on: dask-jobqueue's ``SLURMCluster``, ``PBSCluster``,
    ``SGECluster`` or ``LSFCluster``."""
    jobs: int = Field(default=1, ge=1)
    """Number of batch jobs submitted, each running the worker(s) ``options`` describe."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of the dask-jobqueue cluster class (cores, memory, queue, walltime...)."""


class TLSFiles(Section):
    """TLS certificate files (PEM) for ``cluster.security``. Relative paths are relative to the
    config file."""

    ca_file: str
    """The CA certificate: only peers presenting a certificate it signed are accepted."""
    cert: str
    """The certificate dmf presents to the scheduler. For a cluster dmf starts (``local``), the
    scheduler and the workers present it too."""
    key: str
    """The private key of ``cert`` (unencrypted PEM: keep it readable by you only)."""


def _security_shape(value: Any) -> str:
    return "files" if isinstance(value, (dict, TLSFiles)) else "mode"


# ``security: temporary`` or ``security: {ca_file: ..., cert: ..., key: ...}``. The
# discriminator keeps a bad value's error to the shape that was meant.
SecuritySetting = Annotated[
    Annotated[Literal["auto", "none", "temporary"], Tag("mode")]
    | Annotated[TLSFiles, Tag("files")],
    Discriminator(_security_shape),
]


class KubernetesConfig(Section):
    """A Dask cluster on Kubernetes, run by the dask-kubernetes operator (``cluster.kind:
    kubernetes``, ``pip install 'dmf[kubernetes]'``). It has ``cluster.n_workers`` worker pods
    of ``cluster.threads_per_worker`` threads and ``cluster.memory_limit`` each, always speaks
    TLS, and is deleted at the end of the run."""

    name: str | None = None
    """Name of the DaskCluster resource, prefix of its pods, services and Secret (lower-case
    letters, digits and '-'). Default: ``dmf-`` and a random suffix, so runs never collide."""
    namespace: str | None = None
    """Kubernetes namespace. Default: the current kubeconfig context's."""
    image: str = "dmf:latest"
    """Image of the scheduler and worker pods, built from ``docker/Dockerfile``. It must hold
    the same dmf, Dask and Python versions as the machine running dmf."""
    resources: dict[str, dict[str, str]] | None = None
    """Container resources of every pod, e.g. ``{requests: {cpu: "4", memory: 16Gi}, limits:
    {memory: 16Gi}}``. Dask sizes ``memory_limit: auto`` from the container's limit."""
    env: dict[str, str] = Field(default_factory=dict)
    """More environment variables of the pods. They are stored in plain text in the DaskCluster
    resource: put credentials in ``pass_env`` instead."""
    pass_env: list[str] = Field(
        default_factory=lambda: [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_REGION",
            "AWS_DEFAULT_REGION",
            "AWS_ENDPOINT_URL",
        ]
    )
    """Environment variables copied from dmf's environment to the pods, those that are set
    (object storage credentials, say). They travel in the run's Kubernetes Secret, not in the
    cluster spec."""
    scheduler_service_type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    """How dmf reaches the scheduler: ``ClusterIP`` (through a port-forward when dmf runs
    outside the Kubernetes cluster), ``NodePort`` or ``LoadBalancer``."""
    timeout: float = Field(default=600, gt=0)
    """Seconds to wait for the scheduler pod and its service to be up."""


# The smallest cluster.memory_limit a worker can start in.
MIN_WORKER_MEMORY = 256 * 2**20


class ClusterConfig(Section):
    """The Dask cluster: one that dmf starts (``local``, ``jobqueue``, ``kubernetes``), or a
    running one it attaches to (``address``, ``scheduler_file``)."""

    kind: Literal["local", "address", "scheduler_file", "jobqueue", "kubernetes"] = "local"
    """``local``: start an embedded LocalCluster; ``address`` / ``scheduler_file``: attach to a
    running scheduler; ``jobqueue``: start workers as batch jobs (dask-jobqueue);
    ``kubernetes``: start a cluster on Kubernetes (dask-kubernetes operator)."""
    n_workers: int = Field(default=2, ge=1)
    """Workers of a cluster dmf starts (``local``: processes; ``kubernetes``: pods)."""
    threads_per_worker: int = Field(default=1, ge=1)
    """Dask threads per worker; each runs one block task with one BLAS thread."""
    memory_limit: str | int = "auto"
    """Per worker, e.g. "4GiB"; ``auto`` shares the machine's memory between workers. At least
    256 MiB: a worker process with dmf's solver loaded takes 230-300 MB before any work."""
    processes: bool = True
    """``local``: workers are processes (``false``: threads of the dmf process)."""
    dashboard_address: str | None = "127.0.0.1:8787"
    """Where the embedded cluster's dashboard listens, ``HOST:PORT``. A port alone (``:8787``)
    listens on loopback, like the scheduler; ``0.0.0.0:8787`` opens it to the network; port 0
    takes a free port; ``null`` turns the dashboard off. A port in use is replaced by a free
    one (Dask warns). The printed link is always the one that works."""
    address: str | None = None
    """``kind: address``: the running scheduler, ``tcp://HOST:PORT`` or ``tls://HOST:PORT``
    (``--address`` overrides it)."""
    scheduler_file: str | None = None
    """``kind: scheduler_file``: the file a running scheduler wrote (``--scheduler-file``
    overrides it)."""
    local_directory: str | None = None
    """``local``: where workers keep their scratch files (default: Dask's temporary directory)."""
    security: SecuritySetting = "auto"
    """TLS between dmf, the scheduler and the workers (``distributed.Security``):

    - ``auto``: ``temporary`` for a cluster dmf starts (``local`` with worker processes,
      ``jobqueue``, ``kubernetes``), ``none`` for a cluster it attaches to or a LocalCluster of
      threads (which has no sockets);
    - ``none``: Dask's own configuration decides (plain TCP unless ``distributed.comm.tls`` is
      set there);
    - ``temporary``: a self-signed certificate set made for this run, held in memory; only for
      a cluster dmf starts;
    - ``{ca_file, cert, key}``: PEM files, for a cluster dmf attaches to (``tls://``
      addresses) or one it starts."""
    jobqueue: JobqueueConfig = Field(default_factory=JobqueueConfig)
    """``kind: jobqueue``: the batch system and its options."""
    kubernetes: KubernetesConfig = Field(default_factory=KubernetesConfig)
    """``kind: kubernetes``: image, namespace, resources and environment of the pods."""

    @field_validator("memory_limit")
    @classmethod
    def _memory_limit(cls, value: str | int) -> str | int:
        if value == "auto" or value == 0:
            return value
        from dask.utils import parse_bytes

        try:
            n = parse_bytes(value)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{value!r} is not a size such as 4GiB or 512MiB") from exc
        if 0 < n < MIN_WORKER_MEMORY:
            raise ValueError(
                f"{value!r} is below 256 MiB: a dmf worker process takes 230-300 MB with the "
                "solver loaded, before any work (Dask would restart it again and again)"
            )
        return value

    @model_validator(mode="after")
    def _kind_needs(self) -> ClusterConfig:
        if self.kind == "address" and not self.address:
            raise ValueError("cluster.kind 'address' needs cluster.address")
        if self.kind == "scheduler_file" and not self.scheduler_file:
            raise ValueError("cluster.kind 'scheduler_file' needs cluster.scheduler_file")
        if self.kind in ("address", "scheduler_file") and self.security == "temporary":
            raise ValueError(
                "cluster.security 'temporary' makes certificates for a cluster dmf starts; "
                "to attach to a TLS cluster give its files: {ca_file, cert, key}"
            )
        if self.kind == "kubernetes" and self.security == "none":
            raise ValueError("cluster.kind 'kubernetes' always uses TLS: cluster.security none")
        return self


class EvaluateConfig(Section):
    """Metrics on a held-out split: RMSE and MAE, and precision, recall, NDCG, MAP and hit rate at
    k (implicit feedback: the ranking metrics only)."""

    split: Literal["test", "validation"] = "test"
    """Held-out split evaluated by ``dmf run`` and, unless ``--split`` says otherwise, by ``dmf
    evaluate``."""
    k: int = Field(default=10, ge=1)
    """Length of the top-k lists of the ranking metrics (precision, recall, NDCG, MAP and hit rate
    at k), and of the validation NDCG of implicit-feedback training."""
    threshold: float = 4.0
    """A held-out rating at or above this is relevant for the ranking metrics. Not used for
    implicit feedback: every held-out event (weight > 0) is relevant."""
    cold_start: Literal["fallback", "drop"] = "fallback"
    """Unknown users or items: predict from the known biases (``fallback``) or skip (``drop``)."""
    negatives: int | None = Field(default=None, ge=1)
    """Sampled-negative evaluation, for very large catalogues: each user's candidates are its
    held-out items and this many items drawn at random (seeded) from those it has no train or
    held-out event with, instead of every item. Reported under its own label
    (``sampled_negatives``), as such figures run far higher than full-catalogue ones and are
    not comparable with them. ``null``: rank every item."""
    ranking: bool = True
    """Compute the ranking metrics, which score every item for each evaluated user; ``false``: RMSE
    and MAE only, much faster with many items."""


class StorageConfig(Section):
    """How dmf reaches object storage and other remote filesystems (through fsspec)."""

    options: dict[str, Any] = Field(default_factory=dict)
    """Storage options passed unchanged to the filesystem of every URL (``s3://``, ``gs://``,
    ``abfs://``, ``hdfs://``), as dask's ``storage_options``: e.g. ``{endpoint_url: ...,
    key: ..., secret: ...}`` for S3. Without them, credentials and endpoints come from the
    standard environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``,
    ``AWS_REGION``; ``GOOGLE_APPLICATION_CREDENTIALS``; ...). They travel with each task to the
    workers, which need no local configuration."""


class OutputConfig(Section):
    """The model directory training writes."""

    model: str = "runs/model"
    """Model directory (or URL): factor files, ``model.json``, ``history.csv``, the plot and the
    checkpoints; relative to the config file."""
    overwrite: bool = True
    """Replace a model already in ``model``. ``false``: training refuses to start over it
    (``--resume`` continues it either way)."""
    plot: bool = True
    """Write ``convergence.png`` next to ``history.csv``: the objective and the RMSEs per iteration,
    with the kept iteration marked."""


class TuneConfig(Section):
    """``dmf tune``: a search (Optuna's TPE sampler and a pruner) over the model's rank,
    regularisation and ALS-WR, and the number of iterations, for the lowest validation RMSE
    (:mod:`dmf.tune`). The rest of the config (store, cluster, model.dtype and seed...) is
    what every trial trains with."""

    trials: int = Field(default=20, ge=1)
    """Trials to run (fewer when ``timeout`` ends the search first)."""
    parallel: int = Field(default=2, ge=1)
    """Trials trained at once, on threads of this process sharing the cluster and its cached
    rating blocks. Above 1, which settings the seeded sampler proposes depends on the order
    trials finish in, so two searches may differ; each trial's own result does not."""
    timeout: float | None = Field(default=None, gt=0)
    """Seconds after which no new trial starts (running ones finish); ``null``: no limit."""
    seed: int = 0
    """Seed of the sampler (TPE): with ``parallel: 1`` the same seed gives the same search."""
    output: str = "runs/tune"
    """Directory of the results: ``trials.csv``, ``trials.png``, ``best.yaml``, ``tune.json``,
    and each trial's model in ``trials/NNNNN``; relative to the config file. A directory
    holding an earlier search's results is replaced; any other non-empty one is refused."""
    pruner: Literal["median", "hyperband", "none"] = "median"
    """How unpromising trials are stopped from their validation RMSE per iteration:
    ``median`` (Optuna's MedianPruner: a trial whose best so far is worse than the median of
    the completed trials at the same iteration), ``hyperband`` (HyperbandPruner, iterations
    as the resource) or ``none``."""
    warmup: int = Field(default=6, ge=1)
    """The iteration from which the pruner judges trials: every trial runs at least this many.
    ALS curves cross: a well regularised trial descends for many iterations, while an
    over-regularised one is flat after two, and looks better until then (22 searches of 12
    trials on 100k ratings: pruning from iteration 3, one was left with over-regularised
    trials only; from iteration 5, none was)."""
    startup_trials: int = Field(default=5, ge=0)
    """The first trials explore: they are drawn at random, before TPE models the results of
    those finished, and the median pruner stops no trial until this many have completed. It
    judges a trial at an iteration only against this many completed trials or more that
    reached it."""
    rank: tuple[int, int] = (2, 32)
    """Range [low, high] of ``model.rank`` searched (log scale when low is at least 1)."""
    reg: tuple[float, float] = (0.01, 30.0)
    """Range [low, high] of ``model.reg`` searched, on a log scale (low above 0). Under ALS-WR
    the penalty is per rating, so good values are far smaller than without (0.05-0.2 with it
    and 5-20 without, on MovieLens and on dmf's test data): the default range holds both."""
    reg_bias: tuple[float, float] | None = (0.01, 30.0)
    """Range [low, high] of ``model.reg_bias`` searched, on a log scale (low above 0);
    ``null``: not searched, ``model.reg_bias`` is left as the config has it."""
    weighted_reg: list[bool] = Field(default_factory=lambda: [True, False], min_length=1)
    """Values of ``model.weighted_reg`` (ALS-WR) tried: ``[true, false]`` searches both, a
    single value fixes it."""
    alpha: tuple[float, float] | None = (0.3, 100.0)
    """Implicit feedback: the range of ``model.alpha`` searched, on a log scale. ``null``: not
    searched, ``model.alpha`` as the config has it. Not searched for explicit ratings."""
    iterations: int = Field(default=15, ge=1)
    """Most iterations a trial runs. The number of iterations is searched along the way: a
    trial's value is its best validation RMSE over its iterations, and best.yaml's
    ``train.iterations`` is the best trial's best iteration."""
    patience: int = Field(default=3, ge=1)
    """A trial stops after this many iterations without a better validation RMSE (its
    ``train.early_stopping.patience``)."""

    @field_validator("rank", "reg", "reg_bias", "alpha")
    @classmethod
    def _range(cls, value, info):
        if value is None:
            return value
        lo, hi = value
        if lo > hi:
            raise ValueError(f"[{lo}, {hi}]: the low end is above the high end")
        if info.field_name == "rank" and lo < 0:
            raise ValueError(f"[{lo}, {hi}]: a rank is at least 0")
        if info.field_name != "rank" and lo <= 0:
            raise ValueError(f"[{lo}, {hi}]: searched on a log scale, the low end must be above 0")
        return value

    @field_validator("weighted_reg")
    @classmethod
    def _choices(cls, value: list[bool]) -> list[bool]:
        if len(set(value)) != len(value):
            raise ValueError(f"{value}: each value once")
        return value


class Config(Section):
    """A whole dmf job: each attribute is a section of the YAML file."""

    data: DataConfig = Field(default_factory=DataConfig)
    """Raw ratings to ingest: where they are, how to read them, what to do with bad rows."""
    synth: SynthConfig = Field(default_factory=SynthConfig)
    """Synthetic ratings with planted factors, to try dmf or test it at scale."""
    store: StoreConfig = Field(default_factory=StoreConfig)
    """The store ingest writes and training reads."""
    split: SplitConfig = Field(default_factory=SplitConfig)
    """Which ratings ingest holds out for validation and test."""
    blocks: BlocksConfig = Field(default_factory=BlocksConfig)
    """How ingest cuts each side into blocks, the unit of work of training."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """The model: rank, regularisation, factor type and initialisation."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """The ALS iterations: how many, when to stop, checkpoints, progress and exchange."""
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    """The Dask cluster dmf starts or attaches to."""
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    """Metrics on a held-out split after training (``dmf run``, ``dmf evaluate``)."""
    output: OutputConfig = Field(default_factory=OutputConfig)
    """Where and how the trained model is written."""
    storage: StorageConfig = Field(default_factory=StorageConfig)
    """Options of remote filesystems (object stores), for every URL in the config."""
    tune: TuneConfig = Field(default_factory=TuneConfig)
    """The hyperparameter search of ``dmf tune``: trials, search space, pruning, output."""

    base_dir: str = Field(default=".", exclude=True)
    """Directory relative paths are resolved against (the config file's directory)."""

    def resolve(self, path: str | Path) -> str:
        """A path from the config made absolute against the config file's directory, as a
        string; a URL (``s3://...``) is returned unchanged."""
        s = os.fspath(path)
        if is_url(s):
            return s
        p = Path(s).expanduser()
        return os.path.normpath(p if p.is_absolute() else Path(self.base_dir) / p)

    @property
    def min_blocks(self) -> int:
        """``blocks.min_blocks`` with ``auto`` resolved: the worker threads of the cluster."""
        b = self.blocks.min_blocks
        if b == "auto":
            return self.cluster.n_workers * self.cluster.threads_per_worker
        return max(1, int(b))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"base_dir"})

    @model_validator(mode="after")
    def _feedback(self) -> Config:
        if self.data.duplicates is None:
            # Written straight into the section (see ModelConfig._implicit_defaults).
            object.__setattr__(self.data, "duplicates", "sum" if self.model.implicit else "error")
        m = self.model
        if self.train.solver == "cg" and not m.implicit:
            raise ValueError(
                "train.solver 'cg' is for model.feedback 'implicit'; explicit ratings are solved "
                "exactly (cholesky)"
            )
        if not m.implicit and not m.biases:
            raise ValueError(
                "model.biases false is for model.feedback 'implicit'; explicit ratings are fitted "
                "with biases (rank 0 fits the biases alone)"
            )
        if not m.implicit and self.data.columns.rating is None:
            raise ValueError(
                "data.columns.rating is null (every event counts 1): that is implicit feedback, "
                "set model.feedback: implicit; explicit ratings need a rating column"
            )
        if m.implicit and m.rank == 0 and not m.biases:
            raise ValueError(
                "model.rank 0 under implicit feedback without biases leaves nothing to fit: "
                "raise model.rank (or set model.biases: true)"
            )
        return self


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {loc}: {msg}")
    return f"invalid config {source}:\n" + "\n".join(lines)


# Limits of a config: its file's size, and its values once YAML aliases are expanded (a few
# nested aliases, an "alias bomb", expand a small file into billions of values).
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_VALUES = 100_000


def load_yaml(text: str, where: str) -> Any:
    """YAML ``text`` (from ``where``) through ``yaml.safe_load``, refused when its aliases
    expand it past :data:`MAX_CONFIG_VALUES` values."""
    doc = yaml.safe_load(text)
    seen = 0
    stack = [doc]
    while stack:
        x = stack.pop()
        seen += 1
        if seen > MAX_CONFIG_VALUES:
            raise ConfigError(
                f"{where} expands to more than {MAX_CONFIG_VALUES:,} values (YAML aliases "
                "repeated inside each other?); a dmf config is a few hundred"
            )
        if isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
    return doc


def _parse_value(text: str) -> Any:
    try:
        return load_yaml(text, f"--set value {text[:40]!r}")
    except yaml.YAMLError:
        return text


# Keys holding paths: in a file they are relative to the file, on the command line (--set)
# relative to the current directory, as a user typing them expects.
PATH_KEYS = {
    "data.source",
    "synth.path",
    "store.path",
    "output.model",
    "tune.output",
    "cluster.scheduler_file",
    "cluster.local_directory",
    "cluster.security.ca_file",
    "cluster.security.cert",
    "cluster.security.key",
}


def is_url(path: str) -> bool:
    """Whether ``path`` names its filesystem by protocol (``s3://bucket/key``, ``file:///x``)."""
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", path) is not None


def _from_cwd(value: Any) -> Any:
    if isinstance(value, list):
        return [_from_cwd(v) for v in value]
    if isinstance(value, str) and is_url(value):
        return value
    if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
        return str(Path.cwd() / value)
    return value


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as YAML) to a raw config mapping.

    Relative paths given for the keys in ``PATH_KEYS`` are made absolute from the current
    directory."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        key, _, value = item.partition("=")
        key = key.strip()
        parts = key.split(".")
        node = raw
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {key}: {p} is not a section")
            node = nxt
        parsed = _parse_value(value)
        node[parts[-1]] = _from_cwd(parsed) if key in PATH_KEYS else parsed
    return raw


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    raw: dict[str, Any] | None = None,
) -> Config:
    """Read and validate a config.

    Parameters
    ----------
    path
        YAML file; ``None`` for defaults (optionally with ``raw``).
    overrides
        ``key.path=value`` strings, as given to ``--set``.
    raw
        A mapping used instead of (or, with ``path``, merged over) the file's contents.
    """
    data: dict[str, Any] = {}
    source = "<defaults>"
    base = Path.cwd()
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        if p.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"config file {p} has {p.stat().st_size:,} bytes; a dmf config is at most "
                f"{MAX_CONFIG_BYTES:,}"
            )
        try:
            loaded = load_yaml(p.read_text(), f"config file {p}") or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: the top level must be a mapping of sections")
        data = loaded
        base = p.resolve().parent
    if raw:
        data = merge_mappings(data, raw)
    data = apply_overrides(data, overrides)
    try:
        cfg = Config.model_validate({**data, "base_dir": str(base)})
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None
    return cfg


def merge_mappings(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` laid over ``base``, section by section: nested mappings merge, other values in
    ``over`` replace those in ``base``. Neither argument is changed."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_mappings(out[k], v)
        else:
            out[k] = v
    return out
