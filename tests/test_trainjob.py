"""The TrainJob launcher (`embedtune train --nodes N` outside a job): its body against the Trainer 2.3 schema,
and its life cycle through the real `kubernetes` client against a stand-in of the API server
(`tests/kube_standin.py`). No Kubernetes cluster runs here: what the pods do is played by the stand-in, which
in the first test runs the job's command as real processes, one per node."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from kube_standin import Behaviour, LocalNodes, StandIn, output_dir, validate_trainjob

from embedtune import trainjob
from embedtune.config import TrainConfig
from embedtune.errors import EmbedtuneError
from embedtune.io import read_json, write_json
from embedtune.launch import config_flags
from embedtune.steps import train

POD = "kfp-train-abc12"  # the step's own pod
GPU = "nvidia.com/gpu"


@pytest.fixture
def shared(tmp_path) -> Path:
    """The ReadWriteMany volume as this machine sees it: the step's pod mounts it here, so does every node."""
    path = tmp_path / "rwx"
    path.mkdir()
    return path


def step_pod(shared: Path, access=("ReadWriteMany",), deadline: int | None = 7200) -> tuple[dict, dict]:
    """The train step's pod as KFP and pipelines/cluster.py make it, and its shared claim."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": POD,
            "namespace": "team",
            "labels": {"pipelines.kubeflow.org/v2_component": "true"},
        },
        "spec": {
            "containers": [
                {
                    "name": "main",
                    "image": "ghcr.io/embedtune/embedtune-gpu:0.1.0",
                    "resources": {
                        "requests": {"cpu": "8", "memory": "64Gi"},
                        "limits": {GPU: "1"},
                    },
                    "env": [
                        {"name": "KFP_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "HF_HOME", "value": "/cache/huggingface"},
                        {
                            "name": "HF_TOKEN",
                            "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token", "optional": True}},
                        },
                    ],
                    "volumeMounts": [
                        {"name": "kfp-launcher", "mountPath": "/kfp-launcher"},
                        {"name": "shared", "mountPath": str(shared)},
                        {"name": "model-cache", "mountPath": "/cache/huggingface"},
                        {"name": "dshm", "mountPath": "/dev/shm"},
                    ],
                }
            ],
            "volumes": [
                {"name": "kfp-launcher", "emptyDir": {}},
                {"name": "shared", "persistentVolumeClaim": {"claimName": "embedtune-rwx"}},
                {"name": "model-cache", "persistentVolumeClaim": {"claimName": "hf-cache"}},
                {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}},
            ],
            "nodeSelector": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
            "tolerations": [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}],
            "imagePullSecrets": [{"name": "registry"}],
            **({"activeDeadlineSeconds": deadline} if deadline else {}),
        },
        "status": {"phase": "Running", "startTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    }
    claim = {
        "metadata": {"name": "embedtune-rwx"},
        "spec": {"accessModes": list(access)},
        "status": {"accessModes": list(access)},
    }
    return pod, claim


def cluster(behaviour: Behaviour, shared: Path, **kw) -> StandIn:
    api = StandIn(behaviour=behaviour)
    pod, claim = step_pod(shared, **kw)
    api.add_pod(pod)
    api.claims["embedtune-rwx"] = claim
    return api


def job_cfg(fixtures_dir, tmp_path, shared, **kw) -> TrainConfig:
    knobs = dict(
        model="Qwen/Qwen3-Embedding-0.6B",
        train_data=str(fixtures_dir / "train" / "infonce.jsonl"),
        eval_data=str(fixtures_dir / "train" / "infonce.jsonl"),
        output_dir=str(tmp_path / "out"),
        nodes=2,
        nproc=1,
        shared_dir=str(shared / "runs"),
        run_id="0c6b1b0e-6a4e-4d55-9a53-1f0c3f6c2d11",
        infonce_temperature=0.05,
    )
    knobs.update(kw)
    return TrainConfig(**knobs)


def launch(api: StandIn, cfg: TrainConfig, running_timeout_s: float = 30):
    return trainjob.run_on_nodes(
        cfg, api=api.api_client(), pod_name=POD, running_timeout_s=running_timeout_s, poll_s=0.05
    )


class Completes(Behaviour):
    """Pods run for a few API calls, node 0 logs, then the job is Complete with a model where --output-dir says
    (what the nodes of a real job leave on the shared volume)."""

    def __init__(self, after: int = 6):
        self.after, self.calls = after, 0

    def created(self, api, job):
        name = job["metadata"]["name"]
        for rank in range(job["spec"]["trainer"]["numNodes"]):
            pod = api.node_pod(name, rank, "Running")
            api.logs[pod["metadata"]["name"]] = f"embedtune train: node {rank} says hello\n"

    def tick(self, api):
        self.calls += 1
        for name, job in api.jobs.items():
            if self.calls >= self.after and not job.get("status"):
                out = output_dir(job)
                out.mkdir(parents=True, exist_ok=True)
                (out / "model.safetensors").write_bytes(b"weights")
                write_json(
                    out / "train_result.json",
                    {"global_step": 4, "world_size": 2, "nodes": 2, "output_dir": str(out)},
                )
                for pod in api.pods.values():
                    if pod["metadata"]["labels"].get("jobset.sigs.k8s.io/jobset-name") == name:
                        pod["status"]["phase"] = "Succeeded"
                api.set_condition(name, "Complete", "JobSetCompleted", "done")


# ------------------------------------------------------------------------------------------------ the body
def test_trainjob_body_passes_the_trainer_2_3_schema_and_mirrors_the_step_pod(fixtures_dir, tmp_path, shared):
    api = cluster(Behaviour(), shared)
    try:
        cfg = trainjob.stage(job_cfg(fixtures_dir, tmp_path, shared, nproc=8), shared / "runs" / "j")
        pod = trainjob.own_settings(trainjob.Cluster(*api.api_client()), POD, str(shared / "runs"))
        body = trainjob.trainjob_body("embedtune-j", "team", cfg, pod)
    finally:
        api.close()
    assert validate_trainjob(body) is None
    assert (
        validate_trainjob({**body, "spec": {**body["spec"], "podTemplateOverrides": []}}) is not None
    )  # v2.1's name
    spec, trainer = body["spec"], body["spec"]["trainer"]
    assert spec["runtimeRef"]["name"] == "torch-distributed"
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 8)  # an int, as Trainer >= 2.2 wants
    assert trainer["resourcesPerNode"] == {"requests": {"cpu": "8", "memory": "64Gi"}, "limits": {GPU: "1"}}
    assert trainer["command"] == ["embedtune", "train"] and trainer["args"] == config_flags(cfg)
    assert "--nodes=2" in trainer["args"] and f"--output-dir={shared}/runs/j/model" in trainer["args"]
    env = {e["name"] for e in trainer["env"]}
    assert env == {"PYTHONUNBUFFERED", "HF_HOME", "HF_TOKEN"}  # KFP's own variables stay with the step
    (patch,) = spec["runtimePatches"]
    node = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"][
        "template"
    ]["spec"]
    assert [v["name"] for v in node["volumes"]] == ["shared", "model-cache", "dshm"]  # not KFP's emptyDirs
    assert node["containers"] == [{"name": "node", "volumeMounts": [
        {"name": "shared", "mountPath": str(shared)},
        {"name": "model-cache", "mountPath": "/cache/huggingface"},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]}]  # fmt: skip
    assert node["tolerations"][0]["key"] == GPU and node["imagePullSecrets"] == [{"name": "registry"}]
    assert 7000 < spec["activeDeadlineSeconds"] <= 7200  # what is left of the step's timeout


def test_job_names_are_rfc1035_labels_derived_from_the_run_id_alone():
    ids = ["0c6b1b0e-6a4e-4d55-9a53-1f0c3f6c2d11", "Run_42/retry", "x" * 200, "--"]
    names = [trainjob.job_name(i) for i in ids]
    assert names == [trainjob.job_name(i) for i in ids]  # deterministic: a retry finds its job
    assert len(set(names)) == len(ids)
    for name in names:
        body = {
            "apiVersion": "trainer.kubeflow.org/v1alpha1",
            "kind": "TrainJob",
            "metadata": {"name": name},
            "spec": {"runtimeRef": {"name": "torch-distributed"}},
        }
        assert validate_trainjob(body) is None and len(name) + len("-node-0-0-abcde") <= 63


def test_a_shared_dir_on_a_read_write_once_claim_is_refused_before_any_job(fixtures_dir, tmp_path, shared):
    api = cluster(Behaviour(), shared, access=("ReadWriteOnce",))
    try:
        with pytest.raises(
            EmbedtuneError, match="embedtune-rwx has access modes .*ReadWriteOnce.*ReadWriteMany"
        ):
            launch(api, job_cfg(fixtures_dir, tmp_path, shared))
        with pytest.raises(EmbedtuneError, match="not on a PersistentVolumeClaim"):
            launch(api, job_cfg(fixtures_dir, tmp_path, shared, shared_dir=str(tmp_path / "elsewhere")))
    finally:
        api.close()
    assert api.created == []
    with pytest.raises(EmbedtuneError, match="needs shared_dir"):
        train.run(job_cfg(fixtures_dir, tmp_path, shared, shared_dir=""))


# ------------------------------------------------------------------------------------------------ life cycle
def test_completed_job_hands_its_model_to_the_step_and_is_deleted(fixtures_dir, tmp_path, shared, capsys):
    api = cluster(Completes(), shared)
    cfg = job_cfg(fixtures_dir, tmp_path, shared)
    try:
        result = launch(api, cfg)
    finally:
        api.close()
    (body,) = api.created
    name = body["metadata"]["name"]
    assert api.deleted == [name] and not api.jobs
    assert (
        result["global_step"] == 4 and result["output_dir"] == cfg.output_dir and result["trainjob"] == name
    )
    assert (Path(cfg.output_dir) / "model.safetensors").read_bytes() == b"weights"
    assert read_json(Path(cfg.output_dir) / "train_result.json")["output_dir"] == cfg.output_dir
    assert not (shared / "runs" / name).exists()  # staged rows and the job's model copy removed
    err = capsys.readouterr().err
    assert "embedtune train: node 0 says hello" in err and "node 1 says hello" not in err  # node 0's log


class PullError(Behaviour):
    def created(self, api, job):
        name = job["metadata"]["name"]
        waiting = {
            "waiting": {
                "reason": "ImagePullBackOff",
                "message": 'Back-off pulling image "ghcr.io/embedtune/embedtune-gpu:0.1.0"',
            }
        }
        for rank in range(2):
            pod = api.node_pod(name, rank, "Pending", containerStatuses=[{"name": "node", "state": waiting}])
            api.event(pod["metadata"]["name"], "Failed", "Failed to pull image: 403 Forbidden")


def test_an_image_pull_error_fails_at_once_with_the_reason_and_the_events(fixtures_dir, tmp_path, shared):
    api = cluster(PullError(), shared)
    t0 = time.monotonic()
    try:
        with pytest.raises(EmbedtuneError) as err:
            launch(api, job_cfg(fixtures_dir, tmp_path, shared), running_timeout_s=600)
    finally:
        api.close()
    assert time.monotonic() - t0 < 60  # not the 600 s Running timeout
    msg = str(err.value)
    assert "cannot start" in msg and "ImagePullBackOff" in msg and "403 Forbidden" in msg
    assert api.deleted == [api.created[0]["metadata"]["name"]]


class Unschedulable(Behaviour):
    def created(self, api, job):
        name = job["metadata"]["name"]
        why = "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."
        for rank in range(2):
            cond = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": why}]
            pod = api.node_pod(name, rank, "Pending", conditions=cond)
            api.event(pod["metadata"]["name"], "FailedScheduling", why)


def test_unschedulable_pods_fail_at_the_running_timeout_naming_the_scheduler_reason(
    fixtures_dir, tmp_path, shared, capsys
):
    api = cluster(Unschedulable(), shared)
    try:
        with pytest.raises(EmbedtuneError, match="not running after 1s") as err:
            launch(api, job_cfg(fixtures_dir, tmp_path, shared), running_timeout_s=1)
    finally:
        api.close()
    assert "Insufficient nvidia.com/gpu" in str(err.value) and "FailedScheduling" in str(err.value)
    assert "Unschedulable" in capsys.readouterr().err  # said when first seen, not only at the timeout
    assert api.deleted and not api.jobs


class Fails(Behaviour):
    """Both nodes run; node 0's training fails with a user error; the JobSet fails the job."""

    def __init__(self):
        self.calls = 0

    def created(self, api, job):
        name = job["metadata"]["name"]
        for rank in range(2):
            pod = api.node_pod(name, rank, "Running")
            api.logs[pod["metadata"]["name"]] = (
                f"embedtune train: launching 1 processes on node {rank} of 2\n"
                "embedtune train: error: train.jsonl:3: label: 0.7 is not 0 or 1\n"
            )

    def tick(self, api):
        self.calls += 1
        for name, job in api.jobs.items():
            if self.calls >= 8 and not job.get("status"):
                for pod in api.pods.values():
                    pod["status"]["phase"] = "Failed"
                    pod["status"]["containerStatuses"] = [
                        {"name": "node", "state": {"terminated": {"exitCode": 2, "reason": "Error"}}}
                    ]
                api.set_condition(name, "Failed", "JobSetFailed", "jobset failed: node-0 failed")
                api.event(name, "JobSetFailed", "FailedJobs: embedtune-x-node-0 BackoffLimitExceeded")


