"""Multi-node training on Kubernetes: `embedtune train --nodes N` as a Kubeflow Trainer v2 TrainJob.

The train step calls `run_on_nodes(cfg)` when `nodes > 1` and it is not itself a node of a job (no `PET_*`
variables). It runs in a pod of the cluster (the pipeline's train task, or a notebook) and makes that pod's
work a TrainJob on the `torch-distributed` runtime, whose pods run the same image and the same command:

    run_on_nodes(cfg)
      1. stage   copy the train / eval rows to <shared_dir>/<job>/data/; the job writes its checkpoints and
                 its model to <shared_dir>/<job>/model/ (a model finished there already: straight to 5)
      2. body    `embedtune train <the same flags, paths on the shared volume>`, numNodes = nodes,
                 numProcPerNode = nproc, and, per node, what this very pod has: image, resources (CPU,
                 memory, GPUs), its volumes from PersistentVolumeClaims (the shared one, a model cache) and
                 /dev/shm, env, node selector, tolerations, affinity, image pull secrets; activeDeadlineSeconds
                 = what is left of this pod's own deadline (the step's timeout)
      3. attach  the job's name comes from run_id: one that exists already is this step's earlier attempt;
                 attach to it while it runs or when it is complete, replace it when it failed
      4. watch   wait until every node pod runs (an image pull error fails at once; an unschedulable pod at
                 the Running timeout, with the scheduler's reason), stream node 0's log here, wait for
                 Complete or Failed (then raise with the job's conditions, the pods' exit reasons, the events
                 and node 0's last lines)
      5. hand    copy the model folder to output_dir (the step's artifact), return train_result.json, remove
                 <shared_dir>/<job>/
    The job is deleted at the end, on failure, and on SIGTERM (how Kubeflow cancels a run or ends a step at
    its timeout); a step killed outright leaves it to its activeDeadlineSeconds, or to the retry, which
    re-attaches.

Every node writes to the same folders, so `shared_dir` must be on a ReadWriteMany claim (checked here, and
by the nodes themselves with `rundir.check_shared` before they train). Inside the job, global rank 0 writes
the model and `train_result.json`, every rank its own ZeRO shards of each checkpoint (DeepSpeed's
`use_node_local_storage` is off), and a re-created job resumes from the newest checkpoint there.

Why the pod's own settings and not a second copy of them: the pipeline already gives the train task the
per-node resources, volumes and scheduling (`pipelines/cluster.py`); reading them back from the pod keeps one
copy, and `embedtune train --nodes 2 ...` from a notebook pod works the same way.

API calls (the RBAC the pod's service account needs, `pipelines/rbac/`): trainjobs create / get / delete,
pods get / list, pods/log get, persistentvolumeclaims get, events list. The `kubernetes` client is imported
only here and only when a job is submitted (extra `embedtune[trainjob]`); single-node training never needs it.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import os
import re
import shutil
import signal
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import orjson

from embedtune.config import TrainConfig
from embedtune.errors import EmbedtuneError
from embedtune.io import read_json, write_json
from embedtune.kube import connect
from embedtune.launch import PET_VARS, config_flags
from embedtune.progress import say
from embedtune.rundir import RESULT_FILE, finished_result

GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
RUNTIME = "torch-distributed"  # ClusterTrainingRuntime: torchrun's PET_* in every node, container `node`
MANAGER = "embedtune.io/train"  # owner of our runtimePatches entry (Trainer >= 2.2)
RUNNING_TIMEOUT_S = 1800  # a 2 x 8-GPU job may wait for a node; an unschedulable one fails after this
POLL_S = 10.0
LOG_ATTEMPTS = 3  # a dropped log stream is re-opened this many times, then the step only polls
# Container states that do not heal by waiting: fail at once instead of at the Running timeout.
STUCK = {
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
}
NODE_PODS = "jobset.sigs.k8s.io/jobset-name={name},jobset.sigs.k8s.io/replicatedjob-name=node"
INDEX = "batch.kubernetes.io/job-completion-index"  # label and annotation: the node's rank


class Cancelled(EmbedtuneError):
    """The step got SIGTERM (a cancelled run, or the step's timeout) while its TrainJob ran."""


# -------------------------------------------------------------------------------------------------- naming
def job_name(run_id: str) -> str:
    """`embedtune-<run id>`: an RFC 1035 label (the Trainer's rule for TrainJob names), short enough for the
    pods' names (`<job>-node-0-0-xxxxx`); long or odd ids keep a readable prefix and a hash."""
    slug = re.sub(r"[^a-z0-9]+", "-", run_id.lower()).strip("-")
    name = f"embedtune-{slug}"
    if len(name) > 46 or not slug:
        digest = hashlib.sha256(run_id.encode()).hexdigest()[:10]
        name = f"embedtune-{slug[:24].strip('-')}-{digest}".replace("--", "-")
    return name


def check_submit(cfg: TrainConfig) -> None:
    """What `nodes > 1` needs outside a job, checked before the data is read."""
    if not cfg.shared_dir:
        raise EmbedtuneError(
            f"nodes={cfg.nodes} needs shared_dir: a folder on a ReadWriteMany volume this pod mounts, where "
            "every node reads the data and writes checkpoints and the model (pipeline: set cluster.SHARED_PVC)"
        )
    if not cfg.run_id:
        raise EmbedtuneError(f"nodes={cfg.nodes} needs run_id: it names the TrainJob, so a retry re-attaches")


# -------------------------------------------------------------------------------------------------- the API
class Cluster:
    """The few API calls the launcher makes, through the official `kubernetes` client, as plain dicts."""

    def __init__(self, api_client, namespace: str):
        from kubernetes import client

        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.ns = namespace

    TIMEOUT_S = 60  # per API call (not the log stream): a hung connection must not hang the step

    @staticmethod
    def _json(resp) -> dict:
        return orjson.loads(resp.data)

    def _missing(self, call, *args, **kwargs):
        """`call(...)` as a dict, or None for 404."""
        from kubernetes.client.exceptions import ApiException

        try:
            return self._json(call(*args, **kwargs, _preload_content=False, _request_timeout=self.TIMEOUT_S))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def get_job(self, name: str) -> dict | None:
        return self._missing(self.custom.get_namespaced_custom_object, GROUP, VERSION, self.ns, PLURAL, name)

    def create_job(self, body: dict) -> bool:
        """Create; False when a job of that name exists already (409)."""
        from kubernetes.client.exceptions import ApiException

        try:
            self.custom.create_namespaced_custom_object(
                GROUP, VERSION, self.ns, PLURAL, body, _preload_content=False, _request_timeout=self.TIMEOUT_S
            )
        except ApiException as e:
            if e.status == 409:
                return False
            raise
        return True

    def delete_job(self, name: str) -> None:
        self._missing(
            self.custom.delete_namespaced_custom_object,
            GROUP,
            VERSION,
            self.ns,
            PLURAL,
            name,
            propagation_policy="Foreground",  # its JobSet, Jobs and pods go with it
        )

    def pods(self, name: str) -> list[dict]:
        """The job's node pods, by node rank."""
        found = self._json(
            self.core.list_namespaced_pod(
                self.ns,
                label_selector=NODE_PODS.format(name=name),
                _preload_content=False,
                _request_timeout=self.TIMEOUT_S,
            )
        )["items"]
        return sorted(found, key=node_rank)

    def pod(self, name: str) -> dict | None:
        return self._missing(self.core.read_namespaced_pod, name, self.ns)

    def claim(self, name: str) -> dict | None:
        return self._missing(self.core.read_namespaced_persistent_volume_claim, name, self.ns)

    def events(self, names: list[str]) -> list[str]:
        """`object: reason: message` for the events about these objects, oldest first."""
        out = []
        for obj in names:
            items = self._json(
                self.core.list_namespaced_event(
                    self.ns,
                    field_selector=f"involvedObject.name={obj}",
                    _preload_content=False,
                    _request_timeout=self.TIMEOUT_S,
                )
            )["items"]
            for ev in sorted(items, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or ""):
                out.append(f"{obj}: {ev.get('type', '')} {ev.get('reason', '')}: {ev.get('message', '')}")
        return out

    def log_lines(self, pod: str, since_s: int | None = None):
        """Lines of the pod's `node` container as they come (follow), until it stops or the stream drops."""
        from kubernetes.watch.watch import iter_resp_lines

        kwargs = {"since_seconds": since_s} if since_s else {}
        resp = self.core.read_namespaced_pod_log(
            pod, self.ns, container="node", follow=True, _preload_content=False, **kwargs
        )
        try:
            yield from iter_resp_lines(resp)
        finally:
            resp.release_conn()


# -------------------------------------------------------------------------------------------------- the body
def node_rank(pod: dict) -> int:
    meta = pod["metadata"]
    return int((meta.get("labels") or {}).get(INDEX) or (meta.get("annotations") or {}).get(INDEX) or 0)


def own_settings(cluster: Cluster, pod_name: str, shared_dir: str) -> dict:
    """What each node pod copies from this one: image, resources, env, PVC-backed volumes and /dev/shm, and
    scheduling. The container is the one that mounts `shared_dir`, whose claim must be ReadWriteMany."""
    pod = cluster.pod(pod_name)
    if pod is None:
        raise EmbedtuneError(
            f"nodes > 1 submits a TrainJob from a pod of the cluster (it copies that pod's image, resources and "
            f"volumes); pod {pod_name!r} (HOSTNAME) was not found in namespace {cluster.ns!r}"
        )
    spec = pod["spec"]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}

    def kept(mount):
        vol = volumes.get(mount["name"], {})
        return "persistentVolumeClaim" in vol or mount["mountPath"] == "/dev/shm"

    def holds(mount):
        root = mount["mountPath"].rstrip("/") + "/"
        return "persistentVolumeClaim" in volumes.get(mount["name"], {}) and f"{shared_dir}/".startswith(root)

    candidates = [
        (len(m["mountPath"]), c, m) for c in spec["containers"] for m in c.get("volumeMounts", []) if holds(m)
    ]
    if not candidates:
        raise EmbedtuneError(
            f"shared_dir {shared_dir}: not on a PersistentVolumeClaim that pod {pod_name} mounts; every node "
            "mounts the same claim, so it must be one (ReadWriteMany)"
        )
    _, container, mount = max(candidates, key=lambda t: t[0])
    claim_name = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
    claim = cluster.claim(claim_name) or {}
    modes = (
        (claim.get("status") or {}).get("accessModes") or (claim.get("spec") or {}).get("accessModes") or []
    )
    if "ReadWriteMany" not in modes:
        raise EmbedtuneError(
            f"shared_dir {shared_dir}: claim {claim_name} has access modes {modes or 'unknown'}; nodes on "
            "different machines mount it at once, so it must be ReadWriteMany (an RWX storage class: NFS, "
            "CephFS, a cloud file store)"
        )
    mounts = [m for m in container.get("volumeMounts", []) if kept(m)]
    env = [
        e
        for e in container.get("env", [])
        if not e["name"].startswith("KFP_")
        and e["name"] not in PET_VARS
        and (
            "value" in e
            or "secretKeyRef" in e.get("valueFrom", {})
            or "configMapKeyRef" in e.get("valueFrom", {})
        )
    ]
    deadline = None
    if spec.get("activeDeadlineSeconds") and (pod.get("status") or {}).get("startTime"):
        started = datetime.fromisoformat(pod["status"]["startTime"].replace("Z", "+00:00"))
        elapsed = (datetime.now(timezone.utc) - started).total_seconds()
        deadline = max(60, int(spec["activeDeadlineSeconds"] - elapsed))
    return {
        "image": container["image"],
        "resources": container.get("resources") or {},
        "env": env,
        "volumes": [volumes[m["name"]] for m in mounts],
        "volume_mounts": [
            {k: m[k] for k in ("name", "mountPath", "subPath", "readOnly") if k in m} for m in mounts
        ],
        "node_selector": spec.get("nodeSelector") or {},
        "tolerations": spec.get("tolerations") or [],
        "affinity": spec.get("affinity"),
        "image_pull_secrets": spec.get("imagePullSecrets") or [],
        "deadline_s": deadline,
    }


