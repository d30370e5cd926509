"""embedtune convert: shapes, validation, atomic outputs, statistics, and the CLI (local files only)."""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedtune import readers
from embedtune.config import ConvertConfig
from embedtune.data import canonical, check_row, read_rows
from embedtune.errors import DataError, EmbedtuneError
from embedtune.io import read_jsonl as rows_of
from embedtune.io import write_jsonl
from embedtune.steps import convert
from embedtune.steps.convert import SHAPES, LengthHistogram, run

EMBEDTUNE = Path(sys.executable).parent / "embedtune"


def outputs_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_convert_mteb_makes_one_row_per_positive(fixtures_dir, tmp_path):
    src = fixtures_dir / "mteb_rerank.jsonl"
    result = run(ConvertConfig(source=str(src), output=str(tmp_path / "out.jsonl")))
    inputs = rows_of(src)
    out = rows_of(tmp_path / "out.jsonl")
    expected = [
        {
            "query": r["query"],
            "response": p,
            **({"rejected_response": r["negative"]} if r["negative"] else {}),
        }
        for r in inputs
        for p in r["positive"]
    ]
    assert out == expected
    assert result["rows"] == sum(len(r["positive"]) for r in inputs) == 6
    assert result["input_rows"] == 4
    assert result["files"] == [{"name": str(src), "format": "mteb", "input_rows": 4}]


def test_convert_fast_path_writes_what_the_reference_shapes_write(fixtures_dir, tmp_path):
    # The hot loops for mteb/canonical must produce exactly the bytes of the per-row reference functions.
    cfg = ConvertConfig(source=str(fixtures_dir / "mteb_rerank.jsonl"), output=str(tmp_path / "mteb.jsonl"))
    run(cfg)
    reference = b"".join(
        orjson.dumps(canonical(r)) + b"\n" for row in rows_of(cfg.source) for r in SHAPES["mteb"](row, cfg)[0]
    )
    assert (tmp_path / "mteb.jsonl").read_bytes() == reference

    rows = [
        {"query": "q1", "response": "r1", "rejected_response": ["n1", "n2"], "label": 1, "extra": "dropped"},
        {"label": 0, "response": "r2", "query": "q2", "rejected_response": []},
        {"query": "q3", "response": "r3", "label": 0.25},
    ]
    cfg = ConvertConfig(
        source=str(write_jsonl(tmp_path / "c.jsonl", rows)), output=str(tmp_path / "c.out.jsonl")
    )
    run(cfg)
    assert (tmp_path / "c.out.jsonl").read_bytes() == b"".join(
        orjson.dumps(canonical(r)) + b"\n" for r in rows
    )
    assert rows_of(tmp_path / "c.out.jsonl")[1] == {"query": "q2", "response": "r2", "label": 0}


def test_convert_reports_line_of_bad_json(fixtures_dir, tmp_path):
    src = fixtures_dir / "malformed.jsonl"
    with pytest.raises(DataError) as err:
        run(ConvertConfig(source=str(src), output=str(tmp_path / "out.jsonl")))
    msg = str(err.value)
    assert f"{src}:3: invalid JSON" in msg
    assert f"{src}:5: response: empty string" in msg  # line 4 is blank and allowed
    assert f"{src}:6: rejected_response[1]: must be a string, got int 3" in msg
    assert msg.startswith("3 problems")


def test_convert_leaves_no_output_on_failure(fixtures_dir, tmp_path):
    out = tmp_path / "out.jsonl"
    with pytest.raises(DataError):
        run(ConvertConfig(source=str(fixtures_dir / "malformed.jsonl"), output=str(out)))
    assert outputs_in(tmp_path) == []  # no output, no stats, no temp file
    # an earlier good output stays as it was
    out.write_text("previous\n")
    with pytest.raises(DataError):
        run(ConvertConfig(source=str(fixtures_dir / "malformed.jsonl"), output=str(out)))
    assert outputs_in(tmp_path) == ["out.jsonl"] and out.read_text() == "previous\n"


