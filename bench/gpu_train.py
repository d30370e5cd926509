"""GPU training throughput: embedtune train vs sentence-transformers' trainer, same model, rows, batch and steps.

A random Qwen3-Embedding-0.6B-shaped model (28 layers, hidden 1024, 16 heads, 8 KV heads, head_dim 128,
intermediate 3072; built from a config, no download) with a 32k byte-level BPE tokenizer trained here on the
SciFact corpus; infonce rows from SciFact train qrels: (query, positive abstract, N random other abstracts as
hard negatives). In one run, each in its own process (a clean GPU):

- `embedtune train --deepspeed none` and `--deepspeed zero3` (1 GPU), infonce, N hard negatives, every speed
  lever at its default (`embedtune.speed`: on CUDA bf16 weights + fp32 master AdamW, regional
  torch.compile, 2 length buckets, fused AdamW);
- the ablation (`--only ...,ablation`): `--deepspeed none` again with one lever turned off per run
  (`ABLATION` below: `--dtype autocast`, `--torch-compile off`, `--length-buckets 1`, `--optim adamw_torch`,
  ...) and with all of them off (what train did before the levers existed), each row also as a ratio to the
  defaults; the ZeRO-3 overhead is ZeRO-3 against `--deepspeed none` with the same levers (compile is off
  under ZeRO-3, so against the `compile_off` row);
- the levers (`--only ...,levers`): each lever that is off (or auto-off) by default turned on over the defaults
  (`LEVERS` below: Liger's kernels, padding-free batches, the gradient cache by tokens), all of them at once
  (`all_levers`), and the default configuration of a pipeline run (`default`: `--deepspeed auto`, i.e. none
  on one GPU), each also as a ratio to the defaults; on CPU Liger is left out of a row (its Triton kernels need
  a GPU) and the row says so;
- sentence-transformers' `SentenceTransformerTrainer`, MultipleNegativesRankingLoss with scale 1 / temperature
  (the same loss), last-token pooling, `no_duplicates` batches, bf16 on CUDA;
- images (`--only ...,vision`): `embedtune train --deepspeed none` on a random GME-shaped Qwen2-VL (its
  language model cut to `--layers`), the same rows with each positive an `--image-side`-pixel image + its text
  (448: 256 image tokens); tokens/s counts the image tokens (MFU: rough, the vision tower sees patches);
- encode: evaluate's path (`scoring.scoring_model` + `Embedder.encode`: token-length batches, `--dtype` auto =
  bf16 weights on the GPU) vs `SentenceTransformer.encode` on 2000 abstracts, per dtype.

Printed and written as JSON (`--out`): rows/s, real tokens/s (non-padding tokens of the rows as trained: each
text cut at max_length), MFU = 6 x non-embedding parameters x real tokens/s / `--peak-tflops` (790: the bf16
matmul peak measured on an H200), peak memory (GPU allocated, or RSS on CPU), the first step's time (compile
time shows up there) and the median of the other steps (the steady state), and encode texts/s. Results are
written after every part, so a time-out keeps what was measured.

    python bench/gpu_train.py [--steps 50] [--batch 16] [--negatives 3] [--max-length 512] [--temperature 0.01]
        [--layers 28] [--hidden 1024] [--peak-tflops 790] [--data-dir ../shared/data] [--out gpu_train.json]
        [--only embedtune,zero3,st,encode,ablation,levers,vision] [--image-side 448] [--ablation autocast,compile_off,...] [--train-args "..."]
    # a GPU session with little time: the calibration and the levers, ~15 runs of --steps 30
    python bench/gpu_train.py --steps 30 --out gpu_train.json
    python bench/gpu_train.py --smoke     # anywhere (CPU): 2 tiny layers, synthetic rows, 3 steps; tests run it

On a machine without internet (the lent GPU machine), bring the wheels it lacks (../shared/gpu/README.md).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
QWEN3_06B = {"layers": 28, "hidden": 1024, "heads": 16, "kv_heads": 8, "head_dim": 128, "intermediate": 3072}
SMOKE = {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "head_dim": 16, "intermediate": 128}
# One lever turned off per run (relative to the defaults), then all of them: name -> extra train flags.
ABLATION = {
    "autocast": "--dtype autocast",  # fp32 weights + bf16 autocast instead of bf16 weights + fp32 masters
    "compile_off": "--torch-compile off",
    "buckets_1": "--length-buckets 1",  # one pass padded to the longest text (auto is 2 on CUDA)
    "buckets_4": "--length-buckets 4",
    "pad_64": "--pad-to-multiple-of 64",
    "optim_unfused": "--optim adamw_torch",
    "all_off": "--dtype autocast --torch-compile off --length-buckets 1",  # train before the levers
}
SMOKE_ABLATION = "all_off"  # CPU: compile takes minutes; one run checks the plumbing (test_speed: autocast)
# The levers that are off (or auto-off) by default, each turned on over the defaults, then all of them; and the
# default configuration of a pipeline run (`--deepspeed auto`: none on one GPU). name -> extra train flags.
LEVERS = {
    "default": "--deepspeed auto",
    "liger": "--use-liger-kernel on",  # CUDA only (Triton kernels)
    "padding_free": "--padding-free on",  # flash-attention 2 varlen when installed, else sdpa's packed mask
    "chunk_tokens": "--gradient-cache-chunk-tokens 8192",  # gradient cache by padded tokens per pass
    "all_levers": "--use-liger-kernel on --padding-free on",
}
CUDA_ONLY = "--use-liger-kernel on"  # left out of a row on CPU, which says so


# ------------------------------------------------------------------------------------------------ inputs
def scifact(data_dir: Path) -> tuple[list[str], dict[str, str], list[tuple[str, str]]]:
    """(corpus texts, {doc id: text}, [(query, doc id)] of the train qrels)."""
    folder = data_dir / "scifact"
    if not (folder / "corpus.jsonl.gz").is_file():
        sys.exit(f"bench/gpu_train.py: {folder} not found; pass --data-dir (or --smoke for synthetic data)")
    docs = {}
    with gzip.open(folder / "corpus.jsonl.gz", "rt") as f:
        for line in f:
            d = json.loads(line)
            docs[d["_id"]] = (d.get("title", "") + " " + d["text"]).strip()
    with open(folder / "queries.jsonl") as f:
        queries = {q["_id"]: q["text"] for q in map(json.loads, f)}
    with open(folder / "qrels" / "train.tsv") as f:
        reader = csv.reader(f, delimiter="\t")
        next(reader)
        pairs = [(queries[q], d) for q, d, _ in reader if q in queries and d in docs]
    return list(docs.values()), docs, pairs


def synthetic(n_rows: int = 96) -> tuple[list[str], dict[str, str], list[tuple[str, str]]]:
    """Word-salad documents and queries (the smoke run: no data folder needed)."""
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import WORDS

    rng = random.Random(0)
    docs = {str(i): " ".join(rng.choices(WORDS, k=rng.randint(20, 60))) for i in range(n_rows * 2)}
    pairs = [(" ".join(rng.choices(WORDS, k=rng.randint(3, 8))), str(i)) for i in range(n_rows)]
    return list(docs.values()), docs, pairs


def rows_of(docs: dict[str, str], pairs, negatives: int, seed: int = 0) -> list[dict]:
    """Canonical infonce rows: the positive and `negatives` random other documents."""
    rng, ids = random.Random(seed), list(docs)
    rows = []
    for query, doc in pairs:
        negs: list[str] = []
        while len(negs) < negatives:
            other = docs[rng.choice(ids)]
            if other != docs[doc] and other not in negs:
                negs.append(other)
        rows.append({"query": query, "response": docs[doc], "rejected_response": negs})
    return rows


def build_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE with Qwen's special tokens, trained on `texts` (the model's own is not reachable)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=specials[1:],
    )
    fast.model_max_length = 8192
    return fast


def build_model(path: Path, tokenizer, shape: dict) -> int:
    """Write a random Qwen3 (causal LM, as Qwen3-Embedding ships) to `path`; return its non-embedding size."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        head_dim=shape["head_dim"],
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return sum(
        p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n
    )


