"""A stand-in for the Kubernetes API server: the REST paths `embedtune.trainjob` calls, over real HTTP.

The real `kubernetes` client talks to it (through a kubeconfig or a `Configuration(host=...)`). Behind the
paths sits a small cluster whose behaviour each test chooses (`Behaviour`): pods that never get scheduled,
an image that cannot be pulled, a job that fails, or `LocalNodes`, which runs the TrainJob's command as real
processes, one per node, with the PET_* variables Kubeflow Trainer's torch runtime sets.

Paths (namespace-scoped, as the launcher uses them):
    POST/GET/DELETE /apis/trainer.kubeflow.org/v1alpha1/namespaces/NS/trainjobs[/NAME]
    GET  /api/v1/namespaces/NS/pods?labelSelector=a=b,c=d     GET /api/v1/namespaces/NS/pods/NAME
    GET  /api/v1/namespaces/NS/pods/NAME/log?follow=true       (chunked, as the API server streams it)
    GET  /api/v1/namespaces/NS/persistentvolumeclaims/NAME     GET /api/v1/namespaces/NS/events?fieldSelector=
    POST/GET/PATCH /apis/serving.kserve.io/v1beta1/namespaces/NS/inferenceservices[/NAME]   (merge patch)
On create it enforces what the real server and the Trainer's webhook would: the body must survive a round
trip through the Trainer 2.3 API models (`kubeflow-trainer-api`: unknown or mistyped fields are dropped,
so the round trip differs), the name must be an RFC 1035 label of <= 63 characters, no PET_* env. An
InferenceService (created, or as a patch leaves it) must survive the same round trip through KServe 0.21's
API models (`kserve`); the behaviour decides when it turns Ready (`Behaviour.service_changed`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from embedtune.launch import PET_VARS, free_port

JOBS = re.compile(r"^/apis/trainer\.kubeflow\.org/v1alpha1/namespaces/([^/]+)/trainjobs(?:/([^/]+))?$")
PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods(?:/([^/]+))?(/log)?$")
CLAIMS = re.compile(r"^/api/v1/namespaces/([^/]+)/persistentvolumeclaims/([^/]+)$")
EVENTS = re.compile(r"^/api/v1/namespaces/([^/]+)/events$")
SERVICES = re.compile(
    r"^/apis/serving\.kserve\.io/v1beta1/namespaces/([^/]+)/inferenceservices(?:/([^/]+))?$"
)
INDEX = "batch.kubernetes.io/job-completion-index"


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def name_problem(body: dict) -> str | None:
    """The API server's rule for both kinds' names: an RFC 1035 label of at most 63 characters."""
    name = body["metadata"]["name"]
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 63:
        return "metadata.name must match RFC 1035 DNS label format"
    return None


def validate_trainjob(body: dict) -> str | None:
    """Why the real API server (CRD schema, Trainer webhook) would refuse this TrainJob; None if it would not."""
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    try:
        back = TrainerV1alpha1TrainJob.from_dict(body).to_dict()
    except Exception as e:  # pydantic: a field of the wrong type
        return f"schema: {e}"
    if back != body:
        return f"schema: fields the Trainer 2.3 API does not know, or of the wrong shape: {json.dumps(body)}"
    if problem := name_problem(body):
        return problem
    env = {e["name"] for e in body["spec"].get("trainer", {}).get("env", [])}
    if env & set(PET_VARS):
        return f"env {sorted(env & set(PET_VARS))} is reserved by the torch runtime"
    return None


def validate_inference_service(body: dict) -> str | None:
    """Why the API server (the InferenceService CRD schema) would refuse this body; None if it would not."""
    import kserve
    import kserve.models
    import kubernetes.client.models as k8s

    for name in dir(k8s):  # kserve's generated client resolves the core types (V1Container, ...) by name
        if name.startswith("V1") and not hasattr(kserve.models, name):
            setattr(kserve.models, name, getattr(k8s, name))

    class Raw:
        data = json.dumps(body)

    client = kserve.ApiClient()
    try:
        back = client.sanitize_for_serialization(client.deserialize(Raw(), "V1beta1InferenceService"))
    except Exception as e:
        return f"schema: {e}"
    if back != body:
        return f"schema: fields KServe 0.21 does not know, or of the wrong shape: {json.dumps(body)}"
    return name_problem(body)


def merge_patch(target, patch):
    """RFC 7386 JSON merge patch (what `patch_namespaced_custom_object` sends for a dict)."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