def test_convert_skip_writes_rejected_file(fixtures_dir, tmp_path):
    src = fixtures_dir / "malformed.jsonl"
    result = run(ConvertConfig(source=str(src), output=str(tmp_path / "out.jsonl"), on_error="skip"))
    assert [r["query"] for r in rows_of(tmp_path / "out.jsonl")] == [
        "what is a cat",
        "what is a dog",
        "what is a river",
    ]
    rejected = rows_of(tmp_path / "out.jsonl.rejected.jsonl")
    assert [r["location"] for r in rejected] == [f"{src}:3", f"{src}:5", f"{src}:6"]
    assert rejected[0]["row"] == '{"query": "what is a bird", "response": }'  # raw text of a bad JSON line
    assert rejected[1]["problems"] == ["response: empty string"]
    assert rejected[2]["row"]["query"] == "what is a tree"
    assert (result["rows"], result["rejected_rows"], result["input_rows"]) == (3, 3, 6)
    assert result["rejected_path"] == str(tmp_path / "out.jsonl.rejected.jsonl")
    # a later clean fail-mode run removes the stale rejected file
    run(ConvertConfig(source=str(fixtures_dir / "mteb_rerank.jsonl"), output=str(tmp_path / "out.jsonl")))
    assert outputs_in(tmp_path) == ["out.jsonl", "out.jsonl.stats.json"]


