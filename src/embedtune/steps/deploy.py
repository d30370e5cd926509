"""deploy: serve this run's registered model as a KServe InferenceService running `embedtune serve`.

    embedtune deploy --name my-embedder --serve-image registry/embedtune-gpu:0.1.0 --run-id "$RUN_ID" \\
        --tracking-uri http://mlflow.mlflow:5000 [--canary-traffic-percent 20] [--serve-gpus 1]

Read top to bottom:
1. Check the knobs: the tracking URI must be a server the predictor pods can reach (a local sqlite or file
   store lives on this pod's disk only).
2. Ask the registry which version this run registered (`registry.find_registered`, by `run_id`) and which is
   the champion. Deploy only when they are the same version (the pipeline runs this step after register, and
   register promotes only a better model); otherwise return `deployed: false` with the reason. Without a
   run id, the champion is deployed.
3. Build the manifest (`inferenceservice.service_body`: the version's `models:/NAME/VERSION`, the serve knobs),
   create the service or update it (a canary below 100 %), wait until it is Ready, return its URL.
"""

from __future__ import annotations

import os

from embedtune.config import DeployConfig
from embedtune.errors import EmbedtuneError
from embedtune.inferenceservice import SERVE_KNOBS, Services, apply_and_wait, service_body, service_name
from embedtune.progress import say


def run(cfg: DeployConfig) -> dict:
    """Deploy `cfg.name`'s version of this run when it is the champion (the cluster: `kube.connect`, in-cluster
    or the kubeconfig). Returns whether it deployed, why, the service, its URL and the model URI."""
    # ---------------------------------------------------------------- 1. knobs
    uri = check_knobs(cfg)
    name = cfg.service_name or service_name(cfg.name)

    # ---------------------------------------------------------------- 2. this run's version, if champion
    import mlflow
    from mlflow import MlflowClient

    from embedtune.registry import current_champion, find_registered

    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    champion, _, _ = current_champion(client, cfg.name)
    ours = find_registered(client, cfg.name, cfg.run_id) if cfg.run_id else None
    version = ours.version if ours is not None else (champion if not cfg.run_id else None)
    result = {"deployed": False, "service": name, "model": cfg.name, "version": version, "champion": champion}
    if version is None:
        reason = (
            f"run {cfg.run_id} registered no version of {cfg.name}"
            if cfg.run_id
            else f"{cfg.name} has no champion"
        )
        say("deploy", f"not deployed: {reason}")
        return {**result, "reason": reason}
    if str(version) != str(champion):
        reason = f"v{version} is not the champion (champion: {f'v{champion}' if champion else 'none'})"
        say("deploy", f"not deployed: {reason}")
        return {**result, "reason": reason}

    # ---------------------------------------------------------------- 3. the service
    from embedtune.kube import connect

    api_client, namespace = connect()
    namespace = cfg.namespace or namespace
    model_uri = f"models:/{cfg.name}/{version}"
    knobs = {
        "image": cfg.serve_image, "tracking_uri": uri, "gpus": cfg.serve_gpus, "accelerator_type": cfg.accelerator_type,
        "min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas, "mlflow_secret": cfg.mlflow_secret,
        "api_key_secret": cfg.api_key_secret, "served_model_name": cfg.name,
        **{k: getattr(cfg, k) for k in SERVE_KNOBS},
    }  # fmt: skip
    body = service_body(name, namespace, model_uri, knobs)
    done = apply_and_wait(
        Services(api_client, namespace), body, cfg.canary_traffic_percent, cfg.ready_timeout_s
    )
    say("deploy", f"{namespace}/{name} serves {model_uri} at {done['url']}")
    return {**result, "deployed": True, "reason": "champion", "action": done["action"], "url": done["url"],
            "namespace": namespace, "model_uri": model_uri, "canary_traffic_percent": cfg.canary_traffic_percent}  # fmt: skip


def check_knobs(cfg: DeployConfig) -> str:
    """Refuse what cannot deploy before any call; returns the tracking URI."""
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://", "databricks")):
        shown = uri or "the local store (no tracking_uri, no MLFLOW_TRACKING_URI)"
        raise EmbedtuneError(
            f"tracking_uri: {shown}: the predictor pods load the model from the registry, so it must be a "
            "tracking server they reach (http:// or https://), not a store on this pod's disk"
        )
    if cfg.max_replicas < cfg.min_replicas:  # each knob's own range: knobs.py, when cfg was built
        raise EmbedtuneError(f"max_replicas: {cfg.max_replicas} is below min_replicas {cfg.min_replicas}")
    return uri
