"""Orchestration: pipeline runs, their stages, the promotion gate, summaries and the Airflow runner."""
