"""Nothing lost, nothing half-written, no tracebacks (issue 22): every knob checked when its config is built,
outputs that are inputs refused, a step's files committed together, the user's file modes, readers and model
folders that fail in one line."""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from embedtune import cli, knobs, outputs
from embedtune.config import (
    CLI_CONFIGS,
    ConvertConfig,
    EvaluateConfig,
    MergeConfig,
    MineConfig,
    SplitConfig,
    TrainConfig,
)
from embedtune.errors import DataError, EmbedtuneError
from embedtune.io import write_jsonl
from embedtune.steps import convert, evaluate, merge, mine, split, train

EMBEDTUNE = Path(sys.executable).parent / "embedtune"
ROWS = [
    {"query": f"question {i}", "response": f"answer {i}", "rejected_response": [f"wrong {i}"]}
    for i in range(20)
]


# ------------------------------------------------------------------------------------------ every knob
def _bad_values(step: str, name: str, kind: type) -> list[str]:
    """CLI values the knob table must refuse for `step.name` (derived from its rule, so a new rule is tested)."""
    rule = knobs.rule_for(step, name)
    if kind is bool:
        return ["maybe"]
    bad = []
    if kind is int:
        bad += ["1.5", "seven"]
    if kind is float:
        bad += ["nan", "inf", "x"]
    if rule is None:
        return bad
    if rule.required:
        bad.append("")
    if rule.choices:
        bad.append("no-such-choice")
    if kind in (int, float):
        if rule.lo is not None:
            bad.append(str(rule.lo if rule.lo_open else (rule.lo - 1 if kind is int else rule.lo - 0.001)))
        if rule.hi is not None:
            bad.append(
                str(rule.hi if rule.hi_open else (int(rule.hi) + 1 if kind is int else rule.hi * 1.001 + 1))
            )
    return bad


def _required_flags(cls) -> list[str]:
    return [x for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
            for x in (f"--{f.name.replace('_', '-')}", f"/nonexistent/{f.name}")]  # fmt: skip


def _cases():
    for step, cls in CLI_CONFIGS.items():
        for f in dataclasses.fields(cls):
            for bad in _bad_values(step, f.name, knobs.field_types(cls)[f.name][0]):
                yield pytest.param(step, f.name, bad, id=f"{step}-{f.name}={bad or 'empty'}")


def test_every_field_of_every_config_has_a_rule_or_takes_any_text():
    for step, cls in CLI_CONFIGS.items():
        for f in dataclasses.fields(cls):
            kind = knobs.field_types(cls)[f.name][0]
            covered = kind is bool or knobs.rule_for(step, f.name) is not None or f.name in knobs.FREE
            assert covered, f"{step}.{f.name}: add a rule to knobs.RULES (or to FREE if any text is valid)"
            if kind in (int, float) and f.name not in knobs.FREE:
                assert knobs.rule_for(step, f.name) is not None, f"{step}.{f.name}: a number needs a range"


@pytest.mark.parametrize("step, field, bad", list(_cases()))
def test_a_bad_value_of_any_knob_is_one_line_naming_it_and_exit_2(step, field, bad, capsys):
    flag = f"--{field.replace('_', '-')}"
    argv = [step, *_required_flags(CLI_CONFIGS[step]), f"{flag}={bad}"]
    with pytest.raises(SystemExit) as stopped:  # argparse's own refusals (not an int, not a bool) exit
        raise SystemExit(cli.main(argv))
    err = capsys.readouterr().err
    assert stopped.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"embedtune {step}: error: "), err
    assert f"{field}:" in lines[0] or flag in lines[0], lines[0]
    assert "Traceback" not in err


