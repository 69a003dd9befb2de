"""Feast data sources: the feature tables written by `learn features`, plus push sources for online writes.

One definition serves both offline stores; ``LEARN_FEAST_OFFLINE_STORE`` picks the kind of batch source
(``learn`` sets it while it loads these files, from ``features.offline_store``; set it yourself to run
``feast apply`` here), and the sources keep their names either way:

* ``file`` (default): Parquet files. Paths are relative: Feast resolves them against the store's repo
  path ($LEARN_HOME/feast/<dataset>/), so the feature data lives under LEARN_HOME.
* ``postgres``: PostgreSQL tables of the same names and columns, in the schema of the dataset's Feast
  project (the offline store's ``db_schema``, which puts it on the search path).

The user tables have one row per (entity, event_timestamp) so reads are point-in-time correct.
"""
import os

from feast import FileSource, PushSource
from feast.infra.offline_stores.contrib.postgres_offline_store.postgres_source import PostgreSQLSource

OFFLINE_STORE = os.environ.get("LEARN_FEAST_OFFLINE_STORE", "file")
if OFFLINE_STORE not in ("file", "postgres"):
    raise ValueError(f"LEARN_FEAST_OFFLINE_STORE={OFFLINE_STORE!r}: expected 'file' or 'postgres'")


def batch_source(table: str, description: str):
    """The source of one feature table, named ``<table>_source``, in the selected offline store."""
    if OFFLINE_STORE == "postgres":
        return PostgreSQLSource(name=f"{table}_source", table=table, timestamp_field="event_timestamp",
                                description=description)
    return FileSource(name=f"{table}_source", path=f"data/{table}.parquet", timestamp_field="event_timestamp",
                      description=description)


user_recent_source = batch_source(
    "user_recent", "Per user and event time: the last L item ids and their timestamps (epoch seconds).")

user_activity_source = batch_source(
    "user_activity", "Per user and event time: cumulative event count, distinct items, first and last seen.")

item_stats_source = batch_source(
    "item_stats", "Per item, as of the end of the feature window: popularity, first seen, slice flags "
                  "(in PostgreSQL stamped with the window end at which its values last changed).")

# The service records new events by pushing fresh rows to the online store through these.
user_recent_push = PushSource(name="user_recent_push", batch_source=user_recent_source)
user_activity_push = PushSource(name="user_activity_push", batch_source=user_activity_source)
