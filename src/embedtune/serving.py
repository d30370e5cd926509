"""Serving a model embedtune wrote, behind the HTTP shapes applications already call.

- `POST /v1/embeddings`: OpenAI's request and response (what the `openai` client, LangChain and LlamaIndex
  send): `input` (a string or a list of strings), `model`, `encoding_format` (`float` | `base64`: little-endian
  float32, what the `openai` client asks for by default), `dimensions` (Matryoshka: the first d components,
  re-normalized; refused unless the model was trained with `matryoshka_dims`), `input_type` (`query` |
  `document`, also Cohere's `search_query` / `search_document`) or sentence-transformers' `prompt_name`: a query
  gets the model's query instruction, a document none.
  An image embedder (Qwen2-VL / Qwen3-VL) also takes images, as data URIs or http(s) URLs (never a server
  path): vLLM's chat form, `messages` with content parts `{"type": "text", "text"}` / `{"type": "image_url",
  "image_url": {"url"}}` (one input; a system message is its instruction), or Jina's, `input` items that are
  objects `{"text"?, "image"?}`. Each image is fetched and decoded on arrival (a bad one: 400 naming it).
- `POST /v1/rerank` and `/rerank`: the Cohere / Jina shape vLLM, TEI and Infinity answer: `query`,
  `documents` (strings, or objects with `text`), `top_n`, `return_documents` -> `results` sorted by
  `relevance_score` (a reranker's P(yes) = sigmoid(logit(yes) - logit(no)); an embedder's cosine of the query
  embedding, with its instruction, and the document embedding).
- `GET /health` (the process is up), `/ready` (the model is loaded; 503 before), `/v1/models`, `/metrics`
  (Prometheus: requests by endpoint and status, latency histogram, texts and padded tokens per forward pass,
  input tokens, errors).

**Dynamic batching** (`Batcher`). Every request is tokenized on arrival (in a thread, off the event loop) and
queued as token id arrays. One worker takes what the queue holds after the first request has waited
`max_wait_ms` (or at once when it already holds `max_batch_tokens`), sorts the texts by length and runs them
in forward passes of at most `max_batch_tokens` padded tokens each, in one model thread (torch runs one pass
at a time; the event loop keeps accepting requests meanwhile), then hands every request its own outputs, in
its own order. Texts of many requests share a pass, so concurrent small requests cost about what one big
one does.

**Limits.** A text longer than `max_input_tokens` (default: the model's max length) is cut to it
(`truncate`, default; for a reranker prompt the document is cut first, as in training) or refused with 400;
more than `max_inputs` texts (or documents) per request: 413; a body over 64 MiB: 413. Every bad request gets
a 4xx with OpenAI's error shape `{"error": {"message", "type", "code"}}` naming the field; an unexpected
failure a 500 with the exception's type only (the traceback goes to the server's log). With `api_key_env`, the
`/v1/*` and `/rerank` routes need `Authorization: Bearer <the variable's value>`, compared in constant time.
SIGTERM stops accepting connections and answers the requests in flight before the process exits (uvicorn's
graceful shutdown; the batcher runs until the last one is answered).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson
import torch

from embedtune.errors import EmbedtuneError
from embedtune.features import Text, ids_of, pad, texts_of
from embedtune.modeling import Embedder, Reranker, load_model, read_meta
from embedtune.speed import TORCH_DTYPES, autocast, resolve_dtype

MAX_BODY = 64 * 2**20  # bytes per request body
QUERY_TYPES = {
    "query": True,
    "search_query": True,
    "document": False,
    "search_document": False,
    "passage": False,
}


class RequestError(Exception):
    """A bad request: answered with `status` and OpenAI's error shape."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


