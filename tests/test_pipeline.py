"""The Kubeflow layer: components mirror the step configs, the DAG compiles (deterministically, for every
preset) with its gates and cluster settings, submit/schedule send the right request, and the tiny preset runs
end to end under kfp.local into a real MLflow store."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import typing
from pathlib import Path

import pytest
import yaml

from components import COMPONENTS
from embedtune import knobs
from embedtune.config import ENV_DEFAULTS, STEP_CONFIGS, field_help
from images.refs import STEP_IMAGES
from pipelines import client as kfp_client
from pipelines.compile import COMPILED_DIR, compile_pipeline, validate
from pipelines.pipeline import (
    NOT_IN_PIPELINE,
    PIPELINE_ONLY,
    PIPELINES,
    embedtune_pipeline,
    load_preset,
    pipeline_parameters,
    preset_names,
)

REPO = Path(__file__).resolve().parent.parent
ARTIFACT_TYPES = {f"system.{t}@0.0.1" for t in ("Dataset", "Model", "Metrics", "Markdown")}
# Component inputs that are not config fields: train's launch knobs, which become TrainConfig.nproc;
# mine's switch and GPU count, which become MineConfig.passthrough and .nproc.
LAUNCH_INPUTS = {
    "train": {"gpus", "cpu_procs"},
    "mine": {"mine_hard_negatives", "mine_gpus"},
    "score": {"score_gpus"},
    "evaluate": {"eval_gpus"},
}
# Config fields a component derives from its inputs instead of taking them as they are.
DERIVED = {"train": {"checkpoint_dir"}}
PARAM_TYPES = {"String": str, "Integer": int, "Float": float, "Boolean": bool}


def compiled_spec(path: Path) -> tuple[dict, dict]:
    pipeline_spec, platform = list(yaml.safe_load_all(path.read_text()))
    return pipeline_spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Path:
    return compile_pipeline(embedtune_pipeline, tmp_path_factory.mktemp("compiled") / "embedtune.yaml")


def field_type(cls, name):
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


# ------------------------------------------------------------------------------------------ components
@pytest.mark.parametrize("step", list(STEP_CONFIGS))
def test_component_inputs_are_config_fields_or_artifacts(step):
    component, cls = COMPONENTS[step], STEP_CONFIGS[step]
    fields = {f.name for f in dataclasses.fields(cls)}
    spec = component.component_spec
    for name, inp in spec.inputs.items():
        if inp.type in ARTIFACT_TYPES:
            continue
        assert name in fields | LAUNCH_INPUTS.get(step, set()), (
            f"{step}: input {name} is not a {cls.__name__} field"
        )
        if name in fields:
            assert PARAM_TYPES[inp.type] is field_type(cls, name), (
                f"{step}.{name}: type differs from the config"
            )
        assert inp.default is None and not inp.optional, f"{step}.{name}: components take no defaults"
    for name, out in (spec.outputs or {}).items():
        assert out.type in ARTIFACT_TYPES or name == "Output", f"{step}: output {name} has type {out.type}"


@pytest.mark.parametrize("step", list(STEP_CONFIGS))
def test_component_describes_every_input_and_output_with_the_config_fields_help(step):
    """The text the Kubeflow UI shows per input: the config field's own help comment, never a hand copy."""
    component, helps = COMPONENTS[step], field_help(STEP_CONFIGS[step])
    spec = component.component_spec
    for name, inp in spec.inputs.items():
        assert (inp.description or "").strip(), f"{step}.{name}: no description"
        if name in helps and inp.type not in ARTIFACT_TYPES and name not in DERIVED.get(step, set()):
            assert inp.description == " ".join(helps[name].split()), f"{step}.{name}: not the field's help"
    for name, out in (spec.outputs or {}).items():
        assert name == "Output" or (out.description or "").strip(), (
            f"{step}: output {name} has no description"
        )


class FakeArtifact:
    """What KFP hands a component at run time: an object with a `.path` (and `log_metric` for Metrics)."""

    def __init__(self, path):
        self.path, self.metrics = str(path), {}

    def log_metric(self, key, value):
        self.metrics[key] = value


FAKE_RESULTS = {
    "evaluate": {"metrics": {"ndcg_at_10": 0.5}, "primary_value": 0.5},
    "register": {"promoted": True, "created": True, "version": "1", "model_uri": "models:/m@champion"},
    "deploy": {"deployed": True, "version": "2", "url": "http://m.team.example.com"},
}


