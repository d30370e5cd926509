"""split: canonical rows -> train / eval files, grouped by query."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Output

from components.describe import documented
from embedtune.config import SplitConfig, field_help
from images.refs import STEP_IMAGES


@dsl.component(base_image=STEP_IMAGES["split"], install_kfp_package=False)
@documented(
    field_help(SplitConfig),
    dataset="Canonical JSONL rows from convert.",
    train_data="Train rows.",
    eval_data="Eval rows.",
    metrics="Row and query counts of each side, and the train rows the leakage guard dropped.",
)
def split(
    dataset: Input[Dataset],
    train_data: Output[Dataset],
    eval_data: Output[Dataset],
    metrics: Output[Metrics],
    split_dataset_ratio: float,
    seed: int,
    exclude_data: str,
    drop_eval_overlap: bool,
    image_root: str,
):
    """Split rows into train and eval so that no query text is in both."""
    inputs = dict(locals())
    from embedtune.config import SplitConfig, config_from
    from embedtune.report import scalars
    from embedtune.steps.split import run

    result = run(config_from(SplitConfig, inputs))
    for key, value in scalars(result).items():
        metrics.log_metric(key, value)
