"""One frozen dataclass per step: the single source of every knob's name, type, default and help text.

The same names flow end to end: preset YAML keys == pipeline parameters == component parameters == these
fields == CLI flags (`lora_rank` -> `--lora-rank`, `--lora_rank` also accepted) == MLflow params. Where
ms-swift or Hugging Face `TrainingArguments` already names a knob, we use that name.

The trailing comment on each field is its help text (`field_help`): `embedtune train --help`, the Kubeflow
components and the pipeline (the descriptions the Kubeflow UI shows) all read it from here, so keep it on
the field's line (this file is left out of `ruff format`, which would wrap long ones). Stdlib only (and
`knobs`, the table every field is checked against when a config is built): this module is imported by the
components at compile time on machines without torch.

Knobs whose default can come from an environment variable (ms-swift compatibility: INFONCE_TEMPERATURE, ...)
default to `None` here; `resolve_env_defaults` fills them (explicit values win) and the effective values are
logged and saved with the model.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import os
import textwrap
import tokenize
from dataclasses import dataclass

from embedtune.knobs import check_config

# ms-swift's environment variables and the config field each one is a default for.
ENV_DEFAULTS = {
    "infonce_temperature": ("INFONCE_TEMPERATURE", float, 0.01),
    "infonce_use_batch": ("INFONCE_USE_BATCH", "bool", True),
    "infonce_hard_negatives": ("INFONCE_HARD_NEGATIVES", int, 0),
    "infonce_mask_fake_negative": ("INFONCE_MASK_FAKE_NEGATIVE", "bool", False),
    "infonce_include_qq": ("INFONCE_INCLUDE_QQ", "bool", False),
    "infonce_include_dd": ("INFONCE_INCLUDE_DD", "bool", False),
    "positive_token": ("GENERATIVE_RERANKER_POSITIVE_TOKEN", str, "yes"),
    "negative_token": ("GENERATIVE_RERANKER_NEGATIVE_TOKEN", str, "no"),
    "min_pixels": ("MIN_PIXELS", int, 0),
    "max_pixels": ("MAX_PIXELS", int, 0),
}


class Checked:
    """Base of every step config: its fields are checked when it is built (`knobs.check_config`)."""

    def __post_init__(self):
        check_config(self)


QWEN3_RERANKER_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


@dataclass(frozen=True)
class ConvertConfig(Checked):
    """convert: any supported source -> canonical ms-swift rows (`query, response, rejected_response, label`)."""

    source: str  # local JSONL/JSON/CSV/TSV/Parquet file or folder, or a Hugging Face dataset `name[:subset]`
    output: str  # canonical JSONL to write; its stats JSON is written beside it (`<output>.stats.json`)
    format: str = "auto"  # input shape: auto | canonical | mteb | sts | pairs (anchor/positive/negative columns) | messages (ms-swift's message lists: messages / positive_messages / negative_messages, with images / positive_images / negative_images)
    hf_split: str = "train"  # split to read when `source` is a Hugging Face dataset
    score_scale: float = 5.0  # STS scores are divided by this to get `label` in [0, 1] (use 1.0 for 0..1 scores)
    sts_positive_threshold: float = 0.0  # > 0: keep only STS pairs with label >= this as positives (ms-swift stsb:positive = 0.75)
    loss_type: str = ""  # loss the data is for; validates labels (required 0/1 for contrastive, required [-1, 1] for cosine_similarity, [0, 1] for pointwise_reranker)
    on_error: str = "fail"  # fail: exit non-zero listing the first problems | skip: write good rows + a `.rejected.jsonl`
    max_errors: int = 20  # how many problems to list before stopping
    image_root: str = ""  # rows with `images`: refuse local image paths that resolve outside this folder (empty: no limit); relative paths are read from the data file's folder and written absolute
    max_image_pixels: int = 16777216  # rows with `images`: an image with more pixels is resized down to this many when loaded (aspect kept); only images that cannot be read or decoded are refused


@dataclass(frozen=True)
class SplitConfig(Checked):
    """split: canonical rows -> train / eval files, grouped by query so no query text is in both."""

    dataset: str  # canonical JSONL from convert
    train_data: str  # train JSONL to write
    eval_data: str  # eval JSONL to write
    split_dataset_ratio: float = 0.05  # fraction of distinct queries that go to eval, in (0, 1)
    seed: int = 42  # seed of the query shuffle; same seed + same data -> same split
    exclude_data: str = ""  # leakage guard: comma-separated files (canonical rows, BEIR queries/corpus JSONL, or one text per line; .gz ok); train rows whose normalized query or positive is one of their texts are dropped and counted
    drop_eval_overlap: bool = True  # leakage guard: drop train rows whose normalized query or positive (NFKC, casefold, collapsed whitespace) is a query or positive of the eval split
    image_root: str = ""  # rows with `images`: refuse local image paths that resolve outside this folder (empty: no limit); relative paths are read from the dataset's folder


@dataclass(frozen=True)
class MineConfig(Checked):
    """mine: add hard negatives to canonical rows, mined from a corpus with the base model."""

    dataset: str  # canonical JSONL rows to mine negatives for (in the pipeline: split's train rows)
    model: str  # embedder that scores the candidates (usually the base model train starts from)
    output: str  # canonical JSONL to write (rejected_response = mined negatives); its stats JSON goes beside it (`<output>.stats.json`)
    corpus: str = ""  # extra candidate files, comma-separated: canonical rows (responses + negatives), BEIR corpus.jsonl (title + text) or one text per line (.gz ok); every response and rejected_response of the rows is always a candidate
    num_negatives: int = 7  # negatives mined per row (fewer when the rank window holds fewer that pass the filters)
    range_min: int = 0  # rank window start: skip the N most similar candidates (ranks count after the query's own positives are removed)
    range_max: int = 100  # rank window end (exclusive): candidates ranked beyond are never taken
    relative_margin: float = 0.05  # drop likely false negatives: candidates scoring above positive_score * (1 - relative_margin) (NV-Retriever's TopK-PercPos; 0: only those above the positive)
    max_score: float = 1.0  # also drop candidates whose cosine to the query is above this absolute cap (1.0: no cap)
    sampling: str = "top"  # top: the hardest candidates that pass the filters | random: a seeded random pick among them
    keep_original_negatives: bool = False  # keep the row's own rejected_response first, then add the mined ones
    seed: int = 42  # seed of the random sampling
    pooling: str = "auto"  # pooling of the model (auto: as train would pick it)
    query_instruction: str = ""  # prefix before every query; empty: the model's own query prompt (as train uses it)
    max_length: int = 0  # tokens per text; 0: the model's own
    dtype: str = "auto"  # weights while encoding: auto (bf16 on GPUs that have it, else fp32) | bf16 | fp16 | fp32 | autocast (fp32 weights, bf16 autocast)
    per_device_eval_batch_size: int = 32  # texts per forward pass when encoding queries and corpus
    trust_remote_code: bool = False  # allow the model's own Python code from the hub
    nproc: int = 1  # processes to launch with torchrun (one per GPU): the corpus is encoded in shards, one per process
    passthrough: bool = False  # copy the rows unchanged and mine nothing (what the pipeline runs when mine_hard_negatives is false)


@dataclass(frozen=True)
class ScoreConfig(Checked):
    """score: write a teacher's score of every (query, document) of each row into its teacher_scores."""

    dataset: str  # canonical JSONL rows to score (in the pipeline: mine's output, so the mined negatives are scored)
    output: str  # canonical JSONL to write: each row with teacher_scores (one per response, then per rejected_response); stats beside it (`<output>.stats.json`)
    teacher_model: str = ""  # teacher model folder or hub id: a reranker embedtune loads (yes/no or classifier head: z = its logit) or an embedder (the cosine); required unless passthrough
    teacher_task_type: str = "auto"  # auto (the folder's embedtune.json, a sequence-classification folder is a reranker, else an embedder) | reranker | embedding
    max_length: int = 512  # tokens per query, document or reranker prompt; longer texts are cut
    score_batch_tokens: int = 16384  # padded tokens per forward pass: texts sorted by length, each pass as many as fit
    score_chunk_rows: int = 4096  # rows scored between two resume points: a rerun of a killed job goes on from the last whole chunk (`.<output>.partial`)
    dtype: str = "auto"  # weights while scoring: auto (bf16 on GPUs that have it, else fp32) | bf16 | fp16 | fp32 | autocast
    trust_remote_code: bool = False  # allow the teacher's own Python code from the hub
    nproc: int = 1  # processes to launch with torchrun (one per GPU): each chunk's pairs are split across them
    passthrough: bool = False  # copy the rows unchanged and score nothing (what the pipeline runs when teacher_model is empty)


