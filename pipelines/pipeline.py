"""The embedtune DAG: convert -> split -> train -> evaluate vs base -> [good enough: merge if LoRA -> register].

One pipeline serves embedders and rerankers (`task_type`), like `swift sft --task_type embedding|reranker`:
the DAG is the same, so is every step; the knobs of the other task type are simply not read by train (infonce
knobs for a reranker). One compiled file to upload, schedule and keep fresh, and presets that are plain maps of
parameter names to values.

Parameter defaults are read from the step config dataclasses when this module is imported (compile time), so
a default lives once, on the dataclass. Exceptions, because the pipeline must be reproducible on any cluster:
the infonce knobs default to None on `TrainConfig` (None means "ms-swift's environment variable, else the
built-in value"); a pod has no such variables, so the pipeline passes the built-in values explicitly
(`ENV_DEFAULTS`: temperature 0.01, use_batch true, hard_negatives 0 = all, mask_fake_negative false).

Gates (`dsl.If`): nothing is registered unless the tuned model's primary metric is at least
`min_primary_metric`; then merge runs only for `train_type == "lora"` (a full model needs no merging) and
register takes the merged or the trained folder. Promotion to the `champion` alias is decided by register
itself (`min_improvement` over the current champion).

evaluate runs once, on train's output: for LoRA that is the adapter, loaded on its base model, and merge
proves the merged model gives the same outputs (within `tolerance`, or it fails), so the registered model is
the evaluated one. Two reasons for this shape over "merge, then evaluate whichever model came out":
kfp.local (`make demo`) cannot pick an artifact out of If/Else branches (`dsl.OneOf` over artifacts), and
kfp 2.17's compiler does not pass a pipeline parameter used only in a task's resources (evaluate's
`eval_gpus`) into a condition's sub-DAG. A bad model is also never merged.
"""

import contextlib
import dataclasses
from pathlib import Path

import yaml
from kfp import dsl

from components import convert, evaluate, merge, register, split, train
from embedtune.config import (
    ENV_DEFAULTS,
    ConvertConfig,
    EvaluateConfig,
    MergeConfig,
    RegisterConfig,
    SplitConfig,
    TrainConfig,
)
from images.refs import STEP_IMAGES
from pipelines import cluster

PRESETS_DIR = Path(__file__).parent / "presets"


def default(cls, name: str):
    """The dataclass default of `cls.name`: the one place a knob's default is written."""
    return {f.name: f.default for f in dataclasses.fields(cls)}[name]


def env_default(name: str):
    """The built-in value a None knob resolves to when its ms-swift env var is unset."""
    return ENV_DEFAULTS[name][2]


