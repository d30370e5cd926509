"""The model kinds embedtune trains (their folder format: `embedtune.modelfolder`).

**Embedder**: any Hugging Face encoder or decoder + pooling + L2 normalization, so dot product == cosine.
  - `last`  (decoder LLMs: Qwen3-Embedding, gte-Qwen2): the tokenizer appends the end-of-text token and the
    hidden state of the last *real* token is the embedding. The position comes from the attention mask, so
    left or right padding give the same vectors.
  - `mean`  (BERT, MiniLM): mean of real-token hidden states.
  - `cls`   (gte-modernbert): the first real token.
  Queries get `query_instruction` prepended (e.g. Qwen3's `Instruct: {task}\\nQuery:`); documents never do.

**Reranker**, two heads (`reranker_head` picks one for a folder), both scoring a (query, document) pair as z
with `score()` = sigmoid(z):
  - generative (`Reranker`): a decoder LM that reads the Qwen3-Reranker prompt; `z = logit(yes) - logit(no)`
    at the last position (sigmoid(z) equals the official softmax over [no, yes]).
  - classifier (`ClassifierReranker`): a sequence-classification model with one logit over the pair read as
    one input (cross-encoders: BGE-reranker, MiniLM, ModernBERT; Qwen3ForSequenceClassification); the
    folder loads as sentence-transformers' `CrossEncoder`. `to_classifier` writes a generative reranker in
    this form (what vLLM and TEI serve), with the same z.

An embedder trained with Matryoshka widths lists them in `config.json` as `matryoshka_dimensions` (vLLM's key).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from embedtune.config import QWEN3_RERANKER_INSTRUCTION
from embedtune.errors import EmbedtuneError
from embedtune.features import pack
from embedtune.io import read_json, write_json
from embedtune.modelfolder import (  # noqa: F401 (META_FILE, read_meta, ...: also reached through this module)
    ADAPTER_FILE,
    META_FILE,
    TASK_TYPES,
    adapter_base,
    check_sources,
    detect_pooling,
    fit_positions,
    hf_config,
    is_adapter,
    read_meta,
    reranker_head,
    st_max_length,
    st_prompts,
    task_type_of,
    vision_family,
    write_meta,
    write_st_files,
)
from embedtune.pooling import POOLINGS, append_eos_post_processor, pool, pool_packed

RERANKER_SYSTEM = 'Judge whether the Document meets the requirements based on the Query and the Instruct provided. Note that the answer can only be "yes" or "no".'
RERANKER_PREFIX = f"<|im_start|>system\n{RERANKER_SYSTEM}<|im_end|>\n<|im_start|>user\n"
RERANKER_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def _attention(implementation: str | None) -> dict:
    """`from_pretrained`'s attention kwarg when one is asked for (flash-attention 2 for padding-free), else none."""
    return {"attn_implementation": implementation} if implementation else {}


def _load_backbone(path: str, auto_cls, trust_remote_code: bool, dtype, **kwargs):
    """Load full weights, or base + PEFT adapter when `path` is an adapter folder (`kwargs`: to `from_pretrained`)."""
    import pickle

    try:
        if is_adapter(path):
            from peft import PeftModel

            base = auto_cls.from_pretrained(
                adapter_base(path), trust_remote_code=trust_remote_code, dtype=dtype, **kwargs
            )
            return PeftModel.from_pretrained(base, path, is_trainable=False)
        return auto_cls.from_pretrained(path, trust_remote_code=trust_remote_code, dtype=dtype, **kwargs)
    except pickle.UnpicklingError as e:  # a hub model's .bin refused by torch's weights-only loader
        raise EmbedtuneError(f"{path}: refused: {str(e).strip().splitlines()[0][:300]}") from None


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
    padding_free = False  # the texts of a forward pass packed into one row (`features.pack`); decoders only

    @property
    def inner(self) -> nn.Module:
        return getattr(self, self.INNER)

    def set_inner(self, model: nn.Module) -> None:
        setattr(self, self.INNER, model)


