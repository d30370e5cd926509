"""Small file helpers every step shares: atomic writes and line-numbered JSONL reading.

Outputs are written to a temporary file in the destination folder and renamed into place, so a failed or
killed step never leaves half a file behind (a rename within one filesystem is atomic).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import orjson

from embedtune.errors import DataError, EmbedtuneError


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temp file beside `path`; on success rename it to `path`, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_write(path) as f:
        f.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY) + b"\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, with an error that names the file."""
    path = Path(path)
    if not path.is_file():
        raise EmbedtuneError(f"{path}: file not found")
    try:
        return orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON: {e}") from None


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """Yield `(line_number, object)` for each non-blank line; bad JSON raises `FILE:LINE: reason`."""
    path = Path(path)
    if not path.is_file():
        raise EmbedtuneError(f"{path}: file not found")
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, orjson.loads(line)
            except orjson.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON: {e}") from None


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All rows of a JSONL file (for files that fit in memory: train/eval splits)."""
    return [row for _, row in iter_jsonl(path)]


def write_jsonl(path: str | os.PathLike, rows) -> Path:
    """Write rows (any iterable) as JSONL atomically; returns the path, so a call can stand for the file."""
    with atomic_write(path) as f:
        for row in rows:
            f.write(orjson.dumps(row) + b"\n")
    return Path(path)
