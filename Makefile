# qwenrun — the two README commands live here: `make demo` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   := torch==2.13.0
STAMP   := $(VENV)/.qwenrun-setup
CHROMIUM := /usr/bin/chromium
PYTEST_ARGS ?=

.PHONY: setup demo serve-demo test bench clean

setup: $(STAMP)

# Re-run set-up whenever the package metadata changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# Pin torch first: the CPU build on local disk; an unpinned torch would pull a CUDA build.
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# Build (or reuse) the AVX2 kernels once, so no test or request pays the compile.
	$(BIN)/python -m qwenrun.quant.kernels --build || true
	touch $(STAMP)

# The demo chats at the GGUF file's own precision (quantization "auto": its Q4_K/Q5_0/Q6_K/Q8_0
# blocks as stored, no dense copy, no second rounding).
demo: setup
	$(BIN)/qwenrun chat demo

serve-demo: setup
	$(BIN)/qwenrun serve demo

# The browser tests (tests/test_web_ui.py) drive Debian's Chromium through Playwright: Playwright's
# own browser download needs the open internet. Only `make test` needs it, so `make demo` does not.
$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			chromium fonts-dejavu-core; \
	else echo "make: the browser tests need Debian's Chromium: sudo apt-get install chromium" >&2; exit 1; fi

test: setup $(CHROMIUM)
	$(BIN)/python -m pytest -q -ra --junitxml=.pytest-results.xml $(PYTEST_ARGS)

bench: setup
	benchmarks/run_all.sh

clean:
	rm -rf $(VENV) .pytest-results.xml build src/*.egg-info
