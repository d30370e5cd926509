"""The canonical row and its rules: what every step may assume about its input data.

A canonical row is the ms-swift embedding / reranker format, so data prepared for `swift sft --task_type
embedding` works unchanged::

    {"query": "how do cats purr", "response": "Cats purr by ...", "rejected_response": ["Dogs bark ..."], "label": 1}

- `query`, `response`: strings that show something: a text made only of whitespace and invisible characters
  (Unicode Zs spaces such as the no-break and ideographic space, Zl / Zp separators, Cc controls such as
  newline, tab and NUL, Cf format characters such as the zero-width space, BOM and soft hyphen) is refused as
  blank (`is_blank`). Visible text is kept exactly as given: a newline or tab inside it is not touched.
- `rejected_response` (optional): a list of such strings (hard negatives). Written only when non-empty.
- `label` (optional): a number (not a bool), finite, and within the range its loss expects (the label rule
  of its entry in `embedtune.objectives.OBJECTIVES`): infonce and listwise_reranker any finite value
  (unused), cosine_similarity [-1, 1] (required), contrastive / online_contrastive 0 or 1 (required),
  pointwise_reranker [0, 1] (the positive's BCE target); data that names no loss (`""`): any finite value.

Optional fields (`OPTIONAL_FIELDS`), kept end to end by convert, split, mine and train, read by the
objectives that declare them (`Objective.fields`) and ignored by the others:

- `teacher_scores`: finite numbers, one for `response` then one per `rejected_response` (a teacher's scores,
  for distillation).
- `images`: strings (local paths, URIs or data URIs), one per `<image>` tag in the row's texts, matched in
  order: the query's tags first, then the response's, then each rejected response's (ms-swift's format).
  Whether each one reads and decodes is `embedtune.images.check_images`'s (it needs the file's folder);
  `<video>` and `<audio>` tags are refused (not supported yet).
- `source`: which input file or dataset the row came from (a visible string).
- `instruction`: the row's own query instruction (a string).

A count that does not match the texts (teacher scores, images) is refused like any other bad value.

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
from typing import Any

from embedtune.errors import DataError, EmbedtuneError
from embedtune.io import iter_jsonl, json_bytes, read_lines
from embedtune.objectives import LOSS_TYPES, objective, resolve_knobs
from embedtune.outputs import OutputSet
from embedtune.progress import say

OPTIONAL_FIELDS = ("teacher_scores", "images", "source", "instruction")
CANONICAL_FIELDS = ("query", "response", "rejected_response", "label", *OPTIONAL_FIELDS)
IMAGE_TAG = "<image>"
UNSUPPORTED_TAGS = ("<video>", "<audio>")  # ms-swift's other media tags: refused, never read as text
MAX_ERRORS = 20  # problems listed before a reader stops (every reader of canonical rows uses this cap)


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
    objective(loss_type)
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
# Letters and symbols that render as nothing (used to fake "non-empty" names and texts): the Hangul fillers
# (U+3164, U+115F, U+1160, U+FFA0) and the blank Braille pattern (U+2800).
FILLER_CHARS = frozenset("\u3164\u115f\u1160\uffa0\u2800")
BLANK_FILLERS = dict.fromkeys(map(ord, FILLER_CHARS))  # a str.translate table that deletes them


def is_blank(text: str) -> bool:
    """True when every character of `text` is whitespace or invisible (`BLANK_CATEGORIES`, `BLANK_FILLERS`);
    "" is blank.

    Fast for real text: Python's `str.isprintable` is false exactly for Cc, Cf, Zl, Zp, Zs (but the ASCII
    space), unassigned and private-use characters, so a printable first character that is not a space is
    visible and decides at once. Only text that starts blank is scanned, in C-sized chunks (a hostile 50 MB
    run of zero-width spaces costs seconds, not minutes).
    """
    c = text[:1]
    if c and c != " " and c.isprintable() and ord(c) not in BLANK_FILLERS:
        return False
    # fillers dropped, then str.strip: all of Zs, Zl, Zp and the whitespace controls
    text = text.translate(BLANK_FILLERS).strip()
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
    rule = objective(loss_type).label
    if rule[0] == "binary" and value not in (0, 1):
        return f"{field}: must be 0 or 1 for loss_type {loss_type}, got {value}"
    if rule[0] == "range" and not rule[1] <= value <= rule[2]:
        return f"{field}: must be in [{rule[1]:g}, {rule[2]:g}] for loss_type {loss_type}, got {value}"
    return None


def check_row(row: Any, loss_type: str = "") -> list[str]:
    """All problems of one canonical row as `"field: reason"` strings; an empty list means valid.

    `loss_type` must be known (`objectives.objective`); it decides the label's range and whether it is
    required. The optional fields are checked when present (`check_optional`); unknown extra keys are
    allowed (they are ignored by every step).
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
    elif objective(loss_type).label_required:
        problems.append(f"label: missing (loss_type {loss_type} needs a label on every row)")
    if not problems and has_media_tag(row_texts(row)):
        problems += check_media_tags(row)
    return problems + (check_optional(row, texts_ok=not problems) if not OPTIONAL.isdisjoint(row) else [])