@dataclass(frozen=True)
class TrainConfig(Checked):
    """train: fine-tune an embedder or a reranker with the HF Trainer (DeepSpeed ZeRO-3/2 or plain)."""

    model: str  # base model: local folder (HF or sentence-transformers) or a Hugging Face hub id
    train_data: str  # canonical JSONL rows
    output_dir: str  # the final model folder; also holds the checkpoints unless checkpoint_dir is set (re-running resumes)
    eval_data: str = ""  # optional canonical JSONL evaluated every `eval_steps`: eval loss + evaluate's metrics for its shape
    checkpoint_dir: str = ""  # where checkpoint-N folders go (deleted after the final save); empty = output_dir; point it at a persistent volume so a restarted pod resumes
    task_type: str = "embedding"  # embedding | reranker (its head: reranker_head) | generative_reranker (ms-swift's name: reranker with the yes/no head)
    loss_type: str = "infonce"  # embedding: infonce | cosine_similarity | contrastive | online_contrastive | cosent | angle | distill_kl | margin_mse (the last two read rows' teacher_scores: embedtune score); reranker: pointwise_reranker | listwise_reranker | distill_kl_reranker | margin_mse_reranker
    train_type: str = "full"  # full | lora
    pooling: str = "auto"  # auto (from the model's sentence-transformers config, else last for decoders, cls/mean for encoders) | last | mean | cls
    query_instruction: str = ""  # embedding: prefix put before every query (e.g. 'Instruct: {task}\nQuery:'); stored with the model
    reranker_head: str = "auto"  # reranker: auto (a classifier for encoder-only models and folders with a classification head, the yes/no head for causal LMs) | generative (Qwen3-Reranker: logit(yes) - logit(no)) | classifier (a one-logit sequence-classification head, a cross-encoder; ms-swift's --task_type reranker on a decoder)
    reranker_instruction: str = ""  # reranker: the <Instruct> text of its prompt; empty: the folder's own, else the family's (Qwen3-Reranker's web-search one; Qwen3-VL-Reranker's "Given a search query, retrieve relevant candidates that answer the query.")
    max_length: int = 512  # tokens per text (query, document or reranker prompt); longer texts are truncated
    lora_rank: int = 16  # LoRA rank r (train_type=lora)
    lora_alpha: int = 32  # LoRA alpha (scaling = alpha / rank)
    lora_dropout: float = 0.05  # LoRA dropout
    lora_target: str = "all-linear"  # modules LoRA wraps: all-linear or a comma-separated list of module names
    use_dora: bool = False  # LoRA as DoRA (weight-decomposed: magnitude + direction; PEFT's use_dora), merged like LoRA
    freeze_vision: bool = True  # Qwen2-VL / Qwen3-VL: the vision tower and its merger stay frozen (full: no gradient; LoRA: no adapter on them); ms-swift's freeze_vit
    min_pixels: int | None = None  # Qwen2-VL / Qwen3-VL: the image processor's lower bound on an image's resized pixels (0: the model folder's); default: env MIN_PIXELS (ms-swift's), else 0
    max_pixels: int | None = None  # Qwen2-VL / Qwen3-VL: the image processor's upper bound on an image's resized pixels, which bounds its tokens (pixels / 784 for Qwen2-VL; 0: the model folder's); default: env MAX_PIXELS (ms-swift's), else 0
    image_root: str = ""  # rows with `images`: refuse local image paths that resolve outside this folder (empty: no limit); relative paths are read from the data file's folder
    max_image_pixels: int = 16777216  # rows with `images`: an image with more pixels is resized down to this many when read (aspect kept), before the processor's own resize
    deepspeed: str = "auto"  # auto (none for one process, zero3 for more: one GPU has no shards to spread, and ZeRO-3 turns torch_compile auto off) | zero3 | zero2 | none (configs ship in the package; 'auto' values filled by the Trainer)
    nproc: int = 1  # processes to launch with torchrun (one per GPU; 2 on CPU for tests); with nodes > 1, per node
    nodes: int = 1  # machines to train on, nproc processes each. Inside a multi-node job (torchrun's PET_* variables set, as Kubeflow Trainer sets them) the job's node count (must match when given). Elsewhere, > 1 submits this command as a Kubeflow Trainer TrainJob of `nodes` pods (needs shared_dir; see embedtune.trainjob)
    shared_dir: str = ""  # nodes > 1: a folder on a ReadWriteMany volume this pod mounts; the job's data, checkpoints and model go to <shared_dir>/<job name>/ (every node mounts the same claim there)
    run_id: str = ""  # the pipeline run id: names the TrainJob that nodes > 1 submits and its folder in shared_dir (a retry with the same id re-attaches to its job, never starts a second one)
    num_train_epochs: float = 1.0  # epochs over the train data
    max_steps: int = -1  # > 0 overrides num_train_epochs
    per_device_train_batch_size: int = 8  # rows per process per step (the global batch is this x nproc x accumulation)
    per_device_eval_batch_size: int = 16  # rows per process per eval step
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step (never adds infonce negatives)
    gradient_cache_chunk_size: int = 0  # > 0: gradient cache (GradCache), texts per forward pass: the batch is encoded chunk by chunk without a graph, then each chunk again with the cached gradient of the whole batch's loss; same loss and gradients (every in-batch negative of the global batch) at the activation memory of one chunk, ~1.33x compute; 0: off
    gradient_cache_chunk_tokens: int = 0  # > 0: gradient cache with chunks of at most this many padded tokens (texts x the chunk's longest; sentence-transformers' mini_batch_num_tokens): even memory per chunk whatever the lengths; with gradient_cache_chunk_size both limits hold; 0: chunks by text count only
    learning_rate: float = 2e-5  # peak learning rate (ms-swift uses 1e-4 for LoRA, 1e-5 for full)
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_ratio: float = 0.1  # fraction of steps spent warming the learning rate up linearly
    lr_scheduler_type: str = "linear"  # HF scheduler name: linear | cosine | constant | constant_with_warmup ...
    seed: int = 42  # seed for model init, shuffling and dropout
    group_by_length: bool = True  # batches of rows of similar length (less padding: faster); false: plain random batches
    batch_sampling: str = "mixed"  # rows' source per batch: mixed (all sources shuffled together) | round_robin (every batch from one source, sources in turn until the smallest runs out) | proportional (every batch from one source, each source as often as it has batches)
    source_instructions: str = ""  # embedding: JSON {"source": "query instruction"} for the rows of each source (a row's own instruction wins; else query_instruction)
    source_in_batch_negatives: str = ""  # infonce / distill_kl: JSON {"source": false}: that source's batches score no in-batch negatives, only each row's own (NV-Embed stage 2; needs round_robin or proportional)
    gradient_checkpointing: bool = False  # recompute activations in backward to save memory
    logging_steps: int = 10  # log loss, lr and samples/s every N steps
    eval_steps: int = 0  # evaluate every N steps (0: at the end only, when eval_data is given)
    save_steps: int = 500  # checkpoint every N steps (what a preempted run resumes from); 0: no checkpoints
    save_total_limit: int = 2  # checkpoints kept on disk
    keep_checkpoint_weights: int = 0  # > 0: the model weights of the last N checkpoints (at most save_total_limit) are kept in the final folder (checkpoint-weights/step-S.safetensors), for merge --merge-with checkpoints; 0: all checkpoints deleted
    margin: float = 0.5  # contrastive / online_contrastive: margin on the cosine distance
    infonce_temperature: float | None = None  # logits = cos / temperature; default: env INFONCE_TEMPERATURE, else 0.01
    infonce_use_batch: bool | None = None  # also score every other document of the global batch; default: env INFONCE_USE_BATCH, else true
    infonce_hard_negatives: int | None = None  # > 0: each row uses exactly N of its negatives (resampled, never the positive); default: env INFONCE_HARD_NEGATIVES, else all
    infonce_mask_fake_negative: bool | None = None  # mask negatives scoring > positive + 0.1 (in every block: documents, and the qq / dd terms when on); default: env INFONCE_MASK_FAKE_NEGATIVE, else false
    infonce_include_qq: bool | None = None  # infonce (needs infonce_use_batch): every other query of the global batch joins each query's denominator (Qwen3-Embedding / GTE); default: env INFONCE_INCLUDE_QQ, else false
    infonce_include_dd: bool | None = None  # infonce (needs infonce_use_batch): the positive against every other document of the global batch joins the denominator (its own hard negatives included, as ms-swift); default: env INFONCE_INCLUDE_DD, else false
    infonce_hardness_strength: float = 0.0  # infonce: alpha * stopgrad(cosine) added to every negative's logit (harder negatives weigh more; sentence-transformers' hardness_strength, all negatives; 5-9 in the papers); 0: off
    cosent_scale: float = 20.0  # cosent / angle: pair scores are multiplied by this (sentence-transformers' scale; 1 / temperature)
    distill_student_temperature: float = 0.0  # distill_kl / margin_mse (and _reranker): student scores are divided by this; 0: 0.02 for an embedder's cosines (Tevatron, FlagEmbedding), 1 for a reranker's logits
    distill_teacher_temperature: float = 1.0  # distill_kl / margin_mse: teacher_scores are divided by this (1: raw reranker logits, as FlagEmbedding); match it to the teacher's spread
    distill_infonce_weight: float = 0.0  # distill_kl: weight of an infonce term (infonce knobs) added to the KL: 0 pure KL (Tevatron), 1 KL + InfoNCE (FlagEmbedding)
    positive_token: str | None = None  # reranker: token whose logit means relevant; default: env GENERATIVE_RERANKER_POSITIVE_TOKEN, else 'yes'
    negative_token: str | None = None  # reranker: token whose logit means irrelevant; default: env GENERATIVE_RERANKER_NEGATIVE_TOKEN, else 'no'
    listwise_temperature: float = 1.0  # listwise_reranker: scores are divided by this before the softmax
    listwise_min_group_size: int = 2  # listwise_reranker: groups (1 positive + negatives) smaller than this are skipped and reported
    trust_remote_code: bool = False  # allow the model's own Python code from the hub (off unless asked)
    dataloader_num_workers: int = 0  # DataLoader worker processes per rank
    matryoshka_dims: str = ""  # embedding: comma-separated dimensions (e.g. 1024,512,256,128): the loss is the weighted mean of the loss on each truncated, re-normalized embedding (Matryoshka); saved with the model
    matryoshka_weights: str = ""  # weights of matryoshka_dims, comma-separated, same count; empty: equal weights
    dtype: str = "auto"  # auto (bf16 on GPUs that have it, else fp32) | bf16 (bf16 weights and activations; fp32 master weights and Adam states in the optimizer, or DeepSpeed's bf16 mode) | autocast (fp32 weights, bf16 matmuls under torch.autocast) | fp32
    optim: str = "adamw_torch_fused"  # HF optimizer name: adamw_torch_fused (one fused kernel per step) | adamw_torch | any TrainingArguments optim; with dtype bf16 and deepspeed none, adamw_torch or adamw_torch_fused on the fp32 master weights
    torch_compile: str = "auto"  # regional torch.compile (each layer of the backbone, dynamic shapes): auto (on for CUDA, except with deepspeed zero3; a layer that fails to compile runs eager) | on (compile errors fail the run) | off
    length_buckets: int = 0  # forward passes per batch: texts sorted by length, cut into this many groups with the fewest padded tokens (2: queries and documents apart), each padded to its own longest; same loss and gradients; 1: one pass padded to the longest text; 0 auto: 2 on CUDA, 1 on CPU (where a second pass costs more than the padding it saves)
    use_liger_kernel: str = "auto"  # Liger's fused RMSNorm, RoPE and SwiGLU kernels for the families it covers (Qwen2/Qwen3, Llama, Mistral, Gemma, ...): auto (on with CUDA when liger-kernel is installed; the GPU image has it) | on (refused without it) | off; ms-swift's true / false work too
    padding_free: str = "auto"  # pack each forward pass's texts into one row (position_ids restarting per text, no padding; decoders only): auto (on for a decoder on CUDA with flash-attn installed: its varlen kernels) | on (also with sdpa's block-diagonal mask, e.g. on CPU) | off
    pad_to_multiple_of: int = 0  # > 0: padded lengths rounded up to a multiple of this (fewer distinct shapes for compiled kernels); 0: each pass's longest text


