"""Evaluation metrics as plain numpy functions: no models, no files, easy to check by hand.

Four families, named exactly as they are logged (MLflow rejects `@`, so `ndcg_at_10`, not `ndcg@10`):

**Paired scores vs gold labels** (STS-style rows `{"query", "response", "label"}`), the 8 values of
sentence-transformers' `EmbeddingSimilarityEvaluator` (and ms-swift's embedding eval, which calls the dot
ones `_dot_product`)::

    sts_metrics(emb_a, emb_b, labels)
    # {"pearson_cosine", "spearman_cosine", "pearson_euclidean", "spearman_euclidean",
    #  "pearson_manhattan", "spearman_manhattan", "pearson_dot", "spearman_dot"}

  cosine = a.b / (|a||b|); euclidean = -|a - b|_2; manhattan = -|a - b|_1; dot = a.b. Distances are
  NEGATED so that for every score "higher means more similar" and a good model has positive correlations.
  Pearson and Spearman are scipy's `pearsonr` / `spearmanr`. A constant score vector (a collapsed model) has
  no correlation with the labels: scipy says NaN, we report 0.0 so the number can be logged and compared.

**Ranking** over each query's FULL candidate list (MTEB reranking semantics: every positive and every
negative of the query, nothing sampled), binary relevance. Candidates are given as flat arrays (one entry
per (query, candidate) pair) with a `group` id per query, so any number of candidates per query is fine and
nothing is O(queries x all candidates)::

    ranking_metrics(scores, relevant, group)   # {"map", "mrr_at_10", "ndcg_at_10"}

  - `map`: mean over queries of average precision over the whole list,
    AP = (1 / n_pos) * sum over positives of (positives at or above its rank) / its rank.
  - `mrr_at_10`: mean over queries of 1 / rank of the first positive, 0 when it is below rank 10.
  - `ndcg_at_10`: DCG@10 = sum over positives at rank r <= 10 of 1 / log2(r + 1), divided by the ideal DCG
    of the same query (all its positives on top: sum_{i=1..min(n_pos, 10)} 1 / log2(i + 1)).
  - Ties are broken AGAINST the model: at equal score, negatives rank above positives. A collapsed model
    that gives every candidate the same score gets the worst value, never a perfect one. (MTEB breaks ties
    by its sort's order; it matters only for exact float ties, which trained models practically never make.)
  - Queries with no positive are skipped (their metrics are undefined); the caller decides about queries
    with no negative (a list of positives only scores 1.0 trivially).

**Retrieval** over a whole corpus (query/response pairs without negatives, e.g. ms-swift's infonce
positive pairs): each query is ranked against EVERY document, relevant = the documents paired with it::

    retrieval_metrics(query_emb, doc_emb, qi, di)   # ranking + separation names, same definitions

  - scores are dot products `query_emb @ doc_emb.T` (pass unit vectors, as `Embedder.encode` returns, to
    rank by cosine); `(qi[m], di[m])` are the relevant (query, document) pairs.
  - Exact, never sampled, and memory-bounded: the (Q, D) score matrix is computed `block // D` query rows
    at a time. The full ranking is never sorted: the rank of a positive is 1 + (its query's positives
    scoring above it) + (non-relevant documents scoring at or above it, ties against the model), counted
    with one comparison per (positive, document). Every metric is a function of the positives' ranks, so
    `map` (which needs the rank of every positive, however deep) is exact, as are `mrr_at_10` and
    `ndcg_at_10`; they equal `ranking_metrics` on the flattened (Q x D) candidate lists.
  - `mean_neg` is over ALL (query, non-relevant document) pairs (exact, from row sums), and `margin`'s
    hardest negative is the best-scoring non-relevant document of the WHOLE corpus, so unlike the ranking
    margin it depends on the corpus: a bigger corpus holds harder negatives and gives a lower margin.
    Compare margins only on the same eval file.

**Separation** of positives and negatives (ms-swift's infonce eval names)::

    margin_metrics(scores, relevant, group)    # {"mean_pos", "mean_neg", "margin"}

  - `mean_pos`: mean score of all (query, positive) pairs; `mean_neg`: mean score of all (query, own
    negative) pairs.
  - `margin`: mean over queries of (mean score of the query's positives - score of its HARDEST own negative,
    i.e. its highest-scoring one). Positive means that on average the positives beat even the hardest
    negative; it uses each query's own candidates only, so it does not depend on the eval set's size
    (ms-swift's infonce margin compares against the whole eval set and does). Queries without a negative are
    left out of `margin`.
"""

