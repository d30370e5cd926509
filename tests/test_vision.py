"""Images end to end: rows with `<image>` tags on a tiny Qwen2-VL (GME) and a tiny Qwen3-VL, random weights and a
tiny vision tower built from a config, a processor built offline, small images generated here with PIL.

What is checked: the saved folder gives the embeddings transformers' own classes give from the documented
template (1e-5, fp32); batching (padding, pixel layout, chunking by the gradient cache) changes no embedding;
training on 1 and 2 ranks (ZeRO-3), full and LoRA, with the vision tower frozen or not; and every kind of bad
image refused with FILE:LINE: field before anything is written.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from embedtune.config import TrainConfig
from embedtune.errors import DataError, EmbedtuneError
from embedtune.features import pad
from embedtune.images import check_images, probe
from embedtune.modeling import Embedder

ATOL = 1e-5  # fp32 end to end on the same ops; batching only reorders rows (measured ~1e-7)


def rgb(seed: int, h: int = 56, w: int = 84):
    from PIL import Image

    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def image_rows(tmp_path_factory) -> Path:
    """24 rows in the seed's format: images on the query, the response, a negative, none; relative paths."""
    d = tmp_path_factory.mktemp("image-rows")
    (d / "img").mkdir()
    for i in range(6):
        rgb(i, 40 + 12 * i, 60).save(d / "img" / f"{i}.png")
    rgb(9).save(d / "img" / "photo.jpg", quality=90)
    rows = []
    for i in range(8):
        rows.append({"query": f"<image> what is the cat {i}", "response": f"a photo of a dog {i}",
                     "images": [f"img/{i % 6}.png"]})  # fmt: skip
        rows.append({"query": f"the river {i}", "response": "<image> the tree", "rejected_response": ["<image> bad"],
                     "images": [f"img/{(i + 1) % 6}.png", "img/photo.jpg"]})  # fmt: skip
        rows.append({"query": f"text only music {i}", "response": f"art science {i}"})
    path = d / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def with_image_pads(image_processor, text: str, images: list) -> tuple[str, dict]:
    """What Qwen2VLProcessor makes of a text with PIL images (its video half needs torchvision): each `<image>`
    as `<|vision_start|>` + one `<|image_pad|>` per merged patch + `<|vision_end|>`, and the pixel inputs."""
    content = text.replace("<image>", "<|vision_start|><|image_pad|><|vision_end|>")
    if not images:
        return content, {}
    pixels = image_processor(images=images, return_tensors="pt")
    for n in (pixels["image_grid_thw"].prod(-1) // image_processor.merge_size**2).tolist():
        content = content.replace("<|image_pad|>", "<|placeholder|>" * n, 1)
    return content.replace("<|placeholder|>", "<|image_pad|>"), dict(pixels)


def reference_embeddings(folder: Path, texts: list[str], images: list[list], system: str):
    """What a user gets from the folder with transformers' own classes and the documented template (GME's
    `gme_inference.py`): the folder's image processor and tokenizer on the full prompt, each `<|image_pad|>`
    repeated once per merged patch in the text (as Qwen2VLProcessor does; its video half needs torchvision),
    the last token's last hidden state, L2-normalized."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    image_processor = AutoImageProcessor.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    image_id = model.config.image_token_id
    out = []
    for text, imgs in zip(texts, images, strict=True):
        content, extra = with_image_pads(image_processor, text, imgs)
        prompt = (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{content}<|im_end|>\n"
                  "<|im_start|>assistant\n<|endoftext|>")  # fmt: skip
        ids = tokenizer([prompt], return_tensors="pt")["input_ids"]
        if imgs:
            extra["mm_token_type_ids"] = (ids == image_id).int()
        with torch.no_grad():
            hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).last_hidden_state[
                0, -1
            ]
        out.append(torch.nn.functional.normalize(hidden, dim=-1).numpy())
    return np.stack(out)


def train_cfg(model, data, out, **kw) -> TrainConfig:
    knobs = dict(deepspeed="none", max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1,
                 max_length=128, save_steps=0, warmup_ratio=0.0)  # fmt: skip
    return TrainConfig(model=str(model), train_data=str(data), output_dir=str(out), **{**knobs, **kw})


@pytest.mark.numeric  # floats at 1e-5: `make test-kernels` reruns it under other CPUs' kernels
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_trained_folder_gives_transformers_embeddings_from_the_documented_template(
    family, qwen2_vl, qwen3_vl, image_rows, tmp_path
):
    from embedtune.steps import train
    from embedtune.vision import FAMILIES

    base = {"qwen2_vl": qwen2_vl, "qwen3_vl": qwen3_vl}[family]
    result = train.run(train_cfg(base, image_rows, tmp_path / "out", query_instruction="Find the image."))
    assert result["global_step"] == 2 and np.isfinite(result["train_loss"])
    folder = tmp_path / "out"
    model = Embedder.from_pretrained(folder)
    assert type(model).__name__ == "VisionEmbedder" and model.family == family
    img = image_rows.parent / "img"
    texts = ["<image> what is the cat", "two <image> and <image> here", "text only, no image"]
    refs = [[str(img / "1.png")], [str(img / "2.png"), str(img / "photo.jpg")], []]
    from PIL import Image

    pil = [[Image.open(r).convert("RGB") for r in rs] for rs in refs]
    docs = model.encode_items(texts, refs)
    want = reference_embeddings(folder, texts, pil, FAMILIES[family]["system"])
    np.testing.assert_allclose(docs, want, atol=ATOL)
    queries = model.encode_items(texts, refs, is_query=True)  # the query instruction is GME's system prompt
    np.testing.assert_allclose(queries, reference_embeddings(folder, texts, pil, "Find the image."),
                               atol=ATOL)  # fmt: skip
    assert not np.allclose(queries, docs, atol=1e-3)
    # text-only inputs (evaluate and serve send these) take the same template
    np.testing.assert_allclose(model.encode([texts[2]]), want[2:], atol=ATOL)
    meta = json.loads((folder / "embedtune.json").read_text())
    assert meta["vision_family"] == family and "<|endoftext|>" in meta["template"]


@pytest.mark.numeric  # floats at 1e-5: `make test-kernels` reruns it under other CPUs' kernels
def test_a_batch_and_its_chunks_give_each_text_alone(qwen2_vl, image_rows):
    """Padding, the per-text pixel layout and the gradient cache's chunks (`features.take` + `trim`) change no
    embedding: the images travel with their texts."""
    from embedtune.features import take, trim

    model = Embedder.from_pretrained(qwen2_vl).eval()
    img = image_rows.parent / "img"
    infos = [[probe(str(img / "0.png"))], [], [probe(str(img / "3.png")), probe(str(img / "photo.jpg"))], []]
    texts = model.texts(
        ["a <image> cat", "plain words here", "<image> then <image>", "more words"], images=infos
    )
    batch = pad(texts, model.tokenizer.pad_token_id, pixels=model.featurizer)
    assert batch["pixel_values"].shape[0] == 4 and batch["image_grid_thw"].shape[:2] == (4, 2)
    with torch.no_grad():
        whole = model(batch)
        alone = torch.cat(
            [model(pad([t], model.tokenizer.pad_token_id, pixels=model.featurizer)) for t in texts]
        )
        chunks = torch.cat([model(trim(take(batch, slice(i, i + 2)))) for i in (0, 2)])
    torch.testing.assert_close(whole, alone, atol=ATOL, rtol=0)
    torch.testing.assert_close(chunks, alone, atol=ATOL, rtol=0)
    # the image tokens count in a text's length (length buckets and token budgets see them)
    assert len(texts[2]["input_ids"]) > len(texts[3]) + 2 * model.image_tokens(infos[2][1]) - 10


def test_same_image_under_two_paths_is_the_same_text_and_other_images_are_not(qwen2_vl, tmp_path):
    from embedtune.batching import text_key

    model = Embedder.from_pretrained(qwen2_vl)
    rgb(1).save(tmp_path / "a.png")
    (tmp_path / "copy.png").write_bytes((tmp_path / "a.png").read_bytes())
    rgb(2).save(tmp_path / "b.png")
    a, copy, b = (probe(str(tmp_path / n)) for n in ("a.png", "copy.png", "b.png"))
    ta, tc, tb = model.texts(["<image> x"] * 3, images=[[a], [copy], [b]])
    assert text_key(ta) == text_key(tc) != text_key(tb)


@pytest.mark.numeric  # floats at 1e-5: `make test-kernels` reruns it under other CPUs' kernels
def test_gradient_cache_gives_the_uncached_losses_with_images(qwen2_vl, image_rows, tmp_path):
    from embedtune.steps import train

    plain = train.run(train_cfg(qwen2_vl, image_rows, tmp_path / "a", max_steps=3))
    cached = train.run(
        train_cfg(qwen2_vl, image_rows, tmp_path / "b", max_steps=3, gradient_cache_chunk_size=3)
    )
    np.testing.assert_allclose([x for _, x in cached["loss_history"]], [x for _, x in plain["loss_history"]],
                               rtol=1e-4)  # fmt: skip


def visual_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
    return {k: v for k, v in state.items() if ".visual." in f".{k}"}


@pytest.mark.parametrize("freeze", [True, False])
def test_full_training_freezes_the_vision_tower_unless_told_not_to(freeze, qwen2_vl, image_rows, tmp_path):
    from embedtune.steps import train

    train.run(train_cfg(qwen2_vl, image_rows, tmp_path / "o", freeze_vision=freeze))
    base, tuned = visual_weights(qwen2_vl), visual_weights(tmp_path / "o")
    assert tuned and {k.split("visual.", 1)[1] for k in base} == {k.split("visual.", 1)[1] for k in tuned}
    same = all(torch.equal(base[b], tuned[t]) for b, t in zip(sorted(base), sorted(tuned), strict=True))
    assert same == freeze


def test_lora_leaves_the_vision_tower_without_adapters_and_merges_to_its_outputs(
    qwen2_vl, image_rows, tmp_path
):
    from safetensors import safe_open

    from embedtune.config import MergeConfig
    from embedtune.steps import merge, train

    train.run(train_cfg(qwen2_vl, image_rows, tmp_path / "lora", train_type="lora", lora_rank=4))
    with safe_open(str(tmp_path / "lora" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not [k for k in keys if "visual" in k] and any("language_model" in k for k in keys)
    merge.run(MergeConfig(adapter=str(tmp_path / "lora"), output=str(tmp_path / "merged")))
    img = image_rows.parent / "img"
    texts, refs = ["<image> a cat", "words only"], [[str(img / "4.png")], []]
    adapter = Embedder.from_pretrained(tmp_path / "lora").encode_items(texts, refs)
    merged = Embedder.from_pretrained(tmp_path / "merged").encode_items(texts, refs)
    np.testing.assert_allclose(merged, adapter, atol=ATOL)


@pytest.mark.parametrize("train_type", ["full", "lora"])
def test_zero3_on_two_ranks_with_the_gradient_cache(train_type, qwen2_vl, image_rows, tmp_path):
    """Ranks whose batches hold images and ranks whose batches hold none run the same modules (the dummy
    image), so ZeRO-3's gathers match; the chunked run gives the unchunked losses."""
    from embedtune.steps import train

    kw = dict(deepspeed="zero3", nproc=2, train_type=train_type, per_device_train_batch_size=2)
    cached = train.run(train_cfg(qwen2_vl, image_rows, tmp_path / "gc", gradient_cache_chunk_size=3, **kw))
    assert cached["world_size"] == 2 and cached["global_step"] == 2
    reloaded = Embedder.from_pretrained(tmp_path / "gc")
    assert reloaded.encode_items(["<image> x"], [[str(image_rows.parent / "img" / "0.png")]]).shape == (1, 64)
    if train_type == "full":
        plain = train.run(train_cfg(qwen2_vl, image_rows, tmp_path / "plain", **kw))
        np.testing.assert_allclose([x for _, x in cached["loss_history"]], [x for _, x in plain["loss_history"]],
                                   rtol=1e-4)  # fmt: skip


# ------------------------------------------------------------------------------------------- bad images
def bad_corpus(d: Path) -> tuple[list[dict], dict[int, str]]:
    """Rows, each with one kind of bad image (line -> the words its message must hold), after 2 good rows."""
    (d / "data").mkdir()
    (d / "outside").mkdir()
    rgb(0).save(d / "data" / "ok.png")
    rgb(1).save(d / "outside" / "secret.png")
    jpeg = io.BytesIO()
    rgb(2, 64, 64).save(jpeg, format="JPEG")
    (d / "data" / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (d / "data" / "notes.png").write_text("this is a text file, not a PNG\n")
    (d / "data" / "empty.png").write_bytes(b"")
    # a PNG header that claims 40000 x 40000 pixels (1.6e9: past PIL's decompression-bomb limit)
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0))
    bomb = b"\x89PNG\r\n\x1a\n" + ihdr + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b"")
    (d / "data" / "bomb.png").write_bytes(bomb)
    good = {"query": "<image> ok", "response": "fine", "images": ["ok.png"]}
    kinds = [
        ({"query": "<image> <image> two tags", "response": "r", "images": ["ok.png"]}, "1 images for 2"),
        ({"query": "<image> q", "response": "r", "images": ["missing.png"]}, "no such file"),
        ({"query": "<image> q", "response": "r", "images": ["truncated.jpg"]}, "does not decode"),
        ({"query": "<image> q", "response": "r", "images": ["notes.png"]}, "not an image"),
        ({"query": "<image> q", "response": "r", "images": ["empty.png"]}, "empty file"),
        ({"query": "<image> q", "response": "r", "images": ["bomb.png"]}, "too large to decode safely"),
        ({"query": "<video> q", "response": "r"}, "<video> tags are not supported yet"),
        ({"query": "q", "response": "<audio> r"}, "<audio> tags are not supported yet"),
        ({"query": "<image> q", "response": "r", "images": ["../outside/secret.png"]}, "outside image_root"),
        ({"query": "<image> q", "response": "r"}, "images: missing"),
        ({"query": "<image> q", "response": "r", "images": ["data:image/png;base64,@@@not base64@@@"]},
         "bad base64"),
        ({"query": "<image> q", "response": "r", "images": ["data:image/png;base64," +
          base64.b64encode(b"GIF89a but not really").decode()]}, "not an image"),
        ({"query": "<image> q", "response": "r", "images": [7]}, "images[0]"),
        ({"query": "<image> q", "response": "r", "images": ["http://127.0.0.1:9/none.png"]}, "cannot read"),
    ]  # fmt: skip
    rows = [good, good] + [row for row, _ in kinds]
    return rows, {3 + i: words for i, (_, words) in enumerate(kinds)}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "embedtune", *args], capture_output=True, text=True, timeout=300
    )


