# Two commands: `make run` (the main job) and `make test`. Both set up .venv on first use;
# `make install` only sets it up.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DEVSTAMP := $(VENV)/.installed-dev
LOCK    := requirements.lock
# dvc stages call `python -m ablation...`: the venv's python must come first on PATH
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: run test bench install lock clean-venv

# pip, not uv/poetry: the pinned torch builds are served from local disk to pip only. Every
# package's version comes from $(LOCK) (`make lock` writes it), so two machines get one stack.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet -c $(LOCK) pip
	$(BIN)/pip install --quiet -c $(LOCK) -e '.[train]'
	rm -f $(DEVSTAMP)
	touch $(STAMP)

# pull what the DVC remote already has (a stage whose outputs are there is not re-run), compute
# the rest, push what was made: a second clone gets "up to date" instead of retraining. One line
# first says what the remote can give (nothing, where it is unreachable: then nothing is pushed)
run: $(STAMP)
	$(BIN)/python -m ablation.record.remote

# the dev extra: pytest, ruff, actionlint (pyproject.toml)
$(DEVSTAMP): $(STAMP)
	$(BIN)/pip install --quiet -c $(LOCK) -e '.[train,dev]'
	touch $(DEVSTAMP)

# lint (zero findings), then the suite; the browser tests need Chromium and the team-remote test
# openssh-server (installed if missing, where apt can; without them those tests skip, and fail
# under CI=true). TEST_WORKERS pytest processes (pytest-xdist) take whole files, the longest
# first (tests/conftest.py): the real-service tests keep about one core busy, so two workers
# fill a two-core machine. TEST_WORKERS=0 runs it in one process. OMP_WAIT_POLICY=PASSIVE: an
# idle OpenMP thread of torch sleeps instead of spinning, which with two workers' threads on
# the cores took them from the threads computing (tests/test_train.py: 3x slower).
TEST_WORKERS ?= 2
test: $(DEVSTAMP)
	$(BIN)/ruff check src tests
	-sh tests/browser/ensure_chromium.sh
	-sh tests/services/ensure_packages.sh
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile \
		--no-loadscope-reorder $(PYTEST_ARGS)

install: $(STAMP)

# re-resolve every dependency (pyproject.toml's ranges, the train and dev extras) in a scratch
# venv and pin what pip chose; commit the new $(LOCK), then `make install` brings each clone to it
lock:
	rm -rf .venv-lock
	$(PY) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet --upgrade pip
	.venv-lock/bin/pip install --quiet -e '.[train,dev]'
	{ echo "# every package of \`pip install -e '.[train,dev]'\`, pinned: written by \`make lock\`"; \
	  .venv-lock/bin/pip freeze --all --exclude-editable | LC_ALL=C sort -f; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf .venv-lock

bench: $(STAMP)
	$(BIN)/python -m ablation.bench

clean-venv:
	rm -rf $(VENV)
