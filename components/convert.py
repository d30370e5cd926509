"""convert: any supported source -> canonical rows (`query, response, rejected_response, label`)."""

from kfp import dsl
from kfp.dsl import Dataset, Metrics, Output

from images.refs import STEP_IMAGES


@dsl.component(base_image=STEP_IMAGES["convert"], install_kfp_package=False)
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
):
    """Convert a dataset to canonical ms-swift rows and record its statistics.

    Args:
        source: Local JSONL/JSON/CSV/TSV/Parquet file or folder (as seen from the container), or a Hugging Face
            dataset `name[:subset]`.
        output: Canonical JSONL rows.
        dataset_stats: Row counts and the content fingerprint (register tags the model with it).
        metrics: Row counts, shown in the run's UI.
        format: Input shape: auto | canonical | mteb | sts | pairs.
        hf_split: Split to read when `source` is a Hugging Face dataset.
        score_scale: STS scores are divided by this to get `label` in [0, 1].
        sts_positive_threshold: > 0 keeps only STS pairs with label >= this, as positives.
        loss_type: Loss the data is for; validates the labels.
        on_error: fail (stop, listing the first problems) | skip (keep good rows).
        max_errors: How many problems to list before stopping.
    """
    import shutil

    from embedtune.config import ConvertConfig
    from embedtune.steps.convert import run

    result = run(
        ConvertConfig(
            source=source,
            output=output.path,
            format=format,
            hf_split=hf_split,
            score_scale=score_scale,
            sts_positive_threshold=sts_positive_threshold,
            loss_type=loss_type,
            on_error=on_error,
            max_errors=max_errors,
        )
    )
    # The step writes its stats beside `output`; only the artifact's own path is uploaded, so copy it out.
    shutil.copyfile(output.path + ".stats.json", dataset_stats.path)
    for key, value in result.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.log_metric(key, value)
