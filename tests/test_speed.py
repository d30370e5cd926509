"""The speed levers (`embedtune.speed`) give what the plain path gives, on CPU, with stated tolerances.

- length buckets: the loss and every gradient of one padded pass, fp32, rtol = atol = 1e-5 (the passes differ
  from the one padded pass only by float rounding: shorter padding, other matmul shapes);
- master weights: bf16 weights + `MasterWeightAdamW` keep the fp32 AdamW trajectory exactly (the same fp32
  update from the same gradients), and a resumed optimizer continues from the exact fp32 masters;
- regional compile (inductor, C++ on CPU): loss and gradients of the eager model, rtol = atol = 1e-4;
- evaluate in bf16: embeddings within cosine 0.999 of fp32's text by text, and metrics within what one
  rounding-level rank swap can move them, on the real all-MiniLM-L6-v2 (see the evaluate section).
GPU speed is not measured here (bench/gpu_train.py does, on a GPU).
"""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

from embedtune.batching import Collator, tokenize_rows
from embedtune.config import EvaluateConfig, TrainConfig, resolve_env_defaults
from embedtune.errors import EmbedtuneError
from embedtune.io import read_jsonl
from embedtune.modeling import Embedder
from embedtune.objectives import objective
from embedtune.speed import (
    MasterWeightAdamW,
    Precision,
    bucket_cuts,
    compile_enabled,
    compile_layers,
    encode_in_buckets,
    repeated_layers,
    resolve_buckets,
    resolve_dtype,
)
from embedtune.steps import evaluate, train
from embedtune.trainer import TrainModel

TOL = {"rtol": 1e-5, "atol": 1e-5}


def train_model(path, loss_type: str = "infonce", **knobs) -> TrainModel:
    """The module train trains, built as the train step builds it (compiled when `torch_compile` says so)."""
    task = "reranker" if loss_type.endswith("reranker") else "embedding"
    cfg = resolve_env_defaults(
        TrainConfig(model=str(path), train_data="-", output_dir="-", task_type=task, loss_type=loss_type,
                    infonce_temperature=0.05, reranker_instruction="rank",
                    max_length=48 if task == "embedding" else 128, **knobs)
    )  # fmt: skip
    torch.manual_seed(0)
    inner = train.build_model(cfg, Precision.resolve(cfg.dtype, cfg.deepspeed))
    return train.train_module(inner, cfg).train()


def rows(fixtures_dir, loss_type: str) -> list[dict]:
    name = {"infonce": "infonce", "pointwise_reranker": "reranker", "cosine_similarity": "sts"}[loss_type]
    return list(read_jsonl(fixtures_dir / "train" / f"{name}.jsonl"))[:8]


def loss_and_grads(model: TrainModel, batch: dict) -> tuple[float, dict]:
    model.zero_grad()
    loss = model(**batch)["loss"]
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a: tuple[float, dict], b: tuple[float, dict], tol: dict) -> None:
    assert a[0] == pytest.approx(b[0], rel=tol["rtol"], abs=tol["atol"])
    assert a[1].keys() == b[1].keys() and a[1]
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], **tol, msg=name)


# ------------------------------------------------------------------------------------------------ buckets
def test_bucket_cuts_are_the_fewest_padded_tokens_of_any_cut():
    rng = random.Random(0)
    for _ in range(200):
        lengths = sorted(rng.randint(1, 60) for _ in range(rng.randint(1, 9)))
        k = rng.randint(1, 4)
        cuts = bucket_cuts(lengths, k)

        def cost(c, lengths=lengths):
            return sum((b - a) * lengths[b - 1] for a, b in zip(c[:-1], c[1:], strict=True))

        groups = min(k, len(lengths))
        best = min(
            cost([0, *inner, len(lengths)])
            for inner in itertools.combinations(range(1, len(lengths)), groups - 1)
        )
        assert len(cuts) == groups + 1 and all(b > a for a, b in zip(cuts[:-1], cuts[1:], strict=True))
        assert cost(cuts) == best


@pytest.mark.parametrize("loss_type", ["infonce", "cosine_similarity", "pointwise_reranker"])
@pytest.mark.parametrize("buckets,multiple", [(2, 0), (3, 8)])
def test_length_buckets_give_the_loss_and_gradients_of_one_padded_pass(
    tiny_qwen3_path, fixtures_dir, loss_type, buckets, multiple
):
    one = train_model(tiny_qwen3_path, loss_type, length_buckets=1)
    bucketed = train_model(tiny_qwen3_path, loss_type, length_buckets=buckets, pad_to_multiple_of=multiple)
    feats = tokenize_rows(one.model, rows(fixtures_dir, loss_type))
    batch = Collator(objective(loss_type), one.model.tokenizer.pad_token_id, pad_to_multiple_of=multiple)(
        feats
    )
    lengths = batch["features"]["attention_mask"].sum(1)
    assert lengths.max() > lengths.min()  # something to save: texts of different lengths
    assert_same(loss_and_grads(bucketed, batch), loss_and_grads(one, batch), TOL)


