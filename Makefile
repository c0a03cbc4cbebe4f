# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DATA := runs/demo-data

.PHONY: demo lint test check bench clean

# One stamp per install flavour, so editing pyproject.toml reinstalls.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	test -d $(DEMO_DATA) || $(BIN)/ctscan make-demo-data $(DEMO_DATA)
	$(BIN)/ctscan inspect $(DEMO_DATA)
	$(BIN)/ctscan tune --demo --time-budget 3m

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/lint-imports

# The whole suite: what CI runs.
test: lint
	$(BIN)/python -m pytest

# The inner loop: the same checks and every test that needs no Ray.
check: lint
	$(BIN)/python -m pytest -m "not ray"

bench: $(VENV)/.installed
	$(BIN)/python bench/data_pipeline.py
	$(BIN)/python bench/trainer_overhead.py
	$(BIN)/python bench/asha_vs_fifo.py
	$(BIN)/python bench/search_vs_baseline.py
	$(BIN)/python bench/ema_gap.py
	$(BIN)/python bench/ensemble_selection.py
	$(BIN)/python bench/threshold_bias.py
	$(BIN)/python bench/interval_coverage.py
	$(BIN)/python bench/split_bias.py
	$(BIN)/python bench/onnx_latency.py
	$(BIN)/python bench/scale.py

clean:
	rm -rf runs .pytest_cache .ruff_cache .import_linter_cache
