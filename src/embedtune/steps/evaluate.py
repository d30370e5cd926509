"""evaluate: measure a trained model (and optionally its base) on canonical eval rows.

    embedtune evaluate --model out/model --eval-data eval.jsonl --output eval/metrics.json \\
        --baseline-model Qwen/Qwen3-Embedding-0.6B

Read top to bottom, `run(cfg)` is the whole step:

1. Read the eval rows and decide their shape: sts, ranking or retrieval (`embedtune.evaldata`, which also
   says which metrics each shape gets and how candidate lists are built).
2. Load the model as the kind its embedtune.json names (`modeling.load_model`), in `--dtype` (auto: bf16
   weights on GPUs that have it, fp32 on CPU; `embedtune.speed`), and score every unique text or reranker
   pair once (`embedtune.scoring`), in batches of similar token counts.
3. With `--baseline-model`, measure it the same way and add `delta_<metric>` = tuned - baseline for every
   metric. When the baseline is the model's own `base_model` (from its embedtune.json), it is loaded with
   the settings training used (pooling, query instruction, max length; reranker instruction and tokens), so
   the comparison isolates the weights.
4. Write the JSON at `--output` (also what `run` returns; the pipeline logs its `metrics` items) and a
   Markdown report (`--report`, default `<output>.md`, `embedtune.report`): a base/tuned/delta table and
   PNG plots (score histograms of positives vs negatives, or predicted vs gold for STS, and a bar chart).

`--matryoshka-dims 512,256`: every metric is also reported on the embeddings truncated to d dimensions and
re-normalized, as `<metric>_dim<d>` (e.g. `ndcg_at_10_dim256`), for the model and its baseline, from one
encode. Leakage check: when the model's embedtune.json holds a training fingerprint (train records one,
`embedtune.overlap`), the eval queries and positives are checked against it; overlap is warned about on
stderr and in the report, and counted in `train_overlap`.
"""

from __future__ import annotations

import os
import time

from embedtune.config import EvaluateConfig
from embedtune.errors import EmbedtuneError
from embedtune.evaldata import PRIMARY, read_eval_data
from embedtune.io import json_bytes
from embedtune.losses import matryoshka_spec
from embedtune.modeling import read_meta, task_type_of
from embedtune.outputs import OutputSet, refuse_inputs
from embedtune.overlap import fingerprint_overlap
from embedtune.progress import say
from embedtune.report import overlap_text, render_report
from embedtune.scoring import measure, metric_names, scoring_model
from embedtune.speed import resolve_dtype


def _same_model(a: str | None, b: str) -> bool:
    """Same hub id, or the same local folder however spelled."""
    if not a:
        return False
    return a == b or (os.path.isdir(a) and os.path.isdir(b) and os.path.samefile(a, b))


def eval_texts(data) -> list[str]:
    """The eval texts a training fingerprint is checked against: every query and every positive document."""
    positives = data.di if data.relevant is None else data.di[data.relevant]
    return [*data.queries, *(data.docs[i] for i in set(positives.tolist()))]


def run(cfg: EvaluateConfig) -> dict:
    """Measure `cfg.model` (and `cfg.baseline_model`) on `cfg.eval_data`; write the JSON and the report."""
    refuse_inputs({"model": cfg.model, "eval_data": cfg.eval_data, "baseline_model": cfg.baseline_model},
                  {"output": cfg.output, "report": cfg.report or f"{cfg.output}.md"})  # fmt: skip
    data = read_eval_data(cfg.eval_data)
    try:
        dims, _ = matryoshka_spec(cfg.matryoshka_dims)
    except ValueError as e:
        raise EmbedtuneError(str(e)) from None
    names = metric_names(data.shape, dims)
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
    if task_type == "reranker" and dims:
        raise EmbedtuneError(f"{cfg.model} is a reranker: matryoshka_dims applies to embedders only")
    overlap = fingerprint_overlap(read_meta(cfg.model).get("train_fingerprint"), eval_texts(data))
    if overlap and overlap["found"]:
        say("evaluate", f"warning: {overlap_text(overlap)}")
    seconds: dict[str, float] = {}
    dtype = resolve_dtype(cfg.dtype)  # auto: bf16 on GPUs that have it, else fp32 (`embedtune.speed`)

    t = time.perf_counter()
    with scoring_model(cfg.model, task_type, dtype, max_length=cfg.max_length) as model:
        seconds["load"] = time.perf_counter() - t
        metrics, plot, timing = measure(model, data, cfg.per_device_eval_batch_size, dims=dims)
    seconds.update(timing)
    del model

    base_metrics = base_plot = None
    if cfg.baseline_model:
        meta = read_meta(cfg.model)
        like = meta if _same_model(meta.get("base_model"), cfg.baseline_model) else None  # trained from it
        with scoring_model(
            cfg.baseline_model, task_type, dtype, like=like, max_length=cfg.max_length
        ) as base:
            base_metrics, base_plot, timing = measure(base, data, cfg.per_device_eval_batch_size, dims=dims)
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
        matryoshka_dims=dims,
        train_overlap=overlap,
        data_shape=data.shape,
        task_type=task_type,
        dtype=dtype,
        model=cfg.model,
        baseline_model=cfg.baseline_model or None,
        eval_data=cfg.eval_data,
        report=report_path,
    )
    t = time.perf_counter()
    markdown = render_report(result, plot, base_plot)
    seconds["report"] = time.perf_counter() - t
    result["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    with OutputSet() as outs:  # metrics and report together, or neither
        outs.write_bytes(report_path, markdown.encode())
        outs.write_bytes(cfg.output, json_bytes(result))
    say(
        "evaluate",
        f"{primary} = {metrics[primary]:.4f}"
        + (f" (baseline {base_metrics[primary]:.4f})" if base_metrics else "")
        + f" on {data.n_pairs} {data.shape} pairs; report {report_path}",
    )
    return result