def test_a_failed_job_raises_its_conditions_exit_codes_events_and_node0_log(fixtures_dir, tmp_path, shared):
    api = cluster(Fails(), shared)
    try:
        with pytest.raises(EmbedtuneError) as err:
            launch(api, job_cfg(fixtures_dir, tmp_path, shared))
    finally:
        api.close()
    msg = str(err.value)
    assert "failed" in msg and "condition Failed: JobSetFailed: jobset failed: node-0 failed" in msg
    assert "exit code 2 (Error)" in msg and "BackoffLimitExceeded" in msg
    assert "node 0's last lines" in msg and "label: 0.7 is not 0 or 1" in msg
    assert len(api.created) == 1 and api.deleted and not api.jobs
    assert not Path(tmp_path / "out").exists()


class RunsForever(Behaviour):
    def created(self, api, job):
        for rank in range(2):
            pod = api.node_pod(job["metadata"]["name"], rank, "Running")
            api.logs[pod["metadata"]["name"]] = "embedtune train: step 1/1000 | loss 2.1\n"


def test_sigterm_cancels_the_step_and_deletes_its_job(fixtures_dir, tmp_path, shared):
    api = cluster(RunsForever(), shared)

    def terminate_when_streaming():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(path.endswith("/log") for _, path in api.calls):
            time.sleep(0.05)
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGTERM)  # what the kubelet sends when a run is cancelled

    killer = threading.Thread(target=terminate_when_streaming)
    killer.start()
    try:
        with pytest.raises(trainjob.Cancelled, match="deleted"):
            launch(api, job_cfg(fixtures_dir, tmp_path, shared))
    finally:
        killer.join()
        api.close()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the step's handler is gone again
    assert api.deleted == [api.created[0]["metadata"]["name"]] and not api.jobs


