"""Input readers for `embedtune convert`: local files, folders and Hugging Face datasets, read in batches.

Each reader yields batches `(numbers, rows)`: `numbers` are line numbers (text files) or 1-based row numbers
(Parquet, Hugging Face), so every problem can be reported as `FILE:LINE`; a row is whatever the file holds
(usually a dict), or a `Bad` for a line that could not be parsed at all. Memory does not grow with the input.

    for name, where, batches in sources("data/", hf_split="train", exclude=set()):
        for numbers, rows in guarded(name, batches()):
            ...

| kind | files | notes |
|---|---|---|
| jsonl | `.jsonl`, `.ndjson` (`.gz` too) | blank lines allowed; a bad line becomes a `Bad`, the rest is read |
| json | `.json` (`.gz` too) | a list of objects, parsed incrementally (a `.json` holding JSON Lines works) |
| csv / tsv | `.csv`, `.tsv` (`.gz` too) | `label` / `score` cells become numbers, list columns accept JSON lists |
| parquet | `.parquet` | read by record batches |
| hf | `name[:subset]` | `datasets` in streaming mode (the `[hub]` extra) |
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import orjson

from embedtune.errors import DataError, EmbedtuneError
from embedtune.io import READ_ERRORS, open_input

FILE_KINDS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
}
BATCH_BYTES = 1 << 20  # text read per batch (~1k MTEB rows: small batches stay in CPU cache, ~15% faster)
BATCH_ROWS = 2048  # rows per batch for Parquet, Hugging Face datasets and JSON lists


class Bad:
    """A record that could not even be parsed (bad JSON line): its raw text and why."""

    __slots__ = ("raw", "reason")

    def __init__(self, raw, reason: str):
        self.raw, self.reason = raw, reason


def open_text(path: Path, binary: bool = False):
    raw = open_input(path)
    return raw if binary else io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")


def jsonl_batches(path: Path):
    loads = orjson.loads
    with open_text(path, binary=True) as f:
        first = 0
        while lines := f.readlines(BATCH_BYTES):
            try:  # fast path: every line parses, so line numbers are contiguous
                rows = list(map(loads, lines))
                yield range(first + 1, first + 1 + len(lines)), rows
            except orjson.JSONDecodeError:
                numbers, rows = [], []
                for i, line in enumerate(lines, first + 1):
                    try:
                        rows.append(loads(line))
                    except orjson.JSONDecodeError as e:
                        if not line.strip():
                            continue  # blank lines are allowed
                        rows.append(Bad(line, f"invalid JSON: {e.msg} (column {e.colno})"))
                    numbers.append(i)
                yield numbers, rows
            first += len(lines)


def json_batches(path: Path):
    """A JSON file: a list of objects, read incrementally (or JSON Lines with a .json name)."""
    with open_text(path) as f:
        head = f.read(1 << 16).lstrip()
    if not head.startswith("["):
        if head.startswith("{"):  # many `.json` files on the hub are really JSON Lines
            yield from jsonl_batches(path)
            return
        raise DataError(f"{path}:1: invalid JSON: expected a list of objects")
    decoder = json.JSONDecoder()
    with open_text(path) as f:
        buf, pos, line, eof = "", 0, 1, False

        def more():  # append text to the buffer; False at end of file
            nonlocal buf, pos, eof
            chunk = f.read(max(BATCH_BYTES, len(buf) - pos))
            buf, pos, eof = buf[pos:] + chunk, 0, not chunk
            return bool(chunk)

        def skip_ws():  # move past whitespace, counting lines; returns the next char or "" at EOF
            nonlocal pos, line
            while True:
                start = pos
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                line += buf.count("\n", start, pos)
                if pos < len(buf) or not more():
                    return buf[pos] if pos < len(buf) else ""

        more()
        skip_ws()
        pos += 1  # the "["
        numbers, rows, expect_item = [], [], True
        while True:
            c = skip_ws()
            if c == "]":
                break
            if c == "":
                raise DataError(f"{path}:{line}: invalid JSON: the list is not closed with ']'")
            if not expect_item:
                if c != ",":
                    raise DataError(f"{path}:{line}: invalid JSON: expected ',' or ']' between list items")
                pos += 1
                expect_item = True
                continue
            while True:
                try:
                    obj, end = decoder.raw_decode(buf, pos)
                    break
                except RecursionError:
                    raise DataError(
                        f"{path}:{line}: invalid JSON: nested too deeply (the rest of a JSON list cannot be "
                        "read past it)"
                    ) from None
                except json.JSONDecodeError as e:
                    bad_line = line + buf.count("\n", pos, e.pos)  # before `more()` moves the buffer
                    # The end of the buffer cut the item (a string runs past it, or the error sits in its
                    # last bytes: a cut literal or escape): read more and retry. Anything else is bad JSON.
                    cut = e.msg.startswith("Unterminated") or e.pos >= len(buf) - 16
                    if not cut or eof or not more():
                        raise DataError(
                            f"{path}:{bad_line}: invalid JSON: {e.msg} (the rest of a JSON list cannot be read "
                            "past it; JSON Lines files can skip bad lines)"
                        ) from None
            numbers.append(line)
            rows.append(obj)
            line += buf.count("\n", pos, end)
            pos, expect_item = end, False
            if len(rows) >= BATCH_ROWS:
                yield numbers, rows
                numbers, rows = [], []
        if rows:
            yield numbers, rows


def csv_value(key: str, value):
    """CSV cells are text: numbers for label/score, JSON lists or single texts for the list columns."""
    if value is None or key is None:
        return value
    if key in ("label", "score"):
        if value == "":
            return None
        with contextlib.suppress(ValueError):
            return int(value)
        with contextlib.suppress(ValueError):
            return float(value)
    elif key in ("rejected_response", "negative", "positive"):
        if value == "":
            return None
        if value.startswith("["):
            with contextlib.suppress(orjson.JSONDecodeError):
                return orjson.loads(value)
        return [value] if key == "rejected_response" else value  # the shapes accept one text for a list
    return value


def csv_batches(path: Path, delimiter: str):
    csv.field_size_limit(1 << 30)
    with open_text(path) as f:
        reader = csv.DictReader(f, delimiter=delimiter, strict=True)  # strict: a quote left open is an error
        numbers, rows = [], []
        records = iter(reader)
        shown = "a tab" if delimiter == "\t" else "a comma"
        while True:
            start = reader.line_num + 1  # a quote left open is reported where its record starts, not at EOF
            try:
                record = next(records)
            except StopIteration:
                break
            except csv.Error as e:
                raise DataError(
                    f"{path}:{max(start, 2)}: invalid CSV: {e} (in the record starting here)"
                ) from None
            numbers.append(max(start, 2))  # a record over several lines is named by its first
            extra = record.pop(None, None)  # cells past the header's columns: a text's unquoted delimiter
            if extra:
                cells = [*(v or "" for v in record.values()), *extra]
                rows.append(Bad(delimiter.join(cells).encode(), f"{len(extra)} more cell(s) than the header's "
                                f"{len(reader.fieldnames)} columns ({shown} inside a text needs quotes)"))  # fmt: skip
            else:
                rows.append({k: csv_value(k, v) for k, v in record.items()})
            if len(rows) >= BATCH_ROWS:
                yield numbers, rows
                numbers, rows = [], []
        if rows:
            yield numbers, rows


def parquet_batches(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file: {e}") from None
    first = 0
    for batch in pf.iter_batches(batch_size=BATCH_ROWS):
        rows = batch.to_pylist()
        yield range(first + 1, first + 1 + len(rows)), rows
        first += len(rows)


def hf_batches(spec: str, split: str):
    """A Hugging Face dataset `name[:subset]`, streamed (nothing is downloaded up front)."""
    try:
        import datasets
    except ImportError:
        raise EmbedtuneError(
            f"{spec}: not a local file or folder; reading Hugging Face datasets needs the `datasets` package "
            "(pip install 'embedtune[hub]')"
        ) from None
    name, _, subset = spec.partition(":")
    hint = (
        " (for ms-swift's `stsb:positive` use --sts-positive-threshold 0.75)" if subset == "positive" else ""
    )
    try:
        stream = iter(datasets.load_dataset(name, subset or None, split=split, streaming=True))
        first = 0
        while True:
            rows = [row for _, row in zip(range(BATCH_ROWS), stream, strict=False)]
            if not rows:
                return
            yield range(first + 1, first + 1 + len(rows)), rows
            first += len(rows)
    except Exception as e:  # datasets raises many types (not found, offline, bad split, auth)
        reason = (str(e).strip().splitlines() or [""])[0]
        raise EmbedtuneError(
            f"{spec}: not a local file or folder, and loading it as a Hugging Face dataset (split {split!r}) "
            f"failed: {type(e).__name__}: {reason}{hint}"
        ) from None


def guarded(name: str, batches):
    """Iterate a reader, turning unreadable input (not UTF-8, broken gzip or Parquet) into a `DataError`."""
    it = iter(batches)
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except UnicodeDecodeError as e:
            raise DataError(f"{name}: not UTF-8 text ({e.reason})") from None
        except READ_ERRORS as e:
            raise DataError(f"{name}: cannot read: {e}") from None
        except Exception as e:
            if type(e).__module__.startswith("pyarrow"):
                raise DataError(f"{name}: cannot read: {e}") from None
            raise
        yield item


def file_kind(path: Path) -> str | None:
    suffixes = path.suffixes[-2:] if path.suffix == ".gz" else path.suffixes[-1:]
    kind = FILE_KINDS.get(suffixes[0].lower()) if suffixes else None
    return None if kind == "parquet" and path.suffix == ".gz" else kind


def sources(source: str, hf_split: str, exclude: set[Path]) -> list[tuple[str, str, object]]:
    """`(display name, where-format, batch iterator factory)` for each input file (or the HF dataset)."""
    path = Path(source).expanduser()
    readers = {
        "jsonl": jsonl_batches,
        "json": json_batches,
        "csv": lambda p: csv_batches(p, ","),
        "tsv": lambda p: csv_batches(p, "\t"),
        "parquet": parquet_batches,
    }
    if path.is_dir():
        found = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and file_kind(p)
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
            and not p.name.endswith((".stats.json", ".rejected.jsonl"))  # convert's own side files
            and p.resolve() not in exclude
        )
        seen: set[Path] = set()  # a file linked twice into the folder is read once
        files = [p for p in found if not (p.resolve() in seen or seen.add(p.resolve()))]
        if not files:
            raise EmbedtuneError(f"{source}: no JSONL / JSON / CSV / TSV / Parquet files in this folder")
    elif path.is_file():
        if not file_kind(path):
            raise EmbedtuneError(
                f"{source}: unsupported file type {''.join(path.suffixes) or '(none)'} "
                "(expected .jsonl, .json, .csv, .tsv or .parquet, text ones optionally .gz)"
            )
        files = [path]
    elif path.exists():
        raise EmbedtuneError(f"{source}: not a regular file (a FIFO, socket or device)")
    elif source.startswith((".", "/", "~")) or file_kind(path) or source.count("/") > 1 or not source:
        raise EmbedtuneError(f"{source}: file not found")
    else:
        return [(source, "{name}:row {n}", lambda: hf_batches(source, hf_split))]
    out = []
    for p in files:
        kind = file_kind(p)
        where = "{name}:row {n}" if kind == "parquet" else "{name}:{n}"
        out.append((str(p), where, lambda p=p, kind=kind: readers[kind](p)))
    return out
