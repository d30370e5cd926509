"""The model folder format: what we compute is what sentence-transformers and consumers compute."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedtune.modeling import Embedder, Reranker, detect_pooling, load_model, pool, read_meta

TEXTS = ["A man is playing a guitar.", "hello", "A woman slices an onion with a knife on the cutting board."]


def test_pool_ignores_padding_side():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    # the same real tokens, shifted: last token of row 0 is position 2 (right) or 3 (left)
    assert torch.equal(pool(hidden, right, "last")[0], hidden[0, 2])
    assert torch.equal(pool(hidden, left, "last")[0], hidden[0, 3])
    assert torch.equal(pool(hidden, left, "cls")[1], hidden[1, 2])
    assert torch.allclose(pool(hidden, right, "mean")[1], hidden[1, :2].mean(0))


def test_minilm_embeddings_equal_sentence_transformers(minilm_path):
    from sentence_transformers import SentenceTransformer

    ours = Embedder.from_pretrained(minilm_path)
    assert (ours.pooling, ours.max_length) == ("mean", 256)  # read from its sentence-transformers config
    theirs = SentenceTransformer(str(minilm_path)).encode(TEXTS, normalize_embeddings=True)
    np.testing.assert_allclose(ours.encode(TEXTS), theirs, atol=1e-6)


def test_saved_decoder_embedder_loads_in_sentence_transformers_with_query_prompt(tiny_qwen3_path, tmp_path):
    from sentence_transformers import SentenceTransformer

    model = Embedder.from_pretrained(
        tiny_qwen3_path, query_instruction="Instruct: find\nQuery:", max_length=32
    )
    assert model.pooling == "last"  # a causal LM checkpoint
    eos = model.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert model.tokenize(["cat dog"])["input_ids"][0, -1].item() == eos
    ours = model.encode(TEXTS, is_query=True)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)

    model.save_pretrained(tmp_path / "out", meta={"base_model": str(tiny_qwen3_path)})
    st = SentenceTransformer(str(tmp_path / "out"))
    np.testing.assert_allclose(st.encode(TEXTS, prompt_name="query"), ours, atol=1e-5)
    reloaded = load_model(tmp_path / "out")
    assert isinstance(reloaded, Embedder) and reloaded.query_instruction == "Instruct: find\nQuery:"
    np.testing.assert_allclose(reloaded.encode(TEXTS, is_query=True), ours, atol=1e-6)
    assert read_meta(tmp_path / "out")["max_length"] == 32


def test_left_and_right_padding_embed_the_same(tiny_qwen3_path):
    model = Embedder.from_pretrained(tiny_qwen3_path, max_length=32)
    right = model.encode(TEXTS)
    model.tokenizer.padding_side = "left"
    np.testing.assert_allclose(model.encode(TEXTS), right, atol=1e-5)


def test_reranker_truncates_the_document_not_the_prompt(tiny_qwen3_path):
    rr = Reranker.from_pretrained(tiny_qwen3_path, max_length=160)
    ids = rr.tokenize(["what is a cat"], ["cat " * 500], padding=False)["input_ids"][0]
    assert len(ids) <= 160
    assert ids[-len(rr._suffix) :] == rr._suffix  # the yes/no is read right after the suffix
    scores = rr.score("what is a cat", ["a cat is an animal", "the river flows to the sea"])
    assert all(0.0 < s < 1.0 for s in scores) and scores[0] != scores[1]


def test_reranker_folder_round_trips(tiny_qwen3_path, tmp_path):
    rr = Reranker.from_pretrained(tiny_qwen3_path, max_length=128)
    before = rr.score("q cat", ["cat", "dog"])
    rr.save_pretrained(tmp_path / "rr", meta={"base_model": str(tiny_qwen3_path)})
    again = load_model(tmp_path / "rr")
    assert isinstance(again, Reranker) and again.max_length == 128
    assert again.score("q cat", ["cat", "dog"]) == pytest.approx(before, abs=1e-6)


def test_pooling_detection_prefers_sentence_transformers_config(minilm_path, tiny_qwen3_path):
    from transformers import AutoConfig

    assert detect_pooling(str(minilm_path), AutoConfig.from_pretrained(minilm_path)) == "mean"
    assert detect_pooling(str(tiny_qwen3_path), AutoConfig.from_pretrained(tiny_qwen3_path)) == "last"
