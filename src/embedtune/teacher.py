"""Teacher scores: a stronger model's score of every (query, document) of a row, for distillation.

A row's documents are its `response`, then each `rejected_response`; `teacher_scores` holds one score per
document in that order (what `distillation` reads, `teacher_scores[0]` the positive's). The teacher is any
model `modeling.load_model` loads:

- a reranker (Qwen3-Reranker's yes/no head, or a classifier head / cross-encoder): ``z``, its logit for the
  pair (logit(yes) - logit(no)), not the sigmoid: probabilities near 0 and 1 saturate and would tie;
- an embedder: the cosine of the query (with its query instruction) and the document.

Texts are tokenized once and batched by tokens: sorted longest first, each forward pass as many texts as
fit in `max_tokens` padded tokens (so a pass of short texts is wide and one of long texts narrow, at an even
memory). `shard` splits the forward passes across torchrun ranks (`distributed.gather_over_ranks`), as mine
and evaluate do.

    with scoring_model("BAAI/bge-reranker-v2-m3", "reranker") as teacher:
        scores = score_rows(teacher, rows, max_tokens=16384)     # one list per row
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from embedtune.features import ids_of, pad, texts_of
from embedtune.modeling import Embedder
from embedtune.scoring import row_dots, whole


def documents(row: dict) -> list[str]:
    """The documents a row's teacher_scores score, in order: response, then each rejected_response."""
    return [row["response"], *(row.get("rejected_response") or [])]


def token_batches(lengths: Sequence[int], max_tokens: int) -> list[np.ndarray]:
    """Indices of texts in passes of at most `max_tokens` padded tokens (count x longest), longest first; a text
    longer than the budget gets a pass of its own."""
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    batches, start = [], 0
    while start < len(order):
        longest = max(int(lengths[order[start]]), 1)  # sorted: the first is the pass's longest
        n = max(1, max_tokens // longest)
        batches.append(order[start : start + n])
        start += n
    return batches


@torch.inference_mode()
def forward_in_budget(model, texts: list, max_tokens: int) -> np.ndarray:
    """`model(features)` for every tokenized text, in input order: (N,) reranker z or (N, H) embeddings."""
    device = next(model.parameters()).device
    out = None
    for idx in token_batches([len(ids_of(t)) for t in texts], max_tokens):
        features = {
            k: v.to(device) for k, v in pad([texts[i] for i in idx], model.tokenizer.pad_token_id).items()
        }
        y = model(features).double().cpu().numpy()
        out = np.zeros((len(texts), *y.shape[1:])) if out is None else out
        out[idx] = y
    return out if out is not None else np.zeros(0)


def score_pairs(model, queries: list[str], docs: list[str], max_tokens: int, shard=whole) -> np.ndarray:
    """(N,) float64 teacher score of each (query, doc) pair (see the module docstring)."""
    if not queries:
        return np.zeros(0)
    if not isinstance(model, Embedder):
        prompts = texts_of(model.tokenize(queries, docs, padding=False))
        return shard(
            lambda idx: forward_in_budget(model, [prompts[i] for i in idx], max_tokens), len(prompts)
        )

    def embed(texts: list[str], is_query: bool) -> np.ndarray:
        ids = texts_of(model.tokenize(texts, is_query=is_query, padding=False))
        return shard(lambda idx: forward_in_budget(model, [ids[i] for i in idx], max_tokens), len(ids))

    uq, ud = list(dict.fromkeys(queries)), list(dict.fromkeys(docs))
    q, d = embed(uq, True), embed(ud, False)  # unit vectors: dot == cosine
    wq, wd = {t: i for i, t in enumerate(uq)}, {t: i for i, t in enumerate(ud)}
    return row_dots(q, d, np.array([wq[t] for t in queries]), np.array([wd[t] for t in docs]))


def score_rows(model, rows: Sequence[dict], max_tokens: int, shard=whole) -> list[list[float]]:
    """Each row's teacher_scores: one float per document of `documents(row)`."""
    queries = [r["query"] for r in rows for _ in documents(r)]
    docs = [t for r in rows for t in documents(r)]
    flat = score_pairs(model, queries, docs, max_tokens, shard)
    out, start = [], 0
    for r in rows:
        n = len(documents(r))
        out.append([float(x) for x in flat[start : start + n]])
        start += n
    return out
