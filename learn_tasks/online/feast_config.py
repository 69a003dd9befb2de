"""The Feast store of a dataset: where it lives, which stores it uses, and the ``feature_repo/`` definitions.

Every dataset has its own store directory, the Feast repo path of that store
(``$LEARN_HOME/feast/<dataset>/``), and its own Feast project (:func:`project_name`), which namespaces
its Redis keys, its SQL registry rows and, with the PostgreSQL offline store, its PostgreSQL schema.

Three stores make a Feast store, chosen by ``features.*`` settings:

* online: ``sqlite`` (embedded) or ``redis`` (production);
* registry: ``file`` (embedded) or ``sql`` (production, PostgreSQL);
* offline: ``file`` (the Parquet tables under the store directory) or ``postgres`` (the same tables in
  PostgreSQL, read by Feast's PostgreSQL offline store; production only).

Connection strings come from the environment only (``LEARN_FEATURES__REDIS_URL``,
``LEARN_FEATURES__REGISTRY_URL``, ``LEARN_FEATURES__OFFLINE_URL``) and stay ``${...}`` placeholders in
the rendered ``feature_store.yaml``, which ``feast`` expands when it reads the file.

The definitions in ``feature_repo/`` serve both offline stores: ``data_sources.py`` reads
``LEARN_FEAST_OFFLINE_STORE`` (set by :func:`load_definitions` while it imports them) and builds
PostgreSQL or Parquet sources under the same names, so the feature views are written once.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import re
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from learn_tasks.config import REPO_ROOT, Settings, load_settings
from learn_tasks.storage import read_json, write_text

if TYPE_CHECKING:  # feast is heavy; imported where used
    from feast import FeatureStore

FEATURE_REPO = REPO_ROOT / "feature_repo"
DEFINITION_MODULES = ("entities", "data_sources", "feature_views", "feature_services")  # import order
USER_RECENT_VIEW, USER_ACTIVITY_VIEW, ITEM_STATS_VIEW = "user_recent_items", "user_activity", "item_stats"
ITEM_STATS_SERVICE = "item_stats_v1"
TABLES = {USER_RECENT_VIEW: "user_recent", USER_ACTIVITY_VIEW: "user_activity", ITEM_STATS_VIEW: "item_stats"}
OFFLINE_STORE_ENV = "LEARN_FEAST_OFFLINE_STORE"  # read by feature_repo/data_sources.py
REDIS_ENV, REGISTRY_ENV, OFFLINE_ENV = ("LEARN_FEATURES__REDIS_URL", "LEARN_FEATURES__REGISTRY_URL",
                                        "LEARN_FEATURES__OFFLINE_URL")
_ENV = {"LEARN_FEAST_PROJECT", REDIS_ENV, REGISTRY_ENV, OFFLINE_ENV}
# The offline_store block of the production template, replaced by the file store when it is selected.
_OFFLINE_BLOCK = re.compile(r"^offline_store:\n(?:[ \t]+.*\n)*", re.M)


class FeaturesError(RuntimeError):
    """A feature store that cannot be built or read, with what to do about it."""


def store_dir(cfg: Settings, dataset: str) -> Path:
    return cfg.paths.feast() / dataset


def project_name(dataset: str) -> str:
    """Feast project of a dataset: namespaces Redis keys, SQL registry rows and offline tables per dataset."""
    return "learn_" + re.sub(r"[^0-9A-Za-z_]", "_", dataset).strip("_").lower()


def state_path(cfg: Settings, dataset: str) -> Path:
    """``state.json`` of the store: what was written, applied and materialised (idempotence)."""
    return store_dir(cfg, dataset) / "state.json"


def load_state(cfg: Settings, dataset: str) -> dict[str, Any]:
    path = state_path(cfg, dataset)
    return read_json(path) if path.exists() else {}


def offline_url(cfg: Settings) -> str | None:
    """PostgreSQL URL of the offline tables: ``features.offline_url``, else the registry's database."""
    return cfg.features.offline_url or cfg.features.registry_url


def _production(cfg: Settings) -> bool:
    f = cfg.features
    production = f.online_store == "redis" or f.registry == "sql"
    if production and not (f.online_store == "redis" and f.registry == "sql"):
        raise FeaturesError("the production feature store uses both Redis (features.online_store=redis) and "
                            "a SQL registry (features.registry=sql); set both or neither")
    if f.offline_store == "postgres" and not production:
        raise FeaturesError("features.offline_store=postgres is part of the production feature store: set "
                            "features.online_store=redis and features.registry=sql too, or use the file store")
    return production