@dataclass(frozen=True)
class EvaluateConfig(Checked):
    """evaluate: metrics of a trained model (and its base) on canonical eval rows."""

    model: str  # model folder from train/merge (or any sentence-transformers / HF model)
    eval_data: str  # canonical JSONL rows
    output: str  # metrics JSON to write; a Markdown report is written beside it (`<output>.md`)
    baseline_model: str = ""  # optional base model measured the same way; adds delta_<metric>
    primary_metric: str = ""  # metric used for gating; default by data shape (spearman_cosine for labels, ndcg_at_10 for ranking and retrieval)
    per_device_eval_batch_size: int = 32  # texts per forward pass
    max_length: int = 0  # tokens per text; 0: the value saved with the model
    report: str = ""  # Markdown report path; default `<output>.md`
    matryoshka_dims: str = ""  # embedders: also report every metric at these truncated dimensions, as <metric>_dim<d> (comma-separated)
    dtype: str = "auto"  # weights and activations while encoding: auto (bf16 on GPUs that have it, else fp32) | bf16 | fp16 | fp32 | autocast (fp32 weights, bf16 autocast)
    guard_data: str = ""  # extra eval sets, NAME=FILE,NAME=FILE: each measured like eval_data (its own shape and primary metric), for the model and its baseline, reported as guards.NAME (what merging and distillation should not lose: general ability)
    max_guard_drop: float = -1.0  # >= 0: a guard set whose primary metric falls more than this below the baseline's is a guard failure, and register keeps the champion (the version is registered, not promoted); -1: report only