# --------------------------------------------------------------------------------------------- embedder
class Embedder(Wrapper):
    """Backbone + pooling + L2 normalization. `forward` keeps gradients (training); `encode` does not."""

    INNER = "backbone"
    APPEND_EOS = (
        True  # last-token pooling: the tokenizer appends the end-of-text token (not when a template does)
    )

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
        if pooling == "last" and self.APPEND_EOS:
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
        attn_implementation: str | None = None,
        vision: dict | None = None,
    ) -> Embedder:
        """Load an embedtune folder, a sentence-transformers folder, any HF model, or an adapter folder.

        Unset arguments come from the folder (embedtune.json, then sentence-transformers config, then the
        architecture): `pooling`, `query_instruction` (the ST `query` prompt), `max_length`. A Qwen2-VL /
        Qwen3-VL folder loads as `vision.VisionEmbedder` (`vision`: its `min_pixels`, `max_pixels`,
        `max_image_pixels`).
        """
        from transformers import AutoModel, AutoTokenizer

        path = str(path)
        check_sources(path, trust_remote_code)
        meta = read_meta(path)
        config = hf_config(path, trust_remote_code)
        if cls is Embedder and vision_family(config):  # Qwen2-VL / Qwen3-VL: texts with images
            from embedtune.vision import VisionEmbedder

            return VisionEmbedder.load(path, query_instruction, max_length, trust_remote_code, dtype,
                                       attn_implementation, **(vision or {}))  # fmt: skip
        if pooling == "auto":
            pooling = meta.get("pooling") or detect_pooling(
                path if not is_adapter(path) else adapter_base(path), config
            )
        if query_instruction is None:
            query_instruction = meta.get("query_instruction", st_prompts(path).get("query", ""))
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        given = bool(max_length)
        if not max_length:
            max_length = (
                meta.get("max_length") or st_max_length(path) or min(int(tokenizer.model_max_length), 8192)
            )
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        backbone = _load_backbone(
            path, AutoModel, trust_remote_code, dtype, **_attention(attn_implementation)
        )
        return cls(
            backbone, tokenizer, pooling, query_instruction, fit_positions(backbone.config, max_length, given)
        )

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

    def texts(
        self,
        texts: Sequence[str],
        is_query: bool = False,
        instructions: Sequence[str | None] | None = None,
        images: Sequence[Sequence] | None = None,
    ) -> list:
        """Texts -> tokenized texts (`features.Text`), unpadded. A text with its own instruction (`instructions`,
        not None) gets that one instead of the model's. This model reads no images: any are refused."""
        if images and any(images):
            raise EmbedtuneError(
                f"{self.backbone.config.model_type} reads no images; rows with `images` need a Qwen2-VL (GME) or "
                "Qwen3-VL backbone"
            )
        own = list(instructions) if instructions else [None] * len(texts)
        out: list = [None] * len(texts)
        for given in (False, True):  # texts with the model's instruction (queries), then with their own
            idx = [i for i, o in enumerate(own) if (o is not None) == given]
            if idx:
                batch = [own[i] + texts[i] if given else texts[i] for i in idx]
                enc = self.tokenize(batch, is_query=is_query and not given, padding=False)["input_ids"]
                for i, e in zip(idx, enc, strict=True):
                    out[i] = np.asarray(e, dtype=np.int32)
        return out

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Model inputs of B texts (`embedtune.features`: `input_ids`, `attention_mask`, (B, L)) -> (B, H)
        unit-norm embeddings. Every feature goes to the backbone."""
        if self.padding_free:
            hidden = self.backbone(**pack(features)).last_hidden_state[0]  # (N, H), N real tokens
            return F.normalize(pool_packed(hidden, features, self.pooling).float(), p=2, dim=-1)
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


# --------------------------------------------------------------------------------------------- reranker
def template_ids(tokenizer, instruction: str, queries, docs, max_length: int) -> list[list[int]]:
    """The Qwen3-Reranker prompt's ids for (query, doc) pairs, at most `max_length` each: over it the document
    is cut first, then the query, so the prefix and the suffix (where the answer is read) always survive."""
    prefix = tokenizer.encode(RERANKER_PREFIX, add_special_tokens=False)
    suffix = tokenizer.encode(RERANKER_SUFFIX, add_special_tokens=False)
    budget = max_length - len(prefix) - len(suffix)
    if budget <= 8:
        raise EmbedtuneError(f"max_length {max_length} leaves no room for the reranker prompt")
    heads = [f"<Instruct>: {instruction}\n<Query>: {q}\n<Document>: " for q in queries]
    enc = tokenizer(heads, add_special_tokens=False, truncation=True, max_length=budget // 2)["input_ids"]
    doc_ids = tokenizer(list(docs), add_special_tokens=False)["input_ids"]
    return [prefix + h + d[: budget - len(h)] + suffix for h, d in zip(enc, doc_ids, strict=True)]


class Reranker(Wrapper):
    """Decoder LM scoring relevance as logit(yes) - logit(no) after the Qwen3-Reranker prompt (the
    generative head). `ClassifierReranker` is the other head; both score (query, document) pairs as z with
    `score` = sigmoid(z), and both are `Reranker`s to the rest of embedtune."""

    INNER = "lm"
    HEAD = "generative"

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
        self._prefix = tokenizer.encode(
            RERANKER_PREFIX, add_special_tokens=False
        )  # the prompt around each pair
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
        attn_implementation: str | None = None,
        vision: dict | None = None,
    ) -> Reranker:
        """Load a reranker folder (full or adapter); unset arguments come from its embedtune.json. A Qwen2-VL /
        Qwen3-VL folder loads as `vision.VisionReranker` (`vision`: as `Embedder.from_pretrained`'s)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = str(path)
        check_sources(path, trust_remote_code)
        meta = read_meta(path)
        if cls is Reranker and vision_family(hf_config(path, trust_remote_code)):
            from embedtune.vision import VisionReranker

            return VisionReranker.load(path, instruction, max_length, positive_token, negative_token, trust_remote_code,
                                       dtype, attn_implementation, **(vision or {}))  # fmt: skip
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        lm = _load_backbone(
            path, AutoModelForCausalLM, trust_remote_code, dtype, **_attention(attn_implementation)
        )
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
        ids = template_ids(self.tokenizer, self.instruction, queries, docs, max_length or self.max_length)
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
        lm = self.base_lm
        if self.padding_free:
            hidden = lm.get_decoder()(**pack(features)).last_hidden_state[0]  # (N, H), N real tokens
            last = pool_packed(hidden, features, "last")
        else:
            last = pool(lm.get_decoder()(**features).last_hidden_state, features["attention_mask"], "last")
        return self.yes_no(last)

    @property
    def base_lm(self) -> nn.Module:
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    def yes_no(self, last: torch.Tensor) -> torch.Tensor:
        """(B, H) hidden states at the last real token -> (B,) z = logit(yes) - logit(no)."""
        head = self.base_lm.get_output_embeddings()
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
            features = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
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
                "reranker_head": "generative",
                "reranker_instruction": self.instruction,
                "max_length": self.max_length,
                "positive_token": self.positive_token,
                "negative_token": self.negative_token,
                **(meta or {}),
            },
        )


