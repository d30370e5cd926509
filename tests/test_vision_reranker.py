"""Images beyond embedding: Qwen2-VL / Qwen3-VL generative rerankers (the Qwen3-VL-Reranker prompt), scoring
and mining over rows with images, on the tiny random models of test_vision.py and PIL images made here.

What is checked: the trained reranker's z equals what transformers' own classes give from the documented prompt
(1e-5, fp32), alone or in a padded batch; training on 1 and 2 ranks (ZeRO-3, gradient cache), full and LoRA,
and the merged adapter; evaluate, score and mine read each text with its images; the MLflow model takes them.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_vision import ATOL, rgb, train_cfg, visual_weights, with_image_pads

from embedtune.errors import EmbedtuneError
from embedtune.modeling import load_model

SYSTEM = 'Judge whether the Document meets the requirements based on the Query and the Instruct provided. Note that the answer can only be "yes" or "no".'  # noqa: E501


@pytest.fixture(scope="module")
def rerank_rows(tmp_path_factory) -> Path:
    """18 reranker rows: images on the query, on the positive, on a negative (two on one), and text only."""
    d = tmp_path_factory.mktemp("rerank-rows")
    (d / "img").mkdir()
    for i in range(6):
        rgb(20 + i, 32 + 8 * i, 56).save(d / "img" / f"{i}.png")
    rows = []
    for i in range(6):
        rows.append({"query": f"<image> what is shown {i}", "response": f"a drawing of shape {i}",
                     "rejected_response": ["<image> a photo", f"some words {i}"],
                     "images": [f"img/{i}.png", f"img/{(i + 1) % 6}.png"]})  # fmt: skip
        rows.append({"query": f"find the picture {i}", "response": "<image> it is here",
                     "rejected_response": ["<image> and <image> not these"],
                     "images": [f"img/{(i + 2) % 6}.png", f"img/{(i + 3) % 6}.png", f"img/{(i + 4) % 6}.png"]})  # fmt: skip
        rows.append({"query": f"plain question {i}", "response": f"plain answer {i}",
                     "rejected_response": [f"wrong answer {i}"]})  # fmt: skip
    path = d / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rerank_cfg(model, data, out, **kw):
    return train_cfg(
        model, data, out, task_type="reranker", loss_type="listwise_reranker", max_length=256, **kw
    )


def reference_z(folder: Path, pairs: list[tuple[str, list, str, list]], instruction: str) -> np.ndarray:
    """z a user gets from the folder with transformers' own classes and the Qwen3-VL-Reranker prompt (the
    official `qwen3_vl_reranker.py`: the chat template's text, each `<|image_pad|>` repeated once per merged
    patch, the backbone's last hidden state at the last token against the LM head's yes row minus its no row)."""
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    processor = AutoImageProcessor.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    yes, no = (tokenizer.encode(t, add_special_tokens=False)[0] for t in ("yes", "no"))
    out = []
    for query, q_images, doc, d_images in pairs:
        images = q_images + d_images  # the query's, then the document's: their tags' order in the prompt
        content, extra = with_image_pads(
            processor, f"<Instruct>: {instruction}<Query>:{query}\n<Document>:{doc}", images
        )
        prompt = (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{content}<|im_end|>\n"
                  "<|im_start|>assistant\n")  # fmt: skip
        ids = tokenizer([prompt], return_tensors="pt")["input_ids"]
        if images:
            extra["mm_token_type_ids"] = (ids == model.config.image_token_id).int()
        with torch.no_grad():
            hidden = model.model(
                input_ids=ids, attention_mask=torch.ones_like(ids), **extra
            ).last_hidden_state[0, -1]
            w = model.get_output_embeddings().weight
            out.append(float(hidden @ (w[yes] - w[no])))
    return np.asarray(out)


@pytest.mark.numeric  # floats at 1e-5: `make test-kernels` reruns it under other CPUs' kernels
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_trained_reranker_gives_transformers_scores_from_the_documented_prompt(
    family, qwen2_vl, qwen3_vl, rerank_rows, tmp_path
):
    from PIL import Image

    from embedtune.steps import train
    from embedtune.vision import RERANK_INSTRUCTION

    base = {"qwen2_vl": qwen2_vl, "qwen3_vl": qwen3_vl}[family]
    result = train.run(rerank_cfg(base, rerank_rows, tmp_path / "out"))
    assert result["global_step"] == 2 and np.isfinite(result["train_loss"])
    folder = tmp_path / "out"
    model = load_model(folder)
    assert type(model).__name__ == "VisionReranker" and model.instruction == RERANK_INSTRUCTION
    img = rerank_rows.parent / "img"
    refs = [([str(img / "0.png")], []), ([], [str(img / "1.png"), str(img / "2.png")]), ([], [])]
    texts = [("<image> what is it", "a round shape"), ("which two", "<image> and <image> both"),
             ("text only query", "text only document")]  # fmt: skip
    z = model.logits([q for q, _ in texts], [d for _, d in texts], batch_size=3,
                     query_images=[q for q, _ in refs], doc_images=[d for _, d in refs])  # fmt: skip
    pil = [
        ([Image.open(r).convert("RGB") for r in q], [Image.open(r).convert("RGB") for r in d])
        for q, d in refs
    ]
    want = reference_z(folder, [(t[0], p[0], t[1], p[1]) for t, p in zip(texts, pil, strict=True)],
                       RERANK_INSTRUCTION)  # fmt: skip
    np.testing.assert_allclose(z, want, atol=ATOL, rtol=1e-5)
    alone = [model.logits([q], [d], query_images=[qi], doc_images=[di])[0]
             for (q, d), (qi, di) in zip(texts, refs, strict=True)]  # fmt: skip
    np.testing.assert_allclose(
        alone, z, atol=ATOL, rtol=1e-5
    )  # padding and the batch's pixel layout: no change
    np.testing.assert_allclose(model.logits([texts[2][0]], [texts[2][1]]), want[2:], atol=ATOL, rtol=1e-5)
    # the vision tower stayed frozen (the default) and the folder reloads with transformers' classes (above)
    base_vis, tuned_vis = visual_weights(base), visual_weights(folder)
    assert tuned_vis and all(torch.equal(a, b) for a, b in
                             zip(base_vis.values(), [tuned_vis[k] for k in sorted(tuned_vis)], strict=False))  # fmt: skip


def test_a_long_pair_is_cut_in_its_words_never_in_its_image_tokens(qwen2_vl, rerank_rows):
    from embedtune.features import ids_of
    from embedtune.images import probe

    model = load_model(qwen2_vl, "reranker")
    model.max_length = 200  # the prompt alone is ~125 tokens with the tiny tokenizer
    info = probe(str(rerank_rows.parent / "img" / "5.png"))
    [cut] = model.pairs(["<image> " + "word " * 200], ["doc " * 200], [[info]], [[]])
    ids = ids_of(cut)
    assert len(ids) == 200 and (ids == model.image_token_id).sum() == model.image_tokens(info)
    assert model.tokenizer.decode(ids[-6:]).endswith("<|im_start|>assistant\n")  # the suffix survives
    model.max_length = 130
    with pytest.raises(EmbedtuneError, match="image tokens do not fit max_length 130"):
        model.pairs(["<image> q"], ["d"], [[info]], [[]])


@pytest.mark.numeric  # floats at 1e-5: `make test-kernels` reruns it under other CPUs' kernels
def test_gradient_cache_gives_the_uncached_reranker_losses_with_images(qwen2_vl, rerank_rows, tmp_path):
    from embedtune.steps import train

    plain = train.run(rerank_cfg(qwen2_vl, rerank_rows, tmp_path / "a", max_steps=3))
    cached = train.run(
        rerank_cfg(qwen2_vl, rerank_rows, tmp_path / "b", max_steps=3, gradient_cache_chunk_size=3)
    )
    np.testing.assert_allclose([x for _, x in cached["loss_history"]], [x for _, x in plain["loss_history"]],
                               rtol=1e-4)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("train_type", ["full", "lora"])
def test_reranker_zero3_on_two_ranks_with_the_gradient_cache(train_type, qwen2_vl, rerank_rows, tmp_path):
    """Ranks with and without images in a batch run the same modules (the dummy image row), so ZeRO-3's
    gathers match; chunked and unchunked runs give the same losses; the folder reloads and scores images."""
    from embedtune.steps import train

    kw = dict(deepspeed="zero3", nproc=2, train_type=train_type, per_device_train_batch_size=2)
    cached = train.run(rerank_cfg(qwen2_vl, rerank_rows, tmp_path / "gc", gradient_cache_chunk_size=2, **kw))
    assert cached["world_size"] == 2 and cached["global_step"] == 2
    z = load_model(tmp_path / "gc").logits(["<image> x"], ["y"], query_images=[[str(rerank_rows.parent / "img" / "0.png")]],
                                           doc_images=[[]])  # fmt: skip
    assert z.shape == (1,) and np.isfinite(z).all()
    if train_type == "full":
        plain = train.run(rerank_cfg(qwen2_vl, rerank_rows, tmp_path / "plain", **kw))
        np.testing.assert_allclose([x for _, x in cached["loss_history"]], [x for _, x in plain["loss_history"]],
                                   rtol=1e-4)  # fmt: skip


def test_lora_reranker_merges_to_its_scores_on_image_pairs(qwen2_vl, rerank_rows, tmp_path):
    from safetensors import safe_open

    from embedtune.config import MergeConfig
    from embedtune.steps import merge, train

    train.run(rerank_cfg(qwen2_vl, rerank_rows, tmp_path / "lora", train_type="lora", lora_rank=4))
    with safe_open(str(tmp_path / "lora" / "adapter_model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "visual" in k]  # noqa: SIM118 (safe_open: no __iter__)
    result = merge.run(MergeConfig(adapter=str(tmp_path / "lora"), output=str(tmp_path / "merged"),
                                   eval_data=str(rerank_rows)))  # fmt: skip  # the check scores image pairs too
    assert result["merged"] and result["adapter_vs_base_max_diff"] > 0
    img = str(rerank_rows.parent / "img" / "3.png")
    args = (["<image> q", "plain"], ["doc", "<image> d"])
    sides = {"query_images": [[img], []], "doc_images": [[], [img]]}
    adapter = load_model(tmp_path / "lora").logits(*args, **sides)
    np.testing.assert_allclose(
        load_model(tmp_path / "merged").logits(*args, **sides), adapter, atol=ATOL, rtol=1e-5
    )
    with pytest.raises(EmbedtuneError, match="reads images; only text rerankers have a classifier form"):
        merge.run(
            MergeConfig(adapter=str(tmp_path / "lora"), output=str(tmp_path / "x"), export_classifier=True)
        )


def test_evaluate_ranks_image_pairs_with_the_rerankers_own_scores(qwen2_vl, rerank_rows, tmp_path):
    from embedtune.config import EvaluateConfig
    from embedtune.evaldata import read_eval_data
    from embedtune.metrics import ranking_metrics
    from embedtune.steps import evaluate, train

    train.run(rerank_cfg(qwen2_vl, rerank_rows, tmp_path / "tuned"))
    result = evaluate.run(EvaluateConfig(model=str(tmp_path / "tuned"), eval_data=str(rerank_rows),
                                         output=str(tmp_path / "m.json"), baseline_model=str(qwen2_vl)))  # fmt: skip
    data = read_eval_data(str(rerank_rows))
    assert data.shape == "ranking" and data.query_images is not None
    model = load_model(tmp_path / "tuned")
    z = model.logits([data.queries[i] for i in data.qi], [data.docs[i] for i in data.di],
                     query_images=[data.query_images[i] for i in data.qi],
                     doc_images=[data.doc_images[i] for i in data.di])  # fmt: skip
    want = ranking_metrics(z, data.relevant, data.qi)["ndcg_at_10"]
    assert result["metrics"]["ndcg_at_10"] == pytest.approx(want, abs=1e-6)
    assert (
        "ndcg_at_10" in result["baseline_metrics"]
    )  # the base measured as a reranker too, on the same image pairs


def test_score_reads_each_text_with_its_images(qwen2_vl, rerank_rows, tmp_path):
    """A reranker teacher's z and an image embedder's cosines, for every row (images or not), equal the
    models' own scores of the same pairs."""
    from embedtune.config import ScoreConfig
    from embedtune.data import images_by_text, read_rows
    from embedtune.images import check_images
    from embedtune.modeling import Embedder
    from embedtune.steps import score

    rows = check_images(read_rows(rerank_rows), str(rerank_rows))
    for task in ("reranker", "embedding"):
        out = tmp_path / f"scored-{task}.jsonl"
        stats = score.run(ScoreConfig(dataset=str(rerank_rows), teacher_model=str(qwen2_vl), teacher_task_type=task,
                                      output=str(out), max_length=256))  # fmt: skip
        scored = [json.loads(x) for x in out.read_text().splitlines()]
        assert stats["rows_scored"] == len(rows) and stats["rows_with_images_copied"] == 0
        model = load_model(qwen2_vl, task)
        for row, got in zip(rows, scored, strict=True):
            per = images_by_text(row)
            docs = [row["response"], *row["rejected_response"]]
            if task == "reranker":
                want = model.logits([row["query"]] * len(docs), docs, query_images=[per[0]] * len(docs),
                                    doc_images=per[1:])  # fmt: skip
            else:
                assert isinstance(model, Embedder)
                q = model.encode_items([row["query"]], [per[0]], is_query=True)
                want = (model.encode_items(docs, per[1:]) @ q[0]).tolist()
            np.testing.assert_allclose(got["teacher_scores"], want, atol=ATOL, rtol=1e-5)
            assert got.get("images") == row.get("images")  # resolved, as mine writes them


