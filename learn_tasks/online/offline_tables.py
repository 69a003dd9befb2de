"""The feature tables in PostgreSQL, where Feast's PostgreSQL offline store reads them.

With ``features.offline_store: postgres`` the three feature tables (``user_recent``, ``user_activity``,
``item_stats``; columns as in the Parquet files) live in the schema named after the dataset's Feast
project, so datasets sharing a database never meet. :func:`sync_tables` makes a schema's tables equal to
freshly built ones, idempotently and in one transaction: each table is staged with ``COPY`` and merged
into the stored one (insert new keys, update rows whose values differ, delete keys the new table no
longer has), so a re-run, or a run after a crash, changes nothing more.

Keys: the user tables by (user id, event_timestamp), one row per user and event time as in Parquet.
``item_stats`` by item id alone, and an item's ``event_timestamp`` moves to the new window end only when
its values change (or when the window end moved back before it): a materialisation of the time range
since the last one then holds exactly the items whose statistics moved, not the whole catalogue (the
Parquet table stamps every item at the window end).

A table ``learn_feature_tables`` in the same schema records the fingerprint of the data each table was
last synced from, so the caller can tell an up-to-date schema from one to sync (a new database, say).
Connection URLs are SQLAlchemy or libpq URLs (``postgresql+psycopg2://user:password@host:5432/db``);
they are parsed here and never logged.
"""
from __future__ import annotations

import logging
from datetime import datetime
from typing import TYPE_CHECKING, Any, Iterator
from urllib.parse import parse_qsl, unquote, urlsplit

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from learn_tasks import postgres
from learn_tasks import schema as S
from learn_tasks.online import feature_delta
from learn_tasks.online.feast_config import FeaturesError

if TYPE_CHECKING:  # psycopg loads only when PostgreSQL is used: the file offline store never needs it
    import psycopg
    from psycopg import sql

log = logging.getLogger("learn.features")

META_TABLE = "learn_feature_tables"
KEYS = {"user_recent": (S.USER_ID, S.EVENT_TIMESTAMP), "user_activity": (S.USER_ID, S.EVENT_TIMESTAMP),
        "item_stats": (S.ITEM_ID,)}
_SCHEMES = ("postgresql", "postgres")
_FORMATTED = {"timestamptz": "timestamp with time zone"}  # how PostgreSQL's format_type() names our types
_COPY_BATCH = 50_000  # rows converted to Python values at a time (bounded memory on large tables)


class OfflineTablesError(FeaturesError):
    """A PostgreSQL offline store that cannot be reached or written, with what to do about it."""


# ==================================================================================================
# Connections
# ==================================================================================================
def connection_fields(url: str) -> dict[str, Any]:
    """host, port, database, user, password and sslmode of a PostgreSQL URL (Feast's PostgreSQL config fields).

    Accepts ``postgresql://`` and ``postgres://`` with an optional SQLAlchemy driver (``+psycopg2``,
    ``+psycopg``); ``sslmode`` comes from the query string, else libpq's default ``prefer``.
    """
    if (url or "").startswith("${"):  # a feature_store.yaml placeholder Feast could not expand
        raise OfflineTablesError(f"the offline store URL is the placeholder {url}: "
                                 "set that variable in the environment")
    parts = urlsplit(url or "")
    scheme = parts.scheme.split("+", 1)[0]
    if scheme not in _SCHEMES or not parts.hostname or not parts.path.strip("/"):
        raise OfflineTablesError("the offline store URL must look like postgresql://user:password@host:5432/database "
                                 f"(scheme {parts.scheme or '(none)'!r}, host {parts.hostname or '(none)'!r}, "
                                 f"database {parts.path.strip('/') or '(none)'!r})")
    query = dict(parse_qsl(parts.query))
    try:
        port = parts.port or 5432
    except ValueError as exc:
        raise OfflineTablesError(f"the offline store URL has a bad port: {exc}") from None
    return {"host": parts.hostname, "port": port, "database": unquote(parts.path.strip("/")),
            "user": unquote(parts.username or ""), "password": unquote(parts.password or ""),
            "sslmode": query.get("sslmode", "prefer")}


