"""embedtune mine: the blocked search equals the full matrix, the filters and the window do what they say,
the step writes canonical rows + stats, and 2 torchrun ranks mine exactly what 1 process mines."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import numpy as np
import orjson
import pytest

from embedtune.config import MineConfig
from embedtune.errors import DataError, EmbedtuneError
from embedtune.io import read_json, read_jsonl, write_jsonl
from embedtune.mining import build_corpus, distinct_queries, select_negatives, top_k
from embedtune.modeling import load_model
from embedtune.overlap import text_key
from embedtune.steps import mine

EMBEDTUNE = Path(sys.executable).parent / "embedtune"

TOPICS = {
    "cats": ["Cats purr when they are content.", "A kitten sleeps most of the day.", "Lions are big cats."],
    "space": ["The moon orbits the earth.", "Mars is called the red planet.", "Jupiter has many moons."],
    "cooking": ["Boil pasta in salted water.", "Bake bread at a high heat.", "Fry onions until golden."],
    "music": ["A violin has four strings.", "Drums keep the rhythm.", "A piano has 88 keys."],
}
QUERIES = {
    "cats": "what do cats do when happy",
    "space": "what goes around the earth",
    "cooking": "how do I cook pasta",
    "music": "how many strings does a violin have",
}


def rows() -> list[dict]:
    return [{"query": QUERIES[t], "response": docs[0]} for t, docs in TOPICS.items()]


def corpus_lines() -> list[str]:
    return [d for docs in TOPICS.values() for d in docs[1:]]


def cfg(tmp_path, model, **kw) -> MineConfig:
    data = write_jsonl(tmp_path / "rows.jsonl", kw.pop("rows", rows()))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(corpus_lines()) + "\n")
    knobs = {"corpus": str(corpus), "num_negatives": 3, "max_length": 32, **kw}
    return MineConfig(dataset=str(data), model=str(model), output=str(tmp_path / "mined.jsonl"), **knobs)


# ------------------------------------------------------------------------------------------------ search
def test_blocked_top_k_equals_the_full_matrix_for_any_block_size():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((37, 8)).astype(np.float32)
    d = rng.standard_normal((101, 8)).astype(np.float32)
    full = q @ d.T
    want = np.argsort(-full, axis=1, kind="stable")[:, :10]
    for qb, db in [(4, 7), (37, 101), (1, 200), (16, 10)]:
        scores, idx = top_k(q, d, 10, query_block=qb, doc_block=db)
        np.testing.assert_array_equal(idx, want)
        np.testing.assert_allclose(scores, np.take_along_axis(full, want, 1), rtol=1e-6)
    scores, idx = top_k(q, d, 500)  # k above the corpus size: the whole ranking
    assert idx.shape == (37, 101)


# ------------------------------------------------------------------------------------------------ selection
class Knobs:
    num_negatives, range_min, range_max, relative_margin, max_score = 2, 0, 100, 0.1, 1.0
    sampling, seed, keep_original_negatives = "top", 0, False


def selection(row_list, corpus, scores_by_text, positive_scores, **knobs):
    """select_negatives on hand-written scores: each query scores every corpus text by `scores_by_text`."""
    cfgk = Knobs()
    for k, v in knobs.items():
        setattr(cfgk, k, v)
    queries, row_query, skip = distinct_queries(row_list)
    doc_keys = np.array([text_key(t) for t in corpus], dtype=np.uint64)
    order = np.argsort([-scores_by_text[t] for t in corpus], kind="stable")
    indices = np.tile(order, (len(queries), 1))
    scores = np.array([[scores_by_text[corpus[i]] for i in order]] * len(queries), dtype=np.float32)
    return select_negatives(
        row_list, row_query, skip, corpus, doc_keys, scores, indices, np.array(positive_scores), cfgk
    )


def test_own_positives_and_the_query_itself_are_never_negatives_even_with_other_case_or_spacing():
    row_list = [{"query": "q", "response": "Pos A"}, {"query": "q", "response": "pos b"}]
    corpus = ["Pos A", "pos b", "POS   a", "Q", "n1", "n2", "n3"]
    scores = {"Pos A": 0.9, "pos b": 0.85, "POS   a": 0.8, "Q": 0.95, "n1": 0.5, "n2": 0.4, "n3": 0.3}
    out, stats = selection(row_list, corpus, scores, [0.9, 0.85], relative_margin=0.0)
    assert [r["rejected_response"] for r in out] == [["n1", "n2"], ["n1", "n2"]]
    assert stats["dropped_false_negatives"] == 0  # the positives were removed before the filters


def test_false_negative_filter_uses_each_rows_own_positive_score_and_the_absolute_cap():
    row_list = [{"query": "q", "response": "p1"}, {"query": "q", "response": "p2"}]
    corpus = ["p1", "p2", "a", "b", "c", "d"]
    scores = {"p1": 0.8, "p2": 0.5, "a": 0.78, "b": 0.6, "c": 0.46, "d": 0.2}
    # row 1 (positive 0.8, margin 0.05 -> threshold 0.76): "a" dropped; row 2 (0.5 -> 0.475): a, b dropped
    out, stats = selection(row_list, corpus, scores, [0.8, 0.5], relative_margin=0.05)
    assert out[0]["rejected_response"] == ["b", "c"] and out[1]["rejected_response"] == ["c", "d"]
    assert stats["dropped_by_relative_margin"] == 3 and stats["dropped_by_max_score"] == 0
    out, stats = selection(row_list, corpus, scores, [0.8, 0.5], relative_margin=0.05, max_score=0.55)
    assert out[0]["rejected_response"] == ["c", "d"]  # the cap also drops "b" (0.6) for row 1
    assert stats["dropped_by_max_score"] == 1 and stats["dropped_false_negatives"] == 4
    assert stats["positive_scores"]["p50"] == pytest.approx(0.65)
    assert stats["negative_scores"]["mean"] == pytest.approx((0.46 + 0.2) / 2, abs=1e-6)


def test_rank_window_counts_after_the_positives_and_random_sampling_is_seeded_and_in_rank_order():
    row_list = [{"query": "q", "response": "p"}]
    corpus = ["p", *(f"n{i}" for i in range(10))]
    scores = {"p": 0.99, **{f"n{i}": 0.9 - i / 20 for i in range(10)}}
    out, _ = selection(row_list, corpus, scores, [0.99], range_min=2, range_max=5, relative_margin=0.0)
    assert out[0]["rejected_response"] == ["n2", "n3"]  # ranks 2, 3 of the non-positives
    picks = [
        selection(row_list, corpus, scores, [0.99], range_min=2, range_max=8, sampling="random", seed=s)[0]
        for s in (1, 1, 2, 3, 4)
    ]
    negs = [p[0]["rejected_response"] for p in picks]
    assert negs[0] == negs[1]  # same seed, same pick
    assert len({tuple(n) for n in negs}) > 1  # other seeds pick others
    window = [f"n{i}" for i in range(2, 8)]
    for n in negs:
        assert len(n) == 2 and set(n) <= set(window) and n == sorted(n, key=window.index)


def test_original_negatives_are_kept_first_when_asked_and_rows_without_candidates_are_counted():
    row_list = [
        {"query": "q", "response": "p", "rejected_response": ["old", "p"], "label": 1},
        {"query": "r", "response": "x"},
    ]
    corpus = ["p", "old", "x", "new"]
    scores = {"p": 0.9, "old": 0.1, "x": 0.95, "new": 0.3}
    out, stats = selection(row_list, corpus, scores, [0.9, 0.05], keep_original_negatives=True)
    # "p" (its own positive) is dropped from the originals; "old" is not repeated among the mined ones
    assert out[0] == {"query": "q", "response": "p", "rejected_response": ["old", "new"], "label": 1}
    assert "rejected_response" not in out[1]  # every candidate of "r" scores above its positive (0.05)
    assert stats["rows_without_negatives"] == 1 and stats["rows_with_fewer_negatives"] == 1


# ------------------------------------------------------------------------------------------------ corpus
def test_corpus_reads_canonical_rows_beir_jsonl_gz_and_plain_text(tmp_path):
    canonical = write_jsonl(
        tmp_path / "rows.jsonl", [{"query": "q", "response": "r", "rejected_response": ["n"]}]
    )
    beir = tmp_path / "corpus.jsonl.gz"
    with gzip.open(beir, "wt") as f:
        f.write(json.dumps({"_id": "1", "title": "Title", "text": "body"}) + "\n")
        f.write(json.dumps({"_id": "2", "title": "", "text": "bare"}) + "\n")
    plain = tmp_path / "lines.txt"
    plain.write_text("one\n\n  two  \n")
    got = build_corpus([{"query": "x", "response": "own"}], [str(canonical), str(beir), str(plain)])
    assert got == ["own", "r", "n", "Title body", "bare", "one", "two"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"id": 3}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: neither a canonical row"):
        build_corpus([], [str(bad)])


# ------------------------------------------------------------------------------------------------ the step
def test_mine_writes_canonical_rows_without_positives_and_stats_beside_them(minilm_path, tmp_path):
    c = cfg(tmp_path, minilm_path, relative_margin=0.05)
    result = mine.run(c)
    out = read_jsonl(c.output)
    assert [(r["query"], r["response"]) for r in out] == [(r["query"], r["response"]) for r in rows()]
    model = load_model(minilm_path, max_length=32)
    candidates = set(build_corpus(rows(), [c.corpus]))
    for row in out:
        negs = row["rejected_response"]
        assert len(negs) == 3 and set(negs) <= candidates and row["response"] not in negs
        q = model.encode([row["query"]], is_query=True)
        pos = float((q @ model.encode([row["response"]]).T)[0, 0])
        scores = (q @ model.encode(negs).T)[0]
        assert (scores <= pos * 0.95 + 1e-5).all()  # positive-aware filter
    stats = read_json(f"{c.output}.stats.json")
    assert stats == result and stats["rows"] == 4 and stats["queries"] == 4 and stats["corpus_texts"] == 12
    assert stats["negatives_mined"] == 12 and not stats["passthrough"]
    assert set(stats["positive_scores"]) == {"p5", "p25", "p50", "p75", "p95", "mean"}
    assert stats["positive_scores"]["mean"] > stats["negative_scores"]["mean"]
    assert stats["rows_per_second"] > 0


def test_passthrough_copies_the_rows_byte_for_byte(tmp_path):
    src = tmp_path / "rows.jsonl"
    src.write_bytes(b'{"query":"q","response":"r"}\n\n{"query": "q2", "response": "r2"}\n')
    c = MineConfig(dataset=str(src), model="not-loaded", output=str(tmp_path / "out.jsonl"), passthrough=True)
    assert mine.run(c) == {**read_json(f"{c.output}.stats.json"), "rows": 2}
    assert Path(c.output).read_bytes() == src.read_bytes()


@pytest.mark.parametrize(
    "knobs, match",
    [
        ({"num_negatives": 0}, "num_negatives"),
        ({"range_min": 5, "range_max": 5}, "range_min"),
        ({"relative_margin": 1.0}, "relative_margin"),
        ({"sampling": "hardest"}, "sampling"),
        ({"corpus": "missing.txt"}, "corpus: missing.txt: file not found"),
    ],
)
def test_bad_knobs_are_refused_before_any_model_is_loaded(tmp_path, knobs, match):
    with pytest.raises(EmbedtuneError, match=match):  # when the config is built, or before any work
        mine.run(cfg(tmp_path, "no-such-model", **knobs))


@pytest.mark.slow
def test_two_torchrun_ranks_mine_what_one_process_mines(minilm_path, tmp_path):
    many = [{"query": f"{q} ({i})", "response": d} for i in range(3) for q, d in
            zip(QUERIES.values(), corpus_lines(), strict=False)]  # fmt: skip
    one = cfg(tmp_path / "one", minilm_path, rows=many, sampling="random", per_device_eval_batch_size=3)
    two = cfg(
        tmp_path / "two", minilm_path, rows=many, sampling="random", per_device_eval_batch_size=3, nproc=2
    )
    r1, r2 = mine.run(one), mine.run(two)
    assert r2["processes"] == 2 and r1["processes"] == 1
    assert read_jsonl(one.output) == read_jsonl(two.output)
    assert r1["negative_scores"] == pytest.approx(r2["negative_scores"], abs=1e-4)


def test_cli_mine_prints_the_stats_as_json(minilm_path, tmp_path):
    import subprocess

    c = cfg(tmp_path, minilm_path)
    proc = subprocess.run(
        [str(EMBEDTUNE), "mine", "--dataset", c.dataset, "--model", c.model, "--output", c.output,
         "--corpus", c.corpus, "--num-negatives", "2", "--sampling", "random", "--max-length", "32"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert orjson.loads(proc.stdout)["negatives_mined"] == 8
    assert "candidates dropped as likely false negatives" in proc.stderr