def test_a_retried_step_attaches_to_its_running_job_and_replaces_its_failed_one(
    fixtures_dir, tmp_path, shared
):
    cfg = job_cfg(fixtures_dir, tmp_path, shared)
    name = trainjob.job_name(cfg.run_id)
    body = {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
            "metadata": {"name": name, "namespace": "team"},
            "spec": {"trainer": {"numNodes": 2, "args": [f"--output-dir={shared}/runs/{name}/model"]}}}  # fmt: skip

    # the first attempt's pod died (OOM-killed, node lost) while its job ran on: the retry attaches
    behaviour = Completes(after=10)
    api = cluster(behaviour, shared)
    api.jobs[name] = json.loads(json.dumps(body))
    behaviour.created(api, body)
    try:
        result = launch(api, cfg)
    finally:
        api.close()
    assert api.created == [] and result["global_step"] == 4  # no second job
    assert api.deleted == [name]

    # the first attempt's job failed (a node was preempted): the retry replaces it, once
    api = cluster(Completes(after=10), shared)
    api.jobs[name] = {
        **json.loads(json.dumps(body)),
        "status": {"conditions": [{"type": "Failed", "status": "True", "reason": "JobSetFailed"}]},
    }
    try:
        result = launch(api, job_cfg(fixtures_dir, tmp_path, shared, output_dir=str(tmp_path / "out2")))
    finally:
        api.close()
    assert [b["metadata"]["name"] for b in api.created] == [name] and api.deleted == [name, name]
    assert result["global_step"] == 4


