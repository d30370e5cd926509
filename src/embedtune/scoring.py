"""Scoring a model on eval data: every unique text (or reranker pair) once, then the metrics of its shape.

    from embedtune.evaldata import read_eval_data
    from embedtune.modeling import load_model
    from embedtune.scoring import measure

    metrics, plot, seconds = measure(load_model("out/model"), read_eval_data("eval.jsonl"), batch_size=32)

    with scoring_model("out/model", dtype="auto") as model:  # bf16 weights on a GPU that has it, else fp32
        metrics, plot, seconds = measure(model, read_eval_data("eval.jsonl"), batch_size=32)

How a candidate is scored:
  - embedder: cosine of the query embedding (with the model's `query_instruction`) and the document
    embedding. Every UNIQUE text is encoded once (queries and documents separately, as the instruction makes
    them different inputs), batched by length, without gradients; pair scores are then row-wise dot products
    gathered by index arrays, so metric cost grows with the number of pairs, never pairs x pairs.
    Retrieval metrics are exact (the rank of every positive, however deep, for `map`; `mean_neg` over every
    (query, non-relevant document) pair), computed in blocks of queries so memory stays bounded.
  - reranker: ranking metrics use z = logit(yes) - logit(no) (a sigmoid saturates at 1.0 for confident
    pairs and would turn them into ties); `mean_pos` / `mean_neg` / `margin` use sigmoid(z), the [0, 1]
    relevance that `Reranker.score()` returns. STS-shaped data needs an embedder; a reranker is refused on
    retrieval data (it would need Q x D forward passes).

`measure(..., shard=...)` decides who runs the forward passes: the default computes everything in this
process; train passes `distributed.gather_over_ranks`, which splits the items across torchrun ranks.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np

from embedtune.errors import EmbedtuneError
from embedtune.evaldata import METRIC_NAMES, EvalData
from embedtune.metrics import margin_metrics, ranking_metrics, retrieval_metrics, sts_metrics
from embedtune.modeling import Embedder, Reranker, load_model
from embedtune.speed import TORCH_DTYPES, autocast, resolve_dtype

CHUNK = 65536  # pairs per gathered block: bounds the (chunk, H) temporaries to a few hundred MB at most
PLOT_NEGATIVES = 20000  # retrieval histogram: all non-relevant pairs up to this many, else a sample of it


@contextlib.contextmanager
def scoring_model(path: str, task_type: str = "", dtype: str = "auto", **kwargs):
    """`load_model(path, task_type, **kwargs)` in `dtype` (`embedtune.speed`: auto is bf16 weights on a GPU
    that has it, fp32 on CPU; autocast is fp32 weights under bf16 autocast, for the block's duration).
    The one way evaluate (and any step that encodes for scoring) loads a model to score with."""
    dtype = resolve_dtype(dtype)
    model = load_model(path, task_type, dtype=TORCH_DTYPES[dtype], **kwargs)
    with autocast(dtype, next(model.parameters()).device):
        yield model


def row_dots(a: np.ndarray, b: np.ndarray, ia: np.ndarray, ib: np.ndarray) -> np.ndarray:
    """(M,) a[ia[m]] . b[ib[m]], gathered in chunks (never an (M, M) or (Q, D) matrix)."""
    out = np.empty(len(ia), dtype=np.float64)
    for s in range(0, len(ia), CHUNK):
        out[s : s + CHUNK] = np.einsum("ij,ij->i", a[ia[s : s + CHUNK]], b[ib[s : s + CHUNK]])
    return out


def whole(compute, n: int) -> np.ndarray:
    """The default `shard` of `measure`: this process computes all n items, `compute(np.arange(n))`."""
    return compute(np.arange(n))


def encode_unique(
    model: Embedder,
    queries: list[str],
    docs: list[str],
    batch_size: int,
    show_progress: bool = True,
    shard=whole,
    query_images: list[tuple] | None = None,
    doc_images: list[tuple] | None = None,
):
    """Embeddings of unique queries and docs, each distinct input encoded once.

    With a query instruction a text is a different input as a query and as a document; without one, a text
    that is both (common in STS pairs) is encoded once. `shard`: see `measure`. `query_images` / `doc_images`
    (eval rows with images, `EvalData`): each text's image entries, for a model that reads them.
    """
    if query_images is not None and not hasattr(model, "encode_items"):
        raise EmbedtuneError(
            "the eval rows have images: this model reads no images (a Qwen2-VL / Qwen3-VL one does)"
        )

    def encode(items: list[tuple], is_query: bool = False) -> np.ndarray:
        def compute(idx):
            texts = [items[i][0] for i in idx]
            if query_images is None:
                return model.encode(
                    texts, is_query=is_query, batch_size=batch_size, show_progress=show_progress
                )
            return model.encode_items(
                texts, [items[i][1] for i in idx], is_query=is_query, batch_size=batch_size
            )

        return shard(compute, len(items))

    q_items = list(zip(queries, query_images or [()] * len(queries), strict=True))
    d_items = list(zip(docs, doc_images or [()] * len(docs), strict=True))
    if model.query_instruction:
        return encode(q_items, is_query=True), encode(d_items)
    items = list(dict.fromkeys(q_items + d_items))
    where = {t: i for i, t in enumerate(items)}
    emb = encode(items)
    return emb[[where[t] for t in q_items]], emb[[where[t] for t in d_items]]


def measure(
    model, data: EvalData, batch_size: int, show_progress: bool = True, shard=whole, dims=()
) -> tuple[dict, dict, dict]:
    """Score every pair once, then compute the metrics. Returns (metrics, plot data, seconds).

    `model` is an already loaded `Embedder` or `Reranker` (train measures the model it is training).
    `shard(compute, n)` decides who runs the forward passes: `compute(idx)` returns the (len(idx), ...)
    outputs of items `idx` (texts or pairs) and `shard` returns all n of them. The default, `whole`, computes
    everything here; under torchrun, train passes one that splits the items across ranks and all-gathers.
    `dims` (embedders): Matryoshka widths; every metric is also computed on the first d components of each
    embedding, re-normalized, and returned as `<metric>_dim<d>` (one encode for all widths).
    """
    t0 = time.perf_counter()
    if isinstance(model, Reranker):
        if data.query_images is not None and not hasattr(model, "pairs"):
            raise EmbedtuneError(
                "the eval rows have images: this reranker reads no images (a Qwen2-VL / Qwen3-VL one does)"
            )
        if data.shape != "ranking":
            raise EmbedtuneError(
                f"a reranker needs ranking eval data (rows with rejected_response), not {data.shape}"
            )
        queries, docs = [data.queries[i] for i in data.qi], [data.docs[i] for i in data.di]
        images = {}
        if data.query_images is not None:  # each pair's sides' image entries
            images = {"query_images": [data.query_images[i] for i in data.qi],
                      "doc_images": [data.doc_images[i] for i in data.di]}  # fmt: skip

        def pick(idx) -> dict:
            return {k: [v[i] for i in idx] for k, v in images.items()}

        # z = logit(yes) - logit(no), float64: ranking uses z (sigmoid(z) saturates and ties), margins P(yes)
        scores = shard(
            lambda idx: model.logits(
                [queries[i] for i in idx], [docs[i] for i in idx], batch_size, show_progress, **pick(idx)
            ),
            len(queries),
        )
        t1 = time.perf_counter()
        prob = 1.0 / (1.0 + np.exp(-scores))
        group = data.qi
        metrics = {
            **ranking_metrics(scores, data.relevant, group),
            **margin_metrics(prob, data.relevant, group),
        }
        plot = {"scores": prob, "relevant": data.relevant, "label": "reranker P(yes)"}
    else:
        q, d = encode_unique(model, data.queries, data.docs, batch_size, show_progress, shard, data.query_images,
                             data.doc_images)  # fmt: skip  # (Q, H), (D, H)
        t1 = time.perf_counter()
        metrics, plot = embedding_metrics(q, d, data)
        for dim in dims:  # Matryoshka widths: the same metrics on truncated, re-normalized embeddings
            if dim > q.shape[1]:
                raise EmbedtuneError(
                    f"matryoshka_dims: {dim} is larger than the model's dimension {q.shape[1]}"
                )
            at_dim, _ = embedding_metrics(truncate_unit(q, dim), truncate_unit(d, dim), data, plot=False)
            metrics.update({f"{k}_dim{dim}": at_dim[k] for k in METRIC_NAMES[data.shape]})
    t2 = time.perf_counter()
    names = metric_names(data.shape, dims)
    return {k: metrics[k] for k in names}, plot, {"encode": t1 - t0, "metrics": t2 - t1}


def metric_names(shape: str, dims=()) -> list[str]:
    """The metrics `measure` returns for a data shape: METRIC_NAMES, then each again as `<name>_dim<d>`."""
    base = list(METRIC_NAMES[shape])
    return base + [f"{k}_dim{d}" for d in dims for k in base]


def truncate_unit(x: np.ndarray, dim: int) -> np.ndarray:
    """(N, H) unit vectors -> their first `dim` components, re-normalized (what a Matryoshka model serves)."""
    t = x[:, :dim]
    return t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)


def embedding_metrics(q: np.ndarray, d: np.ndarray, data: EvalData, plot: bool = True) -> tuple[dict, dict]:
    """Metrics of an embedder from its unique query and document embeddings (unit vectors), and plot data."""
    if data.shape == "sts":
        metrics = sts_metrics(q[data.qi], d[data.di], data.labels)
        return metrics, (
            {"scores": row_dots(q, d, data.qi, data.di), "labels": data.labels, "label": "cosine"}
            if plot
            else {}
        )
    if data.shape == "retrieval":
        metrics = retrieval_metrics(q, d, data.qi, data.di)  # unit vectors: dot == cosine
        return metrics, (retrieval_plot(q, d, data) if plot else {})
    scores = row_dots(q, d, data.qi, data.di)  # unit vectors: dot == cosine
    metrics = {
        **ranking_metrics(scores, data.relevant, data.qi),
        **margin_metrics(scores, data.relevant, data.qi),
    }
    return metrics, {"scores": scores, "relevant": data.relevant, "label": "cosine similarity"}


def retrieval_plot(q: np.ndarray, d: np.ndarray, data: EvalData) -> dict:
    """Every positive's cosine, and every non-relevant pair's when there are at most PLOT_NEGATIVES pairs,
    else those of a fixed random sample of them (never a Q x D matrix)."""
    if data.n_pairs <= PLOT_NEGATIVES:
        sq, sd, sampled = np.repeat(np.arange(len(q)), len(d)), np.tile(np.arange(len(d)), len(q)), ""
    else:
        rng = np.random.default_rng(0)
        sq, sd = rng.integers(0, len(q), PLOT_NEGATIVES), rng.integers(0, len(d), PLOT_NEGATIVES)
        sampled = "sampled"
    neg = ~np.isin(sq * len(d) + sd, data.qi * len(d) + data.di)
    scores = np.concatenate([row_dots(q, d, data.qi, data.di), row_dots(q, d, sq[neg], sd[neg])])
    relevant = np.concatenate([np.ones(len(data.qi), dtype=bool), np.zeros(int(neg.sum()), dtype=bool)])
    return {"scores": scores, "relevant": relevant, "label": "cosine similarity", "negatives": sampled}
