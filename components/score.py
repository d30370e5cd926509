"""score: a teacher's score of every (query, document) of the train rows, for distillation (or the rows unchanged)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Output

from components.describe import documented
from embedtune.config import ScoreConfig, field_help
from images.refs import STEP_IMAGES


@dsl.component(base_image=STEP_IMAGES["score"], install_kfp_package=False)
@documented(
    field_help(ScoreConfig),
    dataset="Canonical train rows from mine (with mined negatives when asked).",
    output="The train rows with teacher_scores (or the rows unchanged when teacher_model is empty), passed to "
    "train.",
    score_stats="Scoring statistics: rows, pairs, score percentiles of positives and negatives, seconds.",
    metrics="The statistics' counts, shown in the run's UI.",
    score_gpus="GPUs this task got; one process per GPU, each scoring a share of every chunk (0: one CPU process).",
)
def score(
    dataset: Input[Dataset],
    output: Output[Dataset],
    score_stats: Output[Dataset],
    metrics: Output[Metrics],
    score_gpus: int,
    teacher_model: str,
    teacher_task_type: str,
    max_length: int,
    score_batch_tokens: int,
    score_chunk_rows: int,
    dtype: str,
    trust_remote_code: bool,
):
    """Write teacher_scores into the train rows with teacher_model, or pass them through unchanged."""
    inputs = dict(locals())
    import shutil

    from embedtune.config import ScoreConfig, config_from
    from embedtune.report import scalars
    from embedtune.steps.score import run

    result = run(
        config_from(
            ScoreConfig, inputs, passthrough=not teacher_model, nproc=score_gpus if score_gpus > 0 else 1
        )
    )
    shutil.copyfile(output.path + ".stats.json", score_stats.path)  # only the artifact's own path is uploaded
    for key, value in scalars(result).items():
        metrics.log_metric(key, value)
