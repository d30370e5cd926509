"""The speed levers (`embedtune.speed`) give what the plain path gives, on CPU, with stated tolerances.

- length buckets: the loss and every gradient of one padded pass, fp32, rtol = atol = 1e-5 (the passes differ
  from the one padded pass only by float rounding: shorter padding, other matmul shapes);
- master weights: bf16 weights + `MasterWeightAdamW` keep the fp32 AdamW trajectory exactly (the same fp32
  update from the same gradients), and a resumed optimizer continues from the exact fp32 masters;
- regional compile (inductor, C++ on CPU): loss and gradients of the eager model, rtol = atol = 1e-4;
- evaluate in bf16: every metric within 0.002 of fp32 on the real all-MiniLM-L6-v2 (the issue's bar).
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
from embedtune.modeling import Embedder, Reranker
from embedtune.speed import (
    MasterWeightAdamW,
    bucket_cuts,
    compile_enabled,
    compile_layers,
    encode_in_buckets,
    repeated_layers,
    resolve_buckets,
    resolve_dtype,
    train_precision,
)
from embedtune.steps import evaluate, train
from embedtune.trainer import TrainModel

TOL = {"rtol": 1e-5, "atol": 1e-5}


def train_model(path, loss_type: str = "infonce", **knobs) -> TrainModel:
    task = "reranker" if loss_type.endswith("reranker") else "embedding"
    cfg = resolve_env_defaults(
        TrainConfig(model=str(path), train_data="-", output_dir="-", task_type=task, loss_type=loss_type,
                    infonce_temperature=0.05, **knobs)
    )  # fmt: skip
    torch.manual_seed(0)
    if task == "embedding":
        inner = Embedder.from_pretrained(path, max_length=48)
    else:
        inner = Reranker.from_pretrained(path, instruction="rank", max_length=128)
    return TrainModel(inner, cfg).train()


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
    batch = Collator(loss_type, one.model.tokenizer.pad_token_id, pad_to_multiple_of=multiple)(feats)
    lengths = batch["attention_mask"].sum(1)
    assert lengths.max() > lengths.min()  # something to save: texts of different lengths
    assert_same(loss_and_grads(bucketed, batch), loss_and_grads(one, batch), TOL)


def test_fewer_texts_than_buckets_still_run_every_pass_with_the_same_outputs():
    calls = []

    def forward(ids, mask):
        calls.append(ids.shape)
        return ids.float().sum(1, keepdim=True) * 2

    ids = torch.tensor([[3, 4, 0], [5, 0, 0]])
    mask = (ids > 0).long()
    out = encode_in_buckets(forward, ids, mask, k=4)
    assert len(calls) == 4  # 2 real groups + 2 stand-ins: ZeRO-3 needs the same count on every rank
    torch.testing.assert_close(out, torch.tensor([[14.0], [10.0]]))


# ------------------------------------------------------------------------------------------------ dtype
def test_dtype_auto_is_fp32_on_cpu_and_train_refuses_fp16():
    assert resolve_dtype("auto", cuda=False) == "fp32"
    assert train_precision("bf16", "none", cuda=False) == {
        "dtype": "bf16", "load": torch.bfloat16, "trainer_bf16": False, "master": True
    }  # fmt: skip
    assert train_precision("bf16", "zero3")["master"] is False  # DeepSpeed's bf16 mode keeps the masters
    assert train_precision("autocast", "none")["trainer_bf16"] is True
    with pytest.raises(EmbedtuneError, match="fp16"):
        train_precision("fp16", "none")
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
    collate = Collator("infonce", eager.model.tokenizer.pad_token_id)
    for batch in (collate(feats[:4]), collate(feats[4:])):  # two shapes: dynamic, no recompile per length
        assert_same(
            loss_and_grads(compiled, batch), loss_and_grads(eager, batch), {"rtol": 1e-4, "atol": 1e-4}
        )


# ------------------------------------------------------------------------------------------------ evaluate
@pytest.mark.parametrize("shape", ["sts", "ranking"])
def test_evaluate_in_bf16_gives_the_fp32_metrics_within_0_002(minilm_path, fixtures_dir, tmp_path, shape):
    results = {}
    for dtype in ("fp32", "bf16"):
        out = tmp_path / f"{dtype}.json"
        evaluate.run(
            EvaluateConfig(model=str(minilm_path), eval_data=str(fixtures_dir / "eval" / f"{shape}.jsonl"),
                           output=str(out), dtype=dtype)
        )  # fmt: skip
        results[dtype] = json.loads(out.read_text())
    assert results["bf16"]["dtype"] == "bf16" and results["fp32"]["dtype"] == "fp32"
    for name, value in results["fp32"]["metrics"].items():
        assert results["bf16"]["metrics"][name] == pytest.approx(value, abs=0.002), name
