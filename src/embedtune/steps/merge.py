"""merge: fold a LoRA adapter into its base weights, and prove the merged model equals the adapter model.

    embedtune merge --adapter out/model --output out/merged [--eval-data eval.jsonl] [--tolerance 1e-4]

Users of other tools report merged LoRA models that silently behave like the base model, or differ from
the adapter they evaluated. So merge never trusts itself; it measures:

1. Load base + adapter (PEFT) in fp32, the way evaluate loaded it: `Embedder` / `Reranker` by embedtune.json.
2. On sample inputs (built-in sentences, plus the first rows of `--eval-data` when given) record the
   ADAPTER model's outputs (embeddings, or reranker z = logit(yes) - logit(no), which unlike sigmoid(z)
   does not saturate), and the BASE model's (same weights, adapter disabled).
3. `merge_and_unload()`, then save the merged model with the same `save_pretrained` as train (full
   safetensors weights, tokenizer, sentence-transformers files for embedders, embedtune.json with the
   training config) into a temporary folder beside `--output`.
4. Reload that folder from disk (what consumers will load) and compare its outputs with the adapter's.
   Fail when, in fp32,
     - max |merged - adapter| > `--tolerance` (in memory right after merging, or after the reload), or
     - the adapter changes the outputs (max |adapter - base| > 1e-6) while the merged model does not
       (max |merged - base| <= 1e-6): "the merged model behaves like the base model".
   On failure the temporary folder is deleted: nothing is written at `--output`. On success it is renamed
   into place (an existing previous result at `--output` is replaced; any other non-empty folder is left
   alone and is an error).

The merged folder keeps embedtune.json's `train_type` (`lora`, how it was trained) and adds
`merged_from_adapter: true` and `merge_check` (the three numbers); it holds full weights, no
adapter_config.json, so every loader treats it as a plain model. Weights are saved in fp32, the precision
the check ran in.

`--merge-method linear|slerp` (`--merge-weight W`, the tuned model's weight): after the LoRA fold is checked,
the weights are merged, tensor by tensor (`weightmerge`: LM-Cocktail's linear mix, or a per-tensor slerp as
Qwen3-Embedding), with the other end: `--merge-with base` (the model it was trained from, the default) or
`checkpoints` (the mean of the checkpoint weights train kept with `--keep-checkpoint-weights N`, each loaded and
folded like the final model); a full-training folder too. The merged model is then the reference of the
save-and-reload check; `weight_merge` in the result and in embedtune.json says how far it moved from the tuned
and the other end's outputs. The pipeline runs this before evaluate (`merge_method`), so the champion gate
judges the merged model.

A folder without adapter_config.json (full training) and no merge_method is copied through unchanged (into a temporary folder,
then renamed), reported as `mode: passthrough` with zero differences.

`--export-classifier` (a generative yes/no reranker, adapter or full): after merging, the model is written as a
one-logit sequence classifier (`modeling.to_classifier`: Qwen3ForSequenceClassification whose head row is the
LM head's yes row minus its no row; the pairs keep the Qwen3-Reranker prompt), the form vLLM and TEI serve;
the same check proves its z equals the generative one.
"""

from __future__ import annotations

import contextlib
import gc
import json
import shutil
from pathlib import Path

import numpy as np

from embedtune.config import MergeConfig
from embedtune.data import images_by_text, read_rows, row_texts
from embedtune.errors import EmbedtuneError
from embedtune.images import check_images
from embedtune.io import write_json
from embedtune.lora import HEAD_MODULES
from embedtune.modelfolder import adapter_base
from embedtune.modeling import (
    META_FILE,
    ClassifierReranker,
    Reranker,
    check_sources,
    is_adapter,
    load_model,
    read_meta,
    reranker_head,
    task_type_of,
    to_classifier,
)
from embedtune.outputs import OutputSet, refuse_inputs
from embedtune.progress import say
from embedtune.rundir import CHECKPOINT_WEIGHTS
from embedtune.weightmerge import merge_states

