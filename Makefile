# One-line targets; `make help` lists them. Every target sets up .venv first when it is missing.
PY := .venv/bin/python
VENV := .venv/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
PRESET ?= tiny
CRON ?= 0 0 3 * * 0
# pytest-xdist workers for `make test`; each takes whole test files, so module fixtures are built once
TEST_WORKERS ?= 2
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.DEFAULT_GOAL := help
.PHONY: help setup test lint format demo compile-pipeline submit schedule images

help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

$(VENV): pyproject.toml
	@test -x $(PY) || python3 -m venv .venv && rm -f .venv/.installed-* && $(PY) -m pip install -q torch==2.13.0 && $(PY) -m pip install -q -e '.[dev]' && touch $@

setup: $(VENV) ## Create .venv and install the package with its dev/train extras (CPU torch 2.13.0)

test: $(VENV) ## Set up, then run the whole test suite (includes 2-rank DeepSpeed and the kfp.local DAG)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

lint: $(VENV) ## ruff format check + ruff check + hadolint on both Dockerfiles
	$(PY) -m ruff format --check . && $(PY) -m ruff check . && .venv/bin/hadolint images/cpu/Dockerfile images/gpu/Dockerfile

format: $(VENV) ## Apply ruff formatting and safe fixes
	$(PY) -m ruff format . && $(PY) -m ruff check --fix .

demo: $(VENV) ## Set up, then run the whole pipeline locally (kfp.local, tiny preset, local MLflow)
	$(PY) -m pipelines.demo

compile-pipeline: $(VENV) ## Compile every pipeline to pipelines/compiled/*.yaml (deterministic; checked in)
	$(PY) -m pipelines.compile

submit: $(VENV) ## Run a preset on a Kubeflow cluster: make submit PRESET=tiny KFP_HOST=https://...
	$(PY) -m pipelines.client submit --preset $(PRESET) --host "$(KFP_HOST)"

schedule: $(VENV) ## Schedule weekly retraining: make schedule PRESET=... KFP_HOST=... CRON='0 0 3 * * 0'
	$(PY) -m pipelines.client schedule --preset $(PRESET) --host "$(KFP_HOST)" --cron "$(CRON)"

images: ## Build and tag the CPU and GPU images with the package version (docker or podman)
	bash images/build.sh
