# Beacon: `make run` starts it, `make test` runs the whole suite on the real Docker engine.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: run test test-deps lint images image bench bench-registry bench-dns bench-proxy soak clean
.PHONY: bench-cluster bench-consul bench-tls

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $@ $(VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/beacon run $(ARGS)

# Debian tools the suite uses as independent clients (dig, curl), etcd for the cluster tests, and the test images.
test-deps:
	@command -v dig >/dev/null && command -v curl >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bind9-dnsutils curl >/dev/null)
	@command -v prometheus >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq --no-install-recommends prometheus >/dev/null)
	@command -v etcd >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server >/dev/null)
	@(docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null) && command -v systemd-analyze >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose systemd >/dev/null)
	@command -v pebble >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pebble >/dev/null)
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null)

images:
	bash tests/images/build.sh

# Beacon's own image, built without a registry (deploy/README.md); IMAGE=beacon:local.
IMAGE ?= beacon:local
image: $(VENV)/.installed-dev
	PIP=$(BIN)/pip bash deploy/build-image.sh $(IMAGE)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check beacon tests bench
	$(BIN)/mypy

test: $(VENV)/.installed-dev test-deps images
	$(BIN)/ruff check beacon tests bench
	$(BIN)/mypy
	$(BIN)/pytest $(ARGS)

bench-registry: $(VENV)/.installed-dev images
	$(BIN)/python -m bench.registry $(ARGS)

bench-dns: $(VENV)/.installed-dev
	$(BIN)/python -m bench.dns $(ARGS)

bench-proxy: $(VENV)/.installed-dev
	$(BIN)/python -m bench.proxy $(ARGS)

# Cluster: propagation over two real Docker hosts, and 1,000 x 100 simulated endpoints on a real etcd.
bench-cluster: $(VENV)/.installed-dev images test-deps
	$(BIN)/python -m bench.cluster $(ARGS)

bench-consul: $(VENV)/.installed-dev
	$(BIN)/python -m bench.consul $(ARGS)

bench-tls: $(VENV)/.installed-dev
	$(BIN)/python -m bench.tls $(ARGS)

bench: bench-registry bench-dns bench-proxy

# Bounded (at most 10 min): container churn + proxy/DNS load + watchers; prints RSS, fds, p99s over time.
soak: $(VENV)/.installed-dev images
	$(BIN)/python -m bench.soak $(ARGS)

clean:
	rm -rf $(VENV) tests/images/.build .pytest_cache .mypy_cache .ruff_cache
