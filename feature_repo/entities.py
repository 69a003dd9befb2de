"""Feast entities: the two join keys every feature hangs off (int64 ids, see learn_tasks/schema.py)."""
from feast import Entity, ValueType

user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64,
              description="A user of the catalogue (canonical int64 user_id).")

item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.INT64,
              description="A catalogue item (canonical int64 item_id; the Milvus primary key).")