def test_fewer_texts_than_buckets_still_run_every_pass_with_the_same_outputs():
    calls = []

    def forward(features):
        calls.append(features["input_ids"].shape)
        return features["input_ids"].float().sum(1, keepdim=True) * 2

    ids = torch.tensor([[3, 4, 0], [5, 0, 0]])
    out = encode_in_buckets(forward, {"input_ids": ids, "attention_mask": (ids > 0).long()}, k=4)
    assert len(calls) == 4  # 2 real groups + 2 stand-ins: ZeRO-3 needs the same count on every rank
    torch.testing.assert_close(out, torch.tensor([[14.0], [10.0]]))


# ------------------------------------------------------------------------------------------------ dtype
def test_dtype_auto_is_fp32_on_cpu_and_train_refuses_fp16():
    assert resolve_dtype("auto", cuda=False) == "fp32"
    assert Precision.resolve("bf16", "none", cuda=False) == Precision(
        dtype="bf16", load=torch.bfloat16, trainer_bf16=False, master_weights=True
    )
    assert (
        Precision.resolve("bf16", "zero3").master_weights is False
    )  # DeepSpeed's bf16 mode keeps the masters
    assert Precision.resolve("autocast", "none").trainer_bf16 is True
    with pytest.raises(EmbedtuneError, match="fp16"):
        Precision.resolve("fp16", "none")
    with pytest.raises(EmbedtuneError, match="dtype"):
        resolve_dtype("half")
    assert compile_enabled("auto", "none", cuda=True) and not compile_enabled("auto", "zero3", cuda=True)
    assert not compile_enabled("auto", "none", cuda=False)
    assert resolve_buckets(0, cuda=False) == 1 and resolve_buckets(0, cuda=True) == 2  # auto
    assert resolve_buckets(3, cuda=False) == 3


def test_master_weights_follow_the_fp32_adamw_trajectory_and_resume_exactly():
    torch.manual_seed(0)
    ref = torch.nn.Linear(16, 4)
    low = torch.nn.Linear(16, 4).to(torch.bfloat16)
    with torch.no_grad():
        for p, q in zip(ref.parameters(), low.parameters(), strict=True):
            p.copy_(q.float())  # the same starting point, exactly representable in bf16
    kw = {"lr": 1e-4, "weight_decay": 0.01}
    opt_ref = torch.optim.AdamW(ref.parameters(), **kw)
    opt = MasterWeightAdamW([{"params": list(low.parameters())}], **kw)
    for _ in range(5):
        grads = [torch.randn_like(p, dtype=torch.bfloat16) for p in low.parameters()]
        for p, q, g in zip(ref.parameters(), low.parameters(), grads, strict=True):
            p.grad, q.grad = g.float(), g.clone()
        opt_ref.step()
        opt.step()
        opt.zero_grad()
        assert all(p.grad is None for p in low.parameters())
        for p, (q, master) in zip(ref.parameters(), opt.pairs, strict=True):
            torch.testing.assert_close(master, p, rtol=0, atol=0)  # the fp32 trajectory itself
            torch.testing.assert_close(q, p.to(torch.bfloat16), rtol=0, atol=0)  # its bf16 rounding
    # 5 steps of 1e-4 are below bf16's resolution for most weights: only the masters hold the change
    assert any((m - q.float()).abs().max() > 0 for q, m in opt.pairs)
    state = opt.state_dict()
    again = torch.nn.Linear(16, 4).to(torch.bfloat16)
    resumed = MasterWeightAdamW([{"params": list(again.parameters())}], **kw)
    resumed.load_state_dict(state)
    for (_, m), (q, m2) in zip(opt.pairs, resumed.pairs, strict=True):
        torch.testing.assert_close(m2, m, rtol=0, atol=0)
        torch.testing.assert_close(q, m.to(torch.bfloat16), rtol=0, atol=0)


def test_bf16_training_on_cpu_saves_bf16_weights_and_runs_the_master_weight_optimizer(
    tiny_qwen3_path, fixtures_dir, tmp_path
):
    out = tmp_path / "out"
    result = train.run(
        TrainConfig(
            model=str(tiny_qwen3_path), train_data=str(fixtures_dir / "train" / "infonce.jsonl"),
            output_dir=str(out), deepspeed="none", max_steps=3, per_device_train_batch_size=4,
            save_steps=2, dtype="bf16", optim="adamw_torch", learning_rate=1e-3, max_length=48,
        )
    )  # fmt: skip
    assert result["global_step"] == 3 and result["train_loss"] > 0
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118
    assert dtypes == {torch.bfloat16}
    with pytest.raises(EmbedtuneError, match="master weights"):
        train.check_knobs(
            TrainConfig(model="m", train_data="-", output_dir="-", deepspeed="none", dtype="bf16",
                        optim="adafactor", infonce_temperature=0.05)
        )  # fmt: skip


