"""The training objectives: one table, one entry per `loss_type`, and everything a loss needs in that entry.

An entry says, for its loss:

- what it trains (`task_type`) and what rows it needs: the label rule (`label`, `label_required`), the
  negatives every row or some row must have, the rows it skips, the optional row fields it reads (`fields`);
- how a batch of rows becomes model inputs plus the loss's extra tensors: its `layout`, a key of
  `batching.LAYOUTS` (which texts are encoded, in which order, and how the encoded outputs are handed to
  the loss function);
- the loss itself: `loss`, the name of a pure tensor function in `losses.py`, and `knobs`, its keyword
  arguments and the `TrainConfig` field each one comes from (`collate_knobs`: the same for the layout);
- whether its batches must be duplicate-free (in-batch negatives), and the knob values it refuses.

What is shared by every loss of a task (the eval shapes it is measured on, whether it has embeddings for
Matryoshka, its env-var knobs) is in `TASKS`. Adding a loss is one entry here plus its function in
`losses.py`: the collator, `TrainModel`, the gradient cache, Matryoshka, the row checks (`data.check_row`,
`data.check_loss_data`) and the train step read this table, and nothing else branches on a loss name.

Standard library only (like `data.py`, which reads the label rules from here): convert and split never
import torch. `Objective.function` imports `losses` when it is first asked for.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from embedtune.errors import EmbedtuneError

FINITE, BINARY = ("finite",), ("binary",)


def in_range(lo: float, hi: float) -> tuple:
    return ("range", lo, hi)


def _none(knobs: dict) -> int:
    return 0


def _no(knobs: dict) -> str:
    return ""


def _never(knobs: dict) -> bool:
    return False


def _keep(row: dict, knobs: dict) -> bool:
    return True


@dataclass(frozen=True)
class Task:
    """What every objective of one `task_type` shares."""

    eval_shapes: tuple[
        str, ...
    ]  # evaldata shapes its models are measured on (during training and by evaluate)
    embeddings: bool  # the model outputs embeddings (Matryoshka widths apply)
    env_knobs: tuple[str, ...] = ()  # TrainConfig fields with an ms-swift env-var default, logged at start


TASKS = {
    "embedding": Task(eval_shapes=("sts", "ranking", "retrieval"), embeddings=True),
    "reranker": Task(
        eval_shapes=("ranking",), embeddings=False, env_knobs=("positive_token", "negative_token")
    ),
}
# ms-swift's task names that pick a head too: (task, reranker_head)
TASK_ALIASES = {"generative_reranker": ("reranker", "generative")}
TASK_TYPES = (*TASKS, *TASK_ALIASES)  # what task_type accepts


@dataclass(frozen=True)
class Objective:
    """One loss_type (see the module docstring). Callables take the loss's resolved `knobs` (its keyword
    arguments, by the loss function's own names: `{"temperature": 0.01, "use_batch": True, ...}`)."""

    task_type: str  # a key of TASKS
    label: tuple  # FINITE | BINARY | in_range(lo, hi): what a row's label must be (bounds inclusive)
    label_required: bool  # every row needs a label (the loss regresses or classifies it)
    layout: str  # batching.LAYOUTS key: the texts of a batch and how the outputs reach the loss function
    loss: str  # name of the pure tensor function in losses.py
    knobs: dict[str, str] = field(default_factory=dict)  # loss keyword -> TrainConfig field
    collate_knobs: dict[str, str] = field(default_factory=dict)  # layout keyword -> TrainConfig field
    fields: tuple[str, ...] = ()  # optional row fields it reads (data.OPTIONAL_FIELDS), e.g. teacher_scores
    required_fields: tuple[str, ...] = ()  # of those, the ones every row must hold
    every_row_negatives: Callable[[dict], str] = _no  # why every row needs a negative ("": it need not)
    some_row_negatives: Callable[[dict], int] = _none  # negatives at least one row must have
    labelled_negatives: bool = False  # a row labelled below 1 counts as a negative (pairs with 0/1 labels)
    keep_row: Callable[[dict, dict], bool] = _keep  # (row, knobs): False for rows the loss skips (counted)
    skip_reason: str = ""  # why keep_row skips a row, for the message
    distinct_batches: Callable[[dict], bool] = _never  # batches must hold no text twice (in-batch negatives)
    positive: tuple[str, ...] = ()  # loss keywords that must be > 0
    conflicts: Callable[[dict], list[str]] = lambda knobs: []  # knob combinations it refuses, as "field: why"

    @property
    def function(self) -> Callable:
        import importlib

        module, _, name = self.loss.rpartition(".")  # "distillation.distill_kl_loss", or a name in losses.py
        return getattr(importlib.import_module(f"embedtune.{module or 'losses'}"), name)


