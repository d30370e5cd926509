"""The embedtune DAG: convert -> split -> mine -> score -> train -> [merge weights] -> evaluate vs base -> [good enough: merge if LoRA -> register].

One pipeline serves embedders and rerankers (`task_type`), like `swift sft --task_type embedding|reranker`:
the DAG is the same, so is every step; the knobs of the other task type are simply not read by train (infonce
knobs for a reranker). One compiled file to upload, schedule and keep fresh, and presets that are plain maps of
parameter names to values.

Parameters are the step config fields of the same name (one name end to end), plus the cluster and gating
knobs in `PIPELINE_ONLY`. Their defaults are read from the dataclasses when this module is imported (compile
time), so a default lives once, on the dataclass; their descriptions (what the Kubeflow run form shows) are
the fields' help comments, generated into the docstring (`components.describe`). Each step takes the
pipeline parameters its component names (`knobs`), so a knob added to a component and to the signature is
wired with no third copy. Every config field that is not a parameter is in `NOT_IN_PIPELINE`, with the reason
(a test keeps the two complete). Exception to "defaults from the dataclass": the infonce and reranker-token
knobs default to None on `TrainConfig` (None means "ms-swift's environment variable, else the built-in
value"); a pod has no such variables, so the pipeline passes the built-in values explicitly (`ENV_DEFAULTS`:
temperature 0.01, use_batch true, hard_negatives 0 = all, mask_fake_negative false, tokens yes / no).

mine always runs, between split and train, on the train rows only: with `mine_hard_negatives` true it adds
hard negatives mined with the base model (`embedtune mine`), else it copies the rows unchanged
(`MineConfig.passthrough`). Why not `dsl.If` around it: train would then need `dsl.OneOf` to take the mined
or the original rows, and kfp.local (`make demo`, the DAG tests) cannot run `dsl.OneOf` over artifacts. The
cost of the pass-through is a pod that copies a file (on CPU unless `mine_gpus` is set). score, between mine
and train, is the same kind of step: with a `teacher_model` it writes each row's teacher_scores (what the
distillation losses train on: `loss_type` distill_kl / margin_mse), else it copies the rows.

Multi-node training (`nodes` > 1) is no branch of this DAG: the one train task submits a Kubeflow Trainer
TrainJob running the same `embedtune train` command on `nodes` pods and waits for it (`embedtune.trainjob`),
so evaluate, merge and register take its output as they do for one node, and kfp.local runs the same DAG.
A second train task under `dsl.If` would need `dsl.OneOf` to hand its model on (see below); and the launcher
is Kubernetes client code, which belongs in the library, not in a component (`pipelines/cluster.py` says what
the nodes get).

Gates (`dsl.If`): nothing is registered unless the tuned model's primary metric is at least
`min_primary_metric`; then merge runs only for `train_type == "lora"` (a full model needs no merging) and
register takes the merged or the trained folder. Promotion to the `champion` alias is decided by register
itself (`min_improvement` over the current champion).

evaluate runs once, on train's output (with `merge_method` none): for LoRA that is the adapter, loaded on its
base model, and merge proves the merged model gives the same outputs (within `tolerance`, or it fails), so the
registered model is the evaluated one. A bad model is never merged. With `merge_method` linear or slerp the
DAG takes its other branch (`dsl.If` on the parameter, so each branch holds its own evaluate and register,
no `dsl.OneOf`, which kfp.local cannot run over artifacts): merge folds LoRA and merges the weights with the
base first, and evaluate, the gate and register see that merged model.
"""

import contextlib
import dataclasses
import inspect
from pathlib import Path

import yaml
from kfp import dsl

from components import COMPONENTS, convert, deploy, evaluate, merge, mine, register, score, split, train
from components.describe import documented
from embedtune.config import ENV_DEFAULTS, STEP_CONFIGS, TrainConfig, field_help
from images.refs import SERVE_IMAGE, STEP_IMAGES
from pipelines import cluster

PRESETS_DIR = Path(__file__).parent / "presets"

