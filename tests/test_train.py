"""The train step end to end: real Trainer, real DeepSpeed ZeRO-3 on 2 CPU processes, real model folders.

Fast tests run one process in-process (`deepspeed=none`); the `slow` ones launch `torchrun` with 2 ranks.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from embedtune.batching import Collator, LengthGroupedSampler, text_key, tokenize_rows
from embedtune.config import EvaluateConfig, TrainConfig
from embedtune.errors import DataError, EmbedtuneError
from embedtune.evaldata import measurable
from embedtune.modeling import Embedder, Reranker, read_meta
from embedtune.objectives import objective
from embedtune.steps import evaluate, train
from embedtune.trainer import StepLog

TEXTS = ["what is a cat", "the moon goes around the earth", "a dog is a good friend of man"]
SHORT_INSTRUCTION = "rank"  # keeps the tiny tokenizer's reranker prompt under max_length


def tiny_cfg(model, data, out, **kw) -> TrainConfig:
    knobs = dict(
        deepspeed="none",
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-4,
        logging_steps=1,
        max_length=32,
        save_steps=0,
    )
    knobs.update(kw)
    return TrainConfig(model=str(model), train_data=str(data), output_dir=str(out), **knobs)


def assert_eval_metrics_equal_evaluate(result, out, data, tmp_path, shape):
    """train's final eval metrics are what `embedtune evaluate` reports for the saved model on the same file."""
    measured = evaluate.run(
        EvaluateConfig(model=str(out), eval_data=str(data), output=str(tmp_path / "metrics.json"))
    )
    assert result["eval_data_shape"] == measured["data_shape"] == shape
    assert list(result["eval_metrics"]) == list(measured["metrics"])
    np.testing.assert_allclose(
        list(result["eval_metrics"].values()), list(measured["metrics"].values()), atol=1e-4
    )
    # measured before the first step (fresh run) and after the last: the baseline and the final values
    steps = [step for step, _ in result["eval_metrics_history"]]
    assert steps[0] == 0 and steps[-1] == result["global_step"]
    assert result["eval_metrics_history"][-1][1] == result["eval_metrics"]


