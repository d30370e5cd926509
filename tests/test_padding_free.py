"""Padding-free batches (`--padding-free`): the texts of a forward pass packed into one row, positions restarting
per text, pooled from the packed output, give the padded path's embeddings, loss and gradients (fp32, CPU, sdpa
with the block-diagonal mask transformers builds from the positions; rtol = atol = 1e-5: the packed row reorders
no sum within a text, only the matmul shapes differ), for every loss, with the gradient cache and length buckets.
"""

from __future__ import annotations

import pytest
import torch

from embedtune.batching import Collator, tokenize_rows
from embedtune.config import TrainConfig, resolve_env_defaults
from embedtune.errors import EmbedtuneError
from embedtune.features import pack, pad
from embedtune.gradcache import cached_backward
from embedtune.io import read_jsonl
from embedtune.modeling import Embedder
from embedtune.speed import Precision, resolve_padding_free
from embedtune.steps import train

TOL = {"rtol": 1e-5, "atol": 1e-5}
LOSSES = [
    "infonce",
    "cosine_similarity",
    "contrastive",
    "online_contrastive",
    "pointwise_reranker",
    "listwise_reranker",
]


def rows(fixtures_dir, loss_type: str) -> list[dict]:
    if loss_type == "infonce":
        return list(read_jsonl(fixtures_dir / "train" / "infonce.jsonl"))[:8]
    if loss_type.endswith("reranker"):
        return list(read_jsonl(fixtures_dir / "train" / "reranker.jsonl"))[:6]
    data = list(read_jsonl(fixtures_dir / "train" / "sts.jsonl"))[:8]
    return (
        [{**r, "label": float(r["label"] >= 0.5)} for r in data]
        if loss_type.endswith("contrastive")
        else data
    )


def module(path, loss_type: str, padding_free: str, **knobs):
    task = "reranker" if loss_type.endswith("reranker") else "embedding"
    cfg = resolve_env_defaults(
        TrainConfig(model=str(path), train_data="-", output_dir="-", task_type=task, loss_type=loss_type,
                    infonce_temperature=0.05, reranker_instruction="rank", padding_free=padding_free,
                    max_length=48 if task == "embedding" else 160, deepspeed="none", **knobs)
    )  # fmt: skip
    torch.manual_seed(0)
    return train.train_module(train.build_model(cfg, Precision.resolve("fp32", "none")), cfg).train()


def step(model, batch: dict, chunk: int = 0) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    if chunk:
        extras = {k: v for k, v in batch.items() if k != "features"}
        loss = cached_backward(lambda f: model(f, encode_only=True)["outputs"],
                               lambda out: model.loss_from_outputs(out, **extras), batch["features"], chunk)  # fmt: skip
    else:
        loss = model(**batch)["loss"]
        loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_type", LOSSES)
@pytest.mark.parametrize(
    "extra", [{}, {"length_buckets": 2}, {"gradient_cache_chunk_size": 3}], ids=["plain", "buckets", "cache"]
)
def test_padding_free_gives_the_padded_loss_and_gradients(tiny_qwen3_path, fixtures_dir, loss_type, extra):
    padded = module(tiny_qwen3_path, loss_type, "off", **extra)
    packed = module(tiny_qwen3_path, loss_type, "on", **extra)
    assert packed.model.padding_free and not padded.model.padding_free
    batch = Collator(padded.objective, padded.model.tokenizer.pad_token_id)(
        tokenize_rows(padded.model, rows(fixtures_dir, loss_type))
    )
    mask = batch["features"]["attention_mask"]
    assert mask.sum(1).min() < mask.shape[1]  # there is padding to drop
    chunk = extra.get("gradient_cache_chunk_size", 0)
    want, got = step(padded, batch, chunk), step(packed, batch, chunk)
    assert got[0] == pytest.approx(want[0], rel=1e-5, abs=1e-5)
    assert got[1].keys() == want[1].keys() and want[1]
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], **TOL, msg=name)


@pytest.mark.parametrize("pooling", ["last", "mean", "cls"])
def test_packed_embeddings_equal_the_padded_ones_single_token_texts_included(tiny_qwen3_path, pooling):
    model = Embedder.from_pretrained(tiny_qwen3_path, pooling=pooling).eval()
    texts = ["cat", "the dog is a good friend of man", "a", "what is a bird that can fly over the tree"]
    seqs = model.tokenize(texts, padding=False)["input_ids"]
    if pooling != "last":  # no end-of-text token appended: a one-word text is one token
        assert min(len(s) for s in seqs) == 1
    features = pad([torch.tensor(s).numpy() for s in seqs], model.tokenizer.pad_token_id)
    packed_row = pack(features)
    assert packed_row["input_ids"].shape == (1, int(features["attention_mask"].sum()))
    assert packed_row["position_ids"][0, : len(seqs[0]) + 1].tolist()[-1] == 0  # restarts at the second text
    with torch.no_grad():
        want = model(features)
        model.padding_free = True
        got = model(features)
    torch.testing.assert_close(got, want, **TOL)
    left = {k: torch.flip(v, [1]) for k, v in features.items()}  # left padding (reversed ids: another text)
    with torch.no_grad():
        model.padding_free = False
        want_left = model(left)
        model.padding_free = True
        torch.testing.assert_close(model(left), want_left, **TOL)


def test_padding_free_auto_is_off_on_cpu_and_on_refuses_an_encoder(minilm_path, tmp_path):
    assert resolve_padding_free("auto", decoder=True, cuda=False) == (False, None)
    assert resolve_padding_free("on", decoder=True, cuda=False) == (True, None)  # sdpa's packed mask
    assert resolve_padding_free("off", decoder=True, cuda=True) == (False, None)
    with pytest.raises(EmbedtuneError, match="padding_free: on needs a decoder"):
        resolve_padding_free("on", decoder=False, cuda=False)
    with pytest.raises(EmbedtuneError, match="padding_free"):
        resolve_padding_free("sometimes", decoder=True)
    with pytest.raises(EmbedtuneError, match="needs a decoder"):
        module(minilm_path, "infonce", "on")
