"""How a registered model is stored in MLflow, and the code that serves it.

- **embedder**: the `sentence_transformers` flavor (`log_embedder`): a list of strings -> (N, dim) float32
  unit vectors; `params={"prompt_name": "query"}` prepends the query instruction saved with the model.
- **image embedder** (Qwen2-VL / Qwen3-VL): a pyfunc (`log_vision_model`): a DataFrame with `text` and
  `images` (one entry per `<image>` tag: a data URI, an http(s) / s3 / gs URI or a path) -> (N, dim) float32.
- **image reranker** (Qwen2-VL / Qwen3-VL): a pyfunc too: `query`, `document`, `query_images`,
  `document_images` -> (N,) scores in [0, 1].
- **reranker**: a pyfunc (`log_reranker`) over the model folder plus this package's code (`code_paths`), so
  `embedtune` need not be installed where it is loaded. `RerankerModel` is the class serving unpickles: it
  scores (query, document) pairs in [0, 1].

    model = mlflow.pyfunc.load_model("models:/my-reranker@champion")
    scores = model.predict(pd.DataFrame({"query": ["q", "q"], "document": ["d1", "d2"]}))  # (N,) in [0, 1]

Both get an explicit signature and explicit, pinned pip requirements (the flavor's inferred ones are wrong
or bloated). `redact` masks credential values in every file copied into the model.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.models import infer_signature

import embedtune
from embedtune.errors import EmbedtuneError
from embedtune.modeling import META_FILE, load_model

SAMPLE_TEXTS = ["What is the capital of France?", "Paris is the capital and largest city of France."]
SAMPLE_PAIRS = pd.DataFrame(
    {
        "query": ["What is the capital of France?"] * 2,
        "document": ["Paris is the capital of France.", "The cat sat on the mat."],
    }
)
# Checkpoints and logs that may sit beside a final model folder: never shipped inside the model.
NOT_MODEL = re.compile(r"^(checkpoint-\d+|runs|logs|\..*)$")


def pin(module) -> str:
    """`torch==2.13.0` (local labels like `+cpu` dropped: the consumer picks its own build)."""
    return f"{module.__name__.replace('_', '-')}=={module.__version__.split('+')[0]}"


def log_embedder(model_dir: Path, meta: dict, extra_metadata: dict, redact: Callable[[str], str]):
    """sentence_transformers flavor: list of strings -> (N, dim) float32 unit vectors, `prompt_name` param."""
    import sentence_transformers
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules.normalize import Normalize

    trust = bool((meta.get("train_config") or {}).get("trust_remote_code", False))
    try:
        model = SentenceTransformer(str(model_dir), device="cpu", trust_remote_code=trust)
    except (OSError, ValueError) as e:
        raise EmbedtuneError(f"{model_dir}: not a sentence-transformers model folder: {e}") from None
    if not isinstance(model[len(model) - 1], Normalize):
        model.append(
            Normalize()
        )  # consumers get unit vectors; cosine scores (what evaluate measured) unchanged
    instruction = meta.get("query_instruction") or ""
    if instruction and not model.prompts.get("query"):
        model.prompts["query"] = instruction
    model.prompts.setdefault("query", "")
    model.prompts.setdefault("document", "")
    # prompt_name is always passed (default "document"), so a model's default_prompt_name never leaks onto
    # documents; consumers ask for "query" to get the query instruction.
    vectors = model.encode(SAMPLE_TEXTS, prompt_name="document", convert_to_numpy=True)
    signature = infer_signature(SAMPLE_TEXTS, vectors, params={"prompt_name": "document"})
    return mlflow.sentence_transformers.log_model(
        model,
        name="model",
        signature=signature,
        pip_requirements=[pin(sentence_transformers), pin(transformers), pin(torch)],
        metadata={**extra_metadata, "query_prompt": redact(model.prompts.get("query", ""))},
    )


class RerankerModel(mlflow.pyfunc.PythonModel):
    """pyfunc over a reranker folder: (query, document) pairs -> relevance scores in [0, 1]."""

    def load_context(self, context):
        from embedtune.modeling import load_model

        self.reranker = load_model(context.artifacts["model"], "reranker")

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        queries, docs = pairs_of(model_input)
        batch_size = int((params or {}).get("batch_size", 16))
        # score_pairs batches by length, so mixed queries in one call cost no more than grouped ones
        return np.asarray(self.reranker.score_pairs(queries, docs, batch_size=batch_size), dtype=np.float64)


def pairs_of(model_input) -> tuple[list[str], list[str]]:
    """DataFrame / list of dicts with `query`, `document` columns, or a list of (query, document) pairs."""
    if isinstance(model_input, list) and model_input and isinstance(model_input[0], dict):
        model_input = pd.DataFrame(model_input)
    if isinstance(model_input, pd.DataFrame):
        missing = {"query", "document"} - set(model_input.columns)
        if missing:
            raise ValueError(f"reranker input needs columns query, document; missing {sorted(missing)}")
        return model_input["query"].astype(str).tolist(), model_input["document"].astype(str).tolist()
    pairs = [tuple(p) for p in model_input]
    if any(len(p) != 2 for p in pairs):
        raise ValueError("reranker input: expected (query, document) pairs")
    return [str(q) for q, _ in pairs], [str(d) for _, d in pairs]


def log_reranker(model_dir: Path, meta: dict, extra_metadata: dict, redact: Callable[[str], str]):
    """pyfunc with the model folder (checkpoints left out) and embedtune's code as artifacts."""
    trust = bool((meta.get("train_config") or {}).get("trust_remote_code", False))
    example_scores = np.asarray(
        load_model(model_dir, "reranker", device="cpu", trust_remote_code=trust).score_pairs(
            SAMPLE_PAIRS["query"].tolist(), SAMPLE_PAIRS["document"].tolist()
        ),
        dtype=np.float64,
    )
    signature = infer_signature(SAMPLE_PAIRS, example_scores, params={"batch_size": 16})
    return log_pyfunc(model_dir, RerankerModel(), signature, extra_metadata, redact)


