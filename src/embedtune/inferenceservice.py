"""Serving the champion on Kubeflow: a KServe `InferenceService` whose predictor runs `embedtune serve`.

    body = service_body(name, namespace, "models:/my-embedder/7", knobs)   # the manifest (plain dict)
    url = apply_and_wait(Services(*connect()), body, canary_percent=20, timeout_s=900)

- **The manifest** (`service_body`): `serving.kserve.io/v1beta1`, a custom predictor (one container,
  `kserve-container`) running `embedtune serve --model models:/NAME/VERSION --host 0.0.0.0 --port 8080` with the
  serve knobs, `MLFLOW_TRACKING_URI` and the optional MLflow credentials from a secret
  (`MLFLOW_TRACKING_USERNAME` / `_PASSWORD` / `_TOKEN`, each optional), the bearer token from a secret when
  asked, GPUs as resources, readiness on `/ready` (the model is loaded) and liveness on `/health`. It names the
  registered **version**, not the alias: under a canary rollout the new revision serves the new version and
  the previous revision keeps serving the one it loaded.
- **Create or update** (`apply_and_wait`): a service that does not exist is created; one that exists is
  patched (JSON merge patch) with the new spec and, below 100, `canaryTrafficPercent`: KServe then sends that
  share of traffic to the new revision and the rest to the last ready one, until a later update raises it
  (100: the new revision takes all traffic once ready). A service already serving this very version (a retried
  step) is left as it is.
- **Ready** (`wait_ready`): polls until the `Ready` condition is True and returns `status.url`; past the
  timeout it fails with the conditions' reasons and messages.

API calls (the Role in `pipelines/rbac/deploy.yaml`): inferenceservices get / create / patch, on
`serving.kserve.io/v1beta1` in the step's namespace.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import time

import orjson

from embedtune.errors import EmbedtuneError
from embedtune.progress import say

GROUP, VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
PORT = 8080  # KServe's default container port for a custom predictor
CONTAINER = "kserve-container"
CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
POLL_S = 5.0
SERVE_KNOBS = ("dtype", "max_batch_tokens", "max_wait_ms", "max_input_tokens", "truncate", "max_inputs")


def service_name(model_name: str) -> str:
    """An InferenceService name for a registered model: an RFC 1035 label of at most 45 characters (KServe
    derives longer names from it: `<name>-predictor-00001-deployment-...`); long or odd names keep a readable
    prefix and a hash."""
    slug = re.sub(r"[^a-z0-9]+", "-", model_name.lower()).strip("-")
    if slug and slug[0].isdigit():
        slug = f"m-{slug}"
    if len(slug) <= 45 and slug:
        return slug
    digest = hashlib.sha256(model_name.encode()).hexdigest()[:8]
    return f"{(slug or 'model')[:36].strip('-')}-{digest}"


def service_body(name: str, namespace: str, model_uri: str, knobs: dict) -> dict:
    """The InferenceService manifest. `knobs`: `image`, `tracking_uri`, `gpus`, `accelerator_type`,
    `min_replicas`, `max_replicas`, `mlflow_secret`, `api_key_secret`, `served_model_name` and the serve knobs
    (`SERVE_KNOBS`, passed as `embedtune serve` flags of the same names)."""
    args = [
        "--model",
        model_uri,
        "--host",
        "0.0.0.0",
        "--port",
        str(PORT),
        "--served-model-name",
        knobs["served_model_name"],
    ]
    for knob in SERVE_KNOBS:
        value = knobs[knob]
        args += [f"--{knob.replace('_', '-')}", str(value).lower() if isinstance(value, bool) else str(value)]
    env = [
        {"name": "MLFLOW_TRACKING_URI", "value": knobs["tracking_uri"]},
        {"name": "HF_HUB_OFFLINE", "value": "1"},
    ]
    if knobs["mlflow_secret"]:
        env += [
            {
                "name": key,
                "valueFrom": {"secretKeyRef": {"name": knobs["mlflow_secret"], "key": key, "optional": True}},
            }
            for key in CREDENTIALS
        ]
    if knobs["api_key_secret"]:
        args += ["--api-key-env", "EMBEDTUNE_API_KEY"]
        env.append(
            {
                "name": "EMBEDTUNE_API_KEY",
                "valueFrom": {"secretKeyRef": {"name": knobs["api_key_secret"], "key": "api-key"}},
            }
        )
    container = {
        "name": CONTAINER,
        "image": knobs["image"],
        "command": ["embedtune", "serve"],
        "args": args,
        "env": env,
        "ports": [{"containerPort": PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": PORT}, "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {"httpGet": {"path": "/health", "port": PORT}, "periodSeconds": 10, "failureThreshold": 6,
                          "initialDelaySeconds": 30},
    }  # fmt: skip
    if knobs["gpus"] > 0:
        gpus = {knobs["accelerator_type"]: str(knobs["gpus"])}
        container["resources"] = {"limits": dict(gpus), "requests": dict(gpus)}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "InferenceService",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": "embedtune"},
            "annotations": {"embedtune.io/model-uri": model_uri},
        },
        "spec": {
            "predictor": {
                "minReplicas": knobs["min_replicas"],
                "maxReplicas": knobs["max_replicas"],
                "containers": [container],
            }
        },
    }


class Services:
    """The InferenceService calls, through the official `kubernetes` client, as plain dicts."""

    TIMEOUT_S = 60  # per API call

    def __init__(self, api_client, namespace: str):
        from kubernetes import client

        self.custom = client.CustomObjectsApi(api_client)
        self.ns = namespace

    def get(self, name: str) -> dict | None:
        from kubernetes.client.exceptions import ApiException

        try:
            resp = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, self.ns, PLURAL, name, _preload_content=False, _request_timeout=self.TIMEOUT_S
            )
        except ApiException as e:
            if e.status == 404:
                return None
            raise EmbedtuneError(f"InferenceService {name}: GET failed: {e.status} {e.reason}") from None
        return orjson.loads(resp.data)

    def create(self, body: dict) -> None:
        self._call(
            "create", self.custom.create_namespaced_custom_object, GROUP, VERSION, self.ns, PLURAL, body
        )

    def patch(self, name: str, patch: dict) -> None:
        self._call(
            "patch", self.custom.patch_namespaced_custom_object, GROUP, VERSION, self.ns, PLURAL, name, patch
        )

    def _call(self, what: str, call, *args) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            call(*args, _request_timeout=self.TIMEOUT_S)
        except ApiException as e:
            message = e.body.decode() if isinstance(e.body, bytes) else str(e.body)
            with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
                message = orjson.loads(message).get("message", message)
            raise EmbedtuneError(
                f"InferenceService: {what} refused: {e.status} {e.reason}: {message[:500]}"
            ) from None


def ready_condition(service: dict) -> dict | None:
    for c in (service.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return c
    return None


def apply(services: Services, body: dict, canary_percent: int) -> str:
    """Create the service, or update it to this body (canary below 100); returns what was done."""
    name = body["metadata"]["name"]
    model_uri = body["metadata"]["annotations"]["embedtune.io/model-uri"]
    existing = services.get(name)
    if existing is None:
        services.create(body)
        return "created"
    if (existing["metadata"].get("annotations") or {}).get("embedtune.io/model-uri") == model_uri:
        return "unchanged"  # this step's earlier attempt: wait for it
    spec = body["spec"]["predictor"]
    if canary_percent < 100:
        spec = {**spec, "canaryTrafficPercent": canary_percent}
    else:  # a canary of an earlier update is done with: the new revision takes all traffic
        spec = {**spec, "canaryTrafficPercent": None}
    services.patch(
        name, {"metadata": {"annotations": body["metadata"]["annotations"]}, "spec": {"predictor": spec}}
    )
    return "updated"


def wait_ready(
    services: Services, name: str, model_uri: str, timeout_s: float, poll_s: float = POLL_S
) -> dict:
    """The service once Ready with this model (its status), or EmbedtuneError with its conditions."""
    deadline = time.monotonic() + timeout_s
    service: dict | None = None
    while True:
        service = services.get(name)
        ours = (
            service is not None
            and (service["metadata"].get("annotations") or {}).get("embedtune.io/model-uri") == model_uri
        )
        ready = ready_condition(service) if ours else None
        if (
            ours
            and ready is not None
            and ready.get("status") == "True"
            and (service.get("status") or {}).get("url")
        ):
            return service["status"]
        if time.monotonic() >= deadline:
            break
        time.sleep(poll_s)
    conditions = ((service or {}).get("status") or {}).get("conditions") or []
    why = "; ".join(
        f"{c.get('type')}={c.get('status')}" + (f" ({c.get('reason')}: {c.get('message', '')[:200]})" if c.get("reason") else "")
        for c in conditions
    )  # fmt: skip
    raise EmbedtuneError(f"InferenceService {name} not Ready after {timeout_s:g}s: {why or 'no status yet'}")


def apply_and_wait(
    services: Services, body: dict, canary_percent: int, timeout_s: float, poll_s: float = POLL_S
) -> dict:
    """`apply`, then `wait_ready`: {"action", "url", "status"}."""
    name, uri = body["metadata"]["name"], body["metadata"]["annotations"]["embedtune.io/model-uri"]
    action = apply(services, body, canary_percent)
    say("deploy", f"InferenceService {services.ns}/{name}: {action} ({uri}); waiting for Ready")
    status = wait_ready(services, name, uri, timeout_s, poll_s)
    return {"action": action, "url": status["url"], "status": status}
