"""evaluate: measure a trained model (and optionally its base) on canonical eval rows.

    embedtune evaluate --model out/model --eval-data eval.jsonl --output eval/metrics.json \\
        --baseline-model Qwen/Qwen3-Embedding-0.6B

What is measured follows the shape of the data (exact definitions in `embedtune.metrics`):

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

The shape is decided for the whole file, in this order: any row with a non-empty `rejected_response` ->
ranking (rows without one add positives to their query; a query left without any negative is skipped and
counted); else a `label` on every row -> sts; else no `label` on any row -> retrieval; a file where only
some rows have a label is refused (naming the first line without one), as it is neither.

Ranking candidates (MTEB reranking semantics): rows are grouped by query text; a query's candidate list is
ALL its positives (the `response` of every row with that query) plus ALL its negatives (deduplicated; a
negative equal to one of the query's own positives is dropped). Nothing is sampled, so the numbers do not
depend on the eval set's size or order. Queries left without any negative are skipped and counted
(`n_queries_skipped`): a list of positives only would score 1.0 trivially.

Retrieval candidates (MTEB retrieval semantics): the corpus is every distinct `response` of the file; each
distinct query is ranked against the WHOLE corpus, and its relevant documents are the responses it is paired
with (a response paired with several queries is relevant to each). The metrics are exact (the rank of every
positive, however deep, for `map`; `mean_neg` over every (query, non-relevant document) pair) and computed
in blocks of queries, so memory stays bounded (tens of MB) whatever the corpus size; time grows with
queries x documents. Because the corpus is the eval file, the values depend on its size (a bigger corpus is
harder): compare them on the same file, as the baseline deltas do. `margin` uses each query's hardest
non-relevant document in the whole corpus. A query paired with every document is skipped and counted. A
reranker is refused on this shape: it would have to score every query with every document (Q x D forward
passes); evaluate it on rows with `rejected_response`.

How a candidate is scored:
  - embedder: cosine of the query embedding (with the model's `query_instruction`) and the document
    embedding. Every UNIQUE text is encoded once (queries and documents separately, as the instruction makes
    them different inputs), batched by length, without gradients; pair scores are then row-wise dot products
    gathered by index arrays, so metric cost grows with the number of pairs, never pairs x pairs.
  - reranker: ranking metrics use z = logit(yes) - logit(no) (a sigmoid saturates at 1.0 for confident
    pairs and would turn them into ties); `mean_pos` / `mean_neg` / `margin` use sigmoid(z), the [0, 1]
    relevance that `Reranker.score()` returns. STS-shaped data needs an embedder.

With `--baseline-model`, the baseline is measured the same way and `delta_<metric>` = tuned - baseline is
added for every metric. When the baseline is the model's own `base_model` (from its embedtune.json), it is
loaded with the settings training used (pooling, query instruction, max length; reranker instruction and
tokens), so the comparison isolates the weights.

Outputs: the JSON at `--output` (also what `run` returns; the pipeline logs its `metrics` items) and a
Markdown report (`--report`, default `<output>.md`) with a base/tuned/delta table and PNG plots embedded as
base64 data URIs (score histograms of positives vs negatives, or predicted vs gold scatter for STS, and a
base vs tuned bar chart), so the same single file renders in the Kubeflow UI and as an MLflow artifact.
The KFP UI's Markdown viewer (markdown-to-jsx) allows `data:image` URLs and shows the first 400,000
characters; the plots are small fixed-size PNGs (the scatter samples at most 5,000 points), so the report
stays far below that (about 60 kB) whatever the eval set's size.
"""

from __future__ import annotations

import base64
import io
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from embedtune.config import EvaluateConfig
from embedtune.data import format_problems, iter_rows
from embedtune.errors import DataError, EmbedtuneError
from embedtune.io import atomic_write, write_json
from embedtune.metrics import (
    MARGIN_METRICS,
    RANKING_METRICS,
    STS_METRICS,
    margin_metrics,
    ranking_metrics,
    retrieval_metrics,
    sts_metrics,
)
from embedtune.modeling import Embedder, Reranker, read_meta, task_type_of