def test_mine_finds_negatives_by_words_and_image_content(qwen2_vl, tmp_path):
    """An image embedder mines rows with images: candidates are texts with their images (a corpus file of rows
    with images too), compared by words and image bytes: the positive under another path is never mined, the
    same words over another image are a candidate; each mined row's images follow its tags; the negatives are
    the ones mining's rules pick from the model's own cosines, by hand."""
    import hashlib

    from embedtune.config import MineConfig
    from embedtune.data import images_by_text, read_rows
    from embedtune.images import check_images
    from embedtune.steps import mine

    (tmp_path / "img").mkdir()
    for i in range(8):
        rgb(40 + i, 40, 48).save(tmp_path / "img" / f"{i}.png")
    (tmp_path / "img" / "copy4.png").write_bytes((tmp_path / "img" / "4.png").read_bytes())
    rows = [{"query": f"<image> query {i}", "response": "<image> the answer", "images": [f"img/{i}.png", f"img/{i + 4}.png"]}
            for i in range(4)]  # fmt: skip
    rows.append({"query": "text query", "response": "text answer"})
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    corpus = [{"query": "c", "response": "<image> the answer", "images": ["img/copy4.png"]},
              {"query": "c", "response": "<image> a corpus picture", "images": ["img/7.png"]},
              {"query": "c", "response": "words alone in the corpus"}]  # fmt: skip
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    out = tmp_path / "mined.jsonl"
    cfg = MineConfig(dataset=str(tmp_path / "rows.jsonl"), model=str(qwen2_vl), output=str(out),
                     corpus=str(tmp_path / "corpus.jsonl"), num_negatives=3, range_max=20)  # fmt: skip
    stats = mine.run(cfg)
    img = {n: str(tmp_path / "img" / n) for n in [f"{i}.png" for i in range(8)] + ["copy4.png"]}
    cand = [("<image> the answer", [img[f"{i}.png"]]) for i in range(4, 8)] + [("text answer", [])]
    cand += [("<image> the answer", [img["copy4.png"]]), ("<image> a corpus picture", [img["7.png"]]),
             ("words alone in the corpus", [])]  # fmt: skip
    assert stats["rows_with_images_copied"] == 0 and stats["corpus_texts"] == len(cand) == 8

    def content(text: str, refs) -> tuple:  # what mining compares: the words and the images' bytes
        return text, tuple(hashlib.sha256(Path(r).read_bytes()).hexdigest() for r in refs)

    model = load_model(qwen2_vl, "embedding")
    d = model.encode_items([t for t, _ in cand], [i for _, i in cand])
    mined = check_images(read_rows(out), str(out))  # valid rows; every image entry readable
    for row in mined:
        per = images_by_text(row)
        negatives = row.get("rejected_response", [])
        assert len(per) == 2 + len(negatives)
        q = model.encode_items([row["query"]], [per[0]], is_query=True)[0]
        own = {content(row["query"], per[0]), content(row["response"], per[1])}
        pos = float(model.encode_items([row["response"]], [per[1]])[0] @ q)
        scores = sorted(((float(d[j] @ q), content(*c)) for j, c in enumerate(cand) if content(*c) not in own),
                        key=lambda x: -x[0])  # fmt: skip
        keep = [c for s, c in scores if s <= pos - abs(pos) * cfg.relative_margin and s <= cfg.max_score]
        got = [content(t, i) for t, i in zip(negatives, per[2:], strict=True)]
        assert sorted(got) == sorted(keep[:3])  # (ties: a picture and its copy score the same)
        assert not own & set(got)  # never its own positive, under whatever path
    assert len(mined) == 5
    assert any(refs for row in mined for refs in images_by_text(row)[2:])  # negatives mined with their images


