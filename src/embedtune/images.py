"""The images of a row: where each one is, whether it decodes, what it hashes to, and its pixels.

A row's `images` (`embedtune.data`) are matched in order to the `<image>` tags of its texts. Each entry is:

- a local path: absolute, or relative to the data file's folder (`base`); with `image_root` set, a path that
  resolves (symlinks followed) outside that folder is refused, so a row cannot read `../../etc/passwd`;
- a data URI (`data:image/png;base64,...`), decoded here;
- a remote URI (`https://`, `http://`, `s3://`, `gs://`, ...), passed through as is and read when needed
  (http(s) with the standard library; any other scheme with fsspec and the scheme's package, e.g. s3fs).

`check_images(rows, ...)` reads and decodes every image of every row once, before any step writes or trains
(a thread pool: PIL releases the GIL while decoding), and raises one `DataError` naming `FILE:LINE:
images[i]: reason` for: a missing or unreadable file, bytes that are no image (a text file named .png), a
truncated file, a zero-size image, dimensions too large to decode safely (PIL's decompression-bomb limit),
a path outside `image_root`. An image over `max_image_pixels` is not refused: `load` resizes it down to that
many pixels, keeping its aspect. It returns each image's `ImageInfo`: the sha256 of its bytes (what the
leakage guard and duplicate-free batches compare, never the path) and its size as loaded.

`<video>` and `<audio>` tags are refused by the row rules (`data.check_optional`): not supported yet.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import io
import os
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson

from embedtune.data import MAX_ERRORS, format_problems, images_by_text
from embedtune.errors import DataError

MAX_IMAGE_PIXELS = 4096 * 4096  # the default of every step's `max_image_pixels`
REMOTE_TIMEOUT_S = 60


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    ref: str  # where it is: a resolved absolute path, a data URI or a remote URI
    sha256: str  # of its bytes: equal bytes, equal image, whatever the path
    width: int  # as `load` gives it (after the resize to max_image_pixels)
    height: int


class ImageError(Exception):
    """One image's problem, the reason only (the caller adds FILE:LINE:field)."""


def is_data_uri(ref: str) -> bool:
    return ref.startswith("data:")


def is_remote(ref: str) -> bool:
    scheme, sep, _ = ref.partition("://")
    return bool(sep) and scheme.isalnum() and scheme.lower() != "file" and len(scheme) > 1


def resolve(ref: str, base: str | os.PathLike = ".", image_root: str = "") -> str:
    """A row's image entry -> where to read it: data and remote URIs unchanged, a local path absolute (relative
    ones from `base`, the data file's folder), refused outside `image_root` when that is set."""
    if is_data_uri(ref) or is_remote(ref):
        return ref
    path = Path(ref.removeprefix("file://")).expanduser()
    if not path.is_absolute():
        path = Path(base) / path
    path = path.resolve()
    if image_root:
        root = Path(image_root).expanduser().resolve()
        if not path.is_relative_to(root):
            raise ImageError(f"{ref!r} resolves to {path}, outside image_root {root}")
    return str(path)


def read_bytes(ref: str) -> bytes:
    """The bytes of a resolved image entry."""
    if is_data_uri(ref):
        head, sep, body = ref.partition(",")
        if not sep or not head.endswith(";base64"):
            raise ImageError("a data URI must be data:<type>;base64,<data>")
        try:
            return base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ImageError(f"data URI: bad base64 ({e})") from None
    if is_remote(ref):
        try:
            if ref.startswith(("http://", "https://")):
                with urllib.request.urlopen(ref, timeout=REMOTE_TIMEOUT_S) as response:  # noqa: S310 (user's URI)
                    return response.read()
            import fsspec

            with fsspec.open(ref, "rb") as f:
                return f.read()
        except ImportError as e:
            raise ImageError(f"{ref}: reading this scheme needs a package ({e})") from None
        except Exception as e:  # noqa: BLE001 (any transport error is this image's problem)
            raise ImageError(f"{ref}: cannot read ({type(e).__name__}: {e})") from None
    try:
        return Path(ref).read_bytes()
    except FileNotFoundError:
        raise ImageError(f"{ref}: no such file") from None
    except OSError as e:
        raise ImageError(f"{ref}: cannot read ({e.strerror or e})") from None


