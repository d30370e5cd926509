"""The canonical row and its rules: what every step may assume about its input data.

A canonical row is the ms-swift embedding / reranker format, so data prepared for `swift sft --task_type
embedding` works unchanged::

    {"query": "how do cats purr", "response": "Cats purr by ...", "rejected_response": ["Dogs bark ..."], "label": 1}

- `query`, `response`: strings that show something: a text made only of whitespace and invisible characters
  (Unicode Zs spaces such as the no-break and ideographic space, Zl / Zp separators, Cc controls such as
  newline, tab and NUL, Cf format characters such as the zero-width space, BOM and soft hyphen) is refused as
  blank (`is_blank`). Visible text is kept exactly as given: a newline or tab inside it is not touched.
- `rejected_response` (optional): a list of such strings (hard negatives). Written only when non-empty.
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
import reprlib
import unicodedata
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

from embedtune.errors import DataError, EmbedtuneError
from embedtune.io import iter_jsonl

CANONICAL_FIELDS = ("query", "response", "rejected_response", "label")
MAX_ERRORS = 20  # problems listed before a reader stops (every reader of canonical rows uses this cap)


class LossRule(NamedTuple):
    task_type: str  # what the loss trains: embedding | reranker ("" for data that names no loss)
    label: tuple  # ("finite",) | ("binary",) | ("range", lo, hi) with inclusive bounds
    label_required: bool  # every row needs a label (the loss regresses or classifies it)


# The one table of loss names: which task each trains and what its labels must be. `losses.LOSSES` holds a
# function for each key (a test ties the two), `train` checks task_type against it, convert and split read
# labels by it.
LOSS_RULES: dict[str, LossRule] = {
    "": LossRule("", ("finite",), False),
    "infonce": LossRule("embedding", ("finite",), False),
    "cosine_similarity": LossRule("embedding", ("range", -1.0, 1.0), True),
    "contrastive": LossRule("embedding", ("binary",), True),
    "online_contrastive": LossRule("embedding", ("binary",), True),
    "pointwise_reranker": LossRule("reranker", ("range", 0.0, 1.0), False),
    "listwise_reranker": LossRule("reranker", ("finite",), False),
}
LOSS_TYPES = tuple(k for k in LOSS_RULES if k)
EMBEDDING_LOSSES = frozenset(k for k, r in LOSS_RULES.items() if r.task_type == "embedding")
RERANKER_LOSSES = frozenset(k for k, r in LOSS_RULES.items() if r.task_type == "reranker")


def label_rule_text(rule: tuple) -> str:
    """What a label rule asks for, in words: `("range", -1.0, 1.0)` -> `a numeric label in [-1, 1]`."""
    if rule[0] == "binary":
        return "label 0 or 1"
    if rule[0] == "range":
        return f"a numeric label in [{rule[1]:g}, {rule[2]:g}]"
    return "a finite numeric label"


def is_number(value: Any) -> bool:
    """An int or float, not a bool (JSON `true` is not a label or a metric)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_loss_type(loss_type: str) -> str:
    """Return `loss_type` if known (or empty), else raise `EmbedtuneError` naming the valid ones."""
    if loss_type not in LOSS_RULES:
        raise EmbedtuneError(f"loss_type: unknown {loss_type!r} (expected one of {', '.join(LOSS_TYPES)})")
    return loss_type


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 40
_REPR.maxlevel = 3  # a hostile row nested 10,000 deep prints as [[[...]]], not a RecursionError


def _short(value: Any) -> str:
    text = _REPR.repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# Characters that show nothing: spaces and separators (Zs, Zl, Zp), controls (Cc: \n, \t, NUL, ...) and
# format characters (Cf: zero-width space, BOM, soft hyphen, direction marks, ...).
BLANK_CATEGORIES = frozenset({"Zs", "Zl", "Zp", "Cc", "Cf"})


def is_blank(text: str) -> bool:
    """True when every character of `text` is whitespace or invisible (`BLANK_CATEGORIES`); "" is blank.

    Fast for real text: Python's `str.isprintable` is false exactly for Cc, Cf, Zl, Zp, Zs (but the ASCII
    space), unassigned and private-use characters, so a printable first character that is not a space is
    visible and decides at once. Only text that starts blank is scanned, in C-sized chunks (a hostile 50 MB
    run of zero-width spaces costs seconds, not minutes).
    """
    c = text[:1]
    if c and c != " " and c.isprintable():
        return False
    text = text.strip()  # str.isspace characters: all of Zs, Zl, Zp and the whitespace controls
    category = unicodedata.category
    for i in range(0, len(text), 4096):
        if not BLANK_CATEGORIES.issuperset(map(category, text[i : i + 4096])):
            return False
    return True


