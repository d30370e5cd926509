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

`--guard-data general=stsb_dev.jsonl,...`: more eval sets, each measured like the eval data (its own shape and
primary metric) for the model and the baseline, reported under `guards` (and in the report): what merging and
distillation protect. With `--max-guard-drop D` (>= 0), a guard set whose primary metric falls more than D
below the baseline's is listed in `guard_failures`, and register keeps the champion for that version.

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


def parse_guards(spec: str) -> dict[str, str]:
    """`NAME=FILE,NAME=FILE` -> {name: file}, in order; a bad or repeated entry is one line naming it."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, path = (x.strip() for x in part.partition("="))
        if not sep or not name or not path:
            raise EmbedtuneError(f"guard_data: {part!r} is not NAME=FILE")
        if name in out:
            raise EmbedtuneError(f"guard_data: {name!r} is named twice")
        out[name] = path
    return out


def guard_results(
    sets: dict, files: dict, tuned: dict, base: dict | None, max_drop: float
) -> tuple[dict, list]:
    """(per guard set: its primary metric for the model and the baseline and the delta, the names whose
    primary metric fell more than `max_drop` below the baseline's; none when max_drop < 0)."""
    guards = {}
    for name, data in sets.items():
        primary = PRIMARY[data.shape]
        entry = {"eval_data": files[name], "data_shape": data.shape, "primary_metric": primary,
                 "value": tuned[name][primary], "metrics": tuned[name]}  # fmt: skip
        if base is not None:
            entry.update(baseline_value=base[name][primary], delta=tuned[name][primary] - base[name][primary])
        guards[name] = entry
    failed = [n for n, g in guards.items() if max_drop >= 0 and g["delta"] < -max_drop]
    return guards, failed


def run(cfg: EvaluateConfig) -> dict:
    """Measure `cfg.model` (and `cfg.baseline_model`) on `cfg.eval_data`; write the JSON and the report."""
    guard_files = parse_guards(cfg.guard_data)
    refuse_inputs({"model": cfg.model, "eval_data": cfg.eval_data, "baseline_model": cfg.baseline_model,
                   "guard_data": list(guard_files.values())},
                  {"output": cfg.output, "report": cfg.report or f"{cfg.output}.md"})  # fmt: skip
    if cfg.max_guard_drop >= 0 and not (cfg.baseline_model and guard_files):
        raise EmbedtuneError(
            "max_guard_drop: needs guard_data and a baseline_model (the drop is measured against it)"
        )
    if -1 < cfg.max_guard_drop < 0:
        raise EmbedtuneError(f"max_guard_drop: {cfg.max_guard_drop} must be -1 (off) or >= 0")
    data = read_eval_data(cfg.eval_data)
    guard_sets = {name: read_eval_data(path) for name, path in guard_files.items()}
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
        guard_tuned = {n: measure(model, d, cfg.per_device_eval_batch_size)[0] for n, d in guard_sets.items()}
    seconds.update(timing)
    del model

    base_metrics = base_plot = guard_base = None
    if cfg.baseline_model:
        meta = read_meta(cfg.model)
        like = meta if _same_model(meta.get("base_model"), cfg.baseline_model) else None  # trained from it
        with scoring_model(
            cfg.baseline_model, task_type, dtype, like=like, max_length=cfg.max_length
        ) as base:
            base_metrics, base_plot, timing = measure(base, data, cfg.per_device_eval_batch_size, dims=dims)
            guard_base = {
                n: measure(base, d, cfg.per_device_eval_batch_size)[0] for n, d in guard_sets.items()
            }
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
    if guard_sets:
        result["guards"], result["guard_failures"] = guard_results(
            guard_sets, guard_files, guard_tuned, guard_base, cfg.max_guard_drop
        )
        result["max_guard_drop"] = cfg.max_guard_drop
        for name in result["guard_failures"]:
            g = result["guards"][name]
            say("evaluate", f"guard {name}: {g['primary_metric']} fell by {-g['delta']:.4f} > max_guard_drop "
                            f"{cfg.max_guard_drop:g} (register keeps the champion)")  # fmt: skip
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
