"""`embedtune train` as the nodes of one multi-node job, for real, on this machine: one process per node,
started with only torchrun's PET_* variables (what Kubeflow Trainer's torch runtime sets in each node pod),
rendezvous on 127.0.0.1, DeepSpeed ZeRO-3 on gloo. Two nodes of one process each must train exactly like one
node of two processes: same loss history, same eval metrics (eval texts sharded over both nodes, infonce
negatives gathered from both), same weights; a job stopped after a checkpoint resumes on both nodes."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from embedtune.config import TrainConfig
from embedtune.errors import EmbedtuneError
from embedtune.launch import config_flags, free_port, job_topology
from embedtune.modeling import read_meta
from embedtune.steps import train

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

# Loaded by Python at start-up from PYTHONPATH in the node processes of the preempted job below: every rank
# stops for good right after checkpoint N is saved (all ranks wrote their shards: barrier first), as a node
# lost to preemption would. Test code only; the library has no such hook.
PREEMPT = """
import os
if os.environ.get("EMBEDTUNE_TEST_STOP_AFTER_SAVE") and "RANK" in os.environ:
    import embedtune.trainer

    def _stop(self, args, state, control, **kwargs):
        if state.global_step == int(os.environ["EMBEDTUNE_TEST_STOP_AFTER_SAVE"]):
            import torch.distributed as dist

            dist.barrier()
            os._exit(17)

    embedtune.trainer.StepLog.on_save = _stop
"""


def zero3_cfg(model, data, out, **kw) -> TrainConfig:
    knobs = dict(
        deepspeed="zero3",
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-4,
        logging_steps=1,
        max_length=32,
        save_steps=0,
        eval_data=str(data),
        eval_steps=2,
        per_device_eval_batch_size=3,
        infonce_temperature=0.05,
    )
    knobs.update(kw)
    return TrainConfig(model=str(model), train_data=str(data), output_dir=str(out), **knobs)


def run_nodes(cfg: TrainConfig, nnodes: int = 2, env: dict | None = None) -> list[tuple[int, str, str]]:
    """`embedtune train <cfg's flags>` once per node, each with only the PET_* variables to find the others;
    (exit code, stdout, stderr) per node."""
    port = free_port()
    procs = []
    for rank in range(nnodes):
        node_env = {
            **os.environ,
            **(env or {}),
            "PET_NNODES": str(nnodes),
            "PET_NODE_RANK": str(rank),
            "PET_NPROC_PER_NODE": "1",
            "PET_MASTER_ADDR": "127.0.0.1",
            "PET_MASTER_PORT": str(port),
        }
        procs.append(([sys.executable, "-m", "embedtune", "train", *config_flags(cfg)], node_env))
    return run_together(procs)


def run_together(commands: list[tuple[list[str], dict]], timeout: float = 1500) -> list[tuple[int, str, str]]:
    """Start every (command, env) at once, wait for all; (exit code, stdout, stderr) each. Output goes to
    files: with pipes, waiting on one node while another fills its pipe's 64 KiB would deadlock both."""
    with contextlib.ExitStack() as files:
        running = []
        for cmd, env in commands:
            out, err = (files.enter_context(tempfile.TemporaryFile("w+")) for _ in range(2))
            running.append((subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True), out, err))
        results = []
        for proc, out, err in running:
            proc.wait(timeout=timeout)
            out.seek(0), err.seek(0)
            results.append((proc.returncode, out.read(), err.read()))
    return results


@pytest.fixture(scope="module")
def one_node(tiny_qwen3_path, tmp_path_factory):
    """The reference: one node, two processes (`--nproc 2`), the same knobs."""
    data = Path(__file__).parent / "fixtures" / "train" / "infonce.jsonl"
    out = tmp_path_factory.mktemp("one-node") / "out"
    return train.run(zero3_cfg(tiny_qwen3_path, data, out, nproc=2)), out