@dataclass(frozen=True)
class MergeConfig(Checked):
    """merge: fold a LoRA adapter into its base weights and prove the result equals the adapter model."""

    adapter: str  # model folder written by train with train_type=lora (a full-training folder passes through)
    output: str  # merged model folder to write
    tolerance: float = 1e-4  # max abs difference allowed between merged and adapter outputs (fp32)
    eval_data: str = ""  # optional canonical JSONL; its first 16 rows join the check's built-in inputs
    merge_method: str = "none"  # after folding LoRA, merge the weights with the base model they were trained from, tensor by tensor: none | linear ((1 - w) base + w tuned; LM-Cocktail) | slerp (spherical, per tensor; Qwen3-Embedding's merge; linear where tensors are nearly parallel)
    merge_weight: float = 0.5  # merge_method: the tuned model's weight w (0: the other end, 1: the tuned model unchanged)
    merge_with: str = "base"  # merge_method's other end: base (the model it was trained from; LM-Cocktail) | checkpoints (the mean of the checkpoint weights train kept: keep_checkpoint_weights; Qwen3-Embedding merges checkpoints)
    export_classifier: bool = False  # generative (yes/no) reranker: write it as a one-logit sequence classifier (Qwen3ForSequenceClassification: the yes row minus the no row of the LM head; what vLLM and TEI serve), checked to give the same scores; a full-training folder is converted too