def test_the_mlflow_model_scores_pairs_with_images(qwen2_vl, rerank_rows, tmp_path):
    import mlflow
    import pandas as pd

    from embedtune.mlflow_models import log_vision_model

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("vision-reranker")
    meta = {"vision_family": "qwen2_vl", "task_type": "reranker"}
    with mlflow.start_run():
        info = log_vision_model(Path(qwen2_vl), meta, {}, lambda text: text)
    loaded = mlflow.pyfunc.load_model(info.model_uri)
    names = {c.name for c in loaded.metadata.get_input_schema().inputs}
    assert names == {"query", "document", "query_images", "document_images"}
    img = str(rerank_rows.parent / "img" / "2.png")
    frame = pd.DataFrame({"query": ["<image> q", "plain"], "document": ["d", "<image> e"],
                          "query_images": [[img], []], "document_images": [[], [img]]})  # fmt: skip
    got = np.asarray(loaded.predict(frame))
    z = load_model(qwen2_vl, "reranker").logits(["<image> q", "plain"], ["d", "<image> e"],
                                                query_images=[[img], []], doc_images=[[], [img]])  # fmt: skip
    np.testing.assert_allclose(got, 1 / (1 + np.exp(-z)), atol=1e-6)


def test_image_rows_need_a_reranker_that_reads_images_and_vl_rerankers_are_generative(
    qwen2_vl, rerank_rows, tmp_path
):
    from tiny_models import build_tiny_qwen3

    from embedtune.steps import train

    with pytest.raises(EmbedtuneError, match="generative head only"):
        train.run(rerank_cfg(qwen2_vl, rerank_rows, tmp_path / "a", reranker_head="classifier"))
    text = build_tiny_qwen3(tmp_path / "qwen3")
    with pytest.raises(EmbedtuneError, match="this reranker reads no images"):
        train.run(rerank_cfg(text, rerank_rows, tmp_path / "b"))