def test_every_kind_of_bad_image_is_refused_with_file_line_field_and_nothing_is_written(tmp_path):
    rows, expected = bad_corpus(tmp_path)
    path = tmp_path / "data" / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out" / "rows.jsonl"
    got = cli("convert", "--source", str(path), "--output", str(out), "--image-root", str(tmp_path / "data"),
              "--max-errors", "50")  # fmt: skip
    assert got.returncode == 2, got.stderr
    assert "Traceback" not in got.stderr
    for line, words in expected.items():
        hits = [m for m in got.stderr.splitlines() if f"{path}:{line}:" in m]
        assert hits and any(words in m for m in hits), (line, words, got.stderr)
    assert not out.exists() and not Path(f"{out}.stats.json").exists()
    assert f"{path}:1:" not in got.stderr and f"{path}:2:" not in got.stderr  # the good rows are not named
    # skip mode keeps the good rows, with absolute image paths, and lists each bad one with its reason
    got = cli("convert", "--source", str(path), "--output", str(out), "--image-root", str(tmp_path / "data"),
              "--on-error", "skip")  # fmt: skip
    assert got.returncode == 0, got.stderr
    kept = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(kept) == 2 and kept[0]["images"] == [str(tmp_path / "data" / "ok.png")]
    assert len(Path(f"{out}.rejected.jsonl").read_text().splitlines()) == len(expected)
    assert json.loads(Path(f"{out}.stats.json").read_text())["images"] == 2


