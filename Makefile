# Two set-up commands: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH := $(VENV)/.torch
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo

.PHONY: demo test lint ablation bench clean

$(TORCH):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	touch $@

# Everything: tests, lint, export, Swin, TensorBoard (and so the demo's extras too).
$(STAMP): $(TORCH) pyproject.toml
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@ $(DEMO_STAMP)

# What the demo needs (the digits data and the plots), so it starts sooner.
$(DEMO_STAMP): $(TORCH) pyproject.toml
	$(PY) -m pip install --quiet -e '.[data,plot]'
	touch $@

demo: $(DEMO_STAMP)
	$(PY) -m o2f demo --out runs/demo

test: $(STAMP) lint
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks

ablation: $(STAMP)
	$(PY) benchmarks/ablation.py --out runs/ablation

bench: $(STAMP)
	$(PY) benchmarks/assign_speed.py

clean:
	rm -rf $(VENV) runs