# ------------------------------------------------------------------------------------------------ compile
def test_repeated_layers_find_the_decoder_and_encoder_stacks(tiny_qwen3_path, minilm_path):
    qwen = Embedder.from_pretrained(tiny_qwen3_path)
    assert repeated_layers(qwen.inner) is qwen.inner.layers
    bert = Embedder.from_pretrained(minilm_path)
    assert repeated_layers(bert.inner) is bert.inner.encoder.layer and len(bert.inner.encoder.layer) == 6


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_regional_compile_gives_the_eager_loss_and_gradients(tiny_qwen3_path, fixtures_dir):
    eager = train_model(tiny_qwen3_path, "infonce", torch_compile="off")
    compiled = train_model(tiny_qwen3_path, "infonce", torch_compile="on")
    keys = set(compiled.state_dict())
    assert keys == set(eager.state_dict())  # compiled in place: checkpoints and saves keep their keys
    assert compile_layers(Embedder.from_pretrained(tiny_qwen3_path).inner) == 2
    feats = tokenize_rows(eager.model, rows(fixtures_dir, "infonce"))
    collate = Collator(objective("infonce"), eager.model.tokenizer.pad_token_id)
    for batch in (collate(feats[:4]), collate(feats[4:])):  # two shapes: dynamic, no recompile per length
        assert_same(
            loss_and_grads(compiled, batch), loss_and_grads(eager, batch), {"rtol": 1e-4, "atol": 1e-4}
        )


# ------------------------------------------------------------------------------------------------ evaluate
# bf16 evaluation must give fp32's answer. Measured where the tolerance can hold it, on the real
# all-MiniLM-L6-v2 and seeded synthetic rows (`synthetic.py`: 150 STS pairs, 30 ranking queries of 6 candidates):
# - per text: cosine(bf16 embedding, fp32 embedding) >= 0.999 and unit norm within 1e-3. bf16 keeps 8 bits of
#   mantissa; measured min cosine 0.99992 under ATEN_CPU_CAPABILITY default and avx2. A wrong pooling gives
#   0.49 (measured), a missing normalization norms far from 1: both fail (tested below).
# - STS correlations within 0.002 of fp32's: over n = 150 pairs one adjacent swap of two pairs' ranks moves a
#   Spearman correlation by at most 12 / (n^2 - 1) = 5.3e-4, so 0.002 holds more than three worst-case swaps
#   (measured: at most 2.3e-4); a wrong pooling moves them by 0.02-0.035 (measured).
# - ranking: mean_pos / mean_neg / margin (means of cosines) within 0.002 (measured at most 5.4e-4); map,
#   mrr_at_10 and ndcg_at_10 within one swap: a positive and a negative trading places move one query's
#   AP or RR by at most 1/2, the mean over Q queries by 0.5 / Q (0.017 here; measured 0; a wrong pooling
#   moves map by 0.097).
# (The old check compared 16 STS pairs at 0.002: one swap there moves Spearman by up to 0.047, and it failed
# on CPUs whose bf16 kernels round otherwise.)
COS_MIN, NORM_TOL, METRIC_TOL = 0.999, 1e-3, 0.002


def embedding_problems(fp32, bf16) -> list[str]:
    """How far bf16 embeddings (N, H) are from the fp32 ones, as problems; [] when within the bounds above."""
    import numpy as np

    norms = np.linalg.norm(bf16, axis=1)
    cos = (fp32 * bf16).sum(1) / (np.linalg.norm(fp32, axis=1) * norms)
    problems = []
    if cos.min() < COS_MIN:
        problems.append(f"cosine to fp32 {cos.min():.5f} < {COS_MIN} (text {int(cos.argmin())})")
    if np.abs(norms - 1).max() > NORM_TOL:
        problems.append(f"norm {norms[np.abs(norms - 1).argmax()]:.5f} is not 1 within {NORM_TOL}")
    return problems


def test_bf16_embeddings_are_the_fp32_ones_text_by_text_and_a_broken_bf16_path_fails(
    minilm_path, monkeypatch
):
    from synthetic import sts_rows

    import embedtune.modeling
    from embedtune.scoring import scoring_model

    texts = list(dict.fromkeys(t for r in sts_rows(20) for t in (r["query"], r["response"])))
    encoded = {}
    for dtype in ("fp32", "bf16"):
        with scoring_model(str(minilm_path), dtype=dtype) as model:
            encoded[dtype] = model.encode(texts)
            assert next(model.parameters()).dtype == (torch.bfloat16 if dtype == "bf16" else torch.float32)
    assert embedding_problems(encoded["fp32"], encoded["bf16"]) == []
    with scoring_model(str(minilm_path), dtype="bf16") as model:
        model.pooling = "cls"  # a bf16 path that pools the wrong token
        assert "cosine to fp32" in " ".join(embedding_problems(encoded["fp32"], model.encode(texts)))
        model.pooling = "mean"
        monkeypatch.setattr(embedtune.modeling.F, "normalize", lambda x, **kw: x)  # ... or never normalizes
        assert "norm" in " ".join(embedding_problems(encoded["fp32"], model.encode(texts)))


