# sftlab: `make install` once, then `make train`, `make test`.
#
# `make install` creates the project's virtual environment .venv (system Pythons on Debian 12 /
# Ubuntu 24.04 refuse a global pip install, PEP 668) and every target runs in it. To install
# into the Python you are in instead (a conda env, an active venv): make install VENV=
VENV ?= .venv
# the Python that creates .venv: python3, else python (some images have only one of them)
BOOTSTRAP ?= $(shell command -v python3 2>/dev/null || command -v python 2>/dev/null)
ifeq ($(strip $(VENV)),)
PYTHON ?= $(BOOTSTRAP)
else
PYTHON ?= $(VENV)/bin/python
endif
# torch: this release, the CPU build where there is no NVIDIA GPU (download.pytorch.org's CPU
# index when it is reachable, else whatever the configured indexes hold; never a CUDA build
# pulled in by accident); on a GPU machine the default (CUDA) build of the same release
TORCH ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
ARGS ?=
# make report: the sweep dir to report on (default: the most recent multirun dir under outputs/)
DIR ?= $(shell ls -td outputs/*/multirun/*/ 2>/dev/null | head -1)
# make wandb-sweep: the W&B sweep file to register
SWEEP ?= sweeps/lr_strategy.yaml

.PHONY: distclean install train test test-slow test-all test-min lint format clean bench strategies parity report wandb-sweep help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

install:  ## create .venv and install sftlab (editable) with dev tools; the CPU torch where there is no GPU
	@test -n "$(BOOTSTRAP)" || { \
	  echo "error: no python3 or python on PATH; install Python >= 3.10 first." >&2; exit 2; }
	@if [ -n "$(VENV)" ] && [ ! -x "$(VENV)/bin/python" ]; then \
	  echo "creating $(VENV) with $(BOOTSTRAP)"; \
	  $(BOOTSTRAP) -m venv $(VENV) 2>/dev/null \
	  || { rm -rf $(VENV) && $(BOOTSTRAP) -m venv --without-pip $(VENV) \
	       && $(BOOTSTRAP) -m pip --python $(VENV)/bin/python install -q pip; } \
	  || { rm -rf $(VENV); echo "error: $(BOOTSTRAP) cannot create a virtual environment (no venv/ensurepip); install it (Debian/Ubuntu: apt-get install python3-venv) or install into the current Python with: make install VENV=" >&2; exit 2; }; \
	fi
	@if command -v nvidia-smi >/dev/null 2>&1; then \
	  $(PYTHON) -m pip install "torch==$(TORCH)"; \
	else \
	  $(PYTHON) -m pip install --retries 0 --timeout 20 --extra-index-url $(TORCH_CPU_INDEX) "torch==$(TORCH)" \
	  || $(PYTHON) -m pip install "torch==$(TORCH)"; \
	fi
	$(PYTHON) -m pip install -e ".[dev]"
	@$(PYTHON) -c "import torch, sftlab; print('installed: torch', torch.__version__, '| sftlab', sftlab.__version__, '| python', '$(PYTHON)')"
	@test -z "$(VENV)" || echo "every make target uses $(VENV); to run python train.py yourself: . $(VENV)/bin/activate"

train:  ## train with the default recipe (override with ARGS="strategy=gradual ...")
	$(PYTHON) train.py $(ARGS)

test:  ## the fast test set (~11 minutes on 2 CPU cores)
	$(PYTHON) -m pytest -q

test-slow:  ## only the slow acceptance tests (kill-and-resume, DDP, sweeps; CI runs them after make test)
	$(PYTHON) -m pytest -q -m slow

test-all:  ## every test, the slow ones too
	$(PYTHON) -m pytest -q -m "slow or not slow"

# make test-min: the lower bounds of pyproject.toml, checked (constraints-min.txt)
MIN_VENV ?= .cache/venv-min
MIN_TESTS ?= tests/test_data.py tests/test_fast_dropout.py tests/test_console.py tests/test_loggers.py \
  tests/test_train.py::test_end_to_end_train_test_export_and_eval "tests/test_strategies.py::test_lora_export_merges_adapters_into_a_plain_model"

test-min:  ## the declared lower bounds (constraints-min.txt) in MIN_VENV over this environment, a fast test subset
	@test -x $(MIN_VENV)/bin/python || $(PYTHON) -m venv --system-site-packages $(MIN_VENV)
	@# the packages of this environment (a venv's own, which --system-site-packages does not see) after the pinned ones
	@$(PYTHON) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" \
	  > "$$($(MIN_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/_sftlab_parent.pth"
	$(MIN_VENV)/bin/python -m pip install -q -r constraints-min.txt
	PYTHONPATH=$(CURDIR)/src HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false \
	  $(MIN_VENV)/bin/python -m pytest -q -p no:cacheprovider $(MIN_TESTS)

bench:  ## training throughput, one epoch per arm (~20-40 min): HF Trainer vs plain loop vs sftlab (ARGS="--accuracy" adds full runs)
	$(PYTHON) benchmarks/throughput.py $(ARGS)

parity:  ## accuracy parity with the HF Trainer: ag_news + trec + conll2003, seeds 1,2,3, 3 epochs per run (~2.5 h on 2 CPUs; ARGS="--tasks trec --seeds 1,2")
	$(PYTHON) benchmarks/parity.py $(ARGS)

strategies:  ## the strategy table: all 8 strategies, defaults, 3 epochs each (~40+ min on 2 CPUs; ARGS="--epochs 1")
	$(PYTHON) benchmarks/strategies.py $(ARGS)

report:  ## sweep report (table + charts) of DIR=outputs/<task>/multirun/<time> (default: the latest)
	@test -n "$(DIR)" || { echo "no sweep dir: make report DIR=outputs/<task>/multirun/<time>"; exit 2; }
	$(PYTHON) -m sftlab.report $(DIR)

wandb-sweep:  ## register a W&B sweep (SWEEP=sweeps/lr_strategy.yaml); then run `wandb agent <id>`
	$(PYTHON) -m wandb sweep $(SWEEP)

lint:  ## ruff
	$(PYTHON) -m ruff check src tests benchmarks *.py

format:  ## ruff format + import order
	$(PYTHON) -m ruff check --fix src tests benchmarks *.py

clean:  ## remove run outputs and caches (keeps outputs/.gitkeep)
	find outputs -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
	rm -rf .cache .pytest_cache .ruff_cache wandb lightning_logs  # .venv stays: make distclean
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean  ## clean, and remove the virtual environment
	rm -rf $(VENV)