def test_convert_stops_after_max_errors(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text("".join(f'{{"query": "q{i}", "response": ""}}\n' for i in range(50)))
    with pytest.raises(DataError) as err:
        run(ConvertConfig(source=str(src), output=str(tmp_path / "o.jsonl"), max_errors=5))
    lines = str(err.value).splitlines()
    assert (
        "stopped" in lines[0] and len(lines) == 6 and lines[-1].strip() == f"{src}:5: response: empty string"
    )


def test_convert_sts_label_is_score_over_scale(fixtures_dir, tmp_path):
    result = run(ConvertConfig(source=str(fixtures_dir / "sts.csv"), output=str(tmp_path / "o.jsonl")))
    out = rows_of(tmp_path / "o.jsonl")
    assert [r["label"] for r in out] == [1.0, 3.8 / 5, 3.75 / 5, 0.6 / 5, 2.6 / 5, 3.7 / 5]
    assert out[2] == {
        "query": "A woman, smiling, slices a tomato.",
        "response": "A woman is cutting a tomato.",
        "label": 0.75,
    }
    assert result["files"][0]["format"] == "sts" and result["labelled_rows"] == 6
    assert result["label"]["min"] == pytest.approx(0.12) and result["label"]["max"] == 1.0


def test_convert_sts_positive_keeps_high_scores(fixtures_dir, tmp_path):
    cfg = ConvertConfig(
        source=str(fixtures_dir / "sts.csv"), output=str(tmp_path / "o.jsonl"), sts_positive_threshold=0.75
    )
    result = run(cfg)
    out = rows_of(tmp_path / "o.jsonl")
    # scores 5.0, 3.8, 3.75 -> labels 1.0, 0.76, 0.75 are kept (>= 0.75); 3.7 -> 0.74 is not
    assert [r["query"] for r in out] == [
        "A plane is taking off.",
        "A man is playing a large flute.",
        "A woman, smiling, slices a tomato.",
    ]
    assert all("label" not in r for r in out)  # infonce positives, like ms-swift's stsb:positive
    assert (result["rows"], result["filtered_rows"], result["rejected_rows"]) == (3, 3, 0)


def test_convert_sts_warns_when_scores_look_normalized(tmp_path):
    src = tmp_path / "sts01.jsonl"
    write_jsonl(
        src,
        [
            {"sentence1": "a", "sentence2": "b", "score": 0.9},
            {"sentence1": "c", "sentence2": "d", "score": 0.1},
        ],
    )
    result = run(ConvertConfig(source=str(src), output=str(tmp_path / "o.jsonl")))
    assert any("--score-scale 1" in w for w in result["warnings"])
    result = run(ConvertConfig(source=str(src), output=str(tmp_path / "o.jsonl"), score_scale=1.0))
    assert result["warnings"] == [] and result["label"]["max"] == 0.9
    write_jsonl(src, [{"sentence1": "a", "sentence2": "b", "score": 7}])
    with pytest.raises(DataError, match=r"score: 7 is outside \[-5, 5\] \(label = score / score_scale 5\)"):
        run(ConvertConfig(source=str(src), output=str(tmp_path / "o.jsonl")))


def test_convert_pairs_tsv_makes_query_response_rejected(fixtures_dir, tmp_path):
    run(ConvertConfig(source=str(fixtures_dir / "pairs.tsv"), output=str(tmp_path / "o.jsonl")))
    assert rows_of(tmp_path / "o.jsonl")[1] == {
        "query": "Children smiling and waving at camera",
        "response": "There are children present",
        "rejected_response": ["The kids are frowning"],
    }
    src = write_jsonl(
        tmp_path / "numbered.jsonl",
        [{"anchor": "a", "positive": "p", "negative_2": "n2", "negative_1": "n1", "negative_10": "n10"}],
    )
    run(ConvertConfig(source=str(src), output=str(tmp_path / "o.jsonl")))
    assert rows_of(tmp_path / "o.jsonl") == [
        {"query": "a", "response": "p", "rejected_response": ["n1", "n2", "n10"]}
    ]


def test_convert_reports_row_without_positive(fixtures_dir, tmp_path):
    src = fixtures_dir / "mteb_no_positive.jsonl"
    with pytest.raises(DataError) as err:
        run(ConvertConfig(source=str(src), output=str(tmp_path / "o.jsonl")))
    assert str(err.value).startswith(f"{src}:3: positive: no positive")
    assert "\n" not in str(err.value)  # a single problem is a single line
    result = run(ConvertConfig(source=str(src), output=str(tmp_path / "o.jsonl"), on_error="skip"))
    assert (result["rows"], result["rejected_rows"]) == (3, 1)
    assert rows_of(tmp_path / "o.jsonl.rejected.jsonl")[0]["row"]["query"] == "a query nobody answered"


@pytest.mark.parametrize(
    ("loss_type", "bad_lines"),
    [
        ("", []),
        ("infonce", []),
        ("cosine_similarity", []),
        ("contrastive", [3, 4]),
        ("online_contrastive", [3, 4]),
        ("pointwise_reranker", [4]),
    ],
)
def test_convert_checks_labels_for_loss_type(fixtures_dir, tmp_path, loss_type, bad_lines):
    src = fixtures_dir / "canonical_labels.jsonl"
    cfg = ConvertConfig(
        source=str(src), output=str(tmp_path / "o.jsonl"), loss_type=loss_type, on_error="skip"
    )
    result = run(cfg)
    assert [r["location"] for r in rows_of(tmp_path / "o.jsonl.rejected.jsonl")] == [
        f"{src}:{n}" for n in bad_lines
    ]
    assert result["rows"] == 4 - len(bad_lines)


def test_convert_requires_labels_when_the_loss_needs_them(tmp_path):
    src = write_jsonl(
        tmp_path / "c.jsonl", [{"query": "q", "response": "r"}, {"query": "q", "response": "r", "label": 1.5}]
    )
    with pytest.raises(DataError) as err:
        run(ConvertConfig(source=str(src), output=str(tmp_path / "o.jsonl"), loss_type="cosine_similarity"))
    assert f"{src}:1: label: missing (loss_type cosine_similarity needs a label" in str(err.value)
    assert f"{src}:2: label: must be in [-1, 1] for loss_type cosine_similarity, got 1.5" in str(err.value)
    assert check_row({"query": "q", "response": "r", "label": True}) == [
        "label: must be a number, got bool True"
    ]


def test_convert_fingerprint_is_stable(fixtures_dir, tmp_path):
    rows = rows_of(fixtures_dir / "mteb_rerank.jsonl")
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "a.jsonl", rows)
    (tmp_path / "in" / "b.json").write_text(json.dumps(rows, indent=2, ensure_ascii=False))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in" / "c.parquet", row_group_size=2)
    with gzip.open(tmp_path / "in" / "d.jsonl.gz", "wb") as f:
        f.write((tmp_path / "in" / "a.jsonl").read_bytes())
    prints = set()
    for name in ("a.jsonl", "b.json", "c.parquet", "d.jsonl.gz"):
        out = tmp_path / f"{name}.out.jsonl"
        for _ in range(2):
            result = run(ConvertConfig(source=str(tmp_path / "in" / name), output=str(out)))
            assert result["fingerprint"] == "sha256:" + hashlib.sha256(out.read_bytes()).hexdigest()
            prints.add(result["fingerprint"])
    assert len(prints) == 1  # same canonical content from four file types, twice each
    rows[1]["negative"][0] += "!"
    write_jsonl(tmp_path / "changed.jsonl", rows)
    changed = run(
        ConvertConfig(source=str(tmp_path / "changed.jsonl"), output=str(tmp_path / "changed.out.jsonl"))
    )
    assert changed["fingerprint"] not in prints