# Parameters that are no step's config field: the registration gate and where the steps run.
PIPELINE_ONLY = {
    "min_primary_metric": "Register only when the tuned model's primary metric is >= this (evaluate's "
    "primary_metric on the eval split).",
    "gpus": "GPUs for train (one process per GPU); 0 trains on CPU with cpu_procs processes.",
    "eval_gpus": "GPUs for evaluate (it runs one process).",
    "cpu_procs": "Training processes when gpus is 0 (CPU, gloo; DeepSpeed needs 2 or more).",
    "mine_hard_negatives": "Mine hard negatives for the train split with the base model before training (the "
    "mine step; its knobs: corpus, num_negatives, range_min, range_max, relative_margin, max_score, sampling, "
    "keep_original_negatives); false: train on split's rows as they are. Set mine_gpus too.",
    "mine_gpus": "GPUs for mine (the corpus is encoded in shards, one process per GPU); 0: one CPU process. "
    "Only worth it with mine_hard_negatives: otherwise mine only copies the rows.",
    "score_gpus": "GPUs for score (one process per GPU); 0: one CPU process. Only worth it with a teacher_model: "
    "otherwise score only copies the rows.",
    "deploy_model": "After register, serve this run's model with `embedtune serve` as a KServe InferenceService "
    "when it became the champion (the deploy step; its knobs: service_name, namespace, canary_traffic_percent, "
    "serve_gpus, min_replicas, max_replicas, ready_timeout_s, mlflow_secret, api_key_secret and the serve knobs "
    "max_batch_tokens, max_wait_ms, max_input_tokens, truncate, max_inputs). Needs a tracking_uri the predictor "
    "pods reach and the Role in pipelines/rbac/deploy.yaml.",
}
# Every config field that is not a pipeline parameter, and why (`test_every_config_field_is_a_parameter_or_
# excluded_with_a_reason` keeps this complete). Keys are `<step>.<field>`.
NOT_IN_PIPELINE = {
    "convert.output": "an artifact: convert's canonical rows, passed to split",
    "split.dataset": "an artifact: convert's output",
    "split.train_data": "an artifact: split's train rows, passed to train",
    "split.eval_data": "an artifact: split's eval rows, passed to train, evaluate and merge",
    "mine.dataset": "an artifact: split's train rows",
    "mine.output": "an artifact: the train rows with mined negatives (or unchanged), passed to train",
    "mine.nproc": "derived: mine_gpus (one process per GPU), or 1 when mine_gpus is 0",
    "mine.passthrough": "derived: not mine_hard_negatives",
    "score.dataset": "an artifact: mine's output (and, in a second task, split's eval rows)",
    "score.output": "an artifact: the train rows with teacher_scores (or unchanged), passed to train",
    "score.nproc": "derived: score_gpus (one process per GPU), or 1 when score_gpus is 0",
    "score.passthrough": "derived: teacher_model is empty",
    "train.train_data": "an artifact: score's output (split's train rows, with mined negatives and teacher "
    "scores when asked)",
    "train.eval_data": "an artifact: split's eval rows, through score (with teacher_scores when asked)",
    "train.output_dir": "an artifact: the trained model, passed to evaluate and merge / register",
    "train.checkpoint_dir": "a compile-time hook (cluster.CHECKPOINT_PVC): a volume cannot be mounted from a "
    "run-time value; the component adds the run id",
    "train.nproc": "derived: gpus (one process per GPU), or cpu_procs when gpus is 0",
    "train.shared_dir": "a compile-time hook (cluster.SHARED_PVC, a ReadWriteMany claim): where the nodes of a "
    "multi-node job meet",
    "train.run_id": "the pipeline run id (names the TrainJob and the checkpoints' folder), filled in by Kubeflow",
    "evaluate.model": "an artifact: train's output",
    "evaluate.eval_data": "an artifact: split's eval rows",
    "evaluate.output": "an artifact: the metrics JSON, passed to register",
    "evaluate.report": "an artifact: the Markdown report the UI renders",
    "evaluate.baseline_model": "the pipeline's `model` parameter: the base model is always the baseline",
    "merge.adapter": "an artifact: train's output (LoRA adapter)",
    "merge.eval_data": "an artifact: split's eval rows",
    "merge.output": "an artifact: the merged model, passed to register",
    "register.model": "an artifact: the merged (LoRA) or trained (full) model",
    "register.metrics": "an artifact: evaluate's metrics JSON",
    "register.dataset_stats": "an artifact: convert's stats JSON (its fingerprint)",
    "register.run_id": "the pipeline run id (idempotency key), filled in by Kubeflow",
    "register.image": "the images the steps ran in, from images.refs at compile time",
    "deploy.serve_image": "the GPU image (images.refs.SERVE_IMAGE) at compile time, like every step's image",
    "deploy.run_id": "the pipeline run id (which version this run registered), filled in by Kubeflow",
}


