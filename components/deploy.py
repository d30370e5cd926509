"""deploy: serve this run's registered model as a KServe InferenceService (only when it is the champion)."""

from kfp import dsl
from kfp.dsl import Metrics, Output

from components.describe import documented
from embedtune.config import DeployConfig, field_help
from images.refs import STEP_IMAGES


@dsl.component(base_image=STEP_IMAGES["deploy"], install_kfp_package=False)
@documented(
    field_help(DeployConfig),
    deployment="Whether the model was deployed (1) or not (0: this run's version is not the champion).",
)
def deploy(
    deployment: Output[Metrics],
    name: str,
    serve_image: str,
    run_id: str,
    tracking_uri: str,
    service_name: str,
    namespace: str,
    canary_traffic_percent: int,
    serve_gpus: int,
    accelerator_type: str,
    min_replicas: int,
    max_replicas: int,
    ready_timeout_s: int,
    mlflow_secret: str,
    api_key_secret: str,
    dtype: str,
    max_batch_tokens: int,
    max_wait_ms: float,
    max_input_tokens: int,
    truncate: bool,
    max_inputs: int,
) -> str:
    """Create or update the InferenceService serving this run's champion with `embedtune serve`; return its URL
    ("" when not deployed)."""
    inputs = dict(locals())
    from embedtune.config import DeployConfig, config_from
    from embedtune.steps.deploy import run

    result = run(config_from(DeployConfig, inputs))
    deployment.log_metric("deployed", float(result["deployed"]))
    if result.get("version") is not None:
        deployment.log_metric("version", float(result["version"]))
    return str(result.get("url", ""))