# --------------------------------------------------------------------------------------------- the model
@dataclass
class Served:
    """A loaded model and how it is served: what it is, its name, its limits and its forward pass."""

    model: Embedder | Reranker
    name: str
    dtype: str  # resolved: bf16 | fp16 | fp32 | autocast
    limit: int  # tokens per text (a reranker: per prompt)
    truncate: bool
    dims: list[int] = field(default_factory=list)  # Matryoshka widths it was trained for ([]: none)

    @property
    def kind(self) -> str:
        return "reranker" if isinstance(self.model, Reranker) else "embedding"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _checked(self, encoding: dict, what: str) -> list[Text]:
        """One tokenized text per input (ids, with token types for a cross-encoder), checked against `limit`."""
        texts = texts_of(encoding)
        lengths = [len(ids_of(t)) for t in texts]
        over = [i for i, n in enumerate(lengths) if n > self.limit]
        if over and not self.truncate:
            raise RequestError(
                400, f"{what}[{over[0]}]: {lengths[over[0]]} tokens, over max_input_tokens {self.limit} "
                "(the server was started with truncate false)"
            )  # fmt: skip
        return texts

    def embedding_tokens(self, texts: list[str], is_query: bool, what: str = "input") -> list[Text]:
        """Token ids of texts (queries with the query instruction), each at most `limit` tokens."""
        # without truncation, one token over the limit is enough to tell: tokenized once either way
        limit = self.limit if self.truncate else self.limit + 1
        return self._checked(
            self.model.tokenize(texts, is_query=is_query, padding=False, max_length=limit), what
        )

    def prompt_tokens(self, query: str, docs: list[str]) -> list[Text]:
        """A reranker's inputs for (query, document) pairs, each at most `limit` tokens (documents cut first)."""
        limit = self.limit if self.truncate else 10**9
        return self._checked(
            self.model.tokenize([query] * len(docs), docs, padding=False, max_length=limit), "documents"
        )

    def image_tokens(self, items: list[tuple[str, list[str], str | None]], is_query: bool) -> list[Text]:
        """Texts with images (`image_inputs`: text with `<image>` tags, image URLs, own instruction) -> tokenized
        texts; each image fetched and decoded here, once (kept as a data URI for the forward pass)."""
        infos = self._images([urls for _, urls, _ in items], "input")
        return self._within_limit(
            lambda: self.model.texts([t for t, _, _ in items], is_query, [o for _, _, o in items], infos),
            "input",
        )

    def pair_image_tokens(
        self, query: tuple[str, list[str]], docs: list[tuple[str, list[str]]]
    ) -> list[Text]:
        """An image reranker's prompts for (query, document) items with images (`rerank_items`)."""
        q_infos, *d_infos = self._images([query[1]] + [urls for _, urls in docs], "documents")
        return self._within_limit(
            lambda: self.model.pairs(
                [query[0]] * len(docs), [t for t, _ in docs], [q_infos] * len(docs), d_infos
            ),
            "documents",
        )

    def _images(self, urls: list[list[str]], what: str) -> list[list]:
        """Each input's image URLs -> their `ImageInfo`s, each fetched and decoded here, once (kept as a data URI
        for the forward pass); a bad one is a 400 naming it."""
        if not hasattr(self.model, "featurizer"):
            raise RequestError(400, f"{self.name} reads no images (a Qwen2-VL / Qwen3-VL model does)")
        from embedtune.images import ImageError, probe

        infos = []
        for i, row in enumerate(urls):
            infos.append([])
            for j, url in enumerate(row):
                try:
                    data = url if url.startswith("data:") else _fetched(url)
                    infos[-1].append(probe(data, self.model.featurizer.max_image_pixels))
                except ImageError as e:
                    raise RequestError(400, f"{what}[{i}]: image {j}: {e}") from None
        return infos

    def _within_limit(self, tokenize, what: str) -> list[Text]:
        """`tokenize()` with the model's max length at `limit` (texts cut, image tokens never: too many, a 400)."""
        try:
            with self.model.max_length_at(self.limit):
                return tokenize()
        except EmbedtuneError as e:
            raise RequestError(400, f"{what}: {e}") from None

    @torch.inference_mode()
    def forward(self, seqs: list[Text]) -> np.ndarray:
        """One forward pass over tokenized texts: (n, H) float32 unit vectors or (n,) float64 z."""
        pixels = getattr(self.model, "featurizer", None)  # an image embedder reads the texts' images now
        features = {
            k: v.to(self.device)
            for k, v in pad(seqs, self.model.tokenizer.pad_token_id, pixels=pixels).items()
        }
        with autocast(self.dtype, self.device):
            out = self.model(features)
        return out.double().cpu().numpy() if self.kind == "reranker" else out.float().cpu().numpy()


