# Two commands: `make run` (the main job) and `make test`. Both set up .venv on first use;
# `make install` only sets it up.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DEVSTAMP := $(VENV)/.installed-dev
# dvc stages call `python -m ablation...`: the venv's python must come first on PATH
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: run test bench install clean-venv

# pip, not uv/poetry: the pinned torch builds are served from local disk to pip only.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $(STAMP)

# pull what the DVC remote already has (a stage whose outputs are there is not re-run), compute
# the rest, push what was made: a second clone gets "up to date" instead of retraining
run: $(STAMP)
	$(BIN)/dvc repro --pull
	$(BIN)/dvc push

# the dev extra: pytest, ruff, actionlint (pyproject.toml)
$(DEVSTAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(DEVSTAMP)

# lint (zero findings), then the suite; the browser test needs Chromium (installed if missing,
# where apt can; without it the test skips, and fails under CI=true)
test: $(DEVSTAMP)
	$(BIN)/ruff check src tests
	-sh tests/browser/ensure_chromium.sh
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

install: $(STAMP)

bench: $(STAMP)
	$(BIN)/python -m ablation.bench

clean-venv:
	rm -rf $(VENV)
