# Outgate: two commands on a fresh machine.
#   make run   - create .venv, install, start the proxy on the embedded default config
#   make test  - install test dependencies, run lint, types and the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Installs are redone only when pyproject.toml changes.
RUN_STAMP  := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test
ARGS ?=
# `make run | jq` reads the audit records: stdout carries them only, so the recipes `run` needs
# echo nothing and send what they print to stderr.

.PHONY: run test lint typecheck pytest install install-test clean fuzz soak bench bench-instructions \
	realkube native pytest-pure

$(BIN)/python:
	@echo "creating $(VENV)" >&2
	@$(PYTHON) -m venv $(VENV) >&2
	@$(BIN)/python -m pip install --quiet --upgrade pip >&2

$(RUN_STAMP): pyproject.toml | $(BIN)/python
	@echo "installing outgate into $(VENV)" >&2
	@$(BIN)/python -m pip install --quiet -e '.[compile]' >&2
	@touch $@

# The compiled build (issue 16, docs/performance.md): mypyc compiles the modules proxy/native.py
# lists, in place, and proxy/native-build.json records a hash of each source compiled. Redone when
# a listed module (or the list) changes. Without a C compiler or Python's headers it records why,
# says so once, and the proxy runs as pure Python; it never fails the install.
NATIVE_RECORD := proxy/native-build.json
NATIVE_SOURCES := proxy/native.py proxy/native_build.py $(shell $(PYTHON) -P proxy/native.py)

$(NATIVE_RECORD): $(NATIVE_SOURCES) $(RUN_STAMP)
	@$(BIN)/python -m proxy.native_build build >&2

native: $(NATIVE_RECORD)

# Node's undici for the real-client matrix, pinned with its integrity hash.
NODE_CLIENT := tests/clients/programs/node

$(TEST_STAMP): pyproject.toml requirements.lock requirements-compile.lock $(NODE_CLIENT)/package-lock.json | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@# tests/deploy/test_image.py builds the image's virtualenv offline from these wheels.
	$(BIN)/python -m pip download --quiet --no-deps --require-hashes --only-binary=:all: \
		-r requirements.lock -d $(VENV)/wheelhouse
	$(BIN)/python -m pip download --quiet --no-deps --require-hashes --only-binary=:all: \
		-r requirements-compile.lock -d $(VENV)/wheelhouse
	@# tests/deploy/test_monitoring.py: promtool checks the alert rules (Debian's prometheus).
	@command -v promtool >/dev/null || (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus)
	@command -v curl >/dev/null || (apt-get update -qq && apt-get install -y -qq curl)
	@# The compiled build (proxy/native_build.py) needs a C compiler and this Python's headers;
	@# without them the tests run the pure-Python build and tests/unit/test_native.py fails under CI.
	@command -v gcc >/dev/null || (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gcc libc6-dev)
	@test -f "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" \
		|| (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-dev)
	@# A build recorded as pure Python (say by `make run` before gcc was here) is tried again.
	@! grep -qs '"compiled": false' $(NATIVE_RECORD) || rm -f $(NATIVE_RECORD)
	@# tests/netns/test_upstream_squid.py: a real Squid as the parent proxy (issue 12).
	@test -x /usr/sbin/squid || (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends squid)
	@# tests/integration/test_haproxy_proxy_protocol.py: a real HAProxy sends the PROXY header.
	@command -v haproxy >/dev/null || test -x /usr/sbin/haproxy || (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends haproxy)
	@command -v unshare >/dev/null && command -v ip >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq util-linux iproute2)
	@# tests/clients, the real-client matrix (docs/clients.md): git, Node with npm (for undici),
	@# Go and a headless JDK 17; Go and Java clients are compiled once per machine at test time.
	@# Go also serves tests/integration/test_refusal_clients.py.
	@command -v git >/dev/null || (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends git)
	@command -v node >/dev/null && command -v npm >/dev/null || (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm)
	@command -v go >/dev/null || (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends golang-go)
	@command -v javac >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends openjdk-17-jdk-headless)
	mkdir -p $(VENV)/node-clients
	cp $(NODE_CLIENT)/package.json $(NODE_CLIENT)/package-lock.json $(VENV)/node-clients/
	npm ci --prefix $(VENV)/node-clients --silent --no-audit --no-fund
	@# tests/netns/test_transparent_redirect.py: an iptables REDIRECT rule (issue 13).
	@command -v iptables >/dev/null || (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends iptables)
	@# tests/netns/test_port_map_postgres.py: a real PostgreSQL server and psql (issue 13).
	@ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 && command -v psql >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		--no-install-recommends postgresql)
	@# tests/image, the image tier: docker when its daemon answers, else podman (with buildah and
	@# runc), and debootstrap to make podman's base image from Debian packages. Where none can be
	@# installed the tier says why and is skipped (it fails under CI=true).
	@docker info >/dev/null 2>&1 || (command -v podman >/dev/null && test -x /usr/sbin/runc && \
		test -x /usr/sbin/debootstrap) || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends podman buildah debootstrap runc) || \
		echo "no container engine installed: tests/image will say why it is skipped" >&2
	@# tests/netns/test_ui_browser.py: the admin page in a real headless browser (issue 15).
	@command -v chromium >/dev/null || (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium)
	touch $(RUN_STAMP) $@

