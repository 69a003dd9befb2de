"""Feast data sources: Parquet files written by `learn features`, plus push sources for online writes.

Paths are relative: Feast resolves them against the store's repo path ($LEARN_HOME/feast/<dataset>/),
so the feature data lives under LEARN_HOME and this folder holds definitions only. Every table has
one row per (entity, event_timestamp) so reads are point-in-time correct.
"""
from feast import FileSource, PushSource

user_recent_source = FileSource(
    name="user_recent_source",
    path="data/user_recent.parquet",
    timestamp_field="event_timestamp",
    description="Per user and event time: the last L item ids and their timestamps (epoch seconds).",
)

user_activity_source = FileSource(
    name="user_activity_source",
    path="data/user_activity.parquet",
    timestamp_field="event_timestamp",
    description="Per user and event time: cumulative event count, distinct items, first and last seen.",
)

item_stats_source = FileSource(
    name="item_stats_source",
    path="data/item_stats.parquet",
    timestamp_field="event_timestamp",
    description="Per item, as of the end of the feature window: popularity, first seen, slice flags.",
)

# The service records new events by pushing fresh rows to the online store through these.
user_recent_push = PushSource(name="user_recent_push", batch_source=user_recent_source)
user_activity_push = PushSource(name="user_activity_push", batch_source=user_activity_source)
