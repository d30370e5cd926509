"""The Kubernetes API client of the steps that talk to a cluster (`trainjob`, `inferenceservice`).

`connect()`: an API client and a namespace, in-cluster from the pod's service account, else from the kubeconfig
(`KUBECONFIG`, its current context's namespace). The `kubernetes` package is imported only when called
(extra `embedtune[trainjob]`, which the GPU image installs).
"""

from __future__ import annotations

import os
from pathlib import Path

SA_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def connect():
    """An API client and namespace: in-cluster (the pod's service account), else the kubeconfig
    (`KUBECONFIG`, its current context's namespace)."""
    from kubernetes import client, config

    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
        return client.ApiClient(), Path(SA_NAMESPACE).read_text().strip()
    path = os.environ.get("KUBECONFIG")  # read now: the client reads it once, when it is first imported
    config.load_kube_config(config_file=path)
    _, context = config.list_kube_config_contexts(config_file=path)
    return client.ApiClient(), context["context"].get("namespace", "default")