install: $(RUN_STAMP) $(NATIVE_RECORD)
install-test: $(TEST_STAMP) $(NATIVE_RECORD)

run: $(RUN_STAMP) $(NATIVE_RECORD)
	@$(BIN)/outgate run $(ARGS)

lint: $(TEST_STAMP)
	$(BIN)/ruff check proxy tests
	$(BIN)/ruff format --check proxy tests

typecheck: $(TEST_STAMP)
	$(BIN)/mypy --strict proxy

# tests/realkube: a real kube-apiserver, built once per machine from Debian's source package
# (about 5 minutes on 2 cores; cached in ~/.cache/outgate-realkube), and Debian's etcd.
# OUTGATE_KUBE_APISERVER and OUTGATE_ETCD name binaries you already have instead. Where neither
# can be had the tier is skipped with the reason (and fails the run under CI=true).
realkube:
	@test -n "$$OUTGATE_KUBE_APISERVER" || tests/realkube/build-apiserver.sh || \
		echo "make: no kube-apiserver could be built here; tests/realkube will say why" >&2

pytest: $(TEST_STAMP) $(NATIVE_RECORD) realkube
	$(BIN)/python -m pytest $(ARGS)

# The compiled modules' own tests (proxy/native.py's MODULES) once more on the pure-Python build,
# which an install without a C compiler runs; the rest of the suite runs once, on the compiled
# build (docs/performance.md says why that is enough). About 10 seconds.
PURE_PYTHON_TESTS := tests/unit/test_http1.py tests/unit/test_frozen.py tests/tls/test_clienthello.py \
	tests/tls/test_clienthello_differential.py tests/fuzz
pytest-pure: $(TEST_STAMP)
	OUTGATE_PURE_PYTHON=1 $(BIN)/python -m pytest -q $(PURE_PYTHON_TESTS)

test: lint typecheck pytest pytest-pure

# Outgate against Squid in one run (bench/README.md): installs squid, nginx, wrk and Go if missing,
# prints the table and writes bench/results/latest.{json,md}. ARGS="--quick" for a short run.
bench: $(RUN_STAMP) $(NATIVE_RECORD)
	bench/install.sh
	$(BIN)/python -m bench.run $(ARGS)

# Instructions per operation under Valgrind, deterministic (bench/README.md, "Instruction counts").
# ARGS="--baseline fad4617" compares with that revision; ARGS="--repeats 3" for medians.
bench-instructions: $(RUN_STAMP) $(NATIVE_RECORD)
	bench/install.sh
	$(BIN)/python -m bench.instructions $(ARGS)

# Mixed traffic with faults on a schedule for SOAK_SECONDS (default 10 minutes): every record
# paired, flat memory, descriptors back (bench/soak.py; the long run: bench/README.md).
SOAK_SECONDS ?= 600
SOAK_CONCURRENCY ?= 32
SOAK_WORKERS ?= 2
soak: $(TEST_STAMP)
	$(BIN)/python bench/soak.py --seconds $(SOAK_SECONDS) --concurrency $(SOAK_CONCURRENCY) \
		--workers $(SOAK_WORKERS)

# The property tests of tests/fuzz with a long budget (make test runs them briefly).
fuzz: $(TEST_STAMP)
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest tests/fuzz -q

clean:
	test ! -x $(BIN)/python || $(BIN)/python -m proxy.native_build clean
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
