"""train: fine-tune an embedder or a reranker, one process per GPU (DeepSpeed ZeRO-3, full or LoRA); with
nodes > 1, on that many pods as a Kubeflow Trainer TrainJob (the step submits it and waits: embedtune.trainjob)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.describe import documented
from embedtune.config import TrainConfig, field_help
from images.refs import STEP_IMAGES


@dsl.component(base_image=STEP_IMAGES["train"], install_kfp_package=False)
@documented(
    field_help(TrainConfig),
    train_data="Canonical train rows from score (split's train rows, with mined negatives and teacher_scores when "
    "asked).",
    eval_data="Canonical eval rows from split, evaluated before the first step, every eval_steps and at the end "
    "of training: eval loss and evaluate's metrics for the data's shape.",
    output_dir="The trained model folder (a LoRA adapter when train_type is lora).",
    metrics="Final train/eval loss, eval_<metric> values and throughput.",
    checkpoint_dir="Folder on a persistent volume for checkpoints (the pipeline mounts cluster.CHECKPOINT_PVC "
    "there); this run's checkpoint-N folders go in its run_id subfolder, so a retried or preempted pod resumes "
    "from the latest one. Empty: checkpoints stay in output_dir, local to the pod.",
    gpus="GPUs this task got; training runs one process per GPU (nproc = gpus).",
    cpu_procs="Processes to run when gpus is 0 (CPU, gloo); nproc = cpu_procs.",
)
def train(
    model: str,
    train_data: Input[Dataset],
    eval_data: Input[Dataset],
    output_dir: Output[Model],
    metrics: Output[Metrics],
    checkpoint_dir: str,
    run_id: str,
    shared_dir: str,
    nodes: int,
    gpus: int,
    cpu_procs: int,
    task_type: str,
    loss_type: str,
    train_type: str,
    pooling: str,
    query_instruction: str,
    reranker_head: str,
    reranker_instruction: str,
    max_length: int,
    lora_rank: int,
    lora_alpha: int,
    lora_dropout: float,
    lora_target: str,
    use_dora: bool,
    freeze_vision: bool,
    min_pixels: int,
    max_pixels: int,
    image_root: str,
    max_image_pixels: int,
    deepspeed: str,
    num_train_epochs: float,
    max_steps: int,
    per_device_train_batch_size: int,
    per_device_eval_batch_size: int,
    gradient_accumulation_steps: int,
    gradient_cache_chunk_size: int,
    gradient_cache_chunk_tokens: int,
    learning_rate: float,
    weight_decay: float,
    warmup_ratio: float,
    lr_scheduler_type: str,
    seed: int,
    group_by_length: bool,
    batch_sampling: str,
    source_instructions: str,
    source_in_batch_negatives: str,
    gradient_checkpointing: bool,
    logging_steps: int,
    eval_steps: int,
    save_steps: int,
    save_total_limit: int,
    keep_checkpoint_weights: int,
    margin: float,
    infonce_temperature: float,
    infonce_use_batch: bool,
    infonce_hard_negatives: int,
    infonce_mask_fake_negative: bool,
    infonce_include_qq: bool,
    infonce_include_dd: bool,
    infonce_hardness_strength: float,
    cosent_scale: float,
    distill_student_temperature: float,
    distill_teacher_temperature: float,
    distill_infonce_weight: float,
    positive_token: str,
    negative_token: str,
    listwise_temperature: float,
    listwise_min_group_size: int,
    trust_remote_code: bool,
    dataloader_num_workers: int,
    matryoshka_dims: str,
    matryoshka_weights: str,
    dtype: str,
    optim: str,
    torch_compile: str,
    length_buckets: int,
    use_liger_kernel: str,
    padding_free: str,
    pad_to_multiple_of: int,
):
    """Fine-tune `model` on the train rows; the step launches one torchrun process per GPU, or with nodes > 1
    submits a TrainJob of `nodes` pods running the same command and waits for it."""
    inputs = dict(locals())
    import os

    from embedtune.config import TrainConfig, config_from
    from embedtune.report import scalars
    from embedtune.steps.train import run

    result = run(
        config_from(
            TrainConfig,
            inputs,
            nproc=gpus if gpus > 0 else cpu_procs,
            checkpoint_dir=os.path.join(checkpoint_dir, run_id) if checkpoint_dir else "",
        )
    )
    for key, value in {**scalars(result), **scalars(result.get("eval_metrics") or {}, "eval_")}.items():
        metrics.log_metric(key, value)
