"""Feast's PostgreSQL offline store, configured by one connection URL.

Feast's own ``postgres`` offline store takes host, port, database, user and password as separate
fields, so its password would have to be written into the rendered ``feature_store.yaml`` or come from
a variable of its own. This store type takes the URL learn already uses (``url:
${LEARN_FEATURES__OFFLINE_URL}``, or the registry's) and fills those fields from it when Feast loads the
file; everything else, the queries included, is Feast's contrib PostgreSQL offline store unchanged.

Feast finds it by the type named in the rendered file
(``learn_tasks.online.feast_postgres.PostgreSQLURLOfflineStore``), so the ``feast`` CLI of the
environment learn is installed in reads the store too.
"""
from __future__ import annotations

from typing import Any, Literal

from feast.infra.offline_stores.contrib.postgres_offline_store.postgres import (
    PostgreSQLOfflineStore,
    PostgreSQLOfflineStoreConfig,
)
from pydantic import StrictStr, model_validator

from learn_tasks.online.offline_tables import connection_fields

STORE_TYPE = "learn_tasks.online.feast_postgres.PostgreSQLURLOfflineStore"


class PostgreSQLURLOfflineStoreConfig(PostgreSQLOfflineStoreConfig):
    """``PostgreSQLOfflineStoreConfig`` whose connection fields come from ``url``; fields set as well win."""

    type: Literal["learn_tasks.online.feast_postgres.PostgreSQLURLOfflineStore"] = (  # type: ignore[assignment]
        STORE_TYPE)
    url: StrictStr

    @model_validator(mode="before")
    @classmethod
    def _fields_from_url(cls, values: Any) -> Any:
        if isinstance(values, dict) and values.get("url"):
            return {**connection_fields(values["url"]), **values}
        return values


class PostgreSQLURLOfflineStore(PostgreSQLOfflineStore):
    """Feast's PostgreSQL offline store; only its configuration differs (see the module doc)."""
