"""split: canonical rows -> train / eval files, grouped by query."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Output

from images.refs import STEP_IMAGES


@dsl.component(base_image=STEP_IMAGES["split"], install_kfp_package=False)
def split(
    dataset: Input[Dataset],
    train_data: Output[Dataset],
    eval_data: Output[Dataset],
    metrics: Output[Metrics],
    split_dataset_ratio: float,
    seed: int,
):
    """Split rows into train and eval so that no query text is in both.

    Args:
        dataset: Canonical JSONL rows from convert.
        train_data: Train rows.
        eval_data: Eval rows.
        metrics: Row and query counts of each side.
        split_dataset_ratio: Fraction of distinct queries that go to eval, in (0, 1).
        seed: Seed of the query shuffle; same seed and data give the same split.
    """
    from embedtune.config import SplitConfig
    from embedtune.steps.split import run

    result = run(
        SplitConfig(
            dataset=dataset.path,
            train_data=train_data.path,
            eval_data=eval_data.path,
            split_dataset_ratio=split_dataset_ratio,
            seed=seed,
        )
    )
    for key, value in result.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.log_metric(key, value)
