#!/bin/bash
# Creates the Airflow metadata database, the Feast registry database and the event log's database
# (learn_tasks/data/eventlog.py; the shared state of learn_tasks/state.py lives there too), each owned by its own role
# with its own password. Run once by the postgres image on an empty data volume
# (/docker-entrypoint-initdb.d); also runnable by hand against any server: psql connection settings
# come from the usual PG* variables, names and passwords from the variables below.
set -euo pipefail

: "${AIRFLOW_DB_PASSWORD:?AIRFLOW_DB_PASSWORD is required}"
: "${FEAST_DB_PASSWORD:?FEAST_DB_PASSWORD is required}"
: "${LEARN_DB_PASSWORD:?LEARN_DB_PASSWORD is required}"

psql -v ON_ERROR_STOP=1 --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" \
  -v airflow_db="${AIRFLOW_DB_NAME:-airflow}" -v airflow_user="${AIRFLOW_DB_USER:-airflow}" \
  -v airflow_password="${AIRFLOW_DB_PASSWORD}" \
  -v feast_db="${FEAST_DB_NAME:-feast}" -v feast_user="${FEAST_DB_USER:-feast}" \
  -v feast_password="${FEAST_DB_PASSWORD}" \
  -v learn_db="${LEARN_DB_NAME:-learn}" -v learn_user="${LEARN_DB_USER:-learn}" \
  -v learn_password="${LEARN_DB_PASSWORD}" <<'SQL'
CREATE ROLE :"airflow_user" LOGIN PASSWORD :'airflow_password';
CREATE DATABASE :"airflow_db" OWNER :"airflow_user";
CREATE ROLE :"feast_user" LOGIN PASSWORD :'feast_password';
CREATE DATABASE :"feast_db" OWNER :"feast_user";
CREATE ROLE :"learn_user" LOGIN PASSWORD :'learn_password';
CREATE DATABASE :"learn_db" OWNER :"learn_user";
SQL