def check_text(value: Any, field: str) -> str | None:
    """`"field: reason"` when `value` is not a string that shows something (see `is_blank`), else None."""
    if isinstance(value, str):
        if not value:
            return f"{field}: empty string"
        if is_blank(value):
            return f"{field}: blank (only whitespace or invisible characters: {_short(value)})"
        if not value.isascii():  # a JSON list read by Python's json module may hold "\ud800" escapes
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                return f"{field}: not valid Unicode (a lone surrogate at character {e.start})"
        return None
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
    if not is_number(value):
        return f"{field}: must be a number, got {type(value).__name__} {_short(value)}"
    if isinstance(value, int) and not -(2**63) <= value < 2**64:  # what JSON writers (orjson) can write
        return f"{field}: integer out of the 64-bit range, got {_short(value)}"
    if not math.isfinite(value):
        return f"{field}: must be finite, got {value}"
    rule = LOSS_RULES[loss_type].label
    if rule[0] == "binary" and value not in (0, 1):
        return f"{field}: must be 0 or 1 for loss_type {loss_type}, got {value}"
    if rule[0] == "range" and not rule[1] <= value <= rule[2]:
        return f"{field}: must be in [{rule[1]:g}, {rule[2]:g}] for loss_type {loss_type}, got {value}"
    return None


def check_row(row: Any, loss_type: str = "") -> list[str]:
    """All problems of one canonical row as `"field: reason"` strings; an empty list means valid.

    `loss_type` must be known (see `LOSS_RULES`); it decides the label's range and whether it is required.
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
    elif LOSS_RULES[loss_type].label_required:
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


def read_rows(
    path: str | os.PathLike, loss_type: str = "", max_errors: int = MAX_ERRORS, lines: bool = False
) -> list[dict]:
    """Load a canonical JSONL file, validated for `loss_type`, as canonical rows.

    Raises `DataError` listing `FILE:LINE: field: reason` for the first `max_errors` problems, and
    `EmbedtuneError` when the file is missing or holds no rows. `lines=True` adds each row's 1-based line
    number as `_line`, for messages about the rows later on (see `check_loss_data`).
    """
    rows, problems = [], []
    for lineno, row, row_problems in iter_rows(path, loss_type):
        if row_problems:
            problems += [f"{path}:{lineno}: {p}" for p in row_problems]
            if len(problems) >= max_errors:
                break
        else:
            rows.append({**canonical(row), "_line": lineno} if lines else canonical(row))
    if problems:
        raise DataError(format_problems(problems[:max_errors], stopped=len(problems) >= max_errors))
    if not rows:
        raise EmbedtuneError(f"{path}: no rows")
    return rows


def check_loss_data(
    loss_type: str, rows: Sequence[dict], params: Any = None, *, source: str = "data"
) -> None:
    """Fail before training when valid rows still cannot feed ``loss_type`` as a whole; name the rows.

    ``rows`` are canonical dicts; a ``_line`` key (``read_rows(..., lines=True)``) is what the message cites,
    else the 1-based row index. ``params`` is anything with the train knobs as attributes (a
    ``TrainConfig``): it reads ``infonce_use_batch`` (default True) and ``listwise_min_group_size`` (2).

    Row rules (texts, the label for the loss, from ``LOSS_RULES``) are ``check_row``'s; on top of them:
    infonce needs negatives on every row when ``infonce_use_batch`` is false (else a query has nothing to
    rank against), and the rerankers need at least one row with negatives (a listwise group needs
    ``listwise_min_group_size - 1`` of them; smaller groups are skipped and reported by the loss). Raises
    one ``DataError`` (problems joined by ``; ``) like ``train.jsonl lines 3, 7: label: must be 0 or 1 ...``.
    """
    if loss_type not in LOSS_TYPES:
        raise EmbedtuneError(f"loss_type: unknown loss {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
    use_batch = getattr(params, "infonce_use_batch", True)
    use_batch = True if use_batch is None else use_batch
    min_group = getattr(params, "listwise_min_group_size", 2)
    problems: dict[tuple[str, str], list[int]] = {}
    need_negs = max(min_group - 1, 1) if loss_type == "listwise_reranker" else 1
    rows_with_negatives = 0
    rule = LOSS_RULES[loss_type]
    for i, row in enumerate(rows):
        where = int(row.get("_line", i + 1))

        def bad(field: str, reason: str, where=where) -> None:
            problems.setdefault((field, reason), []).append(where)

        if check_text(row.get("response"), "response"):
            bad("response", f"{loss_type} needs a non-empty response")
        negs = row.get("rejected_response") or []
        if check_texts(negs, "rejected_response"):
            bad("rejected_response", "must be a list of non-empty strings")
            negs = []
        rows_with_negatives += len(negs) >= need_negs
        label = row.get("label")
        if loss_type == "infonce" and not use_batch and not negs:
            bad("rejected_response", "infonce needs rejected_response when infonce_use_batch is false")
        elif (label is None and rule.label_required) or (label is not None and check_label(label, loss_type)):
            bad("label", f"{loss_type} needs {label_rule_text(rule.label)}")
    if loss_type in RERANKER_LOSSES and rows and not rows_with_negatives:
        reason = f"{loss_type} needs rows with at least {need_negs} negative(s); no row has them"
        problems[("rejected_response", reason)] = []
    if not problems:
        return
    unit = "lines" if any("_line" in r for r in rows) else "rows"
    messages = []
    for (field, reason), where in problems.items():
        listed = ", ".join(map(str, where[:MAX_ERRORS])) + (
            f", ... ({len(where)} in all)" if len(where) > MAX_ERRORS else ""
        )
        messages.append(
            f"{source} {unit} {listed}: {field}: {reason}" if where else f"{source}: {field}: {reason}"
        )
    raise DataError("; ".join(messages))  # one line: the CLI prints it as is
