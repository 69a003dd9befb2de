"""Canonical column names and dtypes shared by every stage.

Validation, Feast, training, metrics and monitoring all read these names from here, so a column is
renamed in one place. Canonical data is two Parquet tables per dataset:

* interactions: one row per user event, ordered by (user_id, event_timestamp)
* items: one row per catalogue item, with whatever text fields the source has

Ids are int64 everywhere (Milvus primary keys and Feast array features need integers); sources with
string ids (raw Amazon ASINs and reviewer ids) are mapped to dense integers and the original string is
kept in ``source_id``.
"""
from __future__ import annotations

from typing import Any

import pandas as pd

# --- interactions -------------------------------------------------------------------------------
USER_ID = "user_id"
ITEM_ID = "item_id"
EVENT_TIMESTAMP = "event_timestamp"  # timezone-aware UTC
RATING = "rating"  # optional, float
EVENT_TYPE = "event_type"  # optional, string ("rating", "review", "tag", "click", ...)

INTERACTION_COLUMNS: dict[str, str] = {
    USER_ID: "int64",
    ITEM_ID: "int64",
    EVENT_TIMESTAMP: "datetime64[us, UTC]",
    RATING: "float64",
    EVENT_TYPE: "string",
}
INTERACTION_REQUIRED = (USER_ID, ITEM_ID, EVENT_TIMESTAMP)

# --- items ----------------------------------------------------------------------------------------
TITLE = "title"
CATEGORY = "category"
BRAND = "brand"
DESCRIPTION = "description"
PRICE = "price"
ATTRIBUTES = "attributes"  # free "key: value; key: value" text
SOURCE_ID = "source_id"  # the id as the source wrote it (ASIN, movieId, ...)

ITEM_COLUMNS: dict[str, str] = {
    ITEM_ID: "int64",
    TITLE: "string",
    CATEGORY: "string",
    BRAND: "string",
    DESCRIPTION: "string",
    PRICE: "float64",
    ATTRIBUTES: "string",
    SOURCE_ID: "string",
}
ITEM_REQUIRED = (ITEM_ID,)
ITEM_TEXT_FIELDS = (TITLE, CATEGORY, BRAND, DESCRIPTION, ATTRIBUTES)

# user id map for sources with string user ids
USER_COLUMNS: dict[str, str] = {USER_ID: "int64", SOURCE_ID: "string"}

# --- quarantine -----------------------------------------------------------------------------------
QUARANTINE_FILE = "file"
QUARANTINE_LINE = "line"  # 1-based line (or row) number in the source file
QUARANTINE_FIELD = "field"
QUARANTINE_REASON = "reason"
QUARANTINE_RAW = "raw"  # the offending row as text, so nothing is lost
QUARANTINE_COLUMNS: dict[str, str] = {
    QUARANTINE_FILE: "string",
    QUARANTINE_LINE: "int64",
    QUARANTINE_FIELD: "string",
    QUARANTINE_REASON: "string",
    QUARANTINE_RAW: "string",
}

# --- splits ---------------------------------------------------------------------------------------
SPLIT = "split"  # "train" | "valid" | "test"
TRAIN, VALID, TEST = "train", "valid", "test"
DROPPED = "dropped"  # temporal split with data.split_kcore: a training-period event outside the k-core
PROTOCOL_LOO = "loo"  # leave-one-out per user, time-ordered (HSTU / LEARN Amazon tables)
PROTOCOL_TEMPORAL = "temporal"  # global cut-off: genuinely cold items and new users
PROTOCOLS = (PROTOCOL_LOO, PROTOCOL_TEMPORAL)

# --- item slices (evaluation, monitoring, serving badges) ------------------------------------------
SLICE_ALL = "all"
SLICE_COLD_START = "cold_start"  # no event before the stage's cut-off (temporal: first seen after it)
SLICE_LONG_TAIL = "long_tail"  # least popular warm items holding `tail_share` of the events known then
SLICE_HEAD = "head"
SLICE_COLD_USERS = "cold_users"  # <= cold_user_max_events events in the user's history at that time
SLICES = (SLICE_ALL, SLICE_COLD_START, SLICE_LONG_TAIL, SLICE_HEAD, SLICE_COLD_USERS)

# --- embeddings store -----------------------------------------------------------------------------
CONTENT_HASH = "content_hash"
EMBEDDING = "embedding"
FINGERPRINT = "fingerprint"

# --- item statistics (Feast item view, Milvus scalar fields) --------------------------------------
POPULARITY = "popularity"
FIRST_SEEN = "first_seen"
IS_COLD_START = "is_cold_start"
IS_LONG_TAIL = "is_long_tail"

# --- user features (Feast user views) -------------------------------------------------------------
RECENT_ITEM_IDS = "recent_item_ids"
RECENT_TIMESTAMPS = "recent_timestamps"
EVENT_COUNT = "event_count"
DISTINCT_ITEMS = "distinct_items"
LAST_SEEN = "last_seen"


def to_utc(value: Any) -> pd.Timestamp:
    """A timestamp as timezone-aware UTC: naive values are taken as UTC, aware ones converted."""
    ts = pd.Timestamp(value)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