def resolve_model(model: str, tracking_uri: str = "") -> tuple[str, str]:
    """(local folder to load, default served name) for a folder, a hub id or `models:/NAME@ALIAS` /
    `models:/NAME/VERSION` of the MLflow registry (downloaded once; the sentence-transformers folder of an
    embedder, the model folder inside a reranker's pyfunc)."""
    if not model.startswith("models:/"):
        local = Path(model)
        return model, local.name if local.is_dir() else model.rsplit("/", 1)[-1]
    import mlflow

    from embedtune.registry import resolve_tracking_uri

    uri, _ = resolve_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(uri)
    try:
        root = Path(mlflow.artifacts.download_artifacts(artifact_uri=model))
    except Exception as e:  # mlflow raises its own exception types for a missing name, alias or server
        raise EmbedtuneError(
            f"model: cannot fetch {model} from the MLflow registry: {str(e).splitlines()[0]}"
        ) from None
    name = model[len("models:/") :].split("@")[0].split("/")[0]
    for candidate in (root / "model.sentence_transformer", root / "artifacts" / "model"):
        if candidate.is_dir():
            return str(candidate), name
    raise EmbedtuneError(
        f"model: {model} holds neither a sentence-transformers folder nor an embedtune reranker"
    )


def matryoshka_dims(path: str) -> list[int]:
    """The widths a folder was trained for: embedtune.json's `matryoshka_dims`, else config.json's
    `matryoshka_dimensions` (what embedtune writes for vLLM, and what a registered copy keeps)."""
    dims = read_meta(path).get("matryoshka_dims") if Path(path).is_dir() else None
    if not dims and (Path(path) / "config.json").is_file():
        dims = orjson.loads((Path(path) / "config.json").read_bytes()).get("matryoshka_dimensions")
    return [int(d) for d in dims or []]


def load_served(model: str, tracking_uri: str, dtype: str, max_input_tokens: int, truncate: bool,
                trust_remote_code: bool, name: str = "") -> Served:  # fmt: skip
    """Load for serving the way evaluate loads a model to measure (`modeling.load_model`, `dtype` auto: bf16
    weights on GPUs that have it, fp32 on CPU)."""
    path, default_name = resolve_model(model, tracking_uri)
    resolved = resolve_dtype(dtype)
    loaded = load_model(path, dtype=TORCH_DTYPES[resolved], trust_remote_code=trust_remote_code or None)
    limit = max_input_tokens or loaded.max_length
    if limit > loaded.max_length:
        raise EmbedtuneError(f"max_input_tokens: {limit} is over the model's max length {loaded.max_length}")
    dims = matryoshka_dims(path) if isinstance(loaded, Embedder) else []
    return Served(loaded, name or default_name, resolved, limit, truncate, dims)


# --------------------------------------------------------------------------------------------- batching
@dataclass
class Job:
    seqs: list[Text]
    future: asyncio.Future
    queued: float = field(default_factory=time.perf_counter)


