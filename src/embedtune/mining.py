"""Hard-negative mining: candidates from a corpus, a blocked top-k search, and positive-aware filtering.

    from embedtune.mining import build_corpus, top_k, select_negatives

What `embedtune mine` does with these (see `steps/mine.py` for the order):

1. Corpus (`build_corpus`): every `response` and `rejected_response` of the rows, plus the texts of the
   `--corpus` files (canonical rows: responses and negatives; BEIR corpus.jsonl: `title text`; or one text
   per line), each distinct text once. With a text model, a text with an `<image>` tag is no candidate (it
   means nothing without its image) and rows with `images` are copied as they are; with a model that reads
   images (Qwen2-VL / Qwen3-VL), every candidate is a text with its images (`Item`), compared by words and
   image content (`item_key`), and the mined rows carry their negatives' images.
2. Search (`top_k`): the k highest cosines of each distinct query against the whole corpus, computed in
   blocks of QUERY_BLOCK queries x DOC_BLOCK documents, keeping a running top-k per query. Memory is the
   embeddings plus QUERY_BLOCK x (k + DOC_BLOCK) scores, never the Q x D matrix. k = `range_max` plus the
   most candidates any query must skip (its own positives), so the window is always full when the corpus
   is large enough.
3. Selection (`select_negatives`), per row:
   - the query's own positives (the `response` of every row with that query) and the query itself are not
     candidates, compared by normalized text (`embedtune.overlap.text_key`): a copy that differs in case or
     spacing is still a positive; ranks count after removing them;
   - the rank window `[range_min, range_max)` is kept;
   - likely false negatives are dropped (NV-Retriever's positive-aware filtering, TopK-PercPos): a
     candidate scoring above `positive_score - |positive_score| * relative_margin` (= `positive_score *
     (1 - relative_margin)` for a positive score), or above the absolute cap `max_score`. `positive_score`
     is the cosine of the row's own positive, so each row of a query is filtered against its positive;
   - `num_negatives` are taken: the hardest (`top`) or a seeded random pick (`random`), kept in rank order.
   The row keeps its other fields (label, source, instruction); its `teacher_scores`, which score the
   negatives it had, are dropped when its negatives change (and counted).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from embedtune.data import IMAGE_TAG, canonical, read_rows, row_texts
from embedtune.images import check_images, infos_by_text
from embedtune.knobs import SAMPLINGS  # noqa: F401  (one source: the knob table)
from embedtune.overlap import read_text_records, record_texts, text_key

QUERY_BLOCK = 1024  # queries scored together: (QUERY_BLOCK, DOC_BLOCK) float32 = 64 MiB of scores
DOC_BLOCK = 16384
PERCENTILES = (5, 25, 50, 75, 95)


Item = str | tuple  # a text, or, when the model reads images, (a text, its `ImageInfo`s)


def row_items(row: dict, images: bool = False) -> list[Item]:
    """A row's (query, response, *rejected) texts; with `images` (a row checked by `images.check_images`), each
    as (text, its images)."""
    texts = row_texts(row)
    return texts if not images else [(t, tuple(i)) for t, i in zip(texts, infos_by_text(row), strict=True)]


def item_key(item: Item) -> int:
    """`overlap.text_key` of an item: its normalized text and, for one with images, their content hashes."""
    if isinstance(item, str):
        return text_key(item)
    return text_key(item[0], ",".join(i.sha256 for i in item[1]))


def texts_and_images(items: Sequence[Item], images: bool) -> tuple[list[str], list[tuple] | None]:
    """Items -> (their texts, each one's image entries, or None without `images`): `encode_unique`'s inputs."""
    if not images:
        return list(items), None
    return [t for t, _ in items], [tuple(i.ref for i in infos) for _, infos in items]


def build_corpus(rows: Sequence[dict], corpus_files: Iterable[str] = (), images: bool = False) -> list[Item]:
    """Distinct candidates, in first-seen order: the rows' responses and negatives, then the files'.

    Without `images`, texts with an `<image>` tag are left out (they mean nothing without their image). With
    `images` (a model that reads them; `rows` checked), candidates are (text, images) items, and a corpus
    file of canonical rows with `images` is read as rows (validated, each image read: FILE:LINE: field)."""
    items: dict[Item, None] = {}
    for row in rows:
        items.update(dict.fromkeys(row_items(row, images)[1:]))
    for path in corpus_files:
        records = list(read_text_records(path))
        if images and any(isinstance(r, dict) and r.get("images") for _, r in records):
            for row in check_images(read_rows(path, lines=True), path):
                items.update(dict.fromkeys(row_items(row, True)[1:]))
            continue
        for lineno, record in records:
            texts = record_texts(path, lineno, record, ("response", "rejected_response"))
            items.update(dict.fromkeys((t, ()) if images else t for t in texts))

    def usable(item: Item) -> bool:  # an `<image>` tag without its image means nothing
        text, infos = (item, ()) if isinstance(item, str) else item
        return IMAGE_TAG not in text or bool(infos)

    return [t for t in items if usable(t)]


def distinct_queries(
    rows: Sequence[dict], images: bool = False
) -> tuple[list[Item], np.ndarray, list[set[int]]]:
    """(distinct queries, (R,) query index of each row, per query the keys it must never be mined: its own
    positives' and its own `item_key`s). With `images`, a query is (text, images): the same words over
    another image are another query."""
    index: dict[Item, int] = {}
    of_row = np.empty(len(rows), dtype=np.int64)
    skip: list[set[int]] = []
    for r, row in enumerate(rows):
        query, response = row_items(row, images)[:2]
        i = index.setdefault(query, len(index))
        if i == len(skip):
            skip.append({item_key(query)})
        skip[i].add(item_key(response))
        of_row[r] = i
    return list(index), of_row, skip


def search_depth(doc_keys: np.ndarray, skip: Sequence[set[int]], range_max: int) -> int:
    """k for `top_k`: range_max plus the most corpus entries any one query must skip, at most the corpus."""
    counts = Counter(doc_keys.tolist())
    most = max((sum(counts.get(k, 0) for k in keys) for keys in skip), default=0)
    return min(len(doc_keys), range_max + most)


@torch.inference_mode()
def top_k(
    q: np.ndarray,
    d: np.ndarray,
    k: int,
    device: str | torch.device = "cpu",
    query_block: int = QUERY_BLOCK,
    doc_block: int = DOC_BLOCK,
) -> tuple[np.ndarray, np.ndarray]:
    """The k best documents of each query by dot product (cosine for unit vectors), best first.

    q: (Q, H), d: (D, H) float32. Returns (scores (Q, k) float32, indices (Q, k) int64). Never builds the
    (Q, D) matrix: for each block of queries a running top-k is merged with each block of documents.
    """
    k = min(k, len(d))
    docs = torch.from_numpy(np.ascontiguousarray(d)).to(device)  # (D, H); zero-copy on CPU
    scores = np.empty((len(q), k), dtype=np.float32)
    indices = np.empty((len(q), k), dtype=np.int64)
    for qs in range(0, len(q), query_block):
        qb = torch.from_numpy(np.ascontiguousarray(q[qs : qs + query_block])).to(device)  # (b, H)
        best_s = qb.new_empty((len(qb), 0))
        best_i = torch.empty((len(qb), 0), dtype=torch.long, device=device)
        for ds in range(0, len(d), doc_block):
            block = qb @ docs[ds : ds + doc_block].T  # (b, <= doc_block)
            cand_s = torch.cat([best_s, block], 1)
            ids = torch.arange(ds, ds + block.shape[1], device=device).expand(len(qb), -1)
            cand_i = torch.cat([best_i, ids], 1)
            top = cand_s.topk(min(k, cand_s.shape[1]), dim=1)  # sorted, best first
            best_s, best_i = top.values, cand_i.gather(1, top.indices)
        scores[qs : qs + len(qb)] = best_s.float().cpu().numpy()
        indices[qs : qs + len(qb)] = best_i.cpu().numpy()
    return scores, indices


def percentiles(values) -> dict[str, float]:
    """p5 .. p95 and the mean, rounded to 4 places ({} for no values)."""
    x = np.asarray(values, dtype=np.float64)
    if not len(x):
        return {}
    out = {
        f"p{p}": round(float(v), 4) for p, v in zip(PERCENTILES, np.percentile(x, PERCENTILES), strict=True)
    }
    out["mean"] = round(float(x.mean()), 4)
    return out


def select_negatives(
    rows: Sequence[dict],
    row_query: np.ndarray,
    skip: Sequence[set[int]],
    corpus: Sequence[str],
    doc_keys: np.ndarray,
    scores: np.ndarray,
    indices: np.ndarray,
    positive_scores: np.ndarray,
    cfg,
    images: bool = False,
) -> tuple[list[dict], dict]:
    """The rows with mined `rejected_response`, and the counts and score percentiles of the stats JSON.

    `scores` / `indices` (Q, k): `top_k` of each distinct query; `positive_scores` (R,): each row's cosine to
    its own positive; `cfg`: a `MineConfig` (window, filters, sampling, seed, keep_original_negatives);
    `images`: the corpus is (text, images) items (`build_corpus`), each row's `images` rebuilt in tag order.
    """
    rng = np.random.default_rng(cfg.seed)
    out: list[dict] = []
    kept_scores: list[np.ndarray] = []
    n_mined = short = without = by_margin = by_cap = scores_dropped = 0
    window: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # query -> its window (indices, scores)
    for r, row in enumerate(rows):
        qi = int(row_query[r])
        if qi not in window:
            keys = np.fromiter(skip[qi], dtype=np.uint64)
            own = np.isin(doc_keys[indices[qi]], keys)  # its positives and itself: not candidates
            lo, hi = cfg.range_min, cfg.range_max
            window = {qi: (indices[qi][~own][lo:hi], scores[qi][~own][lo:hi])}  # one query at a time
        cand_i, cand_s = window[qi]
        pos = float(positive_scores[r])
        over_margin = cand_s > pos - abs(pos) * cfg.relative_margin
        over_cap = cand_s > cfg.max_score
        by_margin += int(over_margin.sum())
        by_cap += int((over_cap & ~over_margin).sum())
        pool = np.flatnonzero(~(over_margin | over_cap))
        if cfg.sampling == "random" and len(pool) > cfg.num_negatives:
            pool = np.sort(rng.choice(pool, cfg.num_negatives, replace=False))
        pool = pool[: cfg.num_negatives]
        mined = [corpus[i] for i in cand_i[pool]]
        kept_scores.append(cand_s[pool])
        n_mined += len(mined)
        short += len(mined) < cfg.num_negatives
        negatives = mined
        items = row_items(row, images)
        if cfg.keep_original_negatives and row.get("rejected_response"):
            own_keys = skip[qi]
            original = [t for t in items[2:] if item_key(t) not in own_keys]
            seen = set(original)
            negatives = original + [t for t in mined if t not in seen]
        without += not negatives
        unchanged = negatives == items[2:]
        scores_dropped += row.get("teacher_scores") is not None and not unchanged
        teacher = row.get("teacher_scores") if unchanged else None  # they scored the negatives it had
        new = {**row, "rejected_response": negatives, "teacher_scores": teacher}
        if images:  # texts back apart from their images: `images` in tag order (query, response, negatives)
            new["rejected_response"] = [t for t, _ in negatives]
            new["images"] = [i.ref for _, infos in items[:2] + negatives for i in infos]
        out.append(canonical(new))
    kept = np.concatenate(kept_scores) if kept_scores else np.zeros(0)
    stats = {
        "negatives_mined": n_mined,
        "rows_with_fewer_negatives": short,
        "rows_without_negatives": without,
        "dropped_false_negatives": by_margin + by_cap,
        "dropped_by_relative_margin": by_margin,
        "dropped_by_max_score": by_cap,
        "teacher_scores_dropped": scores_dropped,
        "positive_scores": percentiles(positive_scores),
        "negative_scores": percentiles(kept),
    }
    return out, stats
