"""The model folder format: what train and merge write and every other step reads.

- `embedtune.json` (`META_FILE`, `read_meta` / `write_meta`): task_type, base_model, train_type, pooling,
  query_instruction, max_length, the reranker's head, tokens and instruction, Matryoshka widths, and the
  whole effective training config (`train_config`).
- embedder: a sentence-transformers folder (`write_st_files`: Transformer -> Pooling -> Normalize, the
  `query` prompt), the HF weights (or a PEFT adapter: `is_adapter`, `adapter_base`) at the root.
- reranker: an HF model folder (causal LM for the yes/no head, sequence classification for the classifier
  head; or a PEFT adapter on one) + tokenizer.
- files of a hub model or a folder (`hub_file`), and what a folder's own configs say: its pooling
  (`detect_pooling`), its sentence-transformers prompts and max length.
- `check_sources`: before anything of a folder is read, pickles that would run code and (unless trusted) a
  model's own Python code are refused (`embedtune.safety`), for an adapter in its base model's folder too.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

from embedtune import __version__
from embedtune.errors import DataError, EmbedtuneError
from embedtune.io import read_json, write_json
from embedtune.knobs import HEADS  # noqa: F401  (one source: the knob table)
from embedtune.safety import check_model_folder

META_FILE = "embedtune.json"
TASK_TYPES = ("embedding", "reranker")
ADAPTER_FILE = "adapter_config.json"


def read_meta(path: str | os.PathLike) -> dict:
    """The `embedtune.json` of a model folder, or `{}` for a plain HF / sentence-transformers model.

    The one reader of that file (train and merge write it with `write_meta`); a `task_type` other than
    embedding / reranker is refused, naming the file.
    """
    f = Path(path) / META_FILE
    if not f.is_file():
        return {}
    meta = read_json(f)
    if not isinstance(meta, dict) or meta.get("task_type", "embedding") not in TASK_TYPES:
        got = meta.get("task_type") if isinstance(meta, dict) else meta
        raise DataError(f"{f}: task_type: {got!r} is not one of {', '.join(TASK_TYPES)}")
    return meta


def hub_file(path: str, name: str) -> str | None:
    """Path of `name` in a local folder or a hub repo (cached), or None when the repo has no such file."""
    local = Path(path)
    if local.is_dir():
        return str(local / name) if (local / name).is_file() else None
    from transformers.utils import cached_file

    return cached_file(path, name, _raise_exceptions_for_missing_entries=False)


def is_adapter(path: str | os.PathLike) -> bool:
    """True when the folder holds a PEFT adapter instead of full weights."""
    return (Path(path) / ADAPTER_FILE).is_file()


def adapter_base(path: str | os.PathLike) -> str:
    """The base model an adapter folder was trained on (embedtune.json first, then PEFT's own config)."""
    base = read_meta(path).get("base_model")
    if not base:
        try:
            base = json.loads((Path(path) / ADAPTER_FILE).read_text()).get("base_model_name_or_path")
        except (ValueError, AttributeError):
            raise EmbedtuneError(f"{Path(path) / ADAPTER_FILE}: not a JSON object") from None
    if not base:
        raise EmbedtuneError(f"{path}: adapter folder names no base model")
    return base


def detect_pooling(path: str, config) -> str:
    """Pooling of a model: its sentence-transformers config when present, else by architecture."""
    modules = hub_file(path, "modules.json")
    if modules:
        for module in json.loads(Path(modules).read_text()):
            if module["type"].endswith("Pooling"):
                cfg_file = hub_file(path, f"{module['path']}/config.json")
                if cfg_file:
                    return pooling_from_st(json.loads(Path(cfg_file).read_text()))
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") for a in archs) or getattr(config, "is_decoder", False):
        return "last"
    if getattr(config, "model_type", "") in ("modernbert",):
        return "cls"
    return "mean"


def pooling_from_st(cfg: dict) -> str:
    mode = cfg.get("pooling_mode")  # sentence-transformers >= 6
    if mode is None:  # older configs: one boolean per mode
        mode = next(
            (m for m in ("cls_token", "mean_tokens", "lasttoken") if cfg.get(f"pooling_mode_{m}")),
            "mean_tokens",
        )
    mode = {"cls_token": "cls", "mean_tokens": "mean", "lasttoken": "last", "cls": "cls", "mean": "mean"}.get(
        mode
    )
    if mode is None:
        raise EmbedtuneError(f"unsupported sentence-transformers pooling {cfg}")
    return mode


def st_prompts(path: str) -> dict:
    f = hub_file(path, "config_sentence_transformers.json")
    return json.loads(Path(f).read_text()).get("prompts") or {} if f else {}


def st_max_length(path: str) -> int | None:
    """sentence-transformers' own max_seq_length (e.g. 256 for all-MiniLM-L6-v2, below its tokenizer's 512)."""
    f = hub_file(path, "sentence_bert_config.json")
    return json.loads(Path(f).read_text()).get("max_seq_length") if f else None


def check_sources(path: str, trust_remote_code: bool) -> None:
    """Before anything of `path` is read: a model folder that is whole (`check_model_path`), no pickles that
    would run code and, unless trusted, no model's own Python code (`embedtune.safety`), in the folder and,
    for an adapter, in its base model's folder."""
    check_model_path(path)
    check_model_folder(path, trust_remote_code)
    if is_adapter(path):
        check_model_path(adapter_base(path))
        check_model_folder(adapter_base(path), trust_remote_code)


MODEL_FILES = ("config.json", ADAPTER_FILE, "modules.json")  # a folder with none of these is not a model
JSON_FILES = ("config.json", ADAPTER_FILE, META_FILE, "modules.json", "tokenizer_config.json")


def is_local(path: str) -> bool:
    """A path on this machine rather than a hub id (`org/name`: one slash, no leading `/`, `.` or `~`)."""
    return path.startswith(("/", ".", "~")) or path.count("/") > 1 or os.path.exists(path)


def check_model_path(path: str) -> None:
    """One line naming the path for a local model that cannot load: missing, not a folder, no model files,
    a JSON file that does not parse, a safetensors file cut short. A hub id passes (the hub answers)."""
    if not is_local(path):
        return
    folder = Path(path).expanduser()
    if not folder.exists():
        raise EmbedtuneError(f"{path}: no such folder (a Hugging Face hub id is `org/name`)")
    if not folder.is_dir():
        raise EmbedtuneError(f"{path}: not a folder (a model is a folder with config.json)")
    if not any((folder / name).is_file() for name in MODEL_FILES):
        raise EmbedtuneError(f"{path}: not a model folder (no {', '.join(MODEL_FILES)})")
    for name in JSON_FILES:
        if (folder / name).is_file():
            try:
                json.loads((folder / name).read_bytes())
            except (ValueError, OSError) as e:
                raise EmbedtuneError(f"{folder / name}: not valid JSON ({e})") from None
    for f in sorted(folder.glob("*.safetensors")):
        if why := safetensors_problem(f):
            raise EmbedtuneError(f"{f}: {why}")


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a whole safetensors file (from its header alone: 8-byte length, JSON, offsets)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= size - 8:
            return f"not a safetensors file, or cut short ({size} bytes)"
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return f"not a safetensors file (its header is not JSON; {size} bytes)"
    try:
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        return f"not a safetensors file (its header lists no tensor offsets; {size} bytes)"
    need = 8 + n + max(ends, default=0)
    return (
        f"cut short: {size} bytes, its header needs {need} (a copy or download that did not finish)"
        if size < need
        else None
    )


def hf_config(path: str, trust_remote_code: bool):
    from transformers import AutoConfig

    src = adapter_base(path) if is_adapter(path) else path
    return AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)


