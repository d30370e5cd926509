"""When two texts are "the same": normalized text keys, and the checks built on them.

    from embedtune.overlap import normalize_text, text_key

    normalize_text("  Ｗhat IS\tthe  capital? ")   # 'what is the capital?'
    text_key("What is the capital?") == text_key("what  is the CAPITAL?")   # True

`normalize_text`: Unicode NFKC (full-width letters, ligatures and compatibility forms folded), casefold, every
run of whitespace collapsed to one space, stripped. `text_key`: a 64-bit blake2b of the normalized text, so
sets of millions of texts cost 8 bytes each (collisions: ~1 in 10^8 for a million pairs compared; harmless).

Three users:
- split's leakage guard (`--exclude-data`, `--drop-eval-overlap`): a train row is dropped when its normalized
  query or positive is a query or positive of the eval split, or a text of an exclusion file (a benchmark's
  test set). `exclusion_keys` reads those files.
- mine: the query's own positives (and the query itself) are never mined as its negatives, compared by key,
  so a corpus copy that differs only in case or spacing is recognised.
- the training fingerprint: train records `train_fingerprint(rows)` in the model's embedtune.json and
  evaluate warns when its eval texts overlap it (`fingerprint_overlap`). It is a bottom-k sketch: the
  FINGERPRINT_SIZE smallest keys of the normalized train queries and positives. Up to that many distinct
  texts it holds all of them and the check is exact; beyond, every eval text whose key is below the largest
  kept key is checked exactly (the sketch holds every train key in that range), which estimates the fraction
  of eval texts seen in training without bias. Bounded: ~40 KB in embedtune.json, whatever the data size.

Files of texts (`read_text_records`, `--exclude-data`, mine's `--corpus`), detected per line, `.gz` allowed:
canonical rows (`query`, `response`, `rejected_response`), BEIR corpus / queries lines (`text` and an optional
`title`), or plain text, one per line (a file whose first line is not a JSON object).
"""

from __future__ import annotations

import hashlib
import heapq
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path

import orjson

from embedtune.errors import DataError
from embedtune.io import read_lines

FINGERPRINT_SIZE = 2048
FINGERPRINT_SCHEME = "bottom-k blake2b-64 of NFKC+casefold+whitespace-collapsed train queries and positives"


def normalize_text(text: str) -> str:
    """NFKC, casefold, whitespace runs collapsed to one space, stripped."""
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    return " ".join(folded.split())


def text_key(text: str, images: str = "") -> int:
    """64-bit key of the normalized text (never 0); with `images` (the content hashes of the text's images,
    `images.text_image_hashes`), of both: the same words over other images are another text."""
    data = normalize_text(text).encode("utf-8", "surrogatepass") + (
        b"\x00" + images.encode() if images else b""
    )
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big") or 1


# --------------------------------------------------------------------------------------------- text files
def read_text_records(path: str | Path) -> Iterator[tuple[int, dict | str]]:
    """Yield `(line number, record)`: a dict for a JSON Lines file, the stripped line for a plain text file.

    The kind is decided by the first non-blank line (a JSON object or not). Blank lines are skipped; a bad
    JSON line in a JSON Lines file raises `DataError` naming `FILE:LINE`.
    """
    path = Path(path)
    is_json = None
    # .gz too; a folder, FIFO or missing file, a failing read: one line (io.read_lines)
    for lineno, line in _lines(path):
        text = line.strip()
        if not text:
            continue
        if is_json is None:
            is_json = text.startswith("{")
        if not is_json:
            yield lineno, text
            continue
        try:
            record = orjson.loads(text)
        except orjson.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON: {e}") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        yield lineno, record


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """The decoded lines of `path`, numbered from 1; a line that is not UTF-8 is a `DataError` naming it
    (decoded line by line, so the number is exact)."""
    for lineno, raw in enumerate(read_lines(path), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        yield lineno, line.removeprefix("\ufeff") if lineno == 1 else line


def beir_text(record: dict) -> str | None:
    """A BEIR corpus line's document text: `title text` (title left out when empty), or None if not BEIR."""
    text = record.get("text")
    if not isinstance(text, str):
        return None
    title = record.get("title")
    return f"{title} {text}".strip() if isinstance(title, str) and title.strip() else text


def record_texts(path, lineno: int, record: dict | str, fields: tuple[str, ...]) -> list[str]:
    """The texts of one record: a plain line; a canonical row's `fields` (`rejected_response` is a list);
    a BEIR line's `title text`. Anything else raises `DataError` naming the line."""
    if isinstance(record, str):
        return [record]
    if "query" in record or "response" in record:
        out = []
        for field in fields:
            value = record.get(field)
            if isinstance(value, str):
                out.append(value)
            elif isinstance(value, list):
                out += [t for t in value if isinstance(t, str)]
        return [t for t in out if t.strip()]
    text = beir_text(record)
    if text is None:
        raise DataError(
            f"{path}:{lineno}: neither a canonical row (query/response) nor a BEIR line (text): "
            f"keys {', '.join(sorted(record)) or 'none'}"
        )
    return [text] if text.strip() else []


def exclusion_keys(paths: Iterable[str]) -> tuple[set[int], int]:
    """Keys of every query and positive (or BEIR text, or line) of the files; and how many texts were read."""
    keys: set[int] = set()
    n = 0
    for path in paths:
        for lineno, record in read_text_records(path):
            for text in record_texts(path, lineno, record, ("query", "response")):
                keys.add(text_key(text))
                n += 1
    return keys, n


def split_paths(value: str) -> list[str]:
    """`"a.jsonl, b.txt"` -> `["a.jsonl", "b.txt"]` (a knob that lists files)."""
    return [p.strip() for p in value.split(",") if p.strip()]


# --------------------------------------------------------------------------------------------- fingerprint
def train_fingerprint(rows: Iterable[dict]) -> dict:
    """What train records in embedtune.json: the bottom-k sketch of its queries' and positives' keys."""
    keys = {text_key(r[f]) for r in rows for f in ("query", "response")}
    kept = sorted(heapq.nsmallest(FINGERPRINT_SIZE, keys))
    return {"scheme": FINGERPRINT_SCHEME, "texts": len(keys), "keys": [f"{k:016x}" for k in kept]}


def fingerprint_overlap(fingerprint: dict | None, texts: Iterable[str]) -> dict | None:
    """How many of `texts` (distinct, normalized) a training fingerprint holds; None without a usable one.

    Returns `eval_texts`, `compared` (all of them when the sketch is exact, else those in its key range),
    `found`, `exact`, and `fraction` = found / compared (an unbiased estimate of the share of eval texts
    that were training texts).
    """
    if not isinstance(fingerprint, dict) or fingerprint.get("scheme") != FINGERPRINT_SCHEME:
        return None
    stored = {int(k, 16) for k in fingerprint.get("keys") or ()}
    exact = int(fingerprint.get("texts", 0)) <= len(stored)
    bound = max(stored, default=0)
    keys = {text_key(t) for t in texts}
    compared = keys if exact else {k for k in keys if k <= bound}
    found = len(compared & stored)
    return {
        "eval_texts": len(keys),
        "compared": len(compared),
        "found": found,
        "exact": exact,
        "fraction": found / len(compared) if compared else 0.0,
    }