def test_the_real_cli_refuses_like_python_before_any_work(tmp_path):
    cmd = [str(EMBEDTUNE), "train", "--model", "m", "--train-data", "t", "--output-dir", str(tmp_path / "o")]
    for extra, want in (
        (["--learning-rate=-1e-5"], "learning_rate: -1e-05 is not in (0, 1]"),
        (["--lora-rank", "0"], "lora_rank: 0 is not in [1, 2^16]"),
        (["--seed", "1" * 70], "seed: " + "1" * 70 + " is not in [0, 4294967295]"),
        (["--lr-scheduler-type", "sometimes"], "lr_scheduler_type: 'sometimes' is not one of linear |"),
        (["--optim", "adamw_magic"], "optim: 'adamw_magic' is not one of"),
        (["--max-length", "-3"], "max_length: -3 is not in [1, 2^20]"),
        (["--per-device-eval-batch-size", "0"], "per_device_eval_batch_size: 0 is not in [1, 2^30]"),
    ):
        r = subprocess.run([*cmd, *extra], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stdout == "", r.stderr
        assert r.stderr.startswith(f"embedtune train: error: {want}") and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "o").exists()
    with pytest.raises(EmbedtuneError, match=r"relative_margin: nan is not a finite number"):
        MineConfig(dataset="d", model="m", output="o", relative_margin=math.nan)
    with pytest.raises(EmbedtuneError, match=r"lora_rank: '16' is not an integer"):
        TrainConfig(model="m", train_data="t", output_dir="o", lora_rank="16")
    with pytest.raises(EmbedtuneError, match=r"use_dora: 'false' is not true or false"):
        TrainConfig(model="m", train_data="t", output_dir="o", use_dora="false")
    for cls in CLI_CONFIGS.values():  # every default is valid
        cls(**{f.name: "x" for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING})


# ------------------------------------------------------------------------------------ output != input
def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _adapter(tmp_path: Path, base: Path) -> Path:
    a = tmp_path / "adapter"
    a.mkdir(parents=True)
    (a / "adapter_config.json").write_text(f'{{"base_model_name_or_path": "{base}"}}')
    return a


def _model_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "bert"}')
    return path


def _runs(tmp_path: Path, rows: Path) -> dict:
    """case -> (run, config, the knob whose path is also an input)."""
    model = _model_folder(tmp_path / "model")
    x = str(tmp_path / "x.txt")
    t, e = str(tmp_path / "t.jsonl"), str(tmp_path / "e.jsonl")
    return {
        "convert output = source": (convert.run, ConvertConfig(source=str(rows), output=str(rows)), "output"),
        "split train = dataset": (split.run, SplitConfig(dataset=str(rows), train_data=str(rows), eval_data=e), "train_data"),
        "split eval = an exclude file": (split.run, SplitConfig(dataset=str(rows), train_data=t, eval_data=x, exclude_data=x), "eval_data"),
        "mine output = a corpus file": (mine.run, MineConfig(dataset=str(rows), model=str(model), output=x, corpus=x), "output"),
        "evaluate output = eval data": (evaluate.run, EvaluateConfig(model=str(model), eval_data=str(rows), output=str(rows)), "output"),
        "evaluate report = the model": (evaluate.run, EvaluateConfig(model=str(model), eval_data=str(rows), output=t, report=str(model)), "report"),
        "train output_dir = model": (train.run, TrainConfig(model=str(model), train_data=str(rows), output_dir=str(model)), "output_dir"),
        "train output_dir holds the model": (train.run, TrainConfig(model=str(model), train_data=str(rows), output_dir=str(tmp_path)), "output_dir"),
        "merge output = the adapter's base": (merge.run, MergeConfig(adapter=str(_adapter(tmp_path / "a", model)), output=str(model)), "output"),
    }  # fmt: skip


CASES = ["convert output = source", "split train = dataset", "split eval = an exclude file",
         "mine output = a corpus file", "evaluate output = eval data", "evaluate report = the model",
         "train output_dir = model", "train output_dir holds the model", "merge output = the adapter's base"]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("via", ["path", "symlink", "hard link"])