class Batcher:
    """Requests' texts merged into forward passes of at most `max_batch_tokens` padded tokens (module doc)."""

    def __init__(self, forward, max_batch_tokens: int, max_wait_s: float, observe=None):
        self.forward, self.budget, self.wait = forward, max_batch_tokens, max_wait_s
        self.observe = observe or (lambda texts, tokens: None)  # (texts, padded tokens) of each pass
        self.jobs: deque[Job] = deque()
        self.arrived = asyncio.Event()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="embedtune-model")  # one pass at a time
        self.stopped = False

    async def submit(self, seqs: list[Text]) -> np.ndarray:
        """The outputs of `seqs`, in their order, once a pass has run them."""
        job = Job(seqs, asyncio.get_running_loop().create_future())
        self.jobs.append(job)
        self.arrived.set()
        return await job.future

    def _queued_tokens(self) -> int:
        return sum(len(ids_of(s)) for job in self.jobs for s in job.seqs)

    def passes(self, seqs: list[Text]) -> list[np.ndarray]:
        """Index groups of `seqs`, longest first, each at most `budget` padded tokens (at least one text)."""
        order = sorted(range(len(seqs)), key=lambda i: -len(ids_of(seqs[i])))
        groups, current = [], []
        for i in order:
            longest = len(ids_of(seqs[current[0]])) if current else len(ids_of(seqs[i]))
            if current and (len(current) + 1) * longest > self.budget:
                groups.append(np.asarray(current))
                current = []
            current.append(i)
        if current:
            groups.append(np.asarray(current))
        return groups

    def _run(self, seqs: list[Text]) -> list:
        """In the model thread: every pass, outputs back in the order of `seqs` (or the exception)."""
        out = None
        for idx in self.passes(seqs):
            part = self.forward([seqs[i] for i in idx])
            if out is None:
                out = np.empty((len(seqs), *part.shape[1:]), dtype=part.dtype)
            out[idx] = part
            self.observe(len(idx), len(idx) * len(ids_of(seqs[idx[0]])))
        return out

    async def run(self) -> None:
        """The worker: until `stop`, and then until the queue is empty."""
        loop = asyncio.get_running_loop()
        while not (self.stopped and not self.jobs):
            if not self.jobs:
                self.arrived.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.arrived.wait(), timeout=0.5)
                continue
            first = self.jobs[0].queued
            while self._queued_tokens() < self.budget and time.perf_counter() - first < self.wait:
                self.arrived.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(
                        self.arrived.wait(), timeout=max(self.wait - (time.perf_counter() - first), 0)
                    )
            jobs = list(self.jobs)
            self.jobs.clear()
            seqs = [s for job in jobs for s in job.seqs]
            try:
                out = await loop.run_in_executor(self.pool, self._run, seqs)
            except Exception as e:  # the model failed: every caller of this batch gets the error
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            start = 0
            for job in jobs:
                if not job.future.done():
                    job.future.set_result(out[start : start + len(job.seqs)])
                start += len(job.seqs)

    def stop(self) -> None:
        self.stopped = True
        self.arrived.set()


# --------------------------------------------------------------------------------------------- requests
def _field(body: dict, name: str, kinds, default=None, required: bool = False):
    value = body.get(name, default)
    if value is None:
        if required:
            raise RequestError(400, f"{name}: missing")
        return default
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise RequestError(400, f"{name}: must be {_names(kinds)}, got a boolean")
    if not isinstance(value, kinds):
        raise RequestError(400, f"{name}: must be {_names(kinds)}, got {type(value).__name__}")
    return value


def _names(kinds) -> str:
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    words = {str: "a string", int: "an integer", bool: "a boolean", list: "a list", dict: "an object"}
    return " or ".join(words.get(k, k.__name__) for k in kinds)


def _texts(value, name: str, max_inputs: int) -> list[str]:
    """A string or a non-empty list of non-empty strings (at most `max_inputs`)."""
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts:
        raise RequestError(400, f"{name}: must be a string or a non-empty list of strings")
    if len(texts) > max_inputs:
        raise RequestError(413, f"{name}: {len(texts)} texts, over max_inputs {max_inputs}", "too_large")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            kind = "token ids (send text)" if isinstance(t, int) else type(t).__name__
            raise RequestError(400, f"{name}[{i}]: must be a string, got {kind}")
        if not t:
            raise RequestError(400, f"{name}[{i}]: empty string")
    return texts


def _check_model(body: dict, served: Served) -> None:
    name = _field(body, "model", str)
    if name is not None and name != served.name:
        raise RequestError(
            404, f"model: {name!r} is not served here (this server serves {served.name!r})", "not_found"
        )


def _is_query(body: dict) -> bool:
    input_type = _field(body, "input_type", str)
    prompt_name = _field(body, "prompt_name", str)
    if input_type is not None and prompt_name is not None:
        raise RequestError(400, "input_type, prompt_name: give one of them")
    key = input_type if input_type is not None else prompt_name
    if key is None:
        return False
    if key not in QUERY_TYPES:
        name = "input_type" if input_type is not None else "prompt_name"
        raise RequestError(400, f"{name}: {key!r} is not one of {', '.join(QUERY_TYPES)}")
    return QUERY_TYPES[key]


