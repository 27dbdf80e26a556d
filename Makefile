# pyoverlay: everything a developer or CI runs goes through here.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(VENV)/bin/pip
VERSION = $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
PYTEST_ARGS ?=

.PHONY: venv run test test-unit test-ipsec test-e2e lint clean bench wheels plugin plugin-rootfs plugin-enable push \
        setup-run setup-test setup-plugin engine
# The managed plugin: name and tag as Docker will know it (`-d pyoverlay:latest --ipam-driver pyoverlay:latest`).
PLUGIN      ?= pyoverlay
PLUGIN_TAG  ?= latest
# The rootfs base: the public image when it can be pulled, else a local debootstrap-built one (no registry needed).
BASE_IMAGE  ?= python:3.11-slim-bookworm
LOCAL_BASE  ?= pyoverlay-base:bookworm
# PULL=0: do not try a registry at all (the tests: they send nothing off this machine).
PULL        ?= 1
BUILD       ?= build
DOCKER      ?= docker

venv: $(VENV)/.installed

# What a fresh Debian 12 machine lacks for each job, installed (and named) by packaging/setup.sh.
setup-run:
	@packaging/setup.sh run
setup-test:
	@packaging/setup.sh test
setup-plugin:
	@packaging/setup.sh plugin

# The current Docker engine (28.x from Debian sid, unpacked under /var/tmp, not installed) for the suite.
engine:
	packaging/engine.sh

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test]'
	touch $@

# Runs the plugin in the foreground (root; Docker finds it at /run/docker/plugins/pyoverlay.sock).
# With no ETCD_ENDPOINTS it starts its own single-host etcd under PYOVERLAY_STATE_DIR.
run: setup-run venv
	$(VENV)/bin/pyoverlay serve

# The whole suite (unit tests, etcd integration tests, end-to-end tests against real dockerd hosts) on the
# current engine, Docker 28; then a representative subset again on Debian 12's Docker 20.10
# (docs/compatibility.md). Both passes always run; the result fails if either does (or runs no test).
ENGINE_SUBSET ?= tests/test_single_host.py tests/test_multi_host.py tests/test_cluster.py tests/test_ipv6.py \
                 tests/test_managed_plugin.py tests/test_swarm.py
test: setup-test venv
	@status=0; \
	for pass in "28:" "20.10:$(ENGINE_SUBSET)"; do \
	  engine=$${pass%%:*}; only=$${pass#*:}; \
	  echo "== Docker $$engine: pytest $${only:-(whole suite)}"; \
	  PYOVERLAY_ENGINE=$$engine $(VENV)/bin/pytest $$only $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "no tests ran on Docker $$engine" >&2; rc=1; fi; \
	  echo "== Docker $$engine: exit status $$rc"; \
	  [ $$rc -eq 0 ] || status=$$rc; \
	done; exit $$status

test-unit: venv
	$(VENV)/bin/pytest -m "not docker and not etcd" $(PYTEST_ARGS)

# The encrypted-network tests alone, in the user-mode-linux guest (make test runs them too).
test-ipsec: venv
	$(VENV)/bin/pytest -m ipsec tests/test_ipsec.py -s $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check plugin ipam kvstore tests bench
	$(VENV)/bin/mypy plugin ipam kvstore
	$(VENV)/bin/lint-imports --no-cache   # the layering rule: pyproject.toml [tool.importlinter]

bench: venv
	$(PIP) install -q -e '.[test,bench]'
	$(PY) bench/api_latency.py
	$(PY) bench/dataplane.py
	$(PY) bench/convergence.py
	$(PY) bench/scale.py

clean:
	rm -rf $(VENV) $(BUILD) *.egg-info .pytest_cache .mypy_cache .ruff_cache

# -- the managed plugin --------------------------------------------------------------------------------------
# Everything below talks to the daemon the Docker CLI would (DOCKER_HOST, default /var/run/docker.sock).
wheels: $(BUILD)/wheels/.done

$(BUILD)/wheels/.done: $(VENV)/.installed pyproject.toml $(shell find plugin ipam kvstore -name '*.py')
	rm -rf $(BUILD)/wheels && mkdir -p $(BUILD)/wheels
	$(PIP) wheel -q --wheel-dir $(BUILD)/wheels .
	touch $@

# build/plugin/{config.json,rootfs/}: the image built from the Dockerfile, exported (once; make clean redoes it).
plugin-rootfs: $(BUILD)/plugin/.done

$(BUILD)/plugin/.done: $(BUILD)/wheels/.done Dockerfile config.json packaging/local-base.sh
	@base=$(BASE_IMAGE); \
	if ! $(DOCKER) image inspect $$base >/dev/null 2>&1 && \
	   ! { [ "$(PULL)" != 0 ] && timeout 60 $(DOCKER) pull -q $$base >/dev/null 2>&1; }; then \
	  echo "plugin: $$base cannot be pulled here; building the local base $(LOCAL_BASE)"; \
	  packaging/setup.sh plugin && packaging/local-base.sh $(LOCAL_BASE) $(BUILD) || exit 1; base=$(LOCAL_BASE); \
	fi; \
	DOCKER_BUILDKIT=0 $(DOCKER) build -q --build-arg BASE=$$base -t $(PLUGIN)-rootfs:$(VERSION) . >/dev/null || exit 1; \
	rm -rf $(BUILD)/plugin && mkdir -p $(BUILD)/plugin/rootfs && cp config.json $(BUILD)/plugin/ && \
	cid=$$($(DOCKER) create $(PLUGIN)-rootfs:$(VERSION)) && \
	$(DOCKER) export $$cid | tar -x -C $(BUILD)/plugin/rootfs && $(DOCKER) rm -f $$cid >/dev/null
	touch $@

# Creates (or re-creates, when disabled) $(PLUGIN):$(PLUGIN_TAG) on the daemon; `make plugin-enable` starts it.
plugin: plugin-rootfs
	@$(DOCKER) plugin rm $(PLUGIN):$(PLUGIN_TAG) >/dev/null 2>&1 || true
	$(DOCKER) plugin create $(PLUGIN):$(PLUGIN_TAG) $(BUILD)/plugin
	@echo "created $(PLUGIN):$(PLUGIN_TAG); configure with 'docker plugin set $(PLUGIN):$(PLUGIN_TAG) KEY=VALUE', then 'make plugin-enable'"

plugin-enable:
	$(DOCKER) plugin enable $(PLUGIN):$(PLUGIN_TAG)

# Pushes to the registry named in PLUGIN (e.g. make push PLUGIN=registry.example.com/pyoverlay).
push:
	$(DOCKER) plugin push $(PLUGIN):$(PLUGIN_TAG)
