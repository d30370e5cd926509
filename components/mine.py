"""mine: hard negatives for the train rows, mined from a corpus with the base model (or the rows unchanged)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Output

from components.describe import documented
from embedtune.config import MineConfig, field_help
from images.refs import STEP_IMAGES


@dsl.component(base_image=STEP_IMAGES["mine"], install_kfp_package=False)
@documented(
    field_help(MineConfig),
    dataset="Canonical train rows from split.",
    output="The train rows with mined rejected_response (or the rows unchanged when mine_hard_negatives is "
    "false), passed to train.",
    mine_stats="Mining statistics: rows, queries, candidates dropped as likely false negatives, score "
    "percentiles of positives and kept negatives, seconds.",
    metrics="The statistics' counts, shown in the run's UI.",
    mine_hard_negatives="Mine hard negatives for the train rows with the base model; false: the rows pass "
    "through unchanged (the step always runs, so train has one input in both cases).",
    mine_gpus="GPUs this task got; the corpus is encoded in shards, one process per GPU (0: one CPU process).",
)
def mine(
    dataset: Input[Dataset],
    model: str,
    output: Output[Dataset],
    mine_stats: Output[Dataset],
    metrics: Output[Metrics],
    mine_hard_negatives: bool,
    mine_gpus: int,
    corpus: str,
    num_negatives: int,
    range_min: int,
    range_max: int,
    relative_margin: float,
    max_score: float,
    sampling: str,
    keep_original_negatives: bool,
    seed: int,
    pooling: str,
    query_instruction: str,
    max_length: int,
    dtype: str,
    per_device_eval_batch_size: int,
    trust_remote_code: bool,
):
    """Add mined hard negatives to the train rows, or pass them through unchanged."""
    inputs = dict(locals())
    import shutil

    from embedtune.config import MineConfig, config_from
    from embedtune.report import scalars
    from embedtune.steps.mine import run

    result = run(
        config_from(
            MineConfig, inputs, passthrough=not mine_hard_negatives, nproc=mine_gpus if mine_gpus > 0 else 1
        )
    )
    # The step writes its stats beside `output`; only the artifact's own path is uploaded, so copy it out.
    shutil.copyfile(output.path + ".stats.json", mine_stats.path)
    for key, value in scalars(result).items():
        metrics.log_metric(key, value)
