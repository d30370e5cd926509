"""The two model kinds embedtune trains, and the folder format they are saved in.

**Embedder**: any Hugging Face encoder or decoder + pooling + L2 normalization, so dot product == cosine.
  - `last`  (decoder LLMs: Qwen3-Embedding, gte-Qwen2): the tokenizer appends the end-of-text token and the
    hidden state of the last *real* token is the embedding. The position comes from the attention mask, so
    left or right padding give the same vectors.
  - `mean`  (BERT, MiniLM): mean of real-token hidden states.
  - `cls`   (gte-modernbert): the first real token.
  Queries get `query_instruction` prepended (e.g. Qwen3's `Instruct: {task}\\nQuery:`); documents never do.

**Reranker**: a decoder LM that reads the Qwen3-Reranker prompt and scores relevance as
  `z = logit(yes) - logit(no)` at the last position; `score()` returns `sigmoid(z)`, which equals the official
  softmax over [no, yes].

Folder format (what train and merge write, what evaluate and register read):
  - `embedtune.json`: task_type, base_model, train_type, pooling, query_instruction, max_length, reranker tokens
    and instruction, and the whole effective training config (`train_config`).
  - embedder: a sentence-transformers folder, so `SentenceTransformer(dir)` loads it with the same pooling,
    normalization, max length and a `query` prompt; the HF weights (or, for LoRA, the PEFT adapter) at the root;
    trained with Matryoshka widths, `config.json` lists them as `matryoshka_dimensions` (vLLM's key).
  - reranker: an HF causal-LM folder (or a PEFT adapter on one) + tokenizer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from embedtune import __version__
from embedtune.config import QWEN3_RERANKER_INSTRUCTION
from embedtune.errors import DataError, EmbedtuneError
from embedtune.io import read_json, write_json
from embedtune.safety import check_model_folder

META_FILE = "embedtune.json"
TASK_TYPES = ("embedding", "reranker")
POOLINGS = ("last", "mean", "cls")
ADAPTER_FILE = "adapter_config.json"

RERANKER_SYSTEM = 'Judge whether the Document meets the requirements based on the Query and the Instruct provided. Note that the answer can only be "yes" or "no".'
RERANKER_PREFIX = f"<|im_start|>system\n{RERANKER_SYSTEM}<|im_end|>\n<|im_start|>user\n"
RERANKER_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


# --------------------------------------------------------------------------------------------- folder helpers
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


def _hub_file(path: str, name: str) -> str | None:
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
        base = json.loads((Path(path) / ADAPTER_FILE).read_text()).get("base_model_name_or_path")
    if not base:
        raise EmbedtuneError(f"{path}: adapter folder names no base model")
    return base


def detect_pooling(path: str, config) -> str:
    """Pooling of a model: its sentence-transformers config when present, else by architecture."""
    modules = _hub_file(path, "modules.json")
    if modules:
        for module in json.loads(Path(modules).read_text()):
            if module["type"].endswith("Pooling"):
                cfg_file = _hub_file(path, f"{module['path']}/config.json")
                if cfg_file:
                    return _pooling_from_st(json.loads(Path(cfg_file).read_text()))
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") for a in archs) or getattr(config, "is_decoder", False):
        return "last"
    if getattr(config, "model_type", "") in ("modernbert",):
        return "cls"
    return "mean"


def _pooling_from_st(cfg: dict) -> str:
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


def _st_prompts(path: str) -> dict:
    f = _hub_file(path, "config_sentence_transformers.json")
    return json.loads(Path(f).read_text()).get("prompts") or {} if f else {}


def _st_max_length(path: str) -> int | None:
    """sentence-transformers' own max_seq_length (e.g. 256 for all-MiniLM-L6-v2, below its tokenizer's 512)."""
    f = _hub_file(path, "sentence_bert_config.json")
    return json.loads(Path(f).read_text()).get("max_seq_length") if f else None


def check_sources(path: str, trust_remote_code: bool) -> None:
    """Before anything of `path` is read: refuse pickles that would run code and, unless trusted, a model's
    own Python code (`embedtune.safety`), in the folder and, for an adapter, in its base model's folder."""
    check_model_folder(path, trust_remote_code)
    if is_adapter(path):
        check_model_folder(adapter_base(path), trust_remote_code)


