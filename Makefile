# Two entry points for people: `make run` (the whole pipeline on the embedded stack) and `make test`.
# Both create .venv on first use. torch is installed first and pinned so pip never pulls a CUDA build.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export AIRFLOW__CORE__LOAD_EXAMPLES ?= False

.PHONY: install run test test-fast bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -U pip wheel
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/learn run

test: $(STAMP)
	scripts/ensure_chromium.sh  # headless Chromium for the browser tests (Debian packages; no-op when present)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration and not production"

clean:
	rm -rf $(VENV) .learn