def test_an_output_that_is_an_input_is_refused_and_the_input_kept(case, via, tmp_path):
    rows = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    (tmp_path / "x.txt").write_text("some text\n")
    (tmp_path / "a").mkdir()
    run, cfg, out_field = _runs(tmp_path, rows)[case]
    target = Path(getattr(cfg, out_field))
    if via != "path":
        if target.is_dir() and via == "hard link":
            pytest.skip("folders have no hard links")
        other = tmp_path / f"other-{target.name}"
        (os.symlink if via == "symlink" else os.link)(target, other)
        cfg = dataclasses.replace(cfg, **{out_field: str(other)})
    before = _tree(tmp_path)
    with pytest.raises(
        EmbedtuneError, match=rf"{out_field}: .* (is|contains) the .* input .*writing it would destroy"
    ):
        run(cfg)
    assert _tree(tmp_path) == before


def test_the_cli_says_it_in_one_line(tmp_path):
    rows = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    r = subprocess.run([str(EMBEDTUNE), "split", "--dataset", str(rows), "--train-data", str(rows),
                        "--eval-data", str(tmp_path / "e.jsonl")], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2 and r.stderr == (
        f"embedtune split: error: train_data: {rows} is the dataset input ({rows}); writing it would destroy "
        "the input: choose another path\n"
    )
    assert rows.read_text().count("\n") == len(ROWS)


# -------------------------------------------------------------------------------------------- output sets
def _fail_rename(monkeypatch, nth: int):
    """Make the nth rename of a commit fail (as a full or vanished disk would), every other one real."""
    calls = {"n": 0}
    real = os.replace

    def rename(src, dst):
        calls["n"] += 1
        if calls["n"] == nth:
            raise OSError(5, "Input/output error (injected)")
        real(src, dst)

    monkeypatch.setattr(outputs, "_rename", rename)
    return calls


def _visible(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _step_runs(tmp_path: Path, model: Path | None) -> dict:
    """name -> (run, a first config, a second one with other data): steps whose result is several files."""
    rows = write_jsonl(tmp_path / "in" / "rows.jsonl", ROWS)
    other = write_jsonl(tmp_path / "in" / "other.jsonl", [{**r, "query": r["query"] + "?"} for r in ROWS])
    out = tmp_path / "out"
    both = (rows, other)
    return {
        "split": (split.run, [SplitConfig(dataset=str(d), train_data=str(out / "t.jsonl"), eval_data=str(out / "e.jsonl"), split_dataset_ratio=0.3) for d in both]),
        "convert": (convert.run, [ConvertConfig(source=str(d), output=str(out / "c.jsonl")) for d in both]),
        "convert skip": (convert.run, [ConvertConfig(source=str(d), output=str(out / "c.jsonl"), on_error="skip") for d in both]),
        "mine passthrough": (mine.run, [MineConfig(dataset=str(d), model="unused", output=str(out / "m.jsonl"), passthrough=True) for d in both]),
        "evaluate": (evaluate.run, [EvaluateConfig(model=str(model), eval_data=str(d), output=str(out / "m.json")) for d in both]),
    }  # fmt: skip


@pytest.mark.parametrize("name", ["split", "convert", "convert skip", "mine passthrough", "evaluate"])
def test_a_failure_between_the_renames_of_a_result_leaves_the_earlier_set(
    name, tmp_path, monkeypatch, request
):
    model = request.getfixturevalue("minilm_path") if name == "evaluate" else None
    run, (first, second) = _step_runs(tmp_path, model)[name]
    out = tmp_path / "out"
    run(first)
    earlier = _visible(out)
    assert len(earlier) >= 2
    nth = 1
    while True:  # fail the 1st rename of the second run's commit, then the 2nd, ... until one needs no more
        calls = _fail_rename(monkeypatch, nth)
        try:
            run(second)
        except (OSError, EmbedtuneError):
            assert _visible(out) == earlier, f"rename {nth} failed: the set is mixed"
            assert sorted(p.name for p in out.iterdir()) == sorted(earlier), "a temporary was left"
            nth += 1
            continue
        assert calls["n"] < nth  # no rename failed this time: the new set is there, whole
        break
    assert nth > 3  # moving the old files aside and renaming the new ones in: each rename was made to fail
    assert _visible(out).keys() == earlier.keys() and _visible(out) != earlier


def test_an_output_that_is_a_folder_is_refused_before_anything_is_written(tmp_path):
    rows = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    (tmp_path / "out.jsonl").mkdir()
    with pytest.raises(EmbedtuneError, match=r"out.jsonl: is a folder; the output is a file"):
        convert.run(ConvertConfig(source=str(rows), output=str(tmp_path / "out.jsonl")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "rows.jsonl"]  # no stats, no temporary


def test_output_set_rolls_back_and_commits_files_and_folders(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("old a")
    (tmp_path / "gone.txt").write_text("stale")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "w").write_text("old w")
    with pytest.raises(OSError, match="injected"):
        _fail_rename(monkeypatch, 4)
        with outputs.OutputSet() as outs:
            outs.write_bytes(tmp_path / "a.txt", b"new a")
            outs.write_bytes(tmp_path / "b.txt", b"new b")
            (outs.folder(tmp_path / "dir") / "w").write_text("new w")
            outs.remove(tmp_path / "gone.txt")
    assert _tree(tmp_path) == {"a.txt": b"old a", "gone.txt": b"stale", "dir/w": b"old w"}
    monkeypatch.setattr(outputs, "_rename", os.replace)
    with outputs.OutputSet() as outs:
        outs.write_bytes(tmp_path / "a.txt", b"new a")
        (outs.folder(tmp_path / "dir") / "w").write_text("new w")
        outs.remove(tmp_path / "gone.txt")
    assert _tree(tmp_path) == {"a.txt": b"new a", "dir/w": b"new w"}
    with pytest.raises(ZeroDivisionError), outputs.OutputSet() as outs:  # an error inside: nothing changes
        outs.write_bytes(tmp_path / "a.txt", b"newer")
        1 / 0  # noqa: B018
    assert _tree(tmp_path) == {"a.txt": b"new a", "dir/w": b"new w"}
    with (
        pytest.raises(EmbedtuneError, match="is a folder; the output is a file"),
        outputs.OutputSet() as outs,
    ):
        outs.open(tmp_path / "dir")


def test_a_killed_runs_temporaries_are_removed_by_the_next_write_and_a_live_ones_kept(tmp_path):
    rows = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    out = tmp_path / "out.jsonl"
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "60"])
    try:
        host = outputs._HOST
        stale = [
            tmp_path / f".out.jsonl.{host}-{dead.pid}.abc.tmp",
            tmp_path / f".out.jsonl.stats.json.{host}-{dead.pid}.x.tmp",
        ]
        for p in stale:
            p.write_bytes(b"\0" * 1000)
        (tmp_path / f".out.jsonl.{host}-{dead.pid}.d.tmp.dir").mkdir()  # not ours: other suffix, kept
        kept = tmp_path / f".out.jsonl.{host}-{live.pid}.abc.tmp"
        kept.write_bytes(b"in use")
        convert.run(ConvertConfig(source=str(rows), output=str(out)))
        hidden = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
        assert hidden == sorted([f".out.jsonl.{host}-{dead.pid}.d.tmp.dir", kept.name])
    finally:
        live.kill()


def test_outputs_get_the_umask_mode_and_a_replaced_file_keeps_its_own(tmp_path):
    rows = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    old = os.umask(0o027)
    try:
        convert.run(ConvertConfig(source=str(rows), output=str(tmp_path / "c.jsonl")))
        assert stat.S_IMODE((tmp_path / "c.jsonl").stat().st_mode) == 0o640
        assert stat.S_IMODE((tmp_path / "c.jsonl.stats.json").stat().st_mode) == 0o640
        os.chmod(tmp_path / "c.jsonl", 0o644)
        convert.run(ConvertConfig(source=str(rows), output=str(tmp_path / "c.jsonl")))
        assert stat.S_IMODE((tmp_path / "c.jsonl").stat().st_mode) == 0o644
        folder = outputs.temp_beside(tmp_path / "model", folder=True)
        assert stat.S_IMODE(folder.stat().st_mode) == 0o750
    finally:
        os.umask(old)


# ------------------------------------------------------------------------------------------------ readers
def test_split_mine_and_train_read_gzip_rows_by_their_bytes(tmp_path):
    data = b"".join(__import__("orjson").dumps(r) + b"\n" for r in ROWS)
    for name in ("rows.jsonl.gz", "rows.jsonl"):  # gzip named .gz, and gzip under a plain name
        src = tmp_path / name
        src.write_bytes(gzip.compress(data))
        res = split.run(SplitConfig(dataset=str(src), train_data=str(tmp_path / "t.jsonl"),
                                    eval_data=str(tmp_path / "e.jsonl"), split_dataset_ratio=0.25))  # fmt: skip
        assert res["train_rows"] + res["eval_rows"] == len(ROWS)
        mine.run(
            MineConfig(dataset=str(src), model="unused", output=str(tmp_path / "m.jsonl"), passthrough=True)
        )
        assert (tmp_path / "m.jsonl").read_bytes() == data
        rows, _ = train.load_rows(str(src), TrainConfig(model="m", train_data=str(src), output_dir="o"))
        assert len(rows) == len(ROWS)
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(data * 50)[:300])
    with pytest.raises(DataError, match=rf"{cut}:\d+: cannot read: .*(end-of-stream|ended)"):
        split.run(
            SplitConfig(
                dataset=str(cut), train_data=str(tmp_path / "t2.jsonl"), eval_data=str(tmp_path / "e2.jsonl")
            )
        )
    assert not (tmp_path / "t2.jsonl").exists()


