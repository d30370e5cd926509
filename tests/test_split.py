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
        with pytest.raises(EmbedtuneError, match=r"split_dataset_ratio: .* is not (in \(0, 1\)|a finite)"):
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
    assert bad.stderr == "embedtune split: error: split_dataset_ratio: 1.5 is not in (0, 1)\n"


# ------------------------------------------------------------------------------------------ leakage guard
def test_split_drops_train_rows_whose_query_or_positive_is_in_an_exclude_file_however_spelled(tmp_path):
    rows = make_rows(40)
    leaks = [
        {"query": "What is  the BENCHMARK question?", "response": "fresh doc 1"},  # case + spacing
        {"query": "fresh query 2", "response": "Ｂｅｎｃｈｍａｒｋ answer"},  # full-width letters (NFKC)
        {"query": "fresh query 3", "response": "a line\tof the test set"},  # tab vs space
    ]
    src = write_jsonl(tmp_path / "rows.jsonl", rows + leaks)
    beir = write_jsonl(tmp_path / "queries.jsonl", [{"_id": "1", "text": "what is the benchmark question?"}])
    test_rows = write_jsonl(tmp_path / "test.jsonl", [{"query": "other", "response": "benchmark answer"}])
    lines = tmp_path / "lines.txt"
    lines.write_text("a line of the test set\n")
    result, train, evals = split(
        tmp_path, src, split_dataset_ratio=0.1, exclude_data=f"{beir}, {test_rows},{lines}"
    )
    in_eval = [r for r in leaks if r["query"] in queries(evals)]  # eval rows are never dropped
    assert result["train_rows_dropped_excluded"] == len(leaks) - len(in_eval) > 0
    assert not {r["query"] for r in leaks} & queries(train)
    assert result["exclude_texts"] == 4 and result["train_rows"] == len(train)  # 1 + (query, response) + 1
    assert len(train) + len(evals) + result["train_rows_dropped_excluded"] == len(rows) + len(leaks)


def test_split_drops_train_rows_sharing_a_query_or_positive_with_eval_unless_told_not_to(tmp_path):
    rows = [
        {"query": f"q{i}", "response": f"doc {i % 10}"} for i in range(100)
    ]  # each doc answers 10 queries
    rows += [{"query": "Q3 ", "response": "unique answer"}]  # the query "q3" once more, in other case/space
    src = write_jsonl(tmp_path / "rows.jsonl", rows)
    result, train, evals = split(tmp_path, src, split_dataset_ratio=0.05)
    eval_docs = {orjson.loads(line)["response"] for line in evals}
    eval_queries = {q.lower().strip() for q in queries(evals)}
    kept = [orjson.loads(line) for line in train]
    assert not {r["response"] for r in kept} & eval_docs
    assert not {r["query"].lower().strip() for r in kept} & eval_queries
    assert result["train_rows_dropped_eval_overlap"] == len(rows) - len(evals) - len(train) > 0
    result, train, _ = split(tmp_path, src, split_dataset_ratio=0.05, drop_eval_overlap=False)
    assert result["train_rows_dropped_eval_overlap"] == 0 and len(train) == len(rows) - result["eval_rows"]


def test_split_refuses_when_the_guard_leaves_no_train_row_and_writes_nothing(tmp_path):
    src = write_jsonl(
        tmp_path / "rows.jsonl", [{"query": f"q{i}", "response": "same doc"} for i in range(10)]
    )
    with pytest.raises(EmbedtuneError, match="dropped every train row"):
        split(tmp_path, src, split_dataset_ratio=0.2)
    assert not (tmp_path / "train.jsonl").exists() and not (tmp_path / "eval.jsonl").exists()