class Behaviour:
    """What the cluster does with a TrainJob: `created` once, `tick` at every API call (under the lock)."""

    def created(self, api: StandIn, job: dict) -> None:
        pass

    def service_changed(self, api: StandIn, service: dict) -> None:
        """An InferenceService was created or patched: by default it is Ready at once, at its URL."""
        meta = service["metadata"]
        service["status"] = {
            "url": f"http://{meta['name']}.{meta['namespace']}.example.com",
            "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now()}],
        }

    def tick(self, api: StandIn) -> None:
        pass

    def deleted(self, api: StandIn, name: str) -> None:
        pass


class StandIn:
    def __init__(self, namespace: str = "team", behaviour: Behaviour | None = None):
        self.ns = namespace
        self.behaviour = behaviour or Behaviour()
        self.jobs: dict[str, dict] = {}
        self.pods: dict[str, dict] = {}
        self.logs: dict[str, str] = {}  # pod -> log text (LocalNodes: read from files)
        self.log_files: dict[str, Path] = {}
        self.events: list[dict] = []
        self.claims: dict[str, dict] = {}
        self.services: dict[str, dict] = {}  # InferenceServices by name
        self.patches: list[dict] = []
        self.created: list[dict] = []  # every body accepted by POST
        self.deleted: list[str] = []
        self.calls: list[tuple[str, str]] = []
        self.errors: list[str] = []  # the stand-in's own exceptions (a test fails on any)
        self.lock = threading.RLock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.host = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        with self.lock:
            for name in list(self.jobs):
                self.behaviour.deleted(self, name)
        self.server.shutdown()
        self.server.server_close()
        if self.errors and sys.exc_info()[0] is None:  # called in `finally`: never hide the test's own error
            raise AssertionError(f"the stand-in failed: {self.errors}")

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "standin", "cluster": {"server": self.host}}],
                    "users": [{"name": "step", "user": {"token": "not-a-secret"}}],
                    "contexts": [
                        {"name": "c", "context": {"cluster": "standin", "user": "step", "namespace": self.ns}}
                    ],
                    "current-context": "c",
                }
            )
        )
        return path

    def api_client(self):
        from kubernetes import client

        return client.ApiClient(client.Configuration(host=self.host)), self.ns

    # ------------------------------------------------------------------ cluster state helpers for behaviours
    def add_pod(self, pod: dict) -> None:
        self.pods[pod["metadata"]["name"]] = pod

    def node_pod(self, job: str, rank: int, phase: str = "Pending", **status) -> dict:
        """A pod as JobSet names and labels the node pods of a TrainJob."""
        name = f"{job}-node-0-{rank}-x{rank}z"
        labels = {
            "jobset.sigs.k8s.io/jobset-name": job,
            "jobset.sigs.k8s.io/replicatedjob-name": "node",
            INDEX: str(rank),
        }
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": self.ns, "labels": labels},
            "spec": {"containers": [{"name": "node", "image": "img"}]},
            "status": {"phase": phase, **status},
        }
        self.add_pod(pod)
        return pod

    def event(self, obj: str, reason: str, message: str, kind: str = "Warning") -> None:
        self.events.append(
            {
                "metadata": {"name": f"{obj}.{len(self.events)}", "namespace": self.ns},
                "involvedObject": {"name": obj, "namespace": self.ns},
                "reason": reason,
                "message": message,
                "type": kind,
                "lastTimestamp": now(),
            }
        )

    def set_condition(self, name: str, kind: str, reason: str = "", message: str = "") -> None:
        job = self.jobs[name]
        conds = job.setdefault("status", {}).setdefault("conditions", [])
        conds.append(
            {
                "type": kind,
                "status": "True",
                "reason": reason,
                "message": message,
                "lastTransitionTime": now(),
            }
        )

    # ------------------------------------------------------------------ HTTP
    def _handler(self):
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, code: int, obj) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _status(self, code: int, reason: str, message: str) -> None:
                self._send(
                    code,
                    {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "status": "Failure",
                        "reason": reason,
                        "message": message,
                        "code": code,
                    },
                )

            def _body(self) -> dict:
                n = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(n)) if n else {}

            def do_POST(self):
                self._safely("POST")

            def do_GET(self):
                self._safely("GET")

            def do_DELETE(self):
                self._safely("DELETE")

            def do_PATCH(self):
                self._safely("PATCH")

            def _safely(self, method: str) -> None:
                """A bug in the stand-in answers 500 (the client raises) instead of leaving it waiting."""
                try:
                    self._route(method)
                except Exception as e:
                    api.errors.append(repr(e))
                    self._status(500, "InternalError", f"stand-in: {e!r}")
                    self.close_connection = True

            def _route(self, method: str) -> None:
                url = urlparse(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                body = self._body() if method in ("POST", "DELETE", "PATCH") else None
                with api.lock:
                    api.calls.append((method, url.path))
                    api.behaviour.tick(api)
                    if m := JOBS.match(url.path):
                        return self._jobs(method, m.group(2), body)
                    if m := SERVICES.match(url.path):
                        return self._services(method, m.group(2), body)
                    if (m := PODS.match(url.path)) and method == "GET":
                        if m.group(3):
                            return self._log(m.group(2), query)
                        if m.group(2):
                            pod = api.pods.get(m.group(2))
                            return self._send(200, pod) if pod else self._status(404, "NotFound", m.group(2))
                        return self._send(
                            200,
                            {
                                "kind": "PodList",
                                "apiVersion": "v1",
                                "metadata": {},
                                "items": [
                                    p
                                    for p in api.pods.values()
                                    if selected(p, query.get("labelSelector", ""))
                                ],
                            },
                        )
                    if (m := CLAIMS.match(url.path)) and method == "GET":
                        claim = api.claims.get(m.group(2))
                        return self._send(200, claim) if claim else self._status(404, "NotFound", m.group(2))
                    if EVENTS.match(url.path) and method == "GET":
                        field = query.get("fieldSelector", "")
                        obj = field.removeprefix("involvedObject.name=")
                        items = [e for e in api.events if not field or e["involvedObject"]["name"] == obj]
                        return self._send(
                            200, {"kind": "EventList", "apiVersion": "v1", "metadata": {}, "items": items}
                        )
                self._status(404, "NotFound", url.path)

            def _jobs(self, method: str, name: str | None, body: dict | None) -> None:
                if method == "POST":
                    problem = validate_trainjob(body)
                    if problem:
                        return self._status(422, "Invalid", problem)
                    name = body["metadata"]["name"]
                    if name in api.jobs:
                        return self._status(409, "AlreadyExists", f'trainjobs "{name}" already exists')
                    job = json.loads(json.dumps(body))
                    job["metadata"]["uid"] = f"uid-{len(api.created)}"
                    api.jobs[name] = job
                    api.created.append(body)
                    api.behaviour.created(api, job)
                    return self._send(201, job)
                if method == "GET" and name:
                    job = api.jobs.get(name)
                    return (
                        self._send(200, job)
                        if job
                        else self._status(404, "NotFound", f'trainjobs "{name}" not found')
                    )
                if method == "DELETE" and name:
                    if name not in api.jobs:
                        return self._status(404, "NotFound", f'trainjobs "{name}" not found')
                    api.behaviour.deleted(api, name)
                    del api.jobs[name]
                    for pod in [
                        p
                        for p, v in api.pods.items()
                        if selected(v, f"jobset.sigs.k8s.io/jobset-name={name}")
                    ]:
                        del api.pods[pod]
                    api.deleted.append(name)
                    return self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
                self._status(405, "MethodNotAllowed", method)

            def _services(self, method: str, name: str | None, body: dict | None) -> None:
                if method == "POST":
                    if problem := validate_inference_service(body):
                        return self._status(422, "Invalid", problem)
                    name = body["metadata"]["name"]
                    if name in api.services:
                        return self._status(
                            409, "AlreadyExists", f'inferenceservices "{name}" already exists'
                        )
                    service = json.loads(json.dumps(body))
                    api.services[name] = service
                    api.created.append(body)
                    api.behaviour.service_changed(api, service)
                    return self._send(201, service)
                service = api.services.get(name) if name else None
                if service is None:
                    return self._status(404, "NotFound", f'inferenceservices "{name}" not found')
                if method == "GET":
                    return self._send(200, service)
                if method == "PATCH":
                    if "merge-patch" not in (self.headers.get("Content-Type") or ""):
                        return self._status(415, "UnsupportedMediaType", self.headers.get("Content-Type", ""))
                    patched = merge_patch({k: v for k, v in service.items() if k != "status"}, body)
                    if problem := validate_inference_service(patched):
                        return self._status(422, "Invalid", problem)
                    api.patches.append(body)
                    api.services[name] = {**patched, "status": service.get("status", {})}
                    api.behaviour.service_changed(api, api.services[name])
                    return self._send(200, api.services[name])
                self._status(405, "MethodNotAllowed", method)

            def _log(self, pod: str, query: dict) -> None:
                if pod not in api.pods:
                    return self._status(404, "NotFound", pod)
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                sent = 0
                api.lock.release()  # the stream lasts: let other calls in meanwhile
                try:
                    while True:
                        with api.lock:
                            api.behaviour.tick(api)  # time passes for the cluster while the log streams
                            text = api.log_text(pod)
                            alive = query.get("follow", "").lower() in ("true", "1") and api.log_open(pod)
                        if len(text) > sent:
                            chunk = text[sent:].encode()
                            self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                            self.wfile.flush()
                            sent = len(text)
                        if not alive:
                            break
                        time.sleep(0.05)
                    self.wfile.write(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    api.lock.acquire()

        return Handler

    def log_text(self, pod: str) -> str:
        if pod in self.log_files and self.log_files[pod].is_file():
            return self.log_files[pod].read_text(errors="replace")
        return self.logs.get(pod, "")

    def log_open(self, pod: str) -> bool:
        """A followed log stays open while the pod runs."""
        p = self.pods.get(pod)
        return bool(p) and p["status"].get("phase") == "Running"


def selected(obj: dict, selector: str) -> bool:
    labels = obj["metadata"].get("labels") or {}
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


def output_dir(job: dict) -> Path:
    """Where the job's `embedtune train` writes its model: its --output-dir flag."""
    (flag,) = [a for a in job["spec"]["trainer"]["args"] if a.startswith("--output-dir=")]
    return Path(flag.split("=", 1)[1])


class LocalNodes(Behaviour):
    """Runs the TrainJob as the torch runtime would, on this machine: one process per node running its
    command and args, with the trainer env and PET_NNODES / PET_NODE_RANK / PET_NPROC_PER_NODE /
    PET_MASTER_ADDR (127.0.0.1) / PET_MASTER_PORT; pods Running while they run, then Succeeded or Failed,
    and the job Complete or Failed like a JobSet (one failed node fails the job)."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.procs: dict[str, subprocess.Popen] = {}
        self.jobs_of: dict[str, str] = {}

    def created(self, api, job):
        name, trainer = job["metadata"]["name"], job["spec"]["trainer"]
        assert trainer["command"] == ["embedtune", "train"]
        env = {**os.environ, **{e["name"]: e["value"] for e in trainer.get("env", []) if "value" in e}}
        port = free_port()
        for rank in range(trainer["numNodes"]):
            pod = api.node_pod(name, rank, "Running", startTime=now())
            pod_name = pod["metadata"]["name"]
            log = self.workdir / f"{pod_name}.log"
            node_env = {
                **env,
                "PET_NNODES": str(trainer["numNodes"]),
                "PET_NODE_RANK": str(rank),
                "PET_NPROC_PER_NODE": str(trainer["numProcPerNode"]),
                "PET_MASTER_ADDR": "127.0.0.1",
                "PET_MASTER_PORT": str(port),
            }
            with open(log, "wb") as f:
                self.procs[pod_name] = subprocess.Popen(
                    [sys.executable, "-m", "embedtune", "train", *trainer["args"]],
                    env=node_env,
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self.jobs_of[pod_name] = name
            api.log_files[pod_name] = log

    def tick(self, api):
        for pod_name, proc in self.procs.items():
            rc = proc.poll()
            pod = api.pods.get(pod_name)
            if rc is None or pod is None or pod["status"]["phase"] != "Running":
                continue
            pod["status"]["phase"] = "Succeeded" if rc == 0 else "Failed"
            state = {"terminated": {"exitCode": rc, "reason": "Completed" if rc == 0 else "Error"}}
            pod["status"]["containerStatuses"] = [{"name": "node", "state": state}]
            job = api.jobs.get(self.jobs_of[pod_name])
            if job is None or job.get("status", {}).get("conditions"):
                continue
            pods = [
                p
                for p in api.pods.values()
                if selected(p, "jobset.sigs.k8s.io/jobset-name=" + job["metadata"]["name"])
            ]
            if rc != 0:
                api.set_condition(
                    job["metadata"]["name"], "Failed", "JobSetFailed", f"{pod_name} exited {rc}"
                )
            elif all(p["status"]["phase"] == "Succeeded" for p in pods):
                api.set_condition(
                    job["metadata"]["name"], "Complete", "JobSetCompleted", "jobset completed successfully"
                )

    def deleted(self, api, name):
        for pod_name, proc in self.procs.items():
            if self.jobs_of[pod_name] == name and proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