def test_convert_folder_reads_every_file_in_path_order(fixtures_dir, tmp_path):
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.jsonl").write_bytes((fixtures_dir / "mteb_rerank.jsonl").read_bytes())
    (folder / "sub" / "a.csv").write_bytes((fixtures_dir / "sts.csv").read_bytes())
    (folder / "notes.txt").write_text("ignored")
    (folder / ".hidden.jsonl").write_text("not json")
    (folder / "old.jsonl.rejected.jsonl").write_text('{"location": "x", "problems": [], "row": 1}\n')
    result = run(ConvertConfig(source=str(folder), output=str(folder / "out.jsonl")))
    assert [(Path(f["name"]).name, f["format"]) for f in result["files"]] == [
        ("b.jsonl", "mteb"),
        ("a.csv", "sts"),
    ]
    assert result["rows"] == 6 + 6
    # running again does not read its own output
    assert run(ConvertConfig(source=str(folder), output=str(folder / "out.jsonl")))["rows"] == 12


def test_convert_json_list_reports_line_of_bad_item(tmp_path):
    src = tmp_path / "rows.json"
    src.write_text(
        '[\n  {"query": "a", "response": "b"},\n  {"query": "c", "response": "d"},\n  {"query": "e", "response": ]\n]\n'
    )
    with pytest.raises(DataError, match=rf"{src}:4: invalid JSON"):
        run(ConvertConfig(source=str(src), output=str(tmp_path / "o.jsonl")))
    src.write_text('[{"query": "a", "response": "b"},\n {"query": "c", "response": ""}]')
    with pytest.raises(DataError, match=rf"^{src}:2: response: empty string"):
        run(ConvertConfig(source=str(src), output=str(tmp_path / "o.jsonl")))


