"""The benchmarks still run: a smoke run of each one that has a `--smoke` mode (tiny model, synthetic data, CPU).

No figure is asserted (timing belongs in the benchmarks' own output, not in tests); what is checked is that
every part ran and reported the fields the benchmark promises.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gpu_train_bench_smoke_runs_every_part_on_cpu(tmp_path):
    out = tmp_path / "gpu_train.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_train.py"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=880,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for run in ("embedtune_none", "embedtune_zero3", "sentence_transformers"):
        fields = result[run]
        assert fields["exit_code"] == 0, run
        assert {"rows_per_s", "real_tokens_per_s", "mfu", "peak_memory_gb", "median_step_seconds"} <= set(
            fields
        )
        assert fields["rows_per_s"] > 0
    assert set(result["encode_texts_per_s"]) == {"embedtune_float32", "sentence_transformers_float32"}
    # the ablation: one speed lever off per run, each a ratio to the defaults (figures not asserted)
    assert set(result["ablation"]) == {"all_off"}
    assert result["vision"]["exit_code"] == 0 and result["vision"]["rows_per_s"] > 0
    assert result["vision"]["tokens_per_row"] > result["vision"]["image_tokens_per_row"] > 0
    for name, fields in result["ablation"].items():
        assert fields["exit_code"] == 0 and fields["rows_per_s"] > 0 and fields["over_defaults"] > 0, name
    assert "ablation (--deepspeed none, one lever off per row)" in proc.stdout
    # the levers off by default, each on over the defaults, all of them, and a pipeline run's defaults
    levers = result["levers"]
    assert set(levers) == {"default", "liger", "padding_free", "chunk_tokens", "all_levers"}
    assert (
        "needs CUDA" in levers["liger"]["skipped"] and levers["all_levers"]["note"] == "CPU: Liger left out"
    )
    for name in ("default", "padding_free", "chunk_tokens", "all_levers"):
        assert (
            levers[name]["exit_code"] == 0
            and levers[name]["rows_per_s"] > 0
            and levers[name]["over_defaults"] > 0
        ), name
    assert result["real_tokens"]["row"] > 0 and result["nonembedding_params"] > 0
    assert "embedtune / sentence-transformers rows/s" in proc.stdout
