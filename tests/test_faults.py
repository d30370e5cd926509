"""Faults: a real process killed, a real server stopped, a real disk full. What survives each.

- checkpoints cut short are skipped for the previous whole one (or refused), never loaded half;
- a 2-rank ZeRO-3 run SIGKILLed after a checkpoint, and a train task killed inside a kfp.local pipeline run,
  resume from it and end at the same global step, with one registered version;
- the MLflow server stopped during register's upload: a clear error, nothing half-registered; the same run
  id afterwards registers exactly one version with consistent aliases;
- two registers racing for the champion alias: both versions exist, champion ends on the better one;
- a disk that fills up while convert, merge or train's final save writes (a small tmpfs, mounted as root):
  a clear error, no partial output, the earlier output in the same place intact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient

from embedtune.config import ConvertConfig, MergeConfig, RegisterConfig, TrainConfig
from embedtune.errors import EmbedtuneError
from embedtune.io import read_jsonl, write_jsonl
from embedtune.launch import free_port
from embedtune.lora import add_lora
from embedtune.modeling import Embedder
from embedtune.rundir import checkpoint_problem, latest_checkpoint
from embedtune.steps import convert, merge, register, train
from embedtune.trainer import StepLog

EMBEDTUNE = str(Path(sys.executable).parent / "embedtune")


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def wait_for(predicate, timeout: float, what: str, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def kill_tree(root: psutil.Process) -> list[int]:
    """SIGKILL a process and all its descendants at once (a pod dying); return their pids."""
    procs = [root, *root.children(recursive=True)]
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    # Never reap a child of this process: its owner (kfp.local's Popen) must see the -9 itself; a child reaped
    # here reads as exit code 0 there (Popen's wait gets ECHILD), i.e. a killed task looks successful.
    mine = {c.pid for c in psutil.Process().children()}
    psutil.wait_procs([p for p in procs if p.pid not in mine], timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(gone_or_zombie(p) is False for p in procs if p.pid in mine):
        time.sleep(0.1)
    return [p.pid for p in procs]


def gone_or_zombie(p: psutil.Process) -> bool:
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# ------------------------------------------------------------------------------------- checkpoints cut short
@pytest.fixture(scope="module")
def preempted(tiny_qwen3_path, fixtures_dir, tmp_path_factory) -> tuple[TrainConfig, Path]:
    """A run (6 steps, a checkpoint every 2) that died right after saving checkpoint-4."""

    class Preempted(Exception):
        pass

    def die(self, args, state, control, **kwargs):
        if state.global_step == 4:
            raise Preempted

    out = tmp_path_factory.mktemp("preempted") / "out"
    cfg = TrainConfig(model=str(tiny_qwen3_path), train_data=str(fixtures_dir / "train" / "infonce.jsonl"),
                      output_dir=str(out), deepspeed="none", max_steps=6, save_steps=2, save_total_limit=3,
                      per_device_train_batch_size=4, learning_rate=1e-4, max_length=32, logging_steps=1)  # fmt: skip
    with pytest.MonkeyPatch.context() as m:
        m.setattr(StepLog, "on_save", die, raising=False)
        with pytest.raises(Preempted):
            train.run(cfg)
    assert [p.name for p in sorted(out.glob("checkpoint-*"))] == ["checkpoint-2", "checkpoint-4"]
    return cfg, out


DAMAGE = {
    "model.safetensors cut short": (lambda c: truncate(c / "model.safetensors"), "model.safetensors: "),
    "optimizer.pt cut short": (
        lambda c: truncate(c / "optimizer.pt"),
        "optimizer.pt: not a whole torch file",
    ),
    "optimizer.pt missing": (lambda c: (c / "optimizer.pt").unlink(), "no optimizer.pt"),
    "trainer_state.json missing": (lambda c: (c / "trainer_state.json").unlink(), "no trainer_state.json"),
    "trainer_state.json cut short": (lambda c: truncate(c / "trainer_state.json"), "trainer_state.json: not"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_checkpoint_cut_short_is_skipped_for_the_previous_whole_one(preempted, tmp_path, damage, capsys):
    _, out = preempted
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    hurt, why = DAMAGE[damage]
    hurt(copy / "checkpoint-4")
    assert why in checkpoint_problem(copy / "checkpoint-4")
    assert latest_checkpoint(copy) == copy / "checkpoint-2"
    assert f"skipping {copy / 'checkpoint-4'}: {why}" in capsys.readouterr().err
    assert (copy / "incomplete-checkpoint-4").is_dir() and not (copy / "checkpoint-4").exists()


def test_resume_skips_a_cut_short_checkpoint_and_ends_at_the_same_step(preempted, tmp_path):
    cfg, out = preempted
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    truncate(copy / "checkpoint-4" / "model.safetensors")
    result = train.run(TrainConfig(**{**cfg.__dict__, "output_dir": str(copy)}))
    assert result["resumed_from_step"] == 2 and result["global_step"] == 6
    assert [s for s, _ in result["loss_history"]] == [1, 2, 3, 4, 5, 6]
    assert not list(copy.glob("*checkpoint-*"))  # the set-aside one is deleted with the rest


def test_no_whole_checkpoint_starts_over_and_says_why(preempted, tmp_path, capsys):
    _, out = preempted
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    for c in ("checkpoint-2", "checkpoint-4"):
        (copy / c / "trainer_state.json").unlink()
    assert latest_checkpoint(copy) is None
    err = capsys.readouterr().err
    assert "skipping" in err and "checkpoint-2: no trainer_state.json" in err


# ------------------------------------------------------------------------------- SIGKILL during training
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_sigkill_of_a_two_rank_zero3_run_after_a_checkpoint_resumes_to_the_same_step(
    tiny_qwen3_path, fixtures_dir, tmp_path
):
    out = tmp_path / "out"
    cmd = [EMBEDTUNE, "train", "--model", str(tiny_qwen3_path), "--train-data",
           str(fixtures_dir / "train" / "infonce.jsonl"), "--output-dir", str(out), "--nproc", "2",
           "--deepspeed", "zero3", "--max-steps", "12", "--save-steps", "2", "--per-device-train-batch-size", "2",
           "--max-length", "32", "--learning-rate", "1e-4", "--logging-steps", "1"]  # fmt: skip
    log = open(tmp_path / "first.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: (out / "checkpoint-2" / "trainer_state.json").is_file(), 900, "checkpoint-2", proc)
    finally:
        killed = kill_tree(psutil.Process(proc.pid))  # the launcher, torchrun and both ranks
        log.close()
    assert len(killed) >= 4, killed
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(out) in " ".join(p.info["cmdline"] or [])]
    assert not (out / "train_result.json").exists()

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)  # the same command
    assert again.returncode == 0, again.stderr[-3000:]
    result = json.loads(again.stdout)
    assert result["resumed_from_step"] >= 2 and result["global_step"] == 12 and result["world_size"] == 2
    resumed = out / f"checkpoint-{result['resumed_from_step']}"
    assert f"resuming from {resumed}" in again.stderr
    assert [s for s, _ in result["loss_history"]][-1] == 12
    assert not list(out.glob("*checkpoint-*")) and (out / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_train_killed_inside_a_kfp_local_pipeline_resumes_on_retry_and_registers_one_version(
    tmp_path, minilm_path, monkeypatch
):
    """A checkpoint volume (cluster.CHECKPOINT_PVC; kfp.local ignores the mount, so the test points
    CHECKPOINT_PATH at a folder) makes train retried; the retry finds its checkpoints under the run id."""
    from kfp import dsl

    import pipelines.pipeline as pipeline_module
    from pipelines import cluster
    from pipelines.demo import run_local, tiny_arguments

    ckpt_root = tmp_path / "pvc"
    monkeypatch.setattr(cluster, "CHECKPOINT_PVC", "embedtune-checkpoints")
    monkeypatch.setattr(cluster, "CHECKPOINT_PATH", str(ckpt_root))
    monkeypatch.setattr(cluster, "RETRY_BACKOFF", {"backoff_duration": "1s", "backoff_factor": 1.0})
    rebuilt = dsl.pipeline(name="embedtune")(pipeline_module.embedtune_pipeline.pipeline_func)
    monkeypatch.setattr(pipeline_module, "embedtune_pipeline", rebuilt)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    arguments = tiny_arguments(model=str(minilm_path), name="tiny-killed", deepspeed="none", cpu_procs=1,
                               save_steps=2, logging_steps=1)  # fmt: skip

    killed: list[int] = []

    def preempt_train_after_its_first_checkpoint():
        wait_for(lambda: list(ckpt_root.glob("*/checkpoint-*/trainer_state.json")), 1200, "a checkpoint")
        me = psutil.Process()
        for child in me.children():  # the kfp.local task process running train (a pod)
            if any("checkpoint" in " ".join(c.cmdline()) or "train" in " ".join(c.cmdline())
                   for c in [child, *child.children(recursive=True)]):  # fmt: skip
                killed.extend(kill_tree(child))

    killer = threading.Thread(target=preempt_train_after_its_first_checkpoint, daemon=True)
    killer.start()
    out = run_local(arguments, tmp_path)
    killer.join(timeout=5)
    assert killed, "train was never killed"

    result = json.loads((out["run_dir"] / "train" / "output_dir" / "train_result.json").read_text())
    assert result["resumed_from_step"] >= 2
    train_rows = sum(1 for _ in read_jsonl(out["run_dir"] / "mine" / "output"))  # what train read
    steps = -(-train_rows // arguments["per_device_train_batch_size"])
    assert (
        result["global_step"] in (steps - 1, steps, steps + 1)
        and result["loss_history"][-1][0] == result["global_step"]
    )
    assert out["registered"]
    client = MlflowClient(out["tracking_uri"])
    versions = client.search_model_versions("name = 'tiny-killed'")
    assert [str(v.version) for v in versions] == ["1"]
    assert str(client.get_model_version_by_alias("tiny-killed", "champion").version) == "1"
    assert not list(ckpt_root.glob("*/checkpoint-*"))  # deleted after the verified final save


# ----------------------------------------------------------------------------------------- MLflow faults
class MlflowServer:
    """A real `mlflow server` this test owns: stop() kills it (SIGKILL, like a crash), start() brings it back
    on the same port with the same store."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self) -> None:
        import urllib.request

        log = open(self.root / "server.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.root / 'db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1", "--port",
             str(self.port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        log.close()

        def healthy():
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_for(healthy, 300, "the mlflow server", self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


@pytest.fixture()
def own_server(tmp_path):
    server = MlflowServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def embedder_dir(tmp_path_factory, minilm_path) -> Path:
    out = tmp_path_factory.mktemp("faults") / "minilm"
    Embedder.from_pretrained(minilm_path, max_length=128).save_pretrained(
        out,
        meta={
            "base_model": "sentence-transformers/all-MiniLM-L6-v2",
            "train_type": "full",
            "train_config": {"learning_rate": 2e-5},
        },  # fmt: skip
    )
    return out


def metrics(tmp_path: Path, value: float) -> Path:
    path = tmp_path / f"metrics-{uuid.uuid4().hex[:6]}.json"
    path.write_text(json.dumps({"primary_metric": "ndcg_at_10", "primary_value": value,
                                "metrics": {"ndcg_at_10": value}}))  # fmt: skip
    return path


@pytest.mark.parametrize("where", ["model upload", "alias"])
def test_mlflow_server_stopped_mid_register_leaves_nothing_half_registered_and_a_rerun_registers_once(
    own_server, embedder_dir, tmp_path, monkeypatch, where, capsys
):
    from mlflow.store.artifact.http_artifact_repo import HttpArtifactRepository

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    if where == "model upload":
        original = HttpArtifactRepository.log_artifact

        def upload(self, local_file, artifact_path=None):
            if str(local_file).endswith(".safetensors"):
                own_server.stop()  # the server dies while the model weights go up
            return original(self, local_file, artifact_path)

        monkeypatch.setattr(HttpArtifactRepository, "log_artifact", upload)
    else:
        original = MlflowClient.set_registered_model_alias

        def alias(self, name, alias, version):
            own_server.stop()  # the version exists; the server dies before any alias is set
            return original(self, name, alias, version)

        monkeypatch.setattr(MlflowClient, "set_registered_model_alias", alias)

    name = f"emb-{uuid.uuid4().hex[:8]}"
    cfg = RegisterConfig(model=str(embedder_dir), metrics=str(metrics(tmp_path, 0.8)), name=name,
                         tracking_uri=own_server.uri, run_id="run-1")  # fmt: skip
    with pytest.raises(EmbedtuneError, match=rf"MLflow at {own_server.uri}: registering {name} failed"):
        register.run(cfg)
    monkeypatch.undo()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    own_server.start()
    client = MlflowClient(own_server.uri)
    left = client.search_model_versions(f"name = '{name}'")
    assert all("embedtune.pipeline_run_id" not in v.tags for v in left)  # never found as registered
    assert all(not client.get_model_version(name, v.version).aliases for v in left)

    capsys.readouterr()
    result = register.run(cfg)  # the same run id, the server back
    if where == "alias":  # the dead try held the champion lock: its retry takes it over without waiting
        assert "taking over the lock" in capsys.readouterr().err
    versions = client.search_model_versions(f"name = '{name}'")
    assert [str(v.version) for v in versions] == [result["version"]] and result["created"]
    assert sorted(client.get_registered_model(name).aliases) == ["challenger", "champion"]
    assert {str(v) for v in client.get_registered_model(name).aliases.values()} == {result["version"]}
    runs = client.search_runs([client.get_experiment_by_name("embedtune").experiment_id],
                              "tags.`embedtune.pipeline_run_id` = 'run-1'")  # fmt: skip
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED"]
    assert register.run(cfg)["version"] == result["version"]  # and again: nothing new
    assert len(client.search_model_versions(f"name = '{name}'")) == 1


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_registers_racing_for_the_champion_leave_it_on_the_better_one(
    mlflow_server, embedder_dir, tmp_path
):
    name = f"race-{uuid.uuid4().hex[:8]}"

    def start(value: float, run_id: str):
        return subprocess.Popen(
            [EMBEDTUNE, "register", "--model", str(embedder_dir), "--metrics", str(metrics(tmp_path, value)),
             "--name", name, "--run-id", run_id, "--tracking-uri", mlflow_server],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    worse, better = start(0.70, "race-worse"), start(0.90, "race-better")
    outs = {}
    for key, proc in (("worse", worse), ("better", better)):
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-2000:]
        outs[key] = json.loads(stdout)
    client = MlflowClient(mlflow_server)
    assert len(client.search_model_versions(f"name = '{name}'")) == 2
    champion = client.get_model_version_by_alias(name, "champion")
    assert str(champion.version) == outs["better"]["version"]
    assert float(champion.tags["embedtune.primary_value"]) == 0.9
    assert not client.search_registered_models(f"name = '{name}{register.LOCK_SUFFIX}'")  # lock released


# ---------------------------------------------------------------------------------------------- disk full
@pytest.fixture()
def small_disk(tmp_path):
    """`small_disk(size)`: a tmpfs of that size mounted on a fresh folder (root only), unmounted after."""
    mounted = []

    def mount(size: str) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, text=True)  # fmt: skip
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(disk: Path, leave: int) -> None:
    """Take all but `leave` bytes of the disk with a filler file."""
    free = shutil.disk_usage(disk).free
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def test_disk_full_during_convert_fails_clearly_and_keeps_the_earlier_output(small_disk, tmp_path):
    disk = small_disk("1m")
    out = disk / "rows.jsonl"
    small = write_jsonl(tmp_path / "small.jsonl", [{"query": "q", "response": "r"}])
    convert.run(ConvertConfig(source=str(small), output=str(out)))
    before = {p.name: p.read_bytes() for p in disk.iterdir()}
    big = write_jsonl(
        tmp_path / "big.jsonl", [{"query": f"q{i}", "response": "r" * 200} for i in range(20_000)]
    )
    with pytest.raises(EmbedtuneError, match=r"rows\.jsonl: cannot write: .*No space left on device"):
        convert.run(ConvertConfig(source=str(big), output=str(out)))
    assert {p.name: p.read_bytes() for p in disk.iterdir()} == before  # no temp file, old output intact


def test_disk_full_during_merge_fails_clearly_and_keeps_the_earlier_output(
    small_disk, tiny_qwen3_path, tmp_path
):
    adapter = tmp_path / "adapter"
    model = Embedder.from_pretrained(tiny_qwen3_path, pooling="last", max_length=32)
    add_lora(model, 4, 8, 0.0, "all-linear")
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)  # a trained adapter changes the outputs
    model.save_pretrained(adapter, meta={"base_model": str(tiny_qwen3_path), "train_type": "lora"})
    disk = small_disk("16m")
    out = disk / "merged"
    merge.run(MergeConfig(adapter=str(adapter), output=str(out)))
    before = {str(p.relative_to(disk)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    fill(disk, 64 * 1024)
    with pytest.raises(EmbedtuneError, match="No space left on device"):
        merge.run(MergeConfig(adapter=str(adapter), output=str(out)))
    (disk / "filler").unlink()
    assert sorted(p.name for p in disk.iterdir()) == ["merged"]  # no staging folder left
    assert {str(p.relative_to(disk)): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_disk_full_during_trains_final_save_fails_clearly_and_keeps_the_checkpoints(
    small_disk, tiny_qwen3_path, fixtures_dir, tmp_path
):
    disk = small_disk("256k")  # the tiny model is ~600 kB: its final save cannot fit
    out = disk / "out"
    out.mkdir()
    (out / "notes.txt").write_text("an earlier file in the output folder\n")
    ckpt = tmp_path / "pvc"  # checkpoints on a volume with room, as on Kubeflow
    cfg = TrainConfig(model=str(tiny_qwen3_path), train_data=str(fixtures_dir / "train" / "infonce.jsonl"),
                      output_dir=str(out), checkpoint_dir=str(ckpt), deepspeed="none", max_steps=4,
                      save_steps=4, per_device_train_batch_size=4, max_length=32)  # fmt: skip
    with pytest.raises(EmbedtuneError, match=rf"{out}: cannot save the model: .*No space left on device"):
        train.run(cfg)
    assert sorted(p.name for p in disk.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # no partial model files
    assert (ckpt / "checkpoint-4" / "trainer_state.json").is_file()  # what a re-run resumes from
    # 16 rows, batch 4: the last step ends the epoch (resuming a max_steps cut mid-epoch from its final
    # checkpoint makes transformers 5.23 train one step more: its stop check comes after a step)
    result = train.run(TrainConfig(**{**cfg.__dict__, "output_dir": str(tmp_path / "roomy")}))
    assert result["resumed_from_step"] == 4 and result["global_step"] == 4


def test_disk_full_during_a_checkpoint_save_fails_clearly_and_keeps_the_earlier_checkpoint(
    small_disk, tiny_qwen3_path, fixtures_dir, tmp_path
):
    disk = small_disk(
        "2m"
    )  # room for the first checkpoint of the tiny model (1.4 MB with Adam), not a second
    cfg = TrainConfig(model=str(tiny_qwen3_path), train_data=str(fixtures_dir / "train" / "infonce.jsonl"),
                      output_dir=str(tmp_path / "out"), checkpoint_dir=str(disk / "ckpt"), deepspeed="none",
                      max_steps=4, save_steps=2, save_total_limit=2, per_device_train_batch_size=4, max_length=32)  # fmt: skip
    with pytest.raises(
        EmbedtuneError, match=rf"checkpoint_dir: {disk / 'ckpt'}: cannot write checkpoint-4: "
    ):
        train.run(cfg)
    assert sorted(p.name for p in (disk / "ckpt").iterdir()) == ["checkpoint-2"]  # the cut one removed
    assert (
        disk / "ckpt" / "checkpoint-2" / "trainer_state.json"
    ).is_file()  # whole: what a rerun resumes from


def test_a_rank_that_dies_at_exit_after_the_saved_model_does_not_fail_the_run(
    tiny_qwen3_path, fixtures_dir, tmp_path, monkeypatch
):
    """gloo can abort a rank while it exits; once rank 0 has saved, checked and written the result (last), the
    run stands (with a warning). A launch that fails before that result still fails."""
    from embedtune.errors import EmbedtuneError as Err
    from embedtune.rundir import RESULT_FILE
    from embedtune.steps import train as train_step

    cfg = TrainConfig(model=str(tiny_qwen3_path), train_data=str(fixtures_dir / "train" / "infonce.jsonl"),
                      output_dir=str(tmp_path / "out"), nproc=2, max_steps=2)  # fmt: skip

    def dies_after_the_result(step, c, nproc, topology=None):
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / RESULT_FILE).write_text('{"global_step": 2}')
        raise Err("train failed under torchrun with exit code 1: ... Signal 6 (SIGABRT)")

    monkeypatch.setattr(train_step, "torchrun", dies_after_the_result)
    assert train_step.run(cfg) == {"global_step": 2}

    def dies_before(step, c, nproc, topology=None):
        raise Err("train failed under torchrun with exit code 1")

    monkeypatch.setattr(train_step, "torchrun", dies_before)
    with pytest.raises(Err, match="exit code 1"):
        train_step.run(dataclasses.replace(cfg, output_dir=str(tmp_path / "other")))
