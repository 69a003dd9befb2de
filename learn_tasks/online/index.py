"""Milvus item index: one collection per model version behind a stable alias, with rollback and upserts.

Every catalogue item, cold-start items included, is encoded by the item tower of a model version and
loaded into its own collection ``items__<dataset>__<version>`` (item_id INT64 primary key, 64-d
FLOAT_VECTOR, popularity, first_seen, is_cold_start, is_long_tail, title). Only when the collection is
complete, indexed and loaded does the alias ``<index.alias>__<dataset>`` move to it, in one
``alter_alias`` call, so a reader sees the old version or the new one and never half of one. Then the
release record (:mod:`learn_tasks.online.releases`) names the model run and the collection the service
serves. The newest ``index.keep_versions`` collections stay for rollback; the alias target, the released
collection and the previous release's collection are never dropped.

At load time the index is checked against exact search: recall@10 of Milvus' answers against a numpy
brute-force top-10 on a sample of queries (user embeddings of real users when available), recorded
in the collection's properties and the ``index_catalogue`` result.

Where the data lives (``resolve_uri``):

* ``index.uri`` set: a Milvus standalone/cluster server (``index.token`` from ``LEARN_INDEX__TOKEN``);
* else, while ``learn index server start`` runs: the local Milvus Lite server's URI (shared by processes);
* else: Milvus Lite in-process on ``$LEARN_HOME/milvus/milvus.db``. Only one process may open it; a second
  one gets :class:`~learn_tasks.online.milvus_server.IndexLockedError` at once (not a hang) telling it to
  start the shared server.
"""
from __future__ import annotations

import json
import logging
import re
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pandas as pd

from learn_tasks import schema as S
from learn_tasks.config import Settings
from learn_tasks.data import datasets as data
from learn_tasks.data.eventlog_stores import open_log
from learn_tasks.online import features, milvus_server, releases
from learn_tasks.online.bundle import ModelBundle, encode_pending_items, load_new_items
from learn_tasks.online.exact import exact_topk, recall_at_k  # noqa: F401  (index.exact_topk is public)
from learn_tasks.online.index_rows import (SCALARS, TITLE_MAX, VECTOR, ItemRows, fetch_iterator,  # noqa: F401
                                           fetch_ranges, item_rows)
from learn_tasks.online.milvus_server import LITE_GRPC_OPTIONS, IndexStoreError, check_lite_lock
from learn_tasks.pch import registry

if TYPE_CHECKING:
    from pymilvus import MilvusClient

log = logging.getLogger("learn.index")

PROP = "learn."  # prefix of our collection properties


# ==================================================================================================
# Names and connections
# ==================================================================================================
def slug(text: str) -> str:
    """Milvus names allow letters, digits and underscores."""
    return re.sub(r"[^0-9A-Za-z_]", "_", str(text))


def alias_name(cfg: Settings, dataset: str) -> str:
    return f"{slug(cfg.index.alias)}__{slug(dataset)}"


def collection_prefix(dataset: str) -> str:
    return f"items__{slug(dataset)}__"


def collection_name(dataset: str, version: str) -> str:
    return collection_prefix(dataset) + slug(version)


def resolve_uri(cfg: Settings) -> tuple[str, str | None, str]:
    """(uri, token, kind): kind is ``server`` (index.uri), ``lite-server`` (local server) or ``lite``."""
    if cfg.index.uri:
        return cfg.index.uri, cfg.index.token, "server"
    uri = milvus_server.running_uri(cfg)
    if uri:
        return uri, None, "lite-server"
    return str(milvus_server.data_dir(cfg).resolve()), None, "lite"


_clients: dict[tuple[str, str | None], "MilvusClient"] = {}
_clients_lock = threading.Lock()


