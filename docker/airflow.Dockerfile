# Airflow 3 with the learn package: the image of every Airflow service in docker-compose.yml (init,
# api-server, scheduler, dag-processor, triggerer, Celery workers).
#
#   docker build -f docker/airflow.Dockerfile -t learn-airflow:3.3.2 .
#
# Built like the service image, from a plain Python base and `pip install -c constraints.txt`: every
# package, Airflow, its Celery and FAB providers included, is the version the test suite ran with
# (tests/test_compose_stack.py runs these services' compose commands against those versions). The
# official apache/airflow image carries another set of providers and pins, which is not what was tested.
FROM python:3.11-slim-bookworm

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    AIRFLOW_HOME=/opt/airflow \
    LEARN_HOME=/opt/learn/home \
    LEARN_CONFIG=/opt/learn/src/configs/production.yaml \
    AIRFLOW__CORE__DAGS_FOLDER=/opt/learn/src/dags \
    AIRFLOW__CORE__LOAD_EXAMPLES=false

# uid 50000, group 0: the owner of the shared LEARN_HOME volume (AIRFLOW_UID in .env)
RUN useradd --uid 50000 --gid 0 --home-dir /opt/airflow --create-home --shell /bin/bash airflow \
 && mkdir -p /opt/learn/home /opt/learn/src /opt/airflow/logs \
 && chown -R airflow:0 /opt/learn /opt/airflow && chmod -R g+rwX /opt/learn /opt/airflow

WORKDIR /opt/learn/src
# torch first, from the CPU index, so the project's requirement never pulls a CUDA build.
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0
COPY pyproject.toml README.md constraints.txt ./
COPY learn_tasks ./learn_tasks
# Editable: the package reads configs/, feature_repo/, monitoring/ and dags/ beside itself (REPO_ROOT).
RUN pip install -c constraints.txt -e .
COPY configs ./configs
COPY feature_repo ./feature_repo
COPY monitoring ./monitoring
COPY dags ./dags

USER airflow
WORKDIR /opt/airflow
# `command: scheduler` in docker-compose.yml runs `airflow scheduler`
ENTRYPOINT ["airflow"]
CMD ["version"]
