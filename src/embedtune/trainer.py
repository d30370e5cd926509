"""The Hugging Face Trainer, fitted to embedding and reranker losses.

- `TrainModel`: the module the Trainer trains. Its `forward(**batch)` encodes every text of a collated batch
  (see `embedtune.batching`) in one pass (`encode`) and returns `{"loss": loss_from_outputs(...)}`, the
  loss picked by name from `LOSSES`.
- `EmbedtuneTrainer`: length-grouped (and, for infonce, duplicate-free) training batches; with
  `gradient_cache_chunk_size` a training step runs the gradient cache (`embedtune.gradcache`); every
  evaluation also reports evaluate's own metrics for the eval file's shape, sharded across ranks
  (`gather_over_ranks`).
- `StepLog`: the progress bar and one line per logging step (step, loss, lr, samples/s).
- `training_arguments(cfg, ...)`: `TrainingArguments` from the train knobs (same names), plus what embedtune
  always does (gloo on CPU, DeepSpeed configs shipped in the package); `dtype`, `torch_compile`,
  `length_buckets`, `pad_to_multiple_of` are the speed levers of `embedtune.speed`.
"""

from __future__ import annotations

import contextlib
import sys
import time
from importlib import resources

import numpy as np
import torch
import torch.distributed as dist
from accelerate.utils import DistributedType
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from embedtune.batching import LengthGroupedSampler
from embedtune.config import TrainConfig
from embedtune.evaldata import EvalData
from embedtune.gradcache import cached_backward, encode_without_graph
from embedtune.losses import LOSSES, matryoshka_loss, matryoshka_spec, pack_negatives
from embedtune.modeling import Embedder, Reranker
from embedtune.scoring import measure
from embedtune.speed import (
    MasterWeightAdamW,
    compile_enabled,
    compile_layers,
    encode_in_buckets,
    resolve_buckets,
    train_precision,
)