def connect(cfg: Settings) -> "MilvusClient":
    """A MilvusClient for this configuration, one per (uri, token) per process."""
    uri, token, kind = resolve_uri(cfg)
    with _clients_lock:
        client = _clients.get((uri, token))
        if client is not None:
            return client
        from pymilvus import MilvusClient

        if kind == "lite":
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
            check_lite_lock(uri)
            try:
                client = MilvusClient(uri=uri, grpc_options=LITE_GRPC_OPTIONS)
            except Exception as exc:  # noqa: BLE001 - pymilvus says only "Open local milvus failed"
                check_lite_lock(uri)  # lost a race with another process: say so clearly
                raise IndexStoreError(f"cannot open Milvus Lite at {uri}: {exc}") from exc
        else:
            try:
                client = MilvusClient(uri=uri, token=token or "", timeout=30,
                                      **({"grpc_options": LITE_GRPC_OPTIONS} if kind == "lite-server" else {}))
            except Exception as exc:  # noqa: BLE001
                raise IndexStoreError(f"cannot reach Milvus at {uri}: {exc}") from exc
        _clients[(uri, token)] = client
        return client


def close(cfg: Settings) -> None:
    """Close this process's client; for in-process Milvus Lite also release the data directory lock."""
    uri, token, kind = resolve_uri(cfg)
    with _clients_lock:
        client = _clients.pop((uri, token), None)
    if client is not None:
        client.close()
    if kind == "lite":
        from milvus_lite.server_manager import server_manager_instance  # only where Milvus Lite runs in-process
        server_manager_instance.release_server(uri)


