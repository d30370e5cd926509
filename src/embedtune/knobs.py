"""Every knob's type and range, checked when a step config is built: one table, one check.

`check_config(cfg)` runs in each config's `__post_init__` (config.py), so `embedtune <step> --flags`, a
Kubeflow component and `TrainConfig(...)` in Python refuse a bad value the same way, with one line naming the
knob, before anything is read or loaded. A field is checked against its annotation (an int is not a bool, a
float is finite) and against `RULES[field]` (`RULES["<step>.<field>"]` where a step reads a knob its own way):
a range, choices, or a required non-empty text. Fields that take any text (an instruction, an optional path)
are in `FREE`. Checks between knobs (range_min < range_max, a loss for its task) stay with the step that
knows why. Stdlib only (config.py is imported by the components at compile time, without torch).

Choices a library owns (HF scheduler and optimizer names, the loss table) are named as `"module:ATTR"` and
read when first checked; where that module is not installed (a pipeline compile) the choice is not checked.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import types
import typing
from dataclasses import dataclass

from embedtune.errors import EmbedtuneError

DTYPES = ("auto", "bf16", "autocast", "fp32", "fp16")
SWITCHES = ("auto", "on", "off")
DEEPSPEED = ("auto", "zero3", "zero2", "none")
POOLINGS = ("last", "mean", "cls")
SAMPLINGS = ("top", "random")
FORMATS = ("auto", "canonical", "mteb", "sts", "pairs", "messages")
HEADS = ("auto", "generative", "classifier")
BIG = 1 << 30  # "no real limit": a count past this is a typo (and past what any index can hold)
SEED_MAX = 2**32 - 1  # numpy's and torch's seeds are 32-bit


@dataclass(frozen=True)
class Rule:
    lo: float | None = None  # lowest value allowed (inclusive unless lo_open)
    hi: float | None = None  # highest value allowed (inclusive unless hi_open)
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple | str = ()  # allowed values, or "module:ATTR" (a tuple, dict or Enum) read when first used
    required: bool = False  # text: must not be empty
    or_empty: bool = False  # choices: "" is allowed too (no choice made)


def at_least(lo: float, hi: float = BIG) -> Rule:
    return Rule(lo=lo, hi=hi)


def one_of(*choices) -> Rule:
    return Rule(choices=choices)


REQUIRED = Rule(required=True)
COUNT = at_least(1)  # batch sizes, steps, processes
OPTIONAL_COUNT = at_least(0)  # 0 means "off" or "the model's own"
FRACTION = Rule(lo=0, hi=1, hi_open=True)
POSITIVE = Rule(lo=0, hi=1e6, lo_open=True)
FINITE = Rule()  # any finite number

RULES: dict[str, Rule] = {
    # inputs and outputs every step names
    **dict.fromkeys(
        (
            "source",
            "output",
            "dataset",
            "train_data",
            "model",
            "output_dir",
            "adapter",
            "metrics",
            "name",
            "serve_image",
            "host",
            "accelerator_type",
            "experiment_name",
            "hf_split",
            "lora_target",
        ),
        REQUIRED,
    ),  # fmt: skip
    "split.eval_data": REQUIRED,
    "evaluate.eval_data": REQUIRED,
    # shared knobs: one name, one meaning
    "seed": at_least(0, SEED_MAX),
    "dtype": one_of(*DTYPES),
    "pooling": one_of("auto", *POOLINGS),
    "max_length": at_least(0, 1 << 20),  # 0: the model's own
    "train.max_length": at_least(1, 1 << 20),  # a length past the model's positions: train's model check
    "per_device_eval_batch_size": COUNT,
    "per_device_train_batch_size": COUNT,
    "nproc": at_least(1, 4096),
    "nodes": at_least(1, 4096),
    "loss_type": Rule(choices="embedtune.objectives:LOSS_TYPES"),
    "convert.loss_type": Rule(choices="embedtune.objectives:LOSS_TYPES", or_empty=True),  # "": no loss named
    "positive_token": REQUIRED,
    "negative_token": REQUIRED,
    # convert
    "format": one_of(*FORMATS),
    "score_scale": POSITIVE,
    "sts_positive_threshold": Rule(lo=0, hi=1),
    "on_error": one_of("fail", "skip"),
    "max_errors": COUNT,
    # split
    "split_dataset_ratio": Rule(lo=0, hi=1, lo_open=True, hi_open=True),
    # mine
    "num_negatives": at_least(1, 1 << 16),
    "range_min": OPTIONAL_COUNT,
    "range_max": COUNT,
    "relative_margin": FRACTION,
    "max_score": Rule(lo=-1, hi=1),
    "sampling": one_of(*SAMPLINGS),
    # score
    "teacher_task_type": one_of("auto", "embedding", "reranker"),
    "score_batch_tokens": at_least(1, BIG),
    "score_chunk_rows": COUNT,
    # train
    "task_type": Rule(choices="embedtune.objectives:TASK_TYPES"),
    "train_type": one_of("full", "lora"),
    "batch_sampling": Rule(choices="embedtune.sources:BATCH_SAMPLINGS"),
    "reranker_head": one_of(*HEADS),
    "lora_rank": at_least(1, 1 << 16),
    "lora_alpha": at_least(1, 1 << 20),
    "lora_dropout": FRACTION,
    "deepspeed": one_of(*DEEPSPEED),
    "num_train_epochs": Rule(lo=0, hi=1e6),  # 0 only with max_steps (train's check)
    "max_steps": at_least(-1),  # -1 (or 0): num_train_epochs decides
    "gradient_accumulation_steps": at_least(1, 1 << 16),
    "gradient_cache_chunk_size": OPTIONAL_COUNT,
    "gradient_cache_chunk_tokens": OPTIONAL_COUNT,
    "learning_rate": Rule(lo=0, hi=1, lo_open=True),
    "weight_decay": Rule(lo=0, hi=10),
    "warmup_ratio": FRACTION,
    "lr_scheduler_type": Rule(choices="transformers.trainer_utils:SchedulerType"),
    "logging_steps": COUNT,
    "eval_steps": OPTIONAL_COUNT,
    "save_steps": OPTIONAL_COUNT,  # 0: no checkpoints
    "save_total_limit": COUNT,
    "keep_checkpoint_weights": OPTIONAL_COUNT,
    "min_pixels": OPTIONAL_COUNT,
    "max_pixels": OPTIONAL_COUNT,
    "max_image_pixels": COUNT,
    "margin": Rule(lo=0, hi=2),  # a cosine distance is in [0, 2]
    "infonce_temperature": POSITIVE,
    "infonce_hard_negatives": at_least(0, 1 << 16),
    "listwise_temperature": POSITIVE,
    "infonce_hardness_strength": Rule(lo=0, hi=100),
    "cosent_scale": POSITIVE,
    "distill_student_temperature": Rule(lo=0, hi=100),
    "distill_teacher_temperature": POSITIVE,
    "distill_infonce_weight": Rule(lo=0, hi=100),
    "listwise_min_group_size": at_least(2, 1 << 16),  # a positive and at least one negative
    "dataloader_num_workers": at_least(0, 1024),
    "optim": Rule(choices="transformers.training_args:OptimizerNames"),
    "torch_compile": one_of(*SWITCHES),
    "length_buckets": at_least(0, 64),
    "use_liger_kernel": one_of(*SWITCHES, "true", "false"),
    "padding_free": one_of(*SWITCHES),
    "pad_to_multiple_of": at_least(0, 1 << 16),
    # merge, register
    "tolerance": Rule(lo=0, hi=1, lo_open=True),
    "merge_method": one_of("none", "linear", "slerp"),
    "merge_with": one_of("base", "checkpoints"),
    "max_guard_drop": Rule(lo=-1, hi=2),  # -1: off; metrics span at most [-1, 1]
    "merge_weight": Rule(lo=0, hi=1),
    "min_improvement": FINITE,
    # deploy, serve
    "canary_traffic_percent": at_least(1, 100),
    "serve_gpus": at_least(0, 1024),
    "min_replicas": at_least(0, 100_000),
    "max_replicas": at_least(1, 100_000),
    "ready_timeout_s": at_least(1, 7 * 86400),
    "max_batch_tokens": COUNT,
    "max_wait_ms": Rule(lo=0, hi=60_000),
    "max_input_tokens": at_least(0, 1 << 20),
    "max_inputs": COUNT,
    "port": at_least(0, 65535),
}
# Fields that take any text (an optional path, an instruction, a name checked where it is used) or any bool.
FREE = frozenset({
    "corpus", "exclude_data", "eval_data", "checkpoint_dir", "shared_dir", "run_id", "query_instruction",
    "reranker_instruction", "matryoshka_dims", "matryoshka_weights", "baseline_model", "primary_metric",
    "report", "tracking_uri", "dataset_stats", "image", "service_name", "namespace", "mlflow_secret",
    "api_key_secret", "served_model_name", "api_key_env", "teacher_model", "guard_data", "source_instructions", "source_in_batch_negatives",
    "image_root",
})  # fmt: skip


def rule_for(step: str, field: str) -> Rule | None:
    return RULES.get(f"{step}.{field}", RULES.get(field))


def choices_of(rule: Rule) -> tuple | None:
    """The values `rule` allows (None: its library is not installed here, so not checked)."""
    return _choices(rule.choices) if isinstance(rule.choices, str) else rule.choices


@functools.cache
def _choices(ref: str) -> tuple | None:
    """`"module:ATTR"` -> its values (an Enum's values, a mapping's keys); None when not installed."""
    module, _, attr = ref.partition(":")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except ImportError:
        return None
    if isinstance(obj, type):  # an Enum
        return tuple(m.value for m in obj)
    return tuple(obj)


@functools.cache
def field_types(cls) -> dict[str, tuple[type, bool]]:
    """field -> (its type, whether None is allowed), from the annotations: `float | None` -> (float, True).
    What the check here and the CLI's flag types read."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else ()
        kinds = [a for a in args if a is not type(None)] or [hint]
        out[name] = (kinds[0], len(kinds) < len(args))
    return out