def _load_backbone(path: str, auto_cls, trust_remote_code: bool, dtype):
    """Load full weights, or base + PEFT adapter when `path` is an adapter folder."""
    import pickle

    try:
        if is_adapter(path):
            from peft import PeftModel

            base = auto_cls.from_pretrained(
                adapter_base(path), trust_remote_code=trust_remote_code, dtype=dtype
            )
            return PeftModel.from_pretrained(base, path, is_trainable=False)
        return auto_cls.from_pretrained(path, trust_remote_code=trust_remote_code, dtype=dtype)
    except pickle.UnpicklingError as e:  # a hub model's .bin refused by torch's weights-only loader
        raise EmbedtuneError(f"{path}: refused: {str(e).strip().splitlines()[0][:300]}") from None


def _hf_config(path: str, trust_remote_code: bool):
    from transformers import AutoConfig

    src = adapter_base(path) if is_adapter(path) else path
    return AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)


def append_eos_post_processor(tokenizer) -> None:
    """Make a fast tokenizer append its end-of-text token, as Qwen3-Embedding's own tokenizer does.

    Done on the tokenizer itself (not in our batching code) so the saved tokenizer does the same inside
    sentence-transformers: training, evaluation and serving see identical token ids.
    """
    from tokenizers import processors

    eos = "<|endoftext|>" if "<|endoftext|>" in tokenizer.get_vocab() else tokenizer.eos_token
    if eos is None:
        raise EmbedtuneError("last-token pooling needs an end-of-text token; the tokenizer has none")
    eos_id = tokenizer.convert_tokens_to_ids(eos)
    if tokenizer("a")["input_ids"][-1] == eos_id:
        return  # already appends it
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise EmbedtuneError("last-token pooling needs a fast tokenizer to append the end-of-text token")
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A {eos} $B:1 {eos}:1", special_tokens=[(eos, eos_id)]
    )
    assert tokenizer("a")["input_ids"][-1] == eos_id


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, L, H) hidden states + (B, L) mask -> (B, H), independent of the padding side."""
    if pooling == "mean":  # summed in fp32: a bf16 sum over hundreds of tokens would lose the low bits
        m = mask.unsqueeze(-1).to(torch.float32)
        return (hidden.float() * m).sum(1) / m.sum(1).clamp(min=1e-9)
    positions = torch.arange(mask.shape[1], device=mask.device)
    if pooling == "last":
        idx = (mask.long() * positions).argmax(1)  # index of the last 1 in each row
    elif pooling == "cls":
        idx = mask.long().argmax(1)  # index of the first 1 in each row
    else:
        raise EmbedtuneError(f"unknown pooling {pooling!r}: choose one of {POOLINGS}")
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]


def _batches_by_length(lengths: Sequence[int], batch_size: int):
    """Index batches of similar length (longest first), so padding is small; callers restore the order."""
    order = np.argsort([-n for n in lengths], kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _progress(iterable, show: bool, desc: str):
    if not show:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc)


# --------------------------------------------------------------------------------------------- both kinds
def no_kv_cache(model: nn.Module) -> None:
    """Embedding and scoring never generate: without this a decoder fills a KV cache in every forward pass
    (copies, and a Python object a compiled layer would break on). sentence-transformers does the same."""
    if getattr(model.config, "use_cache", False):
        model.config.use_cache = False


class Wrapper(nn.Module):
    """What Embedder and Reranker share: the Hugging Face model inside, under the attribute `INNER` names.

    `inner` is the one way to reach it (LoRA wraps it, DeepSpeed shards it, saving and merging act on it);
    `set_inner` replaces it (an `nn.Module` attribute cannot be a property setter: torch's `__setattr__`
    registers sub-modules by name before any property is consulted).
    """

    INNER = ""

    @property
    def inner(self) -> nn.Module:
        return getattr(self, self.INNER)

    def set_inner(self, model: nn.Module) -> None:
        setattr(self, self.INNER, model)


# --------------------------------------------------------------------------------------------- embedder
class Embedder(Wrapper):
    """Backbone + pooling + L2 normalization. `forward` keeps gradients (training); `encode` does not."""

    INNER = "backbone"

    def __init__(self, backbone, tokenizer, pooling: str, query_instruction: str = "", max_length: int = 512):
        super().__init__()
        if pooling not in POOLINGS:
            raise EmbedtuneError(f"unknown pooling {pooling!r}: choose one of {POOLINGS}")
        self.backbone = backbone
        no_kv_cache(backbone)
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.query_instruction = query_instruction
        self.max_length = max_length
        if pooling == "last":
            append_eos_post_processor(tokenizer)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        pooling: str = "auto",
        query_instruction: str | None = None,
        max_length: int | None = None,
        trust_remote_code: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> Embedder:
        """Load an embedtune folder, a sentence-transformers folder, any HF model, or an adapter folder.

        Unset arguments come from the folder (embedtune.json, then sentence-transformers config, then the
        architecture): `pooling`, `query_instruction` (the ST `query` prompt), `max_length`.
        """
        from transformers import AutoModel, AutoTokenizer

        path = str(path)
        check_sources(path, trust_remote_code)
        meta = read_meta(path)
        config = _hf_config(path, trust_remote_code)
        if pooling == "auto":
            pooling = meta.get("pooling") or detect_pooling(
                path if not is_adapter(path) else adapter_base(path), config
            )
        if query_instruction is None:
            query_instruction = meta.get("query_instruction", _st_prompts(path).get("query", ""))
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        if not max_length:
            max_length = (
                meta.get("max_length") or _st_max_length(path) or min(int(tokenizer.model_max_length), 8192)
            )
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        backbone = _load_backbone(path, AutoModel, trust_remote_code, dtype)
        return cls(backbone, tokenizer, pooling, query_instruction, max_length)

    @property
    def dim(self) -> int:
        return self.backbone.config.hidden_size

    def tokenize(
        self, texts: Sequence[str], is_query: bool = False, padding: bool = True, max_length: int = 0
    ):
        """Token ids for texts (queries get the instruction), at most `max_length` tokens (0: the model's);
        truncation keeps the appended EOS."""
        if is_query and self.query_instruction:
            texts = [self.query_instruction + t for t in texts]
        return self.tokenizer(
            list(texts),
            padding=padding,
            truncation=True,
            max_length=max_length or self.max_length,
            return_tensors="pt" if padding else None,
        )

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Model inputs of B texts (`embedtune.features`: `input_ids`, `attention_mask`, (B, L)) -> (B, H)
        unit-norm embeddings. Every feature goes to the backbone."""
        hidden = self.backbone(**features).last_hidden_state
        return F.normalize(pool(hidden, features["attention_mask"], self.pooling).float(), p=2, dim=-1)

    @torch.inference_mode()
    def encode(
        self, texts: Sequence[str], is_query: bool = False, batch_size: int = 32, show_progress: bool = False
    ) -> np.ndarray:
        """(N,) texts -> (N, H) float32 unit vectors, in the input order, no grad. All texts are tokenized
        first, then batched by token count (longest first), so each batch pads to the fewest tokens."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        ids = self.tokenize(texts, is_query=is_query, padding=False)["input_ids"] if len(texts) else []
        for idx in _progress(_batches_by_length([len(i) for i in ids], batch_size), show_progress, "encode"):
            batch = self.tokenizer.pad({"input_ids": [ids[i] for i in idx]}, return_tensors="pt").to(device)
            features = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            out[idx] = self(features).cpu().numpy()
        self.train(was_training)
        return out

    def save_pretrained(self, out_dir: str | os.PathLike, meta: dict | None = None, state_dict=None) -> None:
        """Write a sentence-transformers folder (+ embedtune.json). A PEFT backbone saves only its adapter.

        `state_dict`: weights gathered from DeepSpeed ZeRO-3 shards (keys of `self.backbone`), when the live
        parameters are partitioned.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        kwargs = {"state_dict": state_dict} if state_dict is not None else {}
        self.backbone.save_pretrained(out, **kwargs)
        self.tokenizer.model_max_length = self.max_length
        self.tokenizer.save_pretrained(out)
        dims = (meta or {}).get("matryoshka_dims")
        if (
            dims and (out / "config.json").is_file()
        ):  # what vLLM reads to accept `dimensions` (full weights only)
            write_json(out / "config.json", {**read_json(out / "config.json"), "matryoshka_dimensions": dims})
        write_st_files(out, self.dim, self.pooling, self.query_instruction)
        write_meta(
            out,
            {
                "task_type": "embedding",
                "pooling": self.pooling,
                "query_instruction": self.query_instruction,
                "max_length": self.max_length,
                **(meta or {}),
            },
        )


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


# --------------------------------------------------------------------------------------------- reranker
class Reranker(Wrapper):
    """Decoder LM scoring relevance as logit(yes) - logit(no) after the Qwen3-Reranker prompt."""

    INNER = "lm"

    def __init__(
        self,
        lm,
        tokenizer,
        instruction: str = QWEN3_RERANKER_INSTRUCTION,
        max_length: int = 512,
        positive_token: str = "yes",
        negative_token: str = "no",
    ):
        super().__init__()
        self.lm = lm
        no_kv_cache(lm)
        self.tokenizer = tokenizer
        self.instruction = instruction
        self.max_length = max_length
        self.positive_token, self.negative_token = positive_token, negative_token
        self.yes_id = self._single_token_id(positive_token)
        self.no_id = self._single_token_id(negative_token)
        self._prefix = tokenizer.encode(RERANKER_PREFIX, add_special_tokens=False)
        self._suffix = tokenizer.encode(RERANKER_SUFFIX, add_special_tokens=False)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

    def _single_token_id(self, token: str) -> int:
        ids = self.tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise EmbedtuneError(
                f"reranker token {token!r} is {len(ids)} tokens in this tokenizer; it must be one"
            )
        return ids[0]

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        instruction: str | None = None,
        max_length: int | None = None,
        positive_token: str | None = None,
        negative_token: str | None = None,
        trust_remote_code: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> Reranker:
        """Load a reranker folder (full or adapter); unset arguments come from its embedtune.json."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = str(path)
        check_sources(path, trust_remote_code)
        meta = read_meta(path)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        lm = _load_backbone(path, AutoModelForCausalLM, trust_remote_code, dtype)
        return cls(
            lm,
            tokenizer,
            instruction=instruction or meta.get("reranker_instruction") or QWEN3_RERANKER_INSTRUCTION,
            max_length=max_length or meta.get("max_length") or 512,
            positive_token=positive_token or meta.get("positive_token") or "yes",
            negative_token=negative_token or meta.get("negative_token") or "no",
        )

    def tokenize(
        self, queries: Sequence[str], docs: Sequence[str], padding: bool = True, max_length: int = 0
    ):
        """Prompt ids for (query, doc) pairs, at most `max_length` tokens (0: the model's). Over it, the
        document is cut first, then the query, so the prompt's prefix and suffix (where the yes/no is read)
        always survive."""
        max_length = max_length or self.max_length
        budget = max_length - len(self._prefix) - len(self._suffix)
        if budget <= 8:
            raise EmbedtuneError(f"max_length {max_length} leaves no room for the reranker prompt")
        heads = [f"<Instruct>: {self.instruction}\n<Query>: {q}\n<Document>: " for q in queries]
        enc = self.tokenizer(heads, add_special_tokens=False, truncation=True, max_length=budget // 2)[
            "input_ids"
        ]
        doc_ids = self.tokenizer(list(docs), add_special_tokens=False)["input_ids"]
        ids = [
            self._prefix + h + d[: budget - len(h)] + self._suffix for h, d in zip(enc, doc_ids, strict=True)
        ]
        if not padding:
            return {"input_ids": ids}
        return self.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Model inputs of B prompts (`embedtune.features`) -> (B,) z = logit(yes) - logit(no) at the last real
        token (any padding side). Every feature goes to the decoder.

        Only the last position and the two tokens' rows of the LM head are used, in fp32: z from two bf16
        logits would be rounded to ~0.1 and tie close candidates. Under ZeRO-3 (the head's weight is a
        shard its own forward gathers) the whole head runs: (B, V) logits instead of (B, L, V).
        """
        lm = self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm
        hidden = lm.get_decoder()(**features).last_hidden_state
        last, head = pool(hidden, features["attention_mask"], "last"), lm.get_output_embeddings()  # (B, H)
        if type(head) is not nn.Linear or head.bias is not None or hasattr(head.weight, "ds_id"):
            logits = head(last).float()  # (B, V)
            return logits[:, self.yes_id] - logits[:, self.no_id]
        w = head.weight[[self.yes_id, self.no_id]].float()  # (2, H)
        return last.float() @ (w[0] - w[1])

    @torch.inference_mode()
    def score(self, query: str, docs: Sequence[str], batch_size: int = 16) -> list[float]:
        """Relevance of each document to the query, in [0, 1] (P(yes) of the official reranker)."""
        return self.score_pairs([query] * len(docs), docs, batch_size)

    @torch.inference_mode()
    def score_pairs(
        self, queries: Sequence[str], docs: Sequence[str], batch_size: int = 16, show_progress: bool = False
    ) -> list[float]:
        """sigmoid(z) per (query, doc) pair, in input order."""
        z = self.logits(queries, docs, batch_size, show_progress)
        return torch.sigmoid(torch.from_numpy(z)).tolist()

    @torch.inference_mode()
    def logits(
        self, queries: Sequence[str], docs: Sequence[str], batch_size: int = 16, show_progress: bool = False
    ) -> np.ndarray:
        """(N,) float64 z = logit(yes) - logit(no) per (query, doc) pair; batched by length, no grad."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        lengths = [len(q) + len(d) for q, d in zip(queries, docs, strict=True)]
        out = np.zeros(len(lengths), dtype=np.float64)
        for idx in _progress(_batches_by_length(lengths, batch_size), show_progress, "score"):
            batch = self.tokenize([queries[i] for i in idx], [docs[i] for i in idx]).to(device)
            features = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            out[idx] = self(features).double().cpu().numpy()
        self.train(was_training)
        return out

    def save_pretrained(self, out_dir: str | os.PathLike, meta: dict | None = None, state_dict=None) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        kwargs = {"state_dict": state_dict} if state_dict is not None else {}
        self.lm.save_pretrained(out, **kwargs)
        self.tokenizer.save_pretrained(out)
        write_meta(
            out,
            {
                "task_type": "reranker",
                "reranker_instruction": self.instruction,
                "max_length": self.max_length,
                "positive_token": self.positive_token,
                "negative_token": self.negative_token,
                **(meta or {}),
            },
        )


# --------------------------------------------------------------------------------------------- entry points
def task_type_of(path: str | os.PathLike) -> str:
    """`embedding` or `reranker`: from embedtune.json; plain folders are embedders."""
    return read_meta(path).get("task_type", "embedding")


def load_model(
    path: str | os.PathLike,
    task_type: str = "",
    like: dict | None = None,
    max_length: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | None = None,
    trust_remote_code: bool | None = None,
) -> Embedder | Reranker:
    """Load a model folder (or hub id) for inference: the one "load a folder by kind" of evaluate, merge,
    register and serving. In eval mode, on `device` (default: the GPU when there is one).

    `task_type`: how to load it (default: what its embedtune.json says, else embedding), so a reranker's
    base model loads as a reranker. `like`: another model's embedtune.json whose settings to use (pooling,
    query instruction, max length, reranker instruction and tokens), so a base model is measured the way its
    fine-tuned model was trained. `max_length` > 0 overrides both. `trust_remote_code` None: what train saved
    in the folder's embedtune.json (the user's own knob at training time), else off.
    """
    if trust_remote_code is None:
        trust_remote_code = bool((read_meta(path).get("train_config") or {}).get("trust_remote_code", False))
    like = like or {}
    task_type = task_type or task_type_of(path)
    kwargs = {
        "max_length": max_length or like.get("max_length") or None,
        "dtype": dtype,
        "trust_remote_code": trust_remote_code,
    }
    if task_type == "reranker":
        model = Reranker.from_pretrained(
            path,
            instruction=like.get("reranker_instruction"),
            positive_token=like.get("positive_token"),
            negative_token=like.get("negative_token"),
            **kwargs,
        )
    else:
        model = Embedder.from_pretrained(
            path,
            pooling=like.get("pooling") or "auto",
            query_instruction=like.get("query_instruction"),
            **kwargs,
        )
    return model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()


def add_lora(model: Embedder | Reranker, rank: int, alpha: int, dropout: float, target: str) -> None:
    """Wrap the model's inner HF model in a PEFT LoRA (in place). `target`: all-linear or module names."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target if target == "all-linear" else [t.strip() for t in target.split(",")],
        task_type="FEATURE_EXTRACTION" if isinstance(model, Embedder) else "CAUSAL_LM",
    )
    model.set_inner(get_peft_model(model.inner, lora))