@dataclass(frozen=True)
class RegisterConfig(Checked):
    """register: log the model to MLflow, register a version, set aliases behind a champion gate."""

    model: str  # model folder to register (merged or full)
    metrics: str  # metrics JSON written by evaluate
    name: str  # registered model name in MLflow
    tracking_uri: str = ""  # MLflow tracking URI; default env MLFLOW_TRACKING_URI, else sqlite:///~/.embedtune/mlflow.db (model files in ~/.embedtune/mlartifacts)
    run_id: str = ""  # pipeline run id for lineage and idempotency (same id -> same version, none created)
    experiment_name: str = "embedtune"  # MLflow experiment of the registration run
    min_improvement: float = 0.0  # promote to champion only when primary metric > champion's + this
    dataset_stats: str = ""  # stats JSON from convert (its fingerprint becomes a lineage tag)
    image: str = ""  # container image the steps ran in (lineage tag)


@dataclass(frozen=True)
class DeployConfig(Checked):
    """deploy: serve this run's registered model with `embedtune serve` as a KServe InferenceService, if it is the champion."""

    name: str  # registered model name in MLflow (what register wrote)
    serve_image: str  # container image of the predictor (runs `embedtune serve`; the pipeline passes the GPU image)
    run_id: str = ""  # pipeline run id: the version this run registered is deployed, and only while it is the champion; empty: the champion, whoever registered it
    tracking_uri: str = ""  # MLflow tracking server both this step and the predictor pods reach (default env MLFLOW_TRACKING_URI); a local store cannot be served from a pod and is refused
    service_name: str = ""  # InferenceService name; empty: the registered model name as an RFC 1035 label of at most 45 characters
    namespace: str = ""  # Kubernetes namespace of the service; empty: this pod's own (in a cluster), else the kubeconfig context's
    canary_traffic_percent: int = 100  # when the service exists: the share of traffic its new revision gets while the previous revision keeps the rest (KServe canary rollout); 100: all of it once ready
    serve_gpus: int = 1  # GPUs per predictor replica (0: CPU)
    accelerator_type: str = "nvidia.com/gpu"  # the GPUs' resource name
    min_replicas: int = 1  # predictor replicas at least (0 lets KServe scale to zero)
    max_replicas: int = 1  # predictor replicas at most
    ready_timeout_s: int = 900  # how long the step waits for the service to be Ready (image pull, model download and load)
    mlflow_secret: str = "mlflow-credentials"  # Kubernetes secret whose MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN keys the predictor gets (each optional); empty: none
    api_key_secret: str = ""  # Kubernetes secret whose key `api-key` is the bearer token the served API requires; empty: no token
    dtype: str = "auto"  # serve: weights while serving: auto (bf16 on GPUs that have it, else fp32) | bf16 | fp16 | fp32 | autocast
    max_batch_tokens: int = 16384  # serve: padded tokens per forward pass (dynamic batching)
    max_wait_ms: float = 5.0  # serve: how long the first queued request waits for others
    max_input_tokens: int = 0  # serve: tokens per text; 0: the model's max length
    truncate: bool = True  # serve: cut texts over max_input_tokens (false: refuse them with 400)
    max_inputs: int = 2048  # serve: texts per embeddings request, documents per rerank request


