"""Safe loading: no pickle that runs code, no model code unless asked, no credentials in any output.

A `pytorch_model.bin` (or an adapter, or a checkpoint file) whose unpickling would run code is planted where
evaluate, merge, train and register read weights: each refuses it in one line naming the file and the call,
and the payload (it would write a marker file) never runs. A folder with its own Python code (`auto_map`) is
refused unless `trust_remote_code`, naming the knob.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from embedtune.cli import main as cli
from embedtune.config import EvaluateConfig, MergeConfig, TrainConfig
from embedtune.errors import EmbedtuneError
from embedtune.io import write_jsonl
from embedtune.lora import add_lora
from embedtune.modeling import Embedder, load_model
from embedtune.safety import check_pickle, mask_credentials
from embedtune.steps import evaluate, merge, train

ROWS = [{"query": f"what is {w}", "response": f"{w} is a word", "rejected_response": ["the moon"]} for w in
        ("a cat", "a dog", "a tree", "a river")]  # fmt: skip


class Payload:
    """Unpickling this calls `exec`, which writes the marker file: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def plant(folder: Path, name: str, marker: Path, tensors: dict | None = None) -> Path:
    """Write `name` in `folder` as a torch pickle holding `tensors` and the payload."""
    torch.save({**(tensors or {}), "innocent_looking_key": Payload(marker)}, folder / name)
    return folder / name


@pytest.fixture()
def poisoned_model(tiny_qwen3_path, tmp_path) -> tuple[Path, Path]:
    """A copy of the tiny Qwen3 whose weights are a `pytorch_model.bin` with a payload (no safetensors)."""
    folder = tmp_path / "poisoned"
    shutil.copytree(tiny_qwen3_path, folder)
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "PWNED"
    plant(folder, "pytorch_model.bin", marker, weights)
    return folder, marker