def default(name: str):
    """A parameter's default: the dataclass default of the first step config that has the field (train
    first), or for env-var knobs the built-in value they resolve to when the env var is unset."""
    if name in ENV_DEFAULTS:
        return ENV_DEFAULTS[name][2]
    for cls in (TrainConfig, *STEP_CONFIGS.values()):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if name in fields:
            return fields[name].default
    raise KeyError(name)


def parameter_help() -> dict[str, str]:
    """Parameter name -> its description: the config field's help (train's first), with the steps that
    read it when more than one does, or the text in PIPELINE_ONLY."""
    readers: dict[str, list[str]] = {}
    for step, component in COMPONENTS.items():
        for name, spec in component.component_spec.inputs.items():
            if not spec.type.startswith("system."):  # an artifact of that name is no parameter
                readers.setdefault(name, []).append(step)
    helps = {}
    for cls in reversed([TrainConfig, *STEP_CONFIGS.values()]):
        helps.update(field_help(cls))
    for name in ENV_DEFAULTS:  # the pipeline passes these explicitly: a pod's env vars play no part
        helps[name] = helps[name].split("; default: env")[0]
    for name, steps in readers.items():
        if name in helps and len(steps) > 1:
            helps[name] = f"{helps[name]} (read by {', '.join(steps)})"
    return {**helps, **PIPELINE_ONLY}


def knobs(component, params: dict, **given) -> dict:
    """The arguments of one step: the pipeline parameters its component names, plus `given` (artifacts and
    derived values, which win over a parameter of the same name)."""
    names = component.component_spec.inputs
    return {**{k: v for k, v in params.items() if k in names and k not in given}, **given}