def assert_st_folder_matches_embedder(out, base):
    """SentenceTransformer(out) embeds exactly like Embedder.from_pretrained(out), and training moved them."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(out), device="cpu").encode(TEXTS)
    ours = Embedder.from_pretrained(out).encode(TEXTS)
    np.testing.assert_allclose(st, ours, atol=1e-5)
    assert np.abs(ours - Embedder.from_pretrained(base).encode(TEXTS)).max() > 1e-4


# ------------------------------------------------------------------------------------------------ data checks
def test_contrastive_label_not_binary_fails_before_model_loading_naming_the_line(fixtures_dir, tmp_path):
    data = fixtures_dir / "train" / "contrastive_bad.jsonl"
    cfg = tiny_cfg(tmp_path / "no-such-model", data, tmp_path / "out", loss_type="contrastive")
    with pytest.raises(DataError) as err:
        train.run(cfg)
    assert "contrastive_bad.jsonl:3: label" in str(err.value)
    assert "0.7" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_loss_for_the_other_task_type_is_refused(fixtures_dir, tmp_path):
    cfg = tiny_cfg(
        tmp_path, fixtures_dir / "train" / "infonce.jsonl", tmp_path / "o", loss_type="pointwise_reranker"
    )
    with pytest.raises(EmbedtuneError, match="not for task_type"):
        train.run(cfg)


def test_reranker_eval_metrics_are_off_for_rows_without_negatives(fixtures_dir, capsys):
    assert measurable(str(fixtures_dir / "train" / "sts.jsonl"), "reranker") is None
    assert "eval metrics off" in capsys.readouterr().err
    ranking = measurable(str(fixtures_dir / "train" / "reranker.jsonl"), "reranker")
    assert ranking is not None and ranking.shape == "ranking"


def test_length_grouped_sampler_is_a_seeded_permutation_of_similar_length_batches():
    lengths = [int(x) for x in np.random.default_rng(0).integers(1, 100, size=203)]
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=1, mega=5)
    order = list(sampler)
    assert sorted(order) == list(range(203)) and list(sampler) == order
    sampler.set_epoch(1)
    assert list(sampler) != order
    batches = [order[i : i + 8] for i in range(0, 200, 8)]
    spread = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches])
    assert spread < 25  # random batches of 8 from 1..99 spread ~75


def test_duplicate_texts_never_share_an_infonce_batch_even_when_length_grouping_puts_them_side_by_side():
    rng = np.random.default_rng(0)
    texts = [f"text {i}" for i in range(60)]
    rows = [(texts[i], texts[(i * 7 + 1) % 60]) for i in rng.integers(0, 60, size=300)]  # many repeats
    keys = [tuple(text_key(np.frombuffer(t.encode(), dtype=np.uint8)) for t in r) for r in rows]
    lengths = [len(q) for q, _ in rows]  # equal texts, equal lengths: sorted next to each other
    order = list(LengthGroupedSampler(lengths, batch_size=8, seed=3, mega=4, keys=keys))
    assert sorted(order) == list(range(300))
    full = [order[i : i + 8] for i in range(0, len(order) - len(order) % 8, 8)]
    clean = [b for b in full if len({k for i in b for k in keys[i]}) == sum(len(keys[i]) for i in b)]
    assert len(clean) >= len(full) - 2  # only the leftovers at the very end may clash
    plain = list(LengthGroupedSampler(lengths, batch_size=8, seed=3, mega=4))
    plain_full = [plain[i : i + 8] for i in range(0, 296, 8)]
    assert sum(len({k for i in b for k in keys[i]}) < 16 for b in plain_full) > 10  # the bug it prevents


def test_group_by_length_off_gives_random_duplicate_free_batches_with_the_same_seeded_order():
    lengths = [int(x) for x in np.random.default_rng(0).integers(1, 100, size=203)]
    keys = [(i % 150,) for i in range(203)]  # rows i and i + 150 share a text
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=1, mega=5, keys=keys, group=False)
    order = list(sampler)
    assert sorted(order) == list(range(203)) and list(sampler) == order
    batches = [order[i : i + 8] for i in range(0, 200, 8)]
    spread = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches])
    assert spread > 50  # random batches of 8 from 1..99 spread ~75; grouped ones < 25
    assert all(len({keys[i] for i in b}) == len(b) for b in batches[:-1])


def test_collator_keys_mark_same_query_rows_and_texts_equal_after_truncation(minilm_path):
    model = Embedder.from_pretrained(str(minilm_path), max_length=8)
    long_a = "one two three four five six seven eight nine"
    long_b = "one two three four five six seven eight ten"  # same first 8 tokens: the same text to the model
    rows = [
        {"query": "q one", "response": "p one", "rejected_response": ["n one"]},
        {"query": "q one", "response": long_a, "rejected_response": ["n one", "n two", "n three"]},
        {"query": "q two", "response": long_b},
    ]
    feats = tokenize_rows(model, rows)
    assert feats[1]["text_keys"][1] == feats[2]["text_keys"][1]  # equal after truncation
    assert feats[0]["text_keys"][0] == feats[1]["text_keys"][0] != feats[2]["text_keys"][0]
    batch = Collator(objective("infonce"), model.tokenizer.pad_token_id, seed=1, knobs={"hard_negatives": 2})(
        feats
    )
    k = int(batch["neg_mask"].sum())  # row 0: 1 + 1 resampled, row 1: first 2, row 2: none
    assert k == 4 and batch["features"]["input_ids"].shape[0] == 3 + 3 + k
    assert batch["doc_keys"][:3, 1].tolist() == [f["text_keys"][0] for f in feats]  # the rows' query keys
    docs = batch["doc_keys"].tolist()
    assert docs[:3] == [[f["text_keys"][1], f["text_keys"][0]] for f in feats]  # positives: (text, query)
    assert [d[1] for d in docs[3:]] == [-1] * k  # negatives belong to no query
    n_one = feats[0]["text_keys"][2]
    assert [d[0] for d in docs[3:]] == [n_one, n_one, n_one, feats[1]["text_keys"][3]]


# ------------------------------------------------------------------------------------------------ one process
def test_cosine_similarity_on_minilm_saves_a_sentence_transformers_folder_and_reports_sts_metrics(
    minilm_path, fixtures_dir, tmp_path, capsys
):
    out = tmp_path / "out"
    data = fixtures_dir / "train" / "sts.jsonl"
    cfg = tiny_cfg(minilm_path, data, out, loss_type="cosine_similarity", max_steps=3, eval_data=str(data))
    result = train.run(cfg)
    assert result["global_step"] == 3
    assert "eval_loss" in result and "eval_spearman_cosine" in capsys.readouterr().err
    assert_eval_metrics_equal_evaluate(result, out, data, tmp_path, "sts")
    assert json.loads((out / "train_result.json").read_text())["global_step"] == 3
    meta = read_meta(out)
    assert (meta["task_type"], meta["pooling"], meta["train_type"]) == ("embedding", "mean", "full")
    assert not list(out.glob("checkpoint-*"))
    assert_st_folder_matches_embedder(out, minilm_path)


def test_infonce_env_var_is_the_default_and_its_value_is_saved(
    tiny_qwen3_path, fixtures_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("INFONCE_TEMPERATURE", "0.05")
    monkeypatch.setenv("INFONCE_HARD_NEGATIVES", "2")
    out = tmp_path / "out"
    train.run(tiny_cfg(tiny_qwen3_path, fixtures_dir / "train" / "infonce.jsonl", out, max_steps=1))
    saved = read_meta(out)["train_config"]
    assert saved["infonce_temperature"] == 0.05 and saved["infonce_hard_negatives"] == 2
    assert saved["infonce_use_batch"] is True  # unset env -> built-in default, saved explicitly
    assert "infonce_temperature = 0.05 (env INFONCE_TEMPERATURE)" in capsys.readouterr().err


def test_infonce_on_pairs_without_any_negative_uses_in_batch_negatives(
    tiny_qwen3_path, fixtures_dir, tmp_path
):
    data = fixtures_dir / "train" / "sts.jsonl"  # no rejected_response anywhere: (B, 0) negatives
    result = train.run(tiny_cfg(tiny_qwen3_path, data, tmp_path / "out", max_steps=2, learning_rate=1e-3))
    assert result["global_step"] == 2 and all(np.isfinite(loss) for _, loss in result["loss_history"])


def test_listwise_reranker_skips_small_groups_and_saves_a_scoring_folder(
    tiny_qwen3_path, fixtures_dir, tmp_path
):
    out = tmp_path / "out"
    data = fixtures_dir / "train" / "reranker.jsonl"
    cfg = tiny_cfg(
        tiny_qwen3_path,
        data,
        out,
        task_type="reranker",
        loss_type="listwise_reranker",
        reranker_instruction=SHORT_INSTRUCTION,
        max_length=128,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        eval_data=str(data),
    )
    result = train.run(cfg)
    assert result["skipped_groups"] == 1 and result["train_rows"] == 11
    assert result["eval_loss"] < result["eval_loss_history"][0][1]  # step-0 baseline
    scores = Reranker.from_pretrained(out).score("what is a cat", ["the cat is a small animal", "the moon"])
    assert len(scores) == 2 and all(0 < s < 1 for s in scores)


@pytest.mark.parametrize("chunk", [0, 3], ids=["uncached", "gradient-cache"])
def test_resume_after_preemption_finishes_at_the_same_step_as_an_uninterrupted_run(
    tiny_qwen3_path, fixtures_dir, tmp_path, monkeypatch, chunk
):
    data = fixtures_dir / "train" / "infonce.jsonl"
    whole = train.run(
        tiny_cfg(tiny_qwen3_path, data, tmp_path / "whole", save_steps=2, gradient_cache_chunk_size=chunk)
    )

    class Preempted(Exception):
        pass

    def die_after_first_checkpoint(self, args, state, control, **kwargs):
        if state.global_step == 2:
            raise Preempted

    out = tmp_path / "out"
    cfg = tiny_cfg(tiny_qwen3_path, data, out, save_steps=2, gradient_cache_chunk_size=chunk)
    with monkeypatch.context() as m:
        m.setattr(StepLog, "on_save", die_after_first_checkpoint, raising=False)
        with pytest.raises(Preempted):
            train.run(cfg)
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    assert not (out / "train_result.json").exists()

    result = train.run(cfg)  # the same command again
    assert result["resumed_from_step"] == 2
    assert result["global_step"] == whole["global_step"] == 4
    assert [s for s, _ in result["loss_history"]] == [1, 2, 3, 4]
    np.testing.assert_allclose(result["loss_history"], whole["loss_history"], rtol=1e-4)
    np.testing.assert_allclose(
        Embedder.from_pretrained(out).encode(TEXTS),
        Embedder.from_pretrained(tmp_path / "whole").encode(TEXTS),
        atol=1e-5,
    )
    assert not list(out.glob("checkpoint-*"))

    assert train.run(cfg) == result  # finished: nothing to do
    with pytest.raises(EmbedtuneError, match="learning_rate"):
        train.run(
            tiny_cfg(
                tiny_qwen3_path, data, out, save_steps=2, gradient_cache_chunk_size=chunk, learning_rate=1e-3
            )
        )


def test_restarted_pod_with_a_fresh_output_dir_resumes_from_the_persistent_checkpoint_dir(
    tiny_qwen3_path, fixtures_dir, tmp_path, monkeypatch
):
    """Kubeflow: output_dir is local to the pod (gone after a restart); checkpoint_dir is on a volume."""
    data = fixtures_dir / "train" / "infonce.jsonl"
    ckpt = tmp_path / "pvc" / "run-1"

    class Preempted(Exception):
        pass

    def die_after_first_checkpoint(self, args, state, control, **kwargs):
        if state.global_step == 2:
            raise Preempted

    first_pod = tiny_cfg(
        tiny_qwen3_path, data, tmp_path / "pod-1" / "out", save_steps=2, checkpoint_dir=str(ckpt)
    )
    with monkeypatch.context() as m:
        m.setattr(StepLog, "on_save", die_after_first_checkpoint, raising=False)
        with pytest.raises(Preempted):
            train.run(first_pod)
    assert (ckpt / "checkpoint-2" / "trainer_state.json").is_file()
    assert not list((tmp_path / "pod-1" / "out").glob("checkpoint-*"))

    out = tmp_path / "pod-2" / "out"  # the retried pod: a new, empty output folder, the same volume
    result = train.run(dataclasses.replace(first_pod, output_dir=str(out)))
    assert result["resumed_from_step"] == 2 and result["global_step"] == 4
    assert [s for s, _ in result["loss_history"]] == [1, 2, 3, 4]
    assert (out / "train_result.json").is_file() and (out / "model.safetensors").is_file()
    assert not ckpt.exists()  # checkpoints deleted after the verified save, then the run's empty folder


def test_matryoshka_dims_are_trained_saved_usable_as_st_truncate_dim_and_evaluated_per_width(
    minilm_path, fixtures_dir, tmp_path, capsys
):
    from sentence_transformers import SentenceTransformer

    from embedtune.scoring import truncate_unit

    data = fixtures_dir / "eval" / "pairs.jsonl"  # retrieval pairs: also the eval file, so training saw it
    out = tmp_path / "out"
    cfg = tiny_cfg(
        minilm_path, data, out, max_steps=2, matryoshka_dims="384,128,32", matryoshka_weights="1,1,2"
    )
    train.run(cfg)
    meta = read_meta(out)
    assert meta["matryoshka_dims"] == [384, 128, 32] and meta["train_config"]["matryoshka_weights"] == "1,1,2"
    ours = Embedder.from_pretrained(out).encode(TEXTS)
    st = SentenceTransformer(str(out), device="cpu", truncate_dim=128).encode(
        TEXTS, normalize_embeddings=True
    )
    assert st.shape == (3, 128)
    np.testing.assert_allclose(st, truncate_unit(ours, 128), atol=1e-5)

    result = evaluate.run(
        EvaluateConfig(
            model=str(out), eval_data=str(data), output=str(tmp_path / "m.json"), matryoshka_dims="384,32",
            baseline_model=str(minilm_path),
        )
    )  # fmt: skip
    m = result["metrics"]
    assert m["ndcg_at_10_dim384"] == pytest.approx(m["ndcg_at_10"], abs=1e-6)  # full width: the same ranking
    assert {"ndcg_at_10_dim32", "map_dim32", "margin_dim32"} <= set(m)
    assert "delta_ndcg_at_10_dim32" in result["deltas"] and result["matryoshka_dims"] == [384, 32]
    assert "ndcg_at_10_dim32" in (tmp_path / "m.json.md").read_text()
    # The eval file is the training file: evaluate warns, exactly (a small training set is fingerprinted whole).
    overlap = result["train_overlap"]
    assert overlap["exact"] and overlap["found"] == overlap["compared"] == overlap["eval_texts"] > 0
    assert "were training texts of this model" in capsys.readouterr().err


def test_matryoshka_dims_larger_than_the_model_or_on_a_reranker_are_refused(
    minilm_path, tiny_qwen3_path, fixtures_dir, tmp_path
):
    data = fixtures_dir / "train" / "infonce.jsonl"
    with pytest.raises(EmbedtuneError, match="larger than the model's dimension 384"):
        train.run(tiny_cfg(minilm_path, data, tmp_path / "a", matryoshka_dims="512,128"))
    with pytest.raises(EmbedtuneError, match="only for task_type embedding"):
        train.run(
            tiny_cfg(tiny_qwen3_path, fixtures_dir / "train" / "reranker.jsonl", tmp_path / "b",
                     task_type="reranker", loss_type="pointwise_reranker", matryoshka_dims="8")
        )  # fmt: skip


# ------------------------------------------------------------------------------------------------ 2 ranks
@pytest.mark.slow
def test_zero3_two_ranks_full_infonce_reports_evaluate_metrics_and_loads_in_sentence_transformers(
    tiny_qwen3_path, fixtures_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("INFONCE_TEMPERATURE", "0.5")  # the explicit flag below must win
    data = fixtures_dir / "train" / "infonce.jsonl"
    out = tmp_path / "out"
    cfg = tiny_cfg(
        tiny_qwen3_path,
        data,
        out,
        deepspeed="zero3",
        nproc=2,
        eval_data=str(data),
        infonce_temperature=0.05,
        save_steps=2,
        eval_steps=2,
        per_device_eval_batch_size=3,  # several encode batches per rank, on shares padded to equal size
    )
    result = train.run(cfg)
    assert result["world_size"] == 2 and result["global_step"] == 4 and result["global_batch_size"] == 8
    assert result["eval_loss"] < result["eval_loss_history"][0][1]
    assert [s for s, _ in result["eval_metrics_history"]] == [0, 2, 4]
    assert "| eval_ndcg_at_10 " in capsys.readouterr().err  # the progress line of each evaluation
    assert_eval_metrics_equal_evaluate(result, out, data, tmp_path, "ranking")
    saved = read_meta(out)["train_config"]
    assert saved["infonce_temperature"] == 0.05 and saved["deepspeed"] == "zero3" and saved["nproc"] == 2
    assert not list(out.glob("checkpoint-*"))
    assert_st_folder_matches_embedder(out, tiny_qwen3_path)


@pytest.mark.slow
def test_zero3_two_ranks_lora_saves_only_a_whole_adapter(tiny_qwen3_path, fixtures_dir, tmp_path):
    from safetensors.torch import load_file

    data = fixtures_dir / "train" / "infonce.jsonl"
    out = tmp_path / "out"
    cfg = tiny_cfg(
        tiny_qwen3_path,
        data,
        out,
        deepspeed="zero3",
        nproc=2,
        eval_data=str(data),
        train_type="lora",
        lora_rank=4,
        lora_alpha=8,
        learning_rate=1e-3,
        infonce_temperature=0.05,
    )
    result = train.run(cfg)
    assert result["eval_loss"] < result["eval_loss_history"][0][1]
    assert not (out / "model.safetensors").exists()
    adapter = load_file(out / "adapter_model.safetensors")
    assert len(adapter) == 2 * 7 * 2  # lora_A + lora_B on 7 linear layers in each of the 2 blocks
    assert all(t.numel() > 0 for t in adapter.values())
    assert any(
        k.endswith("lora_B.weight") and t.abs().sum() > 0 for k, t in adapter.items()
    )  # trained (B starts at 0)
    assert read_meta(out)["base_model"] == str(tiny_qwen3_path.resolve())
    assert_st_folder_matches_embedder(out, tiny_qwen3_path)


@pytest.mark.slow
def test_zero3_two_ranks_pointwise_reranker_saves_a_scoring_folder(tiny_qwen3_path, fixtures_dir, tmp_path):
    data = fixtures_dir / "train" / "reranker.jsonl"
    out = tmp_path / "out"
    cfg = tiny_cfg(
        tiny_qwen3_path,
        data,
        out,
        deepspeed="zero3",
        nproc=2,
        task_type="reranker",
        loss_type="pointwise_reranker",
        reranker_instruction=SHORT_INSTRUCTION,
        max_length=128,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        eval_data=str(data),
    )
    result = train.run(cfg)
    assert result["eval_loss"] < result["eval_loss_history"][0][1]
    assert_eval_metrics_equal_evaluate(result, out, data, tmp_path, "ranking")
    docs = ["the cat is a small animal that can purr", "the moon goes around the earth"]
    trained = Reranker.from_pretrained(out).score("what is a cat", docs)
    base = Reranker.from_pretrained(tiny_qwen3_path, instruction=SHORT_INSTRUCTION).score(
        "what is a cat", docs
    )
    assert all(0 < s < 1 for s in trained) and np.abs(np.subtract(trained, base)).max() > 1e-4


def test_dora_trains_merges_and_reloads_to_the_same_embeddings(tiny_qwen3_path, fixtures_dir, tmp_path):
    from embedtune.config import MergeConfig
    from embedtune.steps import merge

    out = tmp_path / "dora"
    train.run(tiny_cfg(tiny_qwen3_path, fixtures_dir / "train" / "infonce.jsonl", out, train_type="lora",
                       lora_rank=4, use_dora=True, learning_rate=1e-3, infonce_temperature=0.05))  # fmt: skip
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["use_dora"] is True
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert any("lora_magnitude_vector" in k for k in f.keys())  # noqa: SIM118 (DoRA's magnitudes saved)
    result = merge.run(MergeConfig(adapter=str(out), output=str(tmp_path / "merged")))
    assert result["merged"] and result["max_abs_diff"] <= 1e-4 and result["adapter_vs_base_max_diff"] > 1e-4
    np.testing.assert_allclose(
        Embedder.from_pretrained(tmp_path / "merged").encode(TEXTS),
        Embedder.from_pretrained(out).encode(TEXTS),
        atol=1e-5,
    )
