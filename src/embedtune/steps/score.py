"""score: a teacher's score of every (query, document) of each row, written into its `teacher_scores`.

    embedtune score --dataset work/train_mined.jsonl --teacher-model out/reranker --output work/train_scored.jsonl \\
        [--teacher-task-type auto|reranker|embedding] [--score-batch-tokens 16384] [--nproc 8]

What distillation trains on (`loss_type distill_kl | margin_mse`): mine negatives, score them with a stronger
model, train the student on the scores. Read top to bottom, `run(cfg)` is the whole step (the scoring itself
is `embedtune.teacher`):

1. Check the knobs. `--passthrough`: copy the rows unchanged and stop (the pipeline always runs this step,
   passing `passthrough` when no teacher_model is given, for the reason mine does).
2. Read the rows (validated canonical rows). Rows with `images`: a teacher that reads images (Qwen2-VL /
   Qwen3-VL) scores them with their images (each read and decoded first: `FILE:LINE: images[i]: reason`); a
   text teacher copies them unscored (counted in the stats).
3. `--nproc N` outside torchrun: relaunch under torchrun, one process per GPU, and return the stats rank 0
   wrote.
4. Resume: a killed run left `.<output>.partial` (the rows scored so far, whole chunks only) and its
   `.json` (what it was scoring with, and how many rows and bytes are whole). When both match this run
   (same dataset bytes, teacher and knobs), scoring goes on after the last whole chunk; anything else starts
   over.
5. Load the teacher (`scoring.scoring_model`: bf16 on a GPU that has it) and score `score_chunk_rows` rows
   at a time (`teacher.score_rows`: batched by tokens, the passes split across ranks); after each chunk
   rank 0 appends it to the partial file, syncs it and records the new resume point.
6. Write the rows and `<output>.stats.json` together (`outputs.OutputSet`), then remove the partial files:
   rows, pairs, score percentiles of positives and negatives, the teacher's `separation` (how often it ranks
   the positive first vs chance, and its within-row spread: a warning when that is too flat for temperature
   1), seconds, pairs/s.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import orjson
import torch.distributed as dist

from embedtune.config import ScoreConfig
from embedtune.data import pass_rows_through, read_rows
from embedtune.distributed import gather_over_ranks, init_ranks
from embedtune.errors import EmbedtuneError
from embedtune.images import check_images
from embedtune.io import json_bytes, read_json, read_lines, write_json
from embedtune.launch import inside_torchrun, torchrun
from embedtune.mining import percentiles
from embedtune.modeling import Embedder
from embedtune.outputs import OutputSet, refuse_inputs
from embedtune.progress import rank, say
from embedtune.scoring import scoring_model
from embedtune.teacher import FLAT_SPREAD, score_rows, separation
from embedtune.vision import reads_images

KNOBS = ("teacher_model", "teacher_task_type", "max_length", "dtype")  # what a resume must share


def scored_row(row: dict, checked: dict, scores: list[float]) -> dict:
    """The row as given, with its teacher_scores (and its images as checked: resolved, when it has any)."""
    return {**row, **({"images": checked["images"]} if row.get("images") else {}), "teacher_scores": scores}


def run(cfg: ScoreConfig) -> dict:
    """Score `cfg.dataset` into `cfg.output`; returns the stats (also written beside it)."""
    # ---------------------------------------------------------------- 1. knobs, pass-through
    partial, state_path, stats_path = partial_paths(cfg.output)
    check_knobs(cfg, partial, state_path, stats_path)
    if cfg.passthrough:
        return pass_rows_through(cfg.dataset, cfg.output, stats_path, "score", "no teacher")

    # ---------------------------------------------------------------- 2. rows
    t0 = time.perf_counter()
    given = read_rows(cfg.dataset)
    sees = reads_images(cfg.teacher_model, cfg.trust_remote_code)  # a Qwen2-VL / Qwen3-VL teacher: every row
    # images read and decoded now (FILE:LINE: images[i]); a scored row keeps them resolved, as mine writes them
    checked = check_images(given, cfg.dataset) if sees else given
    todo = [i for i, r in enumerate(given) if sees or not r.get("images")]
    if not todo:
        raise EmbedtuneError(
            f"{cfg.dataset}: every row has images and {cfg.teacher_model} reads none (a Qwen2-VL / Qwen3-VL one does)"
        )

    # ---------------------------------------------------------------- 3. several processes: relaunch
    if cfg.nproc > 1 and not inside_torchrun():
        torchrun("score", cfg, cfg.nproc)
        return read_json(stats_path)
    world, device = init_ranks()

    # ---------------------------------------------------------------- 4. resume point
    fingerprint = {"dataset_sha256": sha256(cfg.dataset), **{k: getattr(cfg, k) for k in KNOBS}}
    done, size = resume_point(state_path, partial, fingerprint)
    if rank() == 0:
        with open(partial, "ab") as f:  # cut what a kill left after the last whole chunk
            f.truncate(size)
    say(
        "score", f"{len(given)} rows, {len(todo)} to score" + (f", resuming after row {done}" if done else "")
    )

    # ---------------------------------------------------------------- 5. score, chunk by chunk
    task = "" if cfg.teacher_task_type == "auto" else cfg.teacher_task_type
    t1 = time.perf_counter()
    pairs = 0
    with scoring_model(
        cfg.teacher_model, task, cfg.dtype, max_length=cfg.max_length, device=device,
        trust_remote_code=cfg.trust_remote_code,
    ) as teacher:  # fmt: skip
        kind = "embedding" if isinstance(teacher, Embedder) else "reranker"
        for start in range(done, len(given), cfg.score_chunk_rows):
            chunk = given[start : start + cfg.score_chunk_rows]
            scorable = [c for r, c in zip(chunk, checked[start : start + len(chunk)], strict=True)
                        if sees or not r.get("images")]  # fmt: skip
            scores = iter(score_rows(teacher, scorable, cfg.score_batch_tokens, shard=gather_over_ranks))
            pairs += sum(1 + len(r.get("rejected_response") or []) for r in scorable)
            if rank() == 0:
                lines = b"".join(
                    orjson.dumps(r if r.get("images") and not sees else scored_row(r, c, next(scores)))
                    + b"\n"
                    for r, c in zip(chunk, checked[start : start + len(chunk)], strict=True)
                )
                size = append_synced(partial, lines)
                write_json(state_path, {**fingerprint, "rows": start + len(chunk), "bytes": size})
            say("score", f"{min(start + len(chunk), len(given))}/{len(given)} rows")
    del teacher

    # ---------------------------------------------------------------- 6. write rows and stats
    result = None
    if rank() == 0:
        lines = list(read_lines(partial))  # the rows of this run and of any run it resumed
        scored = [orjson.loads(line) for line in lines]
        lists = [r["teacher_scores"] for r in scored if "teacher_scores" in r]
        positive, negative = [s[0] for s in lists], [x for s in lists for x in s[1:]]
        t2 = time.perf_counter()
        result = {
            "dataset": cfg.dataset,
            "output": cfg.output,
            "passthrough": False,
            "teacher_model": cfg.teacher_model,
            "teacher_task_type": kind,
            "rows": len(given),
            "rows_scored": len(todo),
            "rows_with_images_copied": len(given) - len(todo),
            "resumed_after_row": done,
            "pairs_scored_this_run": pairs,
            "processes": world,
            "positive_scores": percentiles(positive),
            "negative_scores": percentiles(negative),
            "separation": separation(lists),
            "seconds": {"read": round(t1 - t0, 3), "score": round(t2 - t1, 3), "total": round(t2 - t0, 3)},
            "pairs_per_second": round(pairs / max(t2 - t1, 1e-9), 2),
        }
        with OutputSet() as outs:  # rows and stats together, or neither
            outs.open(cfg.output).writelines(lines)
            outs.write_bytes(stats_path, json_bytes(result))
        for path in (partial, state_path):
            path.unlink(missing_ok=True)
        say(
            "score",
            f"{pairs} pairs in {t2 - t1:.1f}s; positive p50 {result['positive_scores'].get('p50')}, "
            f"negative p50 {result['negative_scores'].get('p50')}",
        )
        sep = result["separation"]
        if sep["rows"]:
            say(
                "score",
                f"positive ranked first in {sep['positive_first']:.1%} of {sep['rows']} rows "
                f"(chance {sep['chance']:.1%}); median spread within a row {sep['row_std']['p50']}",
            )
        if sep.get("flat"):
            say(
                "score",
                f"warning: the scores spread little within rows (median std {sep['row_std']['p50']} < "
                f"{FLAT_SPREAD}): at --distill-teacher-temperature 1 distill_kl's targets are near uniform; "
                "pass a temperature near that spread (cosine-like scores: the student's, e.g. 0.02)",
            )
    if world > 1:
        dist.barrier()
        result = result if result is not None else read_json(stats_path)
        dist.destroy_process_group()
    return result


def partial_paths(output: str) -> tuple[Path, Path, Path]:
    """(the partial rows, their resume state, the stats) of an output."""
    out = Path(output)
    partial = out.with_name(f".{out.name}.partial")
    return partial, partial.with_name(partial.name + ".json"), Path(f"{output}.stats.json")


def check_knobs(cfg: ScoreConfig, *paths: Path) -> None:
    """Reject what cannot work before anything is read or loaded (each knob's own range: knobs.py)."""
    if not cfg.passthrough and not cfg.teacher_model:
        raise EmbedtuneError("teacher_model: empty (required unless passthrough)")
    inputs = {"dataset": cfg.dataset, "teacher_model": cfg.teacher_model} if cfg.teacher_model else {}
    refuse_inputs(
        inputs or {"dataset": cfg.dataset}, {"output": cfg.output, **{p.name: str(p) for p in paths}}
    )


def sha256(path: str) -> str:
    h = hashlib.sha256()
    for line in read_lines(path):
        h.update(line)
    return h.hexdigest()


def resume_point(state_path: Path, partial: Path, fingerprint: dict) -> tuple[int, int]:
    """(rows already scored, bytes of the partial file that hold them), or (0, 0) to start over."""
    try:
        state = orjson.loads(state_path.read_bytes())
        whole = partial.stat().st_size >= state["bytes"]
    except (OSError, ValueError, KeyError, TypeError):
        return 0, 0
    same = all(state.get(k) == v for k, v in fingerprint.items())
    return (int(state["rows"]), int(state["bytes"])) if same and whole else (0, 0)


def append_synced(path: Path, data: bytes) -> int:
    """Append `data` and fsync; returns the file's new size (the next resume point)."""
    with open(path, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        return f.tell()
