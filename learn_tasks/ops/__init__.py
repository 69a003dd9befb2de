"""Operations: the local stack of `learn up` (processes, Airflow, the live service)."""