def log_pyfunc(model_dir: Path, python_model, signature, extra_metadata: dict, redact: Callable[[str], str]):
    """A pyfunc over a copy of the model folder (checkpoints left out, embedtune.json redacted) with
    embedtune's own code (`code_paths`) and pinned requirements."""
    import orjson
    import PIL
    import safetensors
    import torch
    import transformers

    with tempfile.TemporaryDirectory(prefix="embedtune-model-") as tmp:
        staged = Path(tmp) / "model"
        staged.mkdir()
        for entry in model_dir.iterdir():
            if NOT_MODEL.match(entry.name):
                continue
            if entry.name == META_FILE:
                redacted_copy(entry, staged, redact)
            else:
                (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, staged / entry.name)

        with warnings.catch_warnings():  # "no input_example": the signature is explicit, no second load
            warnings.filterwarnings("ignore", message=".*input example was not provided.*")
            return mlflow.pyfunc.log_model(
                name="model",
                python_model=python_model,
                artifacts={"model": str(staged)},
                code_paths=[str(Path(embedtune.__file__).parent)],
                signature=signature,
                pip_requirements=[pin(m) for m in (torch, transformers, safetensors, orjson, np, pd, PIL)],
                metadata=extra_metadata,
            )


class VisionEmbedderModel(mlflow.pyfunc.PythonModel):
    """pyfunc over a Qwen2-VL / Qwen3-VL embedder folder: a DataFrame with `text` (with `<image>` tags) and
    `images` (per row a list of image entries, one per tag: a data URI, an http(s) / s3 / gs URI, or a path the
    server can read) -> (N, dim) float32 unit vectors; `params={"prompt_name": "query"}` encodes queries (the
    query instruction is the system prompt)."""

    def load_context(self, context):
        from embedtune.modeling import load_model

        self.model = load_model(context.artifacts["model"], "embedding")

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        params = params or {}
        texts = model_input["text"].astype(str).tolist()
        return self.model.encode_items(texts, image_column(model_input, "images"),
                                       is_query=params.get("prompt_name") == "query",
                                       batch_size=int(params.get("batch_size", 8)))  # fmt: skip


def image_column(frame: pd.DataFrame, column: str) -> list[list[str]]:
    """Per row of `frame`, the image entries of `column` resolved (no column, or None: no images)."""
    from embedtune.images import resolve

    given = frame[column].tolist() if column in frame else [None] * len(frame)
    return [[resolve(str(r)) for r in (refs if refs is not None else [])] for refs in given]


class VisionRerankerModel(RerankerModel):
    """pyfunc over a Qwen2-VL / Qwen3-VL reranker folder: a DataFrame with `query`, `document` (with `<image>`
    tags) and `query_images`, `document_images` (per row a list of entries, one per tag of that side) ->
    relevance scores in [0, 1]."""

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        queries, docs = pairs_of(model_input)
        z = self.reranker.logits(queries, docs, int((params or {}).get("batch_size", 8)),
                                 query_images=image_column(model_input, "query_images"),
                                 doc_images=image_column(model_input, "document_images"))  # fmt: skip
        return 1.0 / (1.0 + np.exp(-z))


def log_vision_model(model_dir: Path, meta: dict, extra_metadata: dict, redact: Callable[[str], str]):
    """`VisionEmbedderModel` / `VisionRerankerModel` (the sentence_transformers flavor cannot load these folders
    without torchvision, and takes no images in its signature)."""
    import base64
    import io

    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (56, 56), (200, 30, 30)).save(png, format="PNG")
    red = ["data:image/png;base64," + base64.b64encode(png.getvalue()).decode()]
    if meta.get("task_type") == "reranker":
        out, loaded, params = VisionRerankerModel(), "reranker", {"batch_size": 8}
        example = pd.DataFrame({"query": ["<image> what is this?", "a red square"],
                                "document": ["a red square", "<image>"], "query_images": [red, []],
                                "document_images": [[], red]})  # fmt: skip
    else:
        out, loaded, params = VisionEmbedderModel(), "model", {"prompt_name": "", "batch_size": 8}
        example = pd.DataFrame({"text": ["<image> a red square", "plain text"], "images": [red, []]})
    setattr(out, loaded, load_model(model_dir, meta.get("task_type") or "embedding", device="cpu"))
    signature = infer_signature(example, out.predict(None, example), params=params)
    delattr(out, loaded)
    return log_pyfunc(model_dir, out, signature, extra_metadata, redact)


def logger_for(meta: dict) -> Callable:
    """How a model folder (its embedtune.json) is logged: `LOGGERS` by task type; models reading images apart."""
    return log_vision_model if meta.get("vision_family") else LOGGERS[meta["task_type"]]


LOGGERS = {"embedding": log_embedder, "reranker": log_reranker}


def redacted_copy(src: Path, out_dir: Path, redact: Callable[[str], str]) -> str:
    """A copy of a small text file (embedtune.json, metrics, report) with credential values masked."""
    out = out_dir / src.name
    out.write_text(redact(src.read_text()))
    return str(out)