@dsl.pipeline(
    name="embedtune",
    description="Fine-tune an embedding model or reranker: convert -> split -> [mine hard negatives] -> [score with a "
    "teacher] -> train "
    "(DeepSpeed ZeRO-3, full or "
    "LoRA) -> evaluate vs base -> if the primary metric is good enough: merge LoRA -> register to MLflow "
    "(champion alias behind a gate).",
)
@documented(parameter_help())
def embedtune_pipeline(
    source: str,
    model: str,
    name: str,
    task_type: str = default("task_type"),
    loss_type: str = default("loss_type"),
    train_type: str = default("train_type"),
    format: str = default("format"),
    hf_split: str = default("hf_split"),
    score_scale: float = default("score_scale"),
    sts_positive_threshold: float = default("sts_positive_threshold"),
    on_error: str = default("on_error"),
    max_errors: int = default("max_errors"),
    image_root: str = default("image_root"),
    max_image_pixels: int = default("max_image_pixels"),
    split_dataset_ratio: float = default("split_dataset_ratio"),
    seed: int = default("seed"),
    exclude_data: str = default("exclude_data"),
    drop_eval_overlap: bool = default("drop_eval_overlap"),
    mine_hard_negatives: bool = False,
    corpus: str = default("corpus"),
    num_negatives: int = default("num_negatives"),
    range_min: int = default("range_min"),
    range_max: int = default("range_max"),
    relative_margin: float = default("relative_margin"),
    max_score: float = default("max_score"),
    sampling: str = default("sampling"),
    keep_original_negatives: bool = default("keep_original_negatives"),
    teacher_model: str = default("teacher_model"),
    teacher_task_type: str = default("teacher_task_type"),
    score_batch_tokens: int = default("score_batch_tokens"),
    score_chunk_rows: int = default("score_chunk_rows"),
    pooling: str = default("pooling"),
    query_instruction: str = default("query_instruction"),
    reranker_head: str = default("reranker_head"),
    reranker_instruction: str = default("reranker_instruction"),
    max_length: int = default("max_length"),
    lora_rank: int = default("lora_rank"),
    lora_alpha: int = default("lora_alpha"),
    lora_dropout: float = default("lora_dropout"),
    lora_target: str = default("lora_target"),
    use_dora: bool = default("use_dora"),
    freeze_vision: bool = default("freeze_vision"),
    min_pixels: int = default("min_pixels"),
    max_pixels: int = default("max_pixels"),
    deepspeed: str = default("deepspeed"),
    num_train_epochs: float = default("num_train_epochs"),
    max_steps: int = default("max_steps"),
    per_device_train_batch_size: int = default("per_device_train_batch_size"),
    per_device_eval_batch_size: int = default("per_device_eval_batch_size"),
    gradient_accumulation_steps: int = default("gradient_accumulation_steps"),
    gradient_cache_chunk_size: int = default("gradient_cache_chunk_size"),
    gradient_cache_chunk_tokens: int = default("gradient_cache_chunk_tokens"),
    learning_rate: float = default("learning_rate"),
    weight_decay: float = default("weight_decay"),
    warmup_ratio: float = default("warmup_ratio"),
    lr_scheduler_type: str = default("lr_scheduler_type"),
    group_by_length: bool = default("group_by_length"),
    batch_sampling: str = default("batch_sampling"),
    source_instructions: str = default("source_instructions"),
    source_in_batch_negatives: str = default("source_in_batch_negatives"),
    gradient_checkpointing: bool = default("gradient_checkpointing"),
    logging_steps: int = default("logging_steps"),
    eval_steps: int = default("eval_steps"),
    save_steps: int = default("save_steps"),
    save_total_limit: int = default("save_total_limit"),
    keep_checkpoint_weights: int = default("keep_checkpoint_weights"),
    margin: float = default("margin"),
    infonce_temperature: float = default("infonce_temperature"),
    infonce_use_batch: bool = default("infonce_use_batch"),
    infonce_hard_negatives: int = default("infonce_hard_negatives"),
    infonce_mask_fake_negative: bool = default("infonce_mask_fake_negative"),
    infonce_include_qq: bool = default("infonce_include_qq"),
    infonce_include_dd: bool = default("infonce_include_dd"),
    infonce_hardness_strength: float = default("infonce_hardness_strength"),
    cosent_scale: float = default("cosent_scale"),
    distill_student_temperature: float = default("distill_student_temperature"),
    distill_teacher_temperature: float = default("distill_teacher_temperature"),
    distill_infonce_weight: float = default("distill_infonce_weight"),
    positive_token: str = default("positive_token"),
    negative_token: str = default("negative_token"),
    listwise_temperature: float = default("listwise_temperature"),
    listwise_min_group_size: int = default("listwise_min_group_size"),
    trust_remote_code: bool = default("trust_remote_code"),
    dataloader_num_workers: int = default("dataloader_num_workers"),
    matryoshka_dims: str = default("matryoshka_dims"),
    guard_data: str = default("guard_data"),
    max_guard_drop: float = default("max_guard_drop"),
    matryoshka_weights: str = default("matryoshka_weights"),
    dtype: str = default("dtype"),
    optim: str = default("optim"),
    torch_compile: str = default("torch_compile"),
    length_buckets: int = default("length_buckets"),
    use_liger_kernel: str = default("use_liger_kernel"),
    padding_free: str = default("padding_free"),
    pad_to_multiple_of: int = default("pad_to_multiple_of"),
    nodes: int = default("nodes"),
    primary_metric: str = default("primary_metric"),
    tolerance: float = default("tolerance"),
    export_classifier: bool = default("export_classifier"),
    merge_method: str = default("merge_method"),
    merge_weight: float = default("merge_weight"),
    merge_with: str = default("merge_with"),
    min_primary_metric: float = 0.0,
    min_improvement: float = default("min_improvement"),
    experiment_name: str = default("experiment_name"),
    tracking_uri: str = default("tracking_uri"),
    gpus: int = 1,
    eval_gpus: int = 1,
    cpu_procs: int = 2,
    accelerator_type: str = default("accelerator_type"),
    mine_gpus: int = 0,
    score_gpus: int = 0,
    deploy_model: bool = False,
    service_name: str = default("service_name"),
    namespace: str = default("namespace"),
    canary_traffic_percent: int = default("canary_traffic_percent"),
    serve_gpus: int = default("serve_gpus"),
    min_replicas: int = default("min_replicas"),
    max_replicas: int = default("max_replicas"),
    ready_timeout_s: int = default("ready_timeout_s"),
    mlflow_secret: str = default("mlflow_secret"),
    api_key_secret: str = default("api_key_secret"),
    max_batch_tokens: int = default("max_batch_tokens"),
    max_wait_ms: float = default("max_wait_ms"),
    max_input_tokens: int = default("max_input_tokens"),
    truncate: bool = default("truncate"),
    max_inputs: int = default("max_inputs"),
):
    """Fine-tune, evaluate and register one model."""
    params = dict(locals())  # every parameter by name: each step takes those its component names

    conv = convert(**knobs(convert, params))
    cluster.configure(conv, "convert")

    spl = split(**knobs(split, params, dataset=conv.outputs["output"]))
    cluster.configure(spl, "split")

    # Always runs (a pass-through when mine_hard_negatives is false): see the module docstring.
    mn = mine(**knobs(mine, params, dataset=spl.outputs["train_data"]))
    cluster.configure(mn, "mine", accelerator_type=accelerator_type, accelerators=mine_gpus)

    # Always run too (pass-throughs when teacher_model is empty), for the same reason. The eval rows are
    # scored as well: a distillation loss's eval loss needs their teacher scores (evaluate does not).
    sc = score(**knobs(score, params, dataset=mn.outputs["output"]))
    cluster.configure(sc, "score", accelerator_type=accelerator_type, accelerators=score_gpus)
    sc_eval = score(**knobs(score, params, dataset=spl.outputs["eval_data"])).set_display_name("score-eval")
    cluster.configure(sc_eval, "score", accelerator_type=accelerator_type, accelerators=score_gpus)

    trn = train(
        **knobs(
            train,
            params,
            train_data=sc.outputs["output"],
            eval_data=sc_eval.outputs["output"],
            checkpoint_dir=cluster.checkpoint_dir(),  # "" unless cluster.CHECKPOINT_PVC is set
            shared_dir=cluster.shared_dir(),  # "" unless cluster.SHARED_PVC is set (nodes > 1 needs it)
            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,  # the same on every retry of the task: its checkpoints' folder
        )
    )
    cluster.configure(trn, "train", accelerator_type=accelerator_type, accelerators=gpus)

    def _evaluate_and_register(tuned, fold_lora: bool):
        # evaluate the model, gate on its primary metric, [fold LoRA,] register. For LoRA without a weight merge
        # `tuned` is the adapter, which evaluate loads on its base model; merge then proves the merged weights
        # give the same outputs (max abs difference <= tolerance, or it fails), so the registered model is the
        # evaluated one.
        ev = evaluate(
            **knobs(evaluate, params, model=tuned, eval_data=spl.outputs["eval_data"], baseline_model=model)
        )
        cluster.configure(ev, "evaluate", accelerator_type=accelerator_type, accelerators=eval_gpus)
        with dsl.If(ev.outputs["Output"] >= min_primary_metric, name="good-enough"):
            if not fold_lora:  # already full weights (the weight merge folded LoRA first)
                _register(tuned, ev)
                return
            with dsl.If(train_type == "lora", name="lora"):
                mrg = merge(**knobs(merge, params, adapter=tuned, eval_data=spl.outputs["eval_data"]))
                cluster.configure(mrg, "merge")
                _register(mrg.outputs["output"], ev)
            with dsl.Else(name="full"):
                _register(tuned, ev)

    def _register(tuned, ev):
        reg = register(
            **knobs(
                register,
                params,
                model=tuned,
                metrics=ev.outputs["output"],
                dataset_stats=conv.outputs["dataset_stats"],
                run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                image=f"{STEP_IMAGES['train']},{STEP_IMAGES['register']}",
            )
        )
        cluster.configure(reg, "register")
        with dsl.If(deploy_model == True, name="deploy-model"):  # noqa: E712 (a pipeline channel, not a bool)
            dep = deploy(
                **knobs(deploy, params, serve_image=SERVE_IMAGE, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
            ).after(reg)
            cluster.configure(dep, "deploy")

    with dsl.If(merge_method == "none", name="unmerged"):
        _evaluate_and_register(trn.outputs["output_dir"], fold_lora=True)
    with dsl.Else(name="weights-merged"):  # merged with the base before evaluate: the gate judges the merge
        wm = merge(
            **knobs(merge, params, adapter=trn.outputs["output_dir"], eval_data=spl.outputs["eval_data"])
        ).set_display_name("merge-weights")
        cluster.configure(wm, "merge")
        _evaluate_and_register(wm.outputs["output"], fold_lora=False)


# Every pipeline `make compile-pipeline` writes, by file stem under pipelines/compiled/.
PIPELINES = {"embedtune": embedtune_pipeline}


def pipeline_parameters(pipeline=embedtune_pipeline) -> dict[str, object]:
    """Parameter name -> default (`inspect.Parameter.empty`-free: required ones map to None)."""
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


def parse_params(pairs: list[str]) -> dict:
    """`["k=v", ...]` -> `{k: v}`, values parsed as YAML scalars (`0.5` -> float, `true` -> bool)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--param {pair!r}: expected key=value")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    return out


def coerce_arguments(values: dict, pipeline=embedtune_pipeline, where: str = "arguments") -> dict:
    """Check names against the pipeline's parameters and types against their annotations.

    YAML reads `num_train_epochs: 1` as an int; KFP rejects an int for a float parameter, so whole numbers
    are widened. Anything else of the wrong type is an error naming the key.
    """
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
