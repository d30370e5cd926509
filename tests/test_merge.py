"""merge on LoRA adapters built here on the tiny random Qwen3 (embedder and reranker), with peft."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from embedtune import cli
from embedtune.config import MergeConfig
from embedtune.errors import EmbedtuneError
from embedtune.lora import add_lora
from embedtune.modeling import Embedder, Reranker, read_meta
from embedtune.steps import merge

TEXTS = ["how do cats purr", "the river runs to the sea", "a dog is playing in the park"]
TRAIN_CONFIG = {"loss_type": "infonce", "train_type": "lora", "lora_rank": 4}


def randomize_lora_b(peft_model, seed: int = 1) -> None:
    """LoRA starts with B = 0 (no change); give B small random values so the adapter changes outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


@pytest.fixture(scope="module")
def embedder_adapter(tiny_qwen3_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-embedder")
    model = Embedder.from_pretrained(tiny_qwen3_path, query_instruction="Query: ")
    add_lora(model, rank=4, alpha=8, dropout=0.0, target="all-linear")
    randomize_lora_b(model.inner)
    meta = {"base_model": str(tiny_qwen3_path), "train_type": "lora", "train_config": TRAIN_CONFIG}
    model.save_pretrained(out, meta=meta)
    return out


@pytest.fixture(scope="module")
def reranker_adapter(tiny_qwen3_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-reranker")
    model = Reranker.from_pretrained(tiny_qwen3_path)
    add_lora(model, rank=4, alpha=8, dropout=0.0, target="all-linear")
    randomize_lora_b(model.inner, seed=2)
    model.save_pretrained(out, meta={"base_model": str(tiny_qwen3_path), "train_type": "lora"})
    return out


def leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_merged_embedder_equals_adapter_and_loads_in_sentence_transformers(embedder_adapter, tmp_path):
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "merged"
    result = merge.run(MergeConfig(adapter=str(embedder_adapter), output=str(out)))
    assert result["merged"] is True and result["output"] == str(out)
    assert result["max_abs_diff"] <= 1e-4
    assert result["adapter_vs_base_max_diff"] > 1e-3  # the adapter really changes the embeddings
    assert result["merged_vs_base_max_diff"] > 1e-3
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    assert (out / "modules.json").is_file() and (out / "1_Pooling" / "config.json").is_file()
    meta = read_meta(out)
    assert meta["train_config"] == TRAIN_CONFIG and meta["merged_from_adapter"] is True
    assert meta["train_type"] == "lora" and meta["merge_check"]["tolerance"] == 1e-4
    assert leftovers(tmp_path) == []

    adapter = Embedder.from_pretrained(embedder_adapter)
    st = SentenceTransformer(str(out), device="cpu")
    assert np.abs(st.encode(TEXTS) - adapter.encode(TEXTS)).max() <= 1e-4
    st_queries = st.encode(TEXTS, prompt_name="query")
    assert np.abs(st_queries - adapter.encode(TEXTS, is_query=True)).max() <= 1e-4
    base = Embedder.from_pretrained(read_meta(embedder_adapter)["base_model"], query_instruction="Query: ")
    assert np.abs(st.encode(TEXTS) - base.encode(TEXTS)).max() > 1e-3


def test_merge_that_drops_the_lora_delta_fails_and_writes_nothing(embedder_adapter, tmp_path, monkeypatch):
    # the bug users report: a "merged" model that is just the base model (unload() discards the deltas)
    def unload_without_merging(model):
        model.set_inner(model.inner.unload())

    monkeypatch.setattr(merge, "merge_lora", unload_without_merging)
    with pytest.raises(EmbedtuneError, match="behaves like the base model") as err:
        merge.run(MergeConfig(adapter=str(embedder_adapter), output=str(tmp_path / "merged")))
    assert "max |adapter - base|" in str(err.value) and "max |merged - base| = 0" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_tampered_saved_weights_fail_the_reload_check_and_write_nothing(
    embedder_adapter, tmp_path, monkeypatch
):
    from safetensors.torch import load_file, save_file

    save = Embedder.save_pretrained

    def save_then_tamper(self, out_dir, meta=None, state_dict=None):
        save(self, out_dir, meta=meta, state_dict=state_dict)
        f = out_dir / "model.safetensors"
        weights = load_file(f)
        name = next(k for k in weights if k.endswith("q_proj.weight"))
        weights[name] = weights[name] + 0.05
        save_file(weights, f, metadata={"format": "pt"})

    monkeypatch.setattr(Embedder, "save_pretrained", save_then_tamper)
    with pytest.raises(EmbedtuneError, match="after saving and reloading: max \\|merged - adapter\\|"):
        merge.run(MergeConfig(adapter=str(embedder_adapter), output=str(tmp_path / "merged")))
    assert list(tmp_path.iterdir()) == []


def test_cli_reports_a_failed_check_in_one_line(embedder_adapter, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(merge, "merge_lora", lambda model: model.set_inner(model.inner.unload()))
    code = cli.main(["merge", "--adapter", str(embedder_adapter), "--output", str(tmp_path / "m")])
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (loading progress bars come before it)
    assert code == 2 and last.startswith("embedtune merge: error: merge check failed after merging: max")


def test_merged_reranker_scores_equal_the_adapter_scores(reranker_adapter, tmp_path, fixtures_dir):
    out = tmp_path / "merged"
    result = merge.run(
        MergeConfig(
            adapter=str(reranker_adapter),
            output=str(out),
            eval_data=str(fixtures_dir / "eval" / "ranking.jsonl"),
        )
    )
    assert result["merged"] is True and result["max_abs_diff"] <= 1e-4
    assert result["adapter_vs_base_max_diff"] > 1e-3
    assert read_meta(out)["task_type"] == "reranker" and not (out / "adapter_config.json").exists()
    merged, adapter = Reranker.from_pretrained(out), Reranker.from_pretrained(reranker_adapter)
    assert merged.score(TEXTS[0], TEXTS) == pytest.approx(adapter.score(TEXTS[0], TEXTS), abs=1e-5)


def test_full_training_folder_passes_through_unchanged(tiny_qwen3_path, tmp_path):
    full = tmp_path / "full"
    Embedder.from_pretrained(tiny_qwen3_path).save_pretrained(full, meta={"train_type": "full"})
    out = tmp_path / "out" / "merged"
    result = merge.run(MergeConfig(adapter=str(full), output=str(out)))
    assert result["merged"] is False and result["mode"] == "passthrough"
    src_files = sorted(p.relative_to(full) for p in full.rglob("*") if p.is_file())
    assert src_files == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert all((full / f).read_bytes() == (out / f).read_bytes() for f in src_files)
    assert leftovers(out.parent) == []


def test_existing_folder_that_is_not_a_model_is_never_replaced(tiny_qwen3_path, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(EmbedtuneError, match="exists and is not a model folder"):
        merge.run(MergeConfig(adapter=str(tiny_qwen3_path), output=str(out)))
    assert (out / "notes.txt").read_text() == "keep me"


def test_rerun_replaces_a_previous_result(tiny_qwen3_path, tmp_path):
    full = tmp_path / "full"
    Embedder.from_pretrained(tiny_qwen3_path).save_pretrained(full)
    out = tmp_path / "merged"
    merge.run(MergeConfig(adapter=str(full), output=str(out)))
    (out / "stale.txt").write_text("from an older run")
    merge.run(MergeConfig(adapter=str(full), output=str(out)))
    assert not (out / "stale.txt").exists() and json.loads((out / "embedtune.json").read_text())
    assert leftovers(tmp_path) == []


# --- weight merging with the base (merge_method) ------------------------------------------------------------


def test_slerp_is_the_spherical_formula_and_falls_back_to_linear_on_parallel_tensors():
    from embedtune.weightmerge import lerp, merge_states, slerp

    a = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 2.0], [0.0, 0.0]], dtype=torch.float64)  # 90 degrees apart, different norms
    got, fell_back = slerp(a, b, 0.5)
    s = np.sin(np.pi / 4) / np.sin(np.pi / 2)  # sin((1 - t) W) / sin W with W = pi / 2
    assert not fell_back and torch.allclose(got, torch.tensor([[s, 2 * s], [0.0, 0.0]], dtype=torch.float64))
    for t in (0.0, 1.0):  # the ends are the two models
        assert torch.allclose(slerp(a, b, t)[0], a if t == 0 else b)
    near = a + 1e-4 * b  # |cos| > 0.9995
    got, fell_back = slerp(a, near, 0.3)
    assert fell_back and torch.equal(got, lerp(a, near, 0.3))
    merged, counts = merge_states(
        {"w": a.float(), "ids": torch.tensor([1, 2])}, {"w": b.float(), "ids": torch.tensor([3, 4]), "head": b},
        "linear", 0.25,
    )  # fmt: skip
    assert torch.allclose(merged["w"], (0.75 * a + 0.25 * b).float()) and merged["w"].dtype == torch.float32
    assert torch.equal(merged["ids"], torch.tensor([3, 4])) and torch.equal(merged["head"], b)
    assert counts == {"merged": 1, "linear_fallback": 0, "kept_tuned": 2}


def full_model(tiny_qwen3_path, out):
    """A 'fully trained' embedder: the base with every weight moved a little (what train would save)."""
    model = Embedder.from_pretrained(tiny_qwen3_path)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    model.save_pretrained(out, meta={"base_model": str(tiny_qwen3_path), "train_type": "full"})
    return out


@pytest.mark.parametrize("method", ["linear", "slerp"])
def test_merge_with_the_base_moves_the_model_between_its_ends(tiny_qwen3_path, tmp_path, method):
    tuned = full_model(tiny_qwen3_path, tmp_path / "tuned")
    base_emb = Embedder.from_pretrained(tiny_qwen3_path).encode(TEXTS)
    tuned_emb = Embedder.from_pretrained(tuned).encode(TEXTS)
    assert np.abs(tuned_emb - base_emb).max() > 1e-2
    ends = {}
    for w in (0.0, 0.5, 1.0):
        out = tmp_path / f"m{w}"
        result = merge.run(
            MergeConfig(adapter=str(tuned), output=str(out), merge_method=method, merge_weight=w)
        )
        info = result["weight_merge"]
        assert info["method"] == method and info["merged"] > 0 and result["max_abs_diff"] <= 1e-4
        assert read_meta(out)["weight_merge"] == info
        ends[w] = Embedder.from_pretrained(out).encode(TEXTS)
    assert np.abs(ends[0.0] - base_emb).max() < 1e-5 and np.abs(ends[1.0] - tuned_emb).max() < 1e-5
    # halfway is neither end (the model is not linear in its weights, so no closer bound holds)
    assert np.abs(ends[0.5] - base_emb).max() > 1e-3 and np.abs(ends[0.5] - tuned_emb).max() > 1e-3


def test_lora_adapter_is_folded_and_checked_before_the_weight_merge(embedder_adapter, tmp_path):
    out = tmp_path / "m"
    result = merge.run(MergeConfig(adapter=str(embedder_adapter), output=str(out), merge_method="linear",
                                   merge_weight=0.5))  # fmt: skip
    assert result["merged"] is True and result["weight_merge"]["vs_tuned_max_diff"] > 1e-4
    adapter = Embedder.from_pretrained(embedder_adapter).encode(TEXTS)
    merged = Embedder.from_pretrained(out).encode(TEXTS)
    base = Embedder.from_pretrained(read_meta(embedder_adapter)["base_model"]).encode(TEXTS)
    assert np.abs(merged - adapter).max() > 1e-4 and np.abs(merged - base).max() > 1e-4
    with pytest.raises(EmbedtuneError, match="merge_method"):
        MergeConfig(adapter="a", output="o", merge_method="ties")


def trained_with_checkpoints(tiny_qwen3_path, fixtures_dir, out, **kw):
    from embedtune.config import TrainConfig
    from embedtune.steps import train

    cfg = TrainConfig(model=str(tiny_qwen3_path), train_data=str(fixtures_dir / "train" / "infonce.jsonl"),
                      output_dir=str(out), deepspeed="none", max_steps=6, save_steps=2, save_total_limit=3,
                      keep_checkpoint_weights=2, per_device_train_batch_size=4, max_length=32,
                      learning_rate=1e-3, **kw)  # fmt: skip
    train.run(cfg)
    return out


@pytest.mark.parametrize("train_type", ["full", "lora"])
def test_merge_with_the_checkpoints_train_kept(tiny_qwen3_path, fixtures_dir, tmp_path, train_type):
    """train keeps the last checkpoints' weights (not the final step's own: that is the model); merge_with
    checkpoints at weight 1 is the tuned model, at weight 0 their mean, each loaded as the final model is."""
    from safetensors.torch import load_file

    out = trained_with_checkpoints(tiny_qwen3_path, fixtures_dir, tmp_path / "t", train_type=train_type,
                                   lora_rank=4, lora_alpha=8)  # fmt: skip
    kept = sorted(p.name for p in (out / "checkpoint-weights").iterdir())
    assert kept == ["step-2.safetensors", "step-4.safetensors"] and not list(out.glob("checkpoint-[0-9]*"))
    tuned = Embedder.from_pretrained(out)
    names = set(tuned.inner.state_dict())
    assert set(load_file(out / "checkpoint-weights" / "step-4.safetensors")) == names
    ends = {}
    for w in (0.0, 1.0):
        res = merge.run(MergeConfig(adapter=str(out), output=str(tmp_path / f"m{w}"), merge_method="linear",
                                    merge_with="checkpoints", merge_weight=w))  # fmt: skip
        assert res["weight_merge"]["other"] == "step-2, step-4"
        ends[w] = Embedder.from_pretrained(tmp_path / f"m{w}").encode(TEXTS)
    assert np.abs(ends[1.0] - tuned.encode(TEXTS)).max() < 1e-5
    means = []
    for step in (2, 4):
        m = Embedder.from_pretrained(out)
        m.inner.load_state_dict(load_file(out / "checkpoint-weights" / f"step-{step}.safetensors"))
        if train_type == "lora":
            merge.merge_lora(m)
        means.append({k: v.double() for k, v in m.inner.state_dict().items()})
    m.inner.load_state_dict({k: ((means[0][k] + means[1][k]) / 2).float() for k in means[0]})
    assert np.abs(ends[0.0] - m.encode(TEXTS)).max() < 1e-5
    assert np.abs(ends[0.0] - ends[1.0]).max() > 1e-4  # the checkpoints differ from the final model


def test_merge_with_checkpoints_without_kept_weights_is_one_line(tiny_qwen3_path, tmp_path):
    tuned = full_model(tiny_qwen3_path, tmp_path / "tuned")
    with pytest.raises(EmbedtuneError, match="holds no checkpoint-weights/"):
        merge.run(MergeConfig(adapter=str(tuned), output=str(tmp_path / "m"), merge_method="slerp",
                              merge_with="checkpoints"))  # fmt: skip
