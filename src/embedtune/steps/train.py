"""train: fine-tune an embedder or a reranker with the Hugging Face Trainer, full or LoRA, DeepSpeed or not.

Read top to bottom, like nanoGPT: `run(cfg)` is the whole step.

1. Resolve the ms-swift env-var knobs (INFONCE_TEMPERATURE, ...; explicit flags win) and log them.
2. Load the rows and check them for the loss (bad labels, missing negatives) *before* any model is loaded.
3. `--nproc N` (or DeepSpeed) outside torchrun: relaunch this same command under torchrun
   (`embedtune.launch`) and return the result rank 0 wrote.
4. Build the model (`Embedder` or `Reranker`, LoRA on its backbone when asked), tokenize every text once.
5. Train with the HF Trainer: length-grouped batches padded to their own longest text, a wrapper module whose
   `forward(batch)` returns `{"loss": LOSSES[loss_type](...)}`, checkpoints every `save_steps`, and automatic
   resume from the latest complete `checkpoint-*` in `checkpoint_dir` (default: `output_dir`). Every
   evaluation reports the eval loss and evaluate's metrics for the eval file's shape (see below).
6. Gather the full weights (ZeRO-3 shards them), save the model folder (sentence-transformers format for
   embedders; only the adapter for LoRA), check the saved weights are whole, write `train_result.json`,
   delete the checkpoints.

How each loss sees a batch of B rows (one forward pass encodes every text of the batch):

===================  ======================================================  =================================
loss_type            texts encoded together                                   loss
===================  ======================================================  =================================
infonce              B queries + B positives + the K real hard negatives      cross-entropy on the positive
                     (ragged rows padded with a mask, `pad_negatives`)        over the (global) batch
cosine_similarity,   B queries + B responses                                  on cos(query_i, response_i)
(online_)contrastive                                                          and label_i
pointwise_reranker   one prompt per (query, positive) and (query, negative)   BCE, positive -> label (default
                                                                              1), negatives -> 0
listwise_reranker    per row the group [positive, negatives...]               softmax CE over each group
===================  ======================================================  =================================

The final folder is `output_dir` itself; `checkpoint-*` folders live inside it while training (or inside
`checkpoint_dir` when set) and are deleted after the final model is saved and verified (they hold optimizer
states, several times the model's size). `train_result.json` is written last: its presence marks a finished
run, and re-running the same command on a finished folder returns it without training again. On Kubeflow the
output folder is local to the pod, so a retried or preempted pod would start from zero: `checkpoint_dir` on a
persistent volume is what lets it resume.

Evaluation metrics during training. With `eval_data`, every evaluation (before the first step of a fresh run,
every `eval_steps`, and at the end) logs, next to `eval_loss`, the metrics `embedtune evaluate` computes for
the file's shape (`eval_spearman_cosine`, ... for STS rows; `eval_ndcg_at_10`, `eval_map`, `eval_mrr_at_10`,
`eval_mean_pos`, `eval_mean_neg`, `eval_margin` for ranking and retrieval rows; rerankers: ranking rows only).
The code is evaluate's own (`read_eval_data` + `measure` on the live model), so the final values equal what
`embedtune evaluate` reports for the saved model. Under torchrun the unique texts (or reranker pairs) are split
across ranks, each rank encodes its share padded to the same count (ZeRO-3 gathers parameters collectively in
every forward pass: a rank with one batch more would wait forever), the outputs are all-gathered and every
rank computes the metrics. A file evaluate cannot measure for this model (a reranker on rows without
`rejected_response`, STS rows whose labels are all equal) keeps the eval loss only, and says why.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import random
import re
import shutil
import sys
import time
import warnings
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from embedtune.config import ENV_DEFAULTS, TrainConfig, resolve_env_defaults
from embedtune.data import canonical, format_problems, iter_rows
from embedtune.errors import DataError, EmbedtuneError
from embedtune.io import read_json, write_json
from embedtune.launch import LAUNCHED, inside_torchrun, torchrun
from embedtune.losses import (
    EMBEDDING_LOSSES,
    LOSSES,
    RERANKER_LOSSES,
    check_loss_data,
    pack_negatives,
    pad_negatives,
)
from embedtune.modeling import Embedder, Reranker
from embedtune.steps.evaluate import METRIC_NAMES, PRIMARY, EvalData, measure, read_eval_data

RESULT_FILE = "train_result.json"
# DeepSpeed calls torch.distributed functions that warn "deprecated" on every call, every rank.
DEPRECATED_DIST_CALLS = r".*torch\.distributed\.\w+`? is deprecated"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Knobs that do not change the trained weights: a finished run re-run with other values is still "the same".
BOOKKEEPING_KNOBS = {
    "eval_data",
    "checkpoint_dir",
    "per_device_eval_batch_size",
    "logging_steps",
    "eval_steps",
    "save_steps",
    "save_total_limit",
    "dataloader_num_workers",
}


def run(cfg: TrainConfig) -> dict:
    """Train and save; returns the contents of `train_result.json` (global_step, losses, speed, knobs)."""
    # ---------------------------------------------------------------- 1. effective knobs
    warnings.filterwarnings("ignore", DEPRECATED_DIST_CALLS, FutureWarning)
    given, cfg = cfg, resolve_env_defaults(cfg)
    check_knobs(cfg)
    out = Path(cfg.output_dir)
    if not os.environ.get(LAUNCHED):  # a child of our own launch: the parent logged them
        log_env_knobs(given, cfg)

    # ---------------------------------------------------------------- 2. data, checked before any model
    train_rows, skipped = load_rows(cfg.train_data, cfg)
    eval_rows, _ = load_rows(cfg.eval_data, cfg) if cfg.eval_data else ([], 0)
    finished = finished_result(out, cfg)
    if finished is not None:
        return finished

    # ---------------------------------------------------------------- 3. several processes: relaunch
    if (cfg.nproc > 1 or cfg.deepspeed != "none") and not inside_torchrun():
        torchrun("train", cfg, cfg.nproc)
        return read_json(out / RESULT_FILE)

    # ---------------------------------------------------------------- 4. model and tokens
    # TrainingArguments first: with ZeRO-3 it makes from_pretrained load the weights already sharded.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = dataclasses.replace(cfg, nproc=world)  # under torchrun the processes are what they are
    ckpt_dir = Path(cfg.checkpoint_dir or cfg.output_dir)
    resume = latest_checkpoint(ckpt_dir)
    metric_data = metric_eval_data(cfg.eval_data, cfg.task_type) if eval_rows else None
    args = training_arguments(cfg, world, has_eval=bool(eval_rows), fresh=resume is None)
    if cfg.deepspeed != "none":
        import deepspeed

        deepspeed.init_distributed(dist_backend=args.ddp_backend)  # adopts the process group accelerate made
    model = build_model(cfg)
    t0 = time.perf_counter()
    train_set = tokenize_rows(model, train_rows, cfg)
    eval_set = sorted(tokenize_rows(model, eval_rows, cfg), key=lambda f: f["length"])
    tokenize_s = time.perf_counter() - t0
    say(
        f"tokenized {len(train_set)} train + {len(eval_set)} eval rows in {tokenize_s:.1f}s "
        f"(longest text {max(f['length'] for f in train_set)} tokens, max_length {cfg.max_length})"
    )

    # ---------------------------------------------------------------- 5. train
    global_batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world
    trainer = EmbedtuneTrainer(
        model=TrainModel(model, cfg),
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set or None,
        data_collator=Collator(
            cfg.loss_type, model.tokenizer.pad_token_id, cfg.infonce_hard_negatives, cfg.seed
        ),
    )
    trainer.metric_data = metric_data
    trainer.distinct_texts = cfg.loss_type == "infonce" and bool(cfg.infonce_use_batch)
    trainer.group_by_length = cfg.group_by_length
    trainer.pop_callback(ProgressCallback)
    trainer.pop_callback(PrinterCallback)
    trainer.add_callback(StepLog(global_batch, PRIMARY[metric_data.shape] if metric_data else None))
    resumed_step = int(CHECKPOINT.match(resume.name).group(1)) if resume else 0
    say(f"resuming from {resume} (step {resumed_step})" if resume else "starting from step 0 (no checkpoint)")
    train_out = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    # The last step's evaluation, unless eval_steps already ran it (every rank holds the same log history).
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    if evals and evals[-1]["step"] == trainer.state.global_step:
        eval_metrics = evals[-1]
    else:
        eval_metrics = trainer.evaluate() if eval_set else {}

    # ---------------------------------------------------------------- 6. save, verify, report
    # Collective under ZeRO-3 (every rank sends its shards); the full dict lands on rank 0.
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    result = None
    if rank() == 0:
        prefix = "model.backbone." if cfg.task_type == "embedding" else "model.lm."
        weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        saved_config = dataclasses.asdict(
            dataclasses.replace(cfg, pooling=getattr(model, "pooling", cfg.pooling))
        )
        model.save_pretrained(
            out,
            meta={
                "base_model": base_model_id(cfg.model),
                "train_type": cfg.train_type,
                "train_config": saved_config,
            },
            state_dict=weights,
        )
        check_saved_weights(out, model, cfg.train_type)
        history = trainer.state.log_history
        names = METRIC_NAMES[metric_data.shape] if metric_data else ()
        result = {
            "output_dir": str(out),
            "global_step": trainer.state.global_step,
            "resumed_from_step": resumed_step,
            "train_loss": train_out.training_loss,
            "eval_loss": eval_metrics.get("eval_loss"),
            "eval_data_shape": metric_data.shape if metric_data else None,
            "eval_metrics": {k: eval_metrics[f"eval_{k}"] for k in names},
            "train_runtime": train_out.metrics.get("train_runtime"),
            "train_samples_per_second": train_out.metrics.get("train_samples_per_second"),
            "tokenize_seconds": round(tokenize_s, 3),
            "world_size": world,
            "global_batch_size": global_batch,
            "train_rows": len(train_set),
            "eval_rows": len(eval_set),
            "skipped_groups": skipped,
            "loss_history": [[h["step"], h["loss"]] for h in history if "loss" in h],
            "eval_loss_history": [[h["step"], h["eval_loss"]] for h in history if "eval_loss" in h],
            "eval_metrics_history": [
                [h["step"], {k: h[f"eval_{k}"] for k in names}]
                for h in history
                if names and f"eval_{names[0]}" in h
            ],
            "config": dataclasses.asdict(cfg),
        }
        write_json(out / RESULT_FILE, result)  # last: marks the run finished
        for ckpt in checkpoints(ckpt_dir):
            shutil.rmtree(ckpt, ignore_errors=True)
        if ckpt_dir != out:
            with contextlib.suppress(OSError):
                ckpt_dir.rmdir()  # only when empty: the run's own folder on a shared volume
        say(
            f"saved {cfg.task_type} ({cfg.train_type}) to {out}: step {result['global_step']}, loss {result['train_loss']:.4f}"
        )
    trainer.accelerator.wait_for_everyone()
    result = result if result is not None else read_json(out / RESULT_FILE)
    if dist.is_initialized():
        dist.destroy_process_group()  # a clean exit: gloo threads left running abort the process at exit
    return result


# -------------------------------------------------------------------------------------------------- knobs
def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def say(message: str) -> None:
    """One progress line on stderr, from rank 0 only (stdout carries the step's JSON result)."""
    if rank() == 0:
        print(f"embedtune train: {message}", file=sys.stderr, flush=True)


def log_env_knobs(given: TrainConfig, cfg: TrainConfig) -> None:
    """Log the effective value of each env-var knob the loss reads, and where it came from."""
    fields = [f for f in ENV_DEFAULTS if f.startswith("infonce_")] if cfg.loss_type == "infonce" else []
    if cfg.task_type == "reranker":
        fields = ["positive_token", "negative_token"]
    for field in fields:
        env = ENV_DEFAULTS[field][0]
        if getattr(given, field) is not None:
            source = "flag" + (f", env {env} ignored" if os.environ.get(env) else "")
        else:
            source = f"env {env}" if os.environ.get(env) else "default"
        say(f"{field} = {getattr(cfg, field)!r} ({source})")


def check_knobs(cfg: TrainConfig) -> None:
    """Reject knob combinations that cannot work, before anything is loaded."""
    losses = {"embedding": EMBEDDING_LOSSES, "reranker": RERANKER_LOSSES}
    if cfg.task_type not in losses:
        raise EmbedtuneError(f"task_type: {cfg.task_type!r} is not one of embedding, reranker")
    if cfg.loss_type not in losses[cfg.task_type]:
        raise EmbedtuneError(
            f"loss_type: {cfg.loss_type!r} is not for task_type {cfg.task_type!r}; "
            f"choose one of {', '.join(sorted(losses[cfg.task_type]))}"
        )
    if cfg.train_type not in ("full", "lora"):
        raise EmbedtuneError(f"train_type: {cfg.train_type!r} is not one of full, lora")
    if cfg.deepspeed not in ("zero3", "zero2", "none"):
        raise EmbedtuneError(f"deepspeed: {cfg.deepspeed!r} is not one of zero3, zero2, none")
    if cfg.nproc < 1 or cfg.per_device_train_batch_size < 1 or cfg.gradient_accumulation_steps < 1:
        raise EmbedtuneError(
            "nproc, per_device_train_batch_size and gradient_accumulation_steps must be >= 1"
        )
    if not 0 <= cfg.warmup_ratio < 1:
        raise EmbedtuneError(f"warmup_ratio: {cfg.warmup_ratio} is not in [0, 1)")
    if cfg.max_steps <= 0 and cfg.num_train_epochs <= 0:
        raise EmbedtuneError("set num_train_epochs > 0 or max_steps > 0")
    if cfg.loss_type == "infonce" and cfg.infonce_temperature <= 0:
        raise EmbedtuneError(f"infonce_temperature: {cfg.infonce_temperature} must be > 0")


# -------------------------------------------------------------------------------------------------- data
def load_rows(path: str, cfg: TrainConfig) -> tuple[list[dict], int]:
    """Canonical rows of a JSONL file, each with its `_line`, checked for the loss; and the groups skipped.

    Raises `DataError` naming `FILE:LINE: field: reason` (row rules from `embedtune.data`, loss rules from
    `embedtune.losses.check_loss_data`). listwise_reranker rows whose group [positive, negatives...] is
    smaller than `listwise_min_group_size` are dropped and counted (they have nothing to rank against).
    """
    rows, problems = [], []
    for lineno, row, row_problems in iter_rows(path, cfg.loss_type):
        if row_problems:
            problems += [f"{path}:{lineno}: {p}" for p in row_problems]
            if len(problems) >= 20:
                break
        else:
            rows.append({**canonical(row), "_line": lineno})
    if problems:
        raise DataError(format_problems(problems[:20]))
    if not rows:
        raise EmbedtuneError(f"{path}: no rows")
    check_loss_data(cfg.loss_type, rows, cfg, source=path)
    skipped = 0
    if cfg.loss_type == "listwise_reranker":
        kept = [r for r in rows if 1 + len(r.get("rejected_response", [])) >= cfg.listwise_min_group_size]
        skipped = len(rows) - len(kept)
        if skipped:
            say(
                f"{path}: {skipped} rows skipped: [positive, negatives...] smaller than listwise_min_group_size"
            )
        rows = kept
    return rows, skipped


def text_key(ids: np.ndarray) -> int:
    """A stable 63-bit key of a text's (truncated) token ids: equal ids, equal key, on every rank (unlike
    `hash`). Texts that differ only past `max_length` are the same text to the model, and get the same key."""
    return int.from_bytes(hashlib.blake2b(ids.tobytes(), digest_size=8).digest(), "little") >> 1


def tokenize_rows(model: Embedder | Reranker, rows: list[dict], cfg: TrainConfig) -> list[dict]:
    """Token ids of every text, once, unpadded (int32 arrays); each distinct text is tokenized once.

    Embedding features: `query`, `response` (arrays), `negatives` (list of arrays), `label`, `length`.
    Reranker features: `pairs` (one prompt per [positive, negatives...]), `targets`, `length`.
    `length` (the longest text of the row) drives length-grouped batching.
    """
    if not rows:
        return []

    def ids(texts, **kw) -> dict:
        texts = list(dict.fromkeys(texts))
        out = {}
        for i in range(0, len(texts), 4096):  # chunks bound the tokenizer's memory on big files
            chunk = texts[i : i + 4096]
            enc = model.tokenize(chunk, padding=False, **kw)["input_ids"]
            out.update(zip(chunk, (np.asarray(e, dtype=np.int32) for e in enc), strict=True))
        return out

    feats = []
    if cfg.task_type == "embedding":
        q = ids([r["query"] for r in rows], is_query=True)
        d = ids([t for r in rows for t in [r["response"], *r.get("rejected_response", [])]])
        q_keys = {t: text_key(a) for t, a in q.items()}
        d_keys = {t: text_key(a) for t, a in d.items()}
        for i, r in enumerate(rows):
            negs = [d[t] for t in r.get("rejected_response", [])]
            texts = [q[r["query"]], d[r["response"]], *negs]
            feats.append(
                {
                    "idx": i,
                    "query": texts[0],
                    "response": texts[1],
                    "negatives": negs,
                    "label": float(r.get("label", 1.0)),
                    "length": max(len(t) for t in texts),
                    # (query, positive, *negatives): duplicate-free batches and the loss's false-negative mask
                    "text_keys": (
                        q_keys[r["query"]],
                        d_keys[r["response"]],
                        *(d_keys[t] for t in r.get("rejected_response", [])),
                    ),
                }
            )
        return feats
    # Reranker: one prompt per (query, document); the positive first, its label (default 1), negatives 0.
    docs = [[r["response"], *r.get("rejected_response", [])] for r in rows]
    queries = [r["query"] for r, ds in zip(rows, docs, strict=True) for _ in ds]
    flat = [t for ds in docs for t in ds]
    prompts = []
    for i in range(0, len(flat), 4096):
        enc = model.tokenize(queries[i : i + 4096], flat[i : i + 4096], padding=False)["input_ids"]
        prompts += [np.asarray(e, dtype=np.int32) for e in enc]
    start = 0
    for i, (r, ds) in enumerate(zip(rows, docs, strict=True)):
        pairs = prompts[start : start + len(ds)]
        start += len(ds)
        targets = [float(r.get("label", 1.0))] + [0.0] * (len(ds) - 1)
        feats.append({"idx": i, "pairs": pairs, "targets": targets, "length": max(len(p) for p in pairs)})
    return feats


def metric_eval_data(path: str, task_type: str) -> EvalData | None:
    """evaluate's view of the eval file (shape, unique texts, candidate lists), or None when evaluate cannot
    measure this model on it; then training reports the eval loss only, and says why."""
    try:
        data = read_eval_data(path)
    except EmbedtuneError as e:  # the rows passed train's checks: this is the shape (e.g. constant labels)
        say(f"eval metrics off: {e}")
        return None
    if task_type == "reranker" and data.shape != "ranking":
        say(
            f"eval metrics off: a reranker is measured on ranking rows (with rejected_response), not {data.shape}"
        )
        return None
    say(
        f"eval metrics: {data.shape} ({', '.join(METRIC_NAMES[data.shape])}) on {len(data.queries)} queries, "
        f"{len(data.docs)} documents"
    )
    return data


def pad(seqs: list[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(T,) ragged id arrays -> (T, L) ids and mask, L = the longest of *this* batch (right padding)."""
    longest = max(len(s) for s in seqs)
    ids = np.full((len(seqs), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), longest), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


@dataclasses.dataclass
class Collator:
    """Features of B rows -> one padded tensor batch holding every text of the batch (one forward pass)."""

    loss_type: str
    pad_id: int
    hard_negatives: int | None = None
    seed: int = 42

    def __call__(self, feats: list[dict]) -> dict:
        if self.loss_type == "infonce":
            # Resampling (hard_negatives > row's count) is seeded by the batch's rows: the same batch draws
            # the same negatives, also after a resume.
            rng = random.Random(f"{self.seed}:{[f['idx'] for f in feats]}")
            rows = [list(zip(f["negatives"], f["text_keys"][2:], strict=True)) for f in feats]
            negs, neg_mask = pad_negatives(rows, self.hard_negatives or None, rng)
            real = [t for row in negs for t in row if t is not None]  # row-major, as pack_negatives expects
            texts = [f["query"] for f in feats] + [f["response"] for f in feats] + [ids for ids, _ in real]
            ids, mask = pad(texts, self.pad_id)
            # per document (B positives, K negatives): its text key, and its row's query key if a positive
            doc_keys = [(f["text_keys"][1], f["text_keys"][0]) for f in feats] + [(k, -1) for _, k in real]
            return {
                "input_ids": ids,  # texts: B + B + K
                "attention_mask": mask,
                "neg_mask": neg_mask,
                "doc_keys": torch.tensor(doc_keys, dtype=torch.long).reshape(-1, 2),
            }
        if self.loss_type in RERANKER_LOSSES:
            ids, mask = pad([p for f in feats for p in f["pairs"]], self.pad_id)  # texts: sum of group sizes
            batch = {"input_ids": ids, "attention_mask": mask}
            if self.loss_type == "pointwise_reranker":
                batch["targets"] = torch.tensor([t for f in feats for t in f["targets"]], dtype=torch.float32)
            else:
                batch["group_sizes"] = torch.tensor([len(f["pairs"]) for f in feats], dtype=torch.long)
            return batch
        # pair losses: B queries then B responses, a float label per pair
        ids, mask = pad([f["query"] for f in feats] + [f["response"] for f in feats], self.pad_id)
        targets = torch.tensor([f["label"] for f in feats], dtype=torch.float32)
        return {"input_ids": ids, "attention_mask": mask, "targets": targets}


class LengthGroupedSampler(torch.utils.data.Sampler):
    """Random order, but each batch holds rows of similar length, so padding to the batch's longest is cheap.

    Indices are shuffled, cut into mega-batches of 50 batches, each sorted by length and cut into batches; the
    batches are then shuffled (short batches stay last, so every full batch stays aligned). The order depends
    only on (seed, epoch): every rank computes the same one (accelerate shards it by batch), and a resumed run
    replays it exactly.

    `keys` (per row, the keys of its texts) makes batches duplicate-free, like sentence-transformers'
    `no_duplicates` sampler: a row sharing a text with the batch being filled waits for a later batch. For
    infonce this matters more with length grouping than without it: identical texts have identical lengths, so
    sorting puts them side by side, and the copy becomes an in-batch "negative" of its own positive.
    """

    def __init__(
        self,
        lengths: list[int],
        batch_size: int,
        seed: int,
        mega: int = 50,
        keys: list[tuple[int, ...]] | None = None,
        group: bool = True,
    ):
        self.lengths, self.batch_size, self.seed, self.mega, self.epoch = lengths, batch_size, seed, mega, 0
        self.keys, self.group = keys, group

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def _cut(self, rows: list[int]) -> tuple[list[list[int]], list[int]]:
        """Full batches from length-sorted rows, and the rows left over (fewer than a batch, or clashing)."""
        if self.keys is None:
            n = len(rows) - len(rows) % self.batch_size
            return [rows[j : j + self.batch_size] for j in range(0, n, self.batch_size)], rows[n:]
        batches = []
        while len(rows) >= self.batch_size:
            batch, seen, rest = [], set(), []
            for i in rows:  # greedy in length order: the batch stays length-grouped
                if len(batch) < self.batch_size and seen.isdisjoint(self.keys[i]):
                    batch.append(i)
                    seen.update(self.keys[i])
                else:
                    rest.append(i)
            if len(batch) < self.batch_size:  # only clashing rows are left
                return batches, rows
            batches.append(batch)
            rows = rest
        return batches, rows

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        size = self.batch_size * self.mega
        batches, left = [], []
        for i in range(0, len(order), size):
            chunk = left + order[i : i + size]
            if self.group:
                chunk.sort(key=self.lengths.__getitem__, reverse=True)
            full, left = self._cut(chunk)
            batches += full
        shuffled = [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]
        return iter([i for b in shuffled for i in b] + left)


# -------------------------------------------------------------------------------------------------- model
def build_model(cfg: TrainConfig) -> Embedder | Reranker:
    """Embedder or Reranker from `cfg.model`; with `train_type=lora`, a PEFT LoRA on its backbone."""
    if cfg.task_type == "embedding":
        model = Embedder.from_pretrained(
            cfg.model,
            pooling=cfg.pooling,
            query_instruction=cfg.query_instruction or None,  # empty: the model's own query prompt, if any
            max_length=cfg.max_length,
            trust_remote_code=cfg.trust_remote_code,
        )
    else:
        model = Reranker.from_pretrained(
            cfg.model,
            instruction=cfg.reranker_instruction,
            max_length=cfg.max_length,
            positive_token=cfg.positive_token,
            negative_token=cfg.negative_token,
            trust_remote_code=cfg.trust_remote_code,
        )
    if cfg.train_type == "lora":
        from peft import LoraConfig, get_peft_model

        targets = (
            cfg.lora_target
            if cfg.lora_target == "all-linear"
            else [t.strip() for t in cfg.lora_target.split(",")]
        )
        lora = LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=targets,
            task_type="FEATURE_EXTRACTION" if cfg.task_type == "embedding" else "CAUSAL_LM",
        )
        if cfg.task_type == "embedding":
            model.backbone = get_peft_model(model.backbone, lora)
        else:
            model.lm = get_peft_model(model.lm, lora)
    n_train = sum(
        p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters() if p.requires_grad
    )
    say(f"{cfg.task_type} {cfg.train_type}: {n_train:,} trainable parameters")
    return model.train()


class TrainModel(nn.Module):
    """What the Trainer trains: encodes a collated batch in one forward pass and returns `{"loss": ...}`.

    The loss is picked by name from `LOSSES`; only the split of the encoded batch differs per loss.
    """

    accepts_loss_kwargs = False  # our loss is a per-batch mean: the Trainer divides it by accumulation steps

    def __init__(self, model: Embedder | Reranker, cfg: TrainConfig):
        super().__init__()
        self.model = model
        self.config = (
            model.backbone if isinstance(model, Embedder) else model.lm
        ).config  # DeepSpeed 'auto' sizes
        self.loss_type = cfg.loss_type
        self.loss_kwargs = {
            "infonce": {
                "temperature": cfg.infonce_temperature,
                "use_batch": cfg.infonce_use_batch,
                "mask_fake_negative": cfg.infonce_mask_fake_negative,
            },
            "contrastive": {"margin": cfg.margin},
            "online_contrastive": {"margin": cfg.margin},
            "listwise_reranker": {
                "temperature": cfg.listwise_temperature,
                "min_group_size": cfg.listwise_min_group_size,
            },
        }.get(cfg.loss_type, {})

    def forward(
        self,
        input_ids,
        attention_mask,
        neg_mask=None,
        targets=None,
        group_sizes=None,
        doc_keys=None,
        return_loss=True,
    ):
        out = self.model(input_ids, attention_mask)  # embedder: (T, H) unit vectors; reranker: (T,) z
        loss_fn = LOSSES[self.loss_type]
        if self.loss_type == "infonce":
            b = neg_mask.shape[0]  # rows: out = [B queries, B positives, K real negatives]
            world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
            rank = dist.get_rank() if world > 1 else 0
            neg = pack_negatives(out[2 * b :], neg_mask)  # (B, N, H), zeros where neg_mask is False
            loss = loss_fn(
                out[:b],
                out[b : 2 * b],
                neg,
                neg_mask,
                world_size=world,
                rank=rank,
                doc_keys=doc_keys,
                **self.loss_kwargs,
            )
        elif self.loss_type == "pointwise_reranker":
            loss = loss_fn(out, targets)
        elif self.loss_type == "listwise_reranker":
            loss = loss_fn(out, group_sizes, **self.loss_kwargs)
        else:  # pair losses: out = [B queries, B responses]
            b = targets.shape[0]
            loss = loss_fn(out[:b], out[b:], targets, **self.loss_kwargs)
        return {"loss": loss}

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **kwargs):
        """Called by the Trainer for `--gradient-checkpointing`: recompute the backbone's layers in backward."""
        backbone = self.model.backbone if isinstance(self.model, Embedder) else self.model.lm
        backbone.config.use_cache = False
        backbone.activation_checkpointing_enable(
            activation_checkpointing_kwargs=activation_checkpointing_kwargs or {"use_reentrant": False},
            **kwargs,
        )


def gather_over_ranks(compute, n: int) -> np.ndarray:
    """`evaluate.measure`'s `shard` under torchrun: rank r computes items r, r + W, r + 2W, ... and every rank
    gets all n outputs back, in order.

    Every rank computes the same number of items, ceil(n / W), its share padded with item 0: each then runs the
    same number of forward passes, which ZeRO-3 needs (every forward gathers the parameters collectively; a
    rank with one batch more would wait forever). `compute(idx)` returns a (len(idx), ...) array.
    """
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world == 1:
        return compute(np.arange(n))
    rank_, per = dist.get_rank(), -(-n // world)
    mine = np.arange(rank_, n, world)
    idx = np.concatenate([mine, np.zeros(per - len(mine), dtype=mine.dtype)])
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    mine_out = np.ascontiguousarray(compute(idx))  # (per, ...): embeddings (per, H) or reranker logits (per,)
    local = torch.from_numpy(mine_out).to(device)
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local)
    out = np.empty((n, *mine_out.shape[1:]), dtype=mine_out.dtype)
    for r, part in enumerate(parts):
        rows = np.arange(r, n, world)
        out[rows] = part[: len(rows)].cpu().numpy()
    return out


class EmbedtuneTrainer(Trainer):
    """The HF Trainer with length-grouped training batches (see `LengthGroupedSampler`), whose evaluations
    also report evaluate's metrics on `metric_data` (set after construction; None: the eval loss only)."""

    metric_data: EvalData | None = None
    distinct_texts: bool = False
    group_by_length: bool = True

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        output = super().evaluation_loop(
            dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
        )
        if self.metric_data is not None:
            # The Embedder / Reranker inside TrainModel, called directly: under ZeRO-3 its modules' own hooks
            # gather the parameters, so the live (sharded) weights are measured without copying them.
            model = self.model.model
            was_training = model.training
            model.eval()
            t0 = time.perf_counter()
            metrics, _, _ = measure(
                model,
                self.metric_data,
                self.args.per_device_eval_batch_size,
                show_progress=False,
                shard=gather_over_ranks,
            )
            model.train(was_training)
            output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in metrics.items()})
            output.metrics[f"{metric_key_prefix}_metrics_seconds"] = round(time.perf_counter() - t0, 3)
        return output

    def get_eval_dataloader(self, eval_dataset=None):
        # dataloader_drop_last is for training ranks only: a small eval set must not lose its last batch
        # (accelerate already gives every rank the same number of eval batches).
        drop, self.args.dataloader_drop_last = self.args.dataloader_drop_last, False
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.args.dataloader_drop_last = drop

    def _get_train_sampler(self, train_dataset=None):
        data = train_dataset if train_dataset is not None else self.train_dataset
        # infonce scores every document of the batch: keep copies of a text out of the same batch.
        keys = [f["text_keys"] for f in data] if self.distinct_texts else None
        # Batches are cut at the size of one optimizer micro-step over all ranks: accelerate hands rank r
        # the r-th per-device slice of each, so texts are distinct across the whole gathered batch.
        return LengthGroupedSampler(
            [f["length"] for f in data],
            self.args.per_device_train_batch_size * self.args.world_size,
            self.args.seed,
            keys=keys,
            group=self.group_by_length,
        )


class StepLog(TrainerCallback):
    """The progress bar, and one line per logging step on rank 0: step, loss, lr, samples/s."""

    def __init__(self, global_batch: int, primary: str | None = None):
        self.global_batch = global_batch
        self.primary = primary  # evaluate's primary metric for the eval data's shape, logged as eval_<name>
        self.bar = None
        self.t, self.step = time.perf_counter(), 0

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=state.max_steps, initial=state.global_step, desc="train", dynamic_ncols=True
            )
        self.t, self.step = time.perf_counter(), state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs:
            return
        if "loss" in logs:
            now = time.perf_counter()
            rate = (state.global_step - self.step) * self.global_batch / max(now - self.t, 1e-9)
            self.t, self.step = now, state.global_step
            self.bar.write(
                f"step {state.global_step}/{state.max_steps} | loss {logs['loss']:.4f} | "
                f"lr {logs.get('learning_rate', 0.0):.2e} | {rate:.1f} samples/s | epoch {state.epoch:.2f}",
                file=sys.stderr,
            )
        elif "eval_loss" in logs:
            metric = f"eval_{self.primary}"
            self.bar.write(
                f"step {state.global_step}/{state.max_steps} | eval_loss {logs['eval_loss']:.4f}"
                + (f" | {metric} {logs[metric]:.4f}" if metric in logs else ""),
                file=sys.stderr,
            )

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def training_arguments(cfg: TrainConfig, world: int, has_eval: bool, fresh: bool) -> TrainingArguments:
    """HF TrainingArguments from our knobs (same names), plus what embedtune always does.

    With eval data, a fresh run is evaluated once before the first step too (the baseline eval loss).
    """
    cuda = torch.cuda.is_available()
    deepspeed = None
    if cfg.deepspeed != "none":
        deepspeed = str(resources.files("embedtune") / "deepspeed" / f"{cfg.deepspeed}.json")
    eval_every = cfg.eval_steps > 0 and has_eval
    return TrainingArguments(
        output_dir=cfg.checkpoint_dir or cfg.output_dir,  # the Trainer writes only checkpoint-N folders there
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps in transformers 5
        lr_scheduler_type=cfg.lr_scheduler_type,
        seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if eval_every else "no",
        eval_on_start=has_eval and fresh,
        eval_steps=cfg.eval_steps if eval_every else None,
        save_strategy="steps" if cfg.save_steps > 0 else "no",
        save_steps=max(cfg.save_steps, 1),
        save_total_limit=cfg.save_total_limit,
        activation_checkpointing=cfg.gradient_checkpointing,
        dataloader_num_workers=cfg.dataloader_num_workers,
        dataloader_drop_last=world > 1,  # equal batches on every rank (ranks wait for each other)
        remove_unused_columns=False,
        prediction_loss_only=True,
        report_to="none",
        bf16=cuda and torch.cuda.is_bf16_supported(),
        use_cpu=not cuda,  # on CPU, also what makes accelerate set up gloo for DeepSpeed's processes
        ddp_backend="gloo" if world > 1 and not cuda else None,
        deepspeed=deepspeed,
        disable_tqdm=True,  # StepLog draws the bar
    )