from __future__ import annotations

import warnings

import numpy as np

STS_METRICS = tuple(
    f"{c}_{s}" for s in ("cosine", "euclidean", "manhattan", "dot") for c in ("pearson", "spearman")
)
RANKING_METRICS = ("map", "mrr_at_10", "ndcg_at_10")
MARGIN_METRICS = ("mean_pos", "mean_neg", "margin")
TOP_K = 10
BLOCK = 1 << 22  # retrieval: scores per (queries, corpus) block, 32 MiB in float64; bounds every temporary


# --------------------------------------------------------------------------------------------- paired (STS)
def paired_scores(emb_a: np.ndarray, emb_b: np.ndarray) -> dict[str, np.ndarray]:
    """(N, H), (N, H) -> {"cosine", "euclidean", "manhattan", "dot"}: (N,) scores, higher = more similar."""
    a = np.asarray(emb_a, dtype=np.float64)
    b = np.asarray(emb_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"paired embeddings must both be (N, H), got {a.shape} and {b.shape}")
    dot = np.einsum("ij,ij->i", a, b)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return {
        "cosine": dot / np.maximum(norms, 1e-12),
        "euclidean": -np.linalg.norm(a - b, axis=1),
        "manhattan": -np.abs(a - b).sum(axis=1),
        "dot": dot,
    }


