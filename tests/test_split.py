"""embedtune split: grouped by query, seeded, deterministic, refuses empty sides."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import orjson
import pytest

from embedtune.config import SplitConfig
from embedtune.errors import DataError, EmbedtuneError
from embedtune.io import write_jsonl
from embedtune.steps.split import run

EMBEDTUNE = Path(sys.executable).parent / "embedtune"


def make_rows(n_queries: int, seed: int = 0) -> list[dict]:
    """Rows of `n_queries` queries with 1-4 rows each (several positives per query, as MTEB gives)."""
    rng = random.Random(seed)
    return [
        {"query": f"query {q}", "response": f"doc {q}-{i}", "rejected_response": [f"neg {q}"]}
        for q in range(n_queries)
        for i in range(rng.randint(1, 4))
    ]


def split(tmp_path: Path, src: Path, **kw) -> tuple[dict, list[bytes], list[bytes]]:
    cfg = SplitConfig(
        dataset=str(src),
        train_data=str(tmp_path / "train.jsonl"),
        eval_data=str(tmp_path / "eval.jsonl"),
        **kw,
    )
    result = run(cfg)
    return (
        result,
        Path(cfg.train_data).read_bytes().splitlines(),
        Path(cfg.eval_data).read_bytes().splitlines(),
    )


def queries(lines: list[bytes]) -> set[str]:
    return {orjson.loads(line)["query"] for line in lines}


def test_split_keeps_queries_disjoint(tmp_path):
    src = write_jsonl(tmp_path / "rows.jsonl", make_rows(200))
    result, train, evals = split(tmp_path, src, split_dataset_ratio=0.1)
    assert queries(train) and queries(evals)
    assert not queries(train) & queries(evals)
    # every input row lands exactly once, byte for byte, in input order within each side
    lines = src.read_bytes().splitlines()
    assert Counter(train + evals) == Counter(lines)
    assert train == [line for line in lines if line in set(train)]
    assert (result["train_rows"], result["eval_rows"]) == (len(train), len(evals))
    assert (result["train_queries"], result["eval_queries"]) == (len(queries(train)), len(queries(evals)))


def test_split_ratio_applies_to_distinct_queries(tmp_path):
    src = write_jsonl(tmp_path / "rows.jsonl", make_rows(200))
    result, _, evals = split(tmp_path, src, split_dataset_ratio=0.05)
    assert result["eval_queries"] == len(queries(evals)) == 10
    assert result["train_queries"] == 190


def test_split_is_deterministic_for_a_seed(tmp_path):
    src = write_jsonl(tmp_path / "rows.jsonl", make_rows(100))
    _, train1, eval1 = split(tmp_path, src, seed=7, split_dataset_ratio=0.2)
    _, train2, eval2 = split(tmp_path, src, seed=7, split_dataset_ratio=0.2)
    assert (train1, eval1) == (train2, eval2)
    _, _, eval3 = split(tmp_path, src, seed=8, split_dataset_ratio=0.2)
    assert queries(eval3) != queries(eval1)  # the seed matters


def test_split_does_not_depend_on_row_order(tmp_path):
    rows = make_rows(100)
    _, _, eval1 = split(tmp_path, write_jsonl(tmp_path / "a.jsonl", rows), seed=3, split_dataset_ratio=0.2)
    random.Random(1).shuffle(rows)
    _, _, eval2 = split(tmp_path, write_jsonl(tmp_path / "b.jsonl", rows), seed=3, split_dataset_ratio=0.2)
    assert queries(eval1) == queries(eval2)


def test_split_refuses_empty_eval(tmp_path):
    src = write_jsonl(tmp_path / "rows.jsonl", make_rows(10))
    with pytest.raises(
        EmbedtuneError, match=r"eval would be empty: split_dataset_ratio 0.01 of 10 distinct queries"
    ):
        split(tmp_path, src, split_dataset_ratio=0.01)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(EmbedtuneError, match="eval would be empty.*no rows"):
        split(tmp_path, empty)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl", "rows.jsonl"]  # nothing written


def test_split_refuses_empty_train_and_bad_ratios(tmp_path):
    src = write_jsonl(tmp_path / "rows.jsonl", make_rows(3))
    with pytest.raises(EmbedtuneError, match="train would be empty"):
        split(tmp_path, src, split_dataset_ratio=0.9)
    for ratio in (0.0, 1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(EmbedtuneError, match=r"split_dataset_ratio: must be in \(0, 1\)"):
            split(tmp_path, src, split_dataset_ratio=ratio)


def test_split_reports_line_of_bad_row(tmp_path):
    src = tmp_path / "rows.jsonl"
    src.write_text('{"query": "a", "response": "b"}\n{"query": "a", "positive": ["b"]}\n{oops\n')
    with pytest.raises(DataError) as err:
        split(tmp_path, src)
    assert f"{src}:2: response: missing" in str(err.value)
    assert f"{src}:3: invalid JSON" in str(err.value)
    assert "embedtune convert" in str(err.value)


def test_cli_split_round_trip(tmp_path):
    src = write_jsonl(tmp_path / "rows.jsonl", make_rows(40))
    args = [
        EMBEDTUNE,
        "split",
        "--dataset",
        src,
        "--train-data",
        tmp_path / "t.jsonl",
        "--eval_data",
        tmp_path / "e.jsonl",
    ]
    ok = subprocess.run(
        [*args, "--split-dataset-ratio", "0.25", "--seed", "1"], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["eval_queries"] == 10
    bad = subprocess.run([*args, "--split-dataset-ratio", "1.5"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr == "embedtune split: error: split_dataset_ratio: must be in (0, 1), got 1.5\n"