PRIMARY = {"sts": "spearman_cosine", "ranking": "ndcg_at_10", "retrieval": "ndcg_at_10"}
METRIC_NAMES = {
    "sts": STS_METRICS,
    "ranking": RANKING_METRICS + MARGIN_METRICS,
    "retrieval": RANKING_METRICS + MARGIN_METRICS,
}
CHUNK = 65536  # pairs per gathered block: bounds the (chunk, H) temporaries to a few hundred MB at most
PLOT_NEGATIVES = 20000  # retrieval histogram: all non-relevant pairs up to this many, else a sample of it


# --------------------------------------------------------------------------------------------- data
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

    @property
    def n_pairs(self) -> int:
        """(query, document) pairs scored: every query x every document for retrieval, else the M pairs."""
        return len(self.queries) * len(self.docs) if self.shape == "retrieval" else len(self.qi)


def read_eval_data(path: str, max_errors: int = 20) -> EvalData:
    """Validate canonical rows (DataError `FILE:LINE: field: reason`) and detect the data shape."""
    rows, problems = [], []
    for lineno, row, row_problems in iter_rows(path):
        problems += [f"{path}:{lineno}: {p}" for p in row_problems]
        if len(problems) >= max_errors:
            break
        rows.append((lineno, row))
    if problems:
        raise DataError(format_problems(problems[:max_errors]))
    if not rows:
        raise EmbedtuneError(f"{path}: no rows")
    if any(row.get("rejected_response") for _, row in rows):
        return _ranking_data(path, rows)
    missing = [lineno for lineno, row in rows if row.get("label") is None]
    if not missing:
        return _sts_data(path, rows)
    if len(missing) < len(rows):
        raise DataError(
            f"{path}:{missing[0]}: label: missing (other rows have a label and none has rejected_response, "
            "so the file is read as STS pairs, which all need a label; drop every label to evaluate the "
            "pairs as retrieval)"
        )
    return _retrieval_data(path, rows)


def _index(texts: list[str], table: dict[str, int], text: str) -> int:
    i = table.get(text)
    if i is None:
        i = table[text] = len(texts)
        texts.append(text)
    return i


def _sts_data(path: str, rows) -> EvalData:
    queries, docs, qtab, dtab = [], [], {}, {}
    qi = [_index(queries, qtab, row["query"]) for _, row in rows]
    di = [_index(docs, dtab, row["response"]) for _, row in rows]
    labels = np.array([float(row["label"]) for _, row in rows])
    if len(rows) < 2 or np.ptp(labels) == 0:
        raise DataError(
            f"{path}: label: STS correlations need at least 2 rows whose labels are not all equal"
        )
    return EvalData("sts", len(rows), queries, docs, np.array(qi), np.array(di), labels=labels)


def _ranking_data(path: str, rows) -> EvalData:
    groups: dict[str, tuple[dict, dict]] = {}  # query -> (positives, negatives) as ordered sets
    for _, row in rows:
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
    for _, row in rows:
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


# --------------------------------------------------------------------------------------------- models
def load_for_eval(path: str, task_type: str, max_length: int = 0, like: dict | None = None):
    """Load `path` as `task_type`; `like` (a tuned model's embedtune.json) supplies its eval settings."""
    like = like or {}
    kwargs = {"max_length": max_length or like.get("max_length") or None}
    if task_type == "reranker":
        kwargs.update(
            instruction=like.get("reranker_instruction"),
            positive_token=like.get("positive_token"),
            negative_token=like.get("negative_token"),
        )
        model = Reranker.from_pretrained(path, **kwargs)
    else:
        kwargs.update(pooling=like.get("pooling") or "auto", query_instruction=like.get("query_instruction"))
        model = Embedder.from_pretrained(path, **kwargs)
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval()


