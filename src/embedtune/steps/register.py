"""register: put a trained model in the MLflow Model Registry, behind a champion gate.

    embedtune register --model out/merged --metrics out/metrics.json --name my-embedder --run-id "$RUN"

What one call does, in order. Nothing is created on the server before step 5, so a dead server, a bad
folder or a bad metrics file leaves no trace:

1. Read the model folder's `embedtune.json` (absent for a plain sentence-transformers folder: then it is an
   embedder), the metrics JSON from evaluate and, when given, convert's stats JSON (its `fingerprint`).
2. Resolve the tracking URI: `--tracking-uri`, else `MLFLOW_TRACKING_URI`, else the local store
   `sqlite:///~/.embedtune/mlflow.db` with model files in `~/.embedtune/mlartifacts/` (`mlflow ui
   --backend-store-uri sqlite:///$HOME/.embedtune/mlflow.db` shows it).
3. Check the server answers (tracking and registry API). The MLflow client retries for minutes by default;
   unless the environment says otherwise we allow 3 retries, backoff factor 1, 30 s per request, then stop
   with an error naming the URI (credentials in the URI are masked).
4. Idempotency: a version of NAME tagged `embedtune.pipeline_run_id == --run-id` is returned as it is; no
   run, no version is created. (Without `--run-id` every call registers a new version.) What an earlier
   call with this run id left half-done because the server went away mid-way (a version without that tag,
   a run still RUNNING) is cleaned up first: the version is deleted (the champion alias goes back to the
   version it had replaced), the run ends FAILED.
5. One MLflow run: every training knob under its own name as a param (the `train_config` saved with the
   model), the evaluation metrics (`@` is not allowed by MLflow, so `ndcg@10` becomes `ndcg_at_10`),
   `baseline_<m>` / `delta_<m>` when evaluate measured a baseline, lineage tags (`embedtune.pipeline_run_id`,
   `embedtune.base_model`, `embedtune.dataset_fingerprint`, `embedtune.version`, `embedtune.image`) and the
   model, logged with the MLflow 3 API under `name="model"`.
6. Register a version, then, holding a per-name lock (`champion_lock`: two registers racing for one name
   take turns; a lock that a dead earlier try of the same run id left is taken over at once), point alias
   `challenger` at it, read the champion and move `champion` to the new version only when
   `primary > champion's primary + min_improvement` or there is no champion (every metric embedtune
   reports is higher-is-better). The decision and both numbers are printed (stderr) and tagged on the
   version and the run; the run-id tag comes last. A failure after the run started deletes the
   half-made version, marks the run FAILED and raises `EmbedtuneError` (when the server itself is gone,
   the next call with the same run id does it, see 4).

Credentials come only from the environment (`MLFLOW_TRACKING_TOKEN`, or `MLFLOW_TRACKING_USERNAME` +
`MLFLOW_TRACKING_PASSWORD`, read by the MLflow client itself; never flags). Their values (and any
`user:password@` in the URI) are masked out of every param, tag, description and message this step writes.

How the model is stored and served (sentence_transformers flavor for embedders, a pyfunc scoring
(query, document) pairs for rerankers) is `embedtune.mlflow_models`; consumers load it by alias:
`mlflow.pyfunc.load_model("models:/NAME@champion")`.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import re
import tempfile
import time
from pathlib import Path

import mlflow
import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from embedtune import __version__
from embedtune.config import RegisterConfig
from embedtune.data import is_number
from embedtune.errors import DataError, EmbedtuneError
from embedtune.io import read_json
from embedtune.mlflow_models import logger_for, redacted_copy
from embedtune.modeling import META_FILE, check_sources, is_adapter, read_meta
from embedtune.progress import say
from embedtune.registry import RUN_ID_TAG, current_champion, find_registered, resolve_tracking_uri
from embedtune.report import metric_table
from embedtune.safety import mask_credentials

# Read by the MLflow client itself; their values never appear in anything this step writes or prints.
SECRET_ENV = ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
# Bounded waits for an unreachable server, applied only where the environment sets nothing.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",  # urllib3 waits 0, 2, 4 s (+ up to 1 s jitter each)
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
# Top-level embedtune.json fields that are knobs; they win over `train_config` (e.g. pooling auto -> mean).
META_PARAMS = (
    "task_type",
    "base_model",
    "train_type",
    "pooling",
    "query_instruction",
    "max_length",
    "positive_token",
    "negative_token",
    "reranker_instruction",
)


# --------------------------------------------------------------------------------------------- secrets
class Redactor:
    """Masks credential values (from the environment or a URI's user:password@) in any text we write."""

    def __init__(self, uri: str = ""):
        self.secrets = [os.environ[k] for k in SECRET_ENV if len(os.environ.get(k, "")) >= 4]
        userinfo = re.match(r"^[a-z][\w+.-]*://([^/@]+)@", uri)
        if userinfo:
            self.secrets.append(userinfo.group(1))
        self.secrets.sort(key=len, reverse=True)

    def __call__(self, text) -> str:
        text = mask_credentials(str(text))  # any other URI's user:password@ too
        for s in self.secrets:
            text = text.replace(s, "***")
        return text


def redact_uri(uri: str) -> str:
    """`https://user:pw@host/x` -> `https://***@host/x`."""
    return mask_credentials(uri)


# --------------------------------------------------------------------------------------------- inputs
def read_model_meta(model_dir: Path) -> dict:
    """`embedtune.json` of the folder with defaults: a plain sentence-transformers folder is an embedder."""
    if not model_dir.is_dir():
        raise EmbedtuneError(f"{model_dir}: model folder not found")
    if is_adapter(model_dir):
        raise EmbedtuneError(
            f"{model_dir}: is a LoRA adapter; run `embedtune merge --adapter {model_dir} --output DIR` "
            "and register the merged folder"
        )
    meta = {"task_type": "embedding", "base_model": str(model_dir), **read_meta(model_dir)}
    check_sources(str(model_dir), bool((meta.get("train_config") or {}).get("trust_remote_code", False)))
    return meta


def metric_name(name: str) -> str:
    """A name MLflow accepts: `ndcg@10` -> `ndcg_at_10`; other odd characters -> `_`."""
    return re.sub(r"[^\w\-. /]", "_", name.replace("@", "_at_"))


def read_metrics(path: Path) -> dict:
    """Evaluate's JSON -> primary metric, metrics to log, table rows and leftover scalars (params).

    Accepts evaluate's layout (`metrics`, `baseline_metrics`, `deltas`, `primary_metric`, `primary_value`)
    or a flat dict of floats with `primary_metric` naming one of them.
    """
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object of metrics")
    nested = isinstance(data.get("metrics"), dict)
    own = data["metrics"] if nested else {k: v for k, v in data.items() if is_number(v)}
    own = {metric_name(k): float(v) for k, v in own.items() if is_number(v) and k != "primary_value"}
    baseline = {
        metric_name(k): float(v) for k, v in (data.get("baseline_metrics") or {}).items() if is_number(v)
    }
    deltas = {metric_name(k): float(v) for k, v in (data.get("deltas") or {}).items() if is_number(v)}
    primary = data.get("primary_metric")
    if not isinstance(primary, str) or not primary:
        raise DataError(f"{path}: primary_metric: missing (the metric the champion gate compares)")
    primary = metric_name(primary)
    value = data.get("primary_value", own.get(primary))
    if not is_number(value) or math.isnan(float(value)):
        raise DataError(f"{path}: primary_metric: {primary!r} has no numeric value in this file")

    logged = dict(own)
    logged.update({f"baseline_{k}": v for k, v in baseline.items()})
    for k, v in deltas.items():
        logged[k if k.startswith("delta_") else f"delta_{k}"] = v
    if nested:  # evaluate's other scalars (n_eval, ...) are facts about the evaluation: params
        skip = {"metrics", "baseline_metrics", "deltas", "primary_metric", "primary_value"}
        skip.add("report")  # logged as a file
        extra = {k: v for k, v in data.items() if k not in skip and (is_number(v) or isinstance(v, str))}
    else:
        extra = {}
    rows = [(k, v, baseline.get(k), deltas.get(f"delta_{k}", deltas.get(k))) for k, v in own.items()]
    named = data.get("report") if isinstance(data.get("report"), str) else ""
    reports = [Path(named), path.parent / Path(named).name] if named else []
    reports.append(Path(f"{path}.md"))
    guards = data.get("guards") if isinstance(data.get("guards"), dict) else {}
    for name, g in guards.items():  # guard_<set>_<metric> and its delta, beside the eval set's own
        key = metric_name(f"guard_{name}_{g.get('primary_metric')}")
        if is_number(g.get("value")):
            logged[key] = float(g["value"])
        if is_number(g.get("delta")):
            logged[f"delta_{key}"] = float(g["delta"])
    return {
        "primary": primary,
        "value": float(value),
        "guard_failures": [str(n) for n in data.get("guard_failures") or []],
        "metrics": logged,
        "rows": rows,
        "extra": extra,
        "reports": reports,
    }


def read_fingerprint(path: str) -> str:
    if not path:
        return ""
    stats = read_json(path)
    fp = stats.get("fingerprint") if isinstance(stats, dict) else None
    if not isinstance(fp, str) or not fp:
        raise DataError(f"{path}: fingerprint: missing (expected convert's stats JSON)")
    return fp


def collect_params(meta: dict, metrics: dict, cfg: RegisterConfig) -> dict[str, str]:
    """One name per knob: the training config's own field names, then evaluate's scalars and ours."""
    params = dict(meta.get("train_config") or {})
    params.update({k: meta[k] for k in META_PARAMS if k in meta})
    for k, v in metrics["extra"].items():
        params[k if k not in params or params[k] == v else f"eval_{k}"] = v
    params.update(primary_metric=metrics["primary"], min_improvement=cfg.min_improvement)
    return params


# --------------------------------------------------------------------------------------------- server
def check_reachable(client: MlflowClient, shown_uri: str, redact: Redactor) -> None:
    """One tracking and one registry call, with the client's (bounded) retries; a clear error if either fails."""
    try:
        client.search_experiments(max_results=1)
        client.search_registered_models(max_results=1)
    except (MlflowException, requests.RequestException, OSError) as e:
        reason = redact(getattr(e, "message", None) or e)
        if re.search(r"\b(401|403)\b|unauthori[sz]ed|forbidden", reason, re.I):
            hint = "authentication failed: set MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/PASSWORD"
        else:
            retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
            hint = f"not reachable after {retries} retries" if retries else "not reachable"
        raise EmbedtuneError(f"MLflow tracking server {shown_uri}: {hint}: {reason[:400]}") from None


def champion_gate(
    metric, value, champ_version, champ_metric, champ_value, min_improvement
) -> tuple[bool, str]:
    """(promote?, the sentence that explains it, with both numbers)."""
    if champ_version is None:
        return True, f"promoted to champion: no champion yet ({metric} = {value:.6g})"
    if champ_metric != metric or champ_value is None:
        return False, (
            f"kept champion v{champ_version}: it was measured with {champ_metric or 'no recorded metric'}, "
            f"this version with {metric} = {value:.6g}; not comparable (set the alias by hand to promote)"
        )
    bar = champ_value + min_improvement
    if value > bar:
        return True, (
            f"promoted to champion: {metric} {value:.6g} > champion v{champ_version} {champ_value:.6g}"
            f" + min_improvement {min_improvement:g}"
        )
    return False, (
        f"kept champion v{champ_version}: {metric} {value:.6g} <= champion {champ_value:.6g}"
        f" + min_improvement {min_improvement:g}; this version is challenger"
    )


# --------------------------------------------------------------------------------------------- model flavors
# --------------------------------------------------------------------------------------------- description
def describe(cfg: RegisterConfig, meta: dict, metrics: dict, decision: str) -> str:
    """The version's Markdown description: what it is, its metrics table, the gate's decision, how to load it."""
    tuned = {name: value for name, value, _, _ in metrics["rows"]}
    base = {name: b for name, _, b, _ in metrics["rows"] if b is not None}
    lines = [
        f"**{meta['task_type']}** model fine-tuned from `{meta['base_model']}` "
        f"({meta.get('train_type', 'n/a')}) by embedtune {__version__}"
        + (f", pipeline run `{cfg.run_id}`" if cfg.run_id else "")
        + ".",
        "",
        metric_table(tuned, base or None, metrics["primary"]),
    ]
    usage = (
        f'`mlflow.pyfunc.load_model("models:/{cfg.name}@champion").predict(texts)`; '
        'queries: `params={"prompt_name": "query"}`'
        if meta["task_type"] == "embedding"
        else f'`mlflow.pyfunc.load_model("models:/{cfg.name}@champion").predict(pd.DataFrame({{"query": ..., "document": ...}}))`'
    )
    lines += ["", f"Champion gate: {decision}.", "", f"Load: {usage}"]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- the step
def _result(client, cfg, mv, created: bool, shown_uri: str) -> dict:
    """What the step returns, read back from the version's tags (same shape for new and existing)."""
    aliases = sorted(client.get_model_version(cfg.name, mv.version).aliases or [])
    tags = mv.tags
    before = tags.get("embedtune.champion_value_before") or None
    return {
        "name": cfg.name,
        "version": str(mv.version),
        "model_uri": f"models:/{cfg.name}@champion"
        if "champion" in aliases
        else f"models:/{cfg.name}/{mv.version}",
        "version_uri": f"models:/{cfg.name}/{mv.version}",
        "aliases": aliases,
        "promoted": tags.get("embedtune.promoted") == "true",
        "decision": tags.get("embedtune.decision", ""),
        "primary_metric": tags.get("embedtune.primary_metric", ""),
        "primary_value": float(tags["embedtune.primary_value"])
        if tags.get("embedtune.primary_value")
        else None,
        "champion_value_before": float(before) if before else None,
        "champion_version_before": tags.get("embedtune.champion_version_before") or None,
        "mlflow_run_id": mv.run_id,
        "tracking_uri": shown_uri,
        "created": created,
    }


def run(cfg: RegisterConfig) -> dict:
    """Log, register and gate one model folder. Returns model_uri, version, aliases, promoted, decision,
    primary_metric/primary_value, champion_value_before (see the module docstring for each step)."""
    for field in ("name", "run_id"):
        if re.search(r"['\"`\\]", getattr(cfg, field)):
            raise EmbedtuneError(f"--{field.replace('_', '-')}: quotes and backslashes are not allowed")
    model_dir = Path(cfg.model)
    meta = read_model_meta(model_dir)
    metrics = read_metrics(Path(cfg.metrics))
    fingerprint = read_fingerprint(cfg.dataset_stats)

    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    uri, artifact_location = resolve_tracking_uri(cfg.tracking_uri)
    redact = Redactor(uri)
    shown_uri = redact_uri(uri)
    if shown_uri != uri:  # MLflow prints "View run ... at: <the URI>" when a run ends, credentials and all
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    client = MlflowClient(tracking_uri=uri)
    check_reachable(client, shown_uri, redact)

    try:
        existing = find_registered(client, cfg.name, cfg.run_id)
        if existing is not None:
            say(
                "register",
                f"{cfg.name} v{existing.version} already registered for run id {cfg.run_id}; nothing created",
            )
            return _result(client, cfg, existing, created=False, shown_uri=shown_uri)
        clean_up_after(client, cfg.name, cfg.run_id)
        model_existed = bool(client.search_registered_models(f"name = '{cfg.name}'"))
    except MlflowException as e:
        raise EmbedtuneError(f"MLflow at {shown_uri}: {redact(e.message)[:400]}") from None

    lineage = {
        RUN_ID_TAG: cfg.run_id,
        "embedtune.base_model": str(meta["base_model"]),
        "embedtune.dataset_fingerprint": fingerprint,
        "embedtune.version": __version__,
        "embedtune.image": cfg.image,
        "embedtune.task_type": meta["task_type"],
        "embedtune.train_type": str(meta.get("train_type", "")),
        # Matryoshka widths the model was trained for (serve truncated to one of them, re-normalized).
        "embedtune.matryoshka_dims": ",".join(map(str, meta.get("matryoshka_dims") or ())),
        # MLflow would tag the run with MLFLOW_TRACKING_USERNAME; the OS user says who ran it without it.
        "mlflow.user": os.environ.get("USER") or "embedtune",
    }
    lineage = {k: redact(v) for k, v in lineage.items() if v}
    params = {k: redact(v)[:6000] for k, v in collect_params(meta, metrics, cfg).items()}

    mlflow.set_tracking_uri(uri)
    version = None
    try:
        exp_id = experiment_id(client, cfg.experiment_name, artifact_location)
        run_name = f"{cfg.name}-{cfg.run_id}" if cfg.run_id else cfg.name
        # The context manager ends the run FAILED when anything below raises.
        with mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=lineage) as active:
            mlflow.log_params(params)
            mlflow.log_metrics(metrics["metrics"])
            report = next((r for r in metrics["reports"] if r.is_file()), None)  # Markdown, plots inline
            files = [(Path(cfg.metrics), "evaluation"), (report, "evaluation"), (model_dir / META_FILE, None)]
            files.append((Path(cfg.dataset_stats) if cfg.dataset_stats else None, "data"))
            with tempfile.TemporaryDirectory() as tmp:
                for i, (src, where) in enumerate(files):
                    if src is not None and src.is_file():
                        (Path(tmp) / str(i)).mkdir()
                        mlflow.log_artifact(redacted_copy(src, Path(tmp) / str(i), redact), where)
            extra_metadata = {"embedtune_version": __version__, "task_type": meta["task_type"]}
            info = logger_for(meta)(model_dir, meta, extra_metadata, redact)
            mv = mlflow.register_model(
                info.model_uri, cfg.name, tags={k: v for k, v in lineage.items() if k != RUN_ID_TAG}
            )
            version = mv.version
            # Aliases move under a lock: two registers racing for one name each compare against the
            # champion the other one may just have set (and MLflow's own alias upsert is not atomic).
            with champion_lock(client, cfg.name, redact(cfg.run_id)):
                client.set_registered_model_alias(cfg.name, "challenger", version)
                champ_version, champ_metric, champ_value = current_champion(client, cfg.name)
                promote, decision = champion_gate(
                    metrics["primary"], metrics["value"], champ_version, champ_metric, champ_value,
                    cfg.min_improvement,
                )  # fmt: skip
                if metrics["guard_failures"]:  # evaluate's guard sets: general ability lost
                    promote = False
                    decision = (f"kept champion: guard set(s) {', '.join(metrics['guard_failures'])} fell more than "
                                "max_guard_drop below the baseline; this version is challenger")  # fmt: skip
                decision_tags = {
                    "embedtune.primary_metric": metrics["primary"],
                    "embedtune.primary_value": repr(metrics["value"]),
                    "embedtune.champion_value_before": "" if champ_value is None else repr(champ_value),
                    "embedtune.champion_version_before": champ_version or "",
                    "embedtune.min_improvement": repr(cfg.min_improvement),
                    "embedtune.promoted": "true" if promote else "false",
                    "embedtune.decision": decision,
                }
                decision_tags = {k: redact(v) for k, v in decision_tags.items()}
                for (
                    k,
                    v,
                ) in decision_tags.items():  # before the alias: a half-made version says what it replaced
                    client.set_model_version_tag(cfg.name, version, k, v)
                if promote:
                    client.set_registered_model_alias(cfg.name, "champion", version)
            description = redact(describe(cfg, meta, metrics, decision))
            client.update_model_version(cfg.name, version, description=description)
            mlflow.set_tags(decision_tags)
            mlflow.set_tag("embedtune.registered_version", f"{cfg.name}/{version}")
            if cfg.run_id:  # last: only a finished registration is found by the idempotency search
                client.set_model_version_tag(cfg.name, version, RUN_ID_TAG, redact(cfg.run_id))
            mlflow_run_id = active.info.run_id
    except (MlflowException, requests.RequestException, OSError) as e:
        _undo(client, cfg.name, version, model_existed)
        reason = redact(getattr(e, "message", None) or e)[:400]
        raise EmbedtuneError(
            f"MLflow at {shown_uri}: registering {cfg.name} failed (run marked FAILED): {reason}"
        ) from None
    except BaseException:
        _undo(client, cfg.name, version, model_existed)
        raise

    say("register", f"{cfg.name} v{version} (run {mlflow_run_id}): {decision}")
    return _result(
        client, cfg, client.get_model_version(cfg.name, version), created=True, shown_uri=shown_uri
    )