# -------------------------------------------------------------------------------------------------- folders
def base_model_id(model: str) -> str:
    """A local base model as an absolute path (adapters name their base), a hub id as given."""
    return str(Path(model).resolve()) if Path(model).exists() else model


def checkpoints(out: Path) -> list[Path]:
    """`checkpoint-N` folders of `out`, by step."""
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out: Path) -> Path | None:
    """The newest *complete* checkpoint: the Trainer writes trainer_state.json last, so a checkpoint cut
    short by a preemption is skipped."""
    complete = [p for p in checkpoints(out) if (p / "trainer_state.json").is_file()]
    return complete[-1] if complete else None


def finished_result(out: Path, cfg: TrainConfig) -> dict | None:
    """The saved result when `out` holds a finished run of the same knobs; an error when of other knobs."""
    if not (out / RESULT_FILE).is_file():
        return None
    result = read_json(out / RESULT_FILE)
    before, now = result.get("config", {}), dataclasses.asdict(cfg)
    changed = [k for k in now if k not in BOOKKEEPING_KNOBS and before.get(k) != now[k]]
    if changed:
        diff = ", ".join(f"{k}: {before.get(k)!r} -> {now[k]!r}" for k in changed)
        raise EmbedtuneError(f"{out}: holds a finished run with other knobs ({diff}); use a new output_dir")
    say(f"{out} already holds this finished run (step {result.get('global_step')}); nothing to do")
    return result


