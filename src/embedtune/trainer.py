"""The Hugging Face Trainer, fitted to embedding and reranker losses.

- `TrainModel`: the module the Trainer trains. Its `forward(features, **extras)` encodes every text of a
  collated batch (see `embedtune.batching`) in one pass (`encode`) and returns `{"loss": ...}`: the
  objective's loss function (`embedtune.objectives`) on those outputs, handed over by its layout.
- `EmbedtuneTrainer`: length-grouped (and, where the objective says so, duplicate-free) training batches;
  with a gradient cache chunk size a training step runs the gradient cache (`embedtune.gradcache`); every
  evaluation also reports evaluate's own metrics for the eval file's shape, sharded across ranks
  (`distributed.gather_over_ranks`).
- `StepLog`: the progress bar and one line per logging step (step, loss, lr, samples/s).
- `training_arguments(cfg, ...)`: `TrainingArguments` from the train knobs (same names), plus what embedtune
  always does (gloo on CPU, DeepSpeed configs shipped in the package).

Everything here takes plain, already resolved values (the train step resolves the config once: the
objective and its knobs, the `speed.Precision`, the bucket count); only `training_arguments` reads the
config, whose knobs are the Trainer's own.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from importlib import resources
from pathlib import Path

import torch
from accelerate.utils import DistributedType
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from embedtune.batching import LAYOUTS, LengthGroupedSampler
from embedtune.config import TrainConfig
from embedtune.distributed import gather_over_ranks
from embedtune.errors import EmbedtuneError
from embedtune.evaldata import EvalData
from embedtune.features import Features
from embedtune.gradcache import cached_backward, encode_without_graph
from embedtune.losses import matryoshka_loss
from embedtune.modeling import Embedder, Reranker
from embedtune.objectives import Objective
from embedtune.scoring import measure
from embedtune.speed import MasterWeightAdamW, Precision, encode_in_buckets


class TrainModel(nn.Module):
    """What the Trainer trains: `encode` turns every text of a collated batch into outputs, in one forward
    pass; `loss_from_outputs` turns those outputs into the loss: the objective's function, fed by its layout
    (`batching.LAYOUTS`) with the batch's extra tensors and the loss's knobs. `forward(features, **extras)`
    is the two in a row, returning `{"loss": ...}`.

    The two halves are separate so the gradient cache can run them apart: outputs chunk by chunk, then the
    loss of the whole batch (`EmbedtuneTrainer.training_step`). With `matryoshka` widths,
    `losses.matryoshka_loss` wraps the loss inside `loss_from_outputs`: the same loss on each truncated,
    re-normalized width of the one forward pass's embeddings, weighted mean; so it works with and without the
    cache.
    """

    accepts_loss_kwargs = False  # our loss is a per-batch mean: the Trainer divides it by accumulation steps

    def __init__(
        self,
        model: Embedder | Reranker,
        objective: Objective,
        loss_knobs: dict,
        chunk_size: int = 0,
        chunk_tokens: int = 0,
        length_buckets: int = 1,
        pad_to_multiple_of: int = 0,
        matryoshka: tuple[list[int], list[float]] = ([], []),
    ):
        super().__init__()
        self.model = model
        self.config = model.inner.config  # DeepSpeed's 'auto' sizes read the hidden size from here
        self.objective, self.loss_knobs = objective, loss_knobs
        self.loss_fn, self.layout = objective.function, LAYOUTS[objective.layout]
        self.chunk_size = chunk_size  # > 0: the gradient cache's texts per forward pass
        self.chunk_tokens = chunk_tokens  # > 0: the gradient cache's padded tokens per forward pass
        self.length_buckets, self.pad_to_multiple_of = length_buckets, pad_to_multiple_of
        self.matryoshka_dims, self.matryoshka_weights = matryoshka

    def encode(self, features: Features) -> torch.Tensor:
        """Every text of a batch -> (T, H) unit embeddings (embedder) or (T,) z (reranker).

        Without a graph (the eval loss) and with a gradient cache chunk size, chunk by chunk: evaluation
        then needs the memory of one chunk too, for the same outputs. Otherwise in `length_buckets` passes
        over length-sorted groups, each padded to its own longest text (`speed.encode_in_buckets`).
        """
        if self.cached and not torch.is_grad_enabled():
            return encode_without_graph(self.model, features, self.chunk_size, self.chunk_tokens)[0]
        return encode_in_buckets(self.model, features, self.length_buckets, self.pad_to_multiple_of)

    @property
    def cached(self) -> bool:
        """A step runs the gradient cache (a chunk size in texts or in tokens is set)."""
        return self.chunk_size > 0 or self.chunk_tokens > 0

    def loss_from_outputs(self, out: torch.Tensor, **extras) -> torch.Tensor:
        """The loss of a batch from `encode`'s outputs of all its texts (in the collator's order) and the
        batch's extra tensors (`neg_mask`, `targets`, ...: what the layout collated)."""
        if self.matryoshka_dims:  # Matryoshka: the loss at each truncated width of these outputs
            return matryoshka_loss(
                lambda o: self.loss_at_one_width(o, **extras),
                out,
                self.matryoshka_dims,
                self.matryoshka_weights,
            )
        return self.loss_at_one_width(out, **extras)

    def loss_at_one_width(self, out: torch.Tensor, **extras) -> torch.Tensor:
        """The plain loss (no Matryoshka) of one batch from its encoded texts `out`."""
        return self.layout.loss(self.loss_fn, out, **extras, **self.loss_knobs)

    def forward(self, features: Features, return_loss=True, encode_only=False, **extras):
        if encode_only:  # one chunk of the gradient cache, called through the DDP / DeepSpeed wrapper
            return {"outputs": self.model(features)}
        return {"loss": self.loss_from_outputs(self.encode(features), **extras)}

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