@pytest.mark.parametrize("step", list(STEP_CONFIGS))
def test_component_body_passes_every_input_to_its_config_field(step, tmp_path, monkeypatch):
    """Run the component's own function (as the pod does) with a distinct value per input: each reaches the
    config field of the same name (artifacts as their paths), and the step's `run` gets that config."""
    import importlib

    component, cls = COMPONENTS[step], STEP_CONFIGS[step]
    hints = typing.get_type_hints(component.python_func)
    kwargs = {}
    for name, inp in component.component_spec.inputs.items():
        if inp.type in ARTIFACT_TYPES:
            kwargs[name] = FakeArtifact(tmp_path / name)
        else:
            kwargs[name] = {str: f"v-{name}", int: 3, float: 0.25, bool: True}[hints[name]]
            rule = knobs.rule_for(step, name)
            if rule is not None and rule.choices:  # a value the knob table accepts, not the default
                default = getattr(cls, name, None)
                kwargs[name] = next(c for c in knobs.choices_of(rule) if c not in (default, ""))
    for name in component.component_spec.outputs or {}:
        if name != "Output":
            kwargs[name] = FakeArtifact(tmp_path / name)
    seen = []
    module = importlib.import_module(f"embedtune.steps.{step}")

    def fake_run(cfg):
        seen.append(cfg)
        if step in ("convert", "mine", "score"):
            (tmp_path / "output.stats.json").write_text("{}")
        return {"rows": 7, **FAKE_RESULTS.get(step, {})}

    monkeypatch.setattr(module, "run", fake_run)
    component.python_func(**kwargs)
    (cfg,) = seen
    assert isinstance(cfg, cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    for name, value in kwargs.items():
        if name in fields and name not in DERIVED.get(step, set()):
            assert getattr(cfg, name) == getattr(value, "path", value), (
                f"{step}.{name} did not reach the config"
            )
    if step == "train":
        assert cfg.nproc == 3 and cfg.checkpoint_dir == "v-checkpoint_dir/v-run_id"
    if step == "mine":  # mine_hard_negatives=True, mine_gpus=3
        assert cfg.nproc == 3 and cfg.passthrough is False
        assert (tmp_path / "mine_stats").read_text() == "{}"
    if step == "score":  # a teacher_model given, score_gpus=3
        assert cfg.nproc == 3 and cfg.passthrough is False
        assert (tmp_path / "score_stats").read_text() == "{}"


@pytest.mark.parametrize("step", list(STEP_CONFIGS))
def test_component_runs_in_the_image_named_in_images_refs(step):
    image = COMPONENTS[step].component_spec.implementation.container.image
    assert image == STEP_IMAGES[step]
    from embedtune import __version__

    assert image.endswith(f":{__version__}")


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import in a file, including string imports (`import_module("x")`,
    `__import__("x")`), so a forwarder that imports by name cannot hide from the boundary tests."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, "." * node.level + (node.module or "")))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
            "import_module",
            "__import__",
        ):
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.append((node.lineno, arg.value))
            elif isinstance(arg, ast.JoinedStr) and isinstance(arg.values[0], ast.Constant):
                found.append((node.lineno, arg.values[0].value))  # f"embedtune.steps.{name}"
    return found


LIBRARY = sorted((REPO / "src" / "embedtune").rglob("*.py"))


def test_library_never_imports_kfp_or_pipelines_not_even_by_name(tmp_path):
    offenders = [
        f"{path}:{line}: {name}"
        for path in LIBRARY
        for line, name in imports_of(path)
        if name.split(".")[0] in ("kfp", "pipelines", "components", "images")
    ]
    assert not offenders
    sneaky = tmp_path / "sneaky.py"  # the check itself sees a string import
    sneaky.write_text('import importlib\nclient = importlib.import_module("pipelines.client")\n')
    assert (2, "pipelines.client") in imports_of(sneaky)


def test_steps_never_import_each_other_and_only_the_cli_imports_steps():
    offenders = []
    for path in LIBRARY:
        for line, name in imports_of(path):
            relative_step = path.parent.name == "steps" and name.startswith(".")
            if (name.startswith("embedtune.steps") or relative_step) and path.name != "cli.py":
                offenders.append(f"{path.relative_to(REPO)}:{line}: {name}")
    assert not offenders


def test_library_files_stay_small_and_steps_read_top_to_bottom():
    sizes = {path.relative_to(REPO): len(path.read_text().splitlines()) for path in LIBRARY}
    assert not {p: n for p, n in sizes.items() if n > 650}
    assert sizes[Path("src/embedtune/steps/train.py")] < 400


# ------------------------------------------------------------------------------------------- pipeline
def test_pipeline_parameter_defaults_come_from_the_step_configs():
    """Each parameter is a config field (one name end to end) whose default is the dataclass default; a field
    several steps share (loss_type, seed, max_length, ...) feeds all of them and takes train's default."""
    for name, default in pipeline_parameters().items():
        owners = [cls for cls in STEP_CONFIGS.values() if name in {f.name for f in dataclasses.fields(cls)}]
        if not owners:
            assert name in PIPELINE_ONLY, f"{name}: not a field of any step config"
            continue
        cls = next((c for c in owners if c.__name__ == "TrainConfig"), owners[0])
        field = {f.name: f for f in dataclasses.fields(cls)}[name]
        if field.default is dataclasses.MISSING:
            assert default is None, f"{name}: required in {cls.__name__}, so required in the pipeline"
        elif field.default is None:  # env-var knob: the pipeline passes the built-in value explicitly
            assert default == ENV_DEFAULTS[name][2], name
        else:
            assert default == field.default, f"{name}: pipeline default differs from {cls.__name__}"
    assert pipeline_parameters()["infonce_temperature"] == 0.01


