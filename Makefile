# The two commands of the README: `make demo` and `make test`. Both bootstrap .venv with
# the pinned CPU set on first use; later runs re-install only when pyproject.toml or
# constraints.txt changed, so they start at once.
SHELL       := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.gauss-installed
# Every pip call carries the constraints: an unpinned torch would pull a multi-GB CUDA build.
PIP    := $(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt
# This machine's pip config names local index folders that may not exist; drop that noise.
QUIET  := sed -u '/is ignored: it is neither a file nor a directory/d'

.PHONY: demo test test-fast bench bench-ml100k paper-ml1m venv plugins clean


venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0 2>&1 | $(QUIET)
	$(PIP) -e ".[all,dev]" 2>&1 | $(QUIET)
	# torchrec's metadata names the CUDA fbgemm-gpu; fbgemm-gpu-cpu came with the extra.
	$(PIP) --no-deps torchrec==1.8.0 2>&1 | $(QUIET)
	$(BIN)/python -c "import torch, gauss_plugins; assert torch.__version__.startswith('2.13'), torch.__version__"
	# The C++ hash index now, not ~20 s into the first demo or test; without a compiler the
	# tables still run, on the slower torch index.
	$(BIN)/gauss build || echo "gauss build failed (see above): tables will use the torch index"
	touch $(STAMP)

# DEMO_ARGS: e.g. `make demo DEMO_ARGS="--strategy gauss"` (the lookahead embedding cache).
demo: $(STAMP)
	$(BIN)/gauss demo $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# Every benchmark in quick mode, each writing its JSON record into one run folder (BENCH_DIR,
# default runs/bench/<UTC time>); a failing one does not stop the others. Ends with one table
# of all of them (benchmarks/summarize.py) and fails if any benchmark failed. A GPU-only or
# data-less benchmark records why it skipped and exits 0.
BENCH_TIMEOUT ?= 600
bench: $(STAMP)
	dir="$${BENCH_DIR:-runs/bench/$$(date -u +%Y%m%dT%H%M%SZ)}"; mkdir -p "$$dir"; \
	for b in benchmarks/*.py; do \
	  name=$$(basename "$$b" .py); \
	  case "$$name" in summarize|_*) continue;; esac; \
	  echo "== $$b --quick --json $$dir/$$name.json"; rm -f "$$dir/$$name.json"; start=$$SECONDS; \
	  rc=0; timeout $(BENCH_TIMEOUT) $(BIN)/python "$$b" --quick --json "$$dir/$$name.json" || rc=$$?; \
	  echo $$rc > "$$dir/$$name.rc"; echo $$((SECONDS - start)) > "$$dir/$$name.seconds"; \
	done; \
	$(BIN)/python benchmarks/summarize.py "$$dir"

# HSTU vs SASRec on ML-100K over 3 seeds (long: tens of minutes on the CPU machine).
bench-ml100k: $(STAMP)
	$(BIN)/python benchmarks/ml100k_seeds.py

# The paper's ML-1M table (Table 4) in one command, for anyone holding ML-1M (a GPU run).
paper-ml1m: $(STAMP)
	$(BIN)/python benchmarks/ml1m_paper_table.py $(if $(ML1M),--data-path $(ML1M)) --accelerator gpu --parallel --refit

plugins: $(STAMP)
	$(BIN)/gauss plugins

# setuptools writes the egg-info beside pyproject.toml (package-dir maps three folders).
clean:
	rm -rf $(VENV) build dist *.egg-info src/*.egg-info