def test_a_folder_a_fifo_and_bad_text_files_are_one_line_each(tmp_path):
    rows = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    (tmp_path / "folder.jsonl").mkdir()
    latin = tmp_path / "exclude.txt"
    latin.write_bytes(b"fine line\nanother\ncaf\xe9 au lait\n")
    out = {"train_data": str(tmp_path / "t.jsonl"), "eval_data": str(tmp_path / "e.jsonl")}
    with pytest.raises(EmbedtuneError, match=rf"{fifo}: not a regular file \(a FIFO"):
        split.run(SplitConfig(dataset=str(fifo), **out))
    with pytest.raises(EmbedtuneError, match=rf"{tmp_path / 'folder.jsonl'}: is a folder, not a file"):
        split.run(SplitConfig(dataset=str(tmp_path / "folder.jsonl"), **out))
    with pytest.raises(EmbedtuneError, match=rf"{fifo}: not a regular file"):
        convert.run(ConvertConfig(source=str(fifo), output=str(tmp_path / "c.jsonl")))
    with pytest.raises(
        DataError, match=rf"{latin}:3: not UTF-8 text \(invalid continuation byte at byte 3\)"
    ):
        split.run(SplitConfig(dataset=str(rows), exclude_data=str(latin), **out))
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text('{"query": "q", "response": "r"}\n{"query": 3}\n')
    with pytest.raises(DataError, match=rf"{garbage}:2: query: must be a string"):
        mine.run(
            MineConfig(
                dataset=str(garbage), model="unused", output=str(tmp_path / "m.jsonl"), passthrough=True
            )
        )
    assert not (tmp_path / "m.jsonl").exists() and not (tmp_path / "t.jsonl").exists()