def test_every_config_field_is_a_parameter_or_excluded_with_a_reason(compiled):
    """Every knob a user may want is in the Kubeflow run form: each config field is wired from the pipeline
    parameter of the same name, or NOT_IN_PIPELINE says why not (artifacts, derived, filled in by KFP)."""
    spec, _ = compiled_spec(compiled)
    wired: dict[str, dict] = {}  # step -> input name -> how it is fed

    def walk(dag):
        for name, task in dag["tasks"].items():
            sub = spec["components"][task["componentRef"]["name"]].get("dag")
            if sub:
                walk(sub)
            else:
                inputs = task["inputs"]
                wired[name.split("-")[0]] = {**inputs.get("parameters", {}), **inputs.get("artifacts", {})}

    walk(spec["root"]["dag"])
    params = set(spec["root"]["inputDefinitions"]["parameters"])
    problems = []
    for step, cls in STEP_CONFIGS.items():
        for f in dataclasses.fields(cls):
            key, feed = f"{step}.{f.name}", wired[step].get(f.name, {})
            from_param = feed.get("componentInputParameter", "").removeprefix("pipelinechannel--") == f.name
            if from_param and key in NOT_IN_PIPELINE:
                problems.append(f"{key}: a parameter, yet listed in NOT_IN_PIPELINE")
            elif not from_param and key not in NOT_IN_PIPELINE:
                problems.append(f"{key}: neither a pipeline parameter nor in NOT_IN_PIPELINE")
    assert not problems
    fields = {step: {f.name for f in dataclasses.fields(cls)} for step, cls in STEP_CONFIGS.items()}
    assert all(k.split(".")[1] in fields[k.split(".")[0]] for k in NOT_IN_PIPELINE)
    for knob in ("margin", "listwise_temperature", "listwise_min_group_size", "positive_token", "negative_token",
                 "weight_decay", "lr_scheduler_type", "eval_steps", "save_steps", "logging_steps"):  # fmt: skip
        assert knob in params, knob


def test_every_pipeline_parameter_has_the_description_the_ui_shows(compiled):
    spec, _ = compiled_spec(compiled)
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert not [k for k, v in parameters.items() if not (v.get("description") or "").strip()]
    assert parameters["lora_rank"]["description"] == field_help(STEP_CONFIGS["train"])["lora_rank"]
    assert parameters["gpus"]["description"] == PIPELINE_ONLY["gpus"]
    assert "read by split, mine, train" in parameters["seed"]["description"]
    assert "env" not in parameters["infonce_temperature"]["description"]  # the pipeline passes it explicitly
    # the DAG's order, as the UI describes it: evaluate before merge
    description = spec["pipelineInfo"]["description"]
    assert description.index("evaluate") < description.index("merge") < description.index("register")


def test_every_pipeline_compiles_to_a_valid_file(tmp_path):
    for name, pipeline in PIPELINES.items():
        path = compile_pipeline(pipeline, tmp_path / f"{name}.yaml")
        assert validate(path) == []


def test_compiled_yaml_is_deterministic(tmp_path):
    a = compile_pipeline(embedtune_pipeline, tmp_path / "a" / "embedtune.yaml").read_bytes()
    b = compile_pipeline(embedtune_pipeline, tmp_path / "b" / "embedtune.yaml").read_bytes()
    assert a == b


def test_checked_in_compiled_pipeline_is_fresh(compiled):
    """What CI checks (`git diff` after `make compile-pipeline`): run `make compile-pipeline` when this fails."""
    for name in PIPELINES:
        assert (COMPILED_DIR / f"{name}.yaml").read_text() == compiled.read_text()


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_compiles_with_its_values_as_defaults(preset, tmp_path):
    values = load_preset(preset)
    path = compile_pipeline(embedtune_pipeline, tmp_path / f"{preset}.yaml", pipeline_parameters=values)
    assert validate(path) == []
    spec, _ = compiled_spec(path)
    defaults = {k: v.get("defaultValue") for k, v in spec["root"]["inputDefinitions"]["parameters"].items()}
    for key, value in values.items():
        assert defaults[key] == value, key
    assert {"source", "model", "name"} <= set(values), (
        "a preset must name its data, model and registered name"
    )


