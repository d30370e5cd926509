"""register against a real `mlflow server` (sqlite store, artifacts proxied) on 127.0.0.1.

The server is the session fixture `mlflow_server`; each test uses its own registered model name.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from embedtune.config import RegisterConfig
from embedtune.errors import EmbedtuneError
from embedtune.io import write_json
from embedtune.launch import free_port
from embedtune.modeling import Embedder, Reranker
from embedtune.steps import register

QUERY_INSTRUCTION = "query: "


@pytest.fixture(scope="module")
def embedder_dir(tmp_path_factory, minilm_path) -> Path:
    """MiniLM as train writes a folder: the library's own save (sentence-transformers files + embedtune.json)."""
    out = tmp_path_factory.mktemp("register") / "minilm"
    model = Embedder.from_pretrained(minilm_path, query_instruction=QUERY_INSTRUCTION, max_length=128)
    train_config = {"model": "sentence-transformers/all-MiniLM-L6-v2", "loss_type": "infonce",
                    "learning_rate": 2e-5, "lora_rank": 16, "pooling": "auto", "infonce_temperature": 0.01}  # fmt: skip
    model.save_pretrained(
        out,
        meta={
            "base_model": "sentence-transformers/all-MiniLM-L6-v2",
            "train_type": "full",
            "train_config": train_config,
        },
    )
    return out


def metrics_file(tmp_path: Path, value: float, nested: bool = True) -> Path:
    path = tmp_path / f"metrics-{uuid.uuid4().hex[:6]}.json"
    if nested:
        data = {
            "primary_metric": "ndcg_at_10",
            "primary_value": value,
            "metrics": {"ndcg_at_10": value, "map": value - 0.1, "mrr@10": value - 0.05},
            "baseline_metrics": {"ndcg_at_10": 0.5, "map": 0.4, "mrr@10": 0.45},
            "deltas": {"delta_ndcg_at_10": value - 0.5},
            "n_eval": 12,
        }
    else:
        data = {"primary_metric": "ndcg_at_10", "ndcg_at_10": value, "map": value - 0.1}
    path.write_text(json.dumps(data))
    return path


def cfg(uri: str, model: Path, metrics: Path, name: str, **kw) -> RegisterConfig:
    return RegisterConfig(model=str(model), metrics=str(metrics), name=name, tracking_uri=uri, **kw)


def new_name() -> str:
    return f"emb-{uuid.uuid4().hex[:8]}"


