"""The deploy step against a real `mlflow server` and the stand-in Kubernetes API server (tests/kube_standin.py).

The InferenceService bodies are checked by the stand-in against KServe 0.21's API models (a field KServe does
not know, or of the wrong shape, is refused as the API server's schema would refuse it).
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from kube_standin import Behaviour, StandIn, validate_inference_service

from embedtune.config import DeployConfig, RegisterConfig
from embedtune.errors import EmbedtuneError
from embedtune.inferenceservice import service_body, service_name
from embedtune.modeling import Embedder
from embedtune.steps import deploy, register

EMBEDTUNE = Path(sys.executable).parent / "embedtune"
KNOBS = {
    "image": "registry.example/embedtune-gpu:0.1.0", "tracking_uri": "http://mlflow.mlflow:5000", "gpus": 1,
    "accelerator_type": "nvidia.com/gpu", "min_replicas": 1, "max_replicas": 2, "mlflow_secret": "mlflow-credentials",
    "api_key_secret": "serve-key", "served_model_name": "my-embedder", "dtype": "auto", "max_batch_tokens": 16384,
    "max_wait_ms": 5.0, "max_input_tokens": 0, "truncate": True, "max_inputs": 2048,
}  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_qwen3_path) -> Path:
    out = tmp_path_factory.mktemp("deploy") / "tiny-embedder"
    Embedder.from_pretrained(tiny_qwen3_path).save_pretrained(
        out, meta={"base_model": "tiny", "train_type": "full"}
    )
    return out


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    api = StandIn(namespace="team")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(api.kubeconfig(tmp_path / "kubeconfig")))
    try:
        yield api
    finally:
        api.close()


def registered(mlflow_server, model_dir, tmp_path, name: str, run_id: str, value: float) -> dict:
    metrics = tmp_path / f"metrics-{run_id}.json"
    metrics.write_text(
        json.dumps({"primary_metric": "ndcg_at_10", "primary_value": value, "metrics": {"ndcg_at_10": value}})
    )
    return register.run(
        RegisterConfig(
            model=str(model_dir), metrics=str(metrics), name=name, tracking_uri=mlflow_server, run_id=run_id
        )
    )


def cfg(mlflow_server, name: str, run_id: str, **kw) -> DeployConfig:
    return DeployConfig(
        name=name, serve_image=KNOBS["image"], run_id=run_id, tracking_uri=mlflow_server, **kw
    )


def test_the_manifest_is_a_valid_inference_service_running_embedtune_serve_on_the_version():
    body = service_body("my-embedder", "team", "models:/my-embedder/7", KNOBS)
    assert validate_inference_service(body) is None  # KServe 0.21's own API models take it as it is
    predictor = body["spec"]["predictor"]
    (container,) = predictor["containers"]
    assert container["command"] == ["embedtune", "serve"]
    args = container["args"]
    assert args[:6] == ["--model", "models:/my-embedder/7", "--host", "0.0.0.0", "--port", "8080"]
    assert (
        args[args.index("--truncate") + 1] == "true" and args[args.index("--max-batch-tokens") + 1] == "16384"
    )
    assert args[-2:] == ["--api-key-env", "EMBEDTUNE_API_KEY"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": 8080}
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow.mlflow:5000"
    assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "mlflow-credentials", "key": "MLFLOW_TRACKING_PASSWORD", "optional": True
    }  # fmt: skip
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (1, 2)
    broken = json.loads(json.dumps(body))
    broken["spec"]["predictor"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/ready"
    assert "schema" in validate_inference_service(broken)  # the check can fail
    cpu = service_body("x", "team", "models:/x/1", {**KNOBS, "gpus": 0, "api_key_secret": ""})
    assert (
        "resources" not in cpu["spec"]["predictor"]["containers"][0]
        and validate_inference_service(cpu) is None
    )
    assert service_name("My_Embedder v2") == "my-embedder-v2" and service_name("7up") == "m-7up"
    long = service_name("x" * 80)
    assert len(long) <= 45 and long.startswith("x") and long != service_name("x" * 81)


def test_deploy_serves_the_champion_updates_it_as_a_canary_and_skips_a_version_that_is_not_champion(
    mlflow_server, model_dir, tmp_path, cluster
):
    name = f"dep-{uuid.uuid4().hex[:8]}"
    registered(mlflow_server, model_dir, tmp_path, name, "run-1", 0.5)
    first = deploy.run(cfg(mlflow_server, name, "run-1"))
    assert first["deployed"] and first["action"] == "created" and first["version"] == "1"
    assert first["url"] == f"http://{name}.team.example.com" and first["model_uri"] == f"models:/{name}/1"
    (created,) = cluster.created
    assert created["spec"]["predictor"]["containers"][0]["args"][1] == f"models:/{name}/1"
    assert "canaryTrafficPercent" not in created["spec"]["predictor"]

    again = deploy.run(cfg(mlflow_server, name, "run-1"))  # a retried step: nothing to change
    assert again["action"] == "unchanged" and not cluster.patches

    registered(mlflow_server, model_dir, tmp_path, name, "run-2", 0.7)  # better: the new champion
    second = deploy.run(cfg(mlflow_server, name, "run-2", canary_traffic_percent=20))
    assert second["deployed"] and second["action"] == "updated" and second["version"] == "2"
    (patch,) = cluster.patches
    assert patch["spec"]["predictor"]["canaryTrafficPercent"] == 20
    service = cluster.services[service_name(name)]
    assert service["spec"]["predictor"]["containers"][0]["args"][1] == f"models:/{name}/2"
    assert validate_inference_service({k: v for k, v in service.items() if k != "status"}) is None

    registered(mlflow_server, model_dir, tmp_path, name, "run-3", 0.6)  # worse: stays challenger
    calls = len(cluster.calls)
    third = deploy.run(cfg(mlflow_server, name, "run-3"))
    assert not third["deployed"] and third["reason"] == "v3 is not the champion (champion: v2)"
    assert len(cluster.calls) == calls  # the cluster is not touched
    nothing = deploy.run(cfg(mlflow_server, name, "run-never-registered"))
    assert not nothing["deployed"] and "registered no version" in nothing["reason"]

    full = deploy.run(cfg(mlflow_server, name, "run-2"))  # canary done: 100 takes the canary field away
    assert full["action"] == "unchanged"  # (the same version: left as it is)


class NeverReady(Behaviour):
    def service_changed(self, api, service):
        service["status"] = {
            "conditions": [
                {
                    "type": "Ready",
                    "status": "False",
                    "reason": "RevisionMissing",
                    "message": "Revision embedder-predictor-00001 failed: ImagePullBackOff",
                }
            ]  # fmt: skip
        }


def test_a_service_that_never_gets_ready_fails_the_step_with_its_conditions(
    mlflow_server, model_dir, tmp_path, cluster
):
    cluster.behaviour = NeverReady()
    name = f"dep-{uuid.uuid4().hex[:8]}"
    registered(mlflow_server, model_dir, tmp_path, name, "run-1", 0.5)
    with pytest.raises(
        EmbedtuneError, match=r"not Ready after 1s: Ready=False \(RevisionMissing: .*ImagePullBackOff"
    ):
        deploy.run(cfg(mlflow_server, name, "run-1", ready_timeout_s=1))


def test_deploy_refuses_a_local_store_and_bad_knobs_in_one_line(tmp_path):
    cases = [
        (["--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"], "tracking_uri: sqlite:"),
        (
            ["--tracking-uri", "http://mlflow:5000", "--canary-traffic-percent", "0"],
            "canary_traffic_percent: 0",
        ),
        (["--tracking-uri", "http://mlflow:5000", "--max-replicas", "0"], "max_replicas"),
    ]
    for flags, message in cases:
        r = subprocess.run([str(EMBEDTUNE), "deploy", "--name", "m", "--serve-image", "img", *flags],
                           capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"})  # fmt: skip
        assert r.returncode == 2, r.stderr
        (line,) = r.stderr.strip().splitlines()
        assert line.startswith("embedtune deploy: error: ") and message in line


def test_the_pipeline_deploys_after_register_only_when_asked(tmp_path):
    import yaml
    from kfp import compiler

    from pipelines.pipeline import embedtune_pipeline

    out = tmp_path / "p.yaml"
    compiler.Compiler().compile(embedtune_pipeline, str(out))
    spec = next(yaml.safe_load_all(out.read_text()))
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert (
        params["deploy_model"]["defaultValue"] is False
        and "InferenceService" in params["deploy_model"]["description"]
    )
    for knob in ("canary_traffic_percent", "serve_gpus", "max_batch_tokens", "service_name"):
        assert params[knob]["description"], knob
    found = []

    def walk(dag, conditions, after):  # conditions and dependencies of the task and of the DAGs around it
        for task_name, task in dag["tasks"].items():
            cond = task.get("triggerPolicy", {}).get("condition", "")
            deps = [*after, *task.get("dependentTasks", [])]
            sub = spec["components"][task["componentRef"]["name"]].get("dag")
            if sub:
                walk(sub, [*conditions, cond], deps)
            elif task_name.startswith("deploy"):
                found.append(([*conditions, cond], deps))

    walk(spec["root"]["dag"], [], [])
    assert len(found) == 3  # after register: the lora (merged) and full branches, and the weights-merged one
    for conditions, after in found:
        assert any("deploy_model" in c for c in conditions) and any(t.startswith("register") for t in after)