def assert_same_training(result, out, reference, ref_out):
    assert result["global_step"] == reference["global_step"] == 4
    np.testing.assert_allclose(result["loss_history"], reference["loss_history"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        result["eval_loss_history"], reference["eval_loss_history"], rtol=1e-5, atol=1e-6
    )
    assert [s for s, _ in result["eval_metrics_history"]] == [0, 2, 4]
    for (_, mine), (_, ref) in zip(
        result["eval_metrics_history"], reference["eval_metrics_history"], strict=True
    ):
        np.testing.assert_allclose(list(mine.values()), list(ref.values()), atol=1e-5)
    weights, ref_weights = load_file(out / "model.safetensors"), load_file(ref_out / "model.safetensors")
    assert weights.keys() == ref_weights.keys()
    for key, tensor in weights.items():
        np.testing.assert_allclose(tensor.numpy(), ref_weights[key].numpy(), atol=1e-5, err_msg=key)


def test_two_nodes_from_pet_variables_train_like_one_node_of_two_processes(
    one_node, tiny_qwen3_path, fixtures_dir, tmp_path
):
    reference, ref_out = one_node
    out = tmp_path / "shared" / "out"  # every node's output_dir: one folder, as on a ReadWriteMany volume
    cfg = zero3_cfg(tiny_qwen3_path, fixtures_dir / "train" / "infonce.jsonl", out)  # no --nodes / --nproc
    nodes = run_nodes(cfg)
    for rc, _, stderr in nodes:
        assert rc == 0, stderr[-3000:]
    (rc0, stdout0, stderr0), (_, stdout1, stderr1) = nodes
    result = json.loads(stdout0)
    assert json.loads(stdout1) == result  # node 1 returns what global rank 0 wrote to the shared folder
    assert result["world_size"] == 2 and result["nodes"] == 2 and result["global_batch_size"] == 8
    assert "launching 1 processes on node 0 of 2" in stderr0 and "on node 1 of 2" in stderr1
    assert "--nnodes 2 --node-rank 1 --master-addr 127.0.0.1" in stderr1
    saved = read_meta(out)["train_config"]
    assert (saved["nodes"], saved["nproc"]) == (2, 1)  # the job's topology, not the flags' defaults
    assert not list(out.glob("checkpoint-*")) and not list(out.glob(".embedtune-shared-*"))
    assert_same_training(result, out, reference, ref_out)


def test_a_preempted_two_node_job_resumes_on_both_nodes_from_the_shared_checkpoint(
    one_node, tiny_qwen3_path, fixtures_dir, tmp_path
):
    reference, ref_out = one_node
    out = tmp_path / "shared" / "out"
    cfg = zero3_cfg(tiny_qwen3_path, fixtures_dir / "train" / "infonce.jsonl", out, save_steps=2)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(PREEMPT)
    path = os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))
    stopped = run_nodes(cfg, env={"PYTHONPATH": path, "EMBEDTUNE_TEST_STOP_AFTER_SAVE": "2"})
    assert all(rc != 0 for rc, _, _ in stopped)
    ckpt = out / "checkpoint-2"
    assert (ckpt / "trainer_state.json").is_file() and not (out / "train_result.json").exists()
    assert sorted(p.name for p in ckpt.glob("rng_state_*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]

    nodes = run_nodes(cfg)  # the job again (a new TrainJob after the step's retry): same command
    for rc, _, stderr in nodes:
        assert rc == 0, stderr[-3000:]
    result = json.loads(nodes[0][1])
    assert result["resumed_from_step"] == 2 and "resuming from" in nodes[0][2]
    assert [s for s, _ in result["loss_history"]] == [1, 2, 3, 4]
    np.testing.assert_allclose(result["loss_history"], reference["loss_history"], rtol=1e-4)
    weights, ref_weights = load_file(out / "model.safetensors"), load_file(ref_out / "model.safetensors")
    for key, tensor in weights.items():
        np.testing.assert_allclose(tensor.numpy(), ref_weights[key].numpy(), atol=1e-5, err_msg=key)


def test_a_node_that_does_not_see_the_shared_output_folder_fails_every_node_before_training(
    tiny_qwen3_path, fixtures_dir, tmp_path
):
    data = fixtures_dir / "train" / "infonce.jsonl"
    cfg = zero3_cfg(tiny_qwen3_path, data, tmp_path / "node-local" / "out", deepspeed="none", eval_data="")
    port = free_port()
    procs = []
    for rank in range(2):  # each node its own output folder: node-local disks, not one shared volume
        node_cfg = dataclasses.replace(cfg, output_dir=str(tmp_path / f"node-{rank}" / "out"))
        env = {**os.environ, "PET_NNODES": "2", "PET_NODE_RANK": str(rank), "PET_NPROC_PER_NODE": "1",
               "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port)}  # fmt: skip
        procs.append(([sys.executable, "-m", "embedtune", "train", *config_flags(node_cfg)], env))
    for returncode, _, stderr in run_together(procs):
        assert returncode != 0
        assert "not shared between the nodes (ranks [1]" in stderr, stderr[-3000:]
    assert not list((tmp_path / "node-0" / "out").glob("checkpoint-*"))


def test_pet_variables_make_a_job_topology_and_a_partial_set_is_an_error():
    full = {"PET_NNODES": "3", "PET_NODE_RANK": "2", "PET_NPROC_PER_NODE": "8", "PET_MASTER_ADDR": "job-node-0-0.job", "PET_MASTER_PORT": "29500"}  # fmt: skip
    topo = job_topology(full)
    assert (topo.nnodes, topo.node_rank, topo.nproc_per_node, topo.master_addr, topo.master_port) == (
        3, 2, "8", "job-node-0-0.job", 29500)  # fmt: skip
    assert (
        job_topology({}) is None and job_topology({**full, "PET_NNODES": "1", "PET_NODE_RANK": "0"}) is None
    )
    with pytest.raises(EmbedtuneError, match="PET_MASTER_ADDR"):
        job_topology({k: v for k, v in full.items() if k != "PET_MASTER_ADDR"})
    with pytest.raises(EmbedtuneError, match="PET_NODE_RANK=3 is not in"):
        job_topology({**full, "PET_NODE_RANK": "3"})
