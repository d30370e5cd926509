"""convert: any supported source -> canonical rows (`query, response, rejected_response, label`)."""

from kfp import dsl
from kfp.dsl import Dataset, Metrics, Output

from components.describe import documented
from embedtune.config import ConvertConfig, field_help
from images.refs import STEP_IMAGES


@dsl.component(base_image=STEP_IMAGES["convert"], install_kfp_package=False)
@documented(
    field_help(ConvertConfig),
    output="Canonical JSONL rows.",
    dataset_stats="Row counts and the content fingerprint (register tags the model with it).",
    metrics="Row counts, shown in the run's UI.",
)
def convert(
    source: str,
    output: Output[Dataset],
    dataset_stats: Output[Dataset],
    metrics: Output[Metrics],
    format: str,
    hf_split: str,
    score_scale: float,
    sts_positive_threshold: float,
    loss_type: str,
    on_error: str,
    max_errors: int,
    image_root: str,
    max_image_pixels: int,
):
    """Convert a dataset to canonical ms-swift rows and record its statistics."""
    inputs = dict(locals())
    import shutil

    from embedtune.config import ConvertConfig, config_from
    from embedtune.report import scalars
    from embedtune.steps.convert import run

    result = run(config_from(ConvertConfig, inputs))
    # The step writes its stats beside `output`; only the artifact's own path is uploaded, so copy it out.
    shutil.copyfile(output.path + ".stats.json", dataset_stats.path)
    for key, value in scalars(result).items():
        metrics.log_metric(key, value)