def _template(cfg: Settings) -> Path:
    return FEATURE_REPO / ("feature_store.production.yaml" if _production(cfg) else "feature_store.yaml")


def _env_values(cfg: Settings, dataset: str) -> dict[str, str]:
    values = {"LEARN_FEAST_PROJECT": project_name(dataset), REDIS_ENV: cfg.features.redis_url}
    if cfg.features.registry == "sql":
        if not cfg.features.registry_url:
            raise FeaturesError(f"features.registry=sql needs {REGISTRY_ENV} "
                                "(e.g. postgresql+psycopg2://user@127.0.0.1:5432/postgres) in the environment")
        values[REGISTRY_ENV] = cfg.features.registry_url
    if cfg.features.offline_store == "postgres":
        url = offline_url(cfg)
        if not url:
            raise FeaturesError(f"features.offline_store=postgres needs {OFFLINE_ENV} (or {REGISTRY_ENV}, whose "
                                "database then holds the offline tables too) in the environment")
        values[OFFLINE_ENV] = url
    return values


def _substitute(text: str, values: dict[str, str]) -> str:
    def repl(m: re.Match) -> str:
        name = m.group(1)
        if name not in values:
            raise FeaturesError(f"{name} is not set (feature_store.yaml placeholder)")
        return values[name]

    return re.sub(r"\$\{([A-Z0-9_]+)\}", repl, text)


def template_text(cfg: Settings) -> str:
    """The store's feature_store.yaml before substitution, with the offline store the settings select."""
    text = _template(cfg).read_text(encoding="utf-8")
    if cfg.features.offline_store == "file" and _production(cfg):
        text = _OFFLINE_BLOCK.sub("offline_store:\n  type: file\n", text)
    return text


_import_lock = threading.Lock()


def import_feast(cfg: Settings | None = None) -> None:
    """Import Feast in this process, without typeguard's ``@typechecked`` instrumentation of its classes
    unless ``features.feast_type_checks`` (``cfg``'s, else the environment's settings).

    Feast decorates its public classes with ``@typechecked``, which re-parses and recompiles every method
    while Feast is imported: about half of the import's time, paid by every task and server that opens a
    store. Without it, Feast runs as it does under ``python -O`` (where ``@typechecked`` is a no-op by
    typeguard's design). Only the import of Feast itself is affected: the decorator is swapped for the
    duration of that import and restored, so other packages keep their checks. The modules learn uses are
    imported in that window (the PostgreSQL source too, with ``features.offline_store: postgres``); a Feast
    module first imported later keeps its checks. A no-op once Feast is imported (a process that imported it
    first keeps whatever it got).
    """
    with _import_lock:  # two threads must not both swap the decorator (the second would restore the no-op)
        if "feast" in sys.modules:
            return
        if cfg is None:
            cfg = load_settings()
        if cfg.features.feast_type_checks:
            import feast  # noqa: F401
            return
        import typeguard

        checked = typeguard.typechecked
        typeguard.typechecked = _unchecked
        try:
            import feast  # noqa: F401
            if cfg.features.offline_store == "postgres":
                import feast.infra.offline_stores.contrib.postgres_offline_store.postgres_source  # noqa: F401
        finally:
            typeguard.typechecked = checked


def _unchecked(target: Any = None, **_: Any) -> Any:
    """``typeguard.typechecked`` as it is under ``python -O``: the target unchanged (also as ``@typechecked()``)."""
    return target if target is not None else (lambda t: t)


