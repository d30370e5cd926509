"""Model inputs as a dict of tensors (sentence-transformers' `features`): what every forward pass takes.

`Features = dict[str, Tensor]`, every tensor with one row per text on its first dimension (T texts):

    {"input_ids": (T, L) int64, "attention_mask": (T, L) int64}        # text, right-padded to L

The sequence tensors are those shaped like `attention_mask` on their first two dimensions (`input_ids`,
`attention_mask`, and any `position_ids` / `token_type_ids` a collator adds); any other tensor rides along
whole per row (a future image's `pixel_values` must then be laid out one row per text). Code that batches,
chunks or buckets texts (`batching`, `gradcache`, `speed`) only ever takes rows (`take`) and cuts padding
columns (`cut`, `trim`) through the helpers here, so a new key needs no new signature anywhere: the model's
`forward(features)` is the one place that reads the keys.
"""

from __future__ import annotations

import numpy as np
import torch

Features = dict[str, torch.Tensor]


def count(features: Features) -> int:
    """T, the number of texts."""
    return len(features["attention_mask"])


def lengths(features: Features) -> torch.Tensor:
    """(T,) real tokens per text."""
    return features["attention_mask"].sum(1)


def take(features: Features, rows) -> Features:
    """The texts `rows` (a slice, an index tensor or list) of every tensor."""
    return {k: v[rows] for k, v in features.items()}


def _is_sequence(value: torch.Tensor, mask: torch.Tensor) -> bool:
    return value.dim() >= 2 and value.shape[:2] == mask.shape


def cut(features: Features, width: int) -> Features:
    """Every sequence tensor cut to its first `width` columns (the others unchanged)."""
    mask = features["attention_mask"]
    return {k: v[:, :width] if _is_sequence(v, mask) else v for k, v in features.items()}


def trim(features: Features) -> Features:
    """Drop the columns that are padding in every text: a chunk of shorter texts (the queries, say) of a batch
    padded to its longest text need not carry that padding through the model. Padding is masked, so the
    outputs do not change (beyond float rounding)."""
    width = int(features["attention_mask"].any(0).nonzero().max()) + 1
    return cut(features, width)


def round_up(n: int, multiple: int) -> int:
    """`n` rounded up to a multiple of `multiple` (unchanged when `multiple` <= 1)."""
    return n if multiple <= 1 else -(-n // multiple) * multiple


def pad(seqs: list[np.ndarray], pad_id: int, multiple: int = 0) -> Features:
    """(T,) ragged token id arrays -> `{"input_ids", "attention_mask"}` (T, L), L = the longest of *this*
    batch (right padding), rounded up to a multiple of `multiple` when > 1 (fewer distinct shapes for
    compiled kernels)."""
    longest = round_up(max(len(s) for s in seqs), multiple)
    ids = np.full((len(seqs), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), longest), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
