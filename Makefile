# One-line targets; `make help` lists them. Every target sets up .venv first when it is missing.
PY := .venv/bin/python
VENV := .venv/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
PRESET ?= tiny
CRON ?= 0 0 3 * * 0
# pytest-xdist workers for `make test`; each takes whole test files, so module fixtures are built once
TEST_WORKERS ?= 2
# The CPU kernels `make test-kernels` reruns the numeric tests under: a CPU without AVX2, and one with AVX2 but no
# AVX-512 (torch's ATen, oneDNN and MKL dispatch, inductor's vector ISA, numpy's OpenBLAS core, each capped).
# Each kernel set compiles into its own inductor cache: a precompiled header of this CPU's ISA breaks the others.
KERNELS ?= default avx2
KERNELS_default := ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_ENABLE_INSTRUCTIONS=SSE4_2 OPENBLAS_CORETYPE=Nehalem
KERNELS_avx2 := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 OPENBLAS_CORETYPE=Haswell
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.DEFAULT_GOAL := help
.PHONY: help setup test test-kernels lint format demo compile-pipeline submit schedule images

help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

$(VENV): pyproject.toml
	@test -x $(PY) || python3 -m venv .venv && rm -f .venv/.installed-* && $(PY) -m pip install -q torch==2.13.0 && $(PY) -m pip install -q -e '.[dev]' && touch $@

setup: $(VENV) ## Create .venv and install the package with its dev/train extras (CPU torch 2.13.0)

test: $(VENV) ## Set up, then run the whole test suite (includes 2-rank DeepSpeed and the kfp.local DAG)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

test-kernels: $(VENV) ## Rerun the numeric tests (-m numeric) under other CPUs' kernels (KERNELS='default avx2'; this CPU's own skipped)
	@native=$$($(PY) -c 'import torch; print(torch.backends.cpu.get_cpu_capability().lower())'); $(foreach k,$(KERNELS),if [ "$$native" = "$(k)" ]; then echo "== kernels $(k): this CPU's own (make test ran them)"; else echo "== kernels $(k): $(KERNELS_$(k))" && env $(KERNELS_$(k)) TORCHINDUCTOR_CACHE_DIR=$${TMPDIR:-/tmp}/embedtune-inductor-$(k) $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile -m numeric -q -p no:cacheprovider || exit 1; fi;)

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