@dataclass(frozen=True)
class ServeConfig(Checked):
    """serve: OpenAI-compatible /v1/embeddings and Cohere/Jina-compatible /v1/rerank for a model embedtune wrote, with dynamic batching."""

    model: str  # model folder (train or merge output, full or LoRA adapter), models:/NAME@ALIAS or models:/NAME/VERSION of the MLflow registry, or a Hugging Face hub id
    host: str = "127.0.0.1"  # address to listen on (0.0.0.0 in a container)
    port: int = 8000  # port to listen on
    served_model_name: str = ""  # the name clients send as `model` and /v1/models lists; empty: the folder's name, or the registered model's name
    tracking_uri: str = ""  # MLflow tracking URI for models:/ (default env MLFLOW_TRACKING_URI, else the local store register writes: sqlite:///~/.embedtune/mlflow.db)
    dtype: str = "auto"  # weights while serving: auto (bf16 on GPUs that have it, else fp32) | bf16 | fp16 | fp32 | autocast (fp32 weights, bf16 autocast)
    max_batch_tokens: int = 16384  # dynamic batching: padded tokens per forward pass; the texts of concurrent requests share passes up to this
    max_wait_ms: float = 5.0  # dynamic batching: how long the first queued request waits for others before its pass runs (unless the queue already fills max_batch_tokens)
    max_input_tokens: int = 0  # tokens per text (query instruction included; a reranker: per prompt); 0: the model's max length
    truncate: bool = True  # texts over max_input_tokens are cut to it (a reranker: the document first); false: the request is refused with 400
    max_inputs: int = 2048  # texts per embeddings request, documents per rerank request; more: 413
    api_key_env: str = ""  # name of an environment variable holding the bearer token /v1/* and /rerank require (Authorization: Bearer ...); empty: no token
    trust_remote_code: bool = False  # allow the model's own Python code (default: what train saved with the model)


