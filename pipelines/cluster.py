"""Cluster settings in one place: what each task asks Kubernetes for. Edit here, then `make compile-pipeline`.

Nothing here changes what a step computes, only where and how it runs:

- resources: CPU / memory requests per step; train gets `gpus` accelerators, evaluate `eval_gpus` and mine
  `mine_gpus`, of the pipeline's `accelerator_type` (default `nvidia.com/gpu`). A count of 0 requests none
  (CPU runs).
- `/dev/shm`: an in-memory emptyDir on the GPU steps. The container default (64 MiB) is far too small for
  NCCL, DeepSpeed and PyTorch DataLoader workers, which pass tensors through shared memory.
- MLflow credentials: keys of the Kubernetes secret `MLFLOW_SECRET` become env vars of register (optional:
  a server without auth needs no secret). Credentials never appear in the compiled YAML, only the secret name.
- caching: off for convert (a scheduled run must re-read the source: same string, new data), train (the
  server cache keys on the image tag, not on what a GPU run would produce) and register (it has side effects).
- retries with exponential backoff for convert (hub downloads) and register (MLflow server hiccups); register
  is idempotent on the pipeline run id, so a retry creates no second model version. train is retried only
  with a checkpoint volume (below): without one a retry would start again from step 0.
- timeouts: the pod's active deadline per step.
- hooks, empty by default: a PVC mounted as the Hugging Face cache (`MODEL_CACHE_PVC`, so 8 GB of weights are
  downloaded once, not per run), a PVC for training checkpoints (`CHECKPOINT_PVC`), node selectors, extra
  tolerations, image pull secrets.

Resuming a preempted train pod: train's output folder is a KFP artifact path local to the pod, so without a
volume a retried or preempted pod restarts from zero. With `CHECKPOINT_PVC` set (an existing claim; one train
pod uses it at a time, so ReadWriteOnce is enough), train mounts it at `CHECKPOINT_PATH`, writes its
`checkpoint-N` folders to `CHECKPOINT_PATH/<pipeline run id>/` (every `save_steps` steps), and is retried
`CHECKPOINT_RETRIES` times with backoff: the new pod finds its run's latest complete checkpoint and resumes
there. The folder is deleted after the final model is saved and verified; a run that fails for good leaves it
behind (delete `<run id>/` folders of failed runs by hand). Why a compile-time hook and not a pipeline
parameter: the mount cannot be conditional on a run-time value (KFP's driver fails a task whose PVC name
parameter is empty, and two train tasks under `dsl.If` would need `dsl.OneOf` downstream, which kfp.local
cannot run), and KFP resolves `{{$.pipeline_job_uuid}}` only as a whole parameter value, so the component
takes the run id separately and joins the path itself. kfp.local ignores the mount: leave the hook unset
for `make demo`.

Multi-node training (pipeline parameter `nodes` > 1): the train task submits a Kubeflow Trainer TrainJob of
`nodes` pods and waits for it (`embedtune.trainjob`). Each node pod copies the train task's own settings from
here: image, CPU / memory, `gpus` accelerators (numProcPerNode = gpus), /dev/shm, PVC mounts, node
selectors, tolerations, image pull secrets, and the rest of the step's timeout. The nodes meet on
`SHARED_PVC`, an existing **ReadWriteMany** claim (NFS, CephFS, a cloud file store; ReadWriteOnce cannot be
mounted by pods on several machines), mounted at `SHARED_PATH` on train and on every node: the rows, the
checkpoints and the model go to `SHARED_PATH/<job name>/`, the model is copied back into train's output
artifact, and the folder is removed. Unset (the default), `nodes` > 1 fails at once saying so. The pipeline's
service account needs the Role in `pipelines/rbac/trainjob-launcher.yaml`. While the job runs, the train
task's own pod still holds its `gpus` accelerators: KFP 2.17 cannot make a task's resources depend on a
run-time parameter, and a second, GPU-less train task under `dsl.If` would need `dsl.OneOf` downstream,
which kfp.local (`make demo`) cannot run.

kfp.local ignores all of this (it prints which settings it skipped), so `make demo` runs the same DAG.
"""

from __future__ import annotations

from kfp import kubernetes