def decode(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS):
    """Bytes -> an RGB PIL image, fully decoded (a truncated file fails here, not in a training step), resized
    down to at most `max_pixels` pixels (aspect kept) when larger."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageError("empty file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width == 0 or img.height == 0:
                raise ImageError(f"zero-size image ({img.width}x{img.height})")
            img.load()
            rgb = img.convert("RGB")
    except Image.DecompressionBombError as e:
        raise ImageError(f"too large to decode safely ({e})") from None
    except UnidentifiedImageError:
        raise ImageError("not an image (the bytes are no format PIL reads)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"does not decode ({e})") from None
    if max_pixels and rgb.width * rgb.height > max_pixels:
        scale = (max_pixels / (rgb.width * rgb.height)) ** 0.5
        size = (max(1, int(rgb.width * scale)), max(1, int(rgb.height * scale)))
        rgb = rgb.resize(size, Image.Resampling.BICUBIC)
    return rgb


def load(ref: str, max_pixels: int = MAX_IMAGE_PIXELS):
    """A resolved image entry -> its RGB PIL image (what the model's processor gets)."""
    return decode(read_bytes(ref), max_pixels)


def probe(ref: str, max_pixels: int = MAX_IMAGE_PIXELS) -> ImageInfo:
    data = read_bytes(ref)
    img = decode(data, max_pixels)
    return ImageInfo(ref, hashlib.sha256(data).hexdigest(), img.width, img.height)


def check_row_images(
    row: dict, base: str | os.PathLike, image_root: str = "", max_image_pixels: int = MAX_IMAGE_PIXELS
) -> tuple[list[ImageInfo], list[str]]:
    """One row's images resolved (relative paths from `base`), read and decoded: their `ImageInfo`s, in tag
    order, and the problems as `images[i]: reason` strings (the infos are complete only without problems)."""
    infos, problems = [], []
    for j, ref in enumerate(row.get("images") or []):
        try:
            infos.append(probe(resolve(ref, base, image_root), max_image_pixels))
        except ImageError as e:
            problems.append(f"images[{j}]: {e}")
    return infos, problems


def with_images(row: dict, infos: list[ImageInfo]) -> dict:
    """The row with `images` rewritten to the resolved entries (absolute paths) and its `_image_info`."""
    return {**row, "images": [x.ref for x in infos], "_image_info": infos} if infos else row


def check_images(
    rows: Sequence[dict],
    source: str,
    image_root: str = "",
    max_image_pixels: int = MAX_IMAGE_PIXELS,
    max_errors: int = MAX_ERRORS,
) -> list[dict]:
    """Every row's images (`check_row_images`, relative paths from `source`'s folder), on a thread pool.

    Returns the rows `with_images`; rows without images unchanged. Raises one `DataError` listing `FILE:LINE:
    images[i]: reason` (at most `max_errors`; the row's `_line`, else its 1-based index).
    """
    base = Path(source).parent
    todo = [i for i, row in enumerate(rows) if row.get("images")]
    if not todo:
        return list(rows)
    workers = min(16, (os.cpu_count() or 1) * 2, len(todo))
    with ThreadPoolExecutor(workers) as pool:
        checked = list(
            pool.map(lambda i: check_row_images(rows[i], base, image_root, max_image_pixels), todo)
        )
    problems = [
        f"{source}:{rows[i].get('_line', i + 1)}: {p}"
        for i, (_, row_problems) in zip(todo, checked, strict=True)
        for p in row_problems
    ]
    if problems:
        raise DataError(format_problems(problems[:max_errors], stopped=len(problems) > max_errors))
    out = list(rows)
    for i, (infos, _) in zip(todo, checked, strict=True):
        out[i] = with_images(rows[i], infos)
    return out


def text_image_hashes(row: dict, base: str | os.PathLike, image_root: str = "") -> list[str]:
    """Per text of the row (query, response, rejected responses): the sha256 of its images' bytes, joined (""
    for a text without images). Only hashed, not decoded: what split's grouping and leakage guard compare.
    Raises `ImageError` with the image's index (`images[i]: reason`)."""
    out, j = [], 0
    for refs in images_by_text(row):
        hashes = []
        for ref in refs:
            try:
                hashes.append(hashlib.sha256(read_bytes(resolve(ref, base, image_root))).hexdigest())
            except ImageError as e:
                raise ImageError(f"images[{j}]: {e}") from None
            j += 1
        out.append(",".join(hashes))
    return out


def with_absolute_paths(line: bytes, base: str | os.PathLike) -> bytes:
    """A JSONL row as it is, unless its `images` hold relative paths: then the row with them absolute (from
    `base`, the data file's folder), so the rows can be written anywhere (as convert writes them)."""
    if b'"images"' not in line:
        return line
    row = orjson.loads(line)
    refs = row.get("images") or []
    fixed = [resolve(r, base) if isinstance(r, str) else r for r in refs]
    return line if fixed == refs else orjson.dumps({**row, "images": fixed}) + b"\n"


def infos_by_text(row: dict) -> list[list[ImageInfo]]:
    """A checked row's `_image_info` split per text (query, response, rejected responses), as `images` is."""
    info, out, start = row.get("_image_info") or [], [], 0
    for refs in images_by_text(row):
        out.append(info[start : start + len(refs)])
        start += len(refs)
    return out
