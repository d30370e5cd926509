"""convert: turn embedding / reranker data from any common source into canonical ms-swift rows.

    embedtune convert --source data/askubuntu.jsonl --output work/rows.jsonl
    embedtune convert --source sentence-transformers/stsb --score-scale 1 --output work/sts.jsonl
    embedtune convert --source sts.csv --sts-positive-threshold 0.75 --output work/pos.jsonl  # stsb:positive

The output is one canonical row per line (see `embedtune.data`)::

    {"query": "...", "response": "...", "rejected_response": ["...", ...], "label": 0.76}

Sources: a local file, a folder (every JSONL / JSON / CSV / TSV / Parquet file below it, sorted by path,
`.gz` allowed for the text formats), or a Hugging Face dataset `name[:subset]` (split `--hf-split`, read with
`datasets` in streaming mode; the readers are `embedtune.readers`). Input shapes, detected per file from the keys of its first row or forced with
`--format`:

    mteb       {"query", "positive": [...], "negative": [...]}  -> one row per positive, all negatives rejected
    canonical  {"query", "response", "rejected_response"?, "label"?, + the optional fields}  -> validated;
               teacher_scores, images, source, instruction kept (`data.OPTIONAL_FIELDS`), other keys dropped
    sts        {"sentence1", "sentence2", "score"}  -> label = score / score_scale; with
               --sts-positive-threshold T > 0 only pairs with label >= T are kept, without label
               (ms-swift's `stsb:positive` = T 0.75: infonce positives)
    pairs      {"anchor", "positive", "negative"? | "negative_1".."negative_N"?}  -> query / response / rejected
    messages   ms-swift's message lists {"messages", "positive_messages", "negative_messages"?, "images"?,
               "positive_images"?, "negative_images"?}  -> one row per positive; the images in tag order; a
               system message of `messages` -> the row's `instruction`

Images (`images` of a row, `embedtune.images`): each one is read and decoded here; relative paths are read
from the data file's folder and written absolute; `--image-root` refuses paths outside it; an image over
`--max-image-pixels` is kept (it is resized when read). A bad image is a bad row (`FILE:LINE: images[i]: reason`).

Every row is validated (texts strings that are not blank, see `data.is_blank`; labels numbers in range for `--loss-type`). With
`--on-error fail` the first `--max-errors` problems are listed as `FILE:LINE: field: reason` (Parquet and
Hugging Face rows: `SOURCE:row N`) and nothing is written; with `--on-error skip` the good rows are written and
each bad one goes to `<output>.rejected.jsonl` with its reasons. Outputs appear atomically (temp file, then
rename), together with `<output>.stats.json`: row counts, distinct queries, negatives per row, label range,
text length percentiles (in characters) and a sha256 fingerprint of the output for lineage.

Memory does not grow with the input: rows are read, converted and written in batches. The statistics are
bounded too: text lengths go into a histogram (exact below 4096 characters, within 1% above), and distinct
queries are counted exactly as a set of 64-bit hashes up to 2^20 of them; past that the set keeps only
hashes whose low bits are zero (adaptive sampling), so the count becomes an estimate (about 0.2% error) and
`distinct_queries_exact` says false.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import math
import operator
import queue
import reprlib
import threading
import time
from pathlib import Path

import numpy as np
import orjson

from embedtune.config import ConvertConfig
from embedtune.data import (
    FILLER_CHARS,
    OPTIONAL,
    OPTIONAL_FIELDS,
    canonical,
    check_label,
    check_row,
    check_text,
    check_texts,
    format_problems,
    has_media_tag,
)
from embedtune.errors import DataError, EmbedtuneError
from embedtune.images import check_row_images
from embedtune.messages import from_messages
from embedtune.objectives import objective
from embedtune.outputs import OutputSet, refuse_inputs
from embedtune.progress import say
from embedtune.readers import Bad, guarded, sources

FOLD_ROWS = 1 << 16  # output rows between folds of the per-row statistics into the totals
DISTINCT_CAP = 1 << 20  # exact distinct-query hashes kept before sampling starts
EXACT_CHARS = 4096  # text lengths below this are histogrammed exactly; above, in 1% log bins
_NL = orjson.OPT_APPEND_NEWLINE
_STR = {str}
_first = operator.itemgetter(0)  # the first character of a (non-empty) text


class _Stop(Exception):
    """Raised inside the loop when `--on-error fail` has collected `max_errors` problems."""


# --------------------------------------------------------------------------------------------------------
# Shapes: one function per input shape, `row -> (canonical rows, problems, filtered count)`. These are the
# reference semantics; the fast loops in `Converter` only accept rows these functions accept and write the
# same bytes for them.


def _as_list(value, missing=None):
    """One text stands for a list of one (CSV cells, some hub datasets); None becomes `missing`."""
    return missing if value is None else [value] if isinstance(value, str) else value


def _from_canonical(row: dict, cfg: ConvertConfig):
    problems = check_row(row, cfg.loss_type)
    return ([] if problems else [canonical(row)]), problems, 0


def _from_mteb(row: dict, cfg: ConvertConfig):
    problems = [p] if (p := check_text(row.get("query"), "query")) else []
    positives = _as_list(row.get("positive"))
    if not positives:
        problems.append("positive: no positive (an MTEB row needs at least one; nothing converted)")
    else:
        problems += check_texts(positives, "positive")
    negatives = _as_list(row.get("negative"), [])
    problems += check_texts(negatives, "negative")
    if problems:
        return [], problems, 0
    return [{"query": row["query"], "response": p, "rejected_response": negatives} for p in positives], [], 0


def _from_sts(row: dict, cfg: ConvertConfig):
    problems = [p for f in ("sentence1", "sentence2") if (p := check_text(row.get(f), f))]
    field = "score" if row.get("score") is not None or "label" not in row else "label"
    score = row.get(field)
    if score is None:
        problems.append(f"{field}: missing")
    elif p := check_label(score, "", field):
        problems.append(p)
    elif field == "score" and abs(score) > cfg.score_scale:
        scale = f"{cfg.score_scale:g}"
        problems.append(
            f"score: {score} is outside [-{scale}, {scale}] (label = score / score_scale {scale})"
        )
    if problems:
        return [], problems, 0
    label = score / cfg.score_scale if field == "score" else score
    out = {"query": row["sentence1"], "response": row["sentence2"]}
    if cfg.sts_positive_threshold > 0:
        if label < cfg.sts_positive_threshold:
            return [], [], 1  # not a positive pair: filtered, not a problem
    else:
        out["label"] = label
    problems = [p] if "label" in out and (p := check_label(label, cfg.loss_type)) else []
    return ([] if problems else [out]), problems, 0


def _from_pairs(row: dict, cfg: ConvertConfig):
    problems = [p for f in ("anchor", "positive") if (p := check_text(row.get(f), f))]
    negatives = _as_list(row.get("negative"), [])
    problems += check_texts(negatives, "negative")
    numbered = sorted(
        (k for k in row if k.startswith("negative_") and k[9:].isdigit()), key=lambda k: int(k[9:])
    )
    more = []  # negative_1, negative_2, ...: kept apart until `negative` is known to be a list of texts
    for k in numbered:
        if row[k] is not None:
            if p := check_text(row[k], k):
                problems.append(p)
            else:
                more.append(row[k])
    if problems:
        return [], problems, 0
    return (
        [{"query": row["anchor"], "response": row["positive"], "rejected_response": [*negatives, *more]}],
        [],
        0,
    )


def _from_messages(row: dict, cfg: ConvertConfig):
    return from_messages(row, cfg.loss_type)


SHAPES = {"canonical": _from_canonical, "mteb": _from_mteb, "sts": _from_sts, "pairs": _from_pairs,
          "messages": _from_messages}  # fmt: skip


def detect_format(keys) -> str | None:
    """The input shape a row with these keys has, or None."""
    keys = set(keys)
    if {"query", "response"} <= keys:
        return "canonical"
    if {"query", "positive"} <= keys:
        return "mteb"
    if {"sentence1", "sentence2"} <= keys:
        return "sts"
    if {"anchor", "positive"} <= keys:
        return "pairs"
    if {"messages", "positive_messages"} <= keys:
        return "messages"
    return None


# --------------------------------------------------------------------------------------------------------
# Statistics with bounded memory.


class LengthHistogram:
    """Counts of text lengths: exact below `EXACT_CHARS`, then 1%-wide log bins (about 1.3k of them)."""

    LOG_STEP = math.log(1.01)

    def __init__(self):
        self.counts = np.zeros(EXACT_CHARS + 2048, dtype=np.int64)
        self.max = 0

    def add(self, lengths: list[int]) -> None:
        if not lengths:
            return
        a = np.asarray(lengths, dtype=np.int64)
        self.max = max(self.max, int(a.max()))
        big = a >= EXACT_CHARS
        if big.any():
            a = a.copy()
            a[big] = EXACT_CHARS + (np.log(a[big] / EXACT_CHARS) / self.LOG_STEP).astype(np.int64)
        self.counts += np.bincount(a, minlength=len(self.counts))[: len(self.counts)]

    def summary(self) -> dict | None:
        """Nearest-rank percentiles p50/p90/p99 (a log bin reports its lower edge) and the exact max."""
        total = int(self.counts.sum())
        if not total:
            return None
        cum = np.cumsum(self.counts)
        out = {}
        for q in (50, 90, 99):
            b = int(np.searchsorted(cum, math.ceil(q / 100 * total)))
            out[f"p{q}"] = (
                b if b < EXACT_CHARS else min(self.max, round(EXACT_CHARS * 1.01 ** (b - EXACT_CHARS)))
            )
        out["max"] = self.max
        return out


class _HashingWriter:
    """Writes byte blocks to a file and sha256-hashes them in a background thread.

    Both `write` and `sha256.update` release the GIL, so they overlap with parsing the next batch. The queue
    is bounded (memory stays constant); a write error is raised in the caller at its next `write`/`close`.
    """

    def __init__(self, f):
        self.f, self.sha, self.error = f, hashlib.sha256(), None
        self.queue: queue.Queue = queue.Queue(maxsize=4)
        self.thread = threading.Thread(target=self._work, name="convert-writer", daemon=True)
        self.thread.start()

    def _work(self) -> None:
        while (data := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.f.write(data)
                    self.sha.update(data)
                except BaseException as e:  # handed to the main thread
                    self.error = e

    def write(self, data: bytes) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(data)

    def stop(self) -> None:
        """Finish the thread without raising (cleanup after another error)."""
        with contextlib.suppress(BaseException):
            self.close()

    def close(self) -> None:
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
        if self.error is not None:
            raise self.error


class Converter:
    """Converts batches of rows, writing canonical JSONL and keeping the statistics."""

    def __init__(self, cfg: ConvertConfig, out, rejected):
        self.cfg, self.out, self.rejected = cfg, _HashingWriter(out), rejected
        self.label_required = objective(cfg.loss_type).label_required
        self.parts: list[bytes] = []  # output lines of the current batch
        self.qlens: list[int] = []  # per output row
        self.rlens: list[int] = []
        self.nlens: list[int] = []  # per negative of each output row
        self.nnegs: list[int] = []  # negatives per output row
        self.labels: list[float] = []
        self.hist = {
            "query": LengthHistogram(),
            "response": LengthHistogram(),
            "rejected_response": LengthHistogram(),
        }
        self.queries: set[int] = set()  # 64-bit hashes of distinct queries (sampled once past DISTINCT_CAP)
        self.qmask = 0  # a hash h is kept iff h & qmask == 0
        self.rows = self.input_rows = self.rejected_rows = self.filtered_rows = 0
        self.images = 0  # images read and decoded (rows with `images`)
        self.neg_min, self.neg_max, self.neg_sum = None, 0, 0
        self.label_min = self.label_max = None
        self.label_sum = 0.0
        self.labelled = 0
        self.problems: list[str] = []  # `LOCATION: field: reason` (all in fail mode, the first few in skip)
        self.sts_max_score = None
        self.files: list[dict] = []

    # -- the loops ------------------------------------------------------------------------------------
    def convert(self, name: str, where: str, batches) -> None:
        shape = None if self.cfg.format == "auto" else self.cfg.format
        counted = self.input_rows
        for numbers, rows in guarded(name, batches):
            if shape is None:
                first = next(
                    ((n, r) for n, r in zip(numbers, rows, strict=True) if isinstance(r, dict)), None
                )
                if first is not None:
                    shape = detect_format(first[1])
                    if shape is None:
                        raise EmbedtuneError(
                            f"{where.format(name=name, n=first[0])}: cannot tell the input shape from the keys "
                            f"{sorted(first[1])}; expected canonical (query, response), mteb (query, positive, "
                            "negative), sts (sentence1, sentence2, score) or pairs (anchor, positive, negative); "
                            "pass --format"
                        )
            self.input_rows += len(rows)
            # no object seen yet (only bad lines so far): `_slow` reports them without needing the shape
            loop = {"mteb": self._mteb_batch, "canonical": self._canonical_batch}.get(shape, self._slow_batch)
            loop(name, where, shape, numbers, rows)
            self.flush()
        self.files.append({"name": name, "format": shape or "empty", "input_rows": self.input_rows - counted})

    def _slow_batch(self, name, where, shape, numbers, rows):
        for n, row in zip(numbers, rows, strict=True):
            self._slow(name, where, shape, n, row)

    def _slow(self, name, where, shape, n, row):
        if isinstance(row, Bad):
            out, problems, filtered = [], [row.reason], 0
        elif not isinstance(row, dict):
            out, problems, filtered = [], [f"row: must be a JSON object, got {type(row).__name__}"], 0
        else:
            out, problems, filtered = SHAPES[shape](row, self.cfg)
            if shape == "sts" and not problems and isinstance(row.get("score"), (int, float)):
                s = abs(row["score"])
                self.sts_max_score = s if self.sts_max_score is None else max(self.sts_max_score, s)
        self.filtered_rows += filtered
        if not problems and any(r.get("images") for r in out):
            out, problems = self._images(name, out)
        if problems:
            self._reject(where.format(name=name, n=n), row, problems)
        for r in out:
            extra = {k: r[k] for k in OPTIONAL_FIELDS if k in r}
            self._emit(r["query"], r["response"], r.get("rejected_response") or [], r.get("label"), extra)

    def _images(self, name: str, out: list[dict]) -> tuple[list[dict], list[str]]:
        """Each output row's images resolved (relative paths from the file's folder: absolute in the output, so
        later steps find them wherever the rows go), read and decoded (`images.check_row_images`)."""
        base = Path(name).parent
        checked, problems = [], []
        for r in out:
            infos, bad = check_row_images(r, base, self.cfg.image_root, self.cfg.max_image_pixels)
            problems += bad
            checked.append({**r, "images": [x.ref for x in infos]} if infos else r)
            self.images += len(infos)
        return ([], problems) if problems else (checked, [])

    def _mteb_batch(self, name, where, shape, numbers, rows):
        # The hot loop (1M rows in a few seconds): C-level checks (all(), map(type)) decide that a row is
        # valid; anything unusual goes to `_slow`, which reports the exact problem or converts it.
        dumps, parts, add_q, mask = orjson.dumps, self.parts, self.queries.add, self.qmask
        qlens, rlens, nlens, nnegs = self.qlens, self.rlens, self.nlens, self.nnegs
        for n, row in zip(numbers, rows, strict=True):
            try:
                q, pos, neg = row["query"], row["positive"], row.get("negative")
            except (KeyError, TypeError, AttributeError):
                self._slow(name, where, shape, n, row)
                continue
            # Every text at once (`texts`): a str, non-empty, with a first character that is printable and
            # not a space, hence visible (see `data.is_blank`). A text that starts blank goes to `_slow`,
            # which scans it. Five C-level calls per row, whatever its number of texts.
            if not (
                type(pos) is list
                and pos
                and type(neg) is list
                and all(texts := [q, *pos, *neg])
                and set(map(type, texts)) == _STR
                and (f := "".join(map(_first, texts))).isprintable()
                and " " not in f
                and FILLER_CHARS.isdisjoint(f)
                and not has_media_tag(texts)  # `_slow` checks the tags (images refused without `images`)
            ):
                self._slow(name, where, shape, n, row)
                continue
            lq, nn, nl, k = len(q), len(neg), list(map(len, neg)), len(parts)
            try:
                for p in pos:
                    parts.append(
                        dumps({"query": q, "response": p, "rejected_response": neg}, option=_NL)
                        if nn
                        else dumps({"query": q, "response": p}, option=_NL)
                    )
                    qlens.append(lq)
                    rlens.append(len(p))
                    nnegs.append(nn)
                    nlens += nl
            except TypeError:  # a lone surrogate (JSON lists are read by Python's json): `_slow` rejects it
                done = len(parts) - k  # positives already written for this row: take them back
                del parts[k:], qlens[len(qlens) - done :], rlens[len(rlens) - done :]
                del nnegs[len(nnegs) - done :], nlens[len(nlens) - done * nn :]
                self._slow(name, where, shape, n, row)
            else:
                h = hash(q)
                if not h & mask:
                    add_q(h)

    def _canonical_batch(self, name, where, shape, numbers, rows):
        loss, required = self.cfg.loss_type, self.label_required
        for n, row in zip(numbers, rows, strict=True):
            try:
                q, r, neg, label = (
                    row["query"],
                    row["response"],
                    row.get("rejected_response"),
                    row.get("label"),
                )
            except (KeyError, TypeError, AttributeError):
                self._slow(name, where, shape, n, row)
                continue
            if (
                (neg is None or type(neg) is list)
                and OPTIONAL.isdisjoint(row)  # rows with optional fields: `_slow` checks and keeps them
                and all(texts := [q, r, *neg] if neg else [q, r])
                and set(map(type, texts)) == _STR
                and (f := "".join(map(_first, texts))).isprintable()
                and " " not in f
                and FILLER_CHARS.isdisjoint(f)
                and not has_media_tag(texts)  # `_slow` checks the tags (images refused without `images`)
                and (
                    (label is None and not required)
                    or (type(label) in (int, float) and check_label(label, loss) is None)
                )
            ):
                try:
                    self._emit(q, r, neg or [], label)
                except TypeError:  # a lone surrogate: `_slow` rejects it
                    self._slow(name, where, shape, n, row)
            else:
                self._slow(name, where, shape, n, row)

    # -- output and bookkeeping -----------------------------------------------------------------------
    def _emit(self, q: str, r: str, neg: list, label, extra: dict | None = None) -> None:
        """Append one output row (`extra`: its optional fields, already checked); a TypeError (a lone
        surrogate: the fast loop's callers send the row to `_slow`, whose `check_text` refuses it) leaves
        nothing behind."""
        row = {"query": q, "response": r}
        if neg:
            row["rejected_response"] = neg
        if label is not None:
            row["label"] = label
        if extra:
            row.update(extra)
        self.parts.append(orjson.dumps(row, option=_NL))
        if label is not None:
            self.labels.append(label)
        h = hash(q)
        if not h & self.qmask:
            self.queries.add(h)
        self.qlens.append(len(q))
        self.rlens.append(len(r))
        self.nnegs.append(len(neg))
        self.nlens += map(len, neg)

    def _reject(self, location: str, row, problems: list[str]) -> None:
        lines = [f"{location}: {p}" for p in problems]
        self.rejected_rows += 1
        if self.rejected is None:
            self.problems += lines
            if len(self.problems) >= self.cfg.max_errors:
                raise _Stop
            return
        if len(self.problems) < self.cfg.max_errors:
            self.problems += lines
        raw = row.raw.decode("utf-8", "replace").rstrip("\n") if isinstance(row, Bad) else row
        record = {"location": location, "problems": problems, "row": raw}
        try:
            line = orjson.dumps(record, default=str, option=_NL)
        except TypeError:  # nested past orjson's 255 levels, or lone surrogates: keep a readable summary
            record["row"] = reprlib.repr(raw)
            line = orjson.dumps(record, default=str, option=_NL | orjson.OPT_PASSTHROUGH_SUBCLASS)
        self.rejected.write(line)

    def flush(self, final: bool = False) -> None:
        """Write the batch's output; fold the per-row statistics into the totals every FOLD_ROWS rows."""
        if self.parts:
            self.out.write(b"".join(self.parts))
            self.rows += len(self.parts)
            self.parts.clear()
        if len(self.nnegs) < FOLD_ROWS and not final:
            return
        if self.nnegs:
            self.neg_min = min(self.nnegs) if self.neg_min is None else min(self.neg_min, min(self.nnegs))
            self.neg_max = max(self.neg_max, max(self.nnegs))
            self.neg_sum += sum(self.nnegs)
        if self.labels:
            self.labelled += len(self.labels)
            self.label_sum += math.fsum(self.labels)
            lo, hi = min(self.labels), max(self.labels)
            self.label_min = lo if self.label_min is None else min(self.label_min, lo)
            self.label_max = hi if self.label_max is None else max(self.label_max, hi)
        for key, lens in (("query", self.qlens), ("response", self.rlens), ("rejected_response", self.nlens)):
            self.hist[key].add(lens)
            lens.clear()
        self.nnegs.clear()
        self.labels.clear()
        while len(self.queries) > DISTINCT_CAP:  # keep half the hash space: bounded memory, estimated count
            self.qmask = (self.qmask << 1) | 1
            self.queries = {h for h in self.queries if not h & self.qmask}

    def stats(self) -> dict:
        warnings = []
        if self.sts_max_score is not None and self.cfg.score_scale > 1 and self.sts_max_score <= 1:
            warnings.append(
                f"every STS score is within [0, 1] but --score-scale is {self.cfg.score_scale:g}, so labels end "
                "up small; pass --score-scale 1 if the scores are already normalized"
            )
        return {
            "source": self.cfg.source,
            "files": self.files,
            "input_rows": self.input_rows,
            "rows": self.rows,
            "rejected_rows": self.rejected_rows,
            "filtered_rows": self.filtered_rows,
            "images": self.images,
            "distinct_queries": len(self.queries) * (self.qmask + 1),
            "distinct_queries_exact": self.qmask == 0,
            "negatives_per_row": {
                "min": self.neg_min or 0,
                "mean": round(self.neg_sum / self.rows, 4) if self.rows else 0.0,
                "max": self.neg_max,
            },
            "labelled_rows": self.labelled,
            "label": None
            if not self.labelled
            else {
                "min": self.label_min,
                "mean": round(self.label_sum / self.labelled, 6),
                "max": self.label_max,
            },
            "text_chars": {k: h.summary() for k, h in self.hist.items()},
            "fingerprint": "sha256:" + self.out.sha.hexdigest(),
            "warnings": warnings,
        }


def run(cfg: ConvertConfig) -> dict:
    """Convert `cfg.source` to canonical JSONL at `cfg.output`; returns the statistics (also saved as JSON).

    Raises `DataError` (with `FILE:LINE: field: reason` lines) for bad rows under `on_error="fail"`, and
    `EmbedtuneError` for a missing source, an unknown shape or option; in both cases nothing is written.
    """
    t0 = time.perf_counter()  # the knobs were checked when cfg was built (knobs.py)
    output = Path(cfg.output)
    stats_path = Path(f"{cfg.output}.stats.json")
    rejected_path = Path(f"{cfg.output}.rejected.jsonl")
    skip = cfg.on_error == "skip"
    refuse_inputs({"source": cfg.source}, {"output": output, "stats": stats_path, "rejected": rejected_path})
    inputs = sources(cfg.source, cfg.hf_split, {p.resolve() for p in (output, stats_path, rejected_path)})
    try:
        # rows, stats and rejected rows appear together or not at all (a stale .rejected.jsonl from an earlier
        # skip run goes with the commit: it would mislead); the stack exits first: the writer thread is done
        with OutputSet() as outs, contextlib.ExitStack() as stack:
            out = outs.open(output)
            rejected = outs.open(rejected_path) if skip else None
            if not skip:
                outs.remove(rejected_path)
            stats_file = outs.open(stats_path)
            conv = Converter(cfg, out, rejected)
            stack.callback(conv.out.stop)  # runs before out's own exit: the thread is done with the file
            hint = "fix the data, or pass --on-error skip to write the good rows and a .rejected.jsonl"
            gc_enabled = gc.isenabled()
            gc.disable()  # rows are acyclic; the collector would only rescan each batch's fresh objects (~30%)
            try:
                for name, where, batches in inputs:
                    conv.convert(name, where, batches())
            except _Stop:
                raise DataError(
                    format_problems(conv.problems[: cfg.max_errors], stopped=True, hint=hint)
                ) from None
            finally:
                if gc_enabled:
                    gc.enable()
            conv.flush(final=True)
            conv.out.close()
            if conv.problems and not skip:
                raise DataError(format_problems(conv.problems, hint=hint))
            if conv.rows == 0:
                why = [f"{conv.input_rows} input rows"]
                if conv.rejected_rows:
                    why.append(f"{conv.rejected_rows} rejected, e.g. {conv.problems[0]}")
                if conv.filtered_rows:
                    why.append(
                        f"{conv.filtered_rows} STS pairs below --sts-positive-threshold {cfg.sts_positive_threshold:g}"
                    )
                raise EmbedtuneError(f"{cfg.source}: no rows to write ({'; '.join(why)})")
            stats = conv.stats()
            stats_file.write(orjson.dumps(stats, option=orjson.OPT_INDENT_2 | _NL))
    except OSError as e:  # reading errors are DataErrors already (see `guarded`): this is the output side
        raise EmbedtuneError(f"{cfg.output}: cannot write: {e}") from None
    for w in stats["warnings"]:
        say("convert", f"warning: {w}")
    if conv.rejected_rows:
        say(
            "convert",
            f"{conv.rejected_rows} of {conv.input_rows} input rows rejected (reasons in {rejected_path})",
        )
    return {
        **stats,
        "output": str(output),
        "stats_path": str(stats_path),
        "rejected_path": str(rejected_path) if skip else None,
        "seconds": round(time.perf_counter() - t0, 3),
    }
