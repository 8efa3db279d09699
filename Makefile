# keybus: `make demo` runs the main job on the in-memory backend; `make test` installs
# everything and runs lint, type checks and the whole suite.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip -q --disable-pip-version-check

# Backends the suite runs on; the brokers they need are started (and stopped) around it.
KEYBUS_BACKENDS ?= memory,kafka,nats
export KEYBUS_BACKENDS

.PHONY: demo test check lint typecheck bench brokers brokers-down clean

# The demo needs the library and its command line (the `cli` extra), no broker client.
$(VENV)/.base: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -e '.[cli]'
	touch $@

$(VENV)/.test: $(VENV)/.base pyproject.toml
	$(PIP) install -e '.[test]'
	touch $@

demo: $(VENV)/.base
	$(VENV)/bin/keybus demo

lint: $(VENV)/.test
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

typecheck: $(VENV)/.test
	$(VENV)/bin/mypy

# The whole suite (slow fault-injection tests included), brokers started as needed.
test: lint typecheck
	tools/run-tests.sh

# Local brokers: Kafka (KRaft) on 127.0.0.1:9092 and nats-server (JetStream) on :4222,
# plus the secured nats-servers of the security tests on :4223-4227.
brokers:
	@tools/kafka/kafka.sh up
	@tools/nats/nats.sh up
	@tools/nats/secured.sh up

brokers-down:
	-@tools/nats/nats.sh down
	-@tools/nats/secured.sh down
	-@tools/kafka/kafka.sh down

# The quick subset while coding: memory only (no brokers), no slow tests, no lint.
check: $(VENV)/.test
	KEYBUS_BACKENDS=memory $(VENV)/bin/pytest -q -x -m "not slow"

# Every benchmark, brokers started first (about 15 minutes; each prints its ratios side by
# side from one run): the Kafka-vs-NATS comparison (report in .cache/bench/report.html),
# the in-memory micro-benchmark, the memory and close limits, the open/close cycle check,
# then the per-direction Kafka and NATS runs against the raw clients and latency at half
# the maximum rate. README "Performance" says what each measures.
bench: $(VENV)/.test brokers
	$(VENV)/bin/keybus bench --backends memory,kafka,nats --levels low,medium,high --raw \
		--out .cache/bench
	$(PY) benchmarks/memory_throughput.py
	$(PY) benchmarks/limits.py
	$(PY) benchmarks/cycle_rss.py --backend memory --topics fresh --cycles 500 --max-slope 2
	$(PY) benchmarks/kafka_throughput.py --runs 3 --phases
	$(PY) benchmarks/nats_throughput.py --runs 3 --bare
	$(PY) benchmarks/nats_throughput.py --runs 3 --publish
	$(PY) benchmarks/latency_at_rate.py --backend kafka --seconds 30
	$(PY) benchmarks/latency_at_rate.py --backend nats --seconds 30

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
