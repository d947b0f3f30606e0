# Every target does its own set-up: a fresh Debian machine needs only `make test` or `make demo`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: test test-matrix lint typecheck unit demo bench servers clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

# $(call need,TEST,PACKAGE,HINT): when the shell test TEST fails, install the Debian
# PACKAGE if we are root with apt-get, else print HINT and stop.
need = @{ $(1); } >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2) >/dev/null 2>&1 || \
	     (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2))); \
	  else echo "$(3)"; exit 1; fi; }

# redis-server, ZooKeeper (with a Java runtime) and PostgreSQL come from Debian when they are missing
# and we may install them; the suite starts its own servers on free loopback ports, so a
# running system Redis or ZooKeeper is never used. ZOOKEEPER_HOME (an Apache release)
# stands in for Debian's package.
servers:
	$(call need,command -v redis-server,redis-server,redis-server is missing: install it (Debian: apt-get install redis-server))
	$(call need,[ -n "$$ZOOKEEPER_HOME" ] || [ -d /usr/share/zookeeper ],zookeeper,ZooKeeper is missing: install it (Debian: apt-get install zookeeper) or set ZOOKEEPER_HOME)
	$(call need,[ -n "$$CSL_POSTGRES_URL" ] || ls /usr/lib/postgresql/*/bin/initdb || command -v initdb,postgresql,PostgreSQL is missing: install it (Debian: apt-get install postgresql) or set CSL_POSTGRES_URL)

lint: $(STAMP)
	$(VENV)/bin/ruff check celery_singleton_lock tests benchmarks examples

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# Test files run in TEST_PROCESSES pytest processes (pytest-xdist), each file whole in one
# of them with its own servers: most of the suite waits on leases, pauses and workers
# rather than computing, so 3 processes on 2 cores finish in well under half the time of
# one, and no two tests of a file ever share a moment they did not share before.
TEST_PROCESSES ?= 3

test: $(STAMP) servers lint typecheck
	$(PY) -m pytest -q -n $(TEST_PROCESSES) --dist loadfile

# The oldest and newest Celery we claim on every Python here, each pair in a venv of its
# own under .venv-matrix/ (kept between runs); not part of `make test`. The table of the
# last run is .venv-matrix/results.md.
MATRIX_PYTHONS ?= 3.10 3.11 3.12 3.13
MATRIX_CELERY  ?= 5.3 5.7
MATRIX_TESTS   ?= tests/unit tests/test_memory_contract.py tests/integration/test_worker.py \
                  tests/integration/test_worker_rabbitmq.py tests/integration/test_testing_plugin.py
test-matrix: servers
	bash .ci/matrix "$(MATRIX_PYTHONS)" "$(MATRIX_CELERY)" $(MATRIX_TESTS)

# `make demo` needs no server (filesystem broker, file:// locks: the default for it);
# `make demo BACKEND=redis|etcd|zookeeper|postgres` runs the same table on that server.
BACKEND ?= file
demo: $(STAMP) $(if $(filter file,$(BACKEND)),,servers)
	$(PY) examples/duplicate_jobs.py --backend $(BACKEND)

bench: $(BENCH_STAMP) servers
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) .venv-matrix .mypy_cache .ruff_cache .pytest_cache
