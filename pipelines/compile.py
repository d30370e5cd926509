"""`make compile-pipeline`: compile every pipeline to `pipelines/compiled/<name>.yaml`, then validate each file.

The compiled YAML is checked in so Kubeflow UI users need no Python: upload it, fill the form (or start from a
preset's values), run or schedule. Compilation is deterministic for a given kfp version and image registry,
so CI recompiles and fails when the checked-in file is stale (`.ci/run`).

Validation, per file: it loads back as a component and parses as a `PipelineSpec`; every executor names an
image from `images.refs`; every task's component exists; and no credential value appears anywhere in it
(credentials reach pods only through the Kubernetes secret named in `pipelines.cluster`).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path

import yaml
from google.protobuf import json_format
from kfp import compiler, components
from kfp.pipeline_spec import pipeline_spec_pb2

from images.refs import STEP_IMAGES
from pipelines.pipeline import PIPELINES

COMPILED_DIR = Path(__file__).parent / "compiled"

# Literal credential shapes: user:password@ in URLs, cloud / hub / GitHub tokens, private keys.
CREDENTIAL_PATTERNS = [
    re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@'\"]+:[^@\s'\"]+@", re.I),
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]
SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET|API_?KEY|ACCESS_KEY|CREDENTIAL", re.I)


def compile_pipeline(pipeline, path: Path, pipeline_parameters: dict | None = None) -> Path:
    """Compile `pipeline` to `path` atomically (a failed compile leaves the old file in place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.yaml", dir=path.parent)
    os.close(fd)
    try:
        compiler.Compiler().compile(pipeline, tmp, pipeline_parameters=pipeline_parameters)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def validate(path: Path, environ=None) -> list[str]:
    """Problems found in a compiled pipeline file (empty list: valid)."""
    environ = os.environ if environ is None else environ
    text = path.read_text()
    problems = []
    docs = list(yaml.safe_load_all(text))
    spec_dict = docs[0]
    try:
        components.load_component_from_file(str(path))
        spec = json_format.ParseDict(spec_dict, pipeline_spec_pb2.PipelineSpec())
    except Exception as e:  # any parse error is the finding itself
        return [f"{path}: does not load back: {e}"]

    images = set(STEP_IMAGES.values())
    executors = spec.deployment_spec.fields["executors"].struct_value.fields
    for label, executor in executors.items():
        container = executor.struct_value.fields.get("container")
        image = container.struct_value.fields["image"].string_value if container else ""
        if image not in images:
            problems.append(f"{path}: executor {label}: image {image!r} is not one of images.refs")
        for env in (
            container.struct_value.fields["env"].list_value.values
            if container and "env" in container.struct_value.fields
            else []
        ):
            name = env.struct_value.fields["name"].string_value
            if SECRET_NAME.search(name):
                problems.append(
                    f"{path}: executor {label}: env {name} is set literally; map it from a secret"
                )

    all_components = dict(spec.components)
    dags = [spec.root.dag] + [c.dag for c in all_components.values() if c.HasField("dag")]
    for dag in dags:
        for task_name, task in dag.tasks.items():
            ref = task.component_ref.name
            if ref not in all_components:
                problems.append(f"{path}: task {task_name}: component {ref} is missing")
            elif (
                not all_components[ref].HasField("dag")
                and all_components[ref].executor_label not in executors
            ):
                problems.append(
                    f"{path}: task {task_name}: executor {all_components[ref].executor_label} is missing"
                )

    for pattern in CREDENTIAL_PATTERNS:
        for m in pattern.finditer(text):
            problems.append(f"{path}: line {text.count(chr(10), 0, m.start()) + 1}: looks like a credential")
    for key, value in environ.items():
        if SECRET_NAME.search(key) and len(value) >= 8 and value in text:
            problems.append(f"{path}: contains the value of environment variable {key}")
    return problems


def main(argv: list[str] | None = None) -> int:
    failed = False
    for name, pipeline in PIPELINES.items():
        path = compile_pipeline(pipeline, COMPILED_DIR / f"{name}.yaml")
        problems = validate(path)
        for problem in problems:
            print(problem, file=sys.stderr)
        failed |= bool(problems)
        print(f"{path}: {'INVALID' if problems else 'ok'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
