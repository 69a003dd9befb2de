# The recommendation service (FastAPI + uvicorn), also used for the Evidently UI and for torchrun
# training jobs. Runs as an unprivileged user (uid 50000, group 0) that shares LEARN_HOME with Airflow.
#
#   docker build -f docker/service.Dockerfile -t learn-service:0.1.0 .
FROM python:3.11-slim-bookworm

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    LEARN_HOME=/opt/learn/home \
    LEARN_CONFIG=/opt/learn/src/configs/production.yaml

RUN useradd --uid 50000 --gid 0 --home-dir /opt/learn --no-create-home --shell /usr/sbin/nologin learn \
 && mkdir -p /opt/learn/home /opt/learn/src && chown -R learn:0 /opt/learn && chmod -R g+rwX /opt/learn

WORKDIR /opt/learn/src
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0
COPY pyproject.toml README.md constraints.txt ./
COPY learn_tasks ./learn_tasks
# constraints.txt pins every package to the versions the test suite ran with. Editable, because the
# package reads configs/, feature_repo/, monitoring/ and dags/ beside itself (REPO_ROOT).
RUN pip install -c constraints.txt -e .
COPY configs ./configs
COPY feature_repo ./feature_repo
COPY monitoring ./monitoring
COPY dags ./dags

USER learn
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=5 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=3)"
CMD ["learn", "serve", "--host", "0.0.0.0", "--port", "8000"]
