"""Model inputs as a dict of tensors (sentence-transformers' `features`): what every forward pass takes.

`Features = dict[str, Tensor]`, every tensor with one row per text on its first dimension (T texts):

    {"input_ids": (T, L) int64, "attention_mask": (T, L) int64}        # text, right-padded to L

The sequence tensors are those shaped like `attention_mask` on their first two dimensions (`input_ids`,
`attention_mask`, and any `position_ids` / `token_type_ids` a collator adds); any other tensor rides along
whole per row, as the images' tensors do (`IMAGE_KEYS`, laid out one row per text by `embedtune.vision`:
`pixel_values` (T, P, D), `image_grid_thw` (T, K, 3), never cut as sequences). A model that runs
padding-free packs the texts it is given into one row at its forward pass (`pack`): batches, chunks and buckets
stay one row per text. Code that batches,
chunks or buckets texts (`batching`, `gradcache`, `speed`) only ever takes rows (`take`) and cuts padding
columns (`cut`, `trim`) through the helpers here, so a new key needs no new signature anywhere: the model's
`forward(features)` is the one place that reads the keys.
"""

from __future__ import annotations

import numpy as np
import torch

Features = dict[str, torch.Tensor]
IMAGE_KEYS = ("pixel_values", "image_grid_thw")  # per-text image tensors (`embedtune.vision`), not sequences


def count(features: Features) -> int:
    """T, the number of texts."""
    return len(features["attention_mask"])


def lengths(features: Features) -> torch.Tensor:
    """(T,) real tokens per text."""
    return features["attention_mask"].sum(1)


def take(features: Features, rows) -> Features:
    """The texts `rows` (a slice, an index tensor or list) of every tensor."""
    return {k: v[rows] for k, v in features.items()}


def _is_sequence(key: str, value: torch.Tensor, mask: torch.Tensor) -> bool:
    return key not in IMAGE_KEYS and value.dim() >= 2 and value.shape[:2] == mask.shape


def cut(features: Features, width: int) -> Features:
    """Every sequence tensor cut to its first `width` columns (the others unchanged)."""
    mask = features["attention_mask"]
    return {k: v[:, :width] if _is_sequence(k, v, mask) else v for k, v in features.items()}


def trim(features: Features) -> Features:
    """Drop the columns that are padding in every text: a chunk of shorter texts (the queries, say) of a batch
    padded to its longest text need not carry that padding through the model. Padding is masked, so the
    outputs do not change (beyond float rounding)."""
    width = int(features["attention_mask"].any(0).nonzero().max()) + 1
    out = cut(features, width)
    if "image_grid_thw" in out:  # and the patch rows no text of the chunk fills
        patches = int((out["image_grid_thw"].prod(-1)).sum(1).max())
        out["pixel_values"] = out["pixel_values"][:, : max(patches, 1)]
    return out


def pack(features: Features) -> Features:
    """Padding-free: the real tokens of every text in one row, `(1, N)` for N real tokens, with `position_ids`
    restarting at 0 for each text and no attention mask: transformers' decoders then build a block-diagonal causal
    mask from the positions (sdpa, flex; flash-attention 2 takes them as varlen boundaries), so each text attends
    only to itself, as when padded. Either padding side. `unpack_*` read the outputs back per text."""
    mask = features["attention_mask"].bool()
    out = {
        k: v[mask].unsqueeze(0)
        for k, v in features.items()
        if k != "attention_mask" and _is_sequence(k, v, mask)
    }
    out["position_ids"] = (mask.long().cumsum(1) - 1)[mask].unsqueeze(0)
    return out


def segments(features: Features) -> tuple[torch.Tensor, torch.Tensor]:
    """(T,) start of each text's tokens in the packed row, and (T,) its length."""
    n = lengths(features)
    return n.cumsum(0) - n, n


def round_up(n: int, multiple: int) -> int:
    """`n` rounded up to a multiple of `multiple` (unchanged when `multiple` <= 1)."""
    return n if multiple <= 1 else -(-n // multiple) * multiple


# A tokenized text, unpadded: its token ids, or a dict of per-token arrays of one length (`input_ids` and, for
# a text pair through a BERT-style tokenizer, `token_type_ids`), plus, for a text with images, `images`: its
# `embedtune.images.ImageInfo`s (read when the batch is padded, by `pad`'s `pixels`).
Text = np.ndarray | dict[str, np.ndarray]


def ids_of(text: Text) -> np.ndarray:
    return text["input_ids"] if isinstance(text, dict) else text


def images_of(text: Text) -> tuple:
    """A tokenized text's `ImageInfo`s (empty for a text without images)."""
    return text.get("images", ()) if isinstance(text, dict) else ()


def texts_of(encoding: dict) -> list[Text]:
    """A tokenizer's unpadded batch output -> one `Text` per text (ids, plus token types when it has them)."""
    ids = encoding["input_ids"]
    if "token_type_ids" not in encoding:
        return [np.asarray(x, dtype=np.int32) for x in ids]
    return [
        {"input_ids": np.asarray(x, dtype=np.int32), "token_type_ids": np.asarray(t, dtype=np.int32)}
        for x, t in zip(ids, encoding["token_type_ids"], strict=True)
    ]


def pad(seqs: list[Text], pad_id: int, multiple: int = 0, pixels=None) -> Features:
    """(T,) ragged tokenized texts -> `{"input_ids", "attention_mask", ...}` (T, L), L = the longest of *this*
    batch (right padding; other per-token arrays such as `token_type_ids` padded with 0), rounded up to a
    multiple of `multiple` when > 1 (fewer distinct shapes for compiled kernels). Texts with `images` need
    `pixels` (`vision.ImageFeaturizer`: texts -> their `IMAGE_KEYS` tensors), which reads them now."""
    longest = round_up(max(len(ids_of(s)) for s in seqs), multiple)
    ids = np.full((len(seqs), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), longest), dtype=np.int64)
    with_images = any(isinstance(s, dict) and "images" in s for s in seqs)
    if with_images and pixels is None:
        raise ValueError("texts with images need `pixels` to be padded")
    per_token = [k for k in seqs[0] if k not in ("input_ids", "images")] if isinstance(seqs[0], dict) else []
    extra = {k: np.zeros((len(seqs), longest), dtype=np.int64) for k in per_token}
    for i, s in enumerate(seqs):
        n = len(ids_of(s))
        ids[i, :n] = ids_of(s)
        mask[i, :n] = 1
        for k, array in extra.items():
            array[i, :n] = s[k]
    out = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    out.update({k: torch.from_numpy(v) for k, v in extra.items()})
    return {**out, **pixels(seqs)} if with_images else out
