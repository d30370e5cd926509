"""register: log the model to MLflow, register a version, promote it to champion behind a gate."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.describe import documented
from embedtune.config import RegisterConfig, field_help
from images.refs import STEP_IMAGES


@dsl.component(base_image=STEP_IMAGES["register"], install_kfp_package=False)
@documented(
    field_help(RegisterConfig),
    model="Model folder to register (merged or full).",
    metrics="Metrics JSON from evaluate.",
    dataset_stats="Stats JSON from convert; its fingerprint becomes a lineage tag.",
    registration="The registered version and whether it was promoted (1) or not (0).",
)
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
    """
    inputs = dict(locals())
    from embedtune.config import RegisterConfig, config_from
    from embedtune.report import scalars
    from embedtune.steps.register import run

    result = run(config_from(RegisterConfig, inputs))
    for key, value in scalars(result).items():
        registration.log_metric(key, value)
    for key in ("promoted", "created"):  # booleans, as 1 / 0
        registration.log_metric(key, float(result[key]))
    registration.log_metric("version", float(result["version"]))
    return str(result["model_uri"])
