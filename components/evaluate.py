"""evaluate: metrics of the tuned model next to its base model, on the held-out eval rows."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output

from images.refs import STEP_IMAGES


@dsl.component(base_image=STEP_IMAGES["evaluate"], install_kfp_package=False)
def evaluate(
    model: Input[Model],
    eval_data: Input[Dataset],
    output: Output[Metrics],
    report: Output[Markdown],
    baseline_model: str,
    primary_metric: str,
    per_device_eval_batch_size: int,
    max_length: int,
) -> float:
    """Measure the model (and its base) and return the primary metric, which gates registration.

    The metrics JSON is the `output` artifact itself (register reads it); its scalars are also logged on it so
    the UI lists them, and the Markdown report renders in the UI.

    Args:
        model: Model folder from train or merge.
        eval_data: Canonical eval rows from split.
        output: Metrics JSON (`primary_metric`, `primary_value`, `metrics`, `baseline_metrics`, `deltas`, ...); its
            metrics, `base_<metric>` and `delta_<metric>` are logged for the UI.
        report: Markdown table of every metric, tuned vs base.
        baseline_model: Base model measured the same way (adds delta_<metric>); empty to skip.
        primary_metric: Metric used for gating; empty picks it by data shape (spearman_cosine for labels,
            ndcg_at_10 for ranking).
        per_device_eval_batch_size: Texts per forward pass.
        max_length: Tokens per text; 0 uses the value saved with the model.
    """
    from embedtune.config import EvaluateConfig
    from embedtune.steps.evaluate import run

    result = run(
        EvaluateConfig(
            model=model.path,
            eval_data=eval_data.path,
            output=output.path,
            report=report.path,
            baseline_model=baseline_model,
            primary_metric=primary_metric,
            per_device_eval_batch_size=per_device_eval_batch_size,
            max_length=max_length,
        )
    )
    scalars = {
        **result["metrics"],
        **{f"base_{k}": v for k, v in result.get("baseline_metrics", {}).items()},
        **result.get("deltas", {}),
    }
    for key, value in scalars.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            output.log_metric(key, value)
    return float(result["primary_value"])