def trainjob_body(name: str, namespace: str, cfg: TrainConfig, pod: dict) -> dict:
    """The TrainJob (trainer.kubeflow.org/v1alpha1, Trainer >= 2.2: `runtimePatches`, int `numProcPerNode`)
    that runs `embedtune train` with `cfg`'s flags on `cfg.nodes` pods, each set up like `pod`
    (`own_settings`). The runtime injects torchrun's PET_* variables; `embedtune train` reads them."""
    node_spec = {
        "volumes": pod["volumes"],
        "containers": [{"name": "node", "volumeMounts": pod["volume_mounts"]}],
        "nodeSelector": pod["node_selector"],
        "tolerations": pod["tolerations"],
        "affinity": pod["affinity"],
        "imagePullSecrets": pod["image_pull_secrets"],
    }
    node_spec = {k: v for k, v in node_spec.items() if v}
    spec = {
        "runtimeRef": {"apiGroup": GROUP, "kind": "ClusterTrainingRuntime", "name": RUNTIME},
        "trainer": {
            "image": pod["image"],
            "command": ["embedtune", "train"],
            "args": config_flags(cfg),
            "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}]
            + [e for e in pod["env"] if e["name"] != "PYTHONUNBUFFERED"],
            "numNodes": cfg.nodes,
            "numProcPerNode": cfg.nproc,
            "resourcesPerNode": pod["resources"],
        },
        "runtimePatches": [
            {
                "manager": MANAGER,
                "trainingRuntimeSpec": {
                    "template": {
                        "spec": {
                            "replicatedJobs": [
                                {"name": "node", "template": {"spec": {"template": {"spec": node_spec}}}}
                            ]
                        }
                    }
                },
            }
        ],
    }
    if pod["deadline_s"]:
        spec["activeDeadlineSeconds"] = pod["deadline_s"]
    labels = {
        "app.kubernetes.io/managed-by": "embedtune",
        "embedtune.io/run-id": name.removeprefix("embedtune-"),
    }
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainJob",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": spec,
    }