# ==================================================================================================
# What goes in a collection
# ==================================================================================================
def _schema(dim: int):
    from pymilvus import DataType, MilvusClient

    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field(S.ITEM_ID, DataType.INT64, is_primary=True)
    schema.add_field(VECTOR, DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field(S.POPULARITY, DataType.INT64)
    schema.add_field(S.FIRST_SEEN, DataType.INT64)
    schema.add_field(S.IS_COLD_START, DataType.BOOL)
    schema.add_field(S.IS_LONG_TAIL, DataType.BOOL)
    schema.add_field(S.TITLE, DataType.VARCHAR, max_length=TITLE_MAX * 4)  # bytes: room for UTF-8
    return schema


def index_type_for(cfg: Settings, n_rows: int) -> str:
    """The index type of a collection of ``n_rows`` items: FLAT (exact) up to ``index.flat_max_rows``, where a
    brute-force search costs about a millisecond and a graph index only loses recall (the evidence-weighted
    vectors of ``learn_hybrid`` are not unit length, which inner-product HNSW handles worst), else
    ``index.index_type``."""
    limit = cfg.index.flat_max_rows
    return "FLAT" if limit is not None and n_rows <= limit else cfg.index.index_type


def _index_params(client: "MilvusClient", cfg: Settings, n_rows: int):
    kind = index_type_for(cfg, n_rows)
    params = client.prepare_index_params()
    params.add_index(field_name=VECTOR, index_type=kind, metric_type=cfg.index.metric,
                     params=dict(cfg.index.index_params) if kind != "FLAT" else {})
    return params


# ==================================================================================================
# Collections
# ==================================================================================================
def _properties(client: "MilvusClient", name: str) -> dict[str, str]:
    props = client.describe_collection(name).get("properties") or {}
    return {k[len(PROP):]: v for k, v in props.items() if k.startswith(PROP)}


def _set_properties(client: "MilvusClient", name: str, **values: Any) -> None:
    client.alter_collection_properties(name, properties={PROP + k: (v if isinstance(v, str) else json.dumps(v))
                                                         for k, v in values.items()})


def current(cfg: Settings, dataset: str, client: "MilvusClient | None" = None) -> str | None:
    """The collection the dataset's alias points at (None when there is no alias yet)."""
    client = client or connect(cfg)
    alias = alias_name(cfg, dataset)
    if alias not in client.list_aliases().get("aliases", []):
        return None
    return client.describe_alias(alias)["collection_name"]


def collection_version(client: "MilvusClient", name: str) -> str | None:
    """The model version whose item tower wrote ``name`` (a sparse update adopts its base's collection)."""
    return _properties(client, name).get("version") if client.has_collection(name) else None


def adopt(client: "MilvusClient", name: str, version: str, rows: int, meta: dict[str, Any]) -> None:
    """Mark a complete collection as ``version``'s, once a sparse update has rewritten the rows it changed."""
    _set_properties(client, name, version=version, rows=str(rows), meta=json.dumps(meta, default=str))


def versions(cfg: Settings, dataset: str, client: "MilvusClient | None" = None) -> list[dict[str, Any]]:
    """The dataset's collections, oldest first, with their recorded properties and which one is live."""
    client = client or connect(cfg)
    live = current(cfg, dataset, client)
    out = []
    for name in client.list_collections():
        if not name.startswith(collection_prefix(dataset)):
            continue
        props = _properties(client, name)
        out.append({"collection": name, "version": props.get("version", name), "created": props.get("created", ""),
                    "complete": props.get("complete") == "1", "current": name == live,
                    "recall_at_10": float(props["recall_at_10"]) if "recall_at_10" in props else None,
                    "rows": int(props.get("rows", 0))})
    return sorted(out, key=lambda v: (v["created"], v["collection"]))


def swap_alias(client: "MilvusClient", alias: str, collection: str) -> None:
    """Point ``alias`` at ``collection`` in one step (create it the first time)."""
    if alias in client.list_aliases().get("aliases", []):
        client.alter_alias(collection_name=collection, alias=alias)
    else:
        client.create_alias(collection_name=collection, alias=alias)


def ensure_loaded(client: "MilvusClient", name: str, timeout_s: float = 60.0) -> None:
    """Load ``name``, return once loaded (Lite forgets it on reopening; another process's load may be running)."""
    deadline = time.monotonic() + timeout_s
    while str(client.get_load_state(name).get("state")).split(".")[-1].split(":")[0].strip("<> ") != "Loaded":
        if time.monotonic() > deadline:
            raise IndexStoreError(f"collection {name} did not load within {timeout_s:.0f} s")
        client.load_collection(name)  # idempotent; waits for this load


def search(client: "MilvusClient", target: str, queries: np.ndarray, k: int,
           exclude: Sequence[Sequence[int]] | None = None, search_params: dict | None = None,
           output_fields: Sequence[str] = SCALARS) -> list[list[dict[str, Any]]]:
    """Top-k per query: ``[[{"item_id", "score", **scalars}, ...], ...]``, best first.

    ``exclude`` holds item ids to leave out per query (a filter in Milvus, so k results still come back).
    One call per distinct exclusion list; queries without exclusions are batched in one call.
    """
    queries = np.atleast_2d(np.asarray(queries, np.float32))
    out: list[list[dict[str, Any]]] = [[] for _ in range(len(queries))]
    groups: dict[tuple[int, ...], list[int]] = {}
    for q in range(len(queries)):
        ex = tuple(sorted({int(i) for i in (exclude[q] if exclude is not None else [])}))
        groups.setdefault(ex, []).append(q)
    for ex, qs in groups.items():
        kwargs: dict[str, Any] = {}
        if ex:
            kwargs["filter"] = f"{S.ITEM_ID} not in [{', '.join(map(str, ex))}]"
        res = client.search(target, data=[queries[q] for q in qs], limit=k, output_fields=list(output_fields),
                            search_params={"params": dict(search_params or {})}, **kwargs)
        for q, hits in zip(qs, res):
            out[q] = [{S.ITEM_ID: int(h["item_id"] if "item_id" in h else h["id"]), "score": float(h["distance"]),
                       **{f: h["entity"].get(f) for f in output_fields}} for h in hits]
    return out


def measure_recall(client: "MilvusClient", target: str, rows: ItemRows, queries: np.ndarray, k: int = 10,
                   search_params: dict | None = None, batch: int = 64) -> dict[str, Any]:
    """Recall@k of Milvus search against exact numpy search over the same vectors, and Milvus latency."""
    queries = np.atleast_2d(np.asarray(queries, np.float32))
    exact_rows, _ = exact_topk(rows.vectors, queries, k)
    exact = [[int(rows.item_ids[r]) if r >= 0 else -1 for r in qr] for qr in exact_rows]
    found, per_call = [], []
    for lo in range(0, len(queries), batch):
        t0 = time.perf_counter()
        res = search(client, target, queries[lo:lo + batch], k, search_params=search_params, output_fields=())
        per_call.append((time.perf_counter() - t0) / max(len(res), 1))
        found += [[h[S.ITEM_ID] for h in hits] for hits in res]
    return {f"recall_at_{k}": recall_at_k(found, exact, k), "queries": len(queries),
            "search_ms_per_query": 1000 * float(np.mean(per_call)) if per_call else None}


def build(cfg: Settings, dataset: str, version: str, rows: ItemRows, queries: np.ndarray | None = None,
          meta: dict[str, Any] | None = None, swap: bool = True, client: "MilvusClient | None" = None,
          seed: int = 0) -> dict[str, Any]:
    """Create, fill, index and load the collection of ``version``, check recall, then swap the alias.

    Idempotent: a complete collection of the same version is reused (loaded, brought up to date by upsert
    when items were added since, and re-pointed); an incomplete one (an interrupted build) is dropped and
    rebuilt.
    """
    client = client or connect(cfg)
    name = collection_name(dataset, version)
    if client.has_collection(name) and collection_version(client, name) not in (None, version):
        # A sparse update took this version's collection over: rebuild it under another name (once).
        own = [v["collection"] for v in versions(cfg, dataset, client) if v["version"] == version]
        name = own[-1] if own else f"{name}_r{datetime.now(timezone.utc):%Y%m%d%H%M%S}"
    alias = alias_name(cfg, dataset)
    t0 = time.perf_counter()
    reused = False
    if client.has_collection(name):
        props = _properties(client, name)
        if props.get("complete") == "1":
            reused = True
            if int(props.get("rows", -1)) != len(rows):  # items added online or to the catalogue since
                step = max(1, int(cfg.index.insert_batch))
                for lo in range(0, len(rows), step):
                    client.upsert(name, rows.records(lo, min(lo + step, len(rows))))
                client.flush(name)
                _set_properties(client, name, rows=str(len(rows)))
        else:
            if current(cfg, dataset, client) == name:
                raise IndexStoreError(f"{name} is live behind {alias} but incomplete; roll back first")
            client.drop_collection(name)
    if not reused:
        client.create_collection(name, schema=_schema(rows.vectors.shape[1]), index_params=_index_params(client, cfg, len(rows)),
                                 consistency_level="Strong")
        _set_properties(client, name, dataset=dataset, version=version, complete="0",
                        created=datetime.now(timezone.utc).isoformat(timespec="microseconds"))
        step = max(1, int(cfg.index.insert_batch))
        for lo in range(0, len(rows), step):
            client.insert(name, rows.records(lo, min(lo + step, len(rows))))
        client.flush(name)
    ensure_loaded(client, name)
    load_s = time.perf_counter() - t0

    rng = np.random.default_rng(seed)
    if queries is None or len(queries) == 0:  # fall back to item vectors as queries
        pick = rng.choice(len(rows), size=min(cfg.index.recall_queries, len(rows)), replace=False)
        queries = rows.vectors[pick]
    elif len(queries) > cfg.index.recall_queries:
        queries = queries[rng.choice(len(queries), size=cfg.index.recall_queries, replace=False)]
    check = measure_recall(client, name, rows, queries, k=10, search_params=cfg.index.search_params)
    if not reused:
        _set_properties(client, name, complete="1", rows=str(len(rows)), recall_at_10=str(check["recall_at_10"]),
                        meta=json.dumps(meta or {}, default=str))
    previous = current(cfg, dataset, client)
    if swap:
        swap_alias(client, alias, name)
    dropped = prune(cfg, dataset, client) if swap else []
    return {"dataset": dataset, "version": version, "collection": name, "alias": alias, "rows": len(rows),
            "dim": int(rows.vectors.shape[1]), "index_type": index_type_for(cfg, len(rows)), "metric": cfg.index.metric,
            "index_recall_at_10": check["recall_at_10"], "recall_queries": check["queries"],
            "search_ms_per_query": check["search_ms_per_query"], "load_s": load_s, "reused": reused,
            "previous": previous, "swapped": swap, "dropped": dropped, "uri_kind": resolve_uri(cfg)[2]}


def prune(cfg: Settings, dataset: str, client: "MilvusClient | None" = None) -> list[str]:
    """Drop the oldest collections beyond ``index.keep_versions``; never the live one, the released one or
    the previous release's (a service still answering from it while it swaps)."""
    client = client or connect(cfg)
    vs = versions(cfg, dataset, client)
    keep = max(1, int(cfg.index.keep_versions))
    newest = {v["collection"] for v in vs[-keep:]} | releases.protected_collections(cfg, dataset)
    dropped = []
    for v in vs:
        if v["collection"] not in newest and not v["current"]:
            client.drop_collection(v["collection"])
            dropped.append(v["collection"])
    return dropped


def rollback(cfg: Settings, dataset: str, to: str | None = None, client: "MilvusClient | None" = None,
             source: str = "learn index rollback", require_model: bool = False) -> dict[str, Any]:
    """Point the alias back at ``to`` (a version or collection name) or at the version before the live one,
    and release it (the service follows) when its model run still exists; with ``require_model`` a
    missing model run is an error before anything moves."""
    client = client or connect(cfg)
    vs = [v for v in versions(cfg, dataset, client) if v["complete"]]
    live = current(cfg, dataset, client)
    if to is not None:
        match = [v for v in vs if to in (v["version"], v["collection"])]
        if not match:
            raise IndexStoreError(f"no complete index version {to!r} for {dataset}; have "
                                  f"{[v['version'] for v in vs]}")
        target = match[0]
    else:
        names = [v["collection"] for v in vs]
        if live not in names or names.index(live) == 0:
            raise IndexStoreError(f"nothing to roll back to for {dataset}: live={live}, versions={names}")
        target = vs[names.index(live) - 1]
    has_model = registry.find_run(cfg, dataset, target["version"]) is not None
    if require_model and not has_model:
        raise IndexStoreError(f"index version {target['version']} of {dataset} has no complete model run under "
                              f"{registry.dataset_models(cfg, dataset)}: it cannot be served again")
    ensure_loaded(client, target["collection"])
    swap_alias(client, alias_name(cfg, dataset), target["collection"])
    rel = release(cfg, dataset, target["collection"], source=source, client=client) if has_model else None
    return {"dataset": dataset, "from": live, "to": target["collection"], "version": target["version"],
            "release_id": rel["release_id"] if rel else None}


def verify_collection(client: "MilvusClient", name: str) -> dict[str, Any]:
    """Check a collection can be served: it exists, its load completed (``complete``), it is loaded in
    Milvus and holds at least the rows its load wrote. Returns its recorded properties."""
    if not client.has_collection(name):
        raise IndexStoreError(f"collection {name} does not exist")
    props = _properties(client, name)
    if props.get("complete") != "1":
        raise IndexStoreError(f"collection {name} is incomplete (an interrupted load): it cannot be released")
    ensure_loaded(client, name)
    expected = int(props.get("rows", 0))
    # An empty filter counts from segment statistics; any filter makes Milvus evaluate it row by row (30x slower).
    got = client.query(name, filter="", output_fields=["count(*)"])
    have = int(got[0]["count(*)"]) if got else 0
    if expected <= 0 or have < expected:
        raise IndexStoreError(f"collection {name} holds {have} rows, its load wrote {expected}")
    return props


def release(cfg: Settings, dataset: str, collection: str, source: str, run_key: str | None = None,
            client: "MilvusClient | None" = None) -> dict[str, Any]:
    """Release ``collection`` (and the model run it was built from) to the service, once checked.

    Returns the release record, with ``new`` = False when it was already the current release.
    """
    client = client or connect(cfg)
    props = verify_collection(client, collection)
    version = props.get("version") or collection[len(collection_prefix(dataset)):]
    run_dir = registry.find_run(cfg, dataset, version) or registry.dataset_models(cfg, dataset) / version
    if not (run_dir / registry.META).exists():
        raise IndexStoreError(f"collection {collection} was built from model {version}, which has no complete run "
                              f"under {run_dir.parent}")
    recall = props.get("recall_at_10")
    rec, new = releases.write(cfg, dataset, version, collection, source=source, run_key=run_key,
                              alias=alias_name(cfg, dataset), rows=int(props.get("rows", 0)),
                              index_recall_at_10=float(recall) if recall else None)
    return {**rec, "new": new}


def upsert(cfg: Settings, dataset: str, rows: ItemRows, target: str | None = None,
           client: "MilvusClient | None" = None) -> dict[str, Any]:
    """Insert or replace items in the live collection (or ``target``); searchable when this returns."""
    client = client or connect(cfg)
    target = target or current(cfg, dataset, client)
    if target is None:
        raise IndexStoreError(f"no index for {dataset}: run `learn index --dataset {dataset}` first")
    client.upsert(target, rows.records())
    return {"collection": target, "upserted": len(rows)}



def fetch_all(client: "MilvusClient", target: str, batch: int = 4096, vectors_only: bool = False,
              expected_ids: np.ndarray | None = None) -> ItemRows:
    """Every row of a collection (vectors included), sorted by item id; ``vectors_only``: ids and vectors
    (the other columns get their defaults), a fraction of the transfer.

    ``expected_ids``: ids the caller expects to find (the catalogue). They cut the whole id space into
    consecutive ranges of about ``2 * batch`` expected rows, read with one query each: two to three times
    faster than Milvus' query iterator, and still every row (ids the caller did not expect included).
    Should a range come back at Milvus' result limit, the iterator reads the collection instead.
    """
    ensure_loaded(client, target)
    fields = [S.ITEM_ID, VECTOR, *(() if vectors_only else SCALARS)]
    if expected_ids is not None and len(expected_ids):
        recs = fetch_ranges(client, target, np.unique(np.asarray(expected_ids, np.int64)), 2 * batch, fields)
        if recs is not None:
            return item_rows(recs, vectors_only)
    # Milvus Lite lacks the timestamp RPC the iterator tries first; it falls back by itself, so keep
    # its error and warning out of the logs.
    quiet = [logging.getLogger(n) for n in ("grpc._server", "pymilvus")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.CRITICAL)
    try:
        return item_rows(fetch_iterator(client, target, batch, fields), vectors_only)
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)


