"""Rows carry more than four fields: `teacher_scores`, `images`, `source` and `instruction` survive convert ->
split -> mine -> train's loader intact, and a malformed one is refused naming FILE:LINE: field."""

from __future__ import annotations

import pytest

from embedtune.config import ConvertConfig, MineConfig, SplitConfig, TrainConfig
from embedtune.data import OPTIONAL_FIELDS, canonical, check_row, images_by_text
from embedtune.errors import DataError
from embedtune.io import read_jsonl, write_jsonl
from embedtune.steps import convert, mine, split, train

TOPICS = ["cats", "dogs", "rivers", "mountains", "music", "cooking", "planets", "trains", "football", "trees"]


def rich_rows() -> list[dict]:
    """Text rows with every optional field but images, and one row whose texts show images."""
    rows = [
        {
            "query": f"what do you know about {t}",
            "response": f"{t} are a topic people write about",
            "rejected_response": [f"nothing here is about {TOPICS[(i + 1) % len(TOPICS)]}"],
            "label": 1,
            "teacher_scores": [0.9, 0.1],
            "source": f"set-{i % 2}",
            "instruction": "Given a question, retrieve passages that answer it",
        }
        for i, t in enumerate(TOPICS)
    ]
    rows.append(
        {
            "query": "<image> which animal is this",
            "response": "a photo of a cat <image> sitting on a sofa",
            "rejected_response": ["a photo of a dog <image>"],
            "teacher_scores": [0.8, 0.3],
            "images": ["q.png", "pos.png", "neg.png"],
            "source": "photos",
            "instruction": "",
        }
    )
    return rows


def by_query(rows) -> dict[str, dict]:
    return {r["query"]: {k: v for k, v in r.items() if k != "_line"} for r in rows}


def test_optional_fields_survive_convert_split_mine_and_the_train_loader(tmp_path, minilm_path):
    from PIL import Image

    given = rich_rows()
    for i, name in enumerate(
        ("q.png", "pos.png", "neg.png")
    ):  # convert reads each image, and writes it absolute
        Image.new("RGB", (8 + i, 8), (i * 80, 0, 0)).save(tmp_path / name)
    src = write_jsonl(tmp_path / "src.jsonl", [{**r, "unknown": 1} for r in given])  # unknown keys: dropped
    convert.run(ConvertConfig(source=str(src), output=str(tmp_path / "rows.jsonl")))
    converted = list(read_jsonl(tmp_path / "rows.jsonl"))
    given[-1] = {**given[-1], "images": [str(tmp_path / n) for n in given[-1]["images"]]}
    assert converted == [canonical(r) for r in given]
    assert all(set(OPTIONAL_FIELDS) - {"images"} <= set(r) for r in converted) and set(
        OPTIONAL_FIELDS
    ) <= set(converted[-1])
    assert converted[-1]["instruction"] == "" and images_by_text(converted[-1]) == [
        [str(tmp_path / "q.png")],
        [str(tmp_path / "pos.png")],
        [str(tmp_path / "neg.png")],
    ]

    cfg = SplitConfig(dataset=str(tmp_path / "rows.jsonl"), train_data=str(tmp_path / "train.jsonl"),
                      eval_data=str(tmp_path / "eval.jsonl"), split_dataset_ratio=0.2, seed=3)  # fmt: skip
    split.run(cfg)
    train_rows, eval_rows = list(read_jsonl(cfg.train_data)), list(read_jsonl(cfg.eval_data))
    assert by_query(train_rows + eval_rows) == by_query(converted)  # every row, every field, on one side

    # mine copies the image row as it is; text rows keep label, source and instruction, and drop the
    # teacher scores of the negatives they no longer have
    for passthrough in (True, False):
        out = tmp_path / f"mined-{passthrough}.jsonl"
        stats = mine.run(MineConfig(dataset=cfg.train_data, model=str(minilm_path), output=str(out),
                                    num_negatives=2, max_length=32, passthrough=passthrough))  # fmt: skip
        mined = by_query(read_jsonl(out))
        assert mined.keys() == by_query(train_rows).keys()
        for query, row in by_query(train_rows).items():
            if passthrough or "images" in row:
                assert mined[query] == row
            else:
                negatives = mined[query]["rejected_response"]
                assert negatives != row["rejected_response"]
                kept = {k: v for k, v in row.items() if k != "teacher_scores"}
                assert mined[query] == {**kept, "rejected_response": negatives}
        if not passthrough:
            with_images = sum("images" in r for r in train_rows)
            assert stats["rows_with_images_copied"] == with_images
            assert stats["teacher_scores_dropped"] == len(train_rows) - with_images

    loaded, _ = train.load_rows(str(tmp_path / "mined-True.jsonl"), TrainConfig(model="-", train_data="-",
                                                                              output_dir="-"))  # fmt: skip
    infos = {r["query"]: r.pop("_image_info") for r in loaded if "_image_info" in r}  # the images, read once
    assert by_query(loaded) == by_query(train_rows)
    assert [r["_line"] for r in loaded] == list(range(1, len(train_rows) + 1))
    assert [[i.ref for i in v] for v in infos.values()] == [r["images"] for r in train_rows if "images" in r]


