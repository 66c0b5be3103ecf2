# isorun: two commands on a fresh Debian 12 machine, as root.
#   make demo   installs what is needed, builds the guest, runs the example
#   make test   the same setup, then every test suite (what CI runs)
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := /usr/local/go/bin:$(PATH)
# guest/agent/go.mod needs a newer Go than any Debian 12 package (bookworm-backports' is
# 1.23). `auto` uses the go on PATH when it is new enough and otherwise fetches the version
# go.mod names from the Go module proxy; set here because a go env file may say `local`.
export GOTOOLCHAIN ?= auto

.PHONY: demo test deps venv guest lint test-go test-py bench clean
# Their prerequisites run one after another, in the order listed, even under make -j
# (MAKEFLAGS=-j in a CI env): the guest build, venv and tests need what deps installs.
# (make 4.3, Debian 12's, runs the whole Makefile serially then; 4.4 just these lists.)
.NOTPARALLEL: demo test

demo: deps venv guest
	$(PY) examples/demo.py

test: deps venv guest lint test-go test-py

deps:
	scripts/install-deps.sh

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

guest:
	scripts/build-guest.sh

lint: venv
	$(VENV)/bin/ruff check isorun tests bench
	$(VENV)/bin/ruff format --check isorun tests bench
	$(VENV)/bin/mypy isorun

test-go:
	go="$$(scripts/find-go.sh)" && export PATH="$$(dirname "$$go"):$$PATH" && \
		cd guest/agent && test -z "$$(gofmt -l . | tee /dev/stderr)" && \
		go vet ./... && go test -count=1 ./...

test-py: venv
	$(VENV)/bin/pytest -ra --durations=15

bench: venv guest
	$(PY) bench/bench_boot.py
	$(PY) bench/bench_agent.py
	$(PY) bench/bench_images.py
	$(PY) bench/bench_api.py

clean:
	rm -rf $(VENV) build