def check_saved_weights(out: Path, model: Embedder | Reranker, train_type: str) -> None:
    """Fail loudly if the saved weights are not whole (e.g. ZeRO-3 shards saved without gathering)."""
    from safetensors import safe_open

    files = sorted(out.glob("adapter_model.safetensors" if train_type == "lora" else "model*.safetensors"))
    if not files:
        raise EmbedtuneError(f"{out}: no safetensors weights were written")
    saved = {}
    for f in files:
        with safe_open(f, "pt") as st:
            saved.update({k: tuple(st.get_slice(k).get_shape()) for k in st.keys()})  # noqa: SIM118
    backbone = model.backbone if isinstance(model, Embedder) else model.lm

    def shape(p):
        return tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3 keeps the full shape in ds_shape

    if train_type == "lora":
        expected = {
            n.replace(".default", ""): shape(p) for n, p in backbone.named_parameters() if "lora_" in n
        }
        if not expected or saved != expected:
            missing = sorted(set(expected) - set(saved))[:3]
            wrong = sorted(k for k in set(saved) & set(expected) if saved[k] != expected[k])[:3]
            raise EmbedtuneError(
                f"{out}: saved adapter is not whole (missing {missing}, wrong shapes {wrong})"
            )
        return
    unique = {id(p): math.prod(shape(p)) for p in backbone.parameters()}
    empty = [k for k, s in saved.items() if math.prod(s) == 0]
    if empty or sum(math.prod(s) for s in saved.values()) < sum(unique.values()):
        raise EmbedtuneError(f"{out}: saved weights are not whole (empty tensors: {empty[:3]})")