def connect(url: str) -> psycopg.Connection:
    """A psycopg 3 connection (Feast's PostgreSQL store uses psycopg 3; the other stores psycopg2)."""
    import psycopg

    f = connection_fields(url)
    try:
        return psycopg.connect(host=f["host"], port=f["port"], dbname=f["database"], user=f["user"] or None,
                               password=f["password"] or None, sslmode=f["sslmode"],
                               connect_timeout=postgres.CONNECT_TIMEOUT_S, application_name="learn feature tables",
                               **postgres.KEEPALIVES)
    except psycopg.OperationalError as exc:
        raise OfflineTablesError(f"cannot connect to the offline store at {postgres.redact(url)}: {exc}") from exc


# ==================================================================================================
# Writing
# ==================================================================================================
def _pg_type(field: pa.Field) -> str:
    t = field.type
    if pa.types.is_int64(t):
        return "bigint"
    if pa.types.is_boolean(t):
        return "boolean"
    if pa.types.is_timestamp(t):
        return "timestamptz"
    if (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_int64(t.value_type):
        return "bigint[]"
    raise OfflineTablesError(f"column {field.name!r}: no PostgreSQL type for Arrow type {t}")


def _python_columns(table: pa.Table) -> Iterator[list[tuple]]:
    """The rows of ``table`` as tuples of Python values, in batches (what COPY writes)."""
    for batch in table.to_batches(max_chunksize=_COPY_BATCH):
        columns = []
        for field, col in zip(batch.schema, batch.columns):
            if pa.types.is_timestamp(field.type):
                values = pd.DatetimeIndex(col.to_numpy(zero_copy_only=False)).tz_localize("UTC").to_pydatetime()
            elif pa.types.is_list(field.type) or pa.types.is_large_list(field.type):
                flat = col.flatten().to_numpy().tolist()
                offsets = col.offsets.to_numpy()
                values = [flat[offsets[i]:offsets[i + 1]] for i in range(len(col))]
            else:
                values = col.to_numpy(zero_copy_only=False).tolist()
            columns.append(values)
        yield list(zip(*columns))


def _columns(cur: psycopg.Cursor, schema: str, table: str) -> list[tuple[str, str]]:
    cur.execute("SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
                "JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped "
                "ORDER BY a.attnum", (schema, table))
    return [(name, kind) for name, kind in cur.fetchall()]


def _earliest(table: pa.Table) -> int:
    ts = table.column(S.EVENT_TIMESTAMP).cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
    return int(pc.min(ts).as_py()) if table.num_rows else 2 ** 62


def _latest(table: pa.Table) -> int:
    ts = table.column(S.EVENT_TIMESTAMP).cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
    return int(pc.max(ts).as_py()) if table.num_rows else -(2 ** 62)


def _copy(cur: psycopg.Cursor, target: sql.Composable, cols: list[tuple[str, str]], table: pa.Table) -> None:
    """Binary ``COPY`` of ``table``'s columns ``cols`` into ``target``."""
    from psycopg import sql

    col_ids = sql.SQL(", ").join(sql.Identifier(c) for c, _ in cols)
    with cur.copy(sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(target, col_ids)) as copy:
        copy.set_types([t for _, t in cols])
        for rows in _python_columns(table.select([c for c, _ in cols])):
            for row in rows:
                copy.write_row(row)


def _merge_table(cur: psycopg.Cursor, schema: str, name: str, table: pa.Table,
                 base: pa.Table | None) -> dict[str, int]:
    """Make ``schema.name`` equal ``table`` (see the module doc); counts of rows sent, written and deleted.

    ``base``: the table the stored one equals (its fingerprint is recorded), or None. With it only the
    difference is sent (:func:`feature_delta.table_delta`); without it, every row, and the stored rows
    whose keys are not among them are deleted.
    """
    from psycopg import sql

    keys = KEYS[name]
    missing = [k for k in keys if k not in table.column_names]
    if missing:
        raise OfflineTablesError(f"feature table {name!r} lacks key column(s) {missing}")
    cols = [(f.name, _pg_type(f)) for f in table.schema]
    updated = [c for c, _ in cols if c not in keys]
    values = [c for c in updated if c != S.EVENT_TIMESTAMP]  # item_stats: the stamp moves only with them
    target = sql.Identifier(schema, name)
    if _columns(cur, schema, name) not in ([], [(c, _FORMATTED.get(t, t)) for c, t in cols]):
        # Another column set (the definitions changed): the table is rebuilt from this one.
        log.info("offline table %s.%s: columns changed, recreating it", schema, name)
        cur.execute(sql.SQL("DROP TABLE {}").format(target))
        base = None
    cur.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} ({}, PRIMARY KEY ({}))").format(
        target, sql.SQL(", ").join(sql.SQL("{} {} NOT NULL").format(sql.Identifier(c), sql.SQL(t)) for c, t in cols),
        sql.SQL(", ").join(map(sql.Identifier, keys))))
    # Feast selects a time range of every table when it materialises.
    cur.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} ({})").format(
        sql.Identifier(f"{name}_{S.EVENT_TIMESTAMP}_idx"), target, sql.Identifier(S.EVENT_TIMESTAMP)))

    total, gone = table.num_rows, None
    stamp_moves = S.EVENT_TIMESTAMP in updated  # item_stats: one row per key, stamped as of the window end
    if stamp_moves and base is not None and _earliest(table) < _latest(base):
        base = None  # the window end moved back: every stamp must come down with it, so send every row
    if base is not None and base.schema.names == table.schema.names:
        upsert, delete = feature_delta.table_delta(table, base, keys, values)
        table, gone = table.filter(pa.array(upsert)), base.filter(pa.array(delete)).select(list(keys))
    stage = sql.Identifier(f"stage_{name}")
    cur.execute(sql.SQL("CREATE TEMP TABLE {} (LIKE {}) ON COMMIT DROP").format(stage, target))
    _copy(cur, stage, cols, table)
    col_ids = sql.SQL(", ").join(sql.Identifier(c) for c, _ in cols)
    # Rows change when their values do; a kept stamp never stays later than the new one (a window that
    # moved back), so a materialisation of the new window always reaches every row.
    later = sql.SQL(" OR t.{ts} > EXCLUDED.{ts}").format(ts=sql.Identifier(S.EVENT_TIMESTAMP)) if stamp_moves \
        else sql.SQL("")
    cur.execute(sql.SQL("INSERT INTO {t} AS t ({cols}) SELECT {cols} FROM {s} ON CONFLICT ({keys}) DO UPDATE SET {set} "
                        "WHERE ({old}) IS DISTINCT FROM ({new}){later}").format(
        t=target, s=stage, cols=col_ids, keys=sql.SQL(", ").join(map(sql.Identifier, keys)),
        set=sql.SQL(", ").join(sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(c)) for c in updated),
        old=sql.SQL(", ").join(sql.SQL("t.{}").format(sql.Identifier(c)) for c in values),
        new=sql.SQL(", ").join(sql.SQL("EXCLUDED.{}").format(sql.Identifier(c)) for c in values), later=later))
    written = cur.rowcount
    match = sql.SQL(" AND ").join(sql.SQL("s.{k} = t.{k}").format(k=sql.Identifier(k)) for k in keys)
    if gone is None:  # every row was sent: what is not among them goes
        cur.execute(sql.SQL("DELETE FROM {t} AS t WHERE NOT EXISTS (SELECT 1 FROM {s} AS s WHERE {m})").format(
            t=target, s=stage, m=match))
        deleted = cur.rowcount
    else:
        gone_stage = sql.Identifier(f"gone_{name}")
        cur.execute(sql.SQL("CREATE TEMP TABLE {} AS SELECT {} FROM {} WITH NO DATA").format(
            gone_stage, sql.SQL(", ").join(map(sql.Identifier, keys)), target))
        _copy(cur, gone_stage, [c for c in cols if c[0] in keys], gone)
        cur.execute(sql.SQL("DELETE FROM {t} AS t USING {s} AS s WHERE {m}").format(t=target, s=gone_stage, m=match))
        deleted = cur.rowcount
        cur.execute(sql.SQL("DROP TABLE {}").format(gone_stage))
    return {"rows": total, "sent": table.num_rows, "written": written, "deleted": deleted}