def test_serve_reranks_text_and_images_with_an_image_reranker(qwen2_vl, rerank_rows, tmp_path):
    """`embedtune serve` (a real process, real httpx requests) on a trained image reranker: `/v1/rerank` on text,
    and on images as Jina and vLLM send them, gives the folder's own scores; a bad image or part is a 400."""
    import httpx
    from test_serve import Server

    from embedtune.steps import train

    train.run(rerank_cfg(qwen2_vl, rerank_rows, tmp_path / "tuned"))
    docs = ["plain answer 1", "a drawing of shape 2", "wrong answer 3"]
    want = 1 / (1 + np.exp(-load_model(tmp_path / "tuned").logits(["plain question 1"] * 3, docs)))
    server = Server(tmp_path / "tuned", tmp_path / "serve.log")
    try:
        r = httpx.post(
            f"{server.url}/v1/rerank", json={"query": "plain question 1", "documents": docs}, timeout=60
        )
        assert r.status_code == 200, r.text
        got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
        np.testing.assert_allclose([got[i] for i in range(3)], want, atol=1e-5)
        # images as Jina sends them ({text, image} objects; the query too) and as vLLM does (content parts)
        buf = io.BytesIO()
        rgb(30).save(buf, format="PNG")
        uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        model = load_model(tmp_path / "tuned")
        jina = {"query": {"text": "which one", "image": uri}, "return_documents": True,
                "documents": [{"text": "a drawing", "image": uri}, "plain words", {"image": uri}]}  # fmt: skip
        r = httpx.post(f"{server.url}/v1/rerank", json=jina, timeout=60)
        assert r.status_code == 200, r.text
        z = model.logits(["<image>which one"] * 3, ["<image>a drawing", "plain words", "<image>"],
                         query_images=[[uri]] * 3, doc_images=[[uri], [], [uri]])  # fmt: skip
        got = {x["index"]: x for x in r.json()["results"]}
        np.testing.assert_allclose(
            [got[i]["relevance_score"] for i in range(3)], 1 / (1 + np.exp(-z)), atol=1e-5
        )
        assert got[0]["document"] == {"text": "a drawing", "image": uri} and got[1]["document"] == {
            "text": "plain words"
        }
        vllm = {"query": "which one", "documents": {"content": [
            {"type": "text", "text": "plain words"}, {"type": "image_url", "image_url": {"url": uri}}]}}  # fmt: skip
        r = httpx.post(f"{server.url}/rerank", json=vllm, timeout=60)
        assert r.status_code == 200, r.text
        z = model.logits(
            ["which one"] * 2, ["plain words", "<image>"], query_images=[[]] * 2, doc_images=[[], [uri]]
        )
        got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
        np.testing.assert_allclose([got[0], got[1]], 1 / (1 + np.exp(-z)), atol=1e-5)
        for body, words in (({"query": "q", "documents": [{"image": "/etc/hostname"}]}, "data URIs or http(s) URLs"),
                            ({"query": "q", "documents": {"content": [{"type": "audio"}]}}, "a part is text or image_url"),
                            ({"documents": [{"image": uri}]}, "query: missing")):  # fmt: skip
            r = httpx.post(f"{server.url}/v1/rerank", json=body, timeout=60)
            assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
    finally:
        server.stop()
