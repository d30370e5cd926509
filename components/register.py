"""register: log the model to MLflow, register a version, promote it to champion behind a gate."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from images.refs import STEP_IMAGES


@dsl.component(base_image=STEP_IMAGES["register"], install_kfp_package=False)
def register(
    model: Input[Model],
    metrics: Input[Metrics],
    dataset_stats: Input[Dataset],
    registration: Output[Metrics],
    name: str,
    tracking_uri: str,
    run_id: str,
    experiment_name: str,
    min_improvement: float,
    image: str,
) -> str:
    """Register the model in MLflow and return its URI; promotion to `champion` is the step's own gate.

    MLflow credentials come from the environment (the pipeline maps a Kubernetes secret onto
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD / MLFLOW_TRACKING_TOKEN).

    Args:
        model: Model folder to register (merged or full).
        metrics: Metrics JSON from evaluate.
        dataset_stats: Stats JSON from convert; its fingerprint becomes a lineage tag.
        registration: The registered version and whether it was promoted (1) or not (0).
        name: Registered model name in MLflow.
        tracking_uri: MLflow tracking URI; empty uses env MLFLOW_TRACKING_URI.
        run_id: Pipeline run id, for lineage and idempotency (a retried task creates no second version).
        experiment_name: MLflow experiment of the registration run.
        min_improvement: Promote to champion only when the primary metric beats the champion's by more.
        image: Container image the steps ran in (lineage tag).
    """
    from embedtune.config import RegisterConfig
    from embedtune.steps.register import run

    result = run(
        RegisterConfig(
            model=model.path,
            metrics=metrics.path,
            dataset_stats=dataset_stats.path,
            name=name,
            tracking_uri=tracking_uri,
            run_id=run_id,
            experiment_name=experiment_name,
            min_improvement=min_improvement,
            image=image,
        )
    )
    for key, value in result.items():
        if isinstance(value, (int, float)):  # bools too: promoted -> 1.0 / 0.0
            registration.log_metric(key, float(value))
    registration.log_metric("version", float(result["version"]))
    return str(result["model_uri"])