SAME = 1e-6  # below this, two fp32 outputs are "the same" (the adapter changes nothing / merged == base)
SAMPLE_ROWS = 16
SAMPLE_QUERIES = [
    "how do cats purr",
    "what is the capital of france",
    "best way to learn deep learning",
    "why is the sky blue",
    "a man is playing the guitar",
    "symptoms of the common cold",
]
SAMPLE_DOCS = [
    "Cats purr by rapidly twitching the muscles of the larynx while breathing in and out.",
    "Paris is the capital and most populous city of France.",
    "Start with linear algebra and calculus, then train small neural networks on real data.",
    "Sunlight is scattered by air molecules, and blue light is scattered more than red light.",
    "Someone is strumming a guitar on a stage.",
    "A runny nose, sore throat and sneezing are typical early signs of a cold.",
    "The stock market fell sharply on Monday after the announcement.",
    "short",
]


def sample_inputs(eval_data: str) -> tuple[list, list]:
    """(queries, docs) for the check: built-in sentences + the first rows of the eval data, if any; a text
    with images as (text, its image entries)."""
    queries, docs = list(SAMPLE_QUERIES), list(SAMPLE_DOCS)
    if eval_data:
        for row in check_images(read_rows(eval_data, lines=True)[:SAMPLE_ROWS], eval_data):
            items = [
                (t, tuple(i)) if i else t for t, i in zip(row_texts(row), images_by_text(row), strict=True)
            ]
            queries.append(items[0])
            docs += items[1:3]
    return queries, docs


def outputs(model, queries: list, docs: list) -> np.ndarray:
    """What the check compares: (Q + D, H) embeddings, or (2 Q,) reranker z scores of query-document pairs."""
    images = any(isinstance(t, tuple) for t in queries + docs)  # rows with images: a model that reads them
    q, d = ([(t, ()) if isinstance(t, str) else t for t in ts] for ts in (queries, docs))
    if isinstance(model, Reranker):  # each query with 2 documents: 2 Q prompts, not Q x D
        pairs = [(a, d[(i + j) % len(d)]) for i, a in enumerate(q) for j in range(2)]
        sides = (
            {"query_images": [a[1] for a, _ in pairs], "doc_images": [b[1] for _, b in pairs]}
            if images
            else {}
        )
        return model.logits([a[0] for a, _ in pairs], [b[0] for _, b in pairs], batch_size=16, **sides)
    if images:
        return np.concatenate([model.encode_items([t for t, _ in q], [i for _, i in q], is_query=True),
                               model.encode_items([t for t, _ in d], [i for _, i in d])]).astype(np.float64)  # fmt: skip
    return np.concatenate([model.encode(queries, is_query=True), model.encode(docs)]).astype(np.float64)


def merge_lora(model) -> None:
    """Fold the LoRA deltas into the base weights in place: W <- W + (alpha / r) * B @ A."""
    model.set_inner(model.inner.merge_and_unload())


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)))


def check(merged: float, adapter_vs_base: float, merged_vs_base: float, tolerance: float, where: str) -> None:
    """Raise with all three numbers unless merged == adapter within tolerance and != base when it should."""
    numbers = (
        f"max |merged - adapter| = {merged:.3g}, max |adapter - base| = {adapter_vs_base:.3g}, "
        f"max |merged - base| = {merged_vs_base:.3g}"
    )
    if merged > tolerance:
        hint = " (the merged model behaves like the base model)" if merged_vs_base <= SAME else ""
        raise EmbedtuneError(f"merge check failed {where}: {numbers} > tolerance {tolerance:g}{hint}")
    if adapter_vs_base > SAME and merged_vs_base <= SAME:
        raise EmbedtuneError(
            f"merge check failed {where}: the merged model behaves like the base model: {numbers}"
        )


def _check_output(out: Path) -> None:
    """`out` may be missing, an empty folder, or a previous result (a folder with embedtune.json)."""
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / META_FILE).is_file())):
        raise EmbedtuneError(f"output: {out} exists and is not a model folder; remove it or choose another")


