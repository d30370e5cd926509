"""train: fine-tune an embedder or a reranker with the Hugging Face Trainer, full or LoRA, DeepSpeed or not.

Read top to bottom, like nanoGPT: `run(cfg)` is the whole step.

1. Resolve the ms-swift env-var knobs (INFONCE_TEMPERATURE, ...; explicit flags win) and log them.
2. Load the rows and check them for the loss (bad labels, missing negatives) *before* any model is loaded.
3. `--nodes N` outside a multi-node job: submit this same command as a Kubeflow Trainer TrainJob of N pods
   (`embedtune.trainjob`), wait for it and return its result. `--nproc N` (or DeepSpeed), or a node of a
   multi-node job (torchrun's `PET_*` variables set, as the Trainer's torch runtime sets them), outside
   torchrun: relaunch this same command under torchrun (`embedtune.launch`) and return the result rank 0
   wrote.
4. Build the model (`Embedder` or `Reranker`, LoRA on its inner model when asked), tokenize every text once
   (`embedtune.batching`).
5. Train with the HF Trainer (`embedtune.trainer`): length-grouped batches padded to their own longest text,
   a wrapper module whose `forward(batch)` returns `{"loss": ...}`, the loss of the `loss_type`'s entry in
   `embedtune.objectives` (with `gradient_cache_chunk_size`: `embedtune.gradcache`), checkpoints every
   `save_steps`, and automatic resume from the latest complete `checkpoint-*` in `checkpoint_dir` (default:
   `output_dir`, see `embedtune.rundir`). Evaluations report the eval loss and evaluate's metrics (below).
6. Gather the full weights (ZeRO-3 shards them), save the model folder (sentence-transformers format for
   embedders; only the adapter for LoRA), check the saved weights are whole, write `train_result.json`,
   delete the checkpoints.

Settings are resolved once, here, into plain values passed down: the objective and its knobs, the precision
(`speed.Precision`), the bucket count, the compile (in `build_model`, with the dtype and LoRA). What each loss
sees in a batch (every text encoded in one forward pass) is tabled in `embedtune.batching`.

The final folder is `output_dir` itself; `checkpoint-*` folders live inside it while training (or inside
`checkpoint_dir` when set) and are deleted after the final model is saved and verified (they hold optimizer
states, several times the model's size). `train_result.json` is written last: its presence marks a finished
run, and re-running the same command on a finished folder returns it without training again. On Kubeflow the
output folder is local to the pod, so a retried or preempted pod would start from zero: `checkpoint_dir` on a
persistent volume is what lets it resume.

Multi-node. A node of a job started with torchrun's `PET_*` variables (Kubeflow Trainer's torch runtime sets
them in every node pod) relaunches itself as that node's torchrun processes of the job (`launch.job_topology`);
global ranks, the data order, infonce's gathered negatives and the eval shards span every node, so N nodes of
P processes train like one node of N x P. Before training, the nodes prove they share `output_dir` (and
`checkpoint_dir`): rank 0 alone writes the model, `train_result.json` and the checkpoints' shared files, every
rank its own ZeRO shards there, and every rank resumes from the same newest checkpoint (`rundir.check_shared`).

Evaluation metrics during training. With `eval_data`, every evaluation (before the first step of a fresh run,
every `eval_steps`, and at the end) logs, next to `eval_loss`, the metrics `embedtune evaluate` computes for
the file's shape, by evaluate's own code on the live model (`evaldata.read_eval_data` + `scoring.measure`),
texts sharded across ranks (`distributed.gather_over_ranks`); a file evaluate cannot measure for this model
keeps the eval loss only, and says why.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from embedtune import sources
from embedtune.batching import Collator, tokenize_rows
from embedtune.config import TrainConfig, resolve_env_defaults
from embedtune.data import check_loss_data, read_rows
from embedtune.distributed import launched
from embedtune.errors import EmbedtuneError
from embedtune.evaldata import METRIC_NAMES, PRIMARY, measurable
from embedtune.images import check_images
from embedtune.io import read_json, write_json
from embedtune.launch import LAUNCHED, inside_torchrun, job_topology, joined, torchrun
from embedtune.lora import add_lora
from embedtune.losses import matryoshka_spec
from embedtune.modelfolder import hf_config, is_decoder, vision_family
from embedtune.modeling import ClassifierReranker, Embedder, Reranker, reranker_head
from embedtune.objectives import (
    TASKS,
    knob_problems,
    log_env_knobs,
    losses_for,
    objective,
    resolve_knobs,
    resolve_task,
)
from embedtune.outputs import refuse_inputs
from embedtune.overlap import train_fingerprint
from embedtune.progress import rank, say
from embedtune.rundir import (
    RESULT_FILE,
    base_model_id,
    check_saved_weights,
    check_shared,
    finished_result,
    keep_checkpoint_weights,
    latest_checkpoint,
    remove_checkpoints,
    resumed_step,
    save_final,
)
from embedtune.speed import (
    Precision,
    apply_liger_kernel,
    check_train_knobs,
    peak_memory_gb,
    regional_compile,
    resolve_buckets,
    resolve_deepspeed,
    resolve_padding_free,
)
from embedtune.trainer import EmbedtuneTrainer, StepLog, TrainModel, training_arguments
from embedtune.trainjob import check_submit, run_on_nodes
from embedtune.vision import freeze_vision, vision_knobs

# DeepSpeed calls torch.distributed functions that warn "deprecated" on every call, every rank.
DEPRECATED_DIST_CALLS = r".*torch\.distributed\.\w+`? is deprecated"


def run(cfg: TrainConfig) -> dict:
    """Train and save; returns the contents of `train_result.json` (global_step, losses, speed, knobs)."""
    # ---------------------------------------------------------------- 1. effective knobs
    warnings.filterwarnings("ignore", DEPRECATED_DIST_CALLS, FutureWarning)
    given, cfg = cfg, resolve_env_defaults(cfg)
    task, head = resolve_task(cfg.task_type, cfg.reranker_head)  # generative_reranker: ms-swift's name
    cfg = dataclasses.replace(cfg, task_type=task, reranker_head=head)
    topology = job_topology()  # this process is a node of a multi-node job (PET_* set), or None
    cfg = joined(cfg, topology)  # a node of a multi-node job: the job's nodes and processes per node
    cfg = dataclasses.replace(cfg, deepspeed=resolve_deepspeed(cfg.deepspeed, cfg.nproc * cfg.nodes))
    precision = check_knobs(cfg)  # the dtype decided once (`speed.Precision`), passed down from here
    if cfg.nodes > 1 and topology is None:
        check_submit(cfg)
    out = Path(cfg.output_dir)
    if not os.environ.get(LAUNCHED):  # a child of our own launch: the parent logged them
        log_env_knobs(given, cfg)

    # ---------------------------------------------------------------- 2. data, checked before any model
    train_rows, skipped = load_rows(cfg.train_data, cfg)
    eval_rows, _ = load_rows(cfg.eval_data, cfg) if cfg.eval_data else ([], 0)
    finished = finished_result(out, cfg)
    if finished is not None:
        return finished

    # ---------------------------------------------------------------- 3. several nodes or processes: relaunch
    if cfg.nodes > 1 and topology is None:
        return run_on_nodes(cfg)  # a TrainJob runs this same command on every node; its result
    if (cfg.nproc > 1 or cfg.deepspeed != "none" or topology) and not inside_torchrun():
        try:
            torchrun("train", cfg, topology.nproc_per_node if topology else cfg.nproc, topology)
        except EmbedtuneError as e:  # a rank that dies at exit (gloo teardown) after the saved, checked model
            if not (out / RESULT_FILE).is_file():  # written last, by this launch (none before: see above)
                raise
            say("train", f"warning: a process failed after the model was saved and checked: {str(e)[:200]}")
        return read_json(out / RESULT_FILE)

    # ---------------------------------------------------------------- 4. model and tokens
    # TrainingArguments first: with ZeRO-3 it makes from_pretrained load the weights already sharded.
    # Under torchrun the processes are what they are: per node, and nodes = world / per node.
    world, per_node = launched()
    cfg = dataclasses.replace(cfg, nproc=per_node, nodes=world // per_node)
    ckpt_dir = Path(cfg.checkpoint_dir or cfg.output_dir)
    resume = latest_checkpoint(ckpt_dir)
    metric_data = measurable(cfg.eval_data, cfg.task_type) if eval_rows else None
    args = training_arguments(cfg, world, has_eval=bool(eval_rows), fresh=resume is None, precision=precision)
    if cfg.deepspeed != "none":
        import deepspeed

        deepspeed.init_distributed(dist_backend=args.ddp_backend)  # adopts the process group accelerate made
    if cfg.nodes > 1:
        _ = args.device  # sets up the process group (accelerate), if DeepSpeed did not
        check_shared(sorted({out, ckpt_dir}), rank(), world)  # before hours of training, not at the save
    model = build_model(cfg, precision)
    t0 = time.perf_counter()
    by_source = sources.instructions(cfg.source_instructions)
    train_set = tokenize_rows(model, train_rows, by_source)
    eval_set = sorted(tokenize_rows(model, eval_rows, by_source), key=lambda f: f["length"])
    tokenize_s = time.perf_counter() - t0
    say(
        "train",
        f"tokenized {len(train_set)} train + {len(eval_set)} eval rows in {tokenize_s:.1f}s "
        f"(longest text {max(f['length'] for f in train_set)} tokens, max_length {cfg.max_length})",
    )

    # ---------------------------------------------------------------- 5. train
    global_batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world
    obj = objective(cfg.loss_type)
    trainer = EmbedtuneTrainer(
        model=train_module(model, cfg),
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set or None,
        data_collator=collator(model, cfg),
        metric_data=metric_data,
        distinct_texts=obj.distinct_batches(resolve_knobs(obj, cfg)),
        group_by_length=cfg.group_by_length,
        batch_sampling=cfg.batch_sampling,
        master_weights=precision.master_weights,
    )
    trainer.pop_callback(ProgressCallback)
    trainer.pop_callback(PrinterCallback)
    step_log = StepLog(global_batch, PRIMARY[metric_data.shape] if metric_data else None)
    trainer.add_callback(step_log)
    if cfg.gradient_cache_chunk_size > 0 or cfg.gradient_cache_chunk_tokens > 0:
        say("train", f"gradient cache: {cfg.gradient_cache_chunk_size or 'any'} texts, "
                     f"{cfg.gradient_cache_chunk_tokens or 'any'} tokens per pass")  # fmt: skip
    say(
        "train", f"resuming from {resume} (step {resumed_step(resume)})" if resume else "starting from step 0"
    )
    train_out = trainer.train(resume_from_checkpoint=str(resume) if resume else None)  # a failed save: 1 line
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
        saved_config = dataclasses.asdict(
            dataclasses.replace(cfg, pooling=getattr(model, "pooling", cfg.pooling))
        )
        meta = {
            "base_model": base_model_id(cfg.model),
            "train_type": cfg.train_type,
            "train_config": saved_config,
            "matryoshka_dims": matryoshka_spec(cfg.matryoshka_dims)[0],  # [] when not trained for it
            "train_fingerprint": train_fingerprint(train_rows),  # evaluate warns on eval texts found in it
        }
        weights = trainer.model.inner_weights(state)
        save_final(  # staged beside `out`, checked whole, then moved in: a full disk leaves no half model
            out,
            lambda tmp: (
                model.save_pretrained(tmp, meta=meta, state_dict=weights),
                check_saved_weights(tmp, model, cfg.train_type),
                keep_checkpoint_weights(ckpt_dir, tmp, cfg.keep_checkpoint_weights, trainer),
            ),
        )
        history = trainer.state.log_history
        names = METRIC_NAMES[metric_data.shape] if metric_data else ()
        result = {
            "output_dir": str(out),
            "global_step": trainer.state.global_step,
            "resumed_from_step": resumed_step(resume),
            "train_loss": train_out.training_loss,
            "eval_loss": eval_metrics.get("eval_loss"),
            "eval_data_shape": metric_data.shape if metric_data else None,
            "eval_metrics": {k: eval_metrics[f"eval_{k}"] for k in names},
            "train_runtime": train_out.metrics.get("train_runtime"),
            "train_samples_per_second": train_out.metrics.get("train_samples_per_second"),
            "tokenize_seconds": round(tokenize_s, 3),
            **step_log.timing(),
            "peak_memory_gb": peak_memory_gb(),
            "world_size": world,
            "nodes": cfg.nodes,
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
        remove_checkpoints(ckpt_dir, out)
        say(
            "train",
            f"saved {cfg.task_type} ({cfg.train_type}) to {out}: step {result['global_step']}, "
            f"loss {result['train_loss']:.4f}",
        )
    trainer.accelerator.wait_for_everyone()
    result = result if result is not None else read_json(out / RESULT_FILE)
    if dist.is_initialized():
        dist.destroy_process_group()  # a clean exit: gloo threads left running abort the process at exit
    return result


# -------------------------------------------------------------------------------------------------- knobs
def check_knobs(cfg: TrainConfig) -> Precision:
    """Reject knob combinations that cannot work, before anything is loaded; returns the resolved precision.
    `cfg`'s env-var knobs must be resolved (`resolve_env_defaults`); each knob's own range was checked when
    cfg was built (knobs.py)."""
    if cfg.loss_type not in losses_for(cfg.task_type):
        raise EmbedtuneError(
            f"loss_type: {cfg.loss_type!r} is not for task_type {cfg.task_type!r}; "
            f"choose one of {', '.join(sorted(losses_for(cfg.task_type)))}"
        )
    if cfg.max_steps <= 0 and cfg.num_train_epochs <= 0:
        raise EmbedtuneError("set num_train_epochs > 0 or max_steps > 0")
    obj = objective(cfg.loss_type)
    if problems := knob_problems(obj, resolve_knobs(obj, cfg)):
        raise EmbedtuneError("; ".join(problems))
    sources.check_knobs(cfg, resolve_knobs(obj, cfg))
    try:
        dims, _ = matryoshka_spec(cfg.matryoshka_dims, cfg.matryoshka_weights)
    except ValueError as e:
        raise EmbedtuneError(str(e)) from None
    if dims and not TASKS[cfg.task_type].embeddings:
        raise EmbedtuneError(
            f"matryoshka_dims: only for task_type embedding (a {cfg.task_type} has no embedding)"
        )
    refuse_inputs({"model": cfg.model, "train_data": cfg.train_data, "eval_data": cfg.eval_data},
                  {"output_dir": cfg.output_dir, "checkpoint_dir": cfg.checkpoint_dir}, distinct=False)  # fmt: skip
    precision = Precision.resolve(cfg.dtype, cfg.deepspeed)  # fp16 and unknown values refused
    check_train_knobs(precision, cfg.optim, cfg.torch_compile, cfg.length_buckets, cfg.pad_to_multiple_of)
    return precision


# -------------------------------------------------------------------------------------------------- data
def load_rows(path: str, cfg: TrainConfig) -> tuple[list[dict], int]:
    """Canonical rows of a JSONL file, each with its `_line`, checked for the loss; and the groups skipped.

    Raises `DataError` naming `FILE:LINE: field: reason` (`data.read_rows`, then `data.check_loss_data`).
    Rows the objective skips (`Objective.keep_row`: listwise_reranker groups [positive, negatives...]
    smaller than `listwise_min_group_size`, which have nothing to rank against) are dropped and counted.
    """
    obj = objective(cfg.loss_type)
    knobs = resolve_knobs(obj, cfg)
    rows = check_images(
        read_rows(path, cfg.loss_type, lines=True), path, cfg.image_root, cfg.max_image_pixels
    )
    check_loss_data(cfg.loss_type, rows, knobs, source=path)
    sources.check_rows(rows, cfg.source_in_batch_negatives, path)
    kept = [r for r in rows if obj.keep_row(r, knobs)]
    if len(kept) < len(rows):
        say("train", f"{path}: {len(rows) - len(kept)} rows skipped: {obj.skip_reason}")
    return kept, len(rows) - len(kept)


# -------------------------------------------------------------------------------------------------- model
def build_model(cfg: TrainConfig, precision: Precision) -> Embedder | Reranker:
    """Embedder or Reranker from `cfg.model`, what it trains as: weights in `precision.load` (bf16 weights:
    `embedtune.speed`), padding-free when `padding_free` says so, with `train_type=lora` a PEFT LoRA on its
    inner model, with `torch_compile` each layer compiled in place."""
    config = hf_config(cfg.model, cfg.trust_remote_code)  # a vision backbone pads: its ids hold image runs
    packed, attn = resolve_padding_free(cfg.padding_free, is_decoder(config) and not vision_family(config))
    common = {"max_length": cfg.max_length, "trust_remote_code": cfg.trust_remote_code, "dtype": precision.load,
              "attn_implementation": attn}  # fmt: skip
    if cfg.task_type == "embedding":
        # an empty query_instruction: the model's own query prompt, if any
        model = Embedder.from_pretrained(cfg.model, cfg.pooling, cfg.query_instruction or None, **common,
                                         vision=vision_knobs(cfg))  # fmt: skip
    elif reranker_head(cfg.model, cfg.reranker_head, cfg.trust_remote_code) == "classifier":
        if vision_family(config):
            raise EmbedtuneError(f"{cfg.model}: a {config.model_type} reranker has the generative head only")
        if packed:
            raise EmbedtuneError(
                "padding_free: not for a classifier reranker (its head finds the last token by padding)"
            )
        model = ClassifierReranker.from_pretrained(cfg.model, **common)
    else:
        model = Reranker.from_pretrained(cfg.model, cfg.reranker_instruction, positive_token=cfg.positive_token,
                                         negative_token=cfg.negative_token, **common, vision=vision_knobs(cfg))  # fmt: skip
    model.padding_free = packed
    apply_liger_kernel(model.inner, cfg.use_liger_kernel)  # before LoRA wraps the linear layers
    dims, _ = matryoshka_spec(cfg.matryoshka_dims)
    if dims and max(dims) > model.dim:
        raise EmbedtuneError(f"matryoshka_dims: {max(dims)} is larger than the model's dimension {model.dim}")
    exclude = freeze_vision(model, cfg.freeze_vision, lora=cfg.train_type == "lora")  # a vision tower stays
    if cfg.train_type == "lora":
        torch.manual_seed(cfg.seed)  # LoRA's A is random: same seed, same adapter, whatever ran before
        add_lora(
            model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target, cfg.use_dora, exclude
        )
    regional_compile(model.inner, cfg.torch_compile, cfg.deepspeed)  # each layer in place, when enabled
    n_train = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    kind = f"{cfg.task_type} ({model.HEAD} head)" if isinstance(model, Reranker) else cfg.task_type
    say("train", f"{kind} {cfg.train_type}: {n_train:,} trainable parameters")
    return model.train()


def train_module(model: Embedder | Reranker, cfg: TrainConfig) -> TrainModel:
    """The module the Trainer trains, from the config's loss and speed knobs, resolved into plain values."""
    obj = objective(cfg.loss_type)
    return TrainModel(
        model,
        obj,
        resolve_knobs(obj, cfg),
        chunk_size=cfg.gradient_cache_chunk_size,
        chunk_tokens=cfg.gradient_cache_chunk_tokens,
        length_buckets=resolve_buckets(cfg.length_buckets),
        pad_to_multiple_of=cfg.pad_to_multiple_of,
        matryoshka=matryoshka_spec(cfg.matryoshka_dims, cfg.matryoshka_weights),
    )


def collator(model: Embedder | Reranker, cfg: TrainConfig) -> Collator:
    """The batch collator of the config's loss (its layout and the layout's knobs)."""
    obj = objective(cfg.loss_type)
    knobs = resolve_knobs(obj, cfg, collate=True)
    off = sources.without_in_batch(cfg.source_in_batch_negatives)  # a model's images: read per batch
    return Collator(obj, model.tokenizer.pad_token_id, cfg.seed, cfg.pad_to_multiple_of, knobs, off,
                    getattr(model, "featurizer", None))  # fmt: skip
