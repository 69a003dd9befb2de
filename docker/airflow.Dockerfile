# Airflow 3 with the learn package installed: the image of every Airflow service in docker-compose.yml
# (api-server, scheduler, dag-processor, triggerer, Celery workers). The official image already carries
# the Celery, FAB, PostgreSQL and Redis providers the stack uses.
#
#   docker build -f docker/airflow.Dockerfile -t learn-airflow:3.3.2 .
FROM apache/airflow:3.3.2-python3.11

ARG AIRFLOW_VERSION=3.3.2
# CPU wheels by default; point at a CUDA index to train on GPUs inside the workers.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    PIP_NO_CACHE_DIR=1 \
    LEARN_HOME=/opt/learn/home \
    LEARN_CONFIG=/opt/learn/src/configs/production.yaml \
    AIRFLOW__CORE__DAGS_FOLDER=/opt/learn/src/dags \
    AIRFLOW__CORE__LOAD_EXAMPLES=false

USER root
RUN mkdir -p /opt/learn/home /opt/learn/src && chown -R airflow:0 /opt/learn && chmod -R g+rwX /opt/learn
USER airflow

# torch first, from the CPU index, so the project's requirement never pulls a CUDA build.
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0

COPY --chown=airflow:0 pyproject.toml README.md constraints.txt /opt/learn/src/
COPY --chown=airflow:0 learn_tasks /opt/learn/src/learn_tasks
# Editable: the package reads configs/, feature_repo/, monitoring/ and dags/ beside itself (REPO_ROOT).
# Pinning apache-airflow to the image's version keeps pip from changing Airflow itself
# (the documented way to extend the official image).
RUN pip install "apache-airflow==${AIRFLOW_VERSION}" -e /opt/learn/src

COPY --chown=airflow:0 configs /opt/learn/src/configs
COPY --chown=airflow:0 feature_repo /opt/learn/src/feature_repo
COPY --chown=airflow:0 monitoring /opt/learn/src/monitoring
COPY --chown=airflow:0 dags /opt/learn/src/dags
WORKDIR /opt/airflow