class ClassifierReranker(Reranker):
    """A cross-encoder: a sequence-classification model with one logit, z, over (query, document) read as one
    input (BGE-reranker, gte-reranker-modernbert, ms-marco MiniLM; or a decoder's own classification class,
    Qwen3ForSequenceClassification). `score` = sigmoid(z), as sentence-transformers' `CrossEncoder` predicts.

    `prompt` says how a pair becomes tokens: `pair` (the tokenizer's text pair: `[CLS] q [SEP] d [SEP]` with
    token types; truncation `longest_first` keeps both), or `qwen3` (the Qwen3-Reranker prompt, for a
    generative reranker written as a classifier: `to_classifier`).
    """

    INNER = "classifier"
    HEAD = "classifier"
    PROMPTS = ("pair", "qwen3")

    def __init__(self, classifier, tokenizer, max_length: int = 512, prompt: str = "pair",
                 instruction: str = QWEN3_RERANKER_INSTRUCTION):  # fmt: skip
        Wrapper.__init__(self)
        if prompt not in self.PROMPTS:
            raise EmbedtuneError(f"reranker prompt {prompt!r} is not one of {', '.join(self.PROMPTS)}")
        labels = getattr(classifier.config, "num_labels", 1)
        if labels != 1:
            raise EmbedtuneError(
                f"a classifier reranker has one logit; this model's head has {labels} labels"
            )
        self.classifier = classifier
        no_kv_cache(classifier)
        self.tokenizer = tokenizer
        self.max_length, self.prompt, self.instruction = max_length, prompt, instruction
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if getattr(classifier.config, "pad_token_id", None) is None:  # decoders find their last token by it
            classifier.config.pad_token_id = tokenizer.pad_token_id

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, max_length: int | None = None, trust_remote_code: bool = False,
                        dtype: torch.dtype = torch.float32, **_) -> ClassifierReranker:  # fmt: skip
        """Load a classifier folder (full or adapter), or an encoder without a head (a new one-logit head is
        initialized: the warning says so); unset arguments come from its embedtune.json."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = str(path)
        check_sources(path, trust_remote_code)
        meta = read_meta(path)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = _load_backbone(
            path, AutoModelForSequenceClassification, trust_remote_code, dtype, num_labels=1
        )
        length = max_length or meta.get("max_length") or min(int(tokenizer.model_max_length), 512)
        return cls(model, tokenizer, fit_positions(model.config, length, bool(max_length)), meta.get("reranker_prompt", "pair"),
                   meta.get("reranker_instruction") or QWEN3_RERANKER_INSTRUCTION)  # fmt: skip

    def tokenize(
        self, queries: Sequence[str], docs: Sequence[str], padding: bool = True, max_length: int = 0
    ):
        """Ids (and token types) of (query, doc) pairs, at most `max_length` tokens (0: the model's)."""
        limit = max_length or self.max_length
        if self.prompt == "qwen3":
            ids = template_ids(self.tokenizer, self.instruction, queries, docs, limit)
            if not padding:
                return {"input_ids": ids}
            return self.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
        return self.tokenizer(list(queries), list(docs), truncation="longest_first", max_length=limit,
                              padding=padding, return_tensors="pt" if padding else None)  # fmt: skip

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Model inputs of B pairs (`embedtune.features`) -> (B,) z, the head's one logit, in fp32."""
        return self.classifier(**features).logits[:, 0].float()

    def save_pretrained(self, out_dir: str | os.PathLike, meta: dict | None = None, state_dict=None) -> None:
        """An HF sequence-classification folder (or its adapter): `CrossEncoder(folder)` loads it as is."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        kwargs = {"state_dict": state_dict} if state_dict is not None else {}
        self.classifier.save_pretrained(out, **kwargs)
        self.tokenizer.model_max_length = self.max_length
        self.tokenizer.save_pretrained(out)
        own = {"task_type": "reranker", "reranker_head": "classifier", "reranker_prompt": self.prompt,
               "reranker_instruction": self.instruction, "max_length": self.max_length}  # fmt: skip
        write_meta(out, {**(meta or {}), **own})  # what this model is wins over a generative source's meta


def to_classifier(reranker: Reranker) -> ClassifierReranker:
    """A generative (yes/no) reranker written as a one-logit sequence classifier (what vLLM and TEI serve):
    the same decoder, and a head whose one row is the LM head's yes row minus its no row, so z is unchanged;
    the pairs keep the Qwen3-Reranker prompt (`prompt="qwen3"`)."""
    from transformers import AutoModelForSequenceClassification

    lm = reranker.lm.get_base_model() if hasattr(reranker.lm, "get_base_model") else reranker.lm
    config = lm.config.__class__.from_dict({**lm.config.to_dict(), "num_labels": 1})
    config.pad_token_id = reranker.tokenizer.pad_token_id
    config.architectures = None
    classifier = AutoModelForSequenceClassification.from_config(config).to(lm.dtype)
    decoder = lm.get_decoder()
    getattr(classifier, classifier.base_model_prefix).load_state_dict(decoder.state_dict())
    rows = lm.get_output_embeddings().weight
    with torch.no_grad():
        classifier.score.weight.copy_((rows[reranker.yes_id] - rows[reranker.no_id]).unsqueeze(0))
    return ClassifierReranker(
        classifier.eval(), reranker.tokenizer, reranker.max_length, "qwen3", reranker.instruction
    )


# --------------------------------------------------------------------------------------------- entry points
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
    base model loads as a reranker; its head as `reranker_head` decides. `like`: another model's
    embedtune.json whose settings to use (pooling, query instruction, max length, reranker head, instruction
    and tokens), so a base model is measured the way its fine-tuned model was trained (a classifier's base
    gets a new, untrained head). `max_length` > 0 overrides both. `trust_remote_code` None: what train saved
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
    head = (
        reranker_head(str(path), like.get("reranker_head") or "auto", trust_remote_code)
        if task_type == "reranker"
        else ""
    )
    if head == "classifier":
        model = ClassifierReranker.from_pretrained(path, **kwargs)
    elif head == "generative":
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
