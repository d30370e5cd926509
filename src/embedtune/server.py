"""The HTTP server of `embedtune serve`: an ASGI app (FastAPI on uvicorn) over `embedtune.serving`.

`create_app(cfg)` returns the app; `embedtune serve` runs it with uvicorn. The model loads in a thread once the
app starts, so `/health` answers at once and `/ready` turns 200 when the model is loaded (what a Kubernetes
readiness probe waits for); a request before that gets 503. Routes, shapes and limits: `embedtune.serving`.

Why FastAPI + uvicorn and not KServe's Python model server: the request shapes are OpenAI's and Cohere's, not
KServe's v1/v2 inference protocols, so KServe's server would only add a second protocol and its dependency set
(grpc, ray hooks) to the image; FastAPI and uvicorn are already in it (MLflow's own server uses them), and
KServe runs any container that answers HTTP (the `deploy` step's custom predictor).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import signal
import threading
import time
import traceback
import uuid

import numpy as np
import orjson
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from embedtune.errors import EmbedtuneError
from embedtune.features import ids_of
from embedtune.progress import say
from embedtune.serving import (
    MAX_BODY,
    Batcher,
    RequestError,
    Served,
    document_of,
    embedding_request,
    encode_vector,
    load_served,
    rerank_request,
    unit,
)

OPEN = ("/health", "/ready", "/metrics")  # routes without the bearer token (probes and scrapers)
GRACE_S = 30  # seconds SIGTERM gives the requests in flight (Kubernetes' default grace period is 30 s)


class Metrics:
    """The Prometheus series of one server (its own registry: two apps in one process do not clash)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("embedtune_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        self.errors = Counter(
            "embedtune_errors", "requests answered 4xx or 5xx", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "embedtune_request_seconds", "request latency", ["endpoint"], registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )  # fmt: skip
        self.batch_texts = Histogram(
            "embedtune_batch_texts", "texts per forward pass", registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
        )  # fmt: skip
        self.batch_tokens = Histogram(
            "embedtune_batch_tokens", "padded tokens per forward pass", registry=r,
            buckets=(64, 256, 1024, 4096, 16384, 65536),
        )  # fmt: skip
        self.tokens = Counter("embedtune_input_tokens", "input tokens", ["endpoint"], registry=r)

    def observe_pass(self, texts: int, tokens: int) -> None:
        self.batch_texts.observe(texts)
        self.batch_tokens.observe(tokens)


def json_response(body: dict, status: int = 200) -> Response:
    """orjson, numpy arrays included (an embedding list is most of a response: several times faster)."""
    return Response(
        orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), status, media_type="application/json"
    )


def error(status: int, message: str, kind: str = "invalid_request_error") -> Response:
    return json_response({"error": {"message": message, "type": kind, "code": status}}, status)


class Guard:
    """Pure ASGI middleware (no per-request task, unlike Starlette's `BaseHTTPMiddleware`): the bearer token,
    the request metrics, and a 500 without traceback for a bug (the traceback goes to the log)."""

    def __init__(self, app, token: str, metrics: Metrics, counter: dict):
        self.app, self.token, self.metrics, self.counter = app, token.encode(), metrics, counter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, t0, status = scope["path"], time.perf_counter(), [500]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.token and path not in OPEN and not self.authorized(scope):
                message = "missing or wrong bearer token (Authorization: Bearer <key>)"
                await error(401, message, "authentication_error")(scope, receive, sending)
            else:
                await self.app(scope, receive, sending)
        except Exception as e:  # a bug, not a bad request
            traceback.print_exc()
            await error(500, f"internal error ({type(e).__name__})", "internal_error")(
                scope, receive, sending
            )
        finally:
            self.counter["requests"] += 1
            _count(self.metrics, path, status[0], t0)

    def authorized(self, scope) -> bool:
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, value = given.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(value.strip(), self.token)


