"""Submit / schedule: run a preset on a Kubeflow Pipelines server, once or on a cron.

    python -m pipelines.client submit   --preset tiny --host https://kfp.example.com [--param lora_rank=32]
    python -m pipelines.client schedule --preset qwen3-embedding-0.6b-lora --host ... --cron '0 0 3 * * 0'

(`make submit PRESET=... KFP_HOST=...` runs the same code.) Both send the checked-in
compiled pipeline (`pipelines/compiled/embedtune.yaml`, what `make compile-pipeline` writes) with the preset's
values as run arguments, `--param key=value` overriding single values (parsed as YAML scalars). The preset's
keys are pipeline parameter names, so a typo is an error, not a silently ignored knob.

Scheduling uses KFP's cron format: SIX fields with seconds first (`0 0 3 * * 0` = Sundays 03:00:00), read in
UTC by the KFP scheduler. Missed runs are not back-filled and at most one run is active at a time.

Authentication is kfp.Client's: in-cluster service-account tokens, `--existing-token` (or env KFP_TOKEN), or
`--cookies` for a Dex-protected endpoint. This lives with the pipeline, not in the `embedtune` package: the
library never imports kfp or `pipelines` (the step images need neither), and submitting needs the presets
and the compiled YAML, which are in this repository.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

COMPILED = Path(__file__).parent / "compiled" / "embedtune.yaml"


def run_arguments(preset: str, overrides: dict) -> dict:
    """The preset's values with `overrides` applied; every key must be a pipeline parameter."""
    from pipelines.pipeline import coerce_arguments, load_preset, pipeline_parameters

    arguments = load_preset(preset)
    arguments.update(coerce_arguments(overrides, where="--param"))
    known = pipeline_parameters()
    missing = [k for k, v in known.items() if v is None and k not in arguments]
    if missing:
        raise ValueError(f"preset {preset}: required parameters missing: {', '.join(missing)} (use --param)")
    return arguments


def check_cron(cron: str) -> str:
    fields = cron.split()
    if len(fields) != 6:
        raise ValueError(
            f"--cron {cron!r}: KFP cron has 6 fields, seconds first (e.g. '0 0 3 * * 0' = Sundays 03:00 UTC)"
        )
    return " ".join(fields)


def submit(
    client, preset: str, overrides: dict, experiment: str, run_name: str = "", package: Path = COMPILED
):
    """Start one run of `preset`; returns kfp's RunPipelineResult."""
    arguments = run_arguments(preset, overrides)
    return client.create_run_from_pipeline_package(
        pipeline_file=str(package),
        arguments=arguments,
        run_name=run_name or f"embedtune-{preset}",
        experiment_name=experiment,
    )


def schedule(
    client,
    preset: str,
    overrides: dict,
    experiment: str,
    cron: str,
    job_name: str = "",
    package: Path = COMPILED,
):
    """Create (enabled) a recurring run of `preset` on a 6-field UTC cron; returns the recurring run."""
    arguments = run_arguments(preset, overrides)
    cron = check_cron(cron)
    experiment_id = client.create_experiment(name=experiment).experiment_id
    return client.create_recurring_run(
        experiment_id=experiment_id,
        job_name=job_name or f"embedtune-{preset}-retrain",
        description=f"embedtune retraining, preset {preset}, cron {cron} (UTC)",
        cron_expression=cron,
        max_concurrency=1,
        no_catchup=True,
        params=arguments,
        pipeline_package_path=str(package),
        enabled=True,
    )


def build_parser() -> argparse.ArgumentParser:
    from pipelines.pipeline import preset_names

    parser = argparse.ArgumentParser(
        prog="python -m pipelines.client",
        description="Run a preset on a Kubeflow Pipelines server (once, or on a cron) with the compiled pipeline.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in (
        ("submit", "start one run now"),
        ("schedule", "create a recurring run (cron, UTC)"),
    ):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--preset", required=True, help=f"one of {', '.join(preset_names())}, or a YAML path")
        p.add_argument(
            "--host", default=os.environ.get("KFP_HOST", ""), help="KFP API endpoint (default: env KFP_HOST)"
        )
        p.add_argument(
            "--namespace", default=None, help="Kubeflow profile namespace (multi-user deployments)"
        )
        p.add_argument("--experiment", default="embedtune", help="KFP experiment (created when missing)")
        p.add_argument(
            "--param",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override one pipeline parameter",
        )
        p.add_argument(
            "--existing-token",
            default=os.environ.get("KFP_TOKEN"),
            help="bearer token (default: env KFP_TOKEN)",
        )
        p.add_argument("--cookies", default=None, help="session cookies for Dex-protected endpoints")
        p.add_argument(
            "--package", type=Path, default=COMPILED, help="compiled pipeline YAML (default: %(default)s)"
        )
        if name == "submit":
            p.add_argument("--run-name", default="", help="run name (default: embedtune-<preset>)")
        else:
            p.add_argument(
                "--cron", required=True, help="6-field cron, seconds first, UTC: '0 0 3 * * 0' = Sun 03:00"
            )
            p.add_argument(
                "--job-name", default="", help="recurring run name (default: embedtune-<preset>-retrain)"
            )
    sub.add_parser("params", help="list the pipeline parameters and their defaults")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "params":
        from pipelines.pipeline import parameter_help, pipeline_parameters

        helps = parameter_help()
        for key, value in pipeline_parameters().items():
            print(f"{key}: {'(required)' if value is None else repr(value)}  # {helps[key]}")
        return 0

    from pipelines.pipeline import parse_params

    try:
        overrides = parse_params(args.param)
        if args.command == "schedule":
            check_cron(args.cron)
        run_arguments(args.preset, overrides)  # fail on a bad preset before contacting the server
        if not args.package.is_file():
            raise ValueError(f"{args.package}: not found; run `make compile-pipeline`")
        if not args.host:
            raise ValueError("--host (or env KFP_HOST) is required")
    except ValueError as e:
        print(f"pipelines.client {args.command}: error: {e}", file=sys.stderr)
        return 2

    import kfp

    client = kfp.Client(
        host=args.host, namespace=args.namespace, existing_token=args.existing_token, cookies=args.cookies
    )
    if args.command == "submit":
        result = submit(client, args.preset, overrides, args.experiment, args.run_name, args.package)
        print(f"run {result.run_id} started (experiment {args.experiment})")
    else:
        job = schedule(
            client, args.preset, overrides, args.experiment, args.cron, args.job_name, args.package
        )
        print(f"recurring run {job.recurring_run_id} created: cron {check_cron(args.cron)} (UTC)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
