"""train: fine-tune an embedder or a reranker, one process per GPU (DeepSpeed ZeRO-3, full or LoRA)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from images.refs import STEP_IMAGES


@dsl.component(base_image=STEP_IMAGES["train"], install_kfp_package=False)
def train(
    model: str,
    train_data: Input[Dataset],
    eval_data: Input[Dataset],
    output_dir: Output[Model],
    metrics: Output[Metrics],
    checkpoint_dir: str,
    run_id: str,
    gpus: int,
    cpu_procs: int,
    task_type: str,
    loss_type: str,
    train_type: str,
    pooling: str,
    query_instruction: str,
    reranker_instruction: str,
    max_length: int,
    lora_rank: int,
    lora_alpha: int,
    lora_dropout: float,
    lora_target: str,
    deepspeed: str,
    num_train_epochs: float,
    max_steps: int,
    per_device_train_batch_size: int,
    per_device_eval_batch_size: int,
    gradient_accumulation_steps: int,
    learning_rate: float,
    warmup_ratio: float,
    seed: int,
    group_by_length: bool,
    gradient_checkpointing: bool,
    infonce_temperature: float,
    infonce_use_batch: bool,
    infonce_hard_negatives: int,
    infonce_mask_fake_negative: bool,
    trust_remote_code: bool,
):
    """Fine-tune `model` on the train rows; the step launches one torchrun process per GPU.

    Args:
        model: Base model: a folder in the container or a Hugging Face hub id.
        train_data: Canonical train rows from split.
        eval_data: Canonical eval rows from split, evaluated before the first step and at the end of
            training: eval loss and evaluate's metrics for the data's shape.
        output_dir: The trained model folder (a LoRA adapter when train_type is lora).
        metrics: Final train/eval loss, eval_<metric> values and throughput.
        checkpoint_dir: Folder on a persistent volume for checkpoints (the pipeline mounts
            `cluster.CHECKPOINT_PVC` there); this run's checkpoint-N folders go in its `run_id` subfolder,
            so a retried or preempted pod resumes from the latest one. Empty: checkpoints stay in output_dir,
            which is local to the pod, so a restarted pod starts from zero.
        run_id: Pipeline run id: names this run's subfolder of checkpoint_dir (the same on every retry).
        gpus: GPUs this task got; training runs one process per GPU (nproc = gpus).
        cpu_procs: Processes to run when gpus is 0 (CPU, gloo); nproc = cpu_procs.
        task_type: embedding | reranker.
        loss_type: embedding: infonce | cosine_similarity | contrastive | online_contrastive;
            reranker: pointwise_reranker | listwise_reranker.
        train_type: full | lora.
        pooling: auto | last | mean | cls.
        query_instruction: Embedding: prefix put before every query; stored with the model.
        reranker_instruction: Reranker: the <Instruct> text of the Qwen3-Reranker prompt.
        max_length: Tokens per text; longer texts are truncated.
        lora_rank: LoRA rank r.
        lora_alpha: LoRA alpha (scaling = alpha / rank).
        lora_dropout: LoRA dropout.
        lora_target: Modules LoRA wraps: all-linear or comma-separated module names.
        deepspeed: zero3 | zero2 | none.
        num_train_epochs: Epochs over the train data.
        max_steps: > 0 overrides num_train_epochs.
        per_device_train_batch_size: Rows per process per step.
        per_device_eval_batch_size: Rows per process per eval step.
        gradient_accumulation_steps: Micro-batches per optimizer step.
        learning_rate: Peak learning rate.
        warmup_ratio: Fraction of steps spent warming the learning rate up.
        seed: Seed for init, shuffling and dropout.
        group_by_length: Batches of rows of similar length (less padding, faster); false: plain random batches.
        gradient_checkpointing: Recompute activations in backward to save memory.
        infonce_temperature: infonce: logits = cos / temperature.
        infonce_use_batch: infonce: also score every other document of the global batch.
        infonce_hard_negatives: infonce: > 0 uses exactly N negatives per row; 0 uses all.
        infonce_mask_fake_negative: infonce: mask negatives scoring > positive + 0.1.
        trust_remote_code: Allow the model's own Python code from the hub.
    """
    import os

    from embedtune.config import TrainConfig
    from embedtune.steps.train import run

    result = run(
        TrainConfig(
            model=model,
            train_data=train_data.path,
            eval_data=eval_data.path,
            output_dir=output_dir.path,
            checkpoint_dir=os.path.join(checkpoint_dir, run_id) if checkpoint_dir else "",
            nproc=gpus if gpus > 0 else cpu_procs,
            task_type=task_type,
            loss_type=loss_type,
            train_type=train_type,
            pooling=pooling,
            query_instruction=query_instruction,
            reranker_instruction=reranker_instruction,
            max_length=max_length,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            lora_target=lora_target,
            deepspeed=deepspeed,
            num_train_epochs=num_train_epochs,
            max_steps=max_steps,
            per_device_train_batch_size=per_device_train_batch_size,
            per_device_eval_batch_size=per_device_eval_batch_size,
            gradient_accumulation_steps=gradient_accumulation_steps,
            learning_rate=learning_rate,
            warmup_ratio=warmup_ratio,
            seed=seed,
            group_by_length=group_by_length,
            gradient_checkpointing=gradient_checkpointing,
            infonce_temperature=infonce_temperature,
            infonce_use_batch=infonce_use_batch,
            infonce_hard_negatives=infonce_hard_negatives,
            infonce_mask_fake_negative=infonce_mask_fake_negative,
            trust_remote_code=trust_remote_code,
        )
    )
    for key, value in result.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.log_metric(key, value)
    for key, value in (result.get("eval_metrics") or {}).items():
        metrics.log_metric(f"eval_{key}", value)
