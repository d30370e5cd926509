"""The gradient cache gives the uncached loss and gradients: per loss, with LoRA, with dropout, across ranks,
through the real Trainer (1 process, DDP on 2 gloo ranks, DeepSpeed ZeRO-3 on 2 ranks).

The reference is always the uncached computation at the same global batch: one forward pass over every text,
`loss.backward()`. fp32 on CPU; gradients compared with rtol = atol = 1e-5 (the chunks' outputs differ from
the one-pass outputs by float rounding only: shorter padding, other summation order).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import grad_probe
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from embedtune.batching import Collator, tokenize_rows
from embedtune.config import TrainConfig, resolve_env_defaults
from embedtune.features import count, take, trim
from embedtune.gradcache import RngState, cached_backward, plan
from embedtune.io import read_jsonl
from embedtune.launch import free_port
from embedtune.lora import add_lora
from embedtune.modeling import Embedder, Reranker
from embedtune.steps import train
from embedtune.trainer import TrainModel

TOL = {"rtol": 1e-5, "atol": 1e-5}
SHORT_INSTRUCTION = "rank"  # keeps the tiny tokenizer's reranker prompt short
FIXTURES = Path(__file__).parent / "fixtures" / "train"


def rows_for(loss_type: str) -> list[dict]:
    """Rows of the fixture files for a loss; contrastive ones get 0/1 labels from the STS scores."""
    if loss_type == "infonce":
        return list(read_jsonl(FIXTURES / "infonce.jsonl"))
    if loss_type.endswith("reranker"):
        return list(read_jsonl(FIXTURES / "reranker.jsonl"))
    rows = list(read_jsonl(FIXTURES / "sts.jsonl"))
    if loss_type.endswith("contrastive"):
        rows = [{**r, "label": float(r["label"] >= 0.5)} for r in rows]
    return rows


def make_model(path, loss_type: str, chunk: int, lora_dropout: float | None = None, seed: int = 0):
    """TrainModel in train mode around a fresh copy of the tiny Qwen3 (LoRA when `lora_dropout` is given)."""
    task = "reranker" if loss_type.endswith("reranker") else "embedding"
    cfg = resolve_env_defaults(
        TrainConfig(
            model=str(path), train_data="-", output_dir="-", task_type=task, loss_type=loss_type,
            infonce_temperature=0.05, gradient_cache_chunk_size=chunk,
        )
    )  # fmt: skip
    if task == "embedding":
        inner = Embedder.from_pretrained(path, max_length=32)
    else:
        inner = Reranker.from_pretrained(path, instruction=SHORT_INSTRUCTION, max_length=128)
    if lora_dropout is not None:
        torch.manual_seed(seed)  # LoRA's A is random: the same A for every model built here
        add_lora(inner, rank=4, alpha=8, dropout=lora_dropout, target="all-linear")
        gen = torch.Generator().manual_seed(seed)
        for name, p in inner.named_parameters():  # B starts at 0, which would leave A without gradient
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05, generator=gen)
    return train.train_module(inner, cfg).train()


def batch_of(model: TrainModel, rows: list[dict]) -> dict:
    feats = tokenize_rows(model.model, rows)
    return Collator(model.objective, model.model.tokenizer.pad_token_id)(feats)


def uncached(model: TrainModel, batch: dict) -> tuple[float, dict]:
    loss = model(**batch)["loss"]
    loss.backward()
    return loss.item(), grads(model)


def cached(model: TrainModel, batch: dict, chunk: int) -> tuple[float, dict]:
    batch = dict(batch)
    features = batch.pop("features")
    loss = cached_backward(
        lambda f: model(f, encode_only=True)["outputs"],
        lambda out: model.loss_from_outputs(out, **batch),
        features,
        chunk,
    )
    return loss.item(), grads(model)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def assert_same_grads(got: dict, want: dict) -> None:
    assert got.keys() == want.keys() and want
    assert max(g.abs().max() for g in want.values()) > 1e-3  # something to compare
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TOL, msg=name)


# ------------------------------------------------------------------------------------------ the algorithm
def test_plan_cuts_near_equal_chunks_no_larger_than_the_chunk_size():
    for n, size in [(10, 3), (9, 3), (1, 4), (33, 32), (64, 32)]:
        chunks = plan(n, size)
        sizes = [c.rows.stop - c.rows.start for c in chunks]
        assert len(chunks) == -(-n // size) and sum(sizes) == n and max(sizes) <= size
        assert max(sizes) - min(sizes) <= 1 and all(c.real for c in chunks)
        assert [c.rows.start for c in chunks] == [0, *np.cumsum(sizes)[:-1].tolist()]


def test_plan_by_tokens_keeps_every_chunk_within_its_padded_token_budget():
    lengths = [3, 9, 2, 2, 14, 1, 5, 5, 5, 5]
    for budget, cap in [(12, 0), (20, 0), (20, 2), (1, 0)]:
        chunks = plan(len(lengths), cap, lengths=lengths, chunk_tokens=budget)
        assert [c.rows.start for c in chunks] == [
            0,
            *(c.rows.stop for c in chunks[:-1]),
        ]  # consecutive, in order
        assert chunks[-1].rows.stop == len(lengths) and all(c.real for c in chunks)
        for c in chunks:
            n = c.rows.stop - c.rows.start
            assert n == 1 or n * max(lengths[c.rows]) <= budget, (budget, c)  # a text over budget: alone
            assert not cap or n <= cap
    assert len(plan(len(lengths), 0, lengths=lengths, chunk_tokens=1)) == len(lengths)


def test_cached_by_tokens_gives_the_uncached_loss_and_gradients(tiny_qwen3_path):
    model = make_model(tiny_qwen3_path, "infonce", chunk=0)
    batch = batch_of(model, rows_for("infonce")[:8])
    want_loss, want = uncached(model, batch)
    model.zero_grad(set_to_none=True)
    extras = {k: v for k, v in batch.items() if k != "features"}
    loss = cached_backward(lambda f: model(f, encode_only=True)["outputs"], lambda out: model.loss_from_outputs(out, **extras),
                           batch["features"], 0, chunk_tokens=40)  # fmt: skip
    assert (
        len(
            plan(
                count(batch["features"]),
                0,
                lengths=batch["features"]["attention_mask"].sum(1).tolist(),
                chunk_tokens=40,
            )
        )
        > 2
    )
    assert loss.item() == pytest.approx(want_loss, rel=1e-6)
    assert_same_grads(grads(model), want)


@pytest.mark.parametrize(
    "loss_type",
    ["infonce", "cosine_similarity", "contrastive", "online_contrastive", "pointwise_reranker", "listwise_reranker"],
)  # fmt: skip
def test_cached_loss_and_every_gradient_equal_the_uncached_ones(tiny_qwen3_path, loss_type):
    rows = rows_for(loss_type)[:8]
    model = make_model(tiny_qwen3_path, loss_type, chunk=3)
    batch = batch_of(model, rows)
    assert count(batch["features"]) > 6  # several chunks, the last one partial
    want_loss, want = uncached(model, batch)
    model.zero_grad(set_to_none=True)
    got_loss, got = cached(model, batch, chunk=3)
    assert got_loss == pytest.approx(want_loss, rel=1e-6)
    assert_same_grads(got, want)


def test_matryoshka_cached_loss_and_gradients_equal_the_uncached_ones(tiny_qwen3_path):
    model = make_model(tiny_qwen3_path, "infonce", chunk=3)
    model.matryoshka_dims, model.matryoshka_weights = [model.model.dim, 16, 8], [1.0, 0.5, 0.25]
    batch = batch_of(model, rows_for("infonce")[:8])
    want_loss, want = uncached(model, batch)
    plain = TrainModel.loss_at_one_width(model, model.encode(batch["features"]), neg_mask=batch["neg_mask"],
                                         doc_keys=batch.get("doc_keys")).item()  # fmt: skip
    assert want_loss != pytest.approx(plain, rel=1e-3)  # the widths change the loss: Matryoshka is on
    model.zero_grad(set_to_none=True)
    got_loss, got = cached(model, batch, chunk=3)
    assert got_loss == pytest.approx(want_loss, rel=1e-6)
    assert_same_grads(got, want)


def test_lora_cached_gradients_equal_the_uncached_ones(tiny_qwen3_path):
    model = make_model(tiny_qwen3_path, "infonce", chunk=4, lora_dropout=0.0)
    batch = batch_of(model, rows_for("infonce")[:8])
    want_loss, want = uncached(model, batch)
    assert all("lora_" in n for n in want) and len(want) == 2 * 7 * 2  # A and B of 7 linears x 2 blocks
    model.zero_grad(set_to_none=True)
    got_loss, got = cached(model, batch, chunk=4)
    assert got_loss == pytest.approx(want_loss, rel=1e-6)
    assert_same_grads(got, want)


def test_cache_and_gradient_checkpointing_together_give_the_uncached_gradients(tiny_qwen3_path):
    model = make_model(tiny_qwen3_path, "infonce", chunk=4)
    batch = batch_of(model, rows_for("infonce")[:8])
    want_loss, want = uncached(model, batch)
    model.zero_grad(set_to_none=True)
    model.activation_checkpointing_enable()  # what --gradient-checkpointing calls
    assert model.model.inner.is_activation_checkpointing
    got_loss, got = cached(model, batch, chunk=4)
    assert got_loss == pytest.approx(want_loss, rel=1e-6)
    assert_same_grads(got, want)


def test_dropout_draws_the_same_masks_in_both_passes(tiny_qwen3_path, monkeypatch):
    """With dropout, the reference is the uncached loss over the outputs of the same chunks with the same
    masks: encode chunk by chunk *with* a graph from the same generator state, one backward."""
    model = make_model(tiny_qwen3_path, "infonce", chunk=4, lora_dropout=0.3)
    batch = batch_of(model, rows_for("infonce")[:8])
    extras = {k: v for k, v in batch.items() if k != "features"}
    features = batch["features"]

    torch.manual_seed(7)
    chunks = [trim(take(features, c.rows)) for c in plan(count(features), 4)]
    out = torch.cat([model(chunk, encode_only=True)["outputs"] for chunk in chunks])
    loss = model.loss_from_outputs(out, **extras)
    loss.backward()
    want = grads(model)
    after_reference = torch.get_rng_state()
    model.zero_grad(set_to_none=True)

    torch.manual_seed(7)
    got_loss, got = cached(model, batch, chunk=4)
    assert got_loss == pytest.approx(loss.item(), rel=1e-6)
    assert_same_grads(got, want)
    assert torch.equal(torch.get_rng_state(), after_reference)  # the generator moves on as in one pass

    # Without replaying the state, the second pass draws other masks: the gradient is wrong.
    model.zero_grad(set_to_none=True)
    monkeypatch.setattr(RngState, "restore", lambda self: None)
    torch.manual_seed(7)
    _, wrong = cached(model, batch, chunk=4)
    assert max((wrong[n] - want[n]).abs().max() for n in want) > 1e-3


# ------------------------------------------------------------------------------------------ 2 gloo ranks
def _two_rank_worker(rank: int, world: int, port: int, path: str, out_path: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    rows = rows_for("infonce")
    # rank 0: rows 0-4, rank 1: rows 5-7: different numbers of rows and of real negatives, so of texts.
    mine = rows[:5] if rank == 0 else rows[5:8]
    results = {}
    # chunk 1: rank 1 has fewer texts than rank 0 has chunks, so it runs stand-in chunks to keep in step.
    for chunk in (3, 1):
        model = make_model(Path(path), "infonce", chunk=chunk)
        batch = batch_of(model, mine)
        loss, g = cached(model, batch, chunk=chunk)
        for t in g.values():
            dist.all_reduce(t)
            t /= world  # what DDP / DeepSpeed apply: the mean over ranks
        losses = [torch.zeros(1) for _ in range(world)]
        dist.all_gather(losses, torch.tensor([loss]))
        texts = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
        dist.all_gather(texts, torch.tensor([count(batch["features"])]))
        chunks = len(plan(count(batch["features"]), chunk))
        results[chunk] = {"grads": g, "loss": float(sum(losses)) / world, "texts": texts, "chunks": chunks}
    if rank == 0:
        torch.save(results, out_path)
    dist.destroy_process_group()


def test_two_ranks_cached_gradients_equal_one_process_uncached_with_cross_rank_negatives(
    tiny_qwen3_path, tmp_path
):
    out = tmp_path / "grads.pt"
    mp.spawn(_two_rank_worker, args=(2, free_port(), str(tiny_qwen3_path), str(out)), nprocs=2, join=True)
    got = torch.load(out)
    model = make_model(tiny_qwen3_path, "infonce", chunk=0)
    want_loss, want = uncached(model, batch_of(model, rows_for("infonce")[:8]))
    texts = [int(t) for t in got[1]["texts"]]
    assert texts[1] < texts[0] == got[1]["chunks"]  # rank 1 ran stand-ins
    for chunk in (3, 1):
        assert got[chunk]["loss"] == pytest.approx(want_loss, rel=1e-5)
        assert_same_grads(got[chunk]["grads"], want)


# ------------------------------------------------------------------------------------------ the Trainer
def probe_cfg(model, out, **kw) -> TrainConfig:
    knobs = dict(
        deepspeed="none", max_steps=2, per_device_train_batch_size=8, gradient_accumulation_steps=2,
        learning_rate=1e-3, logging_steps=1, max_length=32, save_steps=0, infonce_temperature=0.05,
    )  # fmt: skip
    knobs.update(kw)
    return TrainConfig(
        model=str(model), train_data=str(FIXTURES / "infonce.jsonl"), output_dir=str(out), **knobs
    )


def assert_same_steps(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want) == 2  # two optimizer steps, each of 2 accumulated micro-batches
    for g, w in zip(got, want, strict=True):
        assert_same_grads(g, w)


@pytest.fixture(scope="module")
def reference_run(tiny_qwen3_path, tmp_path_factory):
    """1 process, uncached: the gradients of each optimizer step and the result (losses, eval losses)."""
    with pytest.MonkeyPatch.context() as m:
        steps = grad_probe.install(m.setattr)
        out = tmp_path_factory.mktemp("reference") / "out"
        result = train.run(probe_cfg(tiny_qwen3_path, out, eval_data=str(FIXTURES / "infonce.jsonl")))
    return steps, result


def test_trainer_step_with_the_cache_gives_the_uncached_gradients_losses_and_eval_losses(
    tiny_qwen3_path, tmp_path, monkeypatch, reference_run, capsys
):
    want, want_result = reference_run
    steps = grad_probe.install(monkeypatch.setattr)
    cfg = probe_cfg(
        tiny_qwen3_path, tmp_path / "out", eval_data=str(FIXTURES / "infonce.jsonl"), gradient_cache_chunk_size=3,
        per_device_eval_batch_size=16,  # the eval loss path encodes chunk by chunk too
    )  # fmt: skip
    result = train.run(cfg)
    assert "gradient cache: 3 texts, any tokens per pass" in capsys.readouterr().err
    assert_same_steps(steps, want)
    np.testing.assert_allclose(result["loss_history"], want_result["loss_history"], rtol=1e-5)
    np.testing.assert_allclose(result["eval_loss_history"], want_result["eval_loss_history"], rtol=1e-5)


def run_torchrun(cfg: TrainConfig, tmp_path: Path) -> dict:
    """`tests/grad_probe.py` on 2 gloo ranks under torchrun: the probed gradients and the result."""
    cfg_path, out = tmp_path / "cfg.json", tmp_path / "probe.pt"
    cfg_path.write_text(json.dumps(dataclasses.asdict(cfg)))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
        "--master-port", str(free_port()), str(Path(grad_probe.__file__)), str(cfg_path), str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out)


@pytest.mark.slow
def test_ddp_two_ranks_with_the_cache_give_the_one_process_uncached_gradients(
    tiny_qwen3_path, tmp_path, reference_run
):
    want, want_result = reference_run
    cfg = probe_cfg(
        tiny_qwen3_path, tmp_path / "out", nproc=2, per_device_train_batch_size=4, gradient_cache_chunk_size=3
    )
    got = run_torchrun(cfg, tmp_path)
    assert got["result"]["world_size"] == 2 and got["result"]["global_batch_size"] == 16
    assert_same_steps(got["grads"], want)
    np.testing.assert_allclose(got["result"]["loss_history"], want_result["loss_history"], rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("train_type", ["full", "lora"])
def test_zero3_two_ranks_with_the_cache_give_the_one_process_uncached_gradients_and_eval_losses(
    tiny_qwen3_path, tmp_path, train_type
):
    lora = (
        dict(train_type="lora", lora_rank=4, lora_alpha=8, lora_dropout=0.0) if train_type == "lora" else {}
    )
    evals = dict(eval_data=str(FIXTURES / "infonce.jsonl"))
    with pytest.MonkeyPatch.context() as m:
        want = grad_probe.install(m.setattr)
        want_result = train.run(
            probe_cfg(tiny_qwen3_path, tmp_path / "ref", per_device_eval_batch_size=8, **evals, **lora)
        )
    # Per rank: half the train and eval batch, so each global batch holds the same rows as the reference's.
    cfg = probe_cfg(
        tiny_qwen3_path, tmp_path / "out", deepspeed="zero3", nproc=2, per_device_train_batch_size=4,
        per_device_eval_batch_size=4, gradient_cache_chunk_size=3, **evals, **lora,
    )  # fmt: skip
    got = run_torchrun(cfg, tmp_path)
    assert got["result"]["world_size"] == 2
    assert_same_steps(got["grads"], want)
    np.testing.assert_allclose(got["result"]["loss_history"], want_result["loss_history"], rtol=1e-5)
    np.testing.assert_allclose(
        got["result"]["eval_loss_history"], want_result["eval_loss_history"], rtol=1e-5
    )
