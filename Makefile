# The two commands a new user needs: `make demo` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo lint test test-fast test-engines engines-venv bench soak clean system-deps lmcache-venv demo-lmcache

install: $(STAMP)

# ai-dynamo 1.6.1 cannot be installed plainly on Python 3.11-3.13 (its `aisimulate` requirement is a
# placeholder that downloads from a private index): install its other requirements, then ai-dynamo
# itself without dependencies. The frontend and the mocker never import aisimulate.
$(STAMP): pyproject.toml requirements/dynamo-cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements/dynamo-cpu.txt
	$(BIN)/python -m pip install --quiet --no-deps ai-dynamo==1.6.1
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# Debian packages the test suite drives for real: a Redis server, systemd-analyze, iproute2.
system-deps:
	@bash scripts/system-deps.sh

# LMCache's own servers (`lmcache server`, `lmcache_server`) with a CPU torch, for the tests that supervise
# them: a venv of its own (~1.9 GB; 73 s with a warm pip cache, ~4.5 min cold), so .venv stays light.
lmcache-venv:
	@bash scripts/lmcache-venv.sh

demo: install
	$(BIN)/lmcache-supervise up demo

# The demo with LMCache's multiprocess cache server supervised beside it (profiles/demo-lmcache.toml).
demo-lmcache: install lmcache-venv
	PATH="$(CURDIR)/.venv-lmcache/bin:$$PATH" $(BIN)/lmcache-supervise up demo-lmcache

# Style, formatting, types and the import layers; `make test` runs it first.
lint: install
	$(BIN)/ruff check supervisor tests scripts
	$(BIN)/ruff format --check supervisor tests scripts
	$(BIN)/mypy
	$(BIN)/lint-imports

test: install system-deps lmcache-venv lint
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not e2e"

# The released engines judge what the supervisor emits (tests/engines/): a second venv with the set
# in requirements/engines.txt (CPU torch here; ~5.5 min and 7.4 GB the first time, see the README).
ENGINES_VENV := .venv-engines

engines-venv:
	bash scripts/engines-venv.sh $(ENGINES_VENV)

test-engines: install engines-venv
	LMCACHE_SUPERVISE_ENGINES_PYTHON=$(CURDIR)/$(ENGINES_VENV)/bin/python $(BIN)/python -m pytest -q tests/engines

bench: install
	$(BIN)/python scripts/bench.py

soak: install
	$(BIN)/python scripts/soak.py

clean:
	rm -rf $(VENV) .venv-lmcache $(ENGINES_VENV) build *.egg-info .pytest_cache