def test_preset_with_an_unknown_key_is_rejected(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text("source: x\nmodel: y\nname: z\nlora_rnak: 8\n")
    with pytest.raises(ValueError, match="lora_rnak: not a parameter"):
        load_preset(str(bad))


def test_preset_values_of_the_wrong_type_are_rejected(tmp_path):
    bad = tmp_path / "types.yaml"
    bad.write_text("source: x\nmodel: y\nname: z\nlora_rank: sixteen\n")
    with pytest.raises(ValueError, match="lora_rank: expected int"):
        load_preset(str(bad))


def test_register_needs_min_primary_metric_and_merge_runs_only_for_lora(compiled):
    spec, _ = compiled_spec(compiled)
    comps = spec["components"]
    conditions, inputs = {}, {}

    def walk(dag, inherited):
        for name, task in dag["tasks"].items():
            cond = task.get("triggerPolicy", {}).get("condition", "")
            here = [*inherited, cond] if cond else inherited
            sub = comps[task["componentRef"]["name"]].get("dag")
            if sub:
                walk(sub, here)
            else:
                conditions[name], inputs[name] = here, task["inputs"]

    walk(spec["root"]["dag"], [])
    good = "inputs.parameter_values['pipelinechannel--evaluate-Output'] >= inputs.parameter_values['pipelinechannel--min_primary_metric']"
    good_2 = good.replace("evaluate-Output", "evaluate-2-Output")
    lora = "inputs.parameter_values['pipelinechannel--train_type'] == 'lora'"
    none = "inputs.parameter_values['pipelinechannel--merge_method'] == 'none'"
    merged = f"!({none})"
    assert set(conditions) == {
        "convert", "split", "mine", "score", "score-2", "train", "evaluate", "merge", "register", "register-2",
        "deploy", "deploy-2", "merge-2", "evaluate-2", "register-3", "deploy-3",
    }  # fmt: skip
    for name in ("convert", "split", "mine", "score", "score-2", "train"):
        assert conditions[name] == [], name
    # merge_method none: evaluate train's output; else merge-2 merges the weights first and evaluate-2 measures it
    assert conditions["evaluate"] == [none] and conditions["evaluate-2"] == conditions["merge-2"] == [merged]
    assert inputs["evaluate-2"]["artifacts"]["model"]["taskOutputArtifact"]["producerTask"] == "merge-2"
    assert inputs["register-3"]["artifacts"]["model"] == {
        "componentInputArtifact": "pipelinechannel--merge-2-output"
    }
    assert conditions["register-3"] == [merged, good_2]
    # mine always runs on split's train rows (a pass-through unless mine_hard_negatives), score on mine's
    # (a pass-through unless teacher_model), train takes score's output
    assert inputs["mine"]["artifacts"]["dataset"] == {
        "taskOutputArtifact": {"outputArtifactKey": "train_data", "producerTask": "split"}
    }
    assert inputs["score"]["artifacts"]["dataset"] == {
        "taskOutputArtifact": {"outputArtifactKey": "output", "producerTask": "mine"}
    }
    assert inputs["train"]["artifacts"]["train_data"] == {
        "taskOutputArtifact": {"outputArtifactKey": "output", "producerTask": "score"}
    }
    assert inputs["score-2"]["artifacts"]["dataset"]["taskOutputArtifact"]["producerTask"] == "split"
    assert inputs["train"]["artifacts"]["eval_data"]["taskOutputArtifact"]["producerTask"] == "score-2"
    assert conditions["merge"] == conditions["register"] == [none, good, lora]
    assert conditions["register-2"] == [none, good, f"!({lora})"]
    asked = "inputs.parameter_values['pipelinechannel--deploy_model'] == true"
    assert conditions["deploy"] == [none, good, lora, asked]
    assert conditions["deploy-2"] == [none, good, f"!({lora})", asked]
    assert conditions["deploy-3"] == [merged, good_2, asked]
    # The LoRA branch registers merge's output, the full branch train's; evaluate measures train's output.
    assert inputs["register"]["artifacts"]["model"] == {
        "taskOutputArtifact": {"outputArtifactKey": "output", "producerTask": "merge"}
    }
    assert inputs["register-2"]["artifacts"]["model"] == {
        "componentInputArtifact": "pipelinechannel--train-output_dir"
    }
    assert inputs["evaluate"]["artifacts"]["model"] == {
        "componentInputArtifact": "pipelinechannel--train-output_dir"
    }


def test_cluster_settings_reach_the_compiled_tasks(compiled):
    spec, k8s = compiled_spec(compiled)
    executors = spec["deploymentSpec"]["executors"]
    train_res = executors["exec-train"]["container"]["resources"]
    assert "pipelinechannel--gpus" in train_res["accelerator"]["resourceCount"]
    assert "pipelinechannel--accelerator_type" in train_res["accelerator"]["resourceType"]
    assert (
        "pipelinechannel--eval_gpus"
        in executors["exec-evaluate"]["container"]["resources"]["accelerator"]["resourceCount"]
    )
    assert (
        "pipelinechannel--mine_gpus"
        in executors["exec-mine"]["container"]["resources"]["accelerator"]["resourceCount"]
    )
    assert "accelerator" not in executors["exec-convert"]["container"]["resources"]
    for step in ("train", "evaluate", "merge", "mine"):
        (shm,) = k8s[f"exec-{step}"]["emptyDirMounts"]
        assert shm["mountPath"] == "/dev/shm" and shm["medium"] == "Memory"
    (secret,) = k8s["exec-register"]["secretAsEnv"]
    assert secret["secretName"] == "mlflow-credentials" and secret["optional"] is True
    assert {m["envVar"] for m in secret["keyToEnv"]} >= {
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
    }
    assert all(int(k8s[e]["activeDeadlineSeconds"]) > 0 for e in k8s)

    tasks = {}

    def collect(dag):
        for name, task in dag["tasks"].items():
            tasks[name] = task
            sub = spec["components"][task["componentRef"]["name"]].get("dag")
            if sub:
                collect(sub)

    collect(spec["root"]["dag"])
    for name in ("convert", "train", "register", "register-2"):
        assert tasks[name]["cachingOptions"].get("enableCache", False) is False, name
    assert tasks["split"]["cachingOptions"]["enableCache"] is True
    for name in ("convert", "register", "register-2"):
        assert tasks[name]["retryPolicy"]["maxRetryCount"] == 3
    assert "retryPolicy" not in tasks["train"]


def test_checkpoint_pvc_hook_mounts_a_volume_on_train_retries_it_and_scopes_checkpoints_by_run(
    compiled, tmp_path, monkeypatch
):
    from kfp import dsl

    from pipelines import cluster

    def train_task(spec):
        return spec["root"]["dag"]["tasks"]["train"]

    spec, k8s = compiled_spec(compiled)  # the default: checkpoints stay in the pod, no retries
    params = train_task(spec)["inputs"]["parameters"]
    assert params["checkpoint_dir"]["runtimeValue"]["constant"] == ""
    assert "pvcMount" not in k8s["exec-train"] and "retryPolicy" not in train_task(spec)

    monkeypatch.setattr(cluster, "CHECKPOINT_PVC", "embedtune-checkpoints")
    rebuilt = dsl.pipeline(name="embedtune")(
        embedtune_pipeline.pipeline_func
    )  # the DAG is built when decorated
    path = compile_pipeline(rebuilt, tmp_path / "with-pvc.yaml")
    assert validate(path) == []
    spec, k8s = compiled_spec(path)
    params = train_task(spec)["inputs"]["parameters"]
    assert params["checkpoint_dir"]["runtimeValue"]["constant"] == cluster.CHECKPOINT_PATH
    # KFP resolves the run id only as a whole value; the component joins checkpoint_dir/run_id itself
    assert params["run_id"]["runtimeValue"]["constant"] == dsl.PIPELINE_JOB_ID_PLACEHOLDER
    (mount,) = k8s["exec-train"]["pvcMount"]
    assert mount["mountPath"] == cluster.CHECKPOINT_PATH
    assert mount["pvcNameParameter"]["runtimeValue"]["constant"] == "embedtune-checkpoints"
    assert train_task(spec)["retryPolicy"]["maxRetryCount"] == cluster.CHECKPOINT_RETRIES
    assert all("pvcMount" not in k8s[e] for e in k8s if e != "exec-train")


def test_multi_node_training_is_the_nodes_parameter_of_the_one_train_task_with_its_shared_volume(
    compiled, tmp_path, monkeypatch
):
    """nodes > 1 is no second branch of the DAG: the train task takes `nodes` (default 1: the run is what it
    was) and, with cluster.SHARED_PVC, mounts the ReadWriteMany claim its TrainJob's nodes meet on."""
    from kfp import dsl

    from pipelines import cluster

    def train_task(spec):
        return spec["root"]["dag"]["tasks"]["train"]

    spec, k8s = compiled_spec(compiled)
    assert spec["root"]["inputDefinitions"]["parameters"]["nodes"]["defaultValue"] == 1
    params = train_task(spec)["inputs"]["parameters"]
    assert params["nodes"]["componentInputParameter"] == "nodes"
    assert params["shared_dir"]["runtimeValue"]["constant"] == ""  # unset hook: nodes > 1 is refused at once
    assert params["run_id"]["runtimeValue"]["constant"] == dsl.PIPELINE_JOB_ID_PLACEHOLDER  # the job's name
    assert [t for t in spec["root"]["dag"]["tasks"] if t.startswith("train")] == ["train"]

    monkeypatch.setattr(cluster, "SHARED_PVC", "embedtune-rwx")
    rebuilt = dsl.pipeline(name="embedtune")(embedtune_pipeline.pipeline_func)
    path = compile_pipeline(rebuilt, tmp_path / "multi-node.yaml")
    assert validate(path) == []
    spec, k8s = compiled_spec(path)
    assert (
        train_task(spec)["inputs"]["parameters"]["shared_dir"]["runtimeValue"]["constant"]
        == cluster.SHARED_PATH
    )
    (mount,) = k8s["exec-train"]["pvcMount"]
    assert mount["mountPath"] == cluster.SHARED_PATH
    assert mount["pvcNameParameter"]["runtimeValue"]["constant"] == "embedtune-rwx"
    # what each node pod copies from the train task's pod: GPUs, /dev/shm, tolerations, the timeout
    assert spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]["accelerator"]
    assert k8s["exec-train"]["emptyDirMounts"][0]["mountPath"] == "/dev/shm"
    assert k8s["exec-train"]["tolerations"] and k8s["exec-train"]["activeDeadlineSeconds"]


