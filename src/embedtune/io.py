"""Small file helpers every step shares: atomic writes and line-numbered JSONL reading.

Outputs are written to a temporary file in the destination folder and renamed into place, so a failed or
killed step never leaves half a file behind (a rename within one filesystem is atomic); the temporary's
naming, mode and cleanup, and results of several files, are `outputs.py`'s.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import stat
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import orjson

from embedtune.errors import DataError, EmbedtuneError
from embedtune.outputs import refuse_folder, temp_beside


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temp file beside `path`; on success rename it to `path`, on error delete it."""
    path = Path(path)
    refuse_folder(path)
    tmp = temp_beside(path)  # the mode open() would give; a dead run's leftovers removed
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def json_bytes(obj: Any) -> bytes:
    """`obj` as indented JSON (numpy values too), with a final newline."""
    return orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY) + b"\n"


GZIP_MAGIC = b"\x1f\x8b"
READ_ERRORS = (OSError, EOFError, zlib.error)  # EIO, a truncated or corrupt gzip stream


def open_input(path: str | os.PathLike) -> IO[bytes]:
    """`path` opened for reading as bytes, gunzipped when it is gzip (`.gz`, or gzip's first bytes under any
    name); one-line errors for a missing path, a folder, a FIFO or device, and a file that cannot be read."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise EmbedtuneError(f"{path}: file not found") from None
    except OSError as e:
        raise EmbedtuneError(f"{path}: cannot read: {e.strerror or e}") from None
    if stat.S_ISDIR(mode):
        raise EmbedtuneError(f"{path}: is a folder, not a file")
    if not stat.S_ISREG(mode):  # a FIFO would block forever, a device never ends
        raise EmbedtuneError(f"{path}: not a regular file (a FIFO, socket or device)")
    try:
        raw = open(path, "rb")  # noqa: SIM115 (the caller closes it)
        gz = raw.read(2) == GZIP_MAGIC
        raw.seek(0)
    except OSError as e:
        raise EmbedtuneError(f"{path}: cannot read: {e.strerror or e}") from None
    if path.suffix == ".gz" and not gz:
        raw.close()
        raise DataError(f"{path}: cannot read: named .gz but not gzip (it does not start with gzip's bytes)")
    return gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw


def read_lines(path: str | os.PathLike) -> Iterator[bytes]:
    """The lines of `path` as bytes (`open_input`); a read that fails part-way (EIO, a gzip stream cut short)
    is a `DataError` naming the file and the line it stopped at."""
    with open_input(path) as f:
        lineno = 0
        while True:
            try:
                line = next(f)
            except StopIteration:
                return
            except READ_ERRORS as e:
                raise DataError(f"{path}:{lineno + 1}: cannot read: {e}") from None
            lineno += 1
            yield line


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_write(path) as f:
        f.write(json_bytes(obj))


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
    """Yield `(line_number, object)` for each non-blank line (`.gz` too); bad JSON raises `FILE:LINE: reason`."""
    path = Path(path)
    for lineno, line in enumerate(read_lines(path), 1):
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
