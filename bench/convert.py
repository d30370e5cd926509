"""Benchmark `embedtune convert` on synthetic MTEB reranking rows against a plain pandas conversion.

    .venv/bin/python bench/convert.py              # 1M rows
    .venv/bin/python bench/convert.py --rows 200000

Writes N rows shaped like MTEB reranking data (`query`, 1-2 `positive`, 4-6 `negative`, English-like
words) to a temporary folder, then runs, each in its own process and in the same run:

- `embedtune convert --source rows.jsonl --output out.jsonl` (the CLI, interpreter start-up included),
- a plain pandas conversion: `pd.read_json(lines=True)` + `iterrows()` building the same canonical rows with
  `json.dumps` (what one writes without thinking about speed).

For each it reports wall time, CPU time, input rows/s (per wall second and per CPU-second) and the peak
RSS of that process, checks that both outputs are byte-identical (sha256), and prints the ratios.
Targets: >= 200k rows/s, <= 1 GiB peak RSS.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

WORDS = (
    "the of and to in is was for on that with as by at from this be are or not which what how why when where "
    "cat dog river mountain city train plane music art science math physics history football cooking water "
    "fire earth moon star planet computer network data model learning language text search answer question "
    "install ubuntu kernel driver package error update server disk memory boot network wifi screen"
).split()

PEER = r"""
import hashlib, json, sys
import pandas as pd
src, dst = sys.argv[1], sys.argv[2]
df = pd.read_json(src, lines=True)
lines = []
for _, r in df.iterrows():
    for p in r["positive"]:
        row = {"query": r["query"], "response": p}
        if len(r["negative"]):
            row["rejected_response"] = list(r["negative"])
        lines.append(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")
data = "".join(lines).encode()
open(dst, "wb").write(data)
print(json.dumps({"rows": len(lines), "fingerprint": "sha256:" + hashlib.sha256(data).hexdigest()}))
"""


def generate(path: Path, n: int, seed: int = 0) -> None:
    """N synthetic MTEB rows: unique queries of ~8 words; 1 positive (2 in 10% of rows) and 4-6 negatives drawn
    from a pool of 50k documents of 12-27 words (candidates recur across queries, as in MTEB reranking sets)."""
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    pool = [" ".join(words[rng.integers(0, len(words), rng.integers(12, 28))]) for _ in range(50_000)]
    n_pos = np.where(rng.random(n) < 0.1, 2, 1)
    n_neg = rng.integers(4, 7, n)
    docs = rng.integers(0, len(pool), (n, 8)).tolist()
    query_words = rng.integers(0, len(words), (n, 8))
    with open(path, "wb") as f:
        for start in range(0, n, 50_000):
            out = []
            for i in range(start, min(n, start + 50_000)):
                texts = [pool[j] for j in docs[i][: n_pos[i] + n_neg[i]]]
                row = {
                    "query": f"q{i} " + " ".join(words[query_words[i]]),
                    "positive": texts[: n_pos[i]],
                    "negative": texts[n_pos[i] :],
                }
                out.append(orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE))
            f.write(b"".join(out))


def _hwm(pid: int) -> int | None:
    """Peak RSS so far (VmHWM) of a live process, in bytes; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def measure(cmd: list[str]) -> tuple[float, float, int, str]:
    """(wall seconds, CPU seconds, peak RSS bytes, stdout) of one child process.

    The peak is the child's VmHWM polled every 10 ms (the high-water mark of its own address space, exact up
    to the last poll). `ru_maxrss` would be wrong here: at exec the kernel folds in the RSS the parent had
    when it forked, and this parent holds the generated data. CPU time (user + sys, all threads) comes from
    `wait4`; rows per CPU-second is the figure that does not depend on how busy the machine is.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT)
        peak = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            peak = max(peak, _hwm(proc.pid) or 0)
            time.sleep(0.01)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{err.read().decode()[-2000:]}")
        return wall, usage.ru_utime + usage.ru_stime, peak, out.read().decode()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="synthetic MTEB rows to convert")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        tmp = Path(tmp)
        src = tmp / "mteb.jsonl"
        t0 = time.perf_counter()
        generate(src, args.rows)
        size = src.stat().st_size
        print(
            f"generated {args.rows:,} MTEB rows ({size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.1f} s"
        )

        ours_wall, ours_cpu, ours_rss, ours_out = measure(
            [
                str(VENV_BIN / "embedtune"),
                "convert",
                "--source",
                str(src),
                "--output",
                str(tmp / "ours.jsonl"),
            ]
        )
        ours = orjson.loads(ours_out)
        peer_wall, peer_cpu, peer_rss, peer_out = measure(
            [sys.executable, "-c", PEER, str(src), str(tmp / "peer.jsonl")]
        )
        peer = orjson.loads(peer_out)
        same = peer["fingerprint"] == ours["fingerprint"] and peer["rows"] == ours["rows"]
        disk = hashlib.sha256((tmp / "ours.jsonl").read_bytes()).hexdigest()

    n = args.rows
    print(
        f"output rows: {ours['rows']:,}; identical to the pandas output: {same}; fingerprint = sha256 of the "
        f"file: {'sha256:' + disk == ours['fingerprint']}"
    )
    print(
        f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (other work slows wall times)"
    )
    print(f"{'':28}{'wall s':>8}{'rows/s':>11}{'CPU s':>8}{'rows/CPU-s':>12}{'peak RSS':>12}")
    for name, wall, cpu, rss in (
        ("embedtune convert (CLI)", ours_wall, ours_cpu, ours_rss),
        ("pandas read_json+iterrows", peer_wall, peer_cpu, peer_rss),
    ):
        print(f"{name:28}{wall:8.2f}{n / wall:11,.0f}{cpu:8.2f}{n / cpu:12,.0f}{rss / 2**20:8.0f} MiB")
    print(
        f"ratio vs pandas: {peer_wall / ours_wall:.1f}x wall, {peer_cpu / ours_cpu:.1f}x CPU, "
        f"{peer_rss / ours_rss:.1f}x less peak memory | targets: >= 200,000 rows/s wall: {n / ours_wall >= 200_000}, "
        f"per CPU-second: {n / ours_cpu >= 200_000}; <= 1 GiB: {ours_rss <= 2**30}"
    )


if __name__ == "__main__":
    main()