BAD = [
    ({"teacher_scores": [0.9]}, "teacher_scores: 1 scores for 2 documents"),
    ({"teacher_scores": [0.9, "high"]}, "teacher_scores[1]: must be a number"),
    ({"teacher_scores": [0.9, float("nan")]}, "teacher_scores[1]: must be finite"),
    ({"teacher_scores": [True, 0.1]}, "teacher_scores[0]: must be a number"),
    ({"teacher_scores": []}, "teacher_scores: must be a non-empty list"),
    ({"images": ["a.png"]}, "images: 1 images for 0 <image> tags"),
    ({"query": "<image> <image> what", "images": ["a.png"]}, "images: 1 images for 2 <image> tags"),
    ({"query": "<image> what", "images": [""]}, "images[0]: empty string"),
    ({"query": "<image> what", "images": "a.png"}, "images: must be a list of strings"),
    ({"source": " "}, "source: blank"),
    ({"source": 3}, "source: must be a string"),
    ({"instruction": ["Instruct:"]}, "instruction: must be a string"),
]


@pytest.mark.parametrize("change,problem", BAD, ids=[p.split(":")[0] for _, p in BAD])
def test_a_malformed_optional_field_is_refused_naming_file_line_and_field(tmp_path, change, problem):
    good = {"query": "what", "response": "this", "rejected_response": ["that"]}
    assert check_row(good) == [] and any(problem in p for p in check_row({**good, **change}))
    if any(v != v for v in change.get("teacher_scores") or [] if isinstance(v, float)):
        return  # NaN: a JSON file cannot hold it (the readers refuse the line as invalid JSON)
    path = write_jsonl(tmp_path / "rows.jsonl", [good, {**good, **change}])
    where = f"{path}:2: {problem}"
    with pytest.raises(DataError) as err:
        convert.run(ConvertConfig(source=str(path), output=str(tmp_path / "out.jsonl")))
    assert where in str(err.value) and not (tmp_path / "out.jsonl").exists()
    with pytest.raises(DataError) as err:
        split.run(
            SplitConfig(
                dataset=str(path), train_data=str(tmp_path / "t.jsonl"), eval_data=str(tmp_path / "e.jsonl")
            )
        )
    assert where in str(err.value) and not (tmp_path / "t.jsonl").exists()
    with pytest.raises(DataError) as err:
        train.load_rows(str(path), TrainConfig(model="-", train_data="-", output_dir="-"))
    assert where in str(err.value)
    with pytest.raises(DataError) as err:
        mine.run(MineConfig(dataset=str(path), model="-", output=str(tmp_path / "m.jsonl")))
    assert where in str(err.value) and not (tmp_path / "m.jsonl").exists()
