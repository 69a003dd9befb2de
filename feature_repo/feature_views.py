"""Feast feature views: a user's recent items, a user's activity, and item statistics.

Times are int64 epoch seconds (UTC) so the same values round-trip through Parquet, SQLite, Redis
and Milvus scalar fields without time-zone conversions.
"""
from datetime import timedelta

from feast import FeatureView, Field
from feast.types import Array, Bool, Int64

from data_sources import item_stats_source, user_activity_push, user_recent_push
from entities import item, user

# ttl=0: no expiry. A user's history stays valid until a newer row replaces it.
user_recent_items = FeatureView(
    name="user_recent_items",
    entities=[user],
    ttl=timedelta(0),
    schema=[
        Field(name="recent_item_ids", dtype=Array(Int64),
              description="The user's last L item ids, oldest first (L = features.recent_items or model.max_len)."),
        Field(name="recent_timestamps", dtype=Array(Int64),
              description="Epoch seconds of recent_item_ids, same order."),
    ],
    source=user_recent_push,
    online=True,
    description="Input of the user tower: the most recent events of each user.",
)

user_activity = FeatureView(
    name="user_activity",
    entities=[user],
    ttl=timedelta(0),
    schema=[
        Field(name="event_count", dtype=Int64, description="Events so far."),
        Field(name="distinct_items", dtype=Int64, description="Distinct items so far."),
        Field(name="first_seen", dtype=Int64, description="Epoch seconds of the first event."),
        Field(name="last_seen", dtype=Int64, description="Epoch seconds of the latest event."),
    ],
    source=user_activity_push,
    online=True,
    description="How active a user is (cold users get the labelled fallback).",
)

item_stats = FeatureView(
    name="item_stats",
    entities=[item],
    ttl=timedelta(0),
    schema=[
        Field(name="popularity", dtype=Int64, description="Events in the feature window."),
        Field(name="first_seen", dtype=Int64, description="Epoch seconds of the first event (0 = never seen)."),
        Field(name="is_cold_start", dtype=Bool, description="No event in the feature window."),
        Field(name="is_long_tail", dtype=Bool,
              description="Among the least popular warm items that hold evaluate.tail_share of the events."),
    ],
    source=item_stats_source,
    online=True,
    description="Item popularity and slice flags (serving badges, popular fallback, monitoring).",
)
