"""`embedtune <step> --flags`: a CLI generated from the step config dataclasses.

Each field of `<Step>Config` becomes a flag in both spellings (`--lora-rank` and `--lora_rank`, so ms-swift
users can paste their flags); its help text is the trailing comment on the field in `config.py`
(`config.field_help`). Booleans take an optional value (`--infonce-use-batch`, `--infonce-use-batch false`).
The step's `run(cfg)` result is printed as JSON on stdout. A user error (`EmbedtuneError`) prints one line
and exits with status 2.

Submitting and scheduling the Kubeflow pipeline are not steps: they live with the pipeline in the repository
(`make submit`, `python -m pipelines.client`), since the library never imports kfp or `pipelines`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import sys

import orjson

from embedtune import __version__
from embedtune.config import CLI_CONFIGS, field_help, parse_bool
from embedtune.errors import EmbedtuneError
from embedtune.knobs import field_types
from embedtune.progress import error_line
from embedtune.safety import mask_credentials


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (`embedtune train: error: argument --lora-rank: ...`), exit 2."""

    def error(self, message: str):
        self.exit(2, mask_credentials(f"{self.prog}: error: {message}") + "\n")


def _bool_flag(raw: str) -> bool:
    try:
        return parse_bool(raw)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_config_arguments(parser: argparse.ArgumentParser, cls) -> None:
    helps = field_help(cls)
    types_ = field_types(cls)
    for f in dataclasses.fields(cls):
        kind, optional = types_[f.name]
        flags = [f"--{f.name.replace('_', '-')}"]
        if "_" in f.name:
            flags.append(f"--{f.name}")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        kwargs: dict = {"dest": f.name, "help": helps.get(f.name, "")}
        if required:
            kwargs["required"] = True
        else:
            kwargs["default"] = f.default
            if f.default is not None and f.default != "":
                kwargs["help"] += f" (default: {f.default!r})"
        if kind is bool:
            kwargs.update(type=_bool_flag, nargs="?", const=True, metavar="BOOL")
        else:
            kwargs.update(type=kind, metavar=kind.__name__.upper())
        if optional:
            kwargs["help"] += " [unset: see help]" if not kwargs["help"] else ""
        parser.add_argument(*flags, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="embedtune",
        description="Fine-tune embedding models and rerankers: convert -> split -> [mine] -> train -> evaluate -> merge -> "
        "register, then serve. The Kubeflow pipeline is submitted from the repository: make submit (pipelines/client.py).",
    )
    parser.add_argument("--version", action="version", version=f"embedtune {__version__}")
    sub = parser.add_subparsers(dest="step", required=True, metavar="STEP")
    for name, cls in CLI_CONFIGS.items():
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        p = sub.add_parser(name, help=doc, description=doc)
        add_config_arguments(p, cls)
    return parser


def config_from_args(name: str, args: argparse.Namespace):
    cls = CLI_CONFIGS[name]
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args.step, args)  # every knob checked here (knobs.check_config)
        # Libraries print to stdout (DeepSpeed's logger binds it at import): send that to stderr so stdout
        # carries only the JSON result.
        with contextlib.redirect_stdout(sys.stderr):
            step = importlib.import_module(f"embedtune.steps.{args.step}")
            result = step.run(cfg)
    except EmbedtuneError as e:
        print(error_line(args.step, str(e)), file=sys.stderr)
        return 2
    if result is not None:
        text = orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY).decode()
        sys.stdout.write(mask_credentials(text) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