MEDIA_TAGS = (IMAGE_TAG, *UNSUPPORTED_TAGS)


def has_media_tag(texts: Sequence[str]) -> bool:
    """Whether any text holds an `<image>`, `<video>` or `<audio>` tag (one scan per tag of the joined texts)."""
    joined = "\x00".join(texts)
    return any(tag in joined for tag in MEDIA_TAGS)


def check_media_tags(row: dict) -> list[str]:
    """`<video>` / `<audio>` refused (not supported yet); `<image>` tags need as many `images` (a row with tags
    and no `images` at all is refused here: `check_optional` counts them when the field is there)."""
    fields = [("query", row["query"]), ("response", row["response"])]
    fields += [(f"rejected_response[{i}]", t) for i, t in enumerate(row.get("rejected_response") or [])]
    problems = [
        f"{name}: {tag} tags are not supported yet (images only: {IMAGE_TAG} with `images`)"
        for name, text in fields
        for tag in UNSUPPORTED_TAGS
        if tag in text
    ]
    tags = sum(t.count(IMAGE_TAG) for _, t in fields)
    if tags and row.get("images") is None:
        problems.append(f"images: missing: the texts hold {tags} {IMAGE_TAG} tags, one image each")
    return problems


OPTIONAL = frozenset(OPTIONAL_FIELDS)
FIELD_SOURCES = {"teacher_scores": "one per document, positive first: `embedtune score` writes them"}


def check_optional(row: dict, texts_ok: bool = True) -> list[str]:
    """Problems of the optional fields a row holds (`OPTIONAL_FIELDS`); counts are checked against the texts
    only when those are valid (`texts_ok`), so one bad text is not reported twice."""
    problems = []
    rejected = row.get("rejected_response") or []
    scores = row.get("teacher_scores")
    if scores is not None:
        if not isinstance(scores, list) or not scores:
            problems.append(f"teacher_scores: must be a non-empty list of numbers, got {_short(scores)}")
        else:
            problems += [p for i, v in enumerate(scores) if (p := check_label(v, "", f"teacher_scores[{i}]"))]
            if texts_ok and len(scores) != 1 + len(rejected):
                problems.append(
                    f"teacher_scores: {len(scores)} scores for {1 + len(rejected)} documents "
                    f"(one for response, then one per rejected_response)"
                )
    images = row.get("images")
    if images is not None:
        if not isinstance(images, list):
            problems.append(
                f"images: must be a list of strings, got {type(images).__name__} {_short(images)}"
            )
        else:
            problems += [p for i, v in enumerate(images) if (p := check_text(v, f"images[{i}]"))]
            tags = sum(t.count(IMAGE_TAG) for t in row_texts(row)) if texts_ok else len(images)
            if tags != len(images):
                problems.append(f"images: {len(images)} images for {tags} {IMAGE_TAG} tags in the texts")
    if row.get("source") is not None and (p := check_text(row["source"], "source")):
        problems.append(p)
    instruction = row.get("instruction")
    if instruction is not None and not isinstance(instruction, str):
        problems.append(
            f"instruction: must be a string, got {type(instruction).__name__} {_short(instruction)}"
        )
    return problems