@pytest.fixture(scope="module")
def bf16_and_fp32_metrics(minilm_path, tmp_path_factory):
    from synthetic import ranking_rows, sts_rows

    from embedtune.io import write_jsonl

    work = tmp_path_factory.mktemp("bf16-eval")
    results = {}
    for shape, rows in (("sts", sts_rows(150)), ("ranking", ranking_rows(30))):
        write_jsonl(work / f"{shape}.jsonl", rows)
        for dtype in ("fp32", "bf16"):
            out = work / f"{shape}-{dtype}.json"
            evaluate.run(
                EvaluateConfig(model=str(minilm_path), eval_data=str(work / f"{shape}.jsonl"),
                               output=str(out), dtype=dtype)
            )  # fmt: skip
            results[shape, dtype] = json.loads(out.read_text())
    return results


@pytest.mark.parametrize("shape", ["sts", "ranking"])
def test_evaluate_in_bf16_gives_the_fp32_metrics(bf16_and_fp32_metrics, shape):
    fp32, bf16 = bf16_and_fp32_metrics[shape, "fp32"], bf16_and_fp32_metrics[shape, "bf16"]
    assert bf16["dtype"] == "bf16" and fp32["dtype"] == "fp32" and bf16["data_shape"] == shape
    one_swap = 0.5 / fp32["n_queries"] if shape == "ranking" else METRIC_TOL
    for name, value in fp32["metrics"].items():
        tol = one_swap if name in ("map", "mrr_at_10", "ndcg_at_10") else METRIC_TOL
        assert bf16["metrics"][name] == pytest.approx(value, abs=tol), name


# ------------------------------------------------------------------------------------------------ liger
LIGER_PROBE = """
import json, sys
sys.path.insert(0, {tests!r})
from embedtune.modeling import Embedder, ClassifierReranker
from embedtune.speed import apply_liger_kernel
import transformers.models.qwen3.modeling_qwen3 as q3
model = Embedder.from_pretrained({path!r})
on = apply_liger_kernel(model.inner, "on", cuda=False)
layer = model.inner.layers[0]
print(json.dumps({{"on": on, "input_norm": layer.input_layernorm.forward.__qualname__,  # Liger binds its forward
                  "final_norm": model.inner.norm.forward.__qualname__, "mlp": layer.mlp.forward.__qualname__,
                  "rope": q3.apply_rotary_pos_emb.__module__}}))
"""


def test_liger_swaps_in_its_norm_rope_and_swiglu_kernels_for_qwen3(tiny_qwen3_path):
    """In a process of its own: Liger's RoPE is patched module-wide, and its Triton kernels need a GPU to run."""
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("liger_kernel")
    code = LIGER_PROBE.format(tests=str(Path(__file__).parent), path=str(tiny_qwen3_path))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["on"] is True
    assert got["input_norm"] == got["final_norm"] == "LigerRMSNorm.forward", got
    assert got["mlp"] == "LigerSwiGLUMLP.forward" and got["rope"].startswith("liger_kernel"), got


def test_liger_is_off_by_auto_on_cpu_and_refused_cleanly_when_missing(
    tiny_qwen3_path, minilm_path, monkeypatch
):
    import importlib.util

    from embedtune.speed import apply_liger_kernel

    qwen = Embedder.from_pretrained(tiny_qwen3_path)
    assert (
        apply_liger_kernel(qwen.inner, "auto", cuda=False) is False
        and apply_liger_kernel(qwen.inner, "false") is False
    )
    with pytest.raises(EmbedtuneError, match="use_liger_kernel: 'maybe'"):
        apply_liger_kernel(qwen.inner, "maybe")
    if importlib.util.find_spec("liger_kernel"):
        bert = Embedder.from_pretrained(minilm_path)
        with pytest.raises(EmbedtuneError, match="no kernels for model type 'bert'"):
            apply_liger_kernel(bert.inner, "on", cuda=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "liger_kernel" else real(name, *a)
    )
    with pytest.raises(EmbedtuneError, match="use_liger_kernel: on needs liger-kernel"):
        apply_liger_kernel(qwen.inner, "on")
    assert apply_liger_kernel(qwen.inner, "auto", cuda=True) is False  # auto without it: off, no error
