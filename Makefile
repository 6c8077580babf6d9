# cmr — the two commands of the README, and a few helpers.
# `make run`  installs everything and runs the main job.
# `make test` installs everything and runs the whole test suite.

PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install run test test-unit test-ray bench-baselines clean console-vendor

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch is pinned in pyproject.toml and resolved in the same pip command as
# sentence-transformers, so pip takes the local CPU build instead of a multi-GB CUDA one.
install: $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[test]"

run: install
	$(BIN)/cmr bench cmr --policy carve

test: install
	$(BIN)/python -m pytest tests

test-unit: install
	$(BIN)/python -m pytest tests/unit

# re-fetch the console's chart library from the npm registry (version and licence: services/console/__init__.py)
UPLOT := 1.6.32
console-vendor:
	cd $$(mktemp -d) && npm pack -q uplot@$(UPLOT) && tar xzf uplot-$(UPLOT).tgz && \
	  cp package/dist/uPlot.esm.js package/dist/uPlot.min.css package/LICENSE $(CURDIR)/services/console/static/vendor/uplot/

clean:
	rm -rf $(VENV) runs .pytest_cache