# -------------------------------------------------------------------------------------------------- watching
def condition(job: dict, kind: str) -> dict | None:
    """The job's condition of this type when it is True."""
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("type") == kind and c.get("status") == "True":
            return c
    return None


def pod_problems(pod: dict) -> list[tuple[str, str, str]]:
    """(pod, reason, message) for what keeps a pod from running: waiting containers, failed scheduling."""
    name, status = pod["metadata"]["name"], pod.get("status") or {}
    found = []
    for c in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        waiting = (c.get("state") or {}).get("waiting")
        if waiting and waiting.get("reason") not in (None, "ContainerCreating", "PodInitializing"):
            found.append((name, waiting["reason"], waiting.get("message", "")))
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            found.append((name, cond.get("reason", "Unschedulable"), cond.get("message", "")))
    return found


def exits(pods: list[dict]) -> list[str]:
    """`pod: exit code N (reason)` for every container that terminated badly."""
    out = []
    for pod in pods:
        for c in (pod.get("status") or {}).get("containerStatuses") or []:
            done = ((c.get("state") or {}).get("terminated")) or (
                (c.get("lastState") or {}).get("terminated")
            )
            if done and done.get("exitCode", 0) != 0:
                out.append(
                    f"{pod['metadata']['name']}: exit code {done['exitCode']} ({done.get('reason', '')})"
                    + (f": {done['message'].strip()}" if done.get("message") else "")
                )
    return out