def _infonce_conflicts(k: dict) -> list[str]:
    # ms-swift ignores both without in-batch documents; a knob that silently does nothing is refused instead
    return [
        f"infonce_include_{side}: needs infonce_use_batch (the extra terms are other rows' texts)"
        for side in ("qq", "dd")
        if k.get(f"include_{side}") and not k["use_batch"]
    ]


INFONCE_KNOBS = {
    "temperature": "infonce_temperature", "use_batch": "infonce_use_batch",
    "mask_fake_negative": "infonce_mask_fake_negative", "include_qq": "infonce_include_qq",
    "include_dd": "infonce_include_dd", "hardness_strength": "infonce_hardness_strength",
}  # fmt: skip
DISTILL_KNOBS = {
    "student_temperature": "distill_student_temperature", "teacher_temperature": "distill_teacher_temperature",
}  # fmt: skip


# The table. Label rules (what ms-swift's data for each loss holds):
#   infonce  any finite label (unused) | cosine_similarity [-1, 1], required | (online_)contrastive 0/1,
#   required | cosent / angle: any finite score, required (only their order matters) | pointwise_reranker
#   [0, 1] (BCE target of the positive; default 1) | listwise_reranker unused | the distillation losses
#   (distill_kl, margin_mse and their _reranker twins) read teacher_scores, every row must hold them.
OBJECTIVES: dict[str, Objective] = {
    "infonce": Objective(
        task_type="embedding", label=FINITE, label_required=False, layout="query_docs", loss="infonce_loss",
        knobs=INFONCE_KNOBS,
        collate_knobs={"hard_negatives": "infonce_hard_negatives"},
        # without in-batch documents a query ranks only its own negatives: it needs some
        every_row_negatives=lambda k: "" if k["use_batch"] else "when infonce_use_batch is false",
        distinct_batches=lambda k: bool(k["use_batch"]),
        positive=("temperature",), conflicts=_infonce_conflicts,
    ),
    "distill_kl": Objective(
        task_type="embedding", label=FINITE, label_required=False, layout="scored_docs",
        loss="distillation.distill_kl_loss",
        knobs={**DISTILL_KNOBS, "infonce_weight": "distill_infonce_weight", **INFONCE_KNOBS},
        collate_knobs={"hard_negatives": "infonce_hard_negatives"},
        fields=("teacher_scores",), required_fields=("teacher_scores",),
        some_row_negatives=lambda k: 1,  # a group of one has one outcome: nothing to distill
        distinct_batches=lambda k: bool(k["infonce_weight"] and k["use_batch"]),
        positive=("teacher_temperature", "temperature"),
        conflicts=lambda k: _infonce_conflicts(k) if k["infonce_weight"] else [],
    ),
    "margin_mse": Objective(
        task_type="embedding", label=FINITE, label_required=False, layout="scored_docs",
        loss="distillation.margin_mse_loss", knobs=DISTILL_KNOBS,
        collate_knobs={"hard_negatives": "infonce_hard_negatives"},
        fields=("teacher_scores",), required_fields=("teacher_scores",),
        some_row_negatives=lambda k: 1, positive=("teacher_temperature",),
    ),
    "cosine_similarity": Objective(
        task_type="embedding", label=in_range(-1.0, 1.0), label_required=True, layout="text_pairs",
        loss="cosine_similarity_loss",
    ),
    "contrastive": Objective(
        task_type="embedding", label=BINARY, label_required=True, layout="text_pairs", loss="contrastive_loss",
        knobs={"margin": "margin"},
    ),
    "online_contrastive": Objective(
        task_type="embedding", label=BINARY, label_required=True, layout="text_pairs",
        loss="online_contrastive_loss", knobs={"margin": "margin"},
    ),
    "cosent": Objective(
        task_type="embedding", label=FINITE, label_required=True, layout="text_pairs", loss="cosent_loss",
        knobs={"scale": "cosent_scale"}, positive=("scale",),
    ),
    "angle": Objective(
        task_type="embedding", label=FINITE, label_required=True, layout="text_pairs", loss="angle_loss",
        knobs={"scale": "cosent_scale"}, positive=("scale",),
    ),
    "pointwise_reranker": Objective(
        task_type="reranker", label=in_range(0.0, 1.0), label_required=False, layout="prompts",
        loss="pointwise_reranker_loss", some_row_negatives=lambda k: 1, labelled_negatives=True,
    ),
    "listwise_reranker": Objective(
        task_type="reranker", label=FINITE, label_required=False, layout="prompt_groups",
        loss="listwise_reranker_loss",
        knobs={"temperature": "listwise_temperature", "min_group_size": "listwise_min_group_size"},
        some_row_negatives=lambda k: max(k["min_group_size"] - 1, 1),
        keep_row=lambda row, k: 1 + len(row.get("rejected_response") or []) >= k["min_group_size"],
        skip_reason="group smaller than listwise_min_group_size",
        positive=("temperature",),
    ),
    "distill_kl_reranker": Objective(
        task_type="reranker", label=FINITE, label_required=False, layout="scored_groups",
        loss="distillation.distill_kl_reranker_loss", knobs=DISTILL_KNOBS,
        fields=("teacher_scores",), required_fields=("teacher_scores",),
        some_row_negatives=lambda k: 1, positive=("teacher_temperature",),
    ),
    "margin_mse_reranker": Objective(
        task_type="reranker", label=FINITE, label_required=False, layout="scored_groups",
        loss="distillation.margin_mse_reranker_loss", knobs=DISTILL_KNOBS,
        fields=("teacher_scores",), required_fields=("teacher_scores",),
        some_row_negatives=lambda k: 1, positive=("teacher_temperature",),
    ),
}  # fmt: skip
LOSS_TYPES = tuple(OBJECTIVES)
NO_LOSS = Objective(
    task_type="", label=FINITE, label_required=False, layout="", loss=""
)  # data naming no loss


