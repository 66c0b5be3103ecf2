# isorun: two commands on a fresh Debian 12 machine, as root.
#   make demo   installs what is needed, builds the guest, runs the example
#   make test   the same setup, then every test suite (what CI runs)
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := /usr/local/go/bin:$(PATH)
# guest/agent/go.mod needs a newer Go than any Debian 12 package (bookworm-backports' is
# 1.23). Where the go found on PATH is older (a fresh machine), the go command fetches this
# toolchain from the Go module proxy; where it is new enough it is used as it is.
GO_MIN := $(shell awk '$$1 == "go" {print $$2; exit}' guest/agent/go.mod)
GO_FETCH := go1.27.3
ifeq ($(origin GOTOOLCHAIN),undefined)
GOTOOLCHAIN := $(shell export PATH="$(PATH)"; v="$$(go env GOVERSION 2>/dev/null)"; v="$${v#go}"; \
	if [ -n "$$v" ] && [ "$$(printf '%s\n' "$(GO_MIN)" "$$v" | sort -V | head -1)" = "$(GO_MIN)" ]; \
	then echo local; else echo $(GO_FETCH); fi)
endif
export GOTOOLCHAIN

.PHONY: demo test deps venv guest lint test-go test-py bench clean

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
	cd guest/agent && test -z "$$(gofmt -l . | tee /dev/stderr)" && \
		go vet ./... && go test -count=1 ./...

test-py: venv
	$(VENV)/bin/pytest -ra

bench: venv guest
	$(PY) bench/bench_boot.py
	$(PY) bench/bench_agent.py
	$(PY) bench/bench_images.py
	$(PY) bench/bench_api.py

clean:
	rm -rf $(VENV) build
