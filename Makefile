# make run: a local demo network; make test: the whole trial suite; make bench: benchmarks.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The tree itself comes first on the path, so tests, twistd and the demo all run this checkout.
export PYTHONPATH := $(CURDIR)

.PHONY: run test bench clean

$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet '.[test]'
	touch $@

run: $(BIN)/.installed
	$(BIN)/python -m meshnode.cli.demo $(DEMO_ARGS)

test: $(BIN)/.installed
	$(BIN)/python -m twisted.trial --jobs=2 $(TRIAL_ARGS) tests

bench: $(BIN)/.installed
	$(BIN)/python bench/rpc.py
	$(BIN)/python bench/dht.py
	$(BIN)/python bench/tunnel.py
	$(BIN)/python bench/nat.py

clean:
	rm -rf $(VENV) build *.egg-info _trial_temp* demo twisted/plugins/dropin.cache