def test_csv_extra_cells_and_an_open_quote_are_named_on_their_line(tmp_path):
    src = tmp_path / "pairs.csv"
    src.write_text("query,response\nwhat is a cat,a small animal\nwhat is a dog,a pet, loyal\nok,fine\n")
    res = convert.run(ConvertConfig(source=str(src), output=str(tmp_path / "c.jsonl"), on_error="skip"))
    assert res["rows"] == 2
    rejected = (tmp_path / "c.jsonl.rejected.jsonl").read_text()
    assert (
        ":3" in rejected
        and "1 more cell(s) than the header's 2 columns (a comma inside a text needs quotes)" in rejected
    )
    with pytest.raises(DataError, match=r"1 more cell"):
        convert.run(ConvertConfig(source=str(src), output=str(tmp_path / "d.jsonl")))
    quoted = tmp_path / "open.csv"
    quoted.write_text('query,response\na,b\nc,d\n"e,f\ng,h\ni,j\n')
    with pytest.raises(DataError, match=rf"{quoted}:4: invalid CSV: .* \(in the record starting here\)"):
        convert.run(ConvertConfig(source=str(quoted), output=str(tmp_path / "q.jsonl")))


def test_a_file_linked_twice_into_a_folder_is_read_once_and_fillers_are_blank(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", ROWS[:5])
    os.symlink(folder / "a.jsonl", folder / "b.jsonl")
    assert convert.run(ConvertConfig(source=str(folder), output=str(tmp_path / "c.jsonl")))["rows"] == 5
    for filler in ("\u3164", "\u2800\u2800", " \u3164 \u200b"):
        src = write_jsonl(tmp_path / "f.jsonl", [{"query": filler, "response": "r"}])
        with pytest.raises(DataError, match=r"query: blank"):
            convert.run(ConvertConfig(source=str(src), output=str(tmp_path / "f-out.jsonl")))


# ---------------------------------------------------------------------------------- models and stores
def test_model_folders_that_cannot_load_are_one_line_naming_the_path(tmp_path, minilm_path):
    import shutil

    from embedtune.modeling import Embedder

    empty = tmp_path / "empty"
    empty.mkdir()
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "README.md").write_text("not a model")
    bad_json = _model_folder(tmp_path / "bad-json")
    (bad_json / "config.json").write_text("{not json")
    cut = tmp_path / "cut"
    shutil.copytree(minilm_path, cut, ignore=shutil.ignore_patterns("*.bin", "onnx", "openvino"))
    weights = next(cut.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    adapter = _adapter(tmp_path / "a", tmp_path / "a")
    (adapter / "adapter_config.json").write_text("[1, 2")
    for path, want in (
        (tmp_path / "missing", "no such folder"),
        (empty, r"not a model folder \(no config.json, adapter_config.json, modules.json\)"),
        (notes, "not a model folder"),
        (bad_json, r"config.json: not valid JSON"),
        (cut, r"model.safetensors: cut short: \d+ bytes, its header needs \d+"),
        (adapter, r"adapter_config.json: not valid JSON"),
    ):
        with pytest.raises(EmbedtuneError, match=want):
            Embedder.from_pretrained(path)
    rows = write_jsonl(tmp_path / "eval.jsonl", ROWS)
    r = subprocess.run([str(EMBEDTUNE), "evaluate", "--model", str(cut), "--eval-data", str(rows), "--output",
                        str(tmp_path / "m.json")], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "cut short" in r.stderr, r.stderr
    with pytest.raises(EmbedtuneError, match=r"max_length: 4096 is past the model's 512 positions"):
        Embedder.from_pretrained(minilm_path, max_length=4096)


def test_tracking_stores_that_cannot_work_are_one_line(tmp_path):
    from embedtune.registry import resolve_tracking_uri

    with pytest.raises(EmbedtuneError, match=r"tracking_uri: ftp://\*\*\*@h/x: unsupported scheme 'ftp'"):
        resolve_tracking_uri("ftp://u:secret@h/x")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(EmbedtuneError, match=rf"tracking_uri: cannot make the store's folder {blocker}/db"):
        resolve_tracking_uri(f"sqlite:///{blocker}/db/mlflow.db")
    assert resolve_tracking_uri("postgresql+psycopg2://db/mlflow") == (
        "postgresql+psycopg2://db/mlflow",
        None,
    )


def test_an_earlier_version_a_killed_commit_moved_aside_goes_back(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = outputs._HOST
    (tmp_path / f".out.txt.{host}-{dead.pid}.a.old").write_text("earlier")  # moved aside, then killed
    folder_old = tmp_path / f".model.{host}-{dead.pid}.b.old"
    folder_old.mkdir()
    (folder_old / "config.json").write_text("{}")
    outputs.temp_beside(tmp_path / "out.txt")
    outputs.temp_beside(tmp_path / "model", folder=True)
    assert (tmp_path / "out.txt").read_text() == "earlier"
    assert (tmp_path / "model" / "config.json").read_text() == "{}"  # the folder itself, not nested
