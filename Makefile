PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: install demo test lint typecheck bench chaos campaign clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,dev,bench]'
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/pabx-worker demo

test: $(STAMP)
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check worker tests bench
	$(BIN)/ruff format --check worker tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m bench --scale

# The broker restart stops the machine's RabbitMQ, so it runs alone, after the rest.
chaos: $(STAMP)
	PABX_CHAOS_FULL=1 $(BIN)/pytest tests/chaos -m chaos -s
	PABX_CHAOS_FULL=1 PABX_CHAOS_BROKER_RESTART=1 \
		$(BIN)/pytest tests/chaos/test_broker.py -k restart -s

# Ten minutes of load and random faults on three workers, a fresh seed each time (printed).
# STORE=redis|postgres|sqlite picks the shared store; BROKER=cluster a private 3-node cluster.
STORE ?= redis
BROKER ?= single
campaign: $(STAMP)
	$(BIN)/python -m tests.campaign --minutes 10 --store $(STORE) --broker $(BROKER)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info pabx-worker.sqlite3*