def _width(body: dict, served: Served) -> int | None:
    dims = _field(body, "dimensions", int)
    if dims is None:
        return None
    full = served.model.dim
    if dims < 1 or dims > full:
        raise RequestError(400, f"dimensions: {dims} is not in [1, {full}]")
    if dims != full and not served.dims:
        raise RequestError(
            400, f"dimensions: {served.name} was not trained for truncated embeddings (matryoshka_dims)"
        )
    return dims


def _fetched(url: str) -> str:
    """An image URL of a request -> a data URI of its bytes: only http(s) (a client names no server file)."""
    from embedtune.images import ImageError, read_bytes

    if not url.startswith(("http://", "https://")):
        raise ImageError(f"{url[:80]!r}: images are data URIs or http(s) URLs")
    return "data:image;base64," + base64.b64encode(read_bytes(url)).decode()


def _image_url(part: dict, where: str) -> str:
    url = part.get("image_url", part.get("image"))
    url = url.get("url") if isinstance(url, dict) else url
    if not isinstance(url, str) or not url:
        raise RequestError(400, f"{where}: an image part needs image_url.url (a data URI or an http(s) URL)")
    return url


def image_inputs(body: dict, max_inputs: int) -> list[tuple[str, list[str], str | None]] | None:
    """The inputs of a body that holds images, as (text with `<image>` tags, image URLs, own instruction), or
    None for text-only bodies. Two shapes: vLLM's chat form, `messages` with content parts (`{"type": "text",
    "text"}`, `{"type": "image_url", "image_url": {"url"}}`; one input; a system message is its instruction),
    and Jina's, `input` items that are objects `{"text"?, "image"?}` (an image before its text)."""
    if body.get("messages") is not None:
        if body.get("input") is not None:
            raise RequestError(400, "input, messages: give one of them")
        messages = body["messages"]
        if not isinstance(messages, list) or not messages:
            raise RequestError(400, "messages: must be a non-empty list of messages")
        text, urls, system = "", [], None
        for i, m in enumerate(messages):
            content = m.get("content") if isinstance(m, dict) else None
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            if not isinstance(parts, list):
                raise RequestError(400, f"messages[{i}]: content must be a string or a list of parts")
            for j, part in enumerate(parts):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    if m.get("role") == "system":
                        system = part["text"]
                    else:
                        text += part["text"]
                elif kind in ("image_url", "image"):
                    urls.append(_image_url(part, f"messages[{i}].content[{j}]"))
                    text += "<image>"
                else:
                    raise RequestError(
                        400, f"messages[{i}].content[{j}]: a part is text or image_url, got {kind!r}"
                    )
        return [(text, urls, system)]
    items = body.get("input")
    if not isinstance(items, list) or not any(isinstance(x, dict) for x in items):
        return None
    if len(items) > max_inputs:
        raise RequestError(413, f"input: {len(items)} inputs, over max_inputs {max_inputs}", "too_large")
    out = []
    for i, item in enumerate(items):
        item = {"text": item} if isinstance(item, str) else item
        text = item.get("text", "") if isinstance(item, dict) else None
        if not isinstance(text, str) or not (text or item.get("image")):
            raise RequestError(400, f"input[{i}]: must be a string or an object with text and / or image")
        urls = [_image_url(item, f"input[{i}]")] if item.get("image") is not None else []
        out.append((("<image>" if urls else "") + text, urls, None))
    return out


def embedding_request(body: dict, served: Served, max_inputs: int):
    """(texts, is_query, encoding_format, dimensions) of a valid /v1/embeddings body; with images, `texts` is
    `image_inputs`' list."""
    if served.kind != "embedding":
        raise RequestError(400, f"{served.name} is a reranker: it has no embeddings (POST /v1/rerank)")
    _check_model(body, served)
    texts = image_inputs(body, max_inputs)
    if texts is None and body.get("input") is None:
        raise RequestError(400, "input: missing")
    texts = texts if texts is not None else _texts(body["input"], "input", max_inputs)
    fmt = _field(body, "encoding_format", str, "float")
    if fmt not in ("float", "base64"):
        raise RequestError(400, f"encoding_format: {fmt!r} is not one of float, base64")
    return texts, _is_query(body), fmt, _width(body, served)


