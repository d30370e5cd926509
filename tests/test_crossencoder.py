"""Classifier-head rerankers (cross-encoders): trained from a MiniLM folder, both losses, full and LoRA, 1 and 2
ranks; the folder loads as sentence-transformers' `CrossEncoder` with the same scores; evaluate, merge, register
and the server take it; a generative reranker written as a classifier keeps its scores."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from embedtune.config import EvaluateConfig, MergeConfig, TrainConfig
from embedtune.modeling import (
    ClassifierReranker,
    Reranker,
    load_model,
    read_meta,
    reranker_head,
    to_classifier,
)
from embedtune.steps import evaluate, merge, train

PAIRS = [
    ("what is a cat", "the cat is a small animal that can purr"),
    ("what is a cat", "the moon goes around the earth"),
    ("how do fish breathe", "fish live in the river and the sea"),
    ("how do fish breathe", "a computer runs programs on data " * 40),  # long: truncation keeps the query
]


def cfg(model, data, out, **kw) -> TrainConfig:
    knobs = dict(task_type="reranker", loss_type="pointwise_reranker", deepspeed="none", max_steps=4,
                 per_device_train_batch_size=4, learning_rate=1e-4, logging_steps=1, max_length=64, save_steps=0)  # fmt: skip
    return TrainConfig(model=str(model), train_data=str(data), output_dir=str(out), **{**knobs, **kw})


def scores(model, pairs=PAIRS) -> np.ndarray:
    return np.array(model.score_pairs([q for q, _ in pairs], [d for _, d in pairs]))


@pytest.fixture(scope="module")
def trained(minilm_path, fixtures_dir, tmp_path_factory):
    """MiniLM + a new one-logit head, pointwise, 4 steps, full weights."""
    out = tmp_path_factory.mktemp("cross") / "pointwise"
    result = train.run(cfg(minilm_path, fixtures_dir / "train" / "reranker.jsonl", out))
    return out, result


def test_auto_picks_a_classifier_for_encoders_and_the_yes_no_head_for_causal_lms(
    minilm_path, tiny_qwen3_path, trained
):
    assert reranker_head(str(minilm_path)) == "classifier"  # an encoder without a head: a new one
    assert reranker_head(str(tiny_qwen3_path)) == "generative"  # Qwen3ForCausalLM
    assert (
        reranker_head(str(trained[0])) == "classifier"
        and reranker_head(str(tiny_qwen3_path), "classifier") == "classifier"
    )
    meta = read_meta(trained[0])
    assert meta["reranker_head"] == "classifier" and meta["reranker_prompt"] == "pair"
    assert isinstance(load_model(trained[0]), ClassifierReranker)


def test_a_trained_cross_encoder_folder_loads_in_sentence_transformers_with_the_same_scores(trained):
    from sentence_transformers import CrossEncoder

    out, result = trained
    assert result["global_step"] == 4 and result["train_loss"] > 0
    ours = load_model(out)
    st = CrossEncoder(str(out), device="cpu")
    got = st.predict(PAIRS)
    np.testing.assert_allclose(got, scores(ours), atol=1e-5)
    assert ours.tokenize(["q"], ["d"])["token_type_ids"].max() == 1  # the pair's segments reach the model
    long = ours.tokenize([PAIRS[3][0]], [PAIRS[3][1]], padding=False)["input_ids"][0]
    assert len(long) == 64 and ours.tokenizer.decode(long).startswith("[CLS] how do fish breathe [SEP]")


def test_listwise_lora_trains_the_head_in_full_and_merges_to_the_same_scores(
    minilm_path, fixtures_dir, tmp_path
):
    out = tmp_path / "lora"
    train.run(cfg(minilm_path, fixtures_dir / "train" / "reranker.jsonl", out, loss_type="listwise_reranker",
                  train_type="lora", lora_rank=4, learning_rate=1e-3))  # fmt: skip
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert adapter_cfg["task_type"] == "SEQ_CLS" and "classifier" in adapter_cfg["modules_to_save"]
    adapter = load_model(out)
    assert isinstance(adapter, ClassifierReranker)
    merged = tmp_path / "merged"
    result = merge.run(MergeConfig(adapter=str(out), output=str(merged)))
    assert result["merged"] and result["max_abs_diff"] <= 1e-4 and result["adapter_vs_base_max_diff"] > 1e-3
    np.testing.assert_allclose(scores(load_model(merged)), scores(adapter), atol=1e-5)


def test_evaluate_measures_a_cross_encoder_on_ranking_rows(trained, fixtures_dir, tmp_path):
    out, _ = trained
    res = evaluate.run(EvaluateConfig(model=str(out), eval_data=str(fixtures_dir / "eval" / "ranking.jsonl"),
                                      output=str(tmp_path / "m.json")))  # fmt: skip
    assert res["data_shape"] == "ranking" and 0 < res["metrics"]["map"] <= 1


def test_a_generative_reranker_written_as_a_classifier_gives_its_scores(tiny_qwen3_path, tmp_path):
    generative = Reranker.from_pretrained(tiny_qwen3_path, instruction="rank", max_length=400)
    exported = to_classifier(generative)
    np.testing.assert_allclose(exported.logits([q for q, _ in PAIRS], [d for _, d in PAIRS]),
                               generative.logits([q for q, _ in PAIRS], [d for _, d in PAIRS]), atol=1e-4)  # fmt: skip
    assert type(exported.classifier).__name__ == "Qwen3ForSequenceClassification"
    # through merge: a full generative folder written as a classifier, checked, reloadable by transformers
    src = tmp_path / "generative"
    generative.save_pretrained(src)
    out = tmp_path / "classifier"
    result = merge.run(MergeConfig(adapter=str(src), output=str(out), export_classifier=True))
    assert result["mode"] == "classifier" and result["max_abs_diff"] <= 1e-4
    from transformers import AutoModelForSequenceClassification

    hf = AutoModelForSequenceClassification.from_pretrained(out)
    ids = generative.tokenize([PAIRS[0][0]], [PAIRS[0][1]])
    with torch.no_grad():
        z = hf(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits[0, 0].item()
    assert z == pytest.approx(float(generative.logits([PAIRS[0][0]], [PAIRS[0][1]])[0]), abs=1e-4)
    assert isinstance(load_model(out), ClassifierReranker) and read_meta(out)["reranker_prompt"] == "qwen3"


def test_ms_swift_task_names_pick_the_head(tiny_qwen3_path, fixtures_dir, tmp_path):
    out = tmp_path / "gen"
    train.run(cfg(tiny_qwen3_path, fixtures_dir / "train" / "reranker.jsonl", out, task_type="generative_reranker",
                  reranker_instruction="rank", max_length=128, max_steps=2))  # fmt: skip
    assert (
        read_meta(out)["reranker_head"] == "generative"
        and read_meta(out)["train_config"]["task_type"] == "reranker"
    )
    out = tmp_path / "cls"
    train.run(cfg(tiny_qwen3_path, fixtures_dir / "train" / "reranker.jsonl", out, reranker_head="classifier",
                  max_length=128, max_steps=2))  # fmt: skip
    loaded = load_model(out)
    assert (
        isinstance(loaded, ClassifierReranker)
        and type(loaded.classifier).__name__ == "Qwen3ForSequenceClassification"
    )


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_zero3_two_ranks_lora_cross_encoder_saves_a_whole_adapter_that_scores(
    minilm_path, fixtures_dir, tmp_path
):
    out = tmp_path / "zero3"
    result = train.run(cfg(minilm_path, fixtures_dir / "train" / "reranker.jsonl", out, deepspeed="zero3", nproc=2,
                           train_type="lora", lora_rank=4, per_device_train_batch_size=2))  # fmt: skip
    assert result["world_size"] == 2 and result["global_step"] == 4
    model = load_model(out)
    assert isinstance(model, ClassifierReranker) and np.isfinite(scores(model)).all()


def test_the_server_and_the_registered_pyfunc_score_like_the_folder(trained, mlflow_server, tmp_path):
    import uuid

    import httpx
    import mlflow
    import pandas as pd
    from test_serve import Server

    from embedtune.config import RegisterConfig
    from embedtune.steps import register

    out, _ = trained
    want = scores(load_model(out), [(PAIRS[0][0], d) for _, d in PAIRS])
    server = Server(out, tmp_path / "serve.log")
    try:
        r = httpx.post(
            f"{server.url}/v1/rerank", json={"query": PAIRS[0][0], "documents": [d for _, d in PAIRS]}
        )
        got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
        np.testing.assert_allclose([got[i] for i in range(len(PAIRS))], want, atol=1e-5)
    finally:
        server.stop()
    name = f"cross-{uuid.uuid4().hex[:8]}"
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"primary_metric": "map", "primary_value": 0.5, "metrics": {"map": 0.5}}))
    register.run(RegisterConfig(model=str(out), metrics=str(metrics), name=name, tracking_uri=mlflow_server))
    mlflow.set_tracking_uri(mlflow_server)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    frame = pd.DataFrame({"query": [PAIRS[0][0]] * len(PAIRS), "document": [d for _, d in PAIRS]})
    np.testing.assert_allclose(pyfunc.predict(frame), want, atol=1e-5)


@pytest.mark.parametrize("loss_type", ["pointwise_reranker", "listwise_reranker"])
def test_the_gradient_cache_gives_a_cross_encoder_the_uncached_gradients(
    minilm_path, fixtures_dir, loss_type
):
    from embedtune.batching import Collator, tokenize_rows
    from embedtune.config import resolve_env_defaults
    from embedtune.gradcache import cached_backward
    from embedtune.io import read_jsonl

    conf = resolve_env_defaults(cfg(minilm_path, "-", "-", loss_type=loss_type))
    torch.manual_seed(0)
    model = train.train_module(ClassifierReranker.from_pretrained(minilm_path, max_length=64), conf)
    model.train()
    for m in model.modules():  # no dropout: one pass and the chunked passes see the same network
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    batch = Collator(model.objective, model.model.tokenizer.pad_token_id)(
        tokenize_rows(model.model, list(read_jsonl(fixtures_dir / "train" / "reranker.jsonl"))[:6])
    )
    assert "token_type_ids" in batch["features"]
    loss = model(**batch)["loss"]
    loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    extras = {k: v for k, v in batch.items() if k != "features"}
    got_loss = cached_backward(lambda f: model(f, encode_only=True)["outputs"],
                               lambda out: model.loss_from_outputs(out, **extras), batch["features"], 3)  # fmt: skip
    assert got_loss.item() == pytest.approx(loss.item(), rel=1e-5)
    for n, g in want.items():
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, g, rtol=1e-5, atol=1e-5, msg=n)
