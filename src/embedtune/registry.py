"""The MLflow registry as embedtune uses it: where the store is, and which version a pipeline run made.

- `resolve_tracking_uri(flag)`: the flag, else `MLFLOW_TRACKING_URI`, else a local store under `DEFAULT_HOME`
  (`sqlite:///~/.embedtune/mlflow.db`, model files in `~/.embedtune/mlartifacts`). register writes there, and
  serve reads `models:/NAME@ALIAS` from the same place.
- `find_registered(client, name, run_id)`: the version a pipeline run registered (tag `RUN_ID_TAG`);
  `current_champion(client, name)`: the `champion` alias's version and its primary metric. register gates on
  them; deploy serves a run's version only while it is the champion.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from embedtune.errors import EmbedtuneError
from embedtune.safety import mask_credentials

DEFAULT_HOME = "~/.embedtune"  # local store: mlflow.db + mlartifacts/ (used when no URI is given)
RUN_ID_TAG = "embedtune.pipeline_run_id"  # the idempotency key, set on the version as its last step


# What MLflow 3 serves a tracking store from: a server, Databricks, a database, a local folder.
TRACKING_SCHEMES = ("http", "https", "databricks", "sqlite", "postgresql", "mysql", "mssql", "file")


def resolve_tracking_uri(flag: str) -> tuple[str, str | None]:
    """(tracking URI, artifact location for new experiments or None to let the server decide)."""
    uri = flag or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        uri = f"sqlite:///{Path(DEFAULT_HOME).expanduser() / 'mlflow.db'}"
    scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""  # none: a local folder (MLflow's file store)
    if scheme and scheme.split("+")[0] not in TRACKING_SCHEMES:  # postgresql+psycopg2: a driver
        raise EmbedtuneError(
            f"tracking_uri: {mask_credentials(uri)}: unsupported scheme {scheme!r} "
            f"(use {', '.join(s + ':' for s in TRACKING_SCHEMES)}, or a folder)"
        )
    if uri.startswith("sqlite:///"):
        # A local store would put model files in ./mlruns of whatever folder we run from: keep them beside it.
        db = Path(uri[len("sqlite:///") :])
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise EmbedtuneError(
                f"tracking_uri: cannot make the store's folder {db.parent}: {e.strerror or e}"
            ) from None
        return uri, (db.parent / "mlartifacts").resolve().as_uri()
    return uri, None


def find_registered(client: MlflowClient, name: str, run_id: str):
    """The version an earlier call with this run id registered, or None."""
    if not run_id:
        return None
    found = client.search_model_versions(f"name = '{name}' and tags.`{RUN_ID_TAG}` = '{run_id}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def current_champion(client: MlflowClient, name: str) -> tuple[str | None, str | None, float | None]:
    """(version, primary metric name, value) of the champion; Nones when there is none."""
    try:
        rm = client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None, None, None
        raise
    version = (rm.aliases or {}).get("champion")
    if version is None:
        return None, None, None
    mv = client.get_model_version(name, str(version))
    metric = mv.tags.get("embedtune.primary_metric")
    raw = mv.tags.get("embedtune.primary_value")
    if raw is None and metric and mv.run_id:  # a champion registered by other means: its run's metric
        with contextlib.suppress(MlflowException):
            raw = client.get_run(mv.run_id).data.metrics.get(metric)
    return str(version), metric, (float(raw) if raw not in (None, "") else None)