class TrainModel(nn.Module):
    """What the Trainer trains: `encode` turns every text of a collated batch into outputs, in one forward
    pass; `loss_from_outputs` turns those outputs into the loss, picked by name from `LOSSES` (only the
    split of the outputs differs per loss). `forward(**batch)` is the two in a row, returning `{"loss": ...}`.

    The two halves are separate so the gradient cache can run them apart: outputs chunk by chunk, then the
    loss of the whole batch (`EmbedtuneTrainer.training_step`). With `matryoshka_dims`,
    `losses.matryoshka_loss` wraps the loss inside `loss_from_outputs`: the same loss on each truncated,
    re-normalized width of the one forward pass's embeddings, weighted mean; so it works with and without the
    cache.
    """

    accepts_loss_kwargs = False  # our loss is a per-batch mean: the Trainer divides it by accumulation steps

    def __init__(self, model: Embedder | Reranker, cfg: TrainConfig):
        super().__init__()
        self.model = model
        self.config = model.inner.config  # DeepSpeed's 'auto' sizes read the hidden size from here
        self.loss_type = cfg.loss_type
        self.chunk_size = cfg.gradient_cache_chunk_size
        self.length_buckets, self.pad_to_multiple_of = (
            resolve_buckets(cfg.length_buckets),
            cfg.pad_to_multiple_of,
        )
        if compile_enabled(cfg.torch_compile, cfg.deepspeed):
            compile_layers(model.inner, strict=cfg.torch_compile == "on")  # each layer in place (`speed`)
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

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(T, L) ids + mask of every text of a batch -> (T, H) unit embeddings (embedder) or (T,) z (reranker).

        Without a graph (the eval loss) and with a gradient cache chunk size, chunk by chunk: evaluation
        then needs the memory of one chunk too, for the same outputs. Otherwise in `length_buckets` passes
        over length-sorted groups, each padded to its own longest text (`speed.encode_in_buckets`).
        """
        if self.chunk_size > 0 and not torch.is_grad_enabled():
            return encode_without_graph(self.model, input_ids, attention_mask, self.chunk_size)[0]
        return encode_in_buckets(
            self.model, input_ids, attention_mask, self.length_buckets, self.pad_to_multiple_of
        )

    def loss_from_outputs(
        self, out: torch.Tensor, neg_mask=None, targets=None, group_sizes=None, doc_keys=None
    ) -> torch.Tensor:
        """The loss of a batch from `encode`'s outputs of all its texts (in the collator's order)."""
        batch = {"neg_mask": neg_mask, "targets": targets, "group_sizes": group_sizes, "doc_keys": doc_keys}
        if self.matryoshka_dims:  # Matryoshka: the loss at each truncated width of these outputs
            return matryoshka_loss(
                lambda o: self.loss_at_one_width(o, **batch),
                out,
                self.matryoshka_dims,
                self.matryoshka_weights,
            )
        return self.loss_at_one_width(out, **batch)

    def loss_at_one_width(self, out, neg_mask=None, targets=None, group_sizes=None, doc_keys=None):
        """The plain loss (no Matryoshka) of one batch from its encoded texts `out`."""
        loss_fn = LOSSES[self.loss_type]
        if self.loss_type == "infonce":
            b = neg_mask.shape[0]  # rows: out = [B queries, B positives, K real negatives]
            world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
            rank = dist.get_rank() if world > 1 else 0
            neg = pack_negatives(out[2 * b :], neg_mask)  # (B, N, H), zeros where neg_mask is False
            return loss_fn(
                out[:b],
                out[b : 2 * b],
                neg,
                neg_mask,
                world_size=world,
                rank=rank,
                doc_keys=doc_keys,
                **self.loss_kwargs,
            )
        if self.loss_type == "pointwise_reranker":
            return loss_fn(out, targets)
        if self.loss_type == "listwise_reranker":
            return loss_fn(out, group_sizes, **self.loss_kwargs)
        b = targets.shape[0]  # pair losses: out = [B queries, B responses]
        return loss_fn(out[:b], out[b:], targets, **self.loss_kwargs)

    def forward(
        self,
        input_ids,
        attention_mask,
        neg_mask=None,
        targets=None,
        group_sizes=None,
        doc_keys=None,
        return_loss=True,
        encode_only=False,
    ):
        if encode_only:  # one chunk of the gradient cache, called through the DDP / DeepSpeed wrapper
            return {"outputs": self.model(input_ids, attention_mask)}
        out = self.encode(input_ids, attention_mask)
        return {"loss": self.loss_from_outputs(out, neg_mask, targets, group_sizes, doc_keys)}

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
    master_weights: bool = (
        False  # dtype bf16 without DeepSpeed: AdamW on fp32 copies (`speed.MasterWeightAdamW`)
    )

    def create_optimizer(self, model=None):
        """The Trainer's optimizer (its weight-decay groups, `optim`'s settings); with `master_weights`, the
        same AdamW run on fp32 master weights of the bf16 model."""
        if self.master_weights and self.optimizer is None:
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            if cls is not torch.optim.AdamW:
                raise RuntimeError(f"optim {self.args.optim}: master weights need torch's AdamW")
            self.optimizer_cls_and_kwargs = (MasterWeightAdamW, kwargs)
        return super().create_optimizer(model)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The Trainer's step, or with `gradient_cache_chunk_size` > 0 the gradient cache: the same loss and
        gradients at the activation memory of one chunk (`embedtune.gradcache`).

        `model` is what the Trainer wraps (DDP or the DeepSpeed engine): each chunk goes through it, so ZeRO-3
        gathers parameters and counts micro-steps as for any forward pass. To DeepSpeed the chunks are
        micro-steps of one accumulation window: each chunk's backward is the engine's (gradients reduced
        and accumulated, ZeRO-3 reduce-scatters included), and only the last chunk of the Trainer's last
        micro-batch is the accumulation boundary, followed by the one optimizer step (what accelerate's
        `backward` does for an uncached step). Under DDP, every chunk but the last runs in `no_sync`.
        """
        train_model = self.accelerator.unwrap_model(model)
        if train_model.chunk_size <= 0:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        if callable(getattr(self.optimizer, "train", None)):  # schedule-free optimizers, as the Trainer does
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
        inputs.pop("return_loss", None)
        acc = self.accelerator
        deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
        # TrainModel.accepts_loss_kwargs is False: like the uncached step, the loss is divided by the
        # number of micro-batches of this optimizer step.
        micro_batches = self.current_gradient_accumulation_steps

        def encode(input_ids, attention_mask):
            with self.compute_loss_context_manager():
                return model(input_ids=input_ids, attention_mask=attention_mask, encode_only=True)["outputs"]

        def backward(surrogate, last):
            if deepspeed:
                acc.deepspeed_engine_wrapped.backward(
                    surrogate, sync_gradients=acc.sync_gradients and last, scale_wrt_gas=False
                )
            else:
                acc.backward(surrogate)

        return cached_backward(
            encode,
            lambda out: train_model.loss_from_outputs(out, **inputs) / micro_batches,
            ids,
            mask,
            train_model.chunk_size,
            backward,
            no_sync=contextlib.nullcontext if deepspeed else (lambda: acc.no_sync(model)),
        )

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
    """The progress bar, and one line per logging step on rank 0: step, loss, lr, samples/s.

    It also keeps the wall time of every optimizer step (`step_seconds`, end to end, so compilation and
    evaluation show up where they happen): the first step's time and the median of the others say what a
    compiled model costs up front and what it runs at (`timing()`).
    """

    def __init__(self, global_batch: int, primary: str | None = None):
        self.global_batch = global_batch
        self.primary = primary  # evaluate's primary metric for the eval data's shape, logged as eval_<name>
        self.bar = None
        self.t, self.step = time.perf_counter(), 0
        self.step_seconds: list[float] = []
        self.last = time.perf_counter()

    def timing(self) -> dict:
        """`first_step_seconds` and `median_step_seconds` (the steady state: every step after the first)."""
        steps = self.step_seconds
        rest = sorted(steps[1:])
        return {
            "first_step_seconds": round(steps[0], 4) if steps else None,
            "median_step_seconds": round(rest[len(rest) // 2], 4) if rest else None,
        }

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=state.max_steps, initial=state.global_step, desc="train", dynamic_ncols=True
            )
        self.t, self.step = time.perf_counter(), state.global_step
        self.last = self.t

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.step_seconds.append(now - self.last)
        self.last = now
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
            self.last = time.perf_counter()  # an evaluation is not part of the next step's time
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
    precision = train_precision(cfg.dtype, cfg.deepspeed, cuda)  # bf16: autocast, or DeepSpeed's bf16 mode
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
        bf16=precision["trainer_bf16"],
        optim=cfg.optim,
        use_cpu=not cuda,  # on CPU, also what makes accelerate set up gloo for DeepSpeed's processes
        ddp_backend="gloo" if world > 1 and not cuda else None,
        deepspeed=deepspeed,
        disable_tqdm=True,  # StepLog draws the bar
    )