def repo_config(cfg: Settings, dataset: str, write: bool = True):
    """The Feast RepoConfig of a dataset's store; also renders its feature_store.yaml for the ``feast`` CLI.

    The rendered file fills in the project only; connection strings stay ``${...}`` so no secret is
    written to disk (``feast`` expands them from the environment when it reads the file). When the
    offline tables live in the registry's database (``features.offline_url`` unset), the offline URL
    placeholder becomes ``${LEARN_FEATURES__REGISTRY_URL}``, so the file needs no variable learn did not.
    """
    import_feast(cfg)
    from feast.repo_config import RepoConfig

    root = store_dir(cfg, dataset).absolute()  # a relative LEARN_HOME must not be joined to the repo path again
    text = template_text(cfg)
    values = _env_values(cfg, dataset)
    if write:
        kept = {k: "${%s}" % k for k in _ENV - {"LEARN_FEAST_PROJECT"}}
        if not cfg.features.offline_url:
            kept[OFFLINE_ENV] = "${%s}" % REGISTRY_ENV
        rendered = _substitute(text, {"LEARN_FEAST_PROJECT": values["LEARN_FEAST_PROJECT"]} | kept)
        target = root / "feature_store.yaml"
        if not target.exists() or target.read_text(encoding="utf-8") != rendered:
            write_text(rendered, target)
    raw = yaml.safe_load(_substitute(text, values))
    # Absolute paths for the embedded stores, so the store works whatever the working directory.
    if isinstance(raw.get("registry"), str):
        raw["registry"] = str(root / raw["registry"])
    if raw.get("online_store", {}).get("type") == "sqlite":
        raw["online_store"]["path"] = str(root / raw["online_store"]["path"])
    conf = RepoConfig(**raw)
    conf.repo_path = root
    return conf


def get_store(cfg: Settings, dataset: str) -> "FeatureStore":
    """A FeatureStore on the dataset's store directory (file data sources resolve under it)."""
    import_feast(cfg)
    from feast import FeatureStore

    root = store_dir(cfg, dataset)
    root.mkdir(parents=True, exist_ok=True)
    return FeatureStore(repo_path=str(root), config=repo_config(cfg, dataset))


_definitions_lock = threading.Lock()


def load_definitions(repo: Path = FEATURE_REPO, offline_store: str = "file",
                     cfg: Settings | None = None) -> dict[str, list]:
    """Import the Feast objects of ``feature_repo/`` the way ``feast apply`` does (each file as a module).

    The files import each other by plain module name (``from entities import user``), as ``feast apply``
    requires; they are imported with the repo folder on ``sys.path`` and removed from ``sys.modules``
    afterwards so they never shadow anything else. ``offline_store`` (``file`` or ``postgres``) is handed
    to ``data_sources.py`` through ``LEARN_FEAST_OFFLINE_STORE`` for the duration of the import.
    """
    import_feast(cfg)
    from feast import Entity, FeatureService, FeatureView
    from feast.data_source import DataSource

    found: dict[str, list] = {"entities": [], "data_sources": [], "feature_views": [], "feature_services": []}
    kinds = (("entities", Entity), ("feature_views", FeatureView), ("feature_services", FeatureService),
             ("data_sources", DataSource))
    with _definitions_lock:
        saved_path = list(sys.path)
        saved_modules = {name: sys.modules.pop(name) for name in DEFINITION_MODULES if name in sys.modules}
        saved_env = os.environ.get(OFFLINE_STORE_ENV)
        os.environ[OFFLINE_STORE_ENV] = offline_store
        sys.path.insert(0, str(repo))
        try:
            for name in DEFINITION_MODULES:
                module = importlib.import_module(name)
                if Path(module.__file__).resolve().parent != repo.resolve():
                    raise FeaturesError(f"module {name!r} resolved to {module.__file__}, not {repo}")
                for attr in sorted(vars(module)):
                    obj = getattr(module, attr)
                    for key, kind in kinds:
                        if isinstance(obj, kind) and not any(obj is o for o in found[key]):
                            found[key].append(obj)
                            break
        finally:
            sys.path[:] = saved_path
            if saved_env is None:
                os.environ.pop(OFFLINE_STORE_ENV, None)
            else:
                os.environ[OFFLINE_STORE_ENV] = saved_env
            for name in DEFINITION_MODULES:
                sys.modules.pop(name, None)
            sys.modules.update(saved_modules)
    return found


def definitions_hash(repo: Path = FEATURE_REPO) -> str:
    h = hashlib.sha256()
    for path in sorted(repo.glob("*.py")) + sorted(repo.glob("*.yaml")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def store_identity(cfg: Settings, dataset: str) -> str:
    """Which physical stores a state record refers to (no secrets: hashed)."""
    f = cfg.features
    key = f"{project_name(dataset)}|{f.online_store}|{f.registry}"
    if f.online_store == "redis":
        key += "|" + hashlib.sha256(f.redis_url.encode()).hexdigest()[:12]
    if f.registry == "sql":
        key += "|" + hashlib.sha256((f.registry_url or "").encode()).hexdigest()[:12]
    if f.offline_store == "postgres":  # the file store adds nothing: its tables live in the store directory
        key += "|postgres|" + hashlib.sha256((offline_url(cfg) or "").encode()).hexdigest()[:12]
    return key
