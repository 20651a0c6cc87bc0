# sftlab: `make install` once, then `make train`, `make test`.
PYTHON ?= python
ARGS ?=
# make report: the sweep dir to report on (default: the most recent multirun dir under outputs/)
DIR ?= $(shell ls -td outputs/*/multirun/*/ 2>/dev/null | head -1)
# make wandb-sweep: the W&B sweep file to register
SWEEP ?= sweeps/lr_strategy.yaml

.PHONY: install train test test-all lint format clean bench strategies report wandb-sweep help

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

bench:  ## training throughput, one epoch per arm (~20 min): HF Trainer vs plain loop vs sftlab (ARGS="--accuracy" adds full runs)
	$(PYTHON) benchmarks/throughput.py $(ARGS)

strategies:  ## the strategy table: all 8 strategies, defaults, 3 epochs each (~40+ min on 2 CPUs; ARGS="--epochs 1")
	$(PYTHON) benchmarks/strategies.py $(ARGS)

report:  ## sweep report (table + charts) of DIR=outputs/<task>/multirun/<time> (default: the latest)
	@test -n "$(DIR)" || { echo "no sweep dir: make report DIR=outputs/<task>/multirun/<time>"; exit 2; }
	$(PYTHON) -m sftlab.report $(DIR)

wandb-sweep:  ## register a W&B sweep (SWEEP=sweeps/lr_strategy.yaml); then run `wandb agent <id>`
	wandb sweep $(SWEEP)

lint:  ## ruff
	$(PYTHON) -m ruff check src tests benchmarks *.py

format:  ## ruff format + import order
	$(PYTHON) -m ruff check --fix src tests benchmarks *.py

clean:  ## remove run outputs and caches (keeps outputs/.gitkeep)
	find outputs -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
	rm -rf .cache .pytest_cache .ruff_cache wandb lightning_logs
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
