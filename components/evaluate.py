"""evaluate: metrics of the tuned model next to its base model, on the held-out eval rows."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output

from components.describe import documented
from embedtune.config import EvaluateConfig, field_help
from images.refs import STEP_IMAGES


@dsl.component(base_image=STEP_IMAGES["evaluate"], install_kfp_package=False)
@documented(
    field_help(EvaluateConfig),
    model="Model folder from train (a LoRA adapter is measured on its base model).",
    eval_data="Canonical eval rows from split.",
    output="Metrics JSON (`primary_metric`, `primary_value`, `metrics`, `baseline_metrics`, `deltas`, ...); its "
    "metrics, `base_<metric>` and `delta_<metric>` are logged for the UI.",
    report="Markdown table of every metric, tuned vs base, with plots.",
    eval_gpus="GPUs this task got (logged with the metrics). An input as well as the task's resources because "
    "evaluate runs inside a condition (merge_method), and kfp.local resolves a parameter there only when a task "
    "takes it as an input.",
)
def evaluate(
    model: Input[Model],
    eval_data: Input[Dataset],
    output: Output[Metrics],
    report: Output[Markdown],
    baseline_model: str,
    primary_metric: str,
    per_device_eval_batch_size: int,
    max_length: int,
    matryoshka_dims: str,
    dtype: str,
    guard_data: str,
    max_guard_drop: float,
    eval_gpus: int,
) -> float:
    """Measure the model (and its base) and return the primary metric, which gates registration.

    The metrics JSON is the `output` artifact itself (register reads it); its scalars are also logged on it so
    the UI lists them, and the Markdown report renders in the UI.
    """
    inputs = dict(locals())
    from embedtune.config import EvaluateConfig, config_from
    from embedtune.steps.evaluate import run

    result = run(config_from(EvaluateConfig, inputs))
    scalars = {
        **result["metrics"],
        **{f"base_{k}": v for k, v in result.get("baseline_metrics", {}).items()},
        **result.get("deltas", {}),
        **{f"guard_{n}_{g['primary_metric']}": g["value"] for n, g in result.get("guards", {}).items()},
        "guard_failures": len(result.get("guard_failures", [])),
        "eval_gpus": eval_gpus,
    }
    for key, value in scalars.items():
        output.log_metric(key, float(value))
    return float(result["primary_value"])