def problem(step: str, field: str, value, kind: type, optional: bool) -> str | None:
    """Why `value` is not a valid `field` of `step`'s config, or None."""
    if value is None:
        return None if optional else "missing"
    if kind is bool:
        return None if isinstance(value, bool) else f"{value!r} is not true or false"
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, int if kind is int else (int, float)):
            return f"{value!r} is not {'an integer' if kind is int else 'a number'}"
        if kind is float and not math.isfinite(value):
            return f"{value} is not a finite number"
    elif kind is str and not isinstance(value, str):
        return f"{value!r} is not text"
    rule = rule_for(step, field)
    if rule is None:
        return None
    if rule.required and value == "":
        return "empty (required)"
    if rule.choices and not (rule.or_empty and value == ""):
        choices = choices_of(rule)
        if choices is not None and value not in choices:
            shown = " | ".join(str(c) for c in choices[:12]) + (" | ..." if len(choices) > 12 else "")
            return f"{value!r} is not one of {shown}"
    low = rule.lo is not None and (value <= rule.lo if rule.lo_open else value < rule.lo)
    high = rule.hi is not None and (value >= rule.hi if rule.hi_open else value > rule.hi)
    if low or high:
        left, right = "(" if rule.lo_open else "[", ")" if rule.hi_open else "]"
        return f"{value} is not in {left}{_num(rule.lo)}, {_num(rule.hi)}{right}"
    return None


def _num(x) -> str:
    if x is None:
        return "inf"
    if float(x).is_integer():
        n = int(x)
        return f"2^{n.bit_length() - 1}" if n >= 1 << 16 and n & (n - 1) == 0 else str(n)
    return f"{x:g}"


def check_config(cfg) -> None:
    """Raise `EmbedtuneError` (`field: value is not in [lo, hi]`, one line) for the first bad field of `cfg`."""
    step = type(cfg).__name__.removesuffix("Config").lower()
    for f in dataclasses.fields(cfg):
        kind, optional = field_types(type(cfg))[f.name]
        if why := problem(step, f.name, getattr(cfg, f.name), kind, optional):
            raise EmbedtuneError(f"{f.name}: {why}")