def test_rbac_manifest_grants_the_launcher_exactly_the_calls_it_makes():
    docs = list(yaml.safe_load_all((REPO / "pipelines" / "rbac" / "trainjob-launcher.yaml").read_text()))
    (role,) = [d for d in docs if d["kind"] == "Role"]
    rules = {
        (g, r): set(rule["verbs"])
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
    }
    assert rules == {
        ("trainer.kubeflow.org", "trainjobs"): {"create", "get", "delete"},
        ("", "pods"): {"get", "list"},
        ("", "pods/log"): {"get"},
        ("", "persistentvolumeclaims"): {"get"},
        ("", "events"): {"list"},
    }
    (binding,) = [d for d in docs if d["kind"] == "RoleBinding"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]


def test_validation_catches_a_literal_credential(compiled, tmp_path):
    leaked = tmp_path / "leaked.yaml"
    text = compiled.read_text().replace(
        "mlflow-credentials", "mlflow-credentials # https://bob:hunter22@mlflow"
    )
    leaked.write_text(text)
    assert any("credential" in p for p in validate(leaked))
    assert any(
        "MLFLOW_TRACKING_PASSWORD" in p for p in validate(compiled, {"MLFLOW_TRACKING_PASSWORD": "embedtune"})
    )


def test_validation_catches_an_image_not_from_images_refs(compiled, tmp_path):
    other = tmp_path / "other.yaml"
    other.write_text(compiled.read_text().replace(STEP_IMAGES["train"], "ghcr.io/someone/else:latest"))
    assert any("not one of images.refs" in p for p in validate(other))