class Watch:
    """One TrainJob from creation to its end; every failure is an `EmbedtuneError` that says why."""

    def __init__(self, cluster: Cluster, body: dict, poll_s: float = POLL_S):
        self.cluster, self.body, self.poll_s = cluster, body, poll_s
        self.name = body["metadata"]["name"]
        self.nodes = body["spec"]["trainer"]["numNodes"]
        self.tail: collections.deque[str] = collections.deque(maxlen=30)  # node 0's last lines

    def job(self) -> dict:
        job = self.cluster.get_job(self.name)
        if job is None:
            raise EmbedtuneError(f"TrainJob {self.name} was deleted while this step waited for it")
        if condition(job, "Failed"):
            raise EmbedtuneError(self.report(job, "failed"))
        return job

    def report(self, job: dict | None, what: str) -> str:
        """The error text: what happened, the job's conditions, the pods' exits and problems, the events,
        node 0's last lines."""
        lines = [f"TrainJob {self.name} (namespace {self.cluster.ns}) {what}"]
        for c in ((job or {}).get("status") or {}).get("conditions") or []:
            if c.get("status") == "True":
                lines.append(f"  condition {c['type']}: {c.get('reason', '')}: {c.get('message', '')}")
        try:
            pods = self.cluster.pods(self.name)
            lines += [f"  {e}" for e in exits(pods)]
            lines += [f"  {p}: {r}: {m}" for p, r, m in (x for pod in pods for x in pod_problems(pod))]
            names = [self.name, f"{self.name}-node-0"] + [p["metadata"]["name"] for p in pods]
            events = self.cluster.events(names)
            if events:
                lines += ["  events:"] + [f"    {e}" for e in events[-20:]]
        except Exception as e:  # the reason above still stands
            lines.append(f"  (could not read the pods and events: {type(e).__name__}: {e})")
        if self.tail:
            lines += ["  node 0's last lines:"] + [f"    {t}" for t in self.tail]
        return "\n".join(lines)

    def attach_or_create(self) -> None:
        """Create the job; one of that name is this step's own earlier attempt: attach to it, or replace it
        when it failed (the new one resumes from the checkpoints the failed one left)."""
        job = self.cluster.get_job(self.name)
        if job is not None and condition(job, "Failed"):
            say("train", f"TrainJob {self.name} of an earlier attempt failed: replacing it")
            self.cluster.delete_job(self.name)
            while self.cluster.get_job(self.name) is not None:
                time.sleep(self.poll_s)
            job = None
        if job is not None:
            say("train", f"attaching to TrainJob {self.name}, created by an earlier attempt of this step")
        elif self.cluster.create_job(self.body):
            per_node = self.body["spec"]["trainer"]["numProcPerNode"]
            say("train", f"created TrainJob {self.name}: {self.nodes} nodes x {per_node} processes")
        else:
            say("train", f"TrainJob {self.name} was created meanwhile (another attempt): attaching")

    def wait_running(self, timeout_s: float) -> None:
        """Until every node pod runs (or the job is complete). Image pull errors fail at once; anything else
        that keeps a pod pending is logged when first seen and fails at `timeout_s`."""
        end, seen = time.monotonic() + timeout_s, set()
        while True:
            job = self.job()
            if condition(job, "Complete"):
                return
            pods = self.cluster.pods(self.name)
            problems = [x for pod in pods for x in pod_problems(pod)]
            for pod, reason, message in problems:
                if reason in STUCK:
                    raise EmbedtuneError(self.report(job, f"cannot start: {pod}: {reason}: {message}"))
                if (pod, reason) not in seen:
                    seen.add((pod, reason))
                    say("train", f"TrainJob {self.name}: {pod}: {reason}: {message}")
            up = [p for p in pods if (p.get("status") or {}).get("phase") in ("Running", "Succeeded")]
            if len(up) >= self.nodes:
                say("train", f"TrainJob {self.name}: {len(up)} node pods running")
                return
            if time.monotonic() > end:
                raise EmbedtuneError(
                    self.report(
                        job, f"not running after {timeout_s:.0f}s ({len(up)} of {self.nodes} node pods up)"
                    )
                )
            time.sleep(self.poll_s)

    def stream_logs(self) -> None:
        """Node 0's log, line by line, to stderr (its progress lines are the run's). A stream that ends while
        node 0 still runs (a dropped connection) is re-opened from where it stopped; after `LOG_ATTEMPTS`
        opens in a row that bring nothing, the step only polls the job."""
        last, misses = None, 0
        while misses < LOG_ATTEMPTS:
            pods = [p for p in self.cluster.pods(self.name) if node_rank(p) == 0]
            if not pods:
                return
            since = int(time.monotonic() - last) + 1 if last else None
            got = False
            try:
                for line in self.cluster.log_lines(pods[0]["metadata"]["name"], since):
                    print(line, file=sys.stderr, flush=True)
                    self.tail.append(line)
                    last, got = time.monotonic(), True
            except EmbedtuneError:  # Cancelled (SIGTERM)
                raise
            except Exception as e:  # a dropped connection: look at the job, then re-open
                say("train", f"TrainJob {self.name}: log stream dropped ({type(e).__name__}): re-opening")
            node0 = self.cluster.pod(pods[0]["metadata"]["name"]) or {}
            if condition(self.job(), "Complete") or (node0.get("status") or {}).get("phase") != "Running":
                return  # node 0 is done (or gone): its whole log was read
            misses = 0 if got else misses + 1
            time.sleep(self.poll_s)

    def wait_done(self, deadline_s: float | None) -> None:
        """Until Complete; Failed (or deleted, or past the step's deadline) raises."""
        end = time.monotonic() + deadline_s if deadline_s else None
        while not condition(self.job(), "Complete"):
            if end and time.monotonic() > end:
                raise EmbedtuneError(self.report(self.cluster.get_job(self.name), "did not finish in time"))
            time.sleep(self.poll_s)
        say("train", f"TrainJob {self.name} complete")


