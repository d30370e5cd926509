"""mine: add hard negatives to canonical rows, mined from a corpus with the base model.

    embedtune mine --dataset work/train.jsonl --model Qwen/Qwen3-Embedding-0.6B --output work/train_mined.jsonl \\
        [--corpus corpus.jsonl,more.txt] [--num-negatives 7] [--range-min 0] [--range-max 100] \\
        [--relative-margin 0.05] [--max-score 1.0] [--sampling top|random] [--nproc 8]

Read top to bottom, `run(cfg)` is the whole step (the search and the filters are in `embedtune.mining`):

1. Check the knobs. `--passthrough`: copy the rows unchanged and stop (the pipeline always runs this step
   and passes `passthrough = not mine_hard_negatives`: kfp.local cannot pick train's input out of If/Else
   branches, so the DAG keeps one shape).
2. Read the rows (validated canonical rows) and build the corpus: every response and rejected_response,
   plus the `--corpus` files. Rows with `images`: a model that reads images (Qwen2-VL / Qwen3-VL) mines them
   too, each text with its images (read and decoded first: `FILE:LINE: images[i]: reason`; candidates
   compared by words and image content; a corpus file may hold canonical rows with images); a text model
   copies them as they are.
3. `--nproc N` outside torchrun: relaunch under torchrun (`embedtune.launch`), one process per GPU, and
   return the stats rank 0 wrote.
4. Load the model for inference (`modeling.load_model`, with train's pooling and query instruction) and
   encode each distinct query (with the query instruction) and corpus text once
   (`scoring.encode_unique`); under torchrun the texts are split across ranks and all-gathered
   (`distributed.gather_over_ranks`), so every GPU encodes a shard.
5. Search: each distinct query's top-k documents, in blocks (never the Q x D matrix); under torchrun the
   queries are split across ranks too.
6. Select per row (own positives out, rank window, false-negative filters, top or random), write the rows
   and `<output>.stats.json`: counts, candidates dropped as likely false negatives, score percentiles of
   the positives and of the kept negatives, seconds and rows/s.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import orjson
import torch.distributed as dist

from embedtune.config import MineConfig
from embedtune.data import pass_rows_through, read_rows
from embedtune.distributed import gather_over_ranks, init_ranks
from embedtune.errors import EmbedtuneError
from embedtune.images import check_images
from embedtune.io import json_bytes, read_json
from embedtune.launch import inside_torchrun, torchrun
from embedtune.mining import (
    build_corpus,
    distinct_queries,
    item_key,
    row_items,
    search_depth,
    select_negatives,
    texts_and_images,
    top_k,
)
from embedtune.outputs import OutputSet, refuse_inputs
from embedtune.overlap import split_paths
from embedtune.progress import rank, say
from embedtune.scoring import encode_unique, row_dots, scoring_model
from embedtune.vision import reads_images


def run(cfg: MineConfig) -> dict:
    """Mine negatives for `cfg.dataset` into `cfg.output`; returns the stats (also written beside it)."""
    # ---------------------------------------------------------------- 1. knobs, pass-through
    check_knobs(cfg)
    stats_path = Path(f"{cfg.output}.stats.json")
    if cfg.passthrough:
        return pass_rows_through(cfg.dataset, cfg.output, stats_path, "mine", "no negatives mined")

    # ---------------------------------------------------------------- 2. rows and corpus
    t0 = time.perf_counter()
    given = read_rows(cfg.dataset)
    files = split_paths(cfg.corpus)
    for path in files:
        if not Path(path).is_file():
            raise EmbedtuneError(f"corpus: {path}: file not found")
    sees = reads_images(cfg.model, cfg.trust_remote_code)  # a Qwen2-VL / Qwen3-VL model mines every row
    # rows with images: read and decoded now (FILE:LINE: images[i]), or copied as they are by a text model
    rows = check_images(given, cfg.dataset) if sees else [r for r in given if not r.get("images")]
    if not rows:
        raise EmbedtuneError(
            f"{cfg.dataset}: every row has images and {cfg.model} reads none (a Qwen2-VL / Qwen3-VL one does)"
        )

    # ---------------------------------------------------------------- 3. several processes: relaunch
    if cfg.nproc > 1 and not inside_torchrun():
        torchrun("mine", cfg, cfg.nproc)
        return read_json(stats_path)
    world, device = init_ranks()
    corpus = build_corpus(rows, files, images=sees)  # texts, or (text, images) items
    queries, row_query, skip = distinct_queries(rows, images=sees)
    say("mine", f"{len(rows)} rows, {len(queries)} queries, {len(corpus)} candidate texts")

    # ---------------------------------------------------------------- 4. encode
    t1 = time.perf_counter()
    like = {
        "pooling": None if cfg.pooling == "auto" else cfg.pooling,
        "query_instruction": cfg.query_instruction or None,
    }
    with scoring_model(
        cfg.model, "embedding", cfg.dtype, like=like, max_length=cfg.max_length, device=device,
        trust_remote_code=cfg.trust_remote_code,
    ) as model:  # fmt: skip
        (qt, qr), (dt, dr) = texts_and_images(queries, sees), texts_and_images(corpus, sees)
        q, d = encode_unique(model, qt, dt, cfg.per_device_eval_batch_size, show_progress=rank() == 0,
                             shard=gather_over_ranks, query_images=qr, doc_images=dr)  # fmt: skip
        # (Q, H), (D, H) unit vectors
    del model

    # ---------------------------------------------------------------- 5. search
    t2 = time.perf_counter()
    doc_keys = np.fromiter((item_key(t) for t in corpus), dtype=np.uint64, count=len(corpus))
    k = search_depth(doc_keys, skip, cfg.range_max)

    def search(idx: np.ndarray) -> np.ndarray:
        scores, indices = top_k(q[idx], d, k, device=device)
        return np.concatenate(
            [scores.astype(np.float64), indices.astype(np.float64)], 1
        )  # (n, 2k), exact ints

    found = gather_over_ranks(search, len(queries))
    scores, indices = found[:, :k].astype(np.float32), found[:, k:].astype(np.int64)

    # ---------------------------------------------------------------- 6. select, write
    t3 = time.perf_counter()
    result = None
    if rank() == 0:
        where = {t: i for i, t in enumerate(corpus)}
        positives = [where[row_items(r, sees)[1]] for r in rows]
        positive_scores = row_dots(q, d, row_query, np.array(positives))
        mined, counts = select_negatives(
            rows, row_query, skip, corpus, doc_keys, scores, indices, positive_scores, cfg, images=sees
        )
        by_row = iter(mined)
        counts["rows_with_images_copied"] = len(given) - len(rows)
        t4 = time.perf_counter()
        result = {
            "dataset": cfg.dataset,
            "output": cfg.output,
            "passthrough": False,
            "rows": len(given),
            "queries": len(queries),
            "corpus_texts": len(corpus),
            "corpus_files": files,
            "model": cfg.model,
            "processes": world,
            **{f: getattr(cfg, f) for f in KNOBS},
            "search_depth": k,
            **counts,
            "seconds": {
                "read": round(t1 - t0, 3),
                "encode": round(t2 - t1, 3),
                "search": round(t3 - t2, 3),
                "select_write": round(t4 - t3, 3),
                "total": round(t4 - t0, 3),
            },
            "rows_per_second": round(len(rows) / max(t4 - t0, 1e-9), 2),
        }
        with OutputSet() as outs:  # rows and stats together, or neither
            out = outs.open(cfg.output)
            for r in given:
                out.write(orjson.dumps(r if r.get("images") and not sees else next(by_row)) + b"\n")
            outs.write_bytes(stats_path, json_bytes(result))
        say(
            "mine",
            f"{counts['negatives_mined']} negatives for {len(rows)} rows in {t4 - t0:.1f}s; "
            f"{counts['dropped_false_negatives']} candidates dropped as likely false negatives; "
            f"positive p50 {counts['positive_scores'].get('p50')}, "
            f"negative p50 {counts['negative_scores'].get('p50')}",
        )
    if world > 1:
        dist.barrier()
        result = result if result is not None else read_json(stats_path)
        dist.destroy_process_group()
    return result


KNOBS = ("num_negatives", "range_min", "range_max", "relative_margin", "max_score", "sampling",
         "keep_original_negatives", "seed")  # fmt: skip


def check_knobs(cfg: MineConfig) -> None:
    """Reject knob combinations that cannot work, before anything is read or loaded (each knob's own range:
    knobs.py, when cfg was built)."""
    if not cfg.range_min < cfg.range_max:
        raise EmbedtuneError(
            f"range_min, range_max: need 0 <= range_min < range_max, got {cfg.range_min}, {cfg.range_max}"
        )
    refuse_inputs({"dataset": cfg.dataset, "corpus": split_paths(cfg.corpus), "model": cfg.model},
                  {"output": cfg.output, "stats": f"{cfg.output}.stats.json"})  # fmt: skip
