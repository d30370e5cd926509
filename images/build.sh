#!/usr/bin/env bash
# `make images`: build both images, tagged with the package version, with docker or podman (whichever exists;
# CONTAINER_ENGINE=podman picks one). Names come from images/refs.py, the same module the compiled pipeline
# reads, so `EMBEDTUNE_IMAGE_REGISTRY=registry.example.com/ml make images compile-pipeline` keeps them in step.
# PUSH=1 also pushes. Build args pass through: GPU_BUILD_ARGS='--build-arg FLASH_ATTN_VERSION=2.8.3'.
set -euo pipefail
cd "$(dirname "$0")/.."

engine="${CONTAINER_ENGINE:-}"
if [[ -z "$engine" ]]; then
    for candidate in docker podman; do
        if command -v "$candidate" >/dev/null 2>&1; then engine="$candidate"; break; fi
    done
fi
if [[ -z "$engine" ]] || ! command -v "$engine" >/dev/null 2>&1; then
    echo "make images: neither docker nor podman is installed (or CONTAINER_ENGINE=${engine} is not found)." >&2
    echo "Install one of them, or build images/cpu/Dockerfile and images/gpu/Dockerfile elsewhere." >&2
    exit 1
fi

if ! "$engine" info >/dev/null 2>&1; then
    echo "make images: $engine is installed but not usable (is its daemon / socket running?): $engine info failed." >&2
    exit 1
fi

python="${PYTHON:-.venv/bin/python}"
[[ -x "$python" ]] || python=python3
refs="$(PYTHONPATH=src "$python" images/refs.py)"
CPU_IMAGE="$(sed -n 's/^CPU_IMAGE=//p' <<<"$refs")"
GPU_IMAGE="$(sed -n 's/^GPU_IMAGE=//p' <<<"$refs")"

echo "building $CPU_IMAGE and $GPU_IMAGE with $engine"
"$engine" build -f images/cpu/Dockerfile -t "$CPU_IMAGE" ${CPU_BUILD_ARGS:-} .
# shellcheck disable=SC2086  # word splitting of the build args is wanted
"$engine" build -f images/gpu/Dockerfile -t "$GPU_IMAGE" ${GPU_BUILD_ARGS:-} .
if [[ "${PUSH:-0}" == 1 ]]; then
    "$engine" push "$CPU_IMAGE"
    "$engine" push "$GPU_IMAGE"
fi
echo "built: $CPU_IMAGE $GPU_IMAGE"
