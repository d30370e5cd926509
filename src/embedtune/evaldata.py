"""Eval data: canonical rows seen as (query, document) pairs to score, and the metrics their shape gets.

The shape is decided for the whole file (metric definitions in `embedtune.metrics`):

=========  ===============================================  ===============================================
shape      rows                                             metrics (primary first)
=========  ===============================================  ===============================================
sts        every row has a numeric `label`; none has        spearman_cosine + the other 7 pearson/spearman
           `rejected_response`                              x cosine/euclidean/manhattan/dot correlations
ranking    rows with `rejected_response` (labels ignored)   ndcg_at_10, map, mrr_at_10, mean_pos, mean_neg,
                                                            margin
retrieval  no row has `label` or `rejected_response`:       ndcg_at_10, map, mrr_at_10, mean_pos, mean_neg,
           positive pairs only (ms-swift infonce data)      margin (embedders only)
=========  ===============================================  ===============================================

In this order: any row with a non-empty `rejected_response` -> ranking (rows without one add positives to
their query); else a `label` on every row -> sts; else no `label` on any row -> retrieval; a file where only
some rows have a label is refused (naming the first line without one), as it is neither.

Ranking candidates (MTEB reranking semantics): rows are grouped by query text; a query's candidate list is
ALL its positives (the `response` of every row with that query) plus ALL its negatives (deduplicated; a
negative equal to one of the query's own positives is dropped). Nothing is sampled, so the numbers do not
depend on the eval set's size or order. Queries left without any negative are skipped and counted
(`n_queries_skipped`): a list of positives only would score 1.0 trivially.

Retrieval candidates (MTEB retrieval semantics): the corpus is every distinct `response` of the file; each
distinct query is ranked against the WHOLE corpus, and its relevant documents are the responses it is paired
with (a response paired with several queries is relevant to each). Because the corpus is the eval file, the
values depend on its size (a bigger corpus is harder): compare them on the same file, as the baseline
deltas do. A query paired with every document is skipped and counted.

Texts are stored once each (`queries`, `docs`), pairs as index arrays (`qi`, `di`), so scoring encodes every
unique text once and metric cost grows with the number of pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from embedtune.data import read_rows
from embedtune.errors import DataError, EmbedtuneError
from embedtune.metrics import MARGIN_METRICS, RANKING_METRICS, STS_METRICS
from embedtune.objectives import TASKS
from embedtune.progress import say

PRIMARY = {"sts": "spearman_cosine", "ranking": "ndcg_at_10", "retrieval": "ndcg_at_10"}
METRIC_NAMES = {
    "sts": STS_METRICS,
    "ranking": RANKING_METRICS + MARGIN_METRICS,
    "retrieval": RANKING_METRICS + MARGIN_METRICS,
}


@dataclass
class EvalData:
    """Eval rows as unique texts + index arrays; entry m is the pair (queries[qi[m]], docs[di[m]])."""

    shape: str  # sts | ranking | retrieval
    n_rows: int
    queries: list[str]  # unique query texts, encoded with is_query=True
    docs: list[str]  # unique response / negative texts
    qi: np.ndarray  # (M,) query index of each pair
    di: np.ndarray  # (M,) document index of each pair
    labels: np.ndarray | None = None  # (M,) gold score (sts)
    relevant: np.ndarray | None = None  # (M,) True for a positive candidate (ranking)
    n_queries_skipped: int = 0  # ranking/retrieval: queries without any negative
    query_images: list[tuple] | None = (
        None  # rows with images: each query's resolved image entries (else None)
    )
    doc_images: list[tuple] | None = None  # and each document's

    @property
    def n_pairs(self) -> int:
        """(query, document) pairs scored: every query x every document for retrieval, else the M pairs."""
        return len(self.queries) * len(self.docs) if self.shape == "retrieval" else len(self.qi)


def read_eval_data(path: str, image_root: str = "") -> EvalData:
    """Validate canonical rows (DataError `FILE:LINE: field: reason`; images read and decoded, relative paths
    from the file's folder: `images.check_images`) and detect the data shape.

    A text with images is its words and its images: the same words over another image is another text (the
    texts of `queries` / `docs` then repeat, `query_images` / `doc_images` tell them apart)."""
    rows = read_rows(path, lines=True)
    with_images = any(row.get("images") for row in rows)
    if with_images:
        from embedtune.images import check_images, images_by_text

        rows = [
            {**r, "query": (r["query"], per[0]), "response": (r["response"], per[1]),
             "rejected_response": [(t, p) for t, p in zip(r.get("rejected_response") or [], per[2:], strict=True)]}
            for r in check_images(rows, path, image_root)
            for per in [[tuple(x) for x in images_by_text(r)]]
        ]  # fmt: skip
    if any(row.get("rejected_response") for row in rows):
        data = _ranking_data(path, rows)
    else:
        missing = [row["_line"] for row in rows if row.get("label") is None]
        if not missing:
            data = _sts_data(path, rows)
        elif len(missing) < len(rows):
            raise DataError(
                f"{path}:{missing[0]}: label: missing (other rows have a label and none has rejected_response, "
                "so the file is read as STS pairs, which all need a label; drop every label to evaluate the "
                "pairs as retrieval)"
            )
        else:
            data = _retrieval_data(path, rows)
    if with_images:  # (text, images) items back to texts + images
        data.query_images = [q[1] for q in data.queries]
        data.doc_images = [d[1] for d in data.docs]
        data.queries, data.docs = [q[0] for q in data.queries], [d[0] for d in data.docs]
    return data


def _index(texts: list, table: dict, text) -> int:
    i = table.get(text)
    if i is None:
        i = table[text] = len(texts)
        texts.append(text)
    return i


def _sts_data(path: str, rows) -> EvalData:
    queries, docs, qtab, dtab = [], [], {}, {}
    qi = [_index(queries, qtab, row["query"]) for row in rows]
    di = [_index(docs, dtab, row["response"]) for row in rows]
    labels = np.array([float(row["label"]) for row in rows])
    if len(rows) < 2 or np.ptp(labels) == 0:
        raise DataError(
            f"{path}: label: STS correlations need at least 2 rows whose labels are not all equal"
        )
    return EvalData("sts", len(rows), queries, docs, np.array(qi), np.array(di), labels=labels)


def _ranking_data(path: str, rows) -> EvalData:
    groups: dict[str, tuple[dict, dict]] = {}  # query -> (positives, negatives) as ordered sets
    for row in rows:
        pos, neg = groups.setdefault(row["query"], ({}, {}))
        pos[row["response"]] = None
        neg.update(dict.fromkeys(row.get("rejected_response") or ()))
    queries, docs, dtab = [], [], {}
    qi, di, relevant, skipped = [], [], [], 0
    for query, (pos, neg) in groups.items():
        negs = [t for t in neg if t not in pos]
        if not negs:
            skipped += 1
            continue
        g = len(queries)
        queries.append(query)
        for text, is_pos in [(t, True) for t in pos] + [(t, False) for t in negs]:
            qi.append(g)
            di.append(_index(docs, dtab, text))
            relevant.append(is_pos)
    if not queries:
        raise DataError(f"{path}: rejected_response: no query has a negative that differs from its positives")
    return EvalData(
        "ranking",
        len(rows),
        queries,
        docs,
        np.array(qi),
        np.array(di),
        relevant=np.array(relevant),
        n_queries_skipped=skipped,
    )


def _retrieval_data(path: str, rows) -> EvalData:
    groups: dict[str, dict] = {}  # query -> its responses as an ordered set
    for row in rows:
        groups.setdefault(row["query"], {})[row["response"]] = None
    docs, dtab = [], {}
    for pos in groups.values():
        for text in pos:
            _index(docs, dtab, text)
    queries, qi, di, skipped = [], [], [], 0
    for query, pos in groups.items():
        if len(pos) == len(docs):  # relevant to the whole corpus: nothing to rank it against
            skipped += 1
            continue
        qi += [len(queries)] * len(pos)
        di += [dtab[t] for t in pos]
        queries.append(query)
    if not queries:
        raise DataError(
            f"{path}: response: retrieval needs at least 2 distinct responses (each query is ranked against "
            "all the responses of the file)"
        )
    return EvalData(
        "retrieval",
        len(rows),
        queries,
        docs,
        np.array(qi),
        np.array(di),
        relevant=np.ones(len(qi), dtype=bool),
        n_queries_skipped=skipped,
    )


def measurable(path: str, task_type: str) -> EvalData | None:
    """evaluate's view of the eval file (shape, unique texts, candidate lists) for training's evaluations, or
    None when evaluate cannot measure a model of `task_type` on it (the task's eval shapes, `objectives.TASKS`);
    then training reports the eval loss only, and says why."""
    try:
        data = read_eval_data(path)
    except EmbedtuneError as e:  # the rows passed train's checks: this is the shape (e.g. constant labels)
        say("train", f"eval metrics off: {e}")
        return None
    if data.shape not in TASKS[task_type].eval_shapes:
        say(
            "train",
            f"eval metrics off: a {task_type} is measured on {' or '.join(TASKS[task_type].eval_shapes)} rows "
            f"(ranking: rows with rejected_response), not {data.shape}",
        )
        return None
    say(
        "train",
        f"eval metrics: {data.shape} ({', '.join(METRIC_NAMES[data.shape])}) on {len(data.queries)} queries, "
        f"{len(data.docs)} documents",
    )
    return data