def resolve_task(task_type: str, reranker_head: str) -> tuple[str, str]:
    """(task, reranker head) with ms-swift's task names resolved (`generative_reranker`: a reranker, yes/no head)."""
    return TASK_ALIASES.get(task_type, (task_type, reranker_head))


def losses_for(task_type: str) -> tuple[str, ...]:
    return tuple(name for name, o in OBJECTIVES.items() if o.task_type == task_type)


def objective(loss_type: str) -> Objective:
    """The entry of `loss_type` ("" for data that names no loss: any finite label, none required)."""
    if loss_type == "":
        return NO_LOSS
    if loss_type not in OBJECTIVES:
        raise EmbedtuneError(f"loss_type: unknown {loss_type!r} (expected one of {', '.join(LOSS_TYPES)})")
    return OBJECTIVES[loss_type]


def _defaults() -> dict[str, Any]:
    """Every TrainConfig field's default, env-var knobs at their built-in value (what an unset knob means)."""
    from embedtune.config import ENV_DEFAULTS, TrainConfig

    out = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    return {**out, **{name: default for name, (_, _, default) in ENV_DEFAULTS.items()}}


def resolve_knobs(obj: Objective, cfg=None, collate: bool = False) -> dict[str, Any]:
    """The loss's keyword arguments (`collate`: the layout's) from a `TrainConfig` whose env-var knobs are
    resolved; without `cfg`, the defaults. The one place a loss's knobs are read from the config."""
    source = _defaults() if cfg is None else {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    names = obj.collate_knobs if collate else obj.knobs
    return {kw: source[name] for kw, name in names.items()}


def knob_problems(obj: Objective, knobs: dict) -> list[str]:
    """Knob values the loss cannot use, as `field: reason` (`knobs` from `resolve_knobs`)."""
    return [
        f"{obj.knobs[k]}: {knobs[k]} must be > 0"
        for k in obj.positive
        if not (knobs[k] is None or knobs[k] > 0)
    ] + obj.conflicts(knobs)


def env_knobs(obj: Objective) -> list[str]:
    """The TrainConfig fields with an env-var default this loss (and its task) reads."""
    from embedtune.config import ENV_DEFAULTS

    read = {*obj.knobs.values(), *obj.collate_knobs.values(), *TASKS[obj.task_type].env_knobs}
    return [f for f in ENV_DEFAULTS if f in read]


def log_env_knobs(given, cfg) -> None:
    """Log the effective value of each env-var knob a TrainConfig's loss (and its task) reads, and where it
    came from (`given`: the config as given, `cfg`: with the env defaults resolved)."""
    import os

    from embedtune.config import ENV_DEFAULTS
    from embedtune.progress import say

    pixels = [n for n in ("min_pixels", "max_pixels") if getattr(cfg, n)]  # a model's, when set
    for name in env_knobs(objective(cfg.loss_type)) + pixels:
        env = ENV_DEFAULTS[name][0]
        if getattr(given, name) is not None:
            source = "flag" + (f", env {env} ignored" if os.environ.get(env) else "")
        else:
            source = f"env {env}" if os.environ.get(env) else "default"
        say("train", f"{name} = {getattr(cfg, name)!r} ({source})")