def test_train_checks_images_before_any_model_loads(qwen2_vl, tmp_path):
    from embedtune.steps import train

    rows, _ = bad_corpus(tmp_path)
    path = tmp_path / "data" / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:2] + rows[3:7]))  # the decodable kinds
    with pytest.raises(DataError) as e:
        train.run(train_cfg(qwen2_vl, path, tmp_path / "o"))
    assert f"{path}:4: images[0]: " in str(e.value) and "no such file" in str(e.value)
    assert f"{path}:5: images[0]: " in str(e.value) and not (tmp_path / "o").exists()


def test_large_images_are_resized_data_uris_read_and_a_text_model_refuses_images(minilm_path, tmp_path):
    rgb(0, 300, 400).save(tmp_path / "big.png")
    buf = io.BytesIO()
    rgb(1).save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    rows = [{"query": "<image> q", "response": "<image> r", "images": ["big.png", uri], "_line": 1}]
    (checked,) = check_images(rows, str(tmp_path / "rows.jsonl"), max_image_pixels=10_000)
    big, small = checked["_image_info"]
    assert big.width * big.height <= 10_000 and abs(big.width / big.height - 4 / 3) < 0.05
    assert (small.width, small.height) == (84, 56) and checked["images"][1] == uri
    assert checked["images"][0] == str(tmp_path / "big.png")
    text_model = Embedder.from_pretrained(minilm_path)
    with pytest.raises(EmbedtuneError, match="reads no images"):
        text_model.texts(["<image> q"], images=[[big]])


