"""merge: fold a LoRA adapter into its base weights (runs only for train_type lora)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.describe import documented
from embedtune.config import MergeConfig, field_help
from images.refs import STEP_IMAGES


@dsl.component(base_image=STEP_IMAGES["merge"], install_kfp_package=False)
@documented(
    field_help(MergeConfig),
    adapter="LoRA model folder written by train.",
    eval_data="Canonical eval rows; the first ones join the built-in sample inputs of the check.",
    output="Merged model folder (loads without PEFT).",
    metrics="The measured max difference between merged and adapter outputs.",
)
def merge(
    adapter: Input[Model],
    eval_data: Input[Dataset],
    output: Output[Model],
    metrics: Output[Metrics],
    tolerance: float,
    merge_method: str,
    merge_weight: float,
    merge_with: str,
    export_classifier: bool,
):
    """Merge the adapter into a standalone model and check it matches the adapter model's outputs."""
    inputs = dict(locals())
    from embedtune.config import MergeConfig, config_from
    from embedtune.report import scalars
    from embedtune.steps.merge import run

    result = run(config_from(MergeConfig, inputs))
    for key, value in scalars(result).items():
        metrics.log_metric(key, value)
