# fedpriv — two commands do all set-up on a fresh machine:
#   make run    create .venv, install, run the default simulation (digits-fedavg)
#   make test   create .venv, install, run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fedpriv-installed
FASHION_DIR ?= /usr/share/datasets/fashion-mnist
PYTEST_ARGS ?=
NODES ?= 2

# Flower: no telemetry, a project-local home, never re-install dependencies at run time.
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_HOME := $(CURDIR)/.flwr
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1

.PHONY: run test install data lint bench deploy clean

run: install data
	$(VENV)/bin/fedpriv simulate $(ARGS)

test: install data
	$(PY) -m pytest $(PYTEST_ARGS)

# A real SuperLink + $(NODES) SuperNodes on 127.0.0.1 with TLS and SuperNode authentication (README "Deploy to devices").
deploy: install data
	$(VENV)/bin/fedpriv deploy local --nodes $(NODES) $(ARGS)

install: $(STAMP)

# torch first, pinned to the CPU wheel: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

# Fashion-MNIST comes from Debian's dataset-fashion-mnist; nothing downloads at run time.
data:
	@if [ -f "$(FASHION_DIR)/train-images-idx3-ubyte.gz" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "Installing Fashion-MNIST (Debian package dataset-fashion-mnist) ..."; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) \
	    >/dev/null 2>&1 || echo "note: could not install dataset-fashion-mnist; Fashion-MNIST experiments and tests will be unavailable"; \
	else \
	  echo "note: Fashion-MNIST is not installed. As root: apt-get install dataset-fashion-mnist"; \
	  echo "      (or set FEDPRIV_FASHION_DIR to a directory with its four IDX .gz files). Digits needs nothing."; \
	fi

lint: install
	$(VENV)/bin/ruff check .

bench: install data
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
