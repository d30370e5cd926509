"""The canonical row and its rules: what every step may assume about its input data.

A canonical row is the ms-swift embedding / reranker format, so data prepared for `swift sft --task_type
embedding` works unchanged::

    {"query": "how do cats purr", "response": "Cats purr by ...", "rejected_response": ["Dogs bark ..."], "label": 1}

- `query`, `response`: non-empty strings (length > 0; whitespace-only text is kept as given).
- `rejected_response` (optional): a list of non-empty strings (hard negatives). Written only when non-empty.
- `label` (optional): a number (not a bool), finite, and within the range its loss expects:

  ====================  ===================  ==========================
  loss_type             label                required
  ====================  ===================  ==========================
  infonce               any finite (unused)  no
  cosine_similarity     [-1, 1]              yes (the regression target)
  contrastive           0 or 1               yes
  online_contrastive    0 or 1               yes
  pointwise_reranker    [0, 1]               no (BCE target when given)
  listwise_reranker     any finite (unused)  no
  ""  (not declared)    any finite           no
  ====================  ===================  ==========================

Use `check_row(row, loss_type)` to get the problems of one row as `"field: reason"` strings, and
`read_rows(path, loss_type)` to load a canonical JSONL file, raising `DataError` with `FILE:LINE: field:
reason` for the first problems::

    from embedtune.data import read_rows
    rows = read_rows("train.jsonl", loss_type="contrastive")  # DataError if a label is not 0/1
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any

from embedtune.errors import DataError, EmbedtuneError
from embedtune.io import iter_jsonl

CANONICAL_FIELDS = ("query", "response", "rejected_response", "label")

# loss_type -> (what a label must be, whether every row needs one). "range" bounds are inclusive.
LABEL_RULES: dict[str, tuple[tuple, bool]] = {
    "": (("finite",), False),
    "infonce": (("finite",), False),
    "cosine_similarity": (("range", -1.0, 1.0), True),
    "contrastive": (("binary",), True),
    "online_contrastive": (("binary",), True),
    "pointwise_reranker": (("range", 0.0, 1.0), False),
    "listwise_reranker": (("finite",), False),
}
LOSS_TYPES = tuple(k for k in LABEL_RULES if k)


def check_loss_type(loss_type: str) -> str:
    """Return `loss_type` if known (or empty), else raise `EmbedtuneError` naming the valid ones."""
    if loss_type not in LABEL_RULES:
        raise EmbedtuneError(f"loss_type: unknown {loss_type!r} (expected one of {', '.join(LOSS_TYPES)})")
    return loss_type


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_text(value: Any, field: str) -> str | None:
    """`"field: reason"` when `value` is not a non-empty string, else None."""
    if isinstance(value, str):
        return None if value else f"{field}: empty string"
    if value is None:
        return f"{field}: missing"
    return f"{field}: must be a string, got {type(value).__name__} {_short(value)}"


def check_texts(value: Any, field: str) -> list[str]:
    """Problems of a list of non-empty strings (each named `field[i]`)."""
    if not isinstance(value, list):
        return [f"{field}: must be a list of strings, got {type(value).__name__} {_short(value)}"]
    return [p for i, v in enumerate(value) if (p := check_text(v, f"{field}[{i}]"))]


def check_label(value: Any, loss_type: str = "", field: str = "label") -> str | None:
    """`"field: reason"` when `value` is not a valid label for `loss_type`, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{field}: must be a number, got {type(value).__name__} {_short(value)}"
    if not math.isfinite(value):
        return f"{field}: must be finite, got {value}"
    rule = LABEL_RULES[loss_type][0]
    if rule[0] == "binary" and value not in (0, 1):
        return f"{field}: must be 0 or 1 for loss_type {loss_type}, got {value}"
    if rule[0] == "range" and not rule[1] <= value <= rule[2]:
        return f"{field}: must be in [{rule[1]:g}, {rule[2]:g}] for loss_type {loss_type}, got {value}"
    return None


def check_row(row: Any, loss_type: str = "") -> list[str]:
    """All problems of one canonical row as `"field: reason"` strings; an empty list means valid.

    `loss_type` must be known (see `LABEL_RULES`); it decides the label's range and whether it is required.
    Unknown extra keys are allowed (they are ignored by every step).
    """
    if not isinstance(row, dict):
        return [f"row: must be a JSON object, got {type(row).__name__}"]
    problems = [p for f in ("query", "response") if (p := check_text(row.get(f), f))]
    rejected = row.get("rejected_response")
    if rejected is not None:
        problems += check_texts(rejected, "rejected_response")
    label = row.get("label")
    if label is not None:
        if p := check_label(label, loss_type):
            problems.append(p)
    elif LABEL_RULES[loss_type][1]:
        problems.append(f"label: missing (loss_type {loss_type} needs a label on every row)")
    return problems


def canonical(row: dict) -> dict:
    """The canonical form of a valid row: only the four fields, in order; empty/None optional ones dropped."""
    out = {"query": row["query"], "response": row["response"]}
    if row.get("rejected_response"):
        out["rejected_response"] = row["rejected_response"]
    if row.get("label") is not None:
        out["label"] = row["label"]
    return out


def format_problems(problems: list[str], stopped: bool = False, hint: str = "") -> str:
    """The text of a `DataError`: one line for one problem, else a count and an indented list.

    `stopped` says the reader gave up after these (there may be more); `hint` says what the user can do.
    """
    if len(problems) == 1 and not stopped:
        return problems[0] + (f" ({hint})" if hint else "")
    head = f"{len(problems)} problems" + (" (stopped there; there may be more)" if stopped else "")
    return head + (f"; {hint}" if hint else "") + ":\n" + "\n".join(f"  {p}" for p in problems)


def iter_rows(path: str | os.PathLike, loss_type: str = "") -> Iterator[tuple[int, dict, list[str]]]:
    """Yield `(line_number, row, problems)` for each row of a canonical JSONL file (bad JSON raises)."""
    check_loss_type(loss_type)
    for lineno, row in iter_jsonl(path):
        yield lineno, row, check_row(row, loss_type)


def read_rows(path: str | os.PathLike, loss_type: str = "", max_errors: int = 20) -> list[dict]:
    """Load a canonical JSONL file, validated for `loss_type`, as canonical rows.

    Raises `DataError` listing `FILE:LINE: field: reason` for the first `max_errors` problems, and
    `EmbedtuneError` when the file is missing or holds no rows.
    """
    rows, problems = [], []
    for lineno, row, row_problems in iter_rows(path, loss_type):
        if row_problems:
            problems += [f"{path}:{lineno}: {p}" for p in row_problems]
            if len(problems) >= max_errors:
                break
        else:
            rows.append(canonical(row))
    if problems:
        raise DataError(format_problems(problems[:max_errors], stopped=len(problems) >= max_errors))
    if not rows:
        raise EmbedtuneError(f"{path}: no rows")
    return rows