# Requests per step. Memory: the 4B reranker is 16 GB in fp32; merge holds base + adapter model + merged copy.
RESOURCES = {
    "convert": {"cpu": "2", "memory": "8Gi"},
    "split": {"cpu": "1", "memory": "4Gi"},
    "mine": {"cpu": "4", "memory": "32Gi"},
    "score": {"cpu": "4", "memory": "32Gi"},
    "train": {"cpu": "8", "memory": "64Gi"},
    "merge": {"cpu": "4", "memory": "48Gi"},
    "evaluate": {"cpu": "4", "memory": "32Gi"},
    "register": {"cpu": "2", "memory": "32Gi"},
    "deploy": {"cpu": "1", "memory": "2Gi"},
}
TIMEOUT_S = {
    "convert": 2 * 3600,
    "split": 3600,
    "mine": 6 * 3600,
    "score": 12 * 3600,  # resumable: a retried pod goes on from its last chunk
    "train": 48 * 3600,
    "merge": 2 * 3600,
    "evaluate": 6 * 3600,
    "register": 2 * 3600,
    "deploy": 3600,  # the step's own ready_timeout_s (default 900 s) is shorter
}
RETRIES = {"convert": 3, "register": 3, "deploy": 2}  # a retried deploy of the same version only waits
RETRY_BACKOFF = {"backoff_duration": "60s", "backoff_factor": 2.0, "backoff_max_duration": "3600s"}
NO_CACHE = {"convert", "train", "register", "deploy"}
SHM_STEPS = {"train", "evaluate", "merge", "mine", "score"}
SHM_SIZE = "16Gi"

MLFLOW_SECRET = "mlflow-credentials"
MLFLOW_SECRET_KEYS = {
    "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN": "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI",  # used when the pipeline parameter tracking_uri is empty
}
MLFLOW_STEPS = {"register", "deploy"}

# Hooks. A PVC name here mounts it at MODEL_CACHE_PATH on the steps that load models and points HF_HOME there.
MODEL_CACHE_PVC: str | None = None
MODEL_CACHE_PATH = "/cache/huggingface"
MODEL_CACHE_STEPS = {"train", "merge", "evaluate", "register", "mine", "score"}
# A PVC name here mounts it at CHECKPOINT_PATH on train, which keeps its checkpoints there (per run id) and is
# retried CHECKPOINT_RETRIES times: a preempted pod resumes instead of starting over.
CHECKPOINT_PVC: str | None = None
CHECKPOINT_PATH = "/checkpoints"
CHECKPOINT_RETRIES = 3
# A ReadWriteMany PVC name here mounts it at SHARED_PATH on train: where the nodes of a multi-node job
# (pipeline parameter nodes > 1) read the data and write checkpoints and the model.
SHARED_PVC: str | None = None
SHARED_PATH = "/shared"
# e.g. {"train": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}}
NODE_SELECTORS: dict[str, dict[str, str]] = {}
GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
TOLERATIONS: dict[str, list[dict]] = {
    "train": GPU_TOLERATIONS,
    "evaluate": GPU_TOLERATIONS,
    "mine": GPU_TOLERATIONS,
    "score": GPU_TOLERATIONS,
}
IMAGE_PULL_SECRETS: list[str] = []


def checkpoint_dir() -> str:
    """train's `checkpoint_dir`: the mounted checkpoint volume, or "" (checkpoints stay in the pod)."""
    return CHECKPOINT_PATH if CHECKPOINT_PVC else ""


def shared_dir() -> str:
    """train's `shared_dir`: the mounted ReadWriteMany volume, or "" (then nodes > 1 is refused)."""
    return SHARED_PATH if SHARED_PVC else ""


def configure(task, step: str, accelerator_type=None, accelerators=None):
    """Apply every cluster setting of `step` to `task`; `accelerators` is a pipeline parameter (count)."""
    task.set_display_name(step)
    res = RESOURCES[step]
    task.set_cpu_request(res["cpu"]).set_memory_request(res["memory"])
    if accelerators is not None:
        task.set_accelerator_type(accelerator_type).set_accelerator_limit(accelerators)
    if step in NO_CACHE:
        task.set_caching_options(False)
    if step in RETRIES:
        task.set_retry(RETRIES[step], **RETRY_BACKOFF)
    if CHECKPOINT_PVC and step == "train":
        kubernetes.mount_pvc(task, pvc_name=CHECKPOINT_PVC, mount_path=CHECKPOINT_PATH)
        task.set_retry(CHECKPOINT_RETRIES, **RETRY_BACKOFF)
    if SHARED_PVC and step == "train":
        kubernetes.mount_pvc(task, pvc_name=SHARED_PVC, mount_path=SHARED_PATH)
    kubernetes.set_timeout(task, TIMEOUT_S[step])
    if step in SHM_STEPS:
        kubernetes.empty_dir_mount(
            task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=SHM_SIZE
        )
    if step in MLFLOW_STEPS:
        kubernetes.use_secret_as_env(
            task, secret_name=MLFLOW_SECRET, secret_key_to_env=MLFLOW_SECRET_KEYS, optional=True
        )
    if MODEL_CACHE_PVC and step in MODEL_CACHE_STEPS:
        kubernetes.mount_pvc(task, pvc_name=MODEL_CACHE_PVC, mount_path=MODEL_CACHE_PATH)
        task.set_env_variable("HF_HOME", MODEL_CACHE_PATH)
    for key, value in NODE_SELECTORS.get(step, {}).items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for toleration in TOLERATIONS.get(step, []):
        kubernetes.add_toleration(task, **toleration)
    if IMAGE_PULL_SECRETS:
        kubernetes.set_image_pull_secrets(task, IMAGE_PULL_SECRETS)
    return task