@dsl.pipeline(
    name="embedtune",
    description="Fine-tune an embedding model or reranker: convert -> split -> train (DeepSpeed ZeRO-3, full or "
    "LoRA) -> merge LoRA -> evaluate vs base -> register to MLflow (champion alias behind a gate).",
)
def embedtune_pipeline(
    source: str,
    model: str,
    name: str,
    task_type: str = default(TrainConfig, "task_type"),
    loss_type: str = default(TrainConfig, "loss_type"),
    train_type: str = default(TrainConfig, "train_type"),
    format: str = default(ConvertConfig, "format"),
    hf_split: str = default(ConvertConfig, "hf_split"),
    score_scale: float = default(ConvertConfig, "score_scale"),
    sts_positive_threshold: float = default(ConvertConfig, "sts_positive_threshold"),
    on_error: str = default(ConvertConfig, "on_error"),
    split_dataset_ratio: float = default(SplitConfig, "split_dataset_ratio"),
    seed: int = default(TrainConfig, "seed"),
    pooling: str = default(TrainConfig, "pooling"),
    query_instruction: str = default(TrainConfig, "query_instruction"),
    reranker_instruction: str = default(TrainConfig, "reranker_instruction"),
    max_length: int = default(TrainConfig, "max_length"),
    lora_rank: int = default(TrainConfig, "lora_rank"),
    lora_alpha: int = default(TrainConfig, "lora_alpha"),
    lora_dropout: float = default(TrainConfig, "lora_dropout"),
    lora_target: str = default(TrainConfig, "lora_target"),
    deepspeed: str = default(TrainConfig, "deepspeed"),
    num_train_epochs: float = default(TrainConfig, "num_train_epochs"),
    max_steps: int = default(TrainConfig, "max_steps"),
    per_device_train_batch_size: int = default(TrainConfig, "per_device_train_batch_size"),
    per_device_eval_batch_size: int = default(TrainConfig, "per_device_eval_batch_size"),
    gradient_accumulation_steps: int = default(TrainConfig, "gradient_accumulation_steps"),
    learning_rate: float = default(TrainConfig, "learning_rate"),
    warmup_ratio: float = default(TrainConfig, "warmup_ratio"),
    group_by_length: bool = default(TrainConfig, "group_by_length"),
    gradient_checkpointing: bool = default(TrainConfig, "gradient_checkpointing"),
    infonce_temperature: float = env_default("infonce_temperature"),
    infonce_use_batch: bool = env_default("infonce_use_batch"),
    infonce_hard_negatives: int = env_default("infonce_hard_negatives"),
    infonce_mask_fake_negative: bool = env_default("infonce_mask_fake_negative"),
    trust_remote_code: bool = default(TrainConfig, "trust_remote_code"),
    primary_metric: str = default(EvaluateConfig, "primary_metric"),
    min_primary_metric: float = 0.0,
    min_improvement: float = default(RegisterConfig, "min_improvement"),
    experiment_name: str = default(RegisterConfig, "experiment_name"),
    tracking_uri: str = default(RegisterConfig, "tracking_uri"),
    gpus: int = 1,
    eval_gpus: int = 1,
    cpu_procs: int = 2,
    accelerator_type: str = "nvidia.com/gpu",
):
    """Fine-tune, evaluate and register one model.

    Args:
        source: Dataset to convert: a path inside the container, or a Hugging Face dataset `name[:subset]`.
        model: Base model: Hugging Face hub id or a path inside the container.
        name: Registered model name in MLflow.
        task_type: embedding | reranker.
        loss_type: embedding: infonce | cosine_similarity | contrastive | online_contrastive; reranker:
            pointwise_reranker | listwise_reranker.
        train_type: full | lora (lora adds the merge step).
        min_primary_metric: Register only when the tuned model's primary metric is >= this.
        gpus: GPUs for train (one process per GPU); 0 trains on CPU with cpu_procs processes.
        eval_gpus: GPUs for evaluate (it runs one process).
        cpu_procs: Training processes when gpus is 0.
        accelerator_type: Kubernetes resource name of the GPUs.
        Every other parameter is the step config field of the same name (`embedtune <step> --help`).
    """
    conv = convert(
        source=source,
        format=format,
        hf_split=hf_split,
        score_scale=score_scale,
        sts_positive_threshold=sts_positive_threshold,
        loss_type=loss_type,
        on_error=on_error,
        max_errors=default(ConvertConfig, "max_errors"),
    )
    cluster.configure(conv, "convert")

    spl = split(dataset=conv.outputs["output"], split_dataset_ratio=split_dataset_ratio, seed=seed)
    cluster.configure(spl, "split")

    trn = train(
        model=model,
        train_data=spl.outputs["train_data"],
        eval_data=spl.outputs["eval_data"],
        checkpoint_dir=cluster.checkpoint_dir(),  # "" unless cluster.CHECKPOINT_PVC is set
        run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,  # the same on every retry of the task: its checkpoints' folder
        gpus=gpus,
        cpu_procs=cpu_procs,
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
    cluster.configure(trn, "train", accelerator_type=accelerator_type, accelerators=gpus)

    # The model as train wrote it: for LoRA the adapter, which evaluate loads on its base model. merge then
    # proves the merged weights give the same outputs (max abs difference <= tolerance, or it fails), so the
    # registered model is the evaluated one.
    ev = evaluate(
        model=trn.outputs["output_dir"],
        eval_data=spl.outputs["eval_data"],
        baseline_model=model,
        primary_metric=primary_metric,
        per_device_eval_batch_size=per_device_eval_batch_size,
        max_length=max_length,
    )
    cluster.configure(ev, "evaluate", accelerator_type=accelerator_type, accelerators=eval_gpus)

    def _register(tuned):
        reg = register(
            model=tuned,
            metrics=ev.outputs["output"],
            dataset_stats=conv.outputs["dataset_stats"],
            name=name,
            tracking_uri=tracking_uri,
            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            experiment_name=experiment_name,
            min_improvement=min_improvement,
            image=f"{STEP_IMAGES['train']},{STEP_IMAGES['register']}",
        )
        cluster.configure(reg, "register")

    with dsl.If(ev.outputs["Output"] >= min_primary_metric, name="good-enough"):
        with dsl.If(train_type == "lora", name="lora"):
            mrg = merge(
                adapter=trn.outputs["output_dir"],
                eval_data=spl.outputs["eval_data"],
                tolerance=default(MergeConfig, "tolerance"),
            )
            cluster.configure(mrg, "merge")
            _register(mrg.outputs["output"])
        with dsl.Else(name="full"):
            _register(trn.outputs["output_dir"])


# Every pipeline `make compile-pipeline` writes, by file stem under pipelines/compiled/.
PIPELINES = {"embedtune": embedtune_pipeline}


def pipeline_parameters(pipeline=embedtune_pipeline) -> dict[str, object]:
    """Parameter name -> default (`inspect.Parameter.empty`-free: required ones map to None)."""
    import inspect

    sig = inspect.signature(pipeline.pipeline_func)
    return {
        n: (None if p.default is inspect.Parameter.empty else p.default) for n, p in sig.parameters.items()
    }


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_preset(preset: str, pipeline=embedtune_pipeline) -> dict:
    """Read `pipelines/presets/<preset>.yaml` (or a YAML path): a map of pipeline parameter names to values.

    Unknown keys are an error naming the file and the key, so a typo never silently falls back to a default.
    """
    path = Path(preset) if preset.endswith((".yaml", ".yml")) else PRESETS_DIR / f"{preset}.yaml"
    if not path.is_file():
        raise ValueError(f"{path}: preset not found (known: {', '.join(preset_names())})")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a preset is a mapping of pipeline parameter names to values")
    return coerce_arguments(values, pipeline, where=str(path))


def coerce_arguments(values: dict, pipeline=embedtune_pipeline, where: str = "arguments") -> dict:
    """Check names against the pipeline's parameters and types against their annotations.

    YAML reads `num_train_epochs: 1` as an int; KFP rejects an int for a float parameter, so whole numbers
    are widened. Anything else of the wrong type is an error naming the key.
    """
    import inspect

    params = inspect.signature(pipeline.pipeline_func).parameters
    out = {}
    for key, value in values.items():
        if key not in params:
            raise ValueError(f"{where}: {key}: not a parameter of pipeline {pipeline.name!r}")
        kind = params[key].annotation
        if kind in (int, float) and isinstance(value, str):  # YAML 1.1 reads `2e-4` as a string
            with contextlib.suppress(ValueError):
                value = kind(value)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif kind is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        elif kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise ValueError(f"{where}: {key}: expected {kind.__name__}, got {value!r}")
        out[key] = value
    return out