def test_a_model_finished_on_the_shared_volume_is_handed_over_without_a_job(
    fixtures_dir, tmp_path, shared, capsys
):
    """The job completed but the step died before copying: the retry copies, creates nothing."""
    cfg = job_cfg(fixtures_dir, tmp_path, shared)
    home = shared / "runs" / trainjob.job_name(cfg.run_id)
    job = trainjob.stage(cfg, home)
    model = Path(job.output_dir)
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"w")
    from dataclasses import asdict

    write_json(model / "train_result.json", {"global_step": 3, "config": asdict(job)})
    result = trainjob.run_on_nodes(cfg, api=("no API call expected", "team"))
    assert result["global_step"] == 3 and (Path(cfg.output_dir) / "model.safetensors").is_file()
    assert "already holds this finished run" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ for real
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_embedtune_train_nodes_2_runs_the_trainjob_command_on_two_local_nodes(
    tiny_qwen3_path, fixtures_dir, tmp_path, shared, monkeypatch, capsys
):
    """`embedtune train --nodes 2` from a pod: the TrainJob it submits, run by the stand-in as two real node
    processes with the runtime's PET_* variables (DDP on gloo), trains, and the model comes back."""
    api = cluster(LocalNodes(tmp_path), shared)
    monkeypatch.setenv("KUBECONFIG", str(api.kubeconfig(tmp_path / "kubeconfig")))
    monkeypatch.setenv("HOSTNAME", POD)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    cfg = job_cfg(
        fixtures_dir, tmp_path, shared, model=str(tiny_qwen3_path), deepspeed="none", max_steps=2,
        per_device_train_batch_size=4, max_length=32, learning_rate=1e-4, logging_steps=1, save_steps=0,
    )  # fmt: skip
    try:
        result = train.run(cfg)
    finally:
        api.close()
    assert len(api.created) == 1 and api.deleted == [api.created[0]["metadata"]["name"]]
    assert result["nodes"] == 2 and result["world_size"] == 2 and result["global_step"] == 2
    assert result["global_batch_size"] == 8 and len(result["eval_metrics"]) == 6
    assert (Path(cfg.output_dir) / "model.safetensors").is_file()
    from embedtune.modeling import Embedder

    assert Embedder.from_pretrained(cfg.output_dir).encode(["a cat"]).shape == (1, 64)
    err = capsys.readouterr().err
    assert "launching 1 processes on node 0 of 2" in err  # node 0's log, streamed by the step