def test_convert_json_list_streams_across_buffer_boundaries(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "BATCH_BYTES", 64)  # forces objects to straddle reads
    monkeypatch.setattr(readers, "BATCH_ROWS", 3)
    rows = [{"query": f"query {i} " + "x" * (i * 7), "response": f"doc {i}\n"} for i in range(40)]
    (tmp_path / "rows.json").write_text(json.dumps(rows, indent=1))
    run(ConvertConfig(source=str(tmp_path / "rows.json"), output=str(tmp_path / "o.jsonl")))
    assert rows_of(tmp_path / "o.jsonl") == rows


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("missing.jsonl", "missing.jsonl: file not found"),
        ("./nope", "./nope: file not found"),
    ],
)
def test_convert_missing_source_is_a_clear_error(tmp_path, monkeypatch, source, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(EmbedtuneError, match=f"^{message}$"):
        run(ConvertConfig(source=source, output="o.jsonl"))


def test_convert_refuses_unknown_shapes_and_options(tmp_path):
    src = write_jsonl(tmp_path / "x.jsonl", [{"title": "a", "body": "b"}])
    with pytest.raises(
        EmbedtuneError, match=r"x.jsonl:1: cannot tell the input shape from the keys \['body', 'title'\]"
    ):
        run(ConvertConfig(source=str(src), output=str(tmp_path / "o.jsonl")))
    for bad in ({"format": "xml"}, {"on_error": "ignore"}, {"loss_type": "triplet"}, {"score_scale": 0.0}):
        with pytest.raises(EmbedtuneError, match=f"^{next(iter(bad))}: "):
            run(ConvertConfig(source=str(src), output=str(tmp_path / "o.jsonl"), **bad))
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(EmbedtuneError, match="unsupported file type .xml"):
        run(ConvertConfig(source=str(tmp_path / "x.xml"), output=str(tmp_path / "o.jsonl")))
    assert outputs_in(tmp_path) == ["x.jsonl", "x.xml"]


def test_convert_bad_utf8_and_broken_gzip_are_data_errors(tmp_path):
    (tmp_path / "a.csv").write_bytes(b"sentence1,sentence2,score\ncaf\xe9,b,1\n")
    with pytest.raises(DataError, match="a.csv: not UTF-8 text"):
        run(ConvertConfig(source=str(tmp_path / "a.csv"), output=str(tmp_path / "o.jsonl")))
    (tmp_path / "b.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="b.jsonl.gz: cannot read"):
        run(ConvertConfig(source=str(tmp_path / "b.jsonl.gz"), output=str(tmp_path / "o.jsonl")))


def test_convert_stats_describe_the_output(fixtures_dir, tmp_path):
    result = run(
        ConvertConfig(source=str(fixtures_dir / "mteb_rerank.jsonl"), output=str(tmp_path / "o.jsonl"))
    )
    out = rows_of(tmp_path / "o.jsonl")
    saved = orjson.loads((tmp_path / "o.jsonl.stats.json").read_bytes())
    assert saved == {
        k: v for k, v in result.items() if k not in ("output", "stats_path", "rejected_path", "seconds")
    }
    assert (
        saved["distinct_queries"] == len({r["query"] for r in out}) == 4 and saved["distinct_queries_exact"]
    )
    negs = [len(r.get("rejected_response", [])) for r in out]
    assert saved["negatives_per_row"] == {
        "min": min(negs),
        "mean": round(sum(negs) / len(negs), 4),
        "max": max(negs),
    }
    assert saved["labelled_rows"] == 0 and saved["label"] is None
    qlens = [len(r["query"]) for r in out]
    assert saved["text_chars"]["query"]["max"] == max(qlens)
    assert saved["text_chars"]["query"]["p50"] == int(np.percentile(qlens, 50, method="inverted_cdf"))


def test_length_histogram_is_exact_below_4096_and_within_1_percent_above():
    rng = np.random.default_rng(0)
    hist = LengthHistogram()
    small = rng.integers(0, 4096, 5000).tolist()
    hist.add(small[:2000])
    hist.add(small[2000:])
    s = hist.summary()
    for q in (50, 90, 99):
        assert s[f"p{q}"] == int(np.percentile(small, q, method="inverted_cdf"))
    big = rng.integers(4096, 2_000_000, 5000).tolist()
    hist = LengthHistogram()
    hist.add(big)
    s = hist.summary()
    assert s["max"] == max(big)
    for q in (50, 90, 99):
        exact = np.percentile(big, q, method="inverted_cdf")
        assert abs(s[f"p{q}"] - exact) <= 0.01 * exact


def test_convert_distinct_query_count_stays_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(convert, "DISTINCT_CAP", 256)
    monkeypatch.setattr(readers, "BATCH_BYTES", 4096)
    monkeypatch.setattr(convert, "FOLD_ROWS", 100)
    n = 5000
    src = write_jsonl(
        tmp_path / "q.jsonl", ({"query": f"query number {i}", "response": "r"} for i in range(n))
    )
    seen = []
    original = convert.Converter.flush

    def spy(self, final=False):
        original(self, final)
        if final or len(self.nnegs) == 0:  # just folded
            seen.append(len(self.queries))

    monkeypatch.setattr(convert.Converter, "flush", spy)
    result = run(ConvertConfig(source=str(src), output=str(tmp_path / "o.jsonl")))
    assert max(seen) <= 256
    assert not result["distinct_queries_exact"]
    assert abs(result["distinct_queries"] - n) < 0.35 * n  # 256 kept hashes: ~10% typical error


def test_convert_reads_a_hugging_face_dataset_folder_through_datasets(tmp_path):
    pytest.importorskip("datasets")
    (tmp_path / "ds").mkdir()
    write_jsonl(tmp_path / "ds" / "train.jsonl", [{"query": "q", "positive": ["p"], "negative": ["n"]}])
    batches = list(readers.hf_batches(str(tmp_path / "ds"), "train"))  # the real streaming code path
    assert [list(n) for n, _ in batches] == [[1]] and batches[0][1][0]["positive"] == ["p"]
    with pytest.raises(EmbedtuneError, match="loading it as a Hugging Face dataset"):
        list(readers.hf_batches(str(tmp_path / "ds"), "no_such_split"))


def test_read_rows_validates_for_train(fixtures_dir, tmp_path):
    rows = read_rows(fixtures_dir / "canonical_labels.jsonl", loss_type="cosine_similarity")
    assert len(rows) == 4 and rows[0] == {
        "query": "is this a duplicate",
        "response": "is this a copy",
        "label": 1,
    }
    with pytest.raises(DataError, match="canonical_labels.jsonl:3: label: must be 0 or 1"):
        read_rows(fixtures_dir / "canonical_labels.jsonl", loss_type="contrastive")


def test_cli_convert_round_trip(fixtures_dir, tmp_path):
    out = tmp_path / "o.jsonl"
    ok = subprocess.run(
        [
            EMBEDTUNE,
            "convert",
            "--source",
            fixtures_dir / "mteb_rerank.jsonl",
            "--output",
            out,
            "--on_error",
            "skip",
        ],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["rows"] == 6 and len(rows_of(out)) == 6
    bad = subprocess.run(
        [
            EMBEDTUNE,
            "convert",
            "--source",
            fixtures_dir / "mteb_no_positive.jsonl",
            "--output",
            tmp_path / "b.jsonl",
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert bad.stderr.splitlines() == [bad.stderr.strip()]  # one line
    assert bad.stderr.startswith(
        f"embedtune convert: error: {fixtures_dir / 'mteb_no_positive.jsonl'}:3: positive:"
    )
    assert not (tmp_path / "b.jsonl").exists()
