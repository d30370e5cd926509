"""Models that read images: Qwen2-VL (GME) and Qwen3-VL backbones as embedders (`VisionEmbedder`: GME,
Qwen3-VL-Embedding) and as generative yes/no rerankers (`VisionReranker`: the Qwen3-VL-Reranker prompt).

An embedder's every text, with or without images, goes through the family's embedding template (GME's
`gme_inference.py`, ms-swift's `qwen2_gme` / `qwen3_vl_emb`), and the embedding is the hidden state of the
last token, the `<|endoftext|>` that ends it (not `<|im_end|>`; an empty assistant turn comes first)::

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{content}<|im_end|>\\n<|im_start|>assistant\\n<|endoftext|>

`system` is the query's instruction for queries (`query_instruction`, or the row's own `instruction`), the
family's default system prompt otherwise (`FAMILIES`); in `content` each `<image>` tag becomes
`<|vision_start|><|image_pad|>...<|vision_end|>`, one `<|image_pad|>` per merged patch of that image (what
the processor of the folder makes of it: `min_pixels` / `max_pixels` bound the resize).

Images are read when a batch is collated (`ImageFeaturizer`), never held for the whole dataset: a tokenized
text is a dict `{"input_ids": (L,), "images": (ImageInfo, ...)}` (`embedtune.features.Text`), its token
count already holding the image tokens (length buckets and the token budget of the gradient cache count
them). A batch's features carry the pixels one row per text (`features.IMAGE_KEYS`):

    pixel_values   (T, P, D) float32   P: the most patches of one text in the batch (zeros past a text's own)
    image_grid_thw (T, K, 3) int64     K: the most images of one text; rows (0, 0, 0) past a text's own

`ReadsImages._vision_inputs` flattens them back to the model's (sum P_i, D) / (n_images, 3) in text order, the
order of the `<|image_pad|>` runs in the batch's ids. A forward pass without images gets one dummy row with
a tiny image (its output dropped, times 0) while training or on several ranks, so that every rank runs the
same modules in the same order and ZeRO-3 gathers the same parameters (ms-swift runs a dummy image too).
A reranker's (query, document) prompt is one such text, its images the query's then the document's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from embedtune import images as image_io
from embedtune.data import IMAGE_TAG
from embedtune.errors import EmbedtuneError
from embedtune.features import IMAGE_KEYS, Text, ids_of, pad
from embedtune.modelfolder import VISION_FAMILIES, hf_config, read_meta, vision_family, write_meta
from embedtune.modeling import (
    RERANKER_SYSTEM,
    Embedder,
    Reranker,
    _attention,
    _batches_by_length,
    _load_backbone,
    _progress,
    no_kv_cache,
)
from embedtune.pooling import pool

# model_type -> the family's embedding template: its default system prompt
FAMILIES = {
    "qwen2_vl": {"system": "You are a helpful assistant.", "model": "GME (gme-Qwen2-VL-2B/7B-Instruct)"},
    "qwen3_vl": {"system": "Represent the user's input.", "model": "Qwen3-VL-Embedding"},
}
PREFIX = "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<|endoftext|>"
IMAGE_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"


@dataclasses.dataclass
class ImageFeaturizer:
    """Tokenized texts -> a batch's pixel features (`IMAGE_KEYS`), reading each image when called (in the
    data loader, so images are never all in memory). Picklable: the loader's workers get a copy."""

    processor: object  # the folder's image processor (Qwen2VLImageProcessor or its PIL twin)
    max_image_pixels: int = image_io.MAX_IMAGE_PIXELS

    def __call__(self, texts: Sequence[Text]) -> dict[str, torch.Tensor]:
        per_text = [t.get("images", ()) if isinstance(t, dict) else () for t in texts]
        flat = [info for infos in per_text for info in infos]
        if not flat:
            return {}
        out = self.processor(images=[image_io.load(i.ref, self.max_image_pixels) for i in flat])
        pixels, grids = np.asarray(out["pixel_values"]), np.asarray(out["image_grid_thw"])
        k_max = max(len(infos) for infos in per_text)
        counts = grids.prod(1)
        starts = np.concatenate([[0], counts.cumsum()])
        per_text_patches, j = [], 0
        for infos in per_text:
            per_text_patches.append(int(counts[j : j + len(infos)].sum()))
            j += len(infos)
        pv = np.zeros((len(texts), max(per_text_patches), pixels.shape[1]), dtype=np.float32)
        thw = np.zeros((len(texts), k_max, 3), dtype=np.int64)
        j = 0
        for i, infos in enumerate(per_text):
            n = len(infos)
            if n:
                pv[i, : per_text_patches[i]] = pixels[starts[j] : starts[j + n]]
                thw[i, :n] = grids[j : j + n]
            j += n
        return {"pixel_values": torch.from_numpy(pv), "image_grid_thw": torch.from_numpy(thw)}