def experiment_id(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """The experiment's id, created when missing (two registers creating it at once: one wins, both use it)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


LOCK_SUFFIX = ".embedtune-champion-lock"
LOCK_STALE_S = 120.0  # a lock older than this was left by a register that died while holding it
LOCK_HOLDER_TAG = "embedtune.lock_holder"  # the pipeline run id of the register holding the lock


@contextlib.contextmanager
def champion_lock(client: MlflowClient, name: str, run_id: str = "", timeout_s: float = 600.0):
    """A mutex per registered model, made of MLflow's own atomic create: creating the registered model
    `<name>.embedtune-champion-lock` fails for every caller but one while it exists. Held for the few calls
    that read the champion and move the alias; deleted on exit. A lock left by a process that died is
    taken over after `LOCK_STALE_S`, or at once by a retry of the same pipeline run (`run_id`, recorded on
    the lock): retries of one run are sequential, so the holder that left it is dead."""
    lock = f"{name}{LOCK_SUFFIX}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.create_registered_model(
                lock,
                tags={LOCK_HOLDER_TAG: run_id},
                description="embedtune: a register is moving the champion",
            )
            break
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        with contextlib.suppress(MlflowException):
            held = client.get_registered_model(lock)
            mine = bool(run_id) and held.tags.get(LOCK_HOLDER_TAG) == run_id
            if mine or time.time() - held.creation_timestamp / 1000 > LOCK_STALE_S:
                why = "left by an earlier try of this run" if mine else f"left {LOCK_STALE_S:.0f}+ s ago"
                say("register", f"taking over the lock {lock} ({why})")
                client.delete_registered_model(lock)
                continue
        if time.monotonic() > deadline:
            raise EmbedtuneError(f"{lock}: held by another register for over {timeout_s:.0f} s")
        time.sleep(0.2 + random.random() * 0.3)
    try:
        yield
    finally:
        with contextlib.suppress(MlflowException, requests.RequestException, OSError):
            client.delete_registered_model(lock)


def clean_up_after(client: MlflowClient, name: str, run_id: str) -> None:
    """Undo what an earlier call with this run id left half-done when it could not undo it itself (the
    server was down): versions it registered but never finished (no run-id tag yet) are deleted, giving
    the champion alias back to the version they had replaced, and its runs still RUNNING end FAILED."""
    if not run_id:
        return
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`{RUN_ID_TAG}` = '{run_id}'",
    )
    ours = {r.info.run_id for r in runs}
    for mv in client.search_model_versions(f"name = '{name}'"):
        if mv.run_id in ours and RUN_ID_TAG not in (mv.tags or {}):
            aliases = client.get_model_version(name, mv.version).aliases or []
            before = (mv.tags or {}).get("embedtune.champion_version_before")
            client.delete_model_version(name, mv.version)
            if "champion" in aliases and before:
                with contextlib.suppress(MlflowException):
                    client.set_registered_model_alias(name, "champion", before)
            say("register", f"deleted {name} v{mv.version}, left half-registered by an earlier call")
    for r in runs:
        if r.info.status == "RUNNING":
            client.set_terminated(r.info.run_id, "FAILED")


def _undo(client: MlflowClient, name: str, version, model_existed: bool) -> None:
    """Best effort: leave no half-registered version (nor a model we created that holds nothing)."""
    if version is None:
        return
    with contextlib.suppress(Exception):
        client.delete_model_version(name, version)
        if not model_existed:
            client.delete_registered_model(name)