def test_register_creates_version_with_aliases_params_and_lineage(
    mlflow_server, embedder_dir, tmp_path, capsys
):
    stats = tmp_path / "data.jsonl.stats.json"
    write_json(stats, {"rows": 10, "fingerprint": "sha256:abc123"})
    name = new_name()
    metrics_json = metrics_file(tmp_path, 0.8)
    Path(f"{metrics_json}.md").write_text("# evaluation report\n")  # evaluate's report, beside its JSON
    out = register.run(
        cfg(mlflow_server, embedder_dir, metrics_json, name, run_id="pipe-1",
            dataset_stats=str(stats), image="embedtune-cpu:0.1.0")
    )  # fmt: skip
    assert out["created"] and out["version"] == "1" and out["promoted"]
    assert out["aliases"] == ["challenger", "champion"]
    assert out["model_uri"] == f"models:/{name}@champion"
    assert out["primary_metric"] == "ndcg_at_10" and out["primary_value"] == pytest.approx(0.8)
    assert out["champion_value_before"] is None
    assert "promoted to champion" in capsys.readouterr().err

    client = MlflowClient(mlflow_server)
    mv = client.get_model_version(name, "1")
    assert "| **ndcg_at_10** | 0.5000 | 0.8000 | +0.3000 |" in mv.description  # base, tuned, delta
    assert mv.tags["embedtune.pipeline_run_id"] == "pipe-1"
    run = client.get_run(out["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    assert tags["embedtune.dataset_fingerprint"] == "sha256:abc123"
    assert tags["embedtune.base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert tags["embedtune.image"] == "embedtune-cpu:0.1.0"
    assert tags["embedtune.version"] and tags["embedtune.decision"] == out["decision"]
    # train_config knobs under their own names; the effective top-level value wins (pooling auto -> mean)
    assert params["learning_rate"] == "2e-05" and params["lora_rank"] == "16" and params["pooling"] == "mean"
    assert params["n_eval"] == "12" and params["primary_metric"] == "ndcg_at_10"
    assert metrics["mrr_at_10"] == pytest.approx(0.75) and metrics["baseline_map"] == pytest.approx(0.4)
    assert metrics["delta_ndcg_at_10"] == pytest.approx(0.3)
    assert not any("@" in k for k in metrics)
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert logged == {f"evaluation/{metrics_json.name}", f"evaluation/{metrics_json.name}.md"}


def test_register_same_run_id_returns_existing_version_and_creates_none(
    mlflow_server, embedder_dir, tmp_path
):
    name = new_name()
    first = register.run(cfg(mlflow_server, embedder_dir, metrics_file(tmp_path, 0.7), name, run_id="r-42"))
    client = MlflowClient(mlflow_server)
    runs_before = len(client.search_runs([client.get_experiment_by_name("embedtune").experiment_id]))
    t0 = time.monotonic()
    again = register.run(cfg(mlflow_server, embedder_dir, metrics_file(tmp_path, 0.9), name, run_id="r-42"))
    assert time.monotonic() - t0 < 10  # no model load, no upload
    assert not again["created"] and again["version"] == first["version"]
    assert again["primary_value"] == pytest.approx(0.7)  # the registered version's facts, not the new file's
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
    assert len(client.search_runs([client.get_experiment_by_name("embedtune").experiment_id])) == runs_before


def test_champion_gate_promotes_only_a_better_model(mlflow_server, embedder_dir, tmp_path):
    name = new_name()
    client = MlflowClient(mlflow_server)
    register.run(cfg(mlflow_server, embedder_dir, metrics_file(tmp_path, 0.70), name))

    worse = register.run(cfg(mlflow_server, embedder_dir, metrics_file(tmp_path, 0.65), name))
    assert not worse["promoted"] and worse["aliases"] == ["challenger"]
    assert worse["champion_value_before"] == pytest.approx(0.70) and worse["primary_value"] == pytest.approx(
        0.65
    )
    assert "0.65 <= champion 0.7" in worse["decision"]
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    assert worse["model_uri"] == f"models:/{name}/2"

    # better, but not by min_improvement: stays challenger
    small = register.run(
        cfg(
            mlflow_server,
            embedder_dir,
            metrics_file(tmp_path, 0.72, nested=False),
            name,
            min_improvement=0.05,
        )
    )
    assert not small["promoted"] and client.get_model_version_by_alias(name, "champion").version == "1"
    assert client.get_model_version_by_alias(name, "challenger").version == small["version"]

    better = register.run(
        cfg(mlflow_server, embedder_dir, metrics_file(tmp_path, 0.80), name, min_improvement=0.05)
    )
    assert better["promoted"] and better["champion_value_before"] == pytest.approx(0.70)
    assert client.get_model_version_by_alias(name, "champion").version == better["version"] == "4"
    assert client.get_model_version(name, better["version"]).tags["embedtune.promoted"] == "true"


def test_consumer_loads_champion_and_gets_the_models_own_normalized_embeddings(
    mlflow_server, embedder_dir, minilm_path, tmp_path
):
    import mlflow
    from sentence_transformers import SentenceTransformer

    name = new_name()
    register.run(cfg(mlflow_server, embedder_dir, metrics_file(tmp_path, 0.8), name))
    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    texts = ["A man is eating food.", "The weather is nice today.", "Kubeflow runs pipelines."]
    got = np.asarray(model.predict(texts))
    st = SentenceTransformer(str(minilm_path), device="cpu")
    want = st.encode(texts, normalize_embeddings=True)
    assert got.shape == want.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # the query instruction saved with the model is applied on request only
    queries = np.asarray(model.predict(texts[:1], params={"prompt_name": "query"}))
    np.testing.assert_allclose(
        queries, st.encode([QUERY_INSTRUCTION + texts[0]], normalize_embeddings=True), atol=1e-5
    )


def test_unreachable_server_fails_fast_naming_the_uri_and_registers_nothing(
    mlflow_server, embedder_dir, tmp_path, monkeypatch
):
    for key in register.HTTP_DEFAULTS:
        monkeypatch.delenv(key, raising=False)  # our bounded defaults, not whatever the caller's env says
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    name = new_name()
    t0 = time.monotonic()
    with pytest.raises(EmbedtuneError, match=rf"{dead}.*not reachable after 3 retries"):
        register.run(cfg(dead, embedder_dir, metrics_file(tmp_path, 0.8), name, run_id="x"))
    assert time.monotonic() - t0 < 30
    assert MlflowClient(mlflow_server).search_registered_models(f"name = '{name}'") == []


def test_failure_after_the_run_started_marks_it_failed_and_leaves_no_version(
    mlflow_server, embedder_dir, tmp_path, monkeypatch
):
    from mlflow.exceptions import MlflowException

    def refuse(self, name, alias, version):
        raise MlflowException("alias service down")

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", refuse)
    name = new_name()
    with pytest.raises(EmbedtuneError, match="registering .* failed .*alias service down"):
        register.run(cfg(mlflow_server, embedder_dir, metrics_file(tmp_path, 0.8), name, run_id="half"))
    monkeypatch.undo()
    client = MlflowClient(mlflow_server)
    assert client.search_registered_models(f"name = '{name}'") == []
    runs = client.search_runs(
        [client.get_experiment_by_name("embedtune").experiment_id],
        "tags.`embedtune.pipeline_run_id` = 'half'",
    )
    assert [r.info.status for r in runs] == ["FAILED"]


def test_secrets_from_env_never_reach_params_tags_or_output(
    mlflow_server, embedder_dir, tmp_path, monkeypatch, capfd, caplog
):
    secret = "tok-" + uuid.uuid4().hex
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", secret)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secret + "-pw")
    user = "user-" + uuid.uuid4().hex
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    # a knob that happens to carry the secret (a base model URL with credentials) is masked, not stored
    model = tmp_path / "model"
    shutil.copytree(embedder_dir, model)
    meta = json.loads((model / "embedtune.json").read_text())
    meta["train_config"]["model"] = f"https://user:{secret}@models.example.com/minilm"
    write_json(model / "embedtune.json", meta)
    out = register.run(cfg(mlflow_server, model, metrics_file(tmp_path, 0.8), new_name(), run_id="s-1"))

    client = MlflowClient(mlflow_server)
    run = client.get_run(out["mlflow_run_id"])
    mv = client.get_model_version(out["name"], out["version"])
    saved_meta = Path(client.download_artifacts(run.info.run_id, "embedtune.json", str(tmp_path))).read_text()
    seen = json.dumps([run.data.params, run.data.tags, mv.tags, mv.description, out, saved_meta])
    seen += str(capfd.readouterr()) + caplog.text
    assert secret not in seen and user not in seen
    assert run.data.params["model"] == "https://***@models.example.com/minilm"  # user and password


def test_bad_metrics_file_names_the_file_before_contacting_mlflow(embedder_dir, tmp_path):
    bad = tmp_path / "m.json"
    bad.write_text(json.dumps({"metrics": {"map": 0.5}}))
    with pytest.raises(EmbedtuneError, match=rf"{bad}: primary_metric: missing"):
        register.run(cfg("http://127.0.0.1:9", embedder_dir, bad, "x"))


def test_reranker_registers_as_pyfunc_scoring_query_document_pairs(mlflow_server, tiny_qwen3_path, tmp_path):
    import mlflow
    import pandas as pd

    model = tmp_path / "reranker"
    Reranker.from_pretrained(tiny_qwen3_path, max_length=128).save_pretrained(
        model,
        meta={
            "base_model": "tiny-qwen3",
            "train_type": "full",
            "train_config": {"loss_type": "pointwise_reranker"},
        },
    )
    (model / "checkpoint-5").mkdir()  # left out of the logged model
    (model / "checkpoint-5" / "optimizer.pt").write_bytes(b"x" * 10)
    name = f"rr-{uuid.uuid4().hex[:8]}"
    out = register.run(cfg(mlflow_server, model, metrics_file(tmp_path, 0.6), name))
    assert out["promoted"]
    mlflow.set_tracking_uri(mlflow_server)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    pairs = pd.DataFrame(
        {"query": ["cat", "cat", "music"], "document": ["the cat", "a dog", "art and music"]}
    )
    got = np.asarray(pyfunc.predict(pairs))
    want = Reranker.from_pretrained(model).score_pairs(pairs["query"].tolist(), pairs["document"].tolist())
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert got.shape == (3,) and ((got >= 0) & (got <= 1)).all()
    as_dicts = pyfunc.predict(pairs.to_dict("records"))
    as_pairs = pyfunc.unwrap_python_model().predict(
        None, list(zip(pairs["query"], pairs["document"], strict=True))
    )
    np.testing.assert_allclose(np.asarray(as_dicts), want, atol=1e-5)
    np.testing.assert_allclose(as_pairs, want, atol=1e-5)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/1"))
    assert not list(local.rglob("checkpoint-5"))


def test_default_store_is_local_sqlite_with_artifacts_beside_it(embedder_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = register.run(cfg("", embedder_dir, metrics_file(tmp_path, 0.8), new_name()))
    home = tmp_path / ".embedtune"
    assert out["tracking_uri"] == f"sqlite:///{home / 'mlflow.db'}" and out["promoted"]
    assert (home / "mlflow.db").is_file()
    assert list((home / "mlartifacts").rglob("model.safetensors"))  # not ./mlruns of the working folder


def test_champion_measured_with_another_metric_is_not_replaced():
    promote, decision = register.champion_gate("ndcg_at_10", 0.9, "3", "spearman_cosine", 0.5, 0.0)
    assert not promote and "not comparable" in decision and "v3" in decision


def test_cli_prints_one_line_and_exits_2_on_a_bad_metrics_file(embedder_dir, tmp_path, capsys):
    from embedtune.cli import main

    bad = tmp_path / "m.json"
    bad.write_text("{not json")
    assert main(["register", "--model", str(embedder_dir), "--metrics", str(bad), "--name", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"embedtune register: error: {bad}: invalid JSON")


def test_a_guard_failure_keeps_the_champion_and_guard_metrics_are_logged(
    mlflow_server, embedder_dir, tmp_path
):
    name = new_name()
    register.run(cfg(mlflow_server, embedder_dir, metrics_file(tmp_path, 0.70), name))
    path = metrics_file(tmp_path, 0.90)  # much better on its own eval set, but it lost general ability
    data = json.loads(path.read_text())
    data["guards"] = {"general": {"primary_metric": "spearman_cosine", "value": 0.61, "baseline_value": 0.80,
                                  "delta": -0.19, "data_shape": "sts"}}  # fmt: skip
    data["guard_failures"] = ["general"]
    path.write_text(json.dumps(data))
    result = register.run(cfg(mlflow_server, embedder_dir, path, name))
    assert not result["promoted"] and result["aliases"] == ["challenger"]
    assert "guard set(s) general fell more than max_guard_drop" in result["decision"]
    client = MlflowClient(mlflow_server)
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    run = client.get_run(client.get_model_version(name, result["version"]).run_id)
    assert run.data.metrics["guard_general_spearman_cosine"] == pytest.approx(0.61)
    assert run.data.metrics["delta_guard_general_spearman_cosine"] == pytest.approx(-0.19)