def _row_dots(a: np.ndarray, b: np.ndarray, ia: np.ndarray, ib: np.ndarray) -> np.ndarray:
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
):
    """Embeddings of unique queries and docs, each distinct input encoded once.

    With a query instruction a text is a different input as a query and as a document; without one, a text
    that is both (common in STS pairs) is encoded once. `shard`: see `measure`.
    """

    def encode(texts: list[str], is_query: bool = False) -> np.ndarray:
        return shard(
            lambda idx: model.encode(
                [texts[i] for i in idx], is_query=is_query, batch_size=batch_size, show_progress=show_progress
            ),
            len(texts),
        )

    if model.query_instruction:
        return encode(queries, is_query=True), encode(docs)
    texts = list(dict.fromkeys(queries + docs))
    where = {t: i for i, t in enumerate(texts)}
    emb = encode(texts)
    return emb[[where[t] for t in queries]], emb[[where[t] for t in docs]]


def measure(
    model, data: EvalData, batch_size: int, show_progress: bool = True, shard=whole
) -> tuple[dict, dict, dict]:
    """Score every pair once, then compute the metrics. Returns (metrics, plot data, seconds).

    `model` is an already loaded `Embedder` or `Reranker` (train measures the model it is training).
    `shard(compute, n)` decides who runs the forward passes: `compute(idx)` returns the (len(idx), ...)
    outputs of items `idx` (texts or pairs) and `shard` returns all n of them. The default, `whole`, computes
    everything here; under torchrun, train passes one that splits the items across ranks and all-gathers.
    """
    t0 = time.perf_counter()
    if isinstance(model, Reranker):
        if data.shape != "ranking":
            raise EmbedtuneError(
                f"a reranker needs ranking eval data (rows with rejected_response), not {data.shape}"
            )
        queries, docs = [data.queries[i] for i in data.qi], [data.docs[i] for i in data.di]
        # z = logit(yes) - logit(no), float64: ranking uses z (sigmoid(z) saturates and ties), margins P(yes)
        scores = shard(
            lambda idx: model.logits(
                [queries[i] for i in idx], [docs[i] for i in idx], batch_size, show_progress
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
        q, d = encode_unique(
            model, data.queries, data.docs, batch_size, show_progress, shard
        )  # (Q, H), (D, H)
        t1 = time.perf_counter()
        if data.shape == "sts":
            metrics = sts_metrics(q[data.qi], d[data.di], data.labels)
            plot = {"scores": _row_dots(q, d, data.qi, data.di), "labels": data.labels, "label": "cosine"}
        elif data.shape == "retrieval":
            metrics = retrieval_metrics(q, d, data.qi, data.di)  # unit vectors: dot == cosine
            plot = _retrieval_plot(q, d, data)
        else:
            scores = _row_dots(q, d, data.qi, data.di)  # unit vectors: dot == cosine
            metrics = {
                **ranking_metrics(scores, data.relevant, data.qi),
                **margin_metrics(scores, data.relevant, data.qi),
            }
            plot = {"scores": scores, "relevant": data.relevant, "label": "cosine similarity"}
    t2 = time.perf_counter()
    return {k: metrics[k] for k in METRIC_NAMES[data.shape]}, plot, {"encode": t1 - t0, "metrics": t2 - t1}


def _retrieval_plot(q: np.ndarray, d: np.ndarray, data: EvalData) -> dict:
    """Every positive's cosine, and every non-relevant pair's when there are at most PLOT_NEGATIVES pairs,
    else those of a fixed random sample of them (never a Q x D matrix)."""
    if data.n_pairs <= PLOT_NEGATIVES:
        sq, sd, sampled = np.repeat(np.arange(len(q)), len(d)), np.tile(np.arange(len(d)), len(q)), ""
    else:
        rng = np.random.default_rng(0)
        sq, sd = rng.integers(0, len(q), PLOT_NEGATIVES), rng.integers(0, len(d), PLOT_NEGATIVES)
        sampled = "sampled"
    neg = ~np.isin(sq * len(d) + sd, data.qi * len(d) + data.di)
    scores = np.concatenate([_row_dots(q, d, data.qi, data.di), _row_dots(q, d, sq[neg], sd[neg])])
    relevant = np.concatenate([np.ones(len(data.qi), dtype=bool), np.zeros(int(neg.sum()), dtype=bool)])
    return {"scores": scores, "relevant": relevant, "label": "cosine similarity", "negatives": sampled}


# --------------------------------------------------------------------------------------------- step
def _same_model(a: str | None, b: str) -> bool:
    """Same hub id, or the same local folder however spelled."""
    if not a:
        return False
    return a == b or (os.path.isdir(a) and os.path.isdir(b) and os.path.samefile(a, b))


def run(cfg: EvaluateConfig) -> dict:
    """Measure `cfg.model` (and `cfg.baseline_model`) on `cfg.eval_data`; write the JSON and the report."""
    data = read_eval_data(cfg.eval_data)
    names = METRIC_NAMES[data.shape]
    primary = cfg.primary_metric or PRIMARY[data.shape]
    if primary not in names:
        raise EmbedtuneError(
            f"primary_metric: {primary!r} is not computed for {data.shape} data; available: {', '.join(names)}"
        )
    task_type = task_type_of(cfg.model)
    if task_type == "reranker" and data.shape == "sts":
        raise EmbedtuneError(
            f"{cfg.model} is a reranker: it needs ranking eval data (rows with rejected_response)"
        )
    if task_type == "reranker" and data.shape == "retrieval":
        raise EmbedtuneError(
            f"{cfg.model} is a reranker: {cfg.eval_data} holds query/response pairs without "
            f"rejected_response (retrieval), which would need a cross-encoder pass for every query x document "
            f"({len(data.queries)} x {len(data.docs)}); evaluate it on rows with rejected_response (ranking), "
            "or evaluate an embedder on this file"
        )
    seconds: dict[str, float] = {}

    t = time.perf_counter()
    model = load_for_eval(cfg.model, task_type, cfg.max_length)
    seconds["load"] = time.perf_counter() - t
    metrics, plot, timing = measure(model, data, cfg.per_device_eval_batch_size)
    seconds.update(timing)
    del model

    base_metrics = base_plot = None
    if cfg.baseline_model:
        meta = read_meta(cfg.model)
        like = meta if _same_model(meta.get("base_model"), cfg.baseline_model) else None  # trained from it
        base = load_for_eval(cfg.baseline_model, task_type, cfg.max_length, like)
        base_metrics, base_plot, timing = measure(base, data, cfg.per_device_eval_batch_size)
        seconds["baseline_encode"], seconds["baseline_metrics"] = timing["encode"], timing["metrics"]
        del base

    result = {
        "primary_metric": primary,
        "primary_value": metrics[primary],
        "metrics": metrics,
    }
    if base_metrics is not None:
        result["baseline_metrics"] = base_metrics
        result["deltas"] = {f"delta_{k}": metrics[k] - base_metrics[k] for k in names}
    report_path = cfg.report or f"{cfg.output}.md"
    result.update(
        n_rows=data.n_rows,
        n_queries=len(data.queries),
        n_pairs=data.n_pairs,
        n_docs=len(data.docs),
        n_texts=len(data.queries) + len(data.docs),
        n_queries_skipped=data.n_queries_skipped,
        data_shape=data.shape,
        task_type=task_type,
        model=cfg.model,
        baseline_model=cfg.baseline_model or None,
        eval_data=cfg.eval_data,
        report=report_path,
    )
    t = time.perf_counter()
    markdown = render_report(result, plot, base_plot)
    with atomic_write(report_path, "w") as f:
        f.write(markdown)
    seconds["report"] = time.perf_counter() - t
    result["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    write_json(cfg.output, result)
    print(
        f"evaluate: {primary} = {metrics[primary]:.4f}"
        + (f" (baseline {base_metrics[primary]:.4f})" if base_metrics else "")
        + f" on {data.n_pairs} {data.shape} pairs; report {report_path}",
        file=sys.stderr,
    )
    return result


# --------------------------------------------------------------------------------------------- report
def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _score_figure(plots: list[tuple[str, dict]]):
    """One panel per model: positives vs negatives histogram (ranking) or predicted vs gold scatter (sts)."""
    from matplotlib.figure import Figure  # object API + Agg canvas: no global pyplot state, no display

    fig = Figure(figsize=(5 * len(plots), 3.6))
    bins = np.histogram_bin_edges(np.concatenate([p["scores"] for _, p in plots]), bins=40)  # shared x axis
    for k, (title, p) in enumerate(plots, 1):
        ax = fig.add_subplot(1, len(plots), k)
        if "relevant" in p:
            neg = "negatives" + (f" ({p['negatives']})" if p.get("negatives") else "")
            ax.hist(p["scores"][~p["relevant"]], bins=bins, alpha=0.6, density=True, label=neg)
            ax.hist(p["scores"][p["relevant"]], bins=bins, alpha=0.6, density=True, label="positives")
            ax.set_xlabel(p["label"])
            ax.set_ylabel("density")
            ax.legend()
        else:
            keep = np.random.default_rng(0).permutation(len(p["scores"]))[:5000]  # a readable, small PNG
            ax.scatter(p["labels"][keep], p["scores"][keep], s=6, alpha=0.4)
            ax.set_xlabel("gold label")
            ax.set_ylabel(f"predicted {p['label']}")
        ax.set_title(title)
    return fig


def _bar_figure(metrics: dict, base: dict | None):
    from matplotlib.figure import Figure

    names = list(metrics)
    x = np.arange(len(names))
    fig = Figure(figsize=(max(6, 0.9 * len(names)), 3.6))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.4 if base else 0.6
    if base:
        ax.bar(x - width / 2, [base[n] for n in names], width, label="base")
    ax.bar(x + (width / 2 if base else 0), [metrics[n] for n in names], width, label="tuned")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.legend()
    ax.set_title("base vs tuned" if base else "tuned")
    return fig


def render_report(result: dict, plot: dict, base_plot: dict | None) -> str:
    """Markdown: headline, metrics table (base | tuned | delta), plots as embedded PNGs."""
    metrics, base = result["metrics"], result.get("baseline_metrics")
    primary = result["primary_metric"]
    lines = [
        f"# Evaluation of `{result['model']}`",
        "",
        f"- eval data: `{result['eval_data']}` ({result['data_shape']}): {result['n_rows']} rows, "
        f"{result['n_queries']} queries"
        + (f" x a corpus of {result['n_docs']} documents" if result["data_shape"] == "retrieval" else "")
        + f", {result['n_pairs']} scored pairs"
        + (
            f", {result['n_queries_skipped']} queries without negatives skipped"
            if result["n_queries_skipped"]
            else ""
        ),
        f"- primary metric: **{primary} = {metrics[primary]:.4f}**"
        + (f" (base {base[primary]:.4f}, delta {metrics[primary] - base[primary]:+.4f})" if base else ""),
    ]
    if base:
        lines.append(f"- baseline: `{result['baseline_model']}`")
    lines += ["", "| metric | base | tuned | delta |" if base else "| metric | tuned |"]
    lines.append("|---|---:|---:|---:|" if base else "|---|---:|")
    for name, value in metrics.items():
        label = f"**{name}**" if name == primary else name
        if base:
            lines.append(f"| {label} | {base[name]:.4f} | {value:.4f} | {value - base[name]:+.4f} |")
        else:
            lines.append(f"| {label} | {value:.4f} |")
    panels = ([("base", base_plot)] if base_plot else []) + [("tuned", plot)]
    kind = "score distribution, positives vs negatives" if "relevant" in plot else "predicted vs gold"
    lines += ["", f"## {kind}", "", f"![{kind}](data:image/png;base64,{_png(_score_figure(panels))})"]
    lines += [
        "",
        "## metrics",
        "",
        f"![metrics](data:image/png;base64,{_png(_bar_figure(metrics, base))})",
        "",
    ]
    return "\n".join(lines)