def unpack_images(features: dict) -> tuple[dict, torch.Tensor | None, torch.Tensor | None]:
    """Batch features -> (the others, pixel_values (sum P_i, D), image_grid_thw (n_images, 3)) in text order."""
    rest = {k: v for k, v in features.items() if k not in IMAGE_KEYS}
    if "image_grid_thw" not in features:
        return rest, None, None
    grid, pv = features["image_grid_thw"], features["pixel_values"]
    real = grid[..., 0] > 0  # (T, K)
    if not bool(real.any()):
        return rest, None, None
    patches = (grid.prod(-1) * real).sum(1)  # (T,)
    flat = torch.cat([pv[i, : int(n)] for i, n in enumerate(patches.tolist()) if n])
    return rest, flat, grid[real]


def image_processor(path: str, min_pixels: int = 0, max_pixels: int = 0):
    """The folder's image processor (an adapter's: its base's, unless saved beside it), with the resize bounds
    `min_pixels` / `max_pixels` when set (0: the folder's)."""
    from transformers import AutoImageProcessor

    from embedtune.modelfolder import adapter_base, is_adapter

    own = os.path.isfile(os.path.join(path, "preprocessor_config.json"))
    bounds = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v}
    return AutoImageProcessor.from_pretrained(
        path if own or not is_adapter(path) else adapter_base(path), **bounds
    )


class ReadsImages:
    """What both image models share (`VisionEmbedder`, `VisionReranker`): the image processor's token count of
    an image, the expansion of each `<|image_pad|>` into its run, the pixel inputs of a forward pass, and the
    dummy image row. `_init_images` sets it up from the backbone's config."""

    def _init_images(self, config, processor, max_image_pixels: int) -> None:
        self.featurizer = ImageFeaturizer(processor, max_image_pixels)
        self.image_token_id = int(config.image_token_id)
        self.block_ids = (
            int(config.vision_start_token_id),
            self.image_token_id,
            int(config.vision_end_token_id),
        )
        self.merge = int(getattr(processor, "merge_size", 2))
        vision = config.vision_config
        self.patch_dim = int(vision.in_channels * vision.temporal_patch_size * vision.patch_size**2)

    def image_tokens(self, info: image_io.ImageInfo) -> int:
        """`<|image_pad|>` tokens of one image: its merged patches after the processor's resize."""
        patches = self.featurizer.processor.get_number_of_image_patches(info.height, info.width, {})
        return int(patches) // self.merge**2

    def _cut(self, content: list[int], over: int) -> tuple[list[int], int]:
        """`content` without up to `over` text tokens from its end (image blocks stay); what is still over."""
        block, keep = set(self.block_ids), []
        for t in reversed(content):
            if over and t not in block:
                over -= 1
                continue
            keep.append(t)
        return keep[::-1], over

    def _expand(self, ids: list[int], counts: list[int]) -> np.ndarray:
        """Each `<|image_pad|>` (one per image, in order) repeated its image's token count."""
        expanded, k = [], 0
        for t in ids:
            if t == self.image_token_id:
                expanded += [t] * counts[k]
                k += 1
            else:
                expanded.append(t)
        return np.asarray(expanded, dtype=np.int32)

    @contextlib.contextmanager
    def max_length_at(self, max_length: int):
        """`max_length` as the model's for the block (0: the model's own), restored after."""
        saved = self.max_length
        self.max_length = max_length or saved
        try:
            yield
        finally:
            self.max_length = saved

    def _too_many(self, counts: list[int]) -> EmbedtuneError:
        return EmbedtuneError(
            f"{sum(counts)} image tokens do not fit max_length {self.max_length} with the template; raise "
            "--max-length or lower --max-pixels"
        )

    def _vision_inputs(self, features: dict) -> tuple[dict, dict, bool]:
        """Batch features -> (ids and mask, the backbone's image kwargs, whether a dummy row was added last).

        A pass without images gets one dummy row with a tiny image while training or on several ranks, so that
        every rank runs (and ZeRO-3 gathers) the same modules in the same order as a pass with images."""
        rest, pixels, grid = unpack_images(features)
        dummy = pixels is None and (self.training or _world() > 1)
        if dummy:
            rest, pixels, grid = self._with_dummy_row(rest)
        if pixels is None:
            return rest, {}, False
        return rest, {"pixel_values": pixels.to(self.vision_dtype), "image_grid_thw": grid,
                      "mm_token_type_ids": (rest["input_ids"] == self.image_token_id).int()}, dummy  # fmt: skip

    def _with_dummy_row(self, rest: dict) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """`rest` plus a row `<|vision_start|><|image_pad|><|vision_end|>` (padding after), and its image: one
        merged patch of zeros."""
        ids, mask = rest["input_ids"], rest["attention_mask"]
        row = torch.full(
            (1, max(ids.shape[1], 3)), self.tokenizer.pad_token_id, dtype=ids.dtype, device=ids.device
        )
        row[0, :3] = torch.tensor(self.block_ids, device=ids.device)
        row_mask = torch.zeros_like(row)
        row_mask[0, :3] = 1
        width = row.shape[1]
        ids = F.pad(ids, (0, width - ids.shape[1]), value=self.tokenizer.pad_token_id)
        mask = F.pad(mask, (0, width - mask.shape[1]))
        grid = torch.tensor([[1, self.merge, self.merge]], device=ids.device)
        pixels = torch.zeros(self.merge**2, self.patch_dim, device=ids.device)
        return (
            {"input_ids": torch.cat([ids, row]), "attention_mask": torch.cat([mask, row_mask])},
            pixels,
            grid,
        )

    @property
    def vision_dtype(self) -> torch.dtype:
        return next(self.inner.get_input_embeddings().parameters()).dtype

    def _save_processor(self, out_dir, extra: dict) -> None:
        self.featurizer.processor.save_pretrained(out_dir)
        extra = {"vision_family": self.family, "max_image_pixels": self.featurizer.max_image_pixels, **extra}
        write_meta(out_dir, {**read_meta(out_dir), **extra})