@contextlib.contextmanager
def _write_errors(out: Path):
    """A full disk (or any write error) while staging: one line naming the output, not a traceback."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as e:
        raise EmbedtuneError(f"{out}: cannot write the merged model: {e}") from None


def base_end(model, src: Path, task_type: str):
    """(the base model's weights, where they came from, the base model itself): the other end of a merge
    with the base."""
    meta = read_meta(src)
    base_path = adapter_base(src) if is_adapter(src) else meta.get("base_model") or ""
    if not base_path:
        raise EmbedtuneError(f"merge_method: {src} does not name the base model it was trained from")
    base = load_model(base_path, task_type, like=meta)
    state = base.inner.state_dict()
    if isinstance(model, ClassifierReranker) and task_type_of(base_path) != "reranker":
        # the base had no classification head: the one it got on loading is random, never merged
        state = {k: v for k, v in state.items() if k.split(".")[0] not in HEAD_MODULES}
    return state, str(base_path), base


def checkpoints_end(src: Path, task_type: str):
    """(the mean of the checkpoint weights train kept in `src`, where they came from, a model holding them):
    each checkpoint is loaded as `src` is (an adapter on its base, LoRA then folded), in fp32."""
    from safetensors.torch import load_file

    files = sorted((src / CHECKPOINT_WEIGHTS).glob("step-*.safetensors"), key=lambda p: int(p.stem[5:]))
    if not files:
        raise EmbedtuneError(f"merge_with checkpoints: {src} holds no {CHECKPOINT_WEIGHTS}/ (train with "
                             "keep_checkpoint_weights > 0 and save_steps below the run's steps)")  # fmt: skip
    mean: dict = {}
    for path in files:
        model = load_model(src, task_type)
        model.inner.load_state_dict(load_file(path))
        if is_adapter(src):
            merge_lora(model)
        state = model.inner.state_dict()
        for k, v in state.items():
            mean[k] = mean.get(k, 0.0) + v.double() / len(files)
    state = {k: v.to(state[k].dtype) for k, v in mean.items()}  # in the last checkpoint's dtypes
    model.inner.load_state_dict(state)
    return state, ", ".join(p.stem for p in files), model


def interpolate(model, src: Path, task_type: str, cfg: MergeConfig, queries, docs, tuned_out):
    """Replace `model`'s weights (LoRA already folded) by their merge with the other end, `merge_with`
    (`weightmerge`); returns (what was done and how far the outputs moved from each end, the other end's)."""
    ends = {"base": base_end, "checkpoints": lambda m, s, t: checkpoints_end(s, t)}
    base_state, base_path, base = ends[cfg.merge_with](model, src, task_type)
    base_out = outputs(base, queries, docs)
    del base
    merged, counts = merge_states(base_state, model.inner.state_dict(), cfg.merge_method, cfg.merge_weight)
    model.inner.load_state_dict(merged)
    out = outputs(model, queries, docs)
    say("merge", f"{cfg.merge_method} merge with {base_path} at weight {cfg.merge_weight:g}: {counts}")
    return {
        "method": cfg.merge_method, "weight": cfg.merge_weight, "with": cfg.merge_with, "other": base_path, **counts,
        "vs_tuned_max_diff": _max_diff(out, tuned_out), "vs_other_max_diff": _max_diff(out, base_out),
    }, base_out  # fmt: skip


def run(cfg: MergeConfig) -> dict:
    """Merge `cfg.adapter` into its base and write the checked result to `cfg.output` (or pass it through)."""
    src, out = Path(cfg.adapter), Path(cfg.output)
    if not (src / "config.json").is_file() and not is_adapter(src):
        raise EmbedtuneError(f"{src}: not a model folder (no config.json or adapter_config.json)")
    base = adapter_base(src) if is_adapter(src) else ""
    refuse_inputs({"adapter": src, "adapter's base model": base, "eval_data": cfg.eval_data}, {"output": out})
    _check_output(out)

    task_type = task_type_of(src)
    export = cfg.export_classifier
    if export and (task_type != "reranker" or reranker_head(str(src)) != "generative"):
        raise EmbedtuneError(f"export_classifier: {src} is not a generative (yes/no) reranker")
    weights = cfg.merge_method != "none"
    if not is_adapter(src) and not export and not weights:
        trust = bool((read_meta(src).get("train_config") or {}).get("trust_remote_code", False))
        check_sources(str(src), trust)  # passed on to register: no pickle that runs code, no unasked-for code
        with _write_errors(out), OutputSet() as outs:  # the folder replaces a previous result whole, or not
            shutil.copytree(src, outs.folder(out), dirs_exist_ok=True)
            _check_output(out)
        say("merge", f"{src} holds full weights (no adapter): copied to {out} unchanged")
        return {
            "merged": False,
            "mode": "passthrough",
            "max_abs_diff": 0.0,
            "adapter_vs_base_max_diff": 0.0,
            "merged_vs_base_max_diff": 0.0,
            "output": str(out),
        }

    queries, docs = sample_inputs(cfg.eval_data)
    model = load_model(src, task_type)  # fp32, on the GPU when there is one
    if export and hasattr(model, "featurizer"):
        raise EmbedtuneError(
            f"export_classifier: {src} reads images; only text rerankers have a classifier form"
        )
    adapter_out = outputs(model, queries, docs)
    base_out, adapter_vs_base = adapter_out, 0.0  # full weights (exported only): nothing to tell apart
    if is_adapter(src):
        with model.inner.disable_adapter():
            base_out = outputs(model, queries, docs)
        adapter_vs_base = _max_diff(adapter_out, base_out)
        if adapter_vs_base <= SAME:
            say("merge", f"warning: the adapter {src} does not change the outputs (untrained?)")
        merge_lora(model)
    weight_merge = None
    if weights:  # fold checked first, then the interpolated model is the reference every later check uses
        folded = outputs(model, queries, docs)
        check(_max_diff(folded, adapter_out), adapter_vs_base, _max_diff(folded, base_out), cfg.tolerance,
              "after merging the adapter")  # fmt: skip
        weight_merge, base_out = interpolate(model, src, task_type, cfg, queries, docs, folded)
        adapter_out = outputs(model, queries, docs)
        adapter_vs_base = 0.0  # a model close to its base is what was asked for
    if export:  # the yes row minus the no row as a one-logit head: the same z
        model = to_classifier(model)
    merged_out = outputs(model, queries, docs)
    in_memory = _max_diff(merged_out, adapter_out)
    check(in_memory, adapter_vs_base, _max_diff(merged_out, base_out), cfg.tolerance, "after merging")

    meta = {k: v for k, v in read_meta(src).items() if k != "embedtune_version"}
    meta["merged_from_adapter"] = is_adapter(src)
    if weight_merge:
        meta["weight_merge"] = weight_merge
    if export:
        meta["exported_classifier"] = True
    with _write_errors(out), OutputSet() as outs:  # the folder replaces a previous result whole, or not
        tmp = outs.folder(out)
        model.save_pretrained(tmp, meta=meta)
        del model
        gc.collect()
        if is_adapter(tmp):
            raise EmbedtuneError(f"merge check failed: the saved folder is still an adapter ({tmp})")
        saved_out = outputs(load_model(tmp, task_type), queries, docs)  # what consumers will load, from disk
        saved = _max_diff(saved_out, adapter_out)
        merged_vs_base = _max_diff(saved_out, base_out)
        check(saved, adapter_vs_base, merged_vs_base, cfg.tolerance, "after saving and reloading")
        result = {
            "merged": is_adapter(src),
            "mode": "merged" if not export else "merged+classifier" if is_adapter(src) else "classifier",
            "max_abs_diff": max(in_memory, saved),
            "adapter_vs_base_max_diff": adapter_vs_base,
            "merged_vs_base_max_diff": merged_vs_base,
            "output": str(out),
            **({"weight_merge": weight_merge} if weight_merge else {}),
        }
        numbers = {k: v for k, v in result.items() if k.endswith("diff")}
        meta_file = tmp / META_FILE
        write_json(
            meta_file,
            {**json.loads(meta_file.read_text()), "merge_check": {**numbers, "tolerance": cfg.tolerance}},
        )
        _check_output(out)  # still nothing or a previous result, just before it is replaced
    say(
        "merge",
        f"{src} -> {out}: max |merged - adapter| = {result['max_abs_diff']:.3g} <= {cfg.tolerance:g} "
        f"(adapter vs base {adapter_vs_base:.3g}, merged vs base {merged_vs_base:.3g})",
    )
    return result
