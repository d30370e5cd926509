"""Hostile input: blank texts are refused by every reader of rows, and convert / split survive anything.

Blank = only whitespace and invisible characters (`data.is_blank`). The fuzz tests (hypothesis, bounded example
counts; `bench/fuzz.py` runs the same properties longer) feed convert and split random JSON values, random
bytes, random row shapes, deep nesting and 50 MB lines, and check the contract of both steps: exit 0 with valid
canonical rows (with `--on-error skip`, written + rejected = read, and the written rows are exactly the valid
input rows, as an oracle written here from the spec says) or exit 2 with one `embedtune <step>: error:` line
naming the file; never a traceback, never a partial or temporary file left behind.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import math
import os
import tempfile
import unicodedata
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from embedtune.cli import main as cli
from embedtune.config import EvaluateConfig, SplitConfig, TrainConfig
from embedtune.data import BLANK_CATEGORIES, check_row, is_blank, read_rows
from embedtune.errors import DataError
from embedtune.io import read_jsonl, write_jsonl
from embedtune.steps import evaluate, split, train

# Texts that show nothing: spaces, no-break / ideographic / thin spaces, zero-width space and joiners, BOM,
# soft hyphen, direction marks, line / paragraph separators, controls.
BLANKS = ["   ", "\u00a0", "\u200b", "\u3000", "\ufeff", "\t\n", "\u00a0\u200b\u3000 ", "\u00ad", "\u2028",
          "\u200e\u200f", "\x00", "\u2009\u200a", "\u180e", "\U000e0020"]  # fmt: skip
# Texts that show something, kept byte for byte (invisible characters around or inside visible ones).
VISIBLE = [" leading space", "trailing\u200b", "\u200bword", "a\tb\nc", "\u00a0x\u00a0", "é", "你好", "😀",
           "\u0301", "\ue000"]  # fmt: skip
# Examples per fuzz test: bounded so `make test` stays fast; `bench/fuzz.py` raises it for a long run.
FUZZ = settings(
    max_examples=int(os.environ.get("EMBEDTUNE_FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=list(HealthCheck),
)


def spec_blank(text: str) -> bool:
    """The rule, straight from its definition (the library's `is_blank` is the fast version)."""
    return all(unicodedata.category(c) in BLANK_CATEGORIES for c in text)


def run_cli(*argv: str) -> tuple[int, str, str]:
    """`embedtune ARGV` in this process: (exit status, stdout, stderr). An unexpected exception propagates,
    so a traceback fails the test."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli(list(argv))
    return rc, out.getvalue(), err.getvalue()


def assert_one_error_line(step: str, stderr: str, name: str) -> None:
    lines = [line for line in stderr.splitlines() if line.startswith(f"embedtune {step}: error:")]
    assert lines, stderr[-2000:]
    assert name in stderr and "Traceback" not in stderr


def leftovers(folder: Path, inputs: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in inputs)


# ------------------------------------------------------------------------------------------- blank texts
@pytest.mark.parametrize("text", BLANKS)
def test_is_blank_is_true_for_whitespace_and_invisible_characters(text):
    assert is_blank(text) and spec_blank(text)


@pytest.mark.parametrize("text", VISIBLE)
def test_is_blank_is_false_when_a_character_shows(text):
    assert not is_blank(text) and not spec_blank(text)


@given(st.text(alphabet=st.sampled_from([*"\u00a0\u200b\u3000\ufeff \t\n\x00\u2028\u00ad", *"ab😀\u0301"])))
@settings(max_examples=300, deadline=None)
def test_is_blank_follows_the_unicode_categories(text):
    assert is_blank(text) == spec_blank(text)


@given(st.text())
@settings(max_examples=300, deadline=None)
def test_is_blank_follows_the_unicode_categories_for_any_text(text):
    assert is_blank(text) == spec_blank(text)


@pytest.mark.parametrize("shape", ["mteb", "canonical"])
def test_convert_refuses_blank_texts_on_its_fast_path_naming_file_line_and_field(shape, tmp_path):
    src = tmp_path / "in.jsonl"
    if shape == "mteb":
        rows = [{"query": "q", "positive": ["p"], "negative": ["n"]}]
        rows += [{"query": b, "positive": ["p"], "negative": []} for b in BLANKS]
        rows += [{"query": "q", "positive": [b], "negative": []} for b in BLANKS]
        rows += [{"query": "q", "positive": ["p"], "negative": ["n", b]} for b in BLANKS]
        fields = ["query", "positive[0]", "negative[1]"]
    else:
        rows = [{"query": "q", "response": "r"}]
        rows += [{"query": b, "response": "r"} for b in BLANKS]
        rows += [{"query": "q", "response": b} for b in BLANKS]
        rows += [{"query": "q", "response": "r", "rejected_response": ["n", b]} for b in BLANKS]
        fields = ["query", "response", "rejected_response[1]"]
    write_jsonl(src, rows)
    out = tmp_path / "out.jsonl"
    rc, _, err = run_cli("convert", "--source", str(src), "--output", str(out), "--max-errors", "100")
    assert rc == 2 and not out.exists()
    n = len(BLANKS)
    for i, field in enumerate(fields):
        for j in range(n):
            assert f"{src}:{2 + i * n + j}: {field}: blank" in err, (field, BLANKS[j])
    rc, _, _ = run_cli("convert", "--source", str(src), "--output", str(out), "--on-error", "skip")
    assert rc == 0 and len(read_jsonl(out)) == 1
    assert len(read_jsonl(f"{out}.rejected.jsonl")) == 3 * n


def test_convert_keeps_texts_with_a_visible_character_byte_for_byte(tmp_path):
    src = tmp_path / "in.jsonl"
    rows = [{"query": v, "response": v, "rejected_response": [v]} for v in VISIBLE]
    write_jsonl(src, rows)
    rc, _, _ = run_cli("convert", "--source", str(src), "--output", str(tmp_path / "out.jsonl"))
    assert rc == 0 and read_jsonl(tmp_path / "out.jsonl") == rows


def test_split_train_evaluate_and_the_row_reader_refuse_a_blank_query_naming_the_line(tmp_path):
    rows = [{"query": f"q{i}", "response": f"r{i}", "rejected_response": [f"n{i}"]} for i in range(6)]
    rows[3]["query"] = "\u00a0\u200b\u3000"
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    want = f"{data}:4: query: blank"

    rc, _, err = run_cli("split", "--dataset", str(data), "--train-data", str(tmp_path / "t.jsonl"),
                         "--eval-data", str(tmp_path / "e.jsonl"), "--split-dataset-ratio", "0.3")  # fmt: skip
    assert rc == 2 and want in err and not (tmp_path / "t.jsonl").exists()
    with pytest.raises(DataError, match=want):
        split.run(SplitConfig(str(data), str(tmp_path / "t.jsonl"), str(tmp_path / "e.jsonl"), 0.3))
    with pytest.raises(DataError, match=want):  # before any model is loaded: the model does not exist
        train.run(
            TrainConfig(model=str(tmp_path / "none"), train_data=str(data), output_dir=str(tmp_path / "o"))
        )
    with pytest.raises(DataError, match=want):
        evaluate.run(
            EvaluateConfig(model=str(tmp_path / "none"), eval_data=str(data), output=str(tmp_path / "m"))
        )
    with pytest.raises(DataError, match=want):  # every reader of canonical rows (mine too) goes through here
        read_rows(data)
    for blank in BLANKS:
        assert check_row({"query": "q", "response": blank}) == [
            f"response: blank (only whitespace or invisible characters: {blank!r})"
        ]


# ---------------------------------------------------------------------------------------- fuzz: convert
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(BLANKS + VISIBLE)
)
json_values = st.recursive(
    json_scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12,
)
texts = st.sampled_from(BLANKS + VISIBLE + ["", "q", "a doc"]) | st.text(max_size=10)
maybe_text = texts | json_scalars


def row_of(keys: list[str]):
    """A dict with some of `keys` holding plausible or odd values: the shapes convert detects, half-broken."""
    value = {
        "label": st.none() | st.integers(-3, 3) | st.floats(allow_nan=True) | st.booleans() | texts,
        "score": st.none() | st.floats(-10, 10) | st.integers(-10, 10) | texts,
    }
    strategies = {k: value.get(k, maybe_text | st.lists(maybe_text, max_size=3) | json_values) for k in keys}
    return st.fixed_dictionaries({}, optional=strategies)


shaped_rows = st.one_of(
    row_of(["query", "response", "rejected_response", "label", "extra"]),
    row_of(["query", "positive", "negative"]),
    row_of(["sentence1", "sentence2", "score", "label"]),
    row_of(["anchor", "positive", "negative", "negative_1", "negative_2"]),
)
lines = st.one_of(
    shaped_rows.map(lambda r: json.dumps(r, allow_nan=True).encode()),
    json_values.map(lambda v: json.dumps(v, allow_nan=True).encode()),
    st.binary(max_size=40),
    st.sampled_from([b"", b"   ", b"[" * 3000, b'{"query": ' * 600, b"\xff\xfe", b"\xef\xbb\xbf{}"]),
)


def spec_canonical(row) -> dict | None:
    """The canonical row a valid input row becomes (loss_type ""), from the README's rules; None if invalid."""

    def text_ok(t):
        if not isinstance(t, str) or spec_blank(t):
            return False
        try:
            t.encode("utf-8")  # a lone surrogate cannot be written
        except UnicodeEncodeError:
            return False
        return True

    if not isinstance(row, dict) or not text_ok(row.get("query")) or not text_ok(row.get("response")):
        return None
    negs, label = row.get("rejected_response"), row.get("label")
    if negs is not None and not (isinstance(negs, list) and all(map(text_ok, negs))):
        return None
    if label is not None and (
        isinstance(label, bool) or not isinstance(label, (int, float)) or not math.isfinite(label)
    ):
        return None
    out = {"query": row["query"], "response": row["response"]}
    if negs:
        out["rejected_response"] = negs
    if label is not None:
        out["label"] = label
    return out


def parse(line: bytes):
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        return ValueError


@given(st.lists(lines, min_size=1, max_size=12), st.sampled_from(["skip", "fail"]))
@FUZZ
def test_convert_fuzz_canonical_lines_write_exactly_the_valid_rows_or_exit_2(raw_lines, on_error):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "in.jsonl"
        src.write_bytes(b"\n".join(raw_lines) + b"\n")
        out = tmp / "out.jsonl"
        rc, stdout, err = run_cli("convert", "--source", str(src), "--output", str(out), "--format",
                                  "canonical", "--on-error", on_error)  # fmt: skip
        numbered = [(i, line) for i, line in enumerate(src.read_bytes().split(b"\n")[:-1], 1)]
        read = [(i, parse(line)) for i, line in numbered if parse(line) is not ValueError or line.strip()]
        good = [(i, spec_canonical(row)) for i, row in read if row is not ValueError]
        good = [(i, row) for i, row in good if row is not None]
        bad = sorted({i for i, _ in read} - {i for i, _ in good})
        if rc == 0:
            assert (not bad or on_error == "skip") and good
            assert [orjson.loads(x) for x in out.read_bytes().splitlines()] == [row for _, row in good]
            stats = json.loads(stdout)
            assert stats["input_rows"] == len(read)  # every line read is accounted for
            assert stats["rows"] + stats["rejected_rows"] == stats["input_rows"]
            if on_error == "skip":
                rejected = read_jsonl(f"{out}.rejected.jsonl")
                assert [int(r["location"].rsplit(":", 1)[1]) for r in rejected] == bad
            expected = {"in.jsonl", "out.jsonl", "out.jsonl.stats.json"} | (
                {"out.jsonl.rejected.jsonl"} if on_error == "skip" else set()
            )
            assert leftovers(tmp, set()) == sorted(expected)
        else:
            assert rc == 2 and (bad or not good), err
            assert_one_error_line("convert", err, str(src))
            if good and bad:  # a bad row is reported at its line
                assert f"{src}:{bad[0]}: " in err
            assert leftovers(tmp, {"in.jsonl"}) == []


@given(st.lists(row_of(["query", "positive", "negative"]), min_size=1, max_size=10))
@FUZZ
def test_convert_fuzz_mteb_rows_fast_loop_matches_the_spec(rows):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "in.jsonl"
        first = {"query": "q", "positive": ["p"], "negative": []}
        src.write_text("".join(json.dumps(r) + "\n" for r in [first, *rows]))  # NaN, 2**70: bad lines
        out = tmp / "out.jsonl"
        rc, stdout, err = run_cli("convert", "--source", str(src), "--output", str(out), "--on-error", "skip")
        assert rc == 0, err

        def spec_rows(
            row,
        ):  # one row per positive, all negatives as rejected_response; a text may stand alone
            listed = [[v] if isinstance(v, str) else v for v in (row.get("positive"), row.get("negative"))]
            pos, neg = listed[0], listed[1] if listed[1] is not None else []
            ok = [spec_canonical({"query": row.get("query"), "response": p, "rejected_response": neg})
                  for p in (pos if isinstance(pos, list) else [None])]  # fmt: skip
            return ok if pos and isinstance(neg, list) and all(ok) else None

        parsed = [parse(line) for line in src.read_bytes().splitlines()]
        expected = [None if r is ValueError else spec_rows(r) for r in parsed]
        written = [orjson.loads(x) for x in out.read_bytes().splitlines()]
        assert written == [r for rs in expected if rs for r in rs]
        stats = json.loads(stdout)
        assert stats["rejected_rows"] == sum(rs is None for rs in expected)
        assert stats["rejected_rows"] + sum(rs is not None for rs in expected) == stats["input_rows"]


SUFFIXES = [".jsonl", ".json", ".csv", ".tsv", ".jsonl.gz", ".json.gz", ".parquet"]


@given(
    st.binary(max_size=300) | lines.map(bytes), st.sampled_from(SUFFIXES), st.sampled_from(["skip", "fail"])
)
@example(b"[" + b"[" * 5000 + b"]" * 5001, ".json", "fail")
@example(b'[{"query": "q", "response": "r", "label": 1' + b"0" * 400 + b"}]", ".json", "skip")
@example(b'[{"query": "\\ud800", "response": "r"}, {"query": "q", "response": "r"}]', ".json", "skip")
@example(b'[{"query": "q", "positive": ["a\\udfffb"], "negative": []}, {"query": "q", "positive": ["p"]}]',
         ".json", "skip")  # fmt: skip
@example(b'[{"query": "a\\ud800b", "response": "r"}, {"query": "q", "response": "r"}]', ".json", "skip")
@example(b"query,response,label\nq,r,1" + b"0" * 400 + b"\nq,r,1\n", ".csv", "skip")
@example(
    b'{"anchor":"a","positive":"p","negative":false,"negative_2":"n"}', ".jsonl", "skip"
)  # found by the fuzzer
@FUZZ
def test_convert_fuzz_any_bytes_in_any_file_kind_exits_0_with_valid_rows_or_2_with_a_message(
    data, suffix, on_error
):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / f"in{suffix}"
        src.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
        out = tmp / "out.jsonl"
        rc, stdout, err = run_cli(
            "convert", "--source", str(src), "--output", str(out), "--on-error", on_error
        )
        if rc == 0:
            rows = [orjson.loads(x) for x in out.read_bytes().splitlines()]
            assert rows and all(check_row(r) == [] and list(r)[:2] == ["query", "response"] for r in rows)
            stats = json.loads(stdout)
            assert stats["rows"] == len(rows)
            if on_error == "skip":
                assert len(read_jsonl(f"{out}.rejected.jsonl")) == stats["rejected_rows"]
        else:
            assert rc == 2
            assert_one_error_line("convert", err, str(src))
            assert leftovers(tmp, {src.name}) == []


def test_convert_survives_a_50_mb_line_and_a_50_mb_blank_text(tmp_path):
    src = tmp_path / "big.jsonl"
    big = "word " * 10_000_000  # 50 MB
    with open(src, "wb") as f:
        f.write(orjson.dumps({"query": "q", "response": big}) + b"\n")
        f.write(orjson.dumps({"query": "\u200b" * 17_000_000, "response": "r"}) + b"\n")  # 51 MB of ZWSP
        f.write(b'{"query": "' + b"x" * 50_000_000 + b"\n")  # a 50 MB line cut short
        f.write(orjson.dumps({"query": "q2", "response": "r"}) + b"\n")
    out = tmp_path / "out.jsonl"
    rc, stdout, err = run_cli("convert", "--source", str(src), "--output", str(out), "--on-error", "skip")
    assert rc == 0, err
    assert [r["query"] for r in read_jsonl(out)] == ["q", "q2"]
    rejected = read_jsonl(f"{out}.rejected.jsonl")
    assert [r["location"] for r in rejected] == [f"{src}:2", f"{src}:3"]
    assert (
        rejected[0]["problems"][0].startswith("query: blank") and "invalid JSON" in rejected[1]["problems"][0]
    )


def test_split_survives_a_50_mb_line_and_deep_nesting(tmp_path):
    src = tmp_path / "rows.jsonl"
    with open(src, "wb") as f:
        for i in range(4):
            f.write(
                orjson.dumps({"query": f"q{i}", "response": "word " * (10_000_000 if i == 0 else 1)}) + b"\n"
            )
    argv = ["split", "--dataset", str(src), "--train-data", str(tmp_path / "t.jsonl"), "--eval-data",
            str(tmp_path / "e.jsonl"), "--split-dataset-ratio", "0.25"]  # fmt: skip
    rc, _, err = run_cli(*argv)
    assert rc == 0, err
    copied = (tmp_path / "t.jsonl").read_bytes() + (tmp_path / "e.jsonl").read_bytes()
    assert sorted(copied.splitlines()) == sorted(src.read_bytes().splitlines())
    with open(src, "ab") as f:
        f.write(b"[" * 100_000 + b"\n")
    rc, _, err = run_cli(*argv)
    assert rc == 2 and f"{src}:5: invalid JSON" in err
    assert leftovers(tmp_path, {"rows.jsonl", "t.jsonl", "e.jsonl"}) == []
    assert sorted(copied.splitlines()) == sorted(  # the earlier outputs are left as they were
        ((tmp_path / "t.jsonl").read_bytes() + (tmp_path / "e.jsonl").read_bytes()).splitlines()
    )


# ------------------------------------------------------------------------------------------ fuzz: split
@given(st.lists(lines | shaped_rows.map(lambda r: json.dumps(r).encode()), min_size=1, max_size=14),
       st.floats(0.01, 0.99))  # fmt: skip
@example([b'{"query": "a", "response": "r"}', b'{"query": "b", "response": "r"}'], 0.5)
@FUZZ
def test_split_fuzz_copies_every_valid_line_to_one_side_by_query_or_exits_2(raw_lines, ratio):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "rows.jsonl"
        src.write_bytes(b"\n".join(raw_lines) + b"\n")
        t, e = tmp / "train.jsonl", tmp / "eval.jsonl"
        rc, stdout, err = run_cli("split", "--dataset", str(src), "--train-data", str(t), "--eval-data", str(e),
                                  "--split-dataset-ratio", repr(ratio))  # fmt: skip
        nonblank = [line for line in src.read_bytes().split(b"\n")[:-1] if line.strip()]
        if rc == 0:
            assert all(spec_canonical(parse(line)) is not None for line in nonblank)
            train_lines, eval_lines = t.read_bytes().splitlines(), e.read_bytes().splitlines()
            assert sorted(train_lines + eval_lines) == sorted(nonblank)  # byte for byte, every line once
            queries = [{orjson.loads(x)["query"] for x in side} for side in (train_lines, eval_lines)]
            assert queries[0] and queries[1] and not queries[0] & queries[1]
            assert json.loads(stdout)["train_rows"] == len(train_lines)
        else:
            assert rc == 2
            assert_one_error_line("split", err, str(src))
            assert leftovers(tmp, {"rows.jsonl"}) == []