def test_bundled_tiny_data_is_what_its_generator_writes():
    """pipelines/data/tiny.jsonl is reproducible from make_tiny.py (edit the script, not the data)."""
    import json

    from pipelines.data.make_tiny import make_rows

    rows = make_rows()
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    assert (REPO / "pipelines" / "data" / "tiny.jsonl").read_text() == text
    assert 200 <= len(rows) <= 400
    # Each hard negative is about the other sense of the query's word, never the positive itself.
    assert all(r["response"] not in r["rejected_response"] for r in rows)


def test_make_images_fails_clearly_without_a_container_engine(tmp_path):
    import subprocess

    proc = subprocess.run(
        ["bash", str(REPO / "images" / "build.sh")],
        env={"PATH": "/usr/bin:/bin", "CONTAINER_ENGINE": "no-such-engine"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "neither docker nor podman" in proc.stderr


# ----------------------------------------------------------------------------------- submit / schedule
class FakeKfpClient:
    """Records what would be sent to a KFP server."""

    def __init__(self, **kwargs):
        self.init = kwargs
        self.calls = []

    def create_run_from_pipeline_package(self, **kwargs):
        self.calls.append(("run", kwargs))
        return type("Run", (), {"run_id": "run-1"})()

    def create_experiment(self, **kwargs):
        self.calls.append(("experiment", kwargs))
        return type("Experiment", (), {"experiment_id": "exp-7"})()

    def create_recurring_run(self, **kwargs):
        self.calls.append(("recurring", kwargs))
        return type("Job", (), {"recurring_run_id": "job-3"})()


def test_submit_sends_the_compiled_package_with_the_preset_as_arguments():
    fake = FakeKfpClient()
    kfp_client.submit(fake, "qwen3-embedding-0.6b-lora", {"lora_rank": 32}, "embedtune")
    ((kind, sent),) = fake.calls
    assert kind == "run" and Path(sent["pipeline_file"]) == COMPILED_DIR / "embedtune.yaml"
    expected = {**load_preset("qwen3-embedding-0.6b-lora"), "lora_rank": 32}
    assert sent["arguments"] == expected and sent["experiment_name"] == "embedtune"
    assert isinstance(sent["arguments"]["num_train_epochs"], float)  # YAML `5` widened for a float parameter


def test_schedule_creates_a_recurring_run_on_a_six_field_cron_in_the_experiment():
    fake = FakeKfpClient()
    kfp_client.schedule(fake, "tiny", {}, "retraining", "0 0 3 * * 0")
    (_, exp), (_, job) = fake.calls
    assert exp == {"name": "retraining"}
    assert job["experiment_id"] == "exp-7" and job["cron_expression"] == "0 0 3 * * 0"
    assert job["params"] == load_preset("tiny") and job["max_concurrency"] == 1 and job["no_catchup"] is True
    assert Path(job["pipeline_package_path"]).is_file()


def test_requests_fit_the_real_kfp_client_signatures():
    import kfp

    fake = FakeKfpClient()
    kfp_client.submit(fake, "tiny", {}, "e")
    kfp_client.schedule(fake, "tiny", {}, "e", "0 0 3 * * 0")
    methods = {
        "run": "create_run_from_pipeline_package",
        "experiment": "create_experiment",
        "recurring": "create_recurring_run",
    }
    for kind, kwargs in fake.calls:
        inspect.signature(getattr(kfp.Client, methods[kind])).bind(None, **kwargs)


def test_schedule_rejects_a_five_field_cron_before_contacting_a_server(capsys):
    assert kfp_client.main(["schedule", "--preset", "tiny", "--host", "http://x", "--cron", "0 3 * * 0"]) == 2
    assert "6 fields" in capsys.readouterr().err


def test_submit_rejects_an_unknown_param(capsys):
    assert (
        kfp_client.main(["submit", "--preset", "tiny", "--host", "http://x", "--param", "lora_rnak=8"]) == 2
    )
    assert "lora_rnak" in capsys.readouterr().err


def test_client_main_builds_a_kfp_client_for_the_host_and_submits(monkeypatch, capsys):
    import kfp

    made = []
    monkeypatch.setattr(kfp, "Client", lambda **kw: made.append(FakeKfpClient(**kw)) or made[-1])
    argv = ["submit", "--preset", "tiny", "--host", "http://kfp:8888", "--param", "num_train_epochs=2"]
    assert kfp_client.main(argv) == 0
    (fake,) = made
    assert fake.init["host"] == "http://kfp:8888"
    ((_, sent),) = fake.calls
    assert sent["arguments"]["num_train_epochs"] == 2.0
    assert "run-1" in capsys.readouterr().out


def test_embedtune_cli_has_no_pipeline_commands(capsys):
    """Submitting lives with the pipeline (`python -m pipelines.client`, `make submit`), not in the library."""
    from embedtune.cli import main

    with pytest.raises(SystemExit):
        main(["submit", "--preset", "tiny"])
    assert "invalid choice: 'submit'" in capsys.readouterr().err


@pytest.mark.kfp_server
def test_submit_to_a_real_kfp_server():
    import os

    host = os.environ.get("KFP_HOST")
    if not host:
        pytest.skip("KFP_HOST is not set")
    import kfp

    result = kfp_client.submit(kfp.Client(host=host), "tiny", {}, "embedtune-tests")
    assert result.run_id


# ------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tiny_preset_runs_end_to_end_and_registers_a_champion(tmp_path, minilm_path, monkeypatch):
    import json

    from mlflow import MlflowClient

    from pipelines.demo import run_local, tiny_arguments

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # restored after the test; run_local points it at tmp_path
    arguments = tiny_arguments(model=str(minilm_path), name="tiny-e2e")
    out = run_local(arguments, tmp_path)

    result = json.loads(out["metrics_json"].read_text())
    assert result["primary_metric"] == "ndcg_at_10"
    assert result["primary_value"] >= arguments["min_primary_metric"]
    assert "delta_ndcg_at_10" in result["deltas"]
    assert out["report"].read_text().lstrip().startswith("#")
    assert out["registered"]

    assert out["tracking_uri"].startswith("sqlite:///") and str(tmp_path) in out["tracking_uri"]
    client = MlflowClient(out["tracking_uri"])
    champion = client.get_model_version_by_alias("tiny-e2e", "champion")
    assert int(champion.version) == 1
    # Lineage: the version carries the fingerprint convert computed and the image the steps name.
    (stats,) = out["run_dir"].glob("convert/dataset_stats")
    tags = client.get_model_version("tiny-e2e", "1").tags
    assert tags["embedtune.dataset_fingerprint"] == json.loads(stats.read_text())["fingerprint"]
    assert STEP_IMAGES["train"] in tags["embedtune.image"]
    # mine_hard_negatives is false by default: mine ran and passed split's train rows through unchanged.
    mine_dir = out["run_dir"] / "mine"
    assert json.loads((mine_dir / "mine_stats").read_text())["passthrough"] is True
    assert (mine_dir / "output").read_bytes() == (out["run_dir"] / "split" / "train_data").read_bytes()


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_tiny_preset_with_lora_and_mined_negatives_merges_before_registering(
    tmp_path, minilm_path, monkeypatch
):
    """The other branches of the DAG in one run: mine_hard_negatives=true (mine adds negatives to split's train
    rows and train reads them) and train_type=lora (merge runs, register takes the merged folder). One
    process without DeepSpeed: the first DAG test runs ZeRO-3, test_train runs LoRA under ZeRO-3."""
    import json

    from mlflow import MlflowClient

    from embedtune.io import read_jsonl
    from pipelines.demo import run_local, tiny_arguments

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    arguments = tiny_arguments(
        model=str(minilm_path), name="tiny-lora", train_type="lora", learning_rate=2e-4,
        mine_hard_negatives=True, num_negatives=2, range_max=20, deepspeed="none", cpu_procs=1,
    )  # fmt: skip
    out = run_local(arguments, tmp_path)
    run_dir = out["run_dir"]

    stats = json.loads((run_dir / "mine" / "mine_stats").read_text())
    assert stats["passthrough"] is False and stats["negatives_mined"] > 0 and stats["num_negatives"] == 2
    original, mined = read_jsonl(run_dir / "split" / "train_data"), read_jsonl(run_dir / "mine" / "output")
    assert [(r["query"], r["response"]) for r in mined] == [(r["query"], r["response"]) for r in original]
    assert any(
        r.get("rejected_response") != o.get("rejected_response") for r, o in zip(mined, original, strict=True)
    )
    assert all(r["response"] not in r.get("rejected_response", []) for r in mined)
    assert json.loads((run_dir / "train" / "output_dir" / "train_result.json").read_text())[
        "train_rows"
    ] == len(mined)

    assert (run_dir / "train" / "output_dir" / "adapter_config.json").is_file()
    merged = run_dir / "merge" / "output"
    assert (merged / "config.json").is_file() and not (merged / "adapter_config.json").exists()
    assert (run_dir / "register").is_dir() and not (run_dir / "register-2").exists()
    assert out["registered"] and out["model_uri"] == "models:/tiny-lora@champion"
    assert (
        int(MlflowClient(out["tracking_uri"]).get_model_version_by_alias("tiny-lora", "champion").version)
        == 1
    )


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_tiny_preset_distilled_from_a_teacher_and_merged_with_its_base_before_evaluate(
    tmp_path, minilm_path, monkeypatch
):
    """The recipe branches in one run: mine, then score with a teacher (MiniLM's cosine) on the train and
    eval rows, train with distill_kl, then merge_method linear: the weights are merged with the base before
    evaluate, so evaluate, the gate and register see the merged model."""
    import json

    from embedtune.io import read_jsonl
    from embedtune.modeling import read_meta
    from pipelines.demo import run_local, tiny_arguments

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    arguments = tiny_arguments(
        model=str(minilm_path), name="tiny-kd", loss_type="distill_kl", distill_infonce_weight=1.0,
        mine_hard_negatives=True, num_negatives=2, range_max=20, teacher_model=str(minilm_path),
        merge_method="linear", merge_weight=0.5, deepspeed="none", cpu_procs=1,
    )  # fmt: skip
    out = run_local(arguments, tmp_path)
    run_dir = out["run_dir"]
    for task, source in (
        ("score", run_dir / "mine" / "output"),
        ("score-2", run_dir / "split" / "eval_data"),
    ):
        stats = json.loads((run_dir / task / "score_stats").read_text())
        assert stats["passthrough"] is False and stats["teacher_task_type"] == "embedding"
        rows = read_jsonl(run_dir / task / "output")
        assert [r["query"] for r in rows] == [r["query"] for r in read_jsonl(source)]
        assert all(len(r["teacher_scores"]) == 1 + len(r.get("rejected_response", [])) for r in rows)
    merged = run_dir / "merge-2" / "output"  # the weights-merged branch's merge task
    assert read_meta(merged)["weight_merge"]["method"] == "linear"
    assert not (run_dir / "evaluate").exists() and (run_dir / "evaluate-2").is_dir()
    assert out["registered"]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_tiny_preset_as_a_cross_encoder_reranker_trains_evaluates_and_registers(
    tmp_path, minilm_path, monkeypatch
):
    """The DAG with a classifier-head reranker: MiniLM gets a new one-logit head, pointwise on the tiny rows'
    negatives, evaluated on ranking rows, registered as the reranker pyfunc. One process, no DeepSpeed."""
    import json

    import mlflow
    import pandas as pd

    from embedtune.modeling import read_meta
    from pipelines.demo import run_local, tiny_arguments

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    arguments = tiny_arguments(
        model=str(minilm_path), name="tiny-cross", task_type="reranker", loss_type="pointwise_reranker",
        deepspeed="none", cpu_procs=1, min_primary_metric=0.0, learning_rate=5e-5,
    )  # fmt: skip
    out = run_local(arguments, tmp_path)
    model_dir = out["run_dir"] / "train" / "output_dir"
    assert read_meta(model_dir)["reranker_head"] == "classifier" and (model_dir / "config.json").is_file()
    metrics = json.loads(out["metrics_json"].read_text())
    assert metrics["data_shape"] == "ranking" and "map" in metrics["metrics"]
    assert out["registered"] and out["model_uri"] == "models:/tiny-cross@champion"
    mlflow.set_tracking_uri(out["tracking_uri"])
    pyfunc = mlflow.pyfunc.load_model("models:/tiny-cross@champion")
    frame = pd.DataFrame({"query": ["what about the habitat of the python?"] * 2,
                          "document": ["These snakes live in the forests of Africa.", "Python is installed with pip."]})  # fmt: skip
    assert ((pyfunc.predict(frame) > 0) & (pyfunc.predict(frame) < 1)).all()