GME_2B = {
    "layers": 28,
    "hidden": 1536,
    "heads": 12,
    "kv_heads": 2,
    "intermediate": 8960,
    "vision_depth": 32,
    "vision_dim": 1280,
    "vision_heads": 16,
}  # gme-Qwen2-VL-2B-Instruct's shape (Qwen2-VL-2B)
SMOKE_VL = {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "intermediate": 128, "vision_depth": 2,
            "vision_dim": 32, "vision_heads": 2}  # fmt: skip


def build_vision_model(path: Path, tokenizer, shape: dict, image_side: int) -> int:
    """Write a random Qwen2-VL (GME's architecture) with the bench tokenizer + Qwen-VL's vision tokens and an
    image processor that keeps `image_side`-pixel images as they are; return its non-embedding size."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    tokenizer.add_special_tokens({"additional_special_tokens": ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>",
                                                                "<|video_pad|>"]})  # fmt: skip
    ids = {
        t: tokenizer.convert_tokens_to_ids(t)
        for t in ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>")
    }
    head_dim = shape["hidden"] // shape["heads"]
    config = Qwen2VLConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": shape["hidden"], "intermediate_size": shape["intermediate"],
                     "num_hidden_layers": shape["layers"], "num_attention_heads": shape["heads"],
                     "num_key_value_heads": shape["kv_heads"], "max_position_embeddings": 32768,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                         "mrope_section": [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16]},
                     "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id, "bos_token_id": None},
        vision_config={"depth": shape["vision_depth"], "embed_dim": shape["vision_dim"], "hidden_size": shape["hidden"],
                       "num_heads": shape["vision_heads"], "mlp_ratio": 4, "patch_size": 14, "spatial_merge_size": 2,
                       "temporal_patch_size": 2, "in_chans": 3},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    side = image_side * image_side
    Qwen2VLImageProcessorPil(min_pixels=side, max_pixels=side).save_pretrained(path)
    return sum(
        p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n
    )


def vision_rows(rows: list[dict], image_dir: Path, image_side: int, n_images: int = 64) -> list[dict]:
    """The text rows with the positive as an image + its text (document-screenshot retrieval's shape): random
    `image_side`-pixel PNGs, `n_images` of them reused across rows."""
    import numpy as np
    from PIL import Image

    image_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n_images):
        Image.fromarray((rng.random((image_side, image_side, 3)) * 255).astype("uint8")).save(
            image_dir / f"{i}.png"
        )
    return [{**r, "response": "<image>" + r["response"], "images": [str(image_dir / f"{i % n_images}.png")]}
            for i, r in enumerate(rows)]  # fmt: skip


def real_tokens_per_row(tokenizer, rows: list[dict], max_length: int, negatives: int) -> dict:
    """Mean non-padding tokens of a row as trained (each text cut at max_length, + the appended EOS)."""
    sample = rows[:300]

    def n(text: str) -> int:
        return min(len(tokenizer.encode(text)), max_length - 1) + 1

    q = statistics.fmean(n(r["query"]) for r in sample)
    p = statistics.fmean(n(r["response"]) for r in sample)
    neg = statistics.fmean(n(t) for r in sample for t in r["rejected_response"][:negatives])
    return {
        "query": round(q, 1),
        "positive": round(p, 1),
        "negative": round(neg, 1),
        "row": round(q + p + negatives * neg, 1),
    }


# ------------------------------------------------------------------------------------------------ runs
ST_TRAIN = r"""
import json, resource, sys, time, torch
from datasets import Dataset
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.sentence_transformer import losses
from sentence_transformers.sentence_transformer import modules as models
from sentence_transformers.base.modules.transformer import Transformer
from sentence_transformers.training_args import BatchSamplers
from transformers import TrainerCallback
path, data, out, steps, batch, negatives, max_length, temperature = sys.argv[1:9]
steps, batch, negatives, max_length, temperature = int(steps), int(batch), int(negatives), int(max_length), float(temperature)
rows = [json.loads(line) for line in open(data)]
cols = {"anchor": [r["query"] for r in rows], "positive": [r["response"] for r in rows]}
for k in range(negatives):
    cols[f"negative_{k + 1}"] = [r["rejected_response"][k] for r in rows]
cuda = torch.cuda.is_available()
tr = Transformer(path, max_seq_length=max_length)
model = SentenceTransformer(modules=[tr, models.Pooling(tr.get_embedding_dimension(), "lasttoken"), models.Normalize()],
                            device="cuda" if cuda else "cpu")
class Steps(TrainerCallback):
    def __init__(self): self.times, self.last = [], time.perf_counter()
    def on_train_begin(self, *a, **k): self.last = time.perf_counter()
    def on_step_end(self, *a, **k):
        now = time.perf_counter(); self.times.append(now - self.last); self.last = now
steps_cb = Steps()
args = SentenceTransformerTrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-5,
    warmup_steps=0.1, seed=42, report_to="none", save_strategy="no", bf16=cuda, use_cpu=not cuda, logging_steps=max(steps, 1),
    batch_sampler=BatchSamplers.NO_DUPLICATES, disable_tqdm=True)
trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=Dataset.from_dict(cols),
                                     loss=losses.MultipleNegativesRankingLoss(model, scale=1.0 / temperature), callbacks=[steps_cb])
metrics = trainer.train().metrics
rest = sorted(steps_cb.times[1:])
peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print("RESULT " + json.dumps({"train_samples_per_second": metrics["train_samples_per_second"], "train_runtime": metrics["train_runtime"],
      "first_step_seconds": steps_cb.times[0], "median_step_seconds": rest[len(rest) // 2] if rest else None, "peak_memory_gb": peak}))
"""

ENCODE = r"""
import json, sys, time, torch
from embedtune.scoring import scoring_model
from sentence_transformers import SentenceTransformer
model, data, n, batch, max_length = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
texts = [json.loads(line)["response"] for line in open(data)][:n]
cuda = torch.cuda.is_available()
device = "cuda" if cuda else "cpu"
def timed(encode):
    encode(texts[: 2 * batch])  # warm-up (and compilation, if any)
    if cuda: torch.cuda.synchronize()
    t = time.perf_counter(); encode(texts)
    if cuda: torch.cuda.synchronize()
    return round(len(texts) / (time.perf_counter() - t), 1)
res = {}
for dtype in ([torch.float32, torch.bfloat16] if cuda else [torch.float32]):
    name = str(dtype).removeprefix("torch.")
    with scoring_model(model, dtype={torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype], max_length=max_length) as ours:
        res[f"embedtune_{name}"] = timed(lambda t: ours.encode(t, batch_size=batch))
    del ours
    theirs = SentenceTransformer(model, device=device, model_kwargs={"dtype": dtype})
    theirs.max_seq_length = max_length
    res[f"sentence_transformers_{name}"] = timed(lambda t: theirs.encode(t, batch_size=batch))
    del theirs
    if cuda: torch.cuda.empty_cache()
print("RESULT " + json.dumps(res))
"""


def run(cmd: list[str], log: Path, timeout: int) -> tuple[int, str, float]:
    """Run a command, its output to `log`; (exit code, stdout, seconds)."""
    t = time.perf_counter()
    try:
        p = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
        code, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        code, out, err = 124, e.stdout or "", e.stderr or ""
        out, err = (x.decode() if isinstance(x, bytes) else x for x in (out, err))
    log.write_text(out[-200_000:] + "\n---- stderr\n" + err[-400_000:])
    if code != 0:
        print(f"  failed ({code}), see {log}:\n{err[-2000:]}", file=sys.stderr)
    return code, out, time.perf_counter() - t


def result_line(stdout: str) -> dict:
    line = next((x for x in stdout.splitlines() if x.startswith("RESULT ")), None)
    return json.loads(line[len("RESULT ") :]) if line else {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny model, synthetic rows, 3 steps: a CPU plumbing check"
    )
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument(
        "--batch", type=int, default=16, help="rows per step (each: query, positive, negatives)"
    )
    parser.add_argument("--negatives", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.01)
    parser.add_argument("--layers", type=int, default=QWEN3_06B["layers"])
    parser.add_argument("--hidden", type=int, default=QWEN3_06B["hidden"])
    parser.add_argument(
        "--peak-tflops", type=float, default=790.0, help="bf16 matmul peak of the GPU (H200: 790)"
    )
    parser.add_argument("--encode-texts", type=int, default=2000)
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=Path("gpu_train.json"))
    parser.add_argument(
        "--only",
        default="embedtune,zero3,st,encode,ablation,levers,vision",
        help="comma-separated parts to run",
    )
    parser.add_argument(
        "--image-side", type=int, default=448, help="vision: image side in pixels (448: 256 tokens)"
    )
    parser.add_argument(
        "--ablation", default=",".join(ABLATION), help=f"ablation runs, of: {', '.join(ABLATION)}"
    )
    parser.add_argument("--train-args", default="", help="extra flags for both embedtune runs")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per part")
    args = parser.parse_args()

    import torch

    if args.smoke:
        shape, texts, docs, pairs = SMOKE, *synthetic()
        args.steps, args.batch, args.max_length, args.encode_texts, vocab = 3, 4, 64, 32, 600
        args.ablation = SMOKE_ABLATION if args.ablation == ",".join(ABLATION) else args.ablation
    else:
        shape = {**QWEN3_06B, "layers": args.layers, "hidden": args.hidden}
        texts, docs, pairs = scifact(args.data_dir)
        vocab = 32000
    parts = set(args.only.split(","))
    cuda = torch.cuda.is_available()
    results: dict = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "shape": shape,
        "steps": args.steps,
        "batch_rows": args.batch,
        "negatives": args.negatives,
        "max_length": args.max_length,
        "temperature": args.temperature,
        "peak_tflops": args.peak_tflops,
    }

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))

    with tempfile.TemporaryDirectory(prefix="embedtune-gpu-bench-") as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        tokenizer = build_tokenizer(texts + [q for q, _ in pairs], vocab)
        rows = rows_of(docs, pairs, args.negatives)
        data = work / "rows.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        nonembedding = build_model(work / "model", tokenizer, shape)
        tokens = real_tokens_per_row(tokenizer, rows, args.max_length, args.negatives)
        results.update(
            rows=len(rows),
            nonembedding_params=nonembedding,
            real_tokens=tokens,
            prepare_seconds=round(time.perf_counter() - t, 1),
        )
        save()
        print(
            f"{results['device']}: {len(rows)} rows, {nonembedding / 1e6:.1f}M non-embedding parameters, {tokens['row']} real tokens/row",
            flush=True,
        )

        def throughput(rows_per_s: float) -> dict:
            tps = rows_per_s * tokens["row"]
            return {
                "rows_per_s": round(rows_per_s, 2),
                "real_tokens_per_s": round(tps),
                "mfu": round(6 * nonembedding * tps / (args.peak_tflops * 1e12), 4),
            }

        common = [
            "--model", str(work / "model"), "--train-data", str(data), "--loss-type", "infonce",
            "--per-device-train-batch-size", str(args.batch), "--infonce-hard-negatives", str(args.negatives),
            "--infonce-temperature", str(args.temperature), "--max-length", str(args.max_length),
            "--save-steps", "0", "--logging-steps", str(max(args.steps // 5, 1)), "--learning-rate", "1e-5",
            "--max-steps", str(args.steps), *shlex.split(args.train_args),
        ]  # fmt: skip

        def train(part: str, deepspeed: str, flags: str = "") -> dict:
            out = work / f"et-{part}"
            print(f"embedtune train --deepspeed {deepspeed} {flags}...", flush=True)
            cmd = [sys.executable, "-m", "embedtune", "train", *common, "--output-dir", str(out),
                   "--deepspeed", deepspeed, *shlex.split(flags)]  # fmt: skip
            code, _, wall = run(cmd, args.out.with_suffix(f".{part}.log"), args.timeout)
            entry: dict = {"exit_code": code, "wall_seconds": round(wall, 1), "flags": flags}
            if code == 0:
                r = json.loads((out / "train_result.json").read_text())
                entry.update(throughput(r["train_samples_per_second"]), train_runtime=r["train_runtime"], first_step_seconds=r.get("first_step_seconds"),
                             median_step_seconds=r.get("median_step_seconds"), peak_memory_gb=r.get("peak_memory_gb"), final_loss=r["loss_history"][-1][1])  # fmt: skip
                if (
                    part != "embedtune"
                ):  # the encode part reads the defaults' model; the others only take room
                    shutil.rmtree(out, ignore_errors=True)
            return entry

        for part, deepspeed in (("embedtune", "none"), ("zero3", "zero3")):
            if part in parts:
                results[f"embedtune_{deepspeed}"] = train(part, deepspeed)
                save()

        if "st" in parts:
            print("sentence-transformers trainer ...", flush=True)
            script = work / "st_train.py"
            script.write_text(ST_TRAIN)
            cmd = [sys.executable, str(script), str(work / "model"), str(data), str(work / "st"), str(args.steps), str(args.batch),
                   str(args.negatives), str(args.max_length), str(args.temperature)]  # fmt: skip
            code, stdout, wall = run(cmd, args.out.with_suffix(".st.log"), args.timeout)
            entry = {"exit_code": code, "wall_seconds": round(wall, 1)}
            r = result_line(stdout)
            if r:
                entry.update(throughput(r.pop("train_samples_per_second")), **r)
            results["sentence_transformers"] = entry
            save()

        if "encode" in parts and (work / "et-embedtune" / "modules.json").is_file():
            print("encode ...", flush=True)
            script = work / "encode.py"
            script.write_text(ENCODE)
            cmd = [
                sys.executable,
                str(script),
                str(work / "et-embedtune"),
                str(data),
                str(args.encode_texts),
                "32",
                str(args.max_length),
            ]
            code, stdout, _ = run(cmd, args.out.with_suffix(".encode.log"), args.timeout)
            results["encode_texts_per_s"] = result_line(stdout) or {"exit_code": code}
            save()

        if "ablation" in parts:
            results.setdefault("ablation", {})
            for name in [a for a in args.ablation.split(",") if a]:
                results["ablation"][name] = train(f"ablation-{name}", "none", ABLATION[name])
                save()

        if "levers" in parts:
            results.setdefault("levers", {})
            for name, flags in LEVERS.items():
                if not cuda and flags == CUDA_ONLY:
                    results["levers"][name] = {
                        "skipped": "needs CUDA (Liger's Triton kernels)",
                        "flags": flags,
                    }
                    continue
                run_flags = flags if cuda else flags.replace(CUDA_ONLY, "").strip()
                deepspeed, run_flags = (
                    ("auto", "") if run_flags == "--deepspeed auto" else ("none", run_flags)
                )
                entry = train(f"lever-{name}", deepspeed, run_flags)
                if run_flags != flags and deepspeed == "none":
                    entry["note"] = "CPU: Liger left out"
                results["levers"][name] = entry
                save()

        if "vision" in parts:  # images: the positive is an image + text (GME's shape, random weights)
            print("embedtune train, images (Qwen2-VL) ...", flush=True)
            vshape = SMOKE_VL if args.smoke else {**GME_2B, "layers": min(args.layers, GME_2B["layers"])}
            side = 112 if args.smoke else args.image_side
            vtok = build_tokenizer(texts + [q for q, _ in pairs], vocab)
            vparams = build_vision_model(work / "vl-model", vtok, vshape, side)
            vdata = work / "vl-rows.jsonl"
            vrows = vision_rows(rows, work / "images", side)
            vdata.write_text("".join(json.dumps(r) + "\n" for r in vrows))
            from embedtune.images import check_images
            from embedtune.modeling import Embedder

            probe_model = Embedder.from_pretrained(work / "vl-model", max_length=args.max_length)
            sample = check_images(vrows[:64], str(vdata))
            lengths = [sum(len(t["input_ids"]) if isinstance(t, dict) else len(t) for t in probe_model.texts(
                [r["query"], r["response"], *r["rejected_response"][: args.negatives]],
                images=[[], r["_image_info"], *[[]] * len(r["rejected_response"][: args.negatives])])) for r in sample]  # fmt: skip
            image_tokens = probe_model.image_tokens(sample[0]["_image_info"][0])
            del probe_model
            out = work / "et-vision"
            cmd = [sys.executable, "-m", "embedtune", "train", *common, "--model", str(work / "vl-model"),
                   "--train-data", str(vdata), "--output-dir", str(out), "--deepspeed", "none"]  # fmt: skip
            code, _, wall = run(cmd, args.out.with_suffix(".vision.log"), args.timeout)
            entry = {"exit_code": code, "wall_seconds": round(wall, 1), "image_side": side,
                     "image_tokens_per_row": image_tokens, "tokens_per_row": round(sum(lengths) / len(lengths)),
                     "nonembedding_params": vparams}  # fmt: skip
            if code == 0:
                r = json.loads((out / "train_result.json").read_text())
                tps = r["train_samples_per_second"] * entry["tokens_per_row"]
                entry.update(rows_per_s=round(r["train_samples_per_second"], 2), real_tokens_per_s=round(tps),
                             mfu=round(6 * vparams * tps / (args.peak_tflops * 1e12), 4),
                             peak_memory_gb=r.get("peak_memory_gb"), median_step_seconds=r.get("median_step_seconds"))  # fmt: skip
            results["vision"] = entry
            save()

    ours, zero3, peer = (
        results.get(k, {}) for k in ("embedtune_none", "embedtune_zero3", "sentence_transformers")
    )
    print(f"\n{'run':<32}{'rows/s':>9}{'tokens/s':>11}{'MFU':>8}{'peak GB':>9}{'first s':>9}{'step s':>9}")
    for name, r in (
        ("embedtune --deepspeed none", ours),
        ("embedtune --deepspeed zero3", zero3),
        ("sentence-transformers", peer),
    ):
        if "rows_per_s" in r:
            print(f"{name:<32}{r['rows_per_s']:>9.2f}{r['real_tokens_per_s']:>11}{r['mfu']:>8.1%}{r.get('peak_memory_gb') or 0:>9.2f}"
                  f"{r.get('first_step_seconds') or 0:>9.2f}{r.get('median_step_seconds') or 0:>9.3f}")  # fmt: skip
    if "rows_per_s" in ours and "rows_per_s" in peer:
        results["embedtune_over_sentence_transformers"] = round(ours["rows_per_s"] / peer["rows_per_s"], 3)
        print(
            f"embedtune / sentence-transformers rows/s: {results['embedtune_over_sentence_transformers']:.2f}x"
        )
    if "rows_per_s" in ours and "rows_per_s" in zero3:
        results["zero3_over_none"] = round(zero3["rows_per_s"] / ours["rows_per_s"], 3)
        print(f"ZeRO-3 / no DeepSpeed rows/s: {results['zero3_over_none']:.2f}x")
    ablation = results.get("ablation", {})
    if ablation:
        print(
            f"\nablation (--deepspeed none, one lever off per row)\n  {'run':<14}{'flags':<56}{'rows/s':>9}{'x defaults':>12}{'first s':>9}{'step s':>9}{'peak GB':>9}"
        )
        for name, r in ablation.items():
            if "rows_per_s" in r:
                r["over_defaults"] = (
                    round(r["rows_per_s"] / ours["rows_per_s"], 3) if "rows_per_s" in ours else None
                )
                print(f"  {name:<14}{r['flags']:<56}{r['rows_per_s']:>9.2f}{r['over_defaults'] or 0:>12.2f}{r.get('first_step_seconds') or 0:>9.2f}"
                      f"{r.get('median_step_seconds') or 0:>9.3f}{r.get('peak_memory_gb') or 0:>9.2f}")  # fmt: skip
            else:
                print(f"  {name:<14}{r.get('flags', ''):<56} failed (exit {r.get('exit_code')})")
        same = ablation.get("compile_off", {})  # ZeRO-3 turns compile off: compare it with the same levers
        if "rows_per_s" in same and "rows_per_s" in zero3:
            results["zero3_overhead_same_levers"] = round(same["rows_per_s"] / zero3["rows_per_s"] - 1, 3)
            print(
                f"ZeRO-3 overhead over --deepspeed none, same levers (compile off): {results['zero3_overhead_same_levers']:+.1%}"
            )
    levers = results.get("levers", {})
    if levers:
        print(
            f"\nlevers (on over the defaults)\n  {'run':<14}{'flags':<56}{'rows/s':>9}{'x defaults':>12}{'MFU':>8}{'peak GB':>9}"
        )
        for name, r in levers.items():
            if "rows_per_s" in r:
                r["over_defaults"] = (
                    round(r["rows_per_s"] / ours["rows_per_s"], 3) if "rows_per_s" in ours else None
                )
                print(f"  {name:<14}{r['flags']:<56}{r['rows_per_s']:>9.2f}{r['over_defaults'] or 0:>12.2f}{r['mfu']:>8.1%}"
                      f"{r.get('peak_memory_gb') or 0:>9.2f}" + (f"  ({r['note']})" if r.get("note") else ""))  # fmt: skip
            else:
                print(
                    f"  {name:<14}{r.get('flags', ''):<56} "
                    + (r.get("skipped") or f"failed (exit {r.get('exit_code')})")
                )
    vision = results.get("vision", {})
    if "rows_per_s" in vision:
        print(f"\nimages (GME-shaped Qwen2-VL, {vision['image_tokens_per_row']} image tokens per row of "
              f"{vision['tokens_per_row']}): {vision['rows_per_s']:.2f} rows/s, {vision['real_tokens_per_s']} "
              f"tokens/s incl. image tokens, MFU {vision['mfu']:.1%} (6 x all non-embedding parameters x tokens: rough, the vision tower sees patches)")  # fmt: skip
    for key, value in results.get("encode_texts_per_s", {}).items():
        print(f"encode {key}: {value} texts/s")
    if not cuda:
        print("(CPU: these figures say nothing about GPU speed)")
    save()
    failed = [
        k
        for k in ("embedtune_none", "embedtune_zero3", "sentence_transformers")
        if results.get(k, {}).get("exit_code", 0) != 0
    ] + [k for k, r in {**ablation, **levers}.items() if r.get("exit_code", 0) != 0]
    failed += ["vision"] if results.get("vision", {}).get("exit_code", 0) != 0 else []
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
