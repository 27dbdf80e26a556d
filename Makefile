# pyoverlay: everything a developer or CI runs goes through here.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(VENV)/bin/pip
VERSION = $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
PYTEST_ARGS ?=

.PHONY: venv run test test-unit test-ipsec test-e2e lint clean bench

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test]'
	touch $@

# Runs the plugin in the foreground (root; Docker finds it at /run/docker/plugins/pyoverlay.sock).
# With no ETCD_ENDPOINTS it starts its own single-host etcd under PYOVERLAY_STATE_DIR.
run: venv
	$(VENV)/bin/pyoverlay serve

# The whole suite: unit tests, etcd integration tests, end-to-end tests against real dockerd hosts.
test: venv
	$(VENV)/bin/pytest $(PYTEST_ARGS); rc=$$?; [ $$rc -ne 5 ] || { echo "no tests ran" >&2; exit 1; }; exit $$rc

test-unit: venv
	$(VENV)/bin/pytest -m "not docker and not etcd" $(PYTEST_ARGS)

# The encrypted-network tests alone, in the user-mode-linux guest (make test runs them too).
test-ipsec: venv
	$(VENV)/bin/pytest -m ipsec tests/test_ipsec.py -s $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check plugin ipam kvstore tests bench
	$(VENV)/bin/mypy plugin ipam kvstore

bench: venv
	$(PY) bench/api_latency.py
	$(PY) bench/dataplane.py
	$(PY) bench/convergence.py
	$(PY) bench/scale.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
