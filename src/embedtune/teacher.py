"""Teacher scores: a stronger model's score of every (query, document) of a row, for distillation.

A row's documents are its `response`, then each `rejected_response`; `teacher_scores` holds one score per
document in that order (what `distillation` reads, `teacher_scores[0]` the positive's). The teacher is any
model `modeling.load_model` loads:

- a reranker (Qwen3-Reranker's yes/no head, or a classifier head / cross-encoder): ``z``, its logit for the
  pair (logit(yes) - logit(no)), not the sigmoid: probabilities near 0 and 1 saturate and would tie;
- an embedder: the cosine of the query (with its query instruction) and the document.

A teacher that reads images (a Qwen2-VL / Qwen3-VL reranker or embedder, `embedtune.vision`) scores rows with
images as they are: each text with its own.

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
from embedtune.images import infos_by_text
from embedtune.mining import percentiles
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
    """`model(features)` for every tokenized text, in input order: (N,) reranker z or (N, H) embeddings. A
    model that reads images gets each pass's pixels (`features.pad`'s `pixels`)."""
    device = next(model.parameters()).device
    pixels = getattr(model, "featurizer", None)
    out = None
    for idx in token_batches([len(ids_of(t)) for t in texts], max_tokens):
        batch = pad([texts[i] for i in idx], model.tokenizer.pad_token_id, pixels=pixels)
        y = model({k: v.to(device) for k, v in batch.items()}).double().cpu().numpy()
        out = np.zeros((len(texts), *y.shape[1:])) if out is None else out
        out[idx] = y
    return out if out is not None else np.zeros(0)


def score_pairs(
    model, queries: list[str], docs: list[str], max_tokens: int, shard=whole, images: tuple | None = None
) -> np.ndarray:
    """(N,) float64 teacher score of each (query, doc) pair (see the module docstring). `images`: (each
    query's, each doc's) `ImageInfo`s, for a teacher that reads them (`vision`)."""
    if not queries:
        return np.zeros(0)
    q_imgs, d_imgs = images or ([()] * len(queries), [()] * len(docs))
    if not isinstance(model, Embedder):
        prompts = (model.pairs(queries, docs, q_imgs, d_imgs) if images
                   else texts_of(model.tokenize(queries, docs, padding=False)))  # fmt: skip
        return shard(
            lambda idx: forward_in_budget(model, [prompts[i] for i in idx], max_tokens), len(prompts)
        )

    def embed(items: list[tuple], is_query: bool) -> np.ndarray:
        texts = [t for t, _ in items]
        ids = (model.texts(texts, is_query, images=[i for _, i in items]) if images
               else texts_of(model.tokenize(texts, is_query=is_query, padding=False)))  # fmt: skip
        return shard(lambda idx: forward_in_budget(model, [ids[i] for i in idx], max_tokens), len(ids))

    q_items = list(zip(queries, map(tuple, q_imgs), strict=True))
    d_items = list(zip(docs, map(tuple, d_imgs), strict=True))
    uq, ud = list(dict.fromkeys(q_items)), list(dict.fromkeys(d_items))  # a text with its images, once
    q, d = embed(uq, True), embed(ud, False)  # unit vectors: dot == cosine
    wq, wd = {t: i for i, t in enumerate(uq)}, {t: i for i, t in enumerate(ud)}
    return row_dots(q, d, np.array([wq[t] for t in q_items]), np.array([wd[t] for t in d_items]))


def score_rows(model, rows: Sequence[dict], max_tokens: int, shard=whole) -> list[list[float]]:
    """Each row's teacher_scores: one float per document of `documents(row)`. Rows checked with their images
    (`images.check_images`) are scored with them."""
    queries = [r["query"] for r in rows for _ in documents(r)]
    docs = [t for r in rows for t in documents(r)]
    images = None
    if any(r.get("_image_info") for r in rows):
        per = [infos_by_text(r) for r in rows]  # (query, response, *rejected) images of each row
        images = (
            [p[0] for p, r in zip(per, rows, strict=True) for _ in documents(r)],
            [x for p in per for x in p[1:]],
        )
    flat = score_pairs(model, queries, docs, max_tokens, shard, images)
    out, start = [], 0
    for r in rows:
        n = len(documents(r))
        out.append([float(x) for x in flat[start : start + n]])
        start += n
    return out


# Below this median within-row spread the softmax at temperature 1 is near uniform: scores 0.25 apart weigh at
# most e^0.5 ~ 1.6x each other, so distill_kl at --distill-teacher-temperature 1 trains toward "all alike".
FLAT_SPREAD = 0.25


def separation(score_lists: Sequence[Sequence[float]]) -> dict:
    """What a teacher's scores can teach, over rows with a positive and at least one negative (on its own
    training rows this is in-sample, an upper bound):

    - `positive_first`: the fraction of rows whose positive (`scores[0]`) beats every negative, beside `chance`
      (the mean of 1 / documents), what a teacher that knows nothing gets;
    - `row_std`: the percentiles of each row's score std (population): the spread `--distill-teacher-temperature`
      divides; near-zero spreads give near-uniform targets at temperature 1 (`flat`: median below FLAT_SPREAD).
    """
    ranked = [np.asarray(s, dtype=np.float64) for s in score_lists if len(s) > 1]
    if not ranked:
        return {"rows": 0}
    first = sum(bool(s[0] > s[1:].max()) for s in ranked)
    stds = [float(s.std()) for s in ranked]
    return {
        "rows": len(ranked),
        "positive_first": round(first / len(ranked), 4),
        "chance": round(float(np.mean([1 / len(s) for s in ranked])), 4),
        "row_std": percentiles(stds),
        "flat": bool(np.median(stds) < FLAT_SPREAD),
    }
