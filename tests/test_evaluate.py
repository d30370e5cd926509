"""evaluate on the real all-MiniLM-L6-v2 and the tiny random Qwen3 (embedder and reranker), small fixtures."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_metrics import loop_reference

from embedtune import cli, scoring
from embedtune.config import EvaluateConfig
from embedtune.errors import DataError, EmbedtuneError
from embedtune.evaldata import EvalData, read_eval_data
from embedtune.io import read_jsonl
from embedtune.metrics import STS_METRICS, margin_metrics, ranking_metrics, sts_metrics
from embedtune.modeling import Embedder, Reranker
from embedtune.scoring import retrieval_plot, row_dots
from embedtune.steps import evaluate


@pytest.fixture(scope="module")
def tiny_reranker(tiny_qwen3_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-reranker")
    Reranker.from_pretrained(tiny_qwen3_path).save_pretrained(out, meta={"base_model": str(tiny_qwen3_path)})
    return out


def test_sts_with_baseline_reports_deltas_equal_to_tuned_minus_base(
    minilm_path, tiny_qwen3_path, fixtures_dir, tmp_path
):
    out = tmp_path / "m.json"
    cfg = EvaluateConfig(
        model=str(minilm_path),
        eval_data=str(fixtures_dir / "eval" / "sts.jsonl"),
        output=str(out),
        baseline_model=str(tiny_qwen3_path),
    )
    result = evaluate.run(cfg)
    assert result == json.loads(out.read_text())
    assert result["data_shape"] == "sts" and result["primary_metric"] == "spearman_cosine"
    assert list(result["metrics"]) == list(STS_METRICS)
    assert result["primary_value"] == result["metrics"]["spearman_cosine"]
    for k, v in result["metrics"].items():
        assert result["deltas"][f"delta_{k}"] == pytest.approx(v - result["baseline_metrics"][k], abs=1e-12)
    # a real sentence model beats a random tiny one on real sentence pairs
    assert result["metrics"]["spearman_cosine"] > result["baseline_metrics"]["spearman_cosine"]

    rows = read_jsonl(fixtures_dir / "eval" / "sts.jsonl")
    model = Embedder.from_pretrained(minilm_path)
    want = sts_metrics(
        model.encode([r["query"] for r in rows], is_query=True),
        model.encode([r["response"] for r in rows]),
        [r["label"] for r in rows],
    )
    assert result["metrics"] == pytest.approx(want, abs=1e-5)

    report = (tmp_path / "m.json.md").read_text()
    assert result["report"] == str(tmp_path / "m.json.md")
    assert "| metric | base | tuned | delta |" in report
    assert "| **spearman_cosine** |" in report
    assert report.count("](data:image/png;base64,") == 2
    assert len(report) < 400_000  # the Kubeflow UI's Markdown viewer shows this many characters


def test_ranking_groups_candidates_by_query_and_matches_independent_computation(
    minilm_path, fixtures_dir, tmp_path
):
    path = fixtures_dir / "eval" / "ranking.jsonl"
    result = evaluate.run(
        EvaluateConfig(model=str(minilm_path), eval_data=str(path), output=str(tmp_path / "r.json"))
    )
    assert result["data_shape"] == "ranking" and result["primary_metric"] == "ndcg_at_10"
    assert "deltas" not in result and result["baseline_model"] is None
    # 6 rows, 5 queries; the cold query has no negative (skipped); the sky query's first negative equals its
    # positive (dropped); cats: 2 positives + 4 distinct negatives.
    assert (result["n_rows"], result["n_queries"], result["n_queries_skipped"], result["n_pairs"]) == (
        6,
        4,
        1,
        16,
    )

    # independent: per query, positives = its responses, negatives = distinct other rejected texts
    groups: dict[str, tuple[list, list]] = {}
    for r in read_jsonl(path):
        pos, neg = groups.setdefault(r["query"], ([], []))
        pos.append(r["response"])
        neg += [t for t in r.get("rejected_response", []) if t not in neg]
    model = Embedder.from_pretrained(minilm_path)
    lists, flat = [], ([], [], [])
    for g, (q, (pos, neg)) in enumerate(groups.items()):
        neg = [t for t in neg if t not in pos]
        if not neg:
            continue
        qv = model.encode([q], is_query=True)[0]
        cands = [(float(model.encode([t])[0] @ qv), t in pos) for t in pos + neg]
        lists.append(cands)
        for s, rel in cands:
            flat[0].append(s), flat[1].append(rel), flat[2].append(g)
    want = {**loop_reference(lists), **margin_metrics(*flat)}
    assert result["metrics"] == pytest.approx(want, abs=1e-5)
    assert 0.0 < result["metrics"]["map"] <= 1.0

    report = (tmp_path / "r.json.md").read_text()
    assert "| metric | tuned |" in report and "| **ndcg_at_10** |" in report
    assert "positives vs negatives" in report and report.count("data:image/png;base64,") == 2


def test_reranker_ranking_metrics_come_from_its_scores(
    tiny_reranker, tiny_qwen3_path, fixtures_dir, tmp_path
):
    path = fixtures_dir / "eval" / "ranking.jsonl"
    result = evaluate.run(
        EvaluateConfig(
            model=str(tiny_reranker),
            eval_data=str(path),
            output=str(tmp_path / "r.json"),
            baseline_model=str(tiny_qwen3_path),
            report=str(tmp_path / "report.md"),
        )
    )
    assert result["task_type"] == "reranker" and (tmp_path / "report.md").is_file()
    # the baseline is the reranker's own base_model: loaded as a reranker with its settings -> same weights
    assert all(v == pytest.approx(0.0, abs=1e-9) for v in result["deltas"].values())

    reranker = Reranker.from_pretrained(tiny_reranker)
    scores, relevant, group = [], [], []
    groups: dict[str, tuple[list, list]] = {}
    for r in read_jsonl(path):
        pos, neg = groups.setdefault(r["query"], ([], []))
        pos.append(r["response"])
        neg += [t for t in r.get("rejected_response", []) if t not in neg and t not in pos]
    for g, (q, (pos, neg)) in enumerate(groups.items()):
        if neg:
            scores += reranker.score(q, pos + neg)
            relevant += [True] * len(pos) + [False] * len(neg)
            group += [g] * (len(pos) + len(neg))
    want = {**ranking_metrics(scores, relevant, group), **margin_metrics(scores, relevant, group)}
    assert result["metrics"] == pytest.approx(want, abs=1e-5)


def test_unknown_primary_metric_lists_the_available_ones(fixtures_dir, tmp_path):
    cfg = EvaluateConfig(
        model="unused",
        eval_data=str(fixtures_dir / "eval" / "ranking.jsonl"),
        output=str(tmp_path / "m.json"),
        primary_metric="spearman_cosine",
    )
    with pytest.raises(EmbedtuneError, match="available: map, mrr_at_10, ndcg_at_10, mean_pos"):
        evaluate.run(cfg)


def test_bad_row_names_file_and_line_and_cli_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "response": "a", "label": 0.5}\n{"query": "q2", "label": 0.1}\n')
    with pytest.raises(DataError, match=rf"{bad}:2: response: missing"):
        read_eval_data(str(bad))
    code = cli.main(
        ["evaluate", "--model", "x", "--eval-data", str(bad), "--output", str(tmp_path / "o.json")]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: response: missing" in err and "Traceback" not in err
    assert not (tmp_path / "o.json").exists()


def test_sts_rows_missing_a_label_name_the_line(tmp_path):
    f = tmp_path / "mixed.jsonl"
    f.write_text('{"query": "a", "response": "b", "label": 0.5}\n{"query": "c", "response": "d"}\n')
    with pytest.raises(DataError, match=rf"{f}:2: label: missing .* drop every label to evaluate the pairs"):
        read_eval_data(str(f))


def test_pairs_without_labels_or_negatives_rank_each_query_against_all_responses(tmp_path):
    f = tmp_path / "pairs.jsonl"
    rows = [("q1", "a"), ("q1", "b"), ("q2", "c"), ("q3", "a"), ("q1", "a")]
    f.write_text("".join(json.dumps({"query": q, "response": r}) + "\n" for q, r in rows))
    data = read_eval_data(str(f))
    assert data.shape == "retrieval" and data.docs == ["a", "b", "c"] and data.queries == ["q1", "q2", "q3"]
    # relevant pairs: q1-a, q1-b (the repeated row counts once), q2-c, q3-a (a response shared by queries)
    assert sorted(zip(data.qi.tolist(), data.di.tolist(), strict=True)) == [(0, 0), (0, 1), (1, 2), (2, 0)]
    assert (data.n_rows, data.n_pairs, data.n_queries_skipped) == (5, 9, 0)


def test_retrieval_query_paired_with_every_response_is_skipped_and_counted(tmp_path):
    f = tmp_path / "pairs.jsonl"
    f.write_text(
        '{"query": "q1", "response": "a"}\n{"query": "q1", "response": "b"}\n{"query": "q2", "response": "b"}\n'
    )
    data = read_eval_data(str(f))
    assert data.queries == ["q2"] and data.n_queries_skipped == 1 and data.n_pairs == 2


def test_retrieval_with_a_single_response_is_refused(tmp_path):
    f = tmp_path / "pairs.jsonl"
    f.write_text('{"query": "a", "response": "b"}\n{"query": "c", "response": "b"}\n')
    with pytest.raises(DataError, match="retrieval needs at least 2 distinct responses"):
        read_eval_data(str(f))


def test_some_rows_with_negatives_make_the_whole_file_ranking(tmp_path):
    f = tmp_path / "mixed.jsonl"
    f.write_text(
        '{"query": "q1", "response": "a", "rejected_response": ["x"]}\n{"query": "q2", "response": "b"}\n'
    )
    data = read_eval_data(str(f))
    assert data.shape == "ranking" and data.queries == ["q1"] and data.n_queries_skipped == 1


def test_retrieval_on_related_pairs_ranks_far_above_chance_and_matches_the_full_matrix(
    minilm_path, tiny_qwen3_path, fixtures_dir, tmp_path
):
    path = fixtures_dir / "eval" / "pairs.jsonl"
    result = evaluate.run(
        EvaluateConfig(
            model=str(minilm_path),
            eval_data=str(path),
            output=str(tmp_path / "r.json"),
            baseline_model=str(tiny_qwen3_path),
        )
    )
    assert result == json.loads((tmp_path / "r.json").read_text())
    assert result["data_shape"] == "retrieval" and result["primary_metric"] == "ndcg_at_10"
    rows = read_jsonl(path)
    queries = list(dict.fromkeys(r["query"] for r in rows))
    docs = list(dict.fromkeys(r["response"] for r in rows))
    assert (result["n_rows"], result["n_queries"], result["n_docs"]) == (len(rows), len(queries), len(docs))
    assert result["n_pairs"] == len(queries) * len(docs)
    assert list(result["metrics"]) == ["map", "mrr_at_10", "ndcg_at_10", "mean_pos", "mean_neg", "margin"]
    for k, v in result["metrics"].items():
        assert result["deltas"][f"delta_{k}"] == pytest.approx(v - result["baseline_metrics"][k], abs=1e-12)

    # independent: the full (Q x D) cosine matrix through the ranking code, one list per query
    model = Embedder.from_pretrained(minilm_path)
    scores = model.encode(queries, is_query=True) @ model.encode(docs).T
    relevant = np.zeros(scores.shape, dtype=bool)
    for r in rows:
        relevant[queries.index(r["query"]), docs.index(r["response"])] = True
    group = np.repeat(np.arange(len(queries)), len(docs))
    flat = (scores.ravel(), relevant.ravel(), group)
    want = {**ranking_metrics(*flat), **margin_metrics(*flat)}
    assert result["metrics"] == pytest.approx(want, abs=1e-5)

    # chance: the one relevant document of 21 at a uniformly random rank gives nDCG@10 ~ 0.2
    assert result["metrics"]["ndcg_at_10"] > 0.9
    assert result["metrics"]["ndcg_at_10"] > result["baseline_metrics"]["ndcg_at_10"] + 0.3

    report = (tmp_path / "r.json.md").read_text()
    assert f"{len(queries)} queries x a corpus of {len(docs)} documents" in report
    assert "| **ndcg_at_10** |" in report and "| metric | base | tuned | delta |" in report
    assert report.count("](data:image/png;base64,") == 2


def test_reranker_refuses_retrieval_data(tiny_reranker, fixtures_dir, tmp_path):
    cfg = EvaluateConfig(
        model=str(tiny_reranker),
        eval_data=str(fixtures_dir / "eval" / "pairs.jsonl"),
        output=str(tmp_path / "m.json"),
    )
    with pytest.raises(EmbedtuneError, match=r"is a reranker: .* without rejected_response \(retrieval\)"):
        evaluate.run(cfg)
    assert not (tmp_path / "m.json").exists()


def test_pair_scores_are_gathered_without_a_full_matrix():
    rng = np.random.default_rng(0)
    q, d = rng.normal(size=(5, 4)), rng.normal(size=(7, 4))
    qi, di = rng.integers(0, 5, 100), rng.integers(0, 7, 100)
    assert row_dots(q, d, qi, di) == pytest.approx((q @ d.T)[qi, di])


def test_baseline_that_is_the_base_model_is_measured_with_the_training_settings(
    tiny_qwen3_path, fixtures_dir, tmp_path
):
    # same weights as the base, but mean pooling + a query instruction (the base alone would pool `last`)
    tuned = tmp_path / "tuned"
    Embedder.from_pretrained(tiny_qwen3_path, pooling="mean", query_instruction="Query: ").save_pretrained(
        tuned, meta={"base_model": str(tiny_qwen3_path) + "/"}
    )
    cfg = EvaluateConfig(
        model=str(tuned),
        eval_data=str(fixtures_dir / "eval" / "sts.jsonl"),
        output=str(tmp_path / "m.json"),
        baseline_model=str(tiny_qwen3_path),
    )
    result = evaluate.run(cfg)
    assert all(v == pytest.approx(0.0, abs=1e-9) for v in result["deltas"].values())


def test_reranker_refuses_sts_data(tiny_reranker, fixtures_dir, tmp_path):
    cfg = EvaluateConfig(
        model=str(tiny_reranker),
        eval_data=str(fixtures_dir / "eval" / "sts.jsonl"),
        output=str(tmp_path / "m.json"),
    )
    with pytest.raises(EmbedtuneError, match="is a reranker: it needs ranking eval data"):
        evaluate.run(cfg)


def test_retrieval_plot_shows_every_negative_of_a_small_corpus_and_a_bounded_sample_of_a_big_one(
    monkeypatch,
):
    rng = np.random.default_rng(1)
    q, d = rng.normal(size=(30, 4)), rng.normal(size=(40, 4))
    data = EvalData(
        "retrieval", 30, ["q"] * 30, ["d"] * 40, np.arange(30), np.arange(30), relevant=np.ones(30, bool)
    )
    plot = retrieval_plot(q, d, data)
    assert plot["relevant"].sum() == 30 and (~plot["relevant"]).sum() == 30 * 40 - 30
    assert sorted(plot["scores"]) == pytest.approx(sorted((q @ d.T).ravel()))
    monkeypatch.setattr(scoring, "PLOT_NEGATIVES", 100)
    plot = retrieval_plot(q, d, data)
    assert plot["negatives"] == "sampled" and 0 < (~plot["relevant"]).sum() <= 100


def test_guard_sets_are_measured_for_the_model_and_its_baseline_and_a_drop_is_flagged(
    minilm_path, tiny_qwen3_path, fixtures_dir, tmp_path
):
    """MiniLM against a random tiny Qwen3 as 'baseline' on two guard sets: every guard number equals a plain
    evaluate of that file; the random model loses nothing, MiniLM gains, so swapping roles flags a drop."""
    sts, ranking = fixtures_dir / "eval" / "sts.jsonl", fixtures_dir / "eval" / "ranking.jsonl"
    guards = f"general={sts},qa={ranking}"
    out = tmp_path / "m.json"
    result = evaluate.run(EvaluateConfig(model=str(minilm_path), eval_data=str(ranking), output=str(out),
                                         baseline_model=str(tiny_qwen3_path), guard_data=guards,
                                         max_guard_drop=0.0))  # fmt: skip
    assert result["guard_failures"] == [] and set(result["guards"]) == {"general", "qa"}
    plain = evaluate.run(
        EvaluateConfig(model=str(minilm_path), eval_data=str(sts), output=str(tmp_path / "p.json"))
    )
    g = result["guards"]["general"]
    assert g["primary_metric"] == "spearman_cosine" and g["value"] == pytest.approx(
        plain["primary_value"], abs=1e-9
    )
    assert g["delta"] == pytest.approx(g["value"] - g["baseline_value"]) and g["delta"] > 0.05
    assert result["guards"]["qa"]["value"] == pytest.approx(result["primary_value"], abs=1e-9)  # same file
    assert "## guard sets" in (tmp_path / "m.json.md").read_text()

    swapped = evaluate.run(EvaluateConfig(model=str(tiny_qwen3_path), eval_data=str(ranking),
                                          output=str(tmp_path / "s.json"), baseline_model=str(minilm_path),
                                          guard_data=guards, max_guard_drop=0.05))  # fmt: skip
    assert "general" in swapped["guard_failures"]
    assert "**dropped**" in (tmp_path / "s.json.md").read_text()


@pytest.mark.parametrize(
    ("guard_data", "drop", "message"),
    [
        ("general", -1.0, "'general' is not NAME=FILE"),
        ("a=x.jsonl,a=y.jsonl", -1.0, "'a' is named twice"),
        ("", 0.1, "max_guard_drop: needs guard_data and a baseline_model"),
        ("a=x.jsonl", -0.5, "must be -1 .off. or >= 0"),
    ],
)
def test_bad_guard_knobs_are_one_line(tmp_path, guard_data, drop, message):
    with pytest.raises(EmbedtuneError, match=message):
        evaluate.run(EvaluateConfig(model="m", eval_data="e.jsonl", output=str(tmp_path / "o.json"),
                                    guard_data=guard_data, max_guard_drop=drop, baseline_model="b" if drop != 0.1 else ""))  # fmt: skip
