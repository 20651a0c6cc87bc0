# sftlab: `make install` once, then `make train`, `make test`.
PYTHON ?= python
ARGS ?=

.PHONY: install train test test-all lint format clean bench strategies report help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

install:  ## install sftlab (editable) with dev tools; torch from the CPU build 2.13.0
	$(PYTHON) -m pip install "torch==2.13.0"
	$(PYTHON) -m pip install -e ".[dev]"

train:  ## train with the default recipe (override with ARGS="strategy=gradual ...")
	$(PYTHON) train.py $(ARGS)

test:  ## the fast test set (under ~10 minutes on 2 CPU cores)
	$(PYTHON) -m pytest -q

test-all:  ## every test, the slow ones too
	$(PYTHON) -m pytest -q -m "slow or not slow"

lint:  ## ruff
	$(PYTHON) -m ruff check src tests benchmarks *.py

format:  ## ruff format + import order
	$(PYTHON) -m ruff check --fix src tests benchmarks *.py

clean:  ## remove run outputs and caches (keeps outputs/.gitkeep)
	find outputs -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
	rm -rf .cache .pytest_cache .ruff_cache wandb lightning_logs
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