@contextlib.contextmanager
def deleted_at_exit(cluster: Cluster, name: str):
    """Delete the job when the block ends: done, failed, or SIGTERM (raised here as `Cancelled`)."""

    def cancel(signum, frame):
        raise Cancelled(f"cancelled (signal {signum}) while TrainJob {name} ran; it is deleted")

    main = threading.current_thread() is threading.main_thread()
    before = signal.signal(signal.SIGTERM, cancel) if main else None
    try:
        yield
    finally:
        if main:
            signal.signal(signal.SIGTERM, before if before is not None else signal.SIG_DFL)
        with contextlib.suppress(Exception):  # never hide the error that got us here
            cluster.delete_job(name)
            say("train", f"deleted TrainJob {name}")


# -------------------------------------------------------------------------------------------------- the step
def stage(cfg: TrainConfig, home: Path) -> TrainConfig:
    """Copy the rows to `home/data/` and point the job's output at `home/model/` (checkpoints inside it:
    the volume is the persistent one), unless a previous attempt did; returns the job's config."""
    data = home / "data"
    data.mkdir(parents=True, exist_ok=True)
    paths = {}
    for key in ("train_data", "eval_data"):
        src = getattr(cfg, key)
        if src:
            dst = data / f"{key}.jsonl"
            if not dst.is_file():
                tmp = dst.with_suffix(".tmp")
                shutil.copyfile(src, tmp)
                tmp.replace(dst)
            paths[key] = str(dst)
    return dataclasses.replace(cfg, **paths, output_dir=str(home / "model"), checkpoint_dir="", shared_dir="")


