"""embedtune serve as a real process on 127.0.0.1, called by the real `openai` client and `httpx`.

Servers (each a real `embedtune serve` process, started once per module):
- `tuned`: MiniLM saved as train writes a folder, with a query instruction and Matryoshka widths [384, 128],
  behind a bearer token;
- `plain`: all-MiniLM-L6-v2 as the package ships it (no instruction, no Matryoshka);
- `reranker`: a tiny random Qwen3 saved as a generative reranker, `--truncate false`, small limits.
Request counts and times are bounded (200 concurrent requests at most, timeouts on every call).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest

from embedtune.launch import free_port
from embedtune.modeling import Embedder, Reranker
from embedtune.scoring import truncate_unit

EMBEDTUNE = Path(sys.executable).parent / "embedtune"
QUERY_INSTRUCTION = "query: "
TOKEN = "s3cret-token-for-tests"
TEXTS = [
    "what is a cat",
    "the moon goes around the earth",
    "a dog is a good friend of man",
    "Paris is in France.",
]


class Server:
    """`embedtune serve` in its own process; `stop()` sends SIGTERM and returns (exit status, stdout)."""

    def __init__(self, model: str | Path, log: Path, *flags: str, env: dict | None = None, wait: bool = True):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.out = open(log, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [str(EMBEDTUNE), "serve", "--model", str(model), "--port", str(self.port), *flags],
            stdout=subprocess.PIPE, stderr=self.out, env={**os.environ, **(env or {})},
        )  # fmt: skip
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"serve not ready after {timeout}s: {self.log.read_text()[-2000:]}")

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        stdout, _ = self.proc.communicate(timeout=60)
        self.out.close()
        return self.proc.returncode, stdout.decode()


@pytest.fixture(scope="module")
def tuned_dir(tmp_path_factory, minilm_path) -> Path:
    out = tmp_path_factory.mktemp("serve") / "tuned-minilm"
    model = Embedder.from_pretrained(minilm_path, query_instruction=QUERY_INSTRUCTION, max_length=128)
    model.save_pretrained(
        out, meta={"base_model": "all-MiniLM-L6-v2", "train_type": "full", "matryoshka_dims": [384, 128]}
    )
    return out


@pytest.fixture(scope="module")
def reranker_dir(tmp_path_factory, tiny_qwen3_path) -> Path:
    out = tmp_path_factory.mktemp("serve") / "reranker"
    Reranker.from_pretrained(tiny_qwen3_path, instruction="rank", max_length=400).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tuned(tuned_dir, tmp_path_factory):
    server = Server(tuned_dir, tmp_path_factory.mktemp("logs") / "tuned.log", "--api-key-env", "SERVE_TOKEN",
                    env={"SERVE_TOKEN": TOKEN})  # fmt: skip
    yield server
    server.stop()


@pytest.fixture(scope="module")
def plain(minilm_path, tmp_path_factory):
    server = Server(minilm_path, tmp_path_factory.mktemp("logs") / "plain.log", "--served-model-name", "minilm",
                    "--max-inputs", "64")  # fmt: skip
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reranker(reranker_dir, tmp_path_factory):
    server = Server(reranker_dir, tmp_path_factory.mktemp("logs") / "reranker.log", "--truncate", "false",
                    "--max-input-tokens", "300", "--max-inputs", "4")  # fmt: skip
    yield server
    server.stop()


def auth() -> dict:
    return {"Authorization": f"Bearer {TOKEN}"}


def openai_client(server: Server, key: str = "unused"):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=60)


# ------------------------------------------------------------------------------------------- embeddings
def test_the_openai_client_gets_the_embeddings_evaluate_and_sentence_transformers_compute(tuned, tuned_dir):
    from sentence_transformers import SentenceTransformer

    ours = Embedder.from_pretrained(tuned_dir)  # what evaluate encodes with (scoring.encode_unique)
    st = SentenceTransformer(str(tuned_dir), device="cpu")
    client = openai_client(tuned, TOKEN)
    docs = client.embeddings.create(input=TEXTS, model="tuned-minilm")  # the client asks for base64
    assert docs.model == "tuned-minilm" and [d.index for d in docs.data] == list(range(len(TEXTS)))
    got = np.array([d.embedding for d in docs.data])
    np.testing.assert_allclose(got, ours.encode(TEXTS), atol=1e-5)
    np.testing.assert_allclose(got, st.encode(TEXTS, normalize_embeddings=True), atol=1e-5)
    assert (
        docs.usage.prompt_tokens
        == docs.usage.total_tokens
        == sum(len(x) for x in ours.tokenize(TEXTS, padding=False)["input_ids"])
    )
    # queries get the model's query instruction (OpenAI-style clients pass it as an extra field)
    queries = client.embeddings.create(
        input=TEXTS[:2], model="tuned-minilm", extra_body={"input_type": "query"}
    )
    want = ours.encode(TEXTS[:2], is_query=True)
    np.testing.assert_allclose([d.embedding for d in queries.data], want, atol=1e-5)
    np.testing.assert_allclose(
        want, st.encode(TEXTS[:2], prompt_name="query", normalize_embeddings=True), atol=1e-5
    )
    # plain httpx, float format, one string
    r = httpx.post(
        f"{tuned.url}/v1/embeddings", json={"input": TEXTS[0], "encoding_format": "float"}, headers=auth()
    )
    assert r.status_code == 200 and isinstance(r.json()["data"][0]["embedding"][0], float)
    np.testing.assert_allclose(r.json()["data"][0]["embedding"], ours.encode(TEXTS[:1])[0], atol=1e-5)


def test_dimensions_truncate_and_renormalize_for_a_matryoshka_model_and_are_refused_otherwise(
    tuned, tuned_dir, plain
):
    assert json.loads((tuned_dir / "config.json").read_text())["matryoshka_dimensions"] == [
        384,
        128,
    ]  # for vLLM
    full = Embedder.from_pretrained(tuned_dir).encode(TEXTS)
    r = httpx.post(f"{tuned.url}/v1/embeddings", json={"input": TEXTS, "dimensions": 128}, headers=auth())
    got = np.array([d["embedding"] for d in r.json()["data"]])
    assert got.shape == (len(TEXTS), 128)
    np.testing.assert_allclose(got, truncate_unit(full, 128), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    r = httpx.post(f"{plain.url}/v1/embeddings", json={"input": TEXTS, "dimensions": 128})
    assert r.status_code == 400 and "not trained for truncated embeddings" in r.json()["error"]["message"]
    r = httpx.post(
        f"{plain.url}/v1/embeddings", json={"input": TEXTS, "dimensions": 384}
    )  # the full width: fine
    assert r.status_code == 200


def test_rerank_with_an_embedder_ranks_documents_by_cosine(plain, minilm_path):
    model = Embedder.from_pretrained(minilm_path)
    docs = TEXTS[1:]
    want = model.encode(docs) @ model.encode(TEXTS[:1], is_query=True)[0]
    for path in ("/v1/rerank", "/rerank"):
        r = httpx.post(
            f"{plain.url}{path}",
            json={"query": TEXTS[0], "documents": docs, "top_n": 2, "return_documents": True},
        )
        body = r.json()
        assert r.status_code == 200 and body["model"] == "minilm" and body["usage"]["total_tokens"] > 0
        order = np.argsort(-want)[:2]
        assert [x["index"] for x in body["results"]] == order.tolist()
        np.testing.assert_allclose([x["relevance_score"] for x in body["results"]], want[order], atol=1e-5)
        assert [x["document"]["text"] for x in body["results"]] == [docs[i] for i in order]
    cohere = httpx.post(
        f"{plain.url}/v1/rerank", json={"query": TEXTS[0], "documents": [{"text": d} for d in docs]}
    )
    assert len(cohere.json()["results"]) == 3 and "document" not in cohere.json()["results"][0]


def test_rerank_with_a_generative_reranker_gives_the_folders_scores(reranker, reranker_dir):
    want = np.array(Reranker.from_pretrained(reranker_dir).score(TEXTS[0], TEXTS[1:]))
    r = httpx.post(f"{reranker.url}/v1/rerank", json={"query": TEXTS[0], "documents": TEXTS[1:]})
    results = r.json()["results"]
    assert r.status_code == 200 and [x["index"] for x in results] == np.argsort(-want, kind="stable").tolist()
    np.testing.assert_allclose(sorted(x["relevance_score"] for x in results), sorted(want), atol=1e-5)
    r = httpx.post(f"{reranker.url}/v1/embeddings", json={"input": "x"})
    assert r.status_code == 400 and "is a reranker" in r.json()["error"]["message"]


# ------------------------------------------------------------------------------------------- batching
def test_200_concurrent_requests_are_all_answered_each_with_its_own_vectors(plain, minilm_path):
    model = Embedder.from_pretrained(minilm_path)
    words = "cat dog river moon music football tree city train planet".split()
    requests = [[f"{words[i % 10]} {words[(i // 10) % 10]} number {i}"] * (1 + i % 3) for i in range(200)]
    requests = [[f"{t} {j}" for j, t in enumerate(texts)] for texts in requests]
    unique = sorted({t for texts in requests for t in texts})
    expected = dict(zip(unique, model.encode(unique), strict=True))

    async def call(client, texts):
        r = await client.post("/v1/embeddings", json={"input": texts, "encoding_format": "float"})
        return r.status_code, r.json()

    async def all_of_them():
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(base_url=plain.url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(call(client, texts) for texts in requests))

    before = batch_passes(plain)
    answers = asyncio.run(all_of_them())
    assert [status for status, _ in answers] == [200] * 200
    for texts, (_, body) in zip(requests, answers, strict=True):
        got = np.array([d["embedding"] for d in body["data"]])
        np.testing.assert_allclose(got, np.array([expected[t] for t in texts]), atol=1e-5)
    passes = batch_passes(plain) - before
    assert 0 < passes < 200  # requests shared forward passes (400 texts in 200 requests)


def batch_passes(server: Server) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return float(
        next(line.split()[-1] for line in text.splitlines() if line.startswith("embedtune_batch_texts_count"))
    )


# ------------------------------------------------------------------------------------------- bad requests
MALFORMED = [
    ("POST", "/v1/embeddings", b"{not json", 400, "not JSON"),
    ("POST", "/v1/embeddings", b"[1, 2]", 400, "must be a JSON object"),
    ("POST", "/v1/embeddings", {}, 400, "input: missing"),
    ("POST", "/v1/embeddings", {"input": 3}, 400, "input: must be a string or a non-empty list"),
    ("POST", "/v1/embeddings", {"input": []}, 400, "non-empty list"),
    ("POST", "/v1/embeddings", {"input": ["ok", 7]}, 400, "input[1]: must be a string"),
    ("POST", "/v1/embeddings", {"input": [[1, 2, 3]]}, 400, "input[0]: must be a string"),
    ("POST", "/v1/embeddings", {"input": ["ok", ""]}, 400, "input[1]: empty string"),
    ("POST", "/v1/embeddings", {"input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
    ("POST", "/v1/embeddings", {"input": "x", "dimensions": "128"}, 400, "dimensions: must be an integer"),
    ("POST", "/v1/embeddings", {"input": "x", "dimensions": 0}, 400, "dimensions: 0 is not in"),
    ("POST", "/v1/embeddings", {"input": "x", "dimensions": 4096}, 400, "dimensions: 4096 is not in"),
    ("POST", "/v1/embeddings", {"input": "x", "dimensions": True}, 400, "got a boolean"),
    ("POST", "/v1/embeddings", {"input": "x", "model": "gpt-4"}, 404, "is not served here"),
    ("POST", "/v1/embeddings", {"input": "x", "input_type": "image"}, 400, "input_type"),
    ("POST", "/v1/embeddings", {"input": ["x"] * 65}, 413, "over max_inputs"),
    ("POST", "/v1/rerank", {"documents": ["a"]}, 400, "query: missing"),
    ("POST", "/v1/rerank", {"query": "q", "documents": "a"}, 400, "documents: must be a list"),
    (
        "POST",
        "/v1/rerank",
        {"query": "q", "documents": []},
        400,
        "documents: must be a string or a non-empty list",
    ),
    ("POST", "/v1/rerank", {"query": "q", "documents": ["a"], "top_n": 0}, 400, "top_n: 0 must be >= 1"),
    (
        "POST",
        "/v1/rerank",
        {"query": "q", "documents": ["a"], "return_documents": "yes"},
        400,
        "return_documents",
    ),
    ("POST", "/v1/rerank", {"query": "", "documents": ["a"]}, 400, "query: empty string"),
    ("GET", "/v1/embeddings", None, 405, "GET is not allowed"),
    ("POST", "/v2/nothing", {}, 404, "no route"),
]


@pytest.mark.parametrize(
    "method,path,body,status,message", MALFORMED, ids=[f"{m[1]}-{m[4]}" for m in MALFORMED]
)
def test_every_malformed_request_gets_a_4xx_with_a_message(plain, method, path, body, status, message):
    content = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
    r = httpx.request(method, f"{plain.url}{path}", content=content, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["code"] == status and "Traceback" not in r.text


def test_a_bearer_token_guards_the_api_but_not_the_probes(tuned):
    body = {"input": "x"}
    assert httpx.post(f"{tuned.url}/v1/embeddings", json=body).status_code == 401
    wrong = httpx.post(f"{tuned.url}/v1/embeddings", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "bearer token" in wrong.json()["error"]["message"]
    assert httpx.post(f"{tuned.url}/v1/embeddings", json=body, headers=auth()).status_code == 200
    assert httpx.get(f"{tuned.url}/v1/models").status_code == 401
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(f"{tuned.url}{path}").status_code == 200
    from openai import AuthenticationError

    with pytest.raises(AuthenticationError):
        openai_client(tuned, "wrong").embeddings.create(input="x", model="tuned-minilm")


def test_limits_truncate_or_refuse_long_texts_and_count_the_inputs(reranker, plain, minilm_path):
    long = "cat " * 400
    r = httpx.post(f"{reranker.url}/v1/rerank", json={"query": "q", "documents": ["short", long]})
    assert (
        r.status_code == 400 and "documents[1]" in r.json()["error"]["message"] and "truncate false" in r.text
    )
    r = httpx.post(f"{reranker.url}/v1/rerank", json={"query": "q", "documents": ["a"] * 5})
    assert r.status_code == 413
    r = httpx.post(
        f"{plain.url}/v1/embeddings", json={"input": [long], "encoding_format": "float"}
    )  # truncated
    model = Embedder.from_pretrained(minilm_path)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == model.max_length == 256
    np.testing.assert_allclose(r.json()["data"][0]["embedding"], model.encode([long])[0], atol=1e-5)


def test_probes_models_and_metrics(plain):
    assert httpx.get(f"{plain.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{plain.url}/ready").json()["kind"] == "embedding"
    cards = httpx.get(f"{plain.url}/v1/models").json()["data"]
    assert [c["id"] for c in cards] == ["minilm"] and cards[0]["max_input_tokens"] == 256
    httpx.post(f"{plain.url}/v1/embeddings", json={"input": 3})
    text = httpx.get(f"{plain.url}/metrics").text
    for series in ("embedtune_requests_total", "embedtune_request_seconds_bucket", "embedtune_batch_texts_bucket",
                   "embedtune_batch_tokens_bucket", "embedtune_input_tokens_total", "embedtune_errors_total"):  # fmt: skip
        assert series in text, series
    assert 'embedtune_errors_total{endpoint="/v1/embeddings",status="400"}' in text


# ------------------------------------------------------------------------------------------- lifecycle
def test_sigterm_answers_the_request_in_flight_then_exits_cleanly(minilm_path, tmp_path):
    server = Server(minilm_path, tmp_path / "serve.log", "--max-batch-tokens", "512")
    # ~17 passes: a few seconds alone, well inside the 30 s grace even on a loaded 2-core machine (600 texts
    # took ~10 s alone and ran past the grace under `make test`'s two workers: uvicorn then cancels, HTTP 500)
    texts = [f"text number {i} about " + "rivers and mountains " * 8 for i in range(200)]
    answer: dict = {}

    def call():
        answer["r"] = httpx.post(f"{server.url}/v1/embeddings", json={"input": texts}, timeout=120)

    caller = threading.Thread(target=call)
    caller.start()
    deadline = time.monotonic() + 30
    while batch_passes(server) == 0 and time.monotonic() < deadline:  # the request is being computed
        time.sleep(0.05)
    status, stdout = server.stop()
    caller.join(timeout=120)
    assert answer["r"].status_code == 200, server.log.read_text()[-2000:]
    assert len(answer["r"].json()["data"]) == 200
    assert status == 0 and json.loads(stdout)["requests"] >= 1


def test_a_model_that_cannot_be_served_is_one_line_and_exit_2(tmp_path):
    r = subprocess.run(
        [str(EMBEDTUNE), "serve", "--model", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"embedtune serve: error: model: {tmp_path / 'nothing'}: no such folder"
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    server = Server(empty, tmp_path / "serve.log", wait=False)
    server.proc.wait(timeout=120)  # it stops on its own: the model did not load
    status, _ = server.stop()
    last = server.log.read_text().strip().splitlines()[-1]
    assert (
        status == 2
        and last.startswith("embedtune serve: error: model:")
        and "Traceback" not in server.log.read_text()
    )


# ------------------------------------------------------------------------------------------- the registry
def test_the_registered_champion_serves_what_its_folder_serves_and_mlflow_serve_still_works(
    mlflow_server, tuned_dir, tmp_path
):
    from embedtune.config import RegisterConfig
    from embedtune.steps import register

    name = f"serve-{uuid.uuid4().hex[:8]}"
    metrics = tmp_path / "metrics.json"
    metrics.write_text(
        json.dumps({"primary_metric": "ndcg_at_10", "primary_value": 0.8, "metrics": {"ndcg_at_10": 0.8}})
    )
    register.run(
        RegisterConfig(model=str(tuned_dir), metrics=str(metrics), name=name, tracking_uri=mlflow_server)
    )
    server = Server(f"models:/{name}@champion", tmp_path / "serve.log", "--tracking-uri", mlflow_server)
    try:
        want = Embedder.from_pretrained(tuned_dir)
        for input_type, is_query in (("document", False), ("query", True)):
            r = httpx.post(
                f"{server.url}/v1/embeddings", json={"input": TEXTS, "model": name, "input_type": input_type}
            )
            np.testing.assert_allclose(vectors(r.json()), want.encode(TEXTS, is_query=is_query), atol=1e-5)
        r = httpx.post(f"{server.url}/v1/embeddings", json={"input": TEXTS, "dimensions": 128})
        assert r.status_code == 200  # the widths travel with the registered copy (config.json)
    finally:
        server.stop()
    # `mlflow models serve` on the same version: a real process, its own /invocations shape
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)  # mlflow starts `uvicorn` from PATH
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": mlflow_server,
        "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
    }
    log = open(tmp_path / "mlflow-serve.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", f"models:/{name}@champion",
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    try:
        deadline, r = time.monotonic() + 240, None
        while time.monotonic() < deadline:
            try:
                r = httpx.post(f"http://127.0.0.1:{port}/invocations", json={"inputs": TEXTS}, timeout=30)
                break
            except httpx.HTTPError:
                assert proc.poll() is None, (tmp_path / "mlflow-serve.log").read_text()[-2000:]
                time.sleep(1)
        assert r is not None and r.status_code == 200, (tmp_path / "mlflow-serve.log").read_text()[-2000:]
        np.testing.assert_allclose(
            r.json()["predictions"], Embedder.from_pretrained(tuned_dir).encode(TEXTS), atol=1e-5
        )
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()


def vectors(body: dict) -> np.ndarray:
    data = body["data"]
    if isinstance(data[0]["embedding"], str):
        return np.array([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in data])
    return np.array([d["embedding"] for d in data])


def test_a_lora_adapter_folder_is_served_on_its_base_model(tiny_qwen3_path, tmp_path):
    import torch

    from embedtune.lora import add_lora

    model = Embedder.from_pretrained(tiny_qwen3_path)
    torch.manual_seed(0)
    add_lora(model, rank=4, alpha=8, dropout=0.0, target="all-linear")
    with torch.no_grad():  # B starts at 0: move it, so the adapter changes the outputs
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    out = tmp_path / "adapter"
    model.save_pretrained(out, meta={"base_model": str(tiny_qwen3_path), "train_type": "lora"})
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    want = Embedder.from_pretrained(out).encode(TEXTS)
    assert np.abs(want - Embedder.from_pretrained(tiny_qwen3_path).encode(TEXTS)).max() > 1e-3
    server = Server(out, tmp_path / "serve.log")
    try:
        r = httpx.post(f"{server.url}/v1/embeddings", json={"input": TEXTS, "encoding_format": "float"})
        np.testing.assert_allclose(vectors(r.json()), want, atol=1e-5)
    finally:
        server.stop()
