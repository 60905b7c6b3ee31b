# dicesim — every target sets up what it needs from a fresh clone.
# TORCH_SPEC picks the torch build: the default is the CPU wheel this project is
# developed against; on a CUDA machine use e.g. `make TORCH_SPEC='torch==2.13.0' ...`
# with your CUDA index, or an existing torch (`make TORCH_SPEC=skip`).
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.installed
NPROC      ?= 2
TEST_WORKERS ?= 2
ARGS       ?=

.PHONY: setup demo test test-slow lint bench bench-influence bench-scale alignment cascade anomaly \
        collaborators contribution attribution cleansing clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if [ "$(TORCH_SPEC)" != "skip" ]; then $(PY) -m pip install -q $(TORCH_SPEC); fi
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m dicesim experiment=demo $(ARGS)

# the suite in TEST_WORKERS processes (pytest-xdist), a test file per worker at a time:
# most tests wait on subprocesses, so two workers keep two cores busy
test: $(STAMP)
	$(PY) -m ruff check dicesim tests launch scripts examples
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -x -n $(TEST_WORKERS) --dist loadfile

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(PY) -m ruff check dicesim tests launch

bench: $(STAMP)
	@$(PY) -m dicesim.bench.engine $(ARGS)

bench-influence: $(STAMP)
	@$(PY) -m dicesim.bench.influence $(ARGS)

# nodes 16 … 16,384 on ring / exponential / one_peer_exponential, one process, one thread;
# ARGS='--nodes 16,256 --topologies ring --max-seconds 120' runs a subset
bench-scale: $(STAMP)
	@$(PY) -m dicesim.bench.scale $(ARGS)

# One target per experiment; ARGS passes extra Hydra overrides, e.g. ARGS='data=fashion_mnist'.
alignment cascade anomaly collaborators contribution attribution cleansing: $(STAMP)
	$(PY) -m dicesim experiment=$@ $(ARGS)

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