class VisionEmbedder(ReadsImages, Embedder):
    """A Qwen2-VL / Qwen3-VL embedder: the family's template, last-token pooling, texts with images."""

    APPEND_EOS = False  # the template ends with <|endoftext|>

    def __init__(
        self,
        backbone,
        tokenizer,
        processor,
        family: str,
        query_instruction: str = "",
        max_length: int = 8192,
        max_image_pixels: int = image_io.MAX_IMAGE_PIXELS,
    ):
        super().__init__(backbone, tokenizer, "last", query_instruction, max_length)
        self.family = family
        self._init_images(backbone.config, processor, max_image_pixels)

    @classmethod
    def load(
        cls,
        path: str,
        query_instruction: str | None = None,
        max_length: int | None = None,
        trust_remote_code: bool = False,
        dtype: torch.dtype = torch.float32,
        attn_implementation: str | None = None,
        min_pixels: int = 0,
        max_pixels: int = 0,
        max_image_pixels: int = 0,
    ) -> VisionEmbedder:
        from transformers import AutoModel, AutoTokenizer

        meta = read_meta(path)
        family = vision_family(hf_config(path, trust_remote_code))
        processor = image_processor(path, min_pixels, max_pixels)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = "<|endoftext|>"
        backbone = _load_backbone(
            path, AutoModel, trust_remote_code, dtype, **_attention(attn_implementation)
        )
        no_kv_cache(backbone)
        if query_instruction is None:
            query_instruction = meta.get("query_instruction", "")
        return cls(
            backbone,
            tokenizer,
            processor,
            family,
            query_instruction,
            max_length or meta.get("max_length") or 8192,
            max_image_pixels or meta.get("max_image_pixels") or image_io.MAX_IMAGE_PIXELS,
        )

    # ------------------------------------------------------------------------------------------ tokens
    def texts(
        self,
        texts: Sequence[str],
        is_query: bool = False,
        instructions: Sequence[str | None] | None = None,
        images: Sequence[Sequence[image_io.ImageInfo]] | None = None,
    ) -> list[Text]:
        """Texts (each with its images, one per `<image>` tag) -> tokenized texts in the template, at most
        `max_length` tokens: over it the text is cut from the end of the user turn; image tokens are never cut
        (too many of them is an error naming the knobs)."""
        out = []
        for i, text in enumerate(texts):
            infos = tuple(images[i]) if images else ()
            own = instructions[i] if instructions else None
            system = own if own is not None else (self.query_instruction if is_query else "")
            system = system or FAMILIES[self.family]["system"]
            if text.count(IMAGE_TAG) != len(infos):
                raise EmbedtuneError(f"{len(infos)} images for {text.count(IMAGE_TAG)} {IMAGE_TAG} tags")
            prefix = PREFIX.format(system=system)
            ids = self.tokenizer(
                prefix + text.replace(IMAGE_TAG, IMAGE_BLOCK) + SUFFIX, add_special_tokens=False
            )
            ids = self._fit(list(ids["input_ids"]), prefix, [self.image_tokens(x) for x in infos])
            out.append({"input_ids": ids, "images": infos} if infos else ids)
        return out

    def _fit(self, ids: list[int], prefix: str, counts: list[int]) -> np.ndarray:
        head = len(self.tokenizer(prefix, add_special_tokens=False)["input_ids"])
        tail = len(self.tokenizer(SUFFIX, add_special_tokens=False)["input_ids"])
        content = ids[head : len(ids) - tail]
        need = head + tail + sum(counts) + len(content) - len(counts)  # each image's one pad becomes `count`
        if need > self.max_length:
            content, over = self._cut(content, need - self.max_length)  # from the end of the user turn
            if over:
                raise self._too_many(counts)
        return self._expand(ids[:head] + content + ids[len(ids) - tail :], counts)

    def tokenize(
        self, texts: Sequence[str], is_query: bool = False, padding: bool = True, max_length: int = 0
    ):
        """Text-only texts in the template (what evaluate and serve send): `{"input_ids", "attention_mask"}`."""
        with self.max_length_at(max_length):
            seqs = self.texts(texts, is_query)
        if not padding:
            return {"input_ids": [s.tolist() for s in seqs]}
        return pad(seqs, self.tokenizer.pad_token_id)

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Batch features (ids, mask and the pixel tensors of `IMAGE_KEYS`) -> (B, H) unit-norm embeddings."""
        rest, extra, dummy = self._vision_inputs(features)
        hidden = self.backbone(**rest, **extra).last_hidden_state
        out = pool(hidden, rest["attention_mask"], "last").float()
        if dummy:  # dropped, kept in the graph (0 x): an unfrozen tower gets a zero gradient
            out = out[:-1] + 0.0 * out[-1].sum()
        return F.normalize(out, p=2, dim=-1)

    # ------------------------------------------------------------------------------------------ saving
    def save_pretrained(self, out_dir, meta: dict | None = None, state_dict=None) -> None:
        super().save_pretrained(out_dir, meta, state_dict)
        self._save_processor(out_dir, {"template": PREFIX + "{content}" + SUFFIX,
                                       "document_system": FAMILIES[self.family]["system"]})  # fmt: skip

    @torch.inference_mode()
    def encode_items(
        self, texts: Sequence[str], images: Sequence[Sequence[str]] | None = None, is_query: bool = False,
        batch_size: int = 8,
    ) -> np.ndarray:  # fmt: skip
        """(N,) texts with their image entries (resolved paths or URIs, one per `<image>` tag) -> (N, H)."""
        was = self.training
        self.eval()
        infos = [[image_io.probe(r, self.featurizer.max_image_pixels) for r in refs] for refs in images or []]
        seqs = self.texts(texts, is_query, images=infos or None)
        device = next(self.parameters()).device
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(seqs), batch_size):
            chunk = seqs[start : start + batch_size]
            batch = pad(chunk, self.tokenizer.pad_token_id, pixels=self.featurizer)
            out[start : start + len(chunk)] = self({k: v.to(device) for k, v in batch.items()}).cpu().numpy()
        self.train(was)
        return out

    @property
    def dim(self) -> int:
        config = self.backbone.config
        return int(getattr(config, "text_config", config).hidden_size)


RERANK_INSTRUCTION = "Given a search query, retrieve relevant candidates that answer the query."
RERANK_HEAD = (
    f"<|im_start|>system\n{RERANKER_SYSTEM}<|im_end|>\n<|im_start|>user\n<Instruct>: {{instruction}}<Query>:"
)
RERANK_MIDDLE = "\n<Document>:"
RERANK_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"


class VisionReranker(ReadsImages, Reranker):
    """A Qwen2-VL / Qwen3-VL generative reranker in the Qwen3-VL-Reranker prompt (the official
    `qwen3_vl_reranker.py`, ms-swift's `qwen3_vl_reranker` template); z = logit(yes) - logit(no) read at the
    prompt's last token, the assistant turn's header (no thinking block, unlike the text Qwen3-Reranker)::

        <|im_start|>system\n{RERANKER_SYSTEM}<|im_end|>\n<|im_start|>user\n<Instruct>: {instruction}<Query>:{query}
        <Document>:{document}<|im_end|>\n<|im_start|>assistant\n

    The query and the document may each hold images (`<image>` tags where the row puts them; the official
    script puts a side's images before its text). A pair is one text whose images are the query's, then the
    document's. Over `max_length` the document's words are cut first, then the query's; image tokens never."""

    def __init__(
        self, lm, tokenizer, processor, family: str, instruction: str = RERANK_INSTRUCTION, max_length: int = 8192,
        positive_token: str = "yes", negative_token: str = "no", max_image_pixels: int = image_io.MAX_IMAGE_PIXELS,
    ):  # fmt: skip
        super().__init__(lm, tokenizer, instruction, max_length, positive_token, negative_token)
        self.family = family
        self._init_images(lm.config, processor, max_image_pixels)

    @classmethod
    def load(
        cls, path: str, instruction: str | None = None, max_length: int | None = None, positive_token: str | None = None,
        negative_token: str | None = None, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32,
        attn_implementation: str | None = None, min_pixels: int = 0, max_pixels: int = 0, max_image_pixels: int = 0,
    ) -> VisionReranker:  # fmt: skip
        """A Qwen2-VL / Qwen3-VL folder (full or adapter) with its LM head; unset arguments from embedtune.json."""
        from transformers import AutoModelForImageTextToText, AutoTokenizer

        meta = read_meta(path)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = "<|endoftext|>"
        lm = _load_backbone(path, AutoModelForImageTextToText, trust_remote_code, dtype,
                            **_attention(attn_implementation))  # fmt: skip
        return cls(
            lm, tokenizer, image_processor(path, min_pixels, max_pixels),
            vision_family(hf_config(path, trust_remote_code)),
            instruction or meta.get("reranker_instruction") or RERANK_INSTRUCTION,
            max_length or meta.get("max_length") or 8192,
            positive_token or meta.get("positive_token") or "yes", negative_token or meta.get("negative_token") or "no",
            max_image_pixels or meta.get("max_image_pixels") or image_io.MAX_IMAGE_PIXELS,
        )  # fmt: skip

    def pairs(
        self, queries: Sequence[str], docs: Sequence[str],
        query_images: Sequence[Sequence[image_io.ImageInfo]] | None = None,
        doc_images: Sequence[Sequence[image_io.ImageInfo]] | None = None,
    ) -> list[Text]:  # fmt: skip
        """(query, document) pairs, each side with its images (one per `<image>` tag) -> tokenized prompts."""
        head = RERANK_HEAD.format(instruction=self.instruction)

        def ids(text: str) -> list[int]:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

        out = []
        for i, (q, d) in enumerate(zip(queries, docs, strict=True)):
            qi = tuple(query_images[i]) if query_images else ()
            di = tuple(doc_images[i]) if doc_images else ()
            for text, infos in ((q, qi), (d, di)):
                if text.count(IMAGE_TAG) != len(infos):
                    raise EmbedtuneError(f"{len(infos)} images for {text.count(IMAGE_TAG)} {IMAGE_TAG} tags")
            q, d = q.replace(IMAGE_TAG, IMAGE_BLOCK), d.replace(IMAGE_TAG, IMAGE_BLOCK)
            counts = [self.image_tokens(x) for x in qi + di]
            whole = ids(head + q + RERANK_MIDDLE + d + RERANK_SUFFIX)  # one string: the official tokenization
            if len(whole) + sum(counts) - len(counts) > self.max_length:  # cut by pieces: the document first
                parts = [ids(head), ids(q), ids(RERANK_MIDDLE), ids(d), ids(RERANK_SUFFIX)]
                over = sum(map(len, parts)) + sum(counts) - len(counts) - self.max_length
                parts[3], over = self._cut(parts[3], over)
                parts[1], over = self._cut(parts[1], over)
                if over:
                    raise self._too_many(counts)
                whole = [t for part in parts for t in part]
            seq = self._expand(whole, counts)
            out.append({"input_ids": seq, "images": qi + di} if counts else seq)
        return out

    def tokenize(
        self, queries: Sequence[str], docs: Sequence[str], padding: bool = True, max_length: int = 0
    ):
        """Text-only pairs in the prompt (what score, evaluate and serve send without images)."""
        with self.max_length_at(max_length):
            seqs = self.pairs(queries, docs)
        return (
            pad(seqs, self.tokenizer.pad_token_id) if padding else {"input_ids": [s.tolist() for s in seqs]}
        )

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Batch features (ids, mask and the pixel tensors of `IMAGE_KEYS`) -> (B,) z in fp32."""
        rest, extra, dummy = self._vision_inputs(features)
        hidden = self.base_lm.model(**rest, **extra).last_hidden_state  # the backbone: the head reads one row
        z = self.yes_no(pool(hidden, rest["attention_mask"], "last"))
        return z[:-1] + 0.0 * z[-1] if dummy else z  # the dummy row dropped, kept in the graph

    @torch.inference_mode()
    def logits(
        self, queries: Sequence[str], docs: Sequence[str], batch_size: int = 16, show_progress: bool = False,
        query_images: Sequence[Sequence[str]] | None = None, doc_images: Sequence[Sequence[str]] | None = None,
    ) -> np.ndarray:  # fmt: skip
        """(N,) float64 z per pair; `query_images` / `doc_images`: each side's image entries (resolved paths or
        URIs), each image read once per call."""
        was = self.training
        self.eval()
        seen: dict[str, image_io.ImageInfo] = {}

        def infos(sides):
            if not sides:
                return None
            return [[seen.get(r) or seen.setdefault(r, image_io.probe(r, self.featurizer.max_image_pixels))
                     for r in refs] for refs in sides]  # fmt: skip

        seqs = self.pairs(queries, docs, infos(query_images), infos(doc_images))
        device = next(self.parameters()).device
        out = np.zeros(len(seqs), dtype=np.float64)
        for idx in _progress(
            _batches_by_length([len(ids_of(s)) for s in seqs], batch_size), show_progress, "score"
        ):
            batch = pad([seqs[i] for i in idx], self.tokenizer.pad_token_id, pixels=self.featurizer)
            out[idx] = self({k: v.to(device) for k, v in batch.items()}).double().cpu().numpy()
        self.train(was)
        return out

    def save_pretrained(self, out_dir, meta: dict | None = None, state_dict=None) -> None:
        super().save_pretrained(out_dir, meta, state_dict)
        self._save_processor(out_dir, {"reranker_template": RERANK_HEAD + "{query}" + RERANK_MIDDLE + "{document}"
                                       + RERANK_SUFFIX})  # fmt: skip


def reads_images(path: str, trust_remote_code: bool = False) -> bool:
    """Whether the model folder or hub id is a Qwen2-VL / Qwen3-VL one (reads images), from its config (one
    that cannot be read: False here; loading it says why)."""
    try:
        return bool(vision_family(hf_config(path, trust_remote_code)))
    except (OSError, ValueError):
        return False


def _world() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


assert set(FAMILIES) == set(VISION_FAMILIES)
__all__ = ["FAMILIES", "ImageFeaturizer", "VisionEmbedder", "VisionReranker", "vision_family"]


VISION_MODULES = (
    r"(.*\.)?visual(\..*)?"  # the vision tower and its merger, by module name (PEFT's exclude_modules)
)


def freeze_vision(model, freeze: bool, lora: bool) -> str | None:
    """A model that reads images (`VisionEmbedder`, `VisionReranker`) with `freeze`: full training freezes its vision tower here; LoRA gets the module
    pattern to leave without adapters (returned; PEFT freezes every base weight itself). Others: no-op."""
    if not freeze or not isinstance(model, ReadsImages):
        return None
    if lora:
        return VISION_MODULES
    for name, module in model.inner.named_modules():
        if name.rsplit(".", 1)[-1] == "visual":
            module.requires_grad_(False)
    return None


def vision_knobs(cfg) -> dict:
    """A config's image-processor knobs, as `Embedder.from_pretrained(vision=...)` takes them."""
    return {
        "min_pixels": cfg.min_pixels or 0,  # None: the env default unresolved (0: the folder's)
        "max_pixels": cfg.max_pixels or 0,
        "max_image_pixels": cfg.max_image_pixels,
    }