def test_split_groups_and_guards_by_image_content_not_path(tmp_path):
    from embedtune.config import SplitConfig
    from embedtune.steps import split

    for i in range(40):
        rgb(i, 20, 20).save(tmp_path / f"{i}.png")
    (tmp_path / "copy-of-0.png").write_bytes((tmp_path / "0.png").read_bytes())
    # one question over 40 images is 40 queries; an eval query's image under another path is the same query
    rows = [
        {"query": "<image> what is this?", "response": f"answer {i}", "images": [f"{i}.png"]}
        for i in range(40)
    ]
    rows.append(
        {"query": "<image> WHAT is  this?", "response": "answer 0 again", "images": ["copy-of-0.png"]}
    )
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = split.run(SplitConfig(dataset=str(path), train_data=str(tmp_path / "t.jsonl"),
                                   eval_data=str(tmp_path / "e.jsonl"), split_dataset_ratio=0.25))  # fmt: skip
    evals = [json.loads(x)["images"][0] for x in (tmp_path / "e.jsonl").read_text().splitlines()]
    trains = [json.loads(x)["images"][0] for x in (tmp_path / "t.jsonl").read_text().splitlines()]
    # relative paths are written absolute (the split files may live in another folder), the rest unchanged
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in evals + trains)
    evals, trains = [Path(p).name for p in evals], [Path(p).name for p in trains]
    assert len(evals) == round(0.25 * 41)  # 41 distinct queries: the same words over 40 images are 40
    for a, b in (("0.png", "copy-of-0.png"), ("copy-of-0.png", "0.png")):
        assert not (a in evals and b in trains), (
            result
        )  # an eval query's image never trains under another path
    assert result["train_rows_dropped_eval_overlap"] == int("0.png" in evals or "copy-of-0.png" in evals)
    (tmp_path / "5.png").unlink()
    with pytest.raises(DataError, match=r"rows\.jsonl:6: images\[0\]: .*no such file"):
        split.run(SplitConfig(dataset=str(path), train_data=str(tmp_path / "t2.jsonl"),
                              eval_data=str(tmp_path / "e2.jsonl")))  # fmt: skip