def create_app(cfg, on_failure=None) -> FastAPI:
    """The server of a `ServeConfig`: routes, auth, metrics, the model loading in the background.
    `on_failure(reason)` is called when the model does not load (`embedtune serve` then stops)."""
    state: dict = {"served": None, "failed": None, "batcher": None}
    metrics = Metrics()
    token = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""

    def load() -> None:
        try:
            state["served"] = load_served(
                cfg.model, cfg.tracking_uri, cfg.dtype, cfg.max_input_tokens, cfg.truncate,
                cfg.trust_remote_code, cfg.served_model_name,
            )  # fmt: skip
            served = state["served"]
            say(
                "serve",
                f"ready: {served.name} ({served.kind}, {served.dtype}, max {served.limit} tokens per text)",
            )
        except Exception as e:  # /ready says why until the server stops (`on_failure`)
            text = str(e) if isinstance(e, EmbedtuneError) else f"{type(e).__name__}: {e}"
            state["failed"] = (text.strip().splitlines() or [type(e).__name__])[0]
            say("serve", f"error: the model did not load: {state['failed']}")
            if on_failure is not None:
                on_failure(state["failed"])

    @contextlib.asynccontextmanager
    async def lifespan(app):
        loop = asyncio.get_running_loop()
        loader = loop.run_in_executor(None, load)
        batcher = Batcher(lambda seqs: state["served"].forward(seqs), cfg.max_batch_tokens,
                          cfg.max_wait_ms / 1000, metrics.observe_pass)  # fmt: skip
        state["batcher"] = batcher
        worker = asyncio.create_task(batcher.run())
        try:
            yield
        finally:
            batcher.stop()  # uvicorn has answered every request in flight by now; drain what is left
            await worker
            await loader
            batcher.pool.shutdown(wait=True)

    app = FastAPI(title="embedtune serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.counts = {"requests": 0}
    app.add_middleware(Guard, token=token, metrics=metrics, counter=app.state.counts)

    async def body_of(request: Request) -> dict:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > MAX_BODY:
            raise RequestError(413, f"body: {int(length)} bytes, over {MAX_BODY}", "too_large")
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise RequestError(413, f"body: {len(raw)} bytes, over {MAX_BODY}", "too_large")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise RequestError(400, f"body: not JSON ({e.msg} at character {e.pos})") from None
        if not isinstance(body, dict):
            raise RequestError(400, f"body: must be a JSON object, got {type(body).__name__}")
        return body

    def ready() -> Served:
        if state["served"] is None:
            if state["failed"]:
                raise RequestError(503, f"the model did not load: {state['failed']}", "unavailable")
            raise RequestError(
                503, "the model is still loading (GET /ready turns 200 when it is loaded)", "unavailable"
            )
        return state["served"]

    async def tokens(fn, texts, *args):
        """Token ids, in a thread when there is much to tokenize (the event loop keeps serving)."""
        if all(isinstance(t, str) for t in texts) and sum(map(len, texts)) < 20000:
            return fn(texts, *args)  # short texts (images are always fetched in a thread)
        return await asyncio.get_running_loop().run_in_executor(None, fn, texts, *args)

    @app.exception_handler(RequestError)
    async def bad_request(request: Request, e: RequestError):
        return error(e.status, e.message, e.kind)

    @app.exception_handler(StarletteHTTPException)
    async def no_route(request: Request, e: StarletteHTTPException):  # unknown path, wrong method
        detail = {
            404: f"no route {request.url.path}",
            405: f"{request.method} is not allowed on {request.url.path}",
        }
        return error(e.status_code, detail.get(e.status_code, str(e.detail)), "invalid_request_error")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def is_ready():
        served = ready()
        return {"status": "ready", "model": served.name, "kind": served.kind}

    @app.get("/v1/models")
    async def models():
        served = ready()
        card = {"id": served.name, "object": "model", "owned_by": "embedtune", "created": 0,
                "kind": served.kind, "max_input_tokens": served.limit, "matryoshka_dimensions": served.dims}  # fmt: skip
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        served = ready()
        texts, is_query, fmt, dims = embedding_request(await body_of(request), served, cfg.max_inputs)
        with_images = isinstance(
            texts[0], tuple
        )  # (text, image URLs, instruction): images fetched off the loop
        seqs = await tokens(served.image_tokens if with_images else served.embedding_tokens, texts, is_query)
        vectors = unit(await state["batcher"].submit(seqs), dims)
        used = sum(len(ids_of(s)) for s in seqs)
        metrics.tokens.labels("/v1/embeddings").inc(used)
        data = [
            {"object": "embedding", "index": i, "embedding": encode_vector(v, fmt)}
            for i, v in enumerate(vectors)
        ]
        usage = {"prompt_tokens": used, "total_tokens": used}
        return json_response({"object": "list", "data": data, "model": served.name, "usage": usage})

    async def rerank(request: Request):
        served = ready()
        query, docs, top_n, with_docs = rerank_request(await body_of(request), served, cfg.max_inputs)
        batcher = state["batcher"]
        images = isinstance(query, tuple)  # (text, image URLs) items: images fetched off the loop
        if served.kind == "reranker":
            pairs = served.pair_image_tokens if images else served.prompt_tokens
            seqs = await tokens(lambda d: pairs(query, d), docs)
            scores = 1 / (1 + np.exp(-(await batcher.submit(seqs))))  # P(yes), as Reranker.score
        else:  # an embedder ranks by cosine: the query with its instruction, the documents without
            if images:
                q_seqs = await tokens(served.image_tokens, [(*query, None)], True)
                d_seqs = await tokens(served.image_tokens, [(*d, None) for d in docs], False)
            else:
                q_seqs = await tokens(served.embedding_tokens, [query], True, "query")
                d_seqs = await tokens(served.embedding_tokens, docs, False, "documents")
            q, d = await asyncio.gather(batcher.submit(q_seqs), batcher.submit(d_seqs))
            scores, seqs = (d @ q[0]).astype(np.float64), q_seqs + d_seqs
        used = sum(len(ids_of(s)) for s in seqs)
        metrics.tokens.labels(request.url.path).inc(used)
        order = np.argsort(-scores, kind="stable")[:top_n]
        results = [
            {
                "index": int(i),
                "relevance_score": float(scores[i]),
                **({"document": document_of(docs[i])} if with_docs else {}),
            }
            for i in order
        ]
        return json_response(
            {"id": f"rerank-{uuid.uuid4().hex}", "model": served.name, "results": results,
             "usage": {"total_tokens": used}}
        )  # fmt: skip

    app.post("/v1/rerank")(rerank)
    app.post("/rerank")(rerank)
    return app


ENDPOINTS = ("/v1/embeddings", "/v1/rerank", "/rerank", "/v1/models", "/health", "/ready", "/metrics")


def _count(metrics: Metrics, path: str, status: int, t0: float) -> None:
    endpoint = path if path in ENDPOINTS else "other"  # unknown paths share one label (bounded series)
    metrics.requests.labels(endpoint, str(status)).inc()
    if status >= 400:
        metrics.errors.labels(endpoint, str(status)).inc()
    metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)


class _Server(uvicorn.Server):
    """uvicorn's server, except that a SIGTERM or SIGINT ends `run()` after the graceful shutdown instead of
    being raised again (what uvicorn does, which kills the process before `embedtune serve` returns)."""

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def serve_until_stopped(make_app, host: str, port: int, grace_s: float = GRACE_S) -> tuple[int, str | None]:
    """Run `make_app(on_failure)` with uvicorn until SIGTERM / SIGINT (requests in flight answered first, for up
    to `grace_s`) or until the model fails to load; returns (requests answered, the load failure or None)."""
    failures: list[str] = []
    server: _Server | None = None

    def on_failure(reason: str) -> None:
        failures.append(reason)
        if server is not None:
            server.should_exit = True

    app = make_app(on_failure)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=grace_s, lifespan="on")  # fmt: skip
    server = _Server(config)
    server.run()
    return app.state.counts["requests"], failures[0] if failures else None