def correlations(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(pearson, spearman) of scores vs labels; 0.0 where the scores are constant (scipy: NaN)."""
    from scipy.stats import pearsonr, spearmanr

    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    if len(scores) < 2 or np.ptp(labels) == 0:
        raise ValueError("correlations need at least 2 pairs and labels that are not all equal")
    if np.ptp(scores) == 0:
        return 0.0, 0.0
    with warnings.catch_warnings():  # near-constant inputs warn; the value is still defined
        warnings.simplefilter("ignore")
        return float(pearsonr(scores, labels)[0]), float(spearmanr(scores, labels)[0])


def sts_metrics(emb_a: np.ndarray, emb_b: np.ndarray, labels) -> dict[str, float]:
    """The 8 pearson/spearman x cosine/euclidean/manhattan/dot correlations of paired embeddings."""
    out = {}
    for name, s in paired_scores(emb_a, emb_b).items():
        out[f"pearson_{name}"], out[f"spearman_{name}"] = correlations(s, labels)
    return {k: out[k] for k in STS_METRICS}


# --------------------------------------------------------------------------------------------- ranking
def _sorted_groups(scores, relevant, group):
    """Sort candidates by (query, score desc, negatives first on ties); return sorted arrays + positions.

    Returns (rel, g, rank, starts, n_groups): `rel`/`g` in sorted order, `rank` 1-based within the query,
    `starts[q]` the first sorted index of query q.
    """
    scores = np.asarray(scores, dtype=np.float64)
    relevant = np.asarray(relevant, dtype=bool)
    group = np.asarray(group, dtype=np.int64)
    if not scores.shape == relevant.shape == group.shape or scores.ndim != 1:
        raise ValueError("scores, relevant and group must be 1-D arrays of the same length")
    n_groups = int(group.max()) + 1 if len(group) else 0
    order = np.lexsort((relevant, -scores, group))  # last key is primary: group, then -score, then neg first
    g = group[order]
    rel = relevant[order]
    starts = np.searchsorted(g, np.arange(n_groups))  # (Q,) first index of each query
    rank = np.arange(len(g)) - starts[g] + 1
    return rel, g, rank, starts, n_groups


def _per_query_from_ranks(g, rank, hits, n_pos, n_groups) -> dict[str, np.ndarray]:
    """Per-query AP, RR@10, nDCG@10 from the POSITIVES alone: that is all these metrics depend on.

    `g`, `rank`, `hits`: (P,) per positive candidate, its query id, its 1-based rank in its query's full
    list, and the number of positives at or above that rank. `n_pos`: (Q,) positives per query.
    """
    rank = np.asarray(rank, dtype=np.float64)
    ap = np.bincount(g, weights=hits / rank, minlength=n_groups)
    top = rank <= TOP_K
    first = np.full(n_groups, np.inf)
    np.minimum.at(first, g[top], rank[top])  # rank of the first positive within the top 10
    rr = np.where(np.isfinite(first), 1.0 / first, 0.0)
    dcg = np.bincount(g[top], weights=1.0 / np.log2(rank[top] + 1.0), minlength=n_groups)
    ideal = np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(1, TOP_K + 1) + 1.0))])
    idcg = ideal[np.minimum(n_pos, TOP_K).astype(np.int64)]
    with np.errstate(invalid="ignore", divide="ignore"):
        has_pos = n_pos > 0
        return {
            "map": np.where(has_pos, ap / n_pos, np.nan),
            "mrr_at_10": np.where(has_pos, rr, np.nan),
            "ndcg_at_10": np.where(has_pos, dcg / idcg, np.nan),
            "n_pos": n_pos,
        }


def ranking_per_query(scores, relevant, group) -> dict[str, np.ndarray]:
    """Per-query AP, RR@10, nDCG@10 ((Q,) arrays, NaN for queries without a positive) + `n_pos` (Q,).

    `scores`, `relevant`, `group`: (M,) arrays, one entry per (query, candidate) pair; `group` holds query
    ids 0..Q-1. Vectorized: one lexsort of M entries, then bincounts.
    """
    rel, g, rank, starts, n_groups = _sorted_groups(scores, relevant, group)
    relf = rel.astype(np.float64)
    n_pos = np.bincount(g, weights=relf, minlength=n_groups)  # (Q,)
    cum = np.cumsum(relf)
    hits = cum - (cum[starts] - relf[starts])[g]  # positives at or above each rank, within its query
    return _per_query_from_ranks(g[rel], rank[rel], hits[rel], n_pos, n_groups)


def ranking_metrics(scores, relevant, group) -> dict[str, float]:
    """`map`, `mrr_at_10`, `ndcg_at_10`: means over queries that have at least one positive."""
    per = ranking_per_query(scores, relevant, group)
    keep = per["n_pos"] > 0
    if not keep.any():
        raise ValueError("ranking metrics need at least one query with a positive candidate")
    return {k: float(per[k][keep].mean()) for k in RANKING_METRICS}


def margin_metrics(scores, relevant, group) -> dict[str, float]:
    """`mean_pos`, `mean_neg`, `margin` (see the module docstring for the exact definitions)."""
    scores = np.asarray(scores, dtype=np.float64)
    relevant = np.asarray(relevant, dtype=bool)
    group = np.asarray(group, dtype=np.int64)
    n_groups = int(group.max()) + 1 if len(group) else 0
    pos, neg = scores[relevant], scores[~relevant]
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("margin metrics need at least one positive and one negative candidate")
    n_pos = np.bincount(group[relevant], minlength=n_groups)
    mean_pos_q = np.bincount(group[relevant], weights=pos, minlength=n_groups) / np.maximum(n_pos, 1)
    hardest = np.full(n_groups, -np.inf)
    np.maximum.at(hardest, group[~relevant], neg)  # (Q,) highest-scoring own negative
    keep = (n_pos > 0) & np.isfinite(hardest)
    return {
        "mean_pos": float(pos.mean()),
        "mean_neg": float(neg.mean()),
        "margin": float((mean_pos_q[keep] - hardest[keep]).mean()),
    }


# --------------------------------------------------------------------------------------------- retrieval
def retrieval_per_query(query_emb, doc_emb, qi, di, block: int = BLOCK) -> dict[str, np.ndarray]:
    """Per-query `map`, `mrr_at_10`, `ndcg_at_10`, `n_pos` + separation sums, ranking each query against
    the whole corpus (see "Retrieval" in the module docstring).

    `query_emb` (Q, H), `doc_emb` (D, H); `qi`, `di` (P,): relevant (query, document) pairs (duplicates
    count once). Extra (Q,) keys: `sum_pos`, `sum_neg`, `n_neg` (non-relevant documents), `hardest` (best
    non-relevant score, -inf when the query has none). Memory: O(block) floats beyond the inputs.
    """
    q = np.asarray(query_emb, dtype=np.float64)
    d = np.asarray(doc_emb, dtype=np.float64)
    n_q, n_d = len(q), len(d)
    if q.ndim != 2 or d.ndim != 2 or q.shape[1] != d.shape[1] or n_d == 0:
        raise ValueError(f"embeddings must be (Q, H) and (D >= 1, H), got {q.shape} and {d.shape}")
    code = np.unique(np.asarray(qi, dtype=np.int64) * n_d + np.asarray(di, dtype=np.int64))  # sorted by query
    pq, pd = code // n_d, code % n_d  # (P,) positives, grouped by query
    n_pos = np.bincount(pq, minlength=n_q).astype(np.float64)
    pos = np.empty(len(code))  # (P,) score of each positive
    neg_ge = np.empty(len(code), dtype=np.int64)  # (P,) non-relevant docs scoring >= it (ties: against)
    sum_neg, hardest = np.empty(n_q), np.empty(n_q)
    rows = max(1, block // max(n_d, 1))  # query rows per block: a (rows, D) float64 matrix is <= block
    for a in range(0, n_q, rows):
        b = min(a + rows, n_q)
        s = q[a:b] @ d.T  # (c, D)
        lo, hi = np.searchsorted(pq, [a, b])
        r, c = pq[lo:hi] - a, pd[lo:hi]
        p = s[r, c]
        pos[lo:hi] = p
        sum_neg[a:b] = s.sum(axis=1) - np.bincount(r, weights=p, minlength=b - a)
        s[r, c] = -np.inf  # from here on, a row holds its query's non-relevant documents only
        hardest[a:b] = s.max(axis=1)
        for k in range(0, hi - lo, rows):  # (rows, D) comparisons at a time, however many positives
            neg_ge[lo + k : lo + k + rows] = (s[r[k : k + rows]] >= p[k : k + rows, None]).sum(axis=1)
    # j-th best positive of its query (1-based): rank = j + non-relevant documents at or above it
    order = np.lexsort((-pos, pq))
    g = pq[order]
    j = np.arange(len(g)) - np.searchsorted(g, g) + 1
    per = _per_query_from_ranks(g, j + neg_ge[order], j.astype(np.float64), n_pos, n_q)
    per.update(
        sum_pos=np.bincount(pq, weights=pos, minlength=n_q),
        sum_neg=sum_neg,
        n_neg=n_d - n_pos,
        hardest=hardest,
    )
    return per


def retrieval_metrics(query_emb, doc_emb, qi, di, block: int = BLOCK) -> dict[str, float]:
    """`map`, `mrr_at_10`, `ndcg_at_10`, `mean_pos`, `mean_neg`, `margin` of each query ranked against the
    whole corpus; means over queries that have a positive (margin: and a non-relevant document)."""
    per = retrieval_per_query(query_emb, doc_emb, qi, di, block)
    keep = per["n_pos"] > 0
    if not keep.any() or per["n_neg"].sum() == 0:
        raise ValueError("retrieval metrics need a relevant pair and a non-relevant document")
    both = keep & (per["n_neg"] > 0)
    mean_pos_q = per["sum_pos"][both] / per["n_pos"][both]
    return {
        **{k: float(per[k][keep].mean()) for k in RANKING_METRICS},
        "mean_pos": float(per["sum_pos"].sum() / per["n_pos"].sum()),
        "mean_neg": float(per["sum_neg"].sum() / per["n_neg"].sum()),
        "margin": float((mean_pos_q - per["hardest"][both]).mean()),
    }