def row_texts(row: dict) -> list[str]:
    """The texts of a valid row in tag order: query, response, then each rejected response."""
    return [row["query"], row["response"], *(row.get("rejected_response") or [])]


def images_by_text(row: dict) -> list[list[str]]:
    """A valid row's `images` split per text of `row_texts` (tags are matched in order)."""
    images, out, start = row.get("images") or [], [], 0
    for text in row_texts(row):
        n = text.count(IMAGE_TAG)
        out.append(images[start : start + n])
        start += n
    return out


def canonical(row: dict) -> dict:
    """The canonical form of a valid row: its `CANONICAL_FIELDS`, in that order; unknown keys, None values and
    an empty `rejected_response` or `images` dropped."""
    out = {"query": row["query"], "response": row["response"]}
    for name in CANONICAL_FIELDS[2:]:
        value = row.get(name)
        if value is not None and value != []:
            out[name] = value
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


def pass_rows_through(dataset: str, output: str, stats_path, step: str, why: str) -> dict:
    """Copy `dataset`'s rows to `output` unchanged (byte for byte; a .gz input decompressed), with stats saying
    so beside it, both committed together: what mine and score do when they have nothing to add. The rows are
    checked as train will check them (`FILE:LINE: field: reason`): garbage is not passed on."""
    n = len(read_rows(dataset))
    result = {"dataset": dataset, "output": output, "passthrough": True, "rows": n}
    with OutputSet() as outs:
        out = outs.open(output)
        for line in read_lines(dataset):
            out.write(line)
        outs.write_bytes(stats_path, json_bytes(result))
    say(step, f"passthrough: {n} rows copied unchanged ({why})")
    return result


def check_loss_data(
    loss_type: str, rows: Sequence[dict], knobs: dict | None = None, *, source: str = "data"
) -> None:
    """Fail before training when valid rows still cannot feed ``loss_type`` as a whole; name the rows.

    ``rows`` are canonical dicts; a ``_line`` key (``read_rows(..., lines=True)``) is what the message cites,
    else the 1-based row index. ``knobs``: the loss's keyword arguments (``objectives.resolve_knobs``;
    default: the config's defaults), which its entry's rules read.

    Row rules (texts, the label for the loss) are ``check_row``'s; on top of them, the objective's: the
    negatives every row needs (infonce without in-batch documents), the negatives some row needs (the
    rerankers: a listwise group needs ``listwise_min_group_size - 1``; smaller groups are skipped and
    reported; for pointwise, a row labelled below 1 is a negative too: (query, document, 0/1) pairs). Raises one ``DataError`` (problems joined by ``; ``) like
    ``train.jsonl lines 3, 7: label: must be 0 or 1 ...``.
    """
    if loss_type not in LOSS_TYPES:
        raise EmbedtuneError(f"loss_type: unknown loss {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
    obj = objective(loss_type)
    knobs = resolve_knobs(obj) if knobs is None else knobs
    every, some = obj.every_row_negatives(knobs), obj.some_row_negatives(knobs)
    problems: dict[tuple[str, str], list[int]] = {}
    rows_with_negatives = 0
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
        label = row.get("label")
        labelled = obj.labelled_negatives and is_number(label) and label < 1  # a (query, negative, 0) pair
        rows_with_negatives += len(negs) >= max(some, 1) or labelled
        for field in obj.required_fields:
            if row.get(field) is None:
                bad(field, f"{loss_type} needs {field} in every row ({FIELD_SOURCES.get(field, '')})")
        if every and not negs:
            bad("rejected_response", f"{loss_type} needs rejected_response {every}")
        elif (label is None and obj.label_required) or (label is not None and check_label(label, loss_type)):
            bad("label", f"{loss_type} needs {label_rule_text(obj.label)}")
    if some and rows and not rows_with_negatives:
        reason = f"{loss_type} needs rows with at least {some} negative(s); no row has them"
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