def rerank_items(body: dict, max_inputs: int) -> tuple[tuple, list[tuple]] | None:
    """A rerank body that holds images, as (query, documents) items `(text with <image> tags, image URLs)`, or
    None for text-only bodies. Jina's shape: the query and each document a string or `{"text"?, "image"?}` (an
    image before its text); vLLM's: `documents` an object `{"content": [parts]}`, each part one document (a
    text part, or an `image_url` part)."""
    query, docs = body.get("query"), body.get("documents")

    def has_image(x) -> bool:
        return isinstance(x, dict) and x.get("image") is not None

    if isinstance(docs, dict):
        parts = docs.get("content")
        if not isinstance(parts, list) or not parts:
            raise RequestError(400, "documents: an object holds content, a non-empty list of parts")
        docs = [_part_item(part, f"documents.content[{i}]") for i, part in enumerate(parts)]
    elif isinstance(docs, list) and docs and (has_image(query) or any(has_image(d) for d in docs)):
        docs = [_object_item(d, f"documents[{i}]") for i, d in enumerate(docs)]
    else:
        return None
    if len(docs) > max_inputs:
        raise RequestError(
            413, f"documents: {len(docs)} documents, over max_inputs {max_inputs}", "too_large"
        )
    if query is None:
        raise RequestError(400, "query: missing")
    return _object_item(query, "query"), docs


def _object_item(value, where: str) -> tuple[str, list[str]]:
    """A string or a Jina object `{"text"?, "image"?}` -> (text with an `<image>` tag first if any, its URLs)."""
    item = {"text": value} if isinstance(value, str) else value
    text = item.get("text", "") if isinstance(item, dict) else None
    if not isinstance(text, str) or not (text or item.get("image")):
        raise RequestError(400, f"{where}: must be a string or an object with text and / or image")
    urls = [_image_url(item, where)] if item.get("image") is not None else []
    return ("<image>" if urls else "") + text, urls


def _part_item(part, where: str) -> tuple[str, list[str]]:
    """A content part (`{"type": "text", "text"}` or `{"type": "image_url", "image_url": {"url"}}`) -> an item."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str) and part["text"]:
        return part["text"], []
    if kind in ("image_url", "image"):
        return "<image>", [_image_url(part, where)]
    raise RequestError(400, f"{where}: a part is text or image_url, got {kind!r}")


def rerank_request(body: dict, served: Served, max_inputs: int):
    """(query, documents, top_n, return_documents) of a valid rerank body; with images (`rerank_items`), the
    query and the documents are (text, image URLs) items."""
    _check_model(body, served)
    items = rerank_items(body, max_inputs)
    if items is not None and not any(urls for _, urls in [items[0], *items[1]]):  # content parts of text only
        query, docs = items[0][0], _texts([t for t, _ in items[1]], "documents", max_inputs)
    elif items is not None:
        query, docs = items
    else:
        query = _field(body, "query", str, required=True)
        if not query:
            raise RequestError(400, "query: empty string")
        docs = _field(body, "documents", list, required=True)
        docs = [d.get("text") if isinstance(d, dict) else d for d in docs]  # Cohere also takes {"text": ...}
        docs = _texts(docs, "documents", max_inputs)
    top_n = _field(body, "top_n", int, len(docs))
    if top_n < 1:
        raise RequestError(400, f"top_n: {top_n} must be >= 1")
    return query, docs, min(top_n, len(docs)), _field(body, "return_documents", bool, False)


def document_of(doc: str | tuple) -> dict:
    """A document as a rerank response echoes it: `{"text"}`, with its `"image"` URL when it had one."""
    if isinstance(doc, str):
        return {"text": doc}
    text, urls = doc
    return {"text": text.removeprefix("<image>") if urls else text, **({"image": urls[0]} if urls else {})}


def unit(rows: np.ndarray, dims: int | None) -> np.ndarray:
    """(n, H) unit vectors cut to their first `dims` components and re-normalized (as they were trained)."""
    if dims is None or dims >= rows.shape[1]:
        return rows
    cut = rows[:, :dims]
    return cut / np.linalg.norm(cut, axis=1, keepdims=True).clip(min=1e-12)


def encode_vector(vector: np.ndarray, fmt: str):
    """One embedding as the response carries it: base64 of little-endian float32, or the float32 array."""
    if fmt == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return vector.astype(np.float32)