class EmbedtuneTrainer(Trainer):
    """The HF Trainer with length-grouped training batches (see `LengthGroupedSampler`), whose evaluations
    also report evaluate's metrics on `metric_data` (None: the eval loss only).

    `distinct_texts`: training batches hold no text twice (the objective's in-batch negatives);
    `group_by_length`: batches of similar lengths; `batch_sampling`: one source per batch or not
    (`embedtune.sources`); `master_weights`: AdamW on fp32 copies of a bf16 model
    (`speed.MasterWeightAdamW`, dtype bf16 without DeepSpeed). The other arguments are the Trainer's.
    """

    def __init__(
        self,
        *args,
        metric_data: EvalData | None = None,
        distinct_texts: bool = False,
        group_by_length: bool = True,
        master_weights: bool = False,
        batch_sampling: str = "mixed",
        **kwargs,
    ):
        self.metric_data, self.distinct_texts, self.batch_sampling = (
            metric_data,
            distinct_texts,
            batch_sampling,
        )
        self.group_by_length, self.master_weights = group_by_length, master_weights
        super().__init__(*args, **kwargs)

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
        if not train_model.cached:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        if callable(getattr(self.optimizer, "train", None)):  # schedule-free optimizers, as the Trainer does
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        features = inputs.pop("features")
        inputs.pop("return_loss", None)
        acc = self.accelerator
        deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
        # TrainModel.accepts_loss_kwargs is False: like the uncached step, the loss is divided by the
        # number of micro-batches of this optimizer step.
        micro_batches = self.current_gradient_accumulation_steps

        def encode(chunk: Features):
            with self.compute_loss_context_manager():
                return model(features=chunk, encode_only=True)["outputs"]

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
            features,
            train_model.chunk_size,
            backward,
            no_sync=contextlib.nullcontext if deepspeed else (lambda: acc.no_sync(model)),
            chunk_tokens=train_model.chunk_tokens,
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
            sources=[f["source"] for f in data],
            sampling=self.batch_sampling,  # round_robin / proportional: one source per global batch
        )

    def _save_checkpoint(self, model, trial):
        """The Trainer's checkpoint save; a failure (a full disk: torch.save raises RuntimeError, safetensors
        its own error) is one line, and the checkpoint cut short is removed (it would never be resumed from:
        `rundir.latest_checkpoint` skips it) so that the earlier ones are what is left."""
        try:
            return super()._save_checkpoint(model, trial)
        except Exception as e:
            step = self.state.global_step
            if self.args.should_save:
                shutil.rmtree(Path(self.args.output_dir) / f"checkpoint-{step}", ignore_errors=True)
            text = " ".join(str(e).split())[:300]
            raise EmbedtuneError(f"checkpoint_dir: {self.args.output_dir}: cannot write checkpoint-{step}: "
                                 f"{type(e).__name__}: {text}; the earlier checkpoints are whole: free space "
                                 "and rerun to resume") from None  # fmt: skip


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


def training_arguments(
    cfg: TrainConfig, world: int, has_eval: bool, fresh: bool, precision: Precision
) -> TrainingArguments:
    """HF TrainingArguments from our knobs (same names), plus what embedtune always does.

    With eval data, a fresh run is evaluated once before the first step too (the baseline eval loss).
    `precision.trainer_bf16`: the Trainer's autocast, or DeepSpeed's bf16 mode.
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
        bf16=precision.trainer_bf16,
        optim=cfg.optim,
        use_cpu=not cuda,  # on CPU, also what makes accelerate set up gloo for DeepSpeed's processes
        ddp_backend="gloo" if world > 1 and not cuda else None,
        deepspeed=deepspeed,
        disable_tqdm=True,  # StepLog draws the bar
    )
