"""merge: fold a LoRA adapter into its base weights (runs only for train_type lora)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from images.refs import STEP_IMAGES


@dsl.component(base_image=STEP_IMAGES["merge"], install_kfp_package=False)
def merge(
    adapter: Input[Model],
    eval_data: Input[Dataset],
    output: Output[Model],
    metrics: Output[Metrics],
    tolerance: float,
):
    """Merge the adapter into a standalone model and check it matches the adapter model's outputs.

    Args:
        adapter: LoRA model folder written by train.
        eval_data: Canonical eval rows; the first ones join the built-in sample inputs of the check.
        output: Merged model folder (loads without PEFT).
        metrics: The measured max difference between merged and adapter outputs.
        tolerance: Max abs difference allowed between merged and adapter outputs (fp32).
    """
    from embedtune.config import MergeConfig
    from embedtune.steps.merge import run

    result = run(
        MergeConfig(adapter=adapter.path, eval_data=eval_data.path, output=output.path, tolerance=tolerance)
    )
    for key, value in result.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.log_metric(key, value)