# ==================================================================================================
# From a model version to an index (needs the model modules)
# ==================================================================================================
def stat_columns(stats: pd.DataFrame, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Popularity, cold-start and long-tail columns of ``ids`` from a run's ``items.parquet`` (indexed by item
    id): items the model never saw are cold-start, popularity 0, not long-tail."""
    st = stats.reindex(ids)
    return (st[S.POPULARITY].fillna(0).astype(np.int64).to_numpy(),
            st[S.IS_COLD_START].astype("boolean").fillna(True).to_numpy(bool),
            st[S.IS_LONG_TAIL].astype("boolean").fillna(False).to_numpy(bool))


def first_seen(cfg: Settings, dataset: str, item_ids: np.ndarray) -> np.ndarray:
    """Epoch seconds of each item's first event (0 = never), from the Feast item table when it is built."""
    path = features.store_dir(cfg, dataset) / "data" / "item_stats.parquet"
    if path.exists():
        stats = pd.read_parquet(path, columns=[S.ITEM_ID, S.FIRST_SEEN])
    else:
        inter = data.load_interactions(cfg, dataset)
        stats = pd.DataFrame({S.ITEM_ID: inter[S.ITEM_ID].to_numpy(),
                              S.FIRST_SEEN: features.epoch_seconds(inter[S.EVENT_TIMESTAMP])})
        stats = stats.groupby(S.ITEM_ID, as_index=False)[S.FIRST_SEEN].min()
    return stats.set_index(S.ITEM_ID)[S.FIRST_SEEN].reindex(item_ids).fillna(0).astype(np.int64).to_numpy()