def run_on_nodes(
    cfg: TrainConfig,
    api=None,
    pod_name: str | None = None,
    running_timeout_s: float = RUNNING_TIMEOUT_S,
    poll_s: float = POLL_S,
) -> dict:
    """Train on `cfg.nodes` nodes as a TrainJob and return its `train_result.json`, the model copied to
    `cfg.output_dir`. `api`: (ApiClient, namespace), default `connect()`; `pod_name`: this pod (HOSTNAME)."""
    check_submit(cfg)
    name = job_name(cfg.run_id)
    home = Path(cfg.shared_dir) / name
    job_cfg = stage(cfg, home)
    model = Path(job_cfg.output_dir)
    result = finished_result(model, job_cfg)
    if result is None:
        api_client, namespace = api or connect()
        cluster = Cluster(api_client, namespace)
        pod = own_settings(cluster, pod_name or os.environ.get("HOSTNAME", ""), cfg.shared_dir)
        body = trainjob_body(name, namespace, job_cfg, pod)
        watch = Watch(cluster, body, poll_s)
        with deleted_at_exit(cluster, name):
            watch.attach_or_create()
            watch.wait_running(running_timeout_s)
            watch.stream_logs()
            watch.wait_done(pod["deadline_s"])
        if not (model / RESULT_FILE).is_file():
            raise EmbedtuneError(f"TrainJob {name} completed but {model / RESULT_FILE} is missing")
        result = read_json(model / RESULT_FILE)
    out = Path(cfg.output_dir)
    shutil.copytree(model, out, dirs_exist_ok=True)
    result = {**result, "output_dir": str(out), "trainjob": name}
    write_json(out / RESULT_FILE, result)
    shutil.rmtree(home, ignore_errors=True)  # data and model copies; the checkpoints went with the run
    say("train", f"model of TrainJob {name} copied to {out}")
    return result
