"""The only source of image references: every component and the build script read their names from here.

Two images, tagged with the package version so a compiled pipeline always names the image built from the same
source (the KFP server caches on the image string, not its contents, so a moving tag like `latest` would
replay stale results):

- CPU (`images/cpu/Dockerfile`): convert, split, register, deploy. Slim Python + `pip install .` with CPU torch.
- GPU (`images/gpu/Dockerfile`): train, merge, evaluate, mine, score, and the served model (`SERVE_IMAGE`: what the
  deploy step's InferenceService runs). CUDA + torch + DeepSpeed + `pip install .[train]`.

Push to your own registry by setting `EMBEDTUNE_IMAGE_REGISTRY` both when building (`make images`) and when
compiling (`make compile-pipeline`); the checked-in compiled pipeline uses the default below.

`python images/refs.py` prints `CPU_IMAGE=...` / `GPU_IMAGE=...` lines for `images/build.sh`.
"""

from __future__ import annotations

import os

from embedtune import __version__

REGISTRY = os.environ.get("EMBEDTUNE_IMAGE_REGISTRY", "ghcr.io/embedtune").rstrip("/")
CPU_IMAGE = f"{REGISTRY}/embedtune-cpu:{__version__}"
GPU_IMAGE = f"{REGISTRY}/embedtune-gpu:{__version__}"

# Which image runs each step: data wrangling and MLflow calls on CPU, anything that runs the model on GPU.
STEP_IMAGES = {
    "convert": CPU_IMAGE,
    "split": CPU_IMAGE,
    "register": CPU_IMAGE,
    "train": GPU_IMAGE,
    "merge": GPU_IMAGE,
    "evaluate": GPU_IMAGE,
    "mine": GPU_IMAGE,
    "score": GPU_IMAGE,
    "deploy": CPU_IMAGE,  # only API calls (MLflow, Kubernetes)
}
SERVE_IMAGE = GPU_IMAGE  # the image of the InferenceService predictor the deploy step creates

if __name__ == "__main__":
    print(f"VERSION={__version__}\nCPU_IMAGE={CPU_IMAGE}\nGPU_IMAGE={GPU_IMAGE}")