def cli_error(capsys, *argv) -> str:
    """Run the CLI, expect exit 2, return its one error line."""
    assert cli(list(argv)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(errors) == 1, errors
    return errors[0]


def test_check_pickle_names_the_call_without_running_it(tmp_path):
    marker = tmp_path / "PWNED"
    bad = plant(tmp_path, "x.bin", marker, {"w": torch.zeros(2)})
    with pytest.raises(EmbedtuneError, match=r"x\.bin: refused: unpickling it would call builtins\.exec"):
        check_pickle(bad)
    torch.save({"w": torch.zeros(2), "step": 3, "names": ["a"]}, tmp_path / "fine.pt")
    check_pickle(tmp_path / "fine.pt")  # tensors and plain data pass
    assert not marker.exists()


def test_evaluate_train_and_merge_refuse_a_pickle_that_runs_code_in_one_line(
    poisoned_model, tmp_path, capsys
):
    folder, marker = poisoned_model
    data = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    want = f"{folder / 'pytorch_model.bin'}: refused: unpickling it would call builtins.exec"

    line = cli_error(capsys, "evaluate", "--model", str(folder), "--eval-data", str(data), "--output",
                     str(tmp_path / "m.json"))  # fmt: skip
    assert want in line
    line = cli_error(capsys, "train", "--model", str(folder), "--train-data", str(data), "--output-dir",
                     str(tmp_path / "out"), "--deepspeed", "none", "--max-steps", "1")  # fmt: skip
    assert want in line
    line = cli_error(capsys, "merge", "--adapter", str(folder), "--output", str(tmp_path / "merged"))
    assert want in line and not (tmp_path / "merged").exists()
    with pytest.raises(EmbedtuneError, match="refused"):  # the baseline of evaluate too
        evaluate.run(EvaluateConfig(model=str(folder), eval_data=str(data), output=str(tmp_path / "m.json")))
    with pytest.raises(EmbedtuneError, match="refused"):
        load_model(folder)
    assert not marker.exists()


def test_an_adapter_whose_weights_or_base_run_code_is_refused(tiny_qwen3_path, poisoned_model, tmp_path):
    _, marker = poisoned_model
    adapter = tmp_path / "adapter"
    model = Embedder.from_pretrained(tiny_qwen3_path, pooling="last", max_length=32)
    add_lora(model, 4, 8, 0.0, "all-linear")
    model.save_pretrained(adapter, meta={"base_model": str(tiny_qwen3_path), "train_type": "lora"})
    weights = load_file(adapter / "adapter_model.safetensors")
    (adapter / "adapter_model.safetensors").unlink()
    plant(adapter, "adapter_model.bin", marker, weights)
    with pytest.raises(EmbedtuneError, match=r"adapter_model\.bin: refused: unpickling it would call"):
        merge.run(MergeConfig(adapter=str(adapter), output=str(tmp_path / "merged")))
    with pytest.raises(EmbedtuneError, match=r"adapter_model\.bin: refused"):
        load_model(adapter)
    assert not marker.exists() and not (tmp_path / "merged").exists()


def test_resuming_from_a_checkpoint_with_a_pickle_that_runs_code_is_refused(tiny_qwen3_path, tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    out = tmp_path / "out"
    ckpt = out / "checkpoint-2"
    ckpt.mkdir(parents=True)
    shutil.copy(tiny_qwen3_path / "model.safetensors", ckpt)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    marker = tmp_path / "PWNED"
    plant(ckpt, "rng_state.pth", marker)
    cfg = TrainConfig(model=str(tiny_qwen3_path), train_data=str(data), output_dir=str(out), deepspeed="none",
                      max_steps=4, save_steps=2, max_length=32)  # fmt: skip
    with pytest.raises(
        EmbedtuneError, match=r"checkpoint-2/rng_state\.pth: refused: unpickling it would call"
    ):
        train.run(cfg)
    assert not marker.exists()


def test_a_folder_with_its_own_python_code_is_refused_naming_the_knob(tiny_qwen3_path, tmp_path, capsys):
    folder = tmp_path / "custom"
    shutil.copytree(tiny_qwen3_path, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_custom.CustomModel"}
    (folder / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "RAN"
    (folder / "modeling_custom.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    data = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    line = cli_error(capsys, "train", "--model", str(folder), "--train-data", str(data), "--output-dir",
                     str(tmp_path / "out"), "--deepspeed", "none", "--max-steps", "1")  # fmt: skip
    assert "auto_map names the model's own Python code (modeling_custom.CustomModel)" in line
    assert "--trust-remote-code true" in line
    line = cli_error(capsys, "evaluate", "--model", str(folder), "--eval-data", str(data), "--output",
                     str(tmp_path / "m.json"))  # fmt: skip
    assert "trust_remote_code" in line
    assert not marker.exists()


def test_mask_credentials_masks_userinfo_in_any_uri_inside_any_text():
    text = "failed: https://bob:hunter22@mlflow.example.com/api and s3://KEY:SECRET@bucket/x, not a@b.c"
    assert mask_credentials(text) == (
        "failed: https://***@mlflow.example.com/api and s3://***@bucket/x, not a@b.c"
    )
    assert mask_credentials("sqlite:////home/u/mlflow.db") == "sqlite:////home/u/mlflow.db"


def test_a_source_with_credentials_is_masked_in_errors_and_progress_lines(tmp_path, capsys):
    from embedtune.progress import say

    line = cli_error(capsys, "convert", "--source", "https://bob:s3cr3t@data.example.com/x/rows.jsonl",
                     "--output", str(tmp_path / "o.jsonl"))  # fmt: skip
    assert "https://***@data.example.com/x/rows.jsonl" in line and "s3cr3t" not in line
    say("train", "loading https://bob:s3cr3t@models.example.com/m")
    assert capsys.readouterr().err == "embedtune train: loading https://***@models.example.com/m\n"


def test_a_tracking_uri_with_credentials_is_masked_in_every_output_log_and_mlflow_field(
    mlflow_server, minilm_path, tmp_path, capfd
):
    """register through the CLI with `http://user:password@host`: the password and the user appear nowhere:
    not in its stdout / stderr (MLflow's own "View run at" line included), params, tags, description."""
    from mlflow import MlflowClient

    model = tmp_path / "model"
    Embedder.from_pretrained(minilm_path, max_length=128).save_pretrained(
        model, meta={"base_model": "all-MiniLM-L6-v2", "train_type": "full", "train_config": {"seed": 1}}
    )
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"primary_metric": "map", "primary_value": 0.5, "metrics": {"map": 0.5}}))
    uri = mlflow_server.replace("http://", "http://bob-user:s3cr3t-pw@")
    name = f"masked-{tmp_path.name[-6:]}"
    assert cli(["register", "--model", str(model), "--metrics", str(metrics), "--name", name,
                "--run-id", "masked-1", "--tracking-uri", uri]) == 0  # fmt: skip
    out, err = capfd.readouterr()
    result = json.loads(out[out.index("{\n") :])  # (DeepSpeed's logger, imported earlier, writes here too)
    assert result["tracking_uri"] == mlflow_server.replace("http://", "http://***@")
    client = MlflowClient(mlflow_server)
    run = client.get_run(result["mlflow_run_id"])
    mv = client.get_model_version(name, result["version"])
    seen = json.dumps([out, err, run.data.params, run.data.tags, mv.tags, mv.description])
    assert "s3cr3t" not in seen and "bob-user" not in seen