def test_ms_swift_message_lists_convert_to_rows_with_images_in_tag_order(tmp_path):
    from embedtune.config import ConvertConfig
    from embedtune.steps import convert

    for name in ("a", "b", "c", "d"):
        rgb(ord(name)).save(tmp_path / f"{name}.jpg")
    row = {  # the example row of ms-swift's docs (Qwen3-VL-Embedding), plus a system message
        "messages": [{"role": "system", "content": "Find the picture."}, {"role": "user", "content": "<image>q"}],
        "images": ["a.jpg"],
        "positive_messages": [[{"role": "user", "content": "<image>p"}]], "positive_images": [["b.jpg"]],
        "negative_messages": [[{"role": "user", "content": "<image><image>n"}]],
        "negative_images": [["c.jpg", "d.jpg"]],
    }  # fmt: skip
    bad = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}],
           "positive_messages": [[{"role": "user", "content": "p"}]]}  # fmt: skip
    src = tmp_path / "swift.jsonl"
    src.write_text(json.dumps(row) + "\n")
    convert.run(ConvertConfig(source=str(src), output=str(tmp_path / "rows.jsonl")))
    (got,) = [json.loads(x) for x in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert got == {"query": "<image>q", "response": "<image>p", "rejected_response": ["<image><image>n"],
                   "images": [str(tmp_path / f"{n}.jpg") for n in "abcd"], "instruction": "Find the picture."}  # fmt: skip
    src.write_text(json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=r"swift\.jsonl:1: messages: 2 non-system messages"):
        convert.run(ConvertConfig(source=str(src), output=str(tmp_path / "rows2.jsonl")))


def test_evaluate_measures_image_rows_as_the_model_encodes_them(qwen2_vl, image_rows, tmp_path):
    """evaluate on rows with images: the same words over another image are another text, and the numbers are
    the metrics of the model's own `encode_items` embeddings."""
    from embedtune.config import EvaluateConfig
    from embedtune.evaldata import read_eval_data
    from embedtune.metrics import ranking_metrics
    from embedtune.steps import evaluate

    rows = [json.loads(x) for x in image_rows.read_text().splitlines()]
    ranked = [r for r in rows if r.get("rejected_response")]  # query, <image> positive, <image> negative
    path = image_rows.parent / "ranking.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ranked))
    data = read_eval_data(str(path))
    assert data.shape == "ranking" and len(data.docs) == len(data.doc_images)
    assert len(set(zip(data.docs, data.doc_images, strict=True))) == len(data.docs) > len(set(data.docs))
    result = evaluate.run(EvaluateConfig(model=str(qwen2_vl), eval_data=str(path), output=str(tmp_path / "m.json"),
                                         baseline_model=str(qwen2_vl)))  # fmt: skip
    model = Embedder.from_pretrained(qwen2_vl)
    q = model.encode_items(data.queries, data.query_images, is_query=True)
    d = model.encode_items(data.docs, data.doc_images)
    want = ranking_metrics((q[data.qi] * d[data.di]).sum(1), data.relevant, data.qi)["ndcg_at_10"]
    assert result["metrics"]["ndcg_at_10"] == pytest.approx(want, abs=1e-6)
    assert result["deltas"]["delta_ndcg_at_10"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_pipeline_trains_evaluates_and_registers_an_image_text_embedder(qwen2_vl, tmp_path, monkeypatch):
    """The kfp.local DAG on rows with images (the multimodal preset's knobs on the tiny Qwen2-VL): convert
    resolves the images, split keys them by content, mine copies them, train, evaluate on image rows, register."""
    from embedtune.io import read_jsonl
    from embedtune.modeling import read_meta
    from pipelines.demo import run_local, tiny_arguments
    from pipelines.pipeline import load_preset

    (tmp_path / "data" / "img").mkdir(parents=True)
    rows = []
    for i in range(30):
        rgb(i, 28 + 4 * (i % 5), 56).save(tmp_path / "data" / "img" / f"{i}.png")
        rows.append({"query": f"<image> picture number {i}", "response": f"a photo of thing {i}",
                     "rejected_response": [f"<image> another {i}"], "images": [f"img/{i}.png", f"img/{(i + 7) % 30}.png"]})  # fmt: skip
    source = tmp_path / "data" / "rows.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    preset = load_preset("gme-qwen2-vl-2b-lora")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    knobs = {
        k: preset[k] for k in ("train_type", "loss_type", "freeze_vision", "query_instruction", "lora_rank")
    }
    arguments = tiny_arguments(model=str(qwen2_vl), source=str(source), name="tiny-vl", **knobs, max_pixels=64 * 784,
                               max_length=128, deepspeed="none", cpu_procs=1, min_primary_metric=0.0,
                               split_dataset_ratio=0.2, per_device_train_batch_size=4)  # fmt: skip
    out = run_local(arguments, tmp_path / "run")
    run_dir = out["run_dir"]
    converted = read_jsonl(run_dir / "convert" / "output")
    assert all(Path(p).is_absolute() and Path(p).is_file() for r in converted for p in r["images"])
    assert read_meta(run_dir / "merge" / "output")["vision_family"] == "qwen2_vl"
    result = json.loads(out["metrics_json"].read_text())
    assert result["primary_metric"] == "ndcg_at_10" and 0 < result["primary_value"] <= 1
    assert out["registered"]


def test_the_mlflow_model_takes_texts_with_images_and_gives_the_folders_embeddings(qwen2_vl, tmp_path):
    import mlflow
    import pandas as pd

    from embedtune.mlflow_models import log_vision_model

    buf = io.BytesIO()
    rgb(5).save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    rgb(6).save(tmp_path / "local.png")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("vision")
    with mlflow.start_run():
        info = log_vision_model(Path(qwen2_vl), {"vision_family": "qwen2_vl"}, {}, lambda text: text)
    loaded = mlflow.pyfunc.load_model(info.model_uri)
    assert {c.name for c in loaded.metadata.get_input_schema().inputs} == {"text", "images"}
    frame = pd.DataFrame({"text": ["<image> one", "no image", "<image> local"],
                          "images": [[uri], [], [str(tmp_path / "local.png")]]})  # fmt: skip
    got = np.asarray(loaded.predict(frame, params={"prompt_name": "query"}))
    model = Embedder.from_pretrained(qwen2_vl)
    want = model.encode_items(list(frame["text"]), [[uri], [], [str(tmp_path / "local.png")]], is_query=True)
    np.testing.assert_allclose(got, want, atol=ATOL)


def test_serve_takes_images_as_vllm_and_jina_send_them(qwen2_vl, tmp_path):
    """`embedtune serve` (a real process, real httpx requests) on an image embedder: data URIs and an http URL
    (served here on 127.0.0.1), vLLM's chat form and Jina's objects, the folder's embeddings; bad images 400."""
    import http.server
    import threading

    import httpx
    from test_serve import Server

    rgb(11).save(tmp_path / "remote.png")
    buf = io.BytesIO()
    rgb(12).save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path), **k)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/remote.png"
    server = Server(qwen2_vl, tmp_path / "serve.log")
    try:
        model = Embedder.from_pretrained(qwen2_vl)
        r = httpx.post(f"{server.url}/v1/embeddings", timeout=60, json={
            "input": [{"text": "a red thing", "image": uri}, "plain words", {"image": url}], "input_type": "query"})  # fmt: skip
        assert r.status_code == 200, r.text
        got = np.array([d["embedding"] for d in r.json()["data"]])
        want = model.encode_items(["<image>a red thing", "plain words", "<image>"],
                                  [[uri], [], [str(tmp_path / "remote.png")]], is_query=True)  # fmt: skip
        np.testing.assert_allclose(got, want, atol=ATOL)
        assert r.json()["usage"]["prompt_tokens"] > 2 * model.image_tokens(probe(uri))
        chat = {"messages": [{"role": "system", "content": "Find it."}, {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what is this"}]}]}  # fmt: skip
        r = httpx.post(f"{server.url}/v1/embeddings", json=chat, timeout=60)
        assert r.status_code == 200, r.text
        (seq,) = model.texts(["<image>what is this"], instructions=["Find it."],
                             images=[[probe(str(tmp_path / "remote.png"))]])  # fmt: skip
        with torch.no_grad():
            want = model.eval()(pad([seq], model.tokenizer.pad_token_id, pixels=model.featurizer)).numpy()
        np.testing.assert_allclose([r.json()["data"][0]["embedding"]], want, atol=ATOL)
        # /v1/rerank with images on an embedder: the cosines of the query's and the documents' embeddings
        r = httpx.post(f"{server.url}/v1/rerank", timeout=60, json={
            "query": {"text": "find", "image": uri}, "documents": ["plain words", {"text": "x", "image": url}]})  # fmt: skip
        assert r.status_code == 200, r.text
        q = model.encode_items(["<image>find"], [[uri]], is_query=True)[0]
        d = model.encode_items(["plain words", "<image>x"], [[], [str(tmp_path / "remote.png")]])
        got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
        np.testing.assert_allclose([got[0], got[1]], d @ q, atol=ATOL)
        for image, words in (("/etc/hostname", "data URIs or http(s) URLs"),
                             ("data:image/png;base64," + base64.b64encode(b"not a png").decode(), "not an image"),
                             (f"{url}.missing", "cannot read")):  # fmt: skip
            r = httpx.post(f"{server.url}/v1/embeddings", json={"input": [{"image": image}]}, timeout=60)
            assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
    finally:
        server.stop()
        httpd.shutdown()


def test_ms_swift_max_pixels_env_bounds_the_image_tokens_unless_the_flag_is_given(
    qwen2_vl, image_rows, tmp_path, monkeypatch, capsys
):
    """`MAX_PIXELS` (ms-swift's env var) is `--max-pixels`'s default: the saved processor resizes to it; an
    explicit flag wins (and the log says the env var was ignored)."""
    from embedtune.steps import train

    rgb(3, 280, 280).save(tmp_path / "big.png")  # 100 merged 28-pixel patches before any bound
    big = probe(str(tmp_path / "big.png"))
    monkeypatch.setenv("MAX_PIXELS", str(16 * 28 * 28))
    train.run(train_cfg(qwen2_vl, image_rows, tmp_path / "env", max_steps=1))
    assert "max_pixels = 12544 (env MAX_PIXELS)" in capsys.readouterr().err
    assert Embedder.from_pretrained(tmp_path / "env").image_tokens(big) <= 16
    train.run(train_cfg(qwen2_vl, image_rows, tmp_path / "flag", max_steps=1, max_pixels=36 * 28 * 28))
    assert "(flag, env MAX_PIXELS ignored)" in capsys.readouterr().err
    assert 16 < Embedder.from_pretrained(tmp_path / "flag").image_tokens(big) <= 36