def write_st_files(out: Path, dim: int, pooling: str, query_instruction: str) -> None:
    """The sentence-transformers 6 config files: Transformer -> Pooling -> Normalize, and the query prompt."""
    import sentence_transformers
    import transformers

    st_mode = {"last": "lasttoken", "mean": "mean", "cls": "cls"}[pooling]
    modules = [
        ("", "sentence_transformers.base.modules.transformer.Transformer"),
        ("1_Pooling", "sentence_transformers.sentence_transformer.modules.pooling.Pooling"),
        ("2_Normalize", "sentence_transformers.base.modules.normalize.Normalize"),
    ]
    write_json(
        out / "modules.json",
        [{"idx": i, "name": str(i), "path": p, "type": t} for i, (p, t) in enumerate(modules)],
    )
    write_json(
        out / "sentence_bert_config.json",
        {
            "transformer_task": "feature-extraction",
            "modality_config": {"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
            "module_output_name": "token_embeddings",
        },
    )
    write_json(
        out / "1_Pooling" / "config.json",
        {"embedding_dimension": dim, "pooling_mode": st_mode, "include_prompt": True},
    )
    write_json(
        out / "2_Normalize" / "config.json",
        {"module_input_name": "sentence_embedding", "module_output_name": "sentence_embedding"},
    )
    write_json(
        out / "config_sentence_transformers.json",
        {
            "__version__": {
                "sentence_transformers": sentence_transformers.__version__,
                "transformers": transformers.__version__,
                "pytorch": torch.__version__,
            },
            "model_type": "SentenceTransformer",
            "prompts": {"query": query_instruction, "document": ""},
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
        },
    )


def write_meta(out: str | os.PathLike, meta: dict) -> None:
    write_json(Path(out) / META_FILE, {"embedtune_version": __version__, **meta})


def task_type_of(path: str | os.PathLike) -> str:
    """`embedding` or `reranker`: from embedtune.json; a plain folder holding a sequence-classification model
    (a cross-encoder: sentence-transformers' CrossEncoder, a hub reranker) is a reranker, any other an embedder."""
    meta = read_meta(path)
    if "task_type" in meta:
        return meta["task_type"]
    config = Path(path) / "config.json"
    if config.is_file():
        with contextlib.suppress(
            ValueError, OSError, AttributeError
        ):  # a broken config.json is the loader's error to report
            archs = json.loads(config.read_text()).get("architectures") or []
            if any(str(a).endswith("ForSequenceClassification") for a in archs):
                return "reranker"
    return "embedding"


DECODERS = {"qwen2", "qwen3", "qwen3_moe", "llama", "mistral", "gemma", "gemma2", "gemma3", "phi3", "gpt2"}


def reranker_head(path: str, head: str = "auto", trust_remote_code: bool = False) -> str:
    """`generative` or `classifier` for a reranker folder or hub id: `head` when given; else what the folder's
    embedtune.json says, a sequence-classification architecture (classifier), a causal LM (generative), or
    by the model type: decoders (and Qwen2-VL / Qwen3-VL) generative, encoders (BERT, XLM-R, ModernBERT, MiniLM) a new classifier."""
    if head not in HEADS:
        raise EmbedtuneError(f"reranker_head: {head!r} is not one of {', '.join(HEADS)}")
    if head != "auto":
        return head
    if saved := read_meta(path).get("reranker_head") if Path(path).is_dir() else None:
        return saved
    config = hf_config(path, trust_remote_code)
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "classifier"
    return "generative" if is_decoder(config) or vision_family(config) else "classifier"


VISION_FAMILIES = ("qwen2_vl", "qwen3_vl")  # model types that read images (`embedtune.vision.FAMILIES`)


def vision_family(config) -> str | None:
    """A config's family of `embedtune.vision` (a Qwen2-VL / Qwen3-VL backbone), else None."""
    kind = getattr(config, "model_type", "")
    return kind if kind in VISION_FAMILIES else None


def is_decoder(config) -> bool:
    """A causal LM backbone (a `ForCausalLM` architecture, or a decoder model type)."""
    archs = getattr(config, "architectures", None) or []
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    return causal or getattr(config, "model_type", "") in DECODERS


def fit_positions(config, max_length: int, given: bool) -> int:
    """`max_length` within a model's table of absolute positions (BERT-likes: past it the forward indexes out
    of range). A value the user gave past it is refused in one line; a default one is cut to it."""
    absolute = (
        getattr(config, "position_embedding_type", None) == "absolute" or config.model_type == "distilbert"
    )
    limit = getattr(config, "max_position_embeddings", None)
    if not absolute or not isinstance(limit, int) or limit <= 0:
        return max_length
    if config.model_type in ("roberta", "xlm-roberta", "camembert"):  # positions start after the pad id
        limit -= (config.pad_token_id or 0) + 1
    if max_length <= limit:
        return max_length
    if given:
        raise EmbedtuneError(
            f"max_length: {max_length} is past the model's {limit} positions (max_position_embeddings)"
        )
    return limit