def sync_tables(url: str, schema: str, tables: dict[str, pa.Table], fingerprint: str,
                base: tuple[str, dict[str, pa.Table]] | None = None) -> dict[str, dict[str, int]]:
    """Make the schema's tables equal ``tables`` and record ``fingerprint``; one transaction, idempotent.

    ``base`` = (fingerprint, tables) of the data the tables held before, when known: each table still
    recorded with that fingerprint then receives only the rows that differ from it (an increment sends
    what it changed, not the whole history). Returns per table: rows in it, rows sent, rows inserted or
    updated, rows deleted. Concurrent syncs of one schema queue on a transaction-scoped advisory lock.
    """
    from psycopg import sql

    unknown = set(tables) - set(KEYS)
    if unknown:
        raise OfflineTablesError(f"unknown feature table(s) {sorted(unknown)}; expected {sorted(KEYS)}")
    out: dict[str, dict[str, int]] = {}
    with connect(url) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (postgres.lock_key(f"feature_tables:{schema}"),))
        cur.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        cur.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} (name text PRIMARY KEY, fingerprint text NOT NULL, "
                            "rows bigint NOT NULL, synced_at timestamptz NOT NULL)").format(
            sql.Identifier(schema, META_TABLE)))
        cur.execute(sql.SQL("SELECT name, fingerprint FROM {}").format(sql.Identifier(schema, META_TABLE)))
        recorded = dict(cur.fetchall())
        for name, table in tables.items():
            held = base[1].get(name) if base is not None and recorded.get(name) == base[0] else None
            out[name] = _merge_table(cur, schema, name, table, held)
            cur.execute(sql.SQL("INSERT INTO {} (name, fingerprint, rows, synced_at) VALUES (%s, %s, %s, now()) "
                                "ON CONFLICT (name) DO UPDATE SET fingerprint = EXCLUDED.fingerprint, "
                                "rows = EXCLUDED.rows, synced_at = EXCLUDED.synced_at").format(
                sql.Identifier(schema, META_TABLE)), (name, fingerprint, table.num_rows))
    return out


