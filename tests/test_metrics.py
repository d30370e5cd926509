"""embedtune.metrics against hand-computed values and an independent per-query loop implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr

from embedtune.metrics import (
    STS_METRICS,
    margin_metrics,
    ranking_metrics,
    retrieval_metrics,
    retrieval_per_query,
    sts_metrics,
)


def flat(lists):
    """[[(score, relevant), ...] per query] -> flat (scores, relevant, group) arrays."""
    scores, relevant, group = [], [], []
    for g, cands in enumerate(lists):
        for s, r in cands:
            scores.append(s)
            relevant.append(r)
            group.append(g)
    return np.array(scores, dtype=float), np.array(relevant, dtype=bool), np.array(group)


def loop_reference(lists):
    """Textbook per-query loops: sort by score desc (negatives first on ties), then AP / RR@10 / nDCG@10."""
    aps, rrs, ndcgs = [], [], []
    for cands in lists:
        ranked = [r for s, r in sorted(cands, key=lambda c: (-c[0], c[1]))]
        n_pos = sum(ranked)
        if n_pos == 0:
            continue
        hits, ap, rr, dcg = 0, 0.0, 0.0, 0.0
        for i, r in enumerate(ranked, 1):
            if r:
                hits += 1
                ap += hits / i
                if i <= 10:
                    rr = rr or 1 / i
                    dcg += 1 / math.log2(i + 1)
        aps.append(ap / n_pos)
        rrs.append(rr)
        ndcgs.append(dcg / sum(1 / math.log2(i + 1) for i in range(1, min(n_pos, 10) + 1)))
    return {"map": np.mean(aps), "mrr_at_10": np.mean(rrs), "ndcg_at_10": np.mean(ndcgs)}


def test_perfect_ranking_scores_one():
    lists = [[(0.9, True), (0.5, False), (0.1, False)], [(0.8, True), (0.7, True), (0.2, False)]]
    assert ranking_metrics(*flat(lists)) == {"map": 1.0, "mrr_at_10": 1.0, "ndcg_at_10": 1.0}


def test_single_positive_ranked_last_of_three_gives_hand_values():
    m = ranking_metrics(*flat([[(0.1, True), (0.5, False), (0.9, False)]]))
    assert m["mrr_at_10"] == pytest.approx(1 / 3)
    assert m["map"] == pytest.approx(1 / 3)
    assert m["ndcg_at_10"] == pytest.approx(1 / math.log2(4))  # = 0.5


def test_two_positives_at_ranks_two_and_four_give_hand_values():
    # ranking: neg, pos, neg, pos
    m = ranking_metrics(*flat([[(0.9, False), (0.8, True), (0.7, False), (0.6, True)]]))
    assert m["map"] == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert m["mrr_at_10"] == pytest.approx(1 / 2)
    ideal = 1 + 1 / math.log2(3)
    assert m["ndcg_at_10"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(5)) / ideal)


def test_positive_below_rank_ten_counts_for_map_only():
    cands = [(1.0 - i / 20, False) for i in range(11)] + [(0.0, True)]  # positive at rank 12
    m = ranking_metrics(*flat([cands]))
    assert m["mrr_at_10"] == 0.0
    assert m["ndcg_at_10"] == 0.0
    assert m["map"] == pytest.approx(1 / 12)


def test_ties_rank_negatives_above_positives():
    m = ranking_metrics(*flat([[(0.5, True), (0.5, False), (0.5, False)]]))
    assert m["mrr_at_10"] == pytest.approx(
        1 / 3
    )  # a constant-score model gets the worst, not a perfect, value


def test_queries_are_averaged_and_queries_without_positives_skipped():
    lists = [[(0.9, True), (0.1, False)], [(0.1, True), (0.9, False)], [(0.3, False), (0.2, False)]]
    m = ranking_metrics(*flat(lists))
    assert m["mrr_at_10"] == pytest.approx((1 + 1 / 2) / 2)


def test_ranking_matches_loop_reference_on_random_lists():
    rng = np.random.default_rng(7)
    lists = []
    for _ in range(200):
        n = int(rng.integers(2, 30))
        scores = np.round(rng.normal(size=n), 1)  # rounding makes ties happen
        rel = rng.random(n) < 0.3
        rel[0] = True
        lists.append(list(zip(scores.tolist(), rel.tolist(), strict=True)))
    scores, relevant, group = flat(lists)
    perm = rng.permutation(len(scores))  # the flat order must not matter
    got = ranking_metrics(scores[perm], relevant[perm], group[perm])
    want = loop_reference(lists)
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-12), k


def test_margin_is_mean_positive_minus_hardest_own_negative():
    lists = [[(0.9, True), (0.7, True), (0.5, False), (0.6, False)], [(0.4, True), (0.8, False)]]
    m = margin_metrics(*flat(lists))
    assert m["mean_pos"] == pytest.approx((0.9 + 0.7 + 0.4) / 3)
    assert m["mean_neg"] == pytest.approx((0.5 + 0.6 + 0.8) / 3)
    assert m["margin"] == pytest.approx(((0.8 - 0.6) + (0.4 - 0.8)) / 2)


def test_sts_metrics_match_scipy_on_negated_distances():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(50, 8)), rng.normal(size=(50, 8))
    labels = rng.random(50)
    m = sts_metrics(a, b, labels)
    assert list(m) == list(STS_METRICS)
    cos = [x @ y / np.linalg.norm(x) / np.linalg.norm(y) for x, y in zip(a, b, strict=True)]
    euc = [-np.linalg.norm(x - y) for x, y in zip(a, b, strict=True)]
    man = [-np.abs(x - y).sum() for x, y in zip(a, b, strict=True)]
    dot = [x @ y for x, y in zip(a, b, strict=True)]
    for name, s in {"cosine": cos, "euclidean": euc, "manhattan": man, "dot": dot}.items():
        assert m[f"pearson_{name}"] == pytest.approx(pearsonr(s, labels)[0], abs=1e-12)
        assert m[f"spearman_{name}"] == pytest.approx(spearmanr(s, labels)[0], abs=1e-12)


def test_sts_metrics_of_identical_pairs_are_zero_not_nan():
    a = np.ones((4, 3))
    m = sts_metrics(a, a, [0.1, 0.2, 0.3, 0.4])  # every score equal: no correlation
    assert all(v == 0.0 for v in m.values())


# --------------------------------------------------------------------------------------------- retrieval
def as_embeddings(score_matrix):
    """(Q, D) scores -> (query_emb, doc_emb) whose dot products are exactly those scores."""
    s = np.asarray(score_matrix, dtype=np.float64)
    return np.eye(len(s)), s.T.copy()


def full_reference(score_matrix, qi, di):
    """ranking_metrics + margin_metrics on the flattened (Q x D) candidate lists: the unchunked truth."""
    s = np.asarray(score_matrix, dtype=np.float64)
    relevant = np.zeros(s.shape, dtype=bool)
    relevant[qi, di] = True
    group = np.repeat(np.arange(len(s)), s.shape[1])
    flat_args = (s.ravel(), relevant.ravel(), group)
    return {**ranking_metrics(*flat_args), **margin_metrics(*flat_args)}


def test_retrieval_with_each_query_closest_to_its_document_scores_one():
    q = d = np.eye(4)
    m = retrieval_metrics(q, d, np.arange(4), np.arange(4))
    assert m == {
        "map": 1.0,
        "mrr_at_10": 1.0,
        "ndcg_at_10": 1.0,
        "mean_pos": 1.0,
        "mean_neg": 0.0,
        "margin": 1.0,
    }


def test_retrieval_positive_at_rank_three_gives_hand_values():
    # one query, corpus of 4: the relevant document (index 0) scores 0.5, two documents score above it
    q, d = as_embeddings([[0.5, 0.9, 0.1, 0.8]])
    m = retrieval_metrics(q, d, [0], [0])
    assert m["mrr_at_10"] == pytest.approx(1 / 3)
    assert m["map"] == pytest.approx(1 / 3)
    assert m["ndcg_at_10"] == pytest.approx(1 / math.log2(4))  # = 0.5
    assert m["mean_pos"] == pytest.approx(0.5)
    assert m["mean_neg"] == pytest.approx((0.9 + 0.1 + 0.8) / 3)
    assert m["margin"] == pytest.approx(0.5 - 0.9)  # the hardest non-relevant document of the corpus


def test_retrieval_two_positives_and_a_query_without_any_are_averaged_by_hand():
    scores = [
        [0.9, 0.8, 0.7, 0.6, 0.0],  # relevant: docs 1 and 3 -> ranks 2 and 4
        [0.1, 0.2, 0.3, 0.4, 0.5],  # relevant: doc 4 -> rank 1
        [0.5, 0.5, 0.5, 0.5, 0.5],  # no relevant document: left out of every mean but mean_neg
    ]
    m = retrieval_metrics(*as_embeddings(scores), [0, 0, 1], [1, 3, 4])
    ap0, ndcg0 = (1 / 2 + 2 / 4) / 2, (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3))
    assert m["map"] == pytest.approx((ap0 + 1) / 2)
    assert m["mrr_at_10"] == pytest.approx((1 / 2 + 1) / 2)
    assert m["ndcg_at_10"] == pytest.approx((ndcg0 + 1) / 2)
    assert m["mean_pos"] == pytest.approx((0.8 + 0.6 + 0.5) / 3)
    assert m["mean_neg"] == pytest.approx((0.9 + 0.7 + 0.0 + 0.1 + 0.2 + 0.3 + 0.4 + 2.5) / 12)
    assert m["margin"] == pytest.approx(((0.7 - 0.9) + (0.5 - 0.4)) / 2)


def test_retrieval_ties_rank_non_relevant_documents_first():
    m = retrieval_metrics(*as_embeddings([[0.5, 0.5, 0.5]]), [0], [1])
    assert m["mrr_at_10"] == pytest.approx(1 / 3)  # a collapsed model gets the worst rank, not the best


def test_retrieval_positive_deep_in_the_corpus_counts_for_map_exactly():
    scores = np.linspace(1.0, 0.0, 500)[None, :]  # the relevant document is 300th of 500
    m = retrieval_metrics(*as_embeddings(scores), [0], [299], block=64)
    assert (m["mrr_at_10"], m["ndcg_at_10"]) == (0.0, 0.0)
    assert m["map"] == pytest.approx(1 / 300)


@pytest.mark.parametrize("block", [1, 7, 50, 1 << 22])
def test_retrieval_in_blocks_equals_ranking_metrics_on_the_full_matrix(block):
    rng = np.random.default_rng(3)
    n_q, n_d = 23, 41
    scores = np.round(rng.normal(size=(n_q, n_d)), 1)  # rounding makes ties happen
    qi = np.concatenate([rng.integers(0, n_q - 2, 60), [0, 0]])  # queries n_q-2, n_q-1 have no positive
    di = np.concatenate([rng.integers(0, n_d, 60), [5, 5]])  # duplicate pairs count once
    got = retrieval_metrics(*as_embeddings(scores), qi, di, block=block)
    want = full_reference(scores, qi, di)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-12), k


def test_retrieval_blocks_do_not_change_results_on_float_embeddings():
    rng = np.random.default_rng(0)
    q, d = rng.normal(size=(37, 16)), rng.normal(size=(53, 16))
    qi, di = rng.integers(0, 37, 80), rng.integers(0, 53, 80)
    whole = retrieval_metrics(q, d, qi, di)
    assert retrieval_metrics(q, d, qi, di, block=3) == pytest.approx(whole, abs=1e-12)
    assert whole == pytest.approx(full_reference(q @ d.T, qi, di), abs=1e-12)


def test_retrieval_on_a_10k_corpus_never_holds_a_full_score_matrix():
    import tracemalloc

    rng = np.random.default_rng(0)
    n, h = 10_000, 16
    q = rng.normal(size=(n, h)).astype(np.float32)
    d = (q + 0.5 * rng.normal(size=(n, h))).astype(np.float32)  # document i is a noisy copy of query i
    tracemalloc.start()
    try:
        per = retrieval_per_query(q, d, np.arange(n), np.arange(n))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 150 * 2**20, peak / 2**20  # the full (10k x 10k) float64 matrix alone is 763 MiB
    assert per["n_neg"].sum() == n * (n - 1)
    assert 0.0 < per["ndcg_at_10"].mean() < 1.0
