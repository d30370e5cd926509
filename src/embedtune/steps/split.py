"""split: canonical rows -> a train file and an eval file, grouped by query text.

    embedtune split --dataset work/rows.jsonl --train-data work/train.jsonl --eval-data work/eval.jsonl \\
        --split-dataset-ratio 0.05 --seed 42

Every row of a query goes to the same file, so no query text is in both (ms-swift splits by row, which leaks
near-duplicate positives of one query into eval and inflates its metrics). The ratio applies to distinct
queries: eval gets `round(ratio * distinct queries)` of them, whatever their row counts. The split refuses
(`EmbedtuneError`) when that would leave eval or train empty, and when the ratio is not in (0, 1).

Which queries go to eval is decided by a seeded 64-bit hash of the query text (blake2b keyed by the seed):
the queries with the smallest hashes win. That is a uniform random sample for a given seed, deterministic,
and independent of row order (shuffling the input file gives the same split). Rows are copied byte for
byte, in input order (a row's relative image paths are written absolute, from the dataset's folder). Two passes over the file; memory is 24 bytes per row plus one hash per distinct query.

Leakage guard (`embedtune.overlap`): a train row is dropped, and counted, when its normalized query or
positive (NFKC, casefold, collapsed whitespace) is
  - a text of an `--exclude-data` file (a benchmark's test rows, BEIR queries, or one text per line):
    `train_rows_dropped_excluded`;
  - a query or positive of the eval split (`--drop-eval-overlap`, on by default): a near-duplicate query
    ("What is X?" / "what is x ?") lands on the other side of a split by exact text, and a positive shared
    by a train and an eval query lets eval reward memorizing it: `train_rows_dropped_eval_overlap`.
Eval rows are never dropped. Both checks compare 64-bit keys of the normalized texts. A text with images
is keyed by its words and the sha256 of its images' bytes (`images.text_image_hashes`; relative paths from the
dataset's folder), so one image under two paths is the same text, and one question over two images is two
queries; an image that cannot be read is refused as `FILE:LINE: images[i]: reason`.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from array import array
from pathlib import Path

import orjson

from embedtune.config import SplitConfig
from embedtune.data import MAX_ERRORS, check_row, format_problems
from embedtune.errors import DataError, EmbedtuneError
from embedtune.images import ImageError, text_image_hashes, with_absolute_paths
from embedtune.io import read_lines
from embedtune.outputs import OutputSet, refuse_inputs
from embedtune.overlap import exclusion_keys, split_paths, text_key
from embedtune.progress import say

TRAIN, EVAL = 1, 2


def query_key(query: str, seed: int) -> int:
    """The seeded 64-bit hash that orders queries for the split (smallest ones go to eval)."""
    digest = hashlib.blake2b(query.encode("utf-8", "surrogatepass"), digest_size=8, key=str(seed).encode())
    return int.from_bytes(digest.digest(), "big")


def run(cfg: SplitConfig) -> dict:
    """Split `cfg.dataset` into `cfg.train_data` and `cfg.eval_data`; returns rows and queries per side."""
    ratio = cfg.split_dataset_ratio  # in (0, 1): checked when cfg was built (knobs.py)
    path = Path(cfg.dataset)  # .gz too; missing, a folder, a FIFO: one line (io.read_lines)
    refuse_inputs({"dataset": cfg.dataset, "exclude_data": split_paths(cfg.exclude_data)},
                  {"train_data": cfg.train_data, "eval_data": cfg.eval_data})  # fmt: skip

    excluded, n_excluded_texts = exclusion_keys(split_paths(cfg.exclude_data))

    # Pass 1: one key per row (0 marks a blank line), the set of distinct query keys, and the normalized
    # text keys of each row's query and positive (for the leakage guard).
    row_keys, keys, problems = array("Q"), set(), []
    query_texts, positive_texts = array("Q"), array("Q")
    for lineno, line in enumerate(read_lines(path), 1):
        if not line.strip():
            row_keys.append(0)
            query_texts.append(0)
            positive_texts.append(0)
            continue
        try:
            row = orjson.loads(line)
        except orjson.JSONDecodeError as e:
            problems.append(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})")
        else:
            problems += [f"{path}:{lineno}: {p}" for p in check_row(row)]
            try:  # images: by the content hash of their bytes, never their path
                hashes = (
                    text_image_hashes(row, path.parent, cfg.image_root)
                    if not problems and row.get("images")
                    else ["", ""]
                )
            except ImageError as e:
                problems.append(f"{path}:{lineno}: {e}")
        if problems:
            if len(problems) >= MAX_ERRORS:
                break
            row_keys.append(0)
            query_texts.append(0)
            positive_texts.append(0)
            continue
        key = query_key(row["query"] + (f"\x00{hashes[0]}" if hashes[0] else ""), cfg.seed) or 1  # 0: blank
        row_keys.append(key)
        keys.add(key)
        query_texts.append(text_key(row["query"], hashes[0]))
        positive_texts.append(text_key(row["response"], hashes[1]))
    if problems:
        hint = "split reads canonical rows; run `embedtune convert` on other shapes"
        raise DataError(
            format_problems(problems[:MAX_ERRORS], stopped=len(problems) >= MAX_ERRORS, hint=hint)
        )

    n = len(keys)
    n_eval = math.floor(ratio * n + 0.5)
    if n_eval == 0:
        need = 0.5 / n if n else 0
        raise EmbedtuneError(
            f"{cfg.dataset}: eval would be empty: split_dataset_ratio {ratio:g} of {n} distinct queries rounds "
            f"to 0" + (f" (use a ratio >= {need:.3g} or more data)" if n else " (the file has no rows)")
        )
    if n_eval == n:
        raise EmbedtuneError(
            f"{cfg.dataset}: train would be empty: split_dataset_ratio {ratio:g} of {n} distinct queries "
            f"rounds to all {n} (use a smaller ratio or more data)"
        )
    eval_keys = set(heapq.nsmallest(n_eval, keys))
    eval_texts: set[int] = set()
    if cfg.drop_eval_overlap:
        for key, q, p in zip(row_keys, query_texts, positive_texts, strict=True):
            if key in eval_keys:
                eval_texts.update((q, p))

    # Each row's side (0: blank or dropped, 1: train, 2: eval), decided before anything is written.
    counts = {"train": 0, "eval": 0, "excluded": 0, "eval_overlap": 0}
    sides, train_queries = bytearray(len(row_keys)), set()
    for i, (key, q, p) in enumerate(zip(row_keys, query_texts, positive_texts, strict=True)):
        if not key:
            continue
        if key in eval_keys:
            sides[i], counts["eval"] = EVAL, counts["eval"] + 1
        elif q in excluded or p in excluded:
            counts["excluded"] += 1
        elif q in eval_texts or p in eval_texts:
            counts["eval_overlap"] += 1
        else:
            sides[i], counts["train"] = TRAIN, counts["train"] + 1
            train_queries.add(key)
    if counts["excluded"] or counts["eval_overlap"]:
        say(
            "split",
            f"leakage guard dropped {counts['excluded']} train rows found in exclude_data and "
            f"{counts['eval_overlap']} whose query or positive is in the eval split",
        )
    if not counts["train"]:
        raise EmbedtuneError(
            f"{cfg.dataset}: the leakage guard dropped every train row ({counts['excluded']} in exclude_data, "
            f"{counts['eval_overlap']} overlapping eval); nothing is left to train on"
        )

    # Pass 2: copy each row, unchanged, to its side (relative image paths made absolute, so the files can be
    # anywhere).
    try:
        with OutputSet() as outs:  # both files appear together, or neither
            train, evalf = outs.open(cfg.train_data), outs.open(cfg.eval_data)
            for side, line in zip(sides, read_lines(path), strict=False):
                if side:
                    line = with_absolute_paths(line if line.endswith(b"\n") else line + b"\n", path.parent)
                    (evalf if side == EVAL else train).write(line)
    except OSError as e:
        raise EmbedtuneError(f"cannot write {cfg.train_data} / {cfg.eval_data}: {e}") from None
    return {
        "train_data": str(cfg.train_data),
        "eval_data": str(cfg.eval_data),
        "train_rows": counts["train"],
        "train_queries": len(train_queries),
        "eval_rows": counts["eval"],
        "eval_queries": n_eval,
        "train_rows_dropped_excluded": counts["excluded"],
        "train_rows_dropped_eval_overlap": counts["eval_overlap"],
        "exclude_texts": n_excluded_texts,
        "split_dataset_ratio": ratio,
        "seed": cfg.seed,
    }