# ==================================================================================================
# Reading
# ==================================================================================================
def synced_fingerprint(url: str, schema: str, names: list[str] | tuple[str, ...] = tuple(KEYS)) -> str | None:
    """The fingerprint every table of ``names`` was last synced from; None when they differ or one is missing."""
    from psycopg import sql

    with connect(url) as conn, conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s)", (f'"{schema}"."{META_TABLE}"',))
        if cur.fetchone()[0] is None:
            return None
        cur.execute(sql.SQL("SELECT m.name, m.fingerprint FROM {} m WHERE to_regclass(quote_ident(%s) || '.' || "
                            "quote_ident(m.name)) IS NOT NULL").format(sql.Identifier(schema, META_TABLE)), (schema,))
        found = dict(cur.fetchall())
    prints = {found.get(n) for n in names}
    return prints.pop() if len(prints) == 1 and None not in prints else None


def entities_in_range(url: str, schema: str, name: str, start: datetime, end: datetime) -> int:
    """Entities with a row stamped in [start, end]: how many rows Feast materialises for that range."""
    from psycopg import sql

    key = KEYS[name][0]
    with connect(url) as conn, conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT count(DISTINCT {k}) FROM {t} WHERE {ts} BETWEEN %s AND %s").format(
            k=sql.Identifier(key), t=sql.Identifier(schema, name), ts=sql.Identifier(S.EVENT_TIMESTAMP)),
            (start, end))
        return int(cur.fetchone()[0])


def read_table(url: str, schema: str, name: str) -> pd.DataFrame:
    """A whole offline table, ordered by its key (for checks and tools; the pipeline reads Parquet)."""
    from psycopg import sql

    with connect(url) as conn, conn.cursor() as cur:
        cur.execute(sql.SQL("SELECT * FROM {} ORDER BY {}").format(
            sql.Identifier(schema, name), sql.SQL(", ").join(map(sql.Identifier, KEYS[name]))))
        names = [d.name for d in cur.description]
        return pd.DataFrame(cur.fetchall(), columns=names)