STEP_CONFIGS = {
    "convert": ConvertConfig,
    "split": SplitConfig,
    "mine": MineConfig,
    "score": ScoreConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
    "merge": MergeConfig,
    "register": RegisterConfig,
    "deploy": DeployConfig,
}
# Steps that run from the command line only: no Kubeflow component (serve runs until stopped; the pipeline
# runs it as a KServe InferenceService: the deploy step).
CLI_CONFIGS = {**STEP_CONFIGS, "serve": ServeConfig}


TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_bool(raw) -> bool:
    """`true/false`, `1/0`, `yes/no`, `on/off` (any case) -> bool; anything else raises ValueError.

    The one truth table for flags (`--infonce-use-batch false`), env vars and pipeline values.
    """
    low = str(raw).strip().lower()
    if low in TRUE_WORDS:
        return True
    if low in FALSE_WORDS:
        return False
    raise ValueError(f"expected true/false, got {raw!r}")


def _parse_env(name: str, kind, raw: str):
    try:
        return parse_bool(raw) if kind == "bool" else kind(raw)
    except ValueError:
        what = "a boolean" if kind == "bool" else f"a valid {kind.__name__}"
        raise ValueError(f"environment variable {name}={raw!r} is not {what}") from None


def resolve_env_defaults(cfg, environ=None):
    """Fill `None` knobs from ms-swift's env vars, else the built-in default. Explicit values win.

    Returns a new config with every ENV_DEFAULTS field set, so the effective values can be logged and saved.
    """
    environ = os.environ if environ is None else environ
    names = {f.name for f in dataclasses.fields(cfg)}
    updates = {}
    for field, (env, kind, default) in ENV_DEFAULTS.items():
        if field not in names or getattr(cfg, field) is not None:
            continue
        raw = environ.get(env)
        updates[field] = default if raw in (None, "") else _parse_env(env, kind, raw)
    return dataclasses.replace(cfg, **updates)


@functools.cache
def field_help(cls) -> dict[str, str]:
    """Field name -> its help text: the comment that trails the field in the class source.

    The one place every generated description comes from: `embedtune <step> --help`, the components'
    and the pipeline's docstrings (the Kubeflow UI shows them per parameter). Read with `ast` + `tokenize`,
    so a field whose value is wrapped over several lines keeps its comment.
    """
    source = textwrap.dedent(inspect.getsource(cls))
    comments = {
        tok.start[0]: tok.string.lstrip("#").strip()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }
    helps = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            lines = range(node.lineno, node.end_lineno + 1)
            helps[node.target.id] = " ".join(comments[n] for n in lines if n in comments)
    return helps


def config_from(cls, values: dict, **overrides):
    """`cls(...)` from a mapping that holds its fields among other keys (a component's `locals()`).

    Keys that are not fields are ignored; a value with a `.path` (a KFP artifact) becomes that path; fields
    missing from `values` keep their dataclass default. `overrides` win over `values`. This is how a
    component builds its step's config without listing every field a second time.
    """
    merged = {**values, **overrides}
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in merged:
            value = merged[f.name]
            kwargs[f.name] = getattr(value, "path", value)
    return cls(**kwargs)