def index_catalogue(cfg: Settings, dataset: str, run_dir: str | Path | None = None,
                    swap: bool = True, source: str = "learn index", run_key: str | None = None) -> dict[str, Any]:
    """Index every catalogue item (and every item added online) with the item tower of ``run_dir``.

    ``run_dir`` defaults to the promoted model. Popularity, cold-start and long-tail flags are the model's
    own (its training interactions, from the checkpoint's items.parquet), so a badge says what the model
    saw; first_seen comes from the Feast item table. Items without any text (quarantined by ``learn
    encode``) have no content embedding and cannot be indexed: they are counted in ``skipped``.

    With ``swap`` the loaded and checked collection is released (``release``), so the service follows
    (a run folder outside the dataset's models cannot be served, so it is indexed but not released).
    """
    run_dir = Path(run_dir) if run_dir is not None else registry.promoted(cfg, dataset)
    if run_dir is None:
        raise IndexStoreError(f"no promoted model for {dataset}: train and promote one, or pass --run-dir")
    bundle = ModelBundle.load(cfg, dataset, run_dir)
    items = data.load_items(cfg, dataset)
    if bundle.uses_content:  # items saved online but never encoded (the service stopped in between)
        with open_log(cfg) as log:
            encode_pending_items(cfg, dataset, log, skip=bundle.knows)
    new_items, new_content = load_new_items(cfg, dataset)
    if len(new_items) and bundle.uses_content:
        bundle.extra.update({int(i): c for i, c in zip(new_items[S.ITEM_ID], new_content)})
    catalogue = items
    if len(new_items):
        catalogue = pd.concat([items, new_items[~new_items[S.ITEM_ID].isin(items[S.ITEM_ID])]], ignore_index=True)
    catalogue = catalogue.drop_duplicates(S.ITEM_ID).sort_values(S.ITEM_ID)
    all_ids = catalogue[S.ITEM_ID].to_numpy(np.int64)
    usable = np.array([bundle.knows(i) or not bundle.uses_content for i in all_ids], bool)
    item_ids = all_ids[usable]
    titles = catalogue[S.TITLE].to_numpy()[usable].tolist() if S.TITLE in catalogue else None
    popularity, cold, tail = stat_columns(bundle.stats, item_ids)
    rows = ItemRows(item_ids=item_ids, vectors=bundle.item_vectors(item_ids), popularity=popularity,
                    first_seen=first_seen(cfg, dataset, item_ids), is_cold_start=cold, is_long_tail=tail, titles=titles)
    # Recall is checked on the queries the index will really get: user embeddings of sampled users.
    inter = data.load_interactions(cfg, dataset)
    queries = bundle.sample_user_vectors(inter, cfg.index.recall_queries, seed=cfg.train.seed)
    result = build(cfg, dataset, bundle.version, rows, queries=queries, swap=swap,
                   meta={"run_dir": str(run_dir), "model_kind": bundle.kind})
    if swap and registry.find_run(cfg, dataset, bundle.version) is not None:
        rel = release(cfg, dataset, result["collection"], source=source, run_key=run_key)
        result["release"] = {k: rel[k] for k in ("release_id", "model_version", "collection", "new")}
    return {**result, "run_dir": str(run_dir), "skipped": int((~usable).sum()),
            "skipped_item_ids": all_ids[~usable][:20].tolist(), "new_items": int(len(new_items))}
