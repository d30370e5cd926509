"""The Hugging Face Trainer, fitted to embedding and reranker losses.

- `TrainModel`: the module the Trainer trains. Its `forward(**batch)` encodes every text of a collated batch
  (see `embedtune.batching`) in one pass and returns `{"loss": LOSSES[loss_type](...)}`.
- `EmbedtuneTrainer`: length-grouped (and, for infonce, duplicate-free) training batches; every evaluation
  also reports evaluate's own metrics for the eval file's shape, sharded across ranks (`gather_over_ranks`).
- `StepLog`: the progress bar and one line per logging step (step, loss, lr, samples/s).
- `training_arguments(cfg, ...)`: `TrainingArguments` from the train knobs (same names), plus what embedtune
  always does (bf16 on GPUs that have it, gloo on CPU, DeepSpeed configs shipped in the package).
"""

from __future__ import annotations

import sys
import time
from importlib import resources

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from embedtune.batching import LengthGroupedSampler
from embedtune.config import TrainConfig
from embedtune.evaldata import EvalData
from embedtune.losses import LOSSES, matryoshka_loss, matryoshka_spec, pack_negatives
from embedtune.modeling import Embedder, Reranker
from embedtune.scoring import measure


class TrainModel(nn.Module):
    """What the Trainer trains: encodes a collated batch in one forward pass and returns `{"loss": ...}`.

    The loss is picked by name from `LOSSES`; only the split of the encoded batch differs per loss
    (`loss_from_outputs`). With `matryoshka_dims`, `losses.matryoshka_loss` wraps it: the same loss on each
    truncated, re-normalized width of the one forward pass's embeddings, weighted mean.
    """

    accepts_loss_kwargs = False  # our loss is a per-batch mean: the Trainer divides it by accumulation steps

    def __init__(self, model: Embedder | Reranker, cfg: TrainConfig):
        super().__init__()
        self.model = model
        self.config = model.inner.config  # DeepSpeed's 'auto' sizes read the hidden size from here
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
        self.matryoshka_dims, self.matryoshka_weights = matryoshka_spec(
            cfg.matryoshka_dims, cfg.matryoshka_weights
        )

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
        batch = {"neg_mask": neg_mask, "targets": targets, "group_sizes": group_sizes, "doc_keys": doc_keys}
        if self.matryoshka_dims:  # Matryoshka: the loss at each truncated width, from this one forward pass
            loss = matryoshka_loss(
                lambda o: self.loss_from_outputs(o, **batch),
                out,
                self.matryoshka_dims,
                self.matryoshka_weights,
            )
        else:
            loss = self.loss_from_outputs(out, **batch)
        return {"loss": loss}

    def loss_from_outputs(self, out, neg_mask=None, targets=None, group_sizes=None, doc_keys=None):
        """The loss of one batch from its encoded texts `out` (embeddings (T, H) or reranker scores (T,))."""
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
        return loss

    def inner_weights(self, state: dict) -> dict:
        """The inner HF model's tensors out of a state dict of this module, keyed as its own
        `save_pretrained` expects (`model.backbone.x` -> `x`)."""
        prefix = f"model.{self.model.INNER}."
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **kwargs):
        """Called by the Trainer for `--gradient-checkpointing`: recompute the backbone's layers in backward."""
        inner = self.model.inner
        inner.config.use_cache = False
        inner.activation_checkpointing_enable(
            activation_checkpointing_kwargs=activation_checkpointing_kwargs or {"use_reentrant": False},
            **kwargs,
        )


def gather_over_ranks(compute, n: int) -> np.ndarray:
    """`scoring.measure`'s `shard` under torchrun: rank r computes items r, r + W, r + 2W, ... and every rank
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
