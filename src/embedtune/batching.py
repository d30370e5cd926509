"""From canonical rows to the tensors of one training step: tokenize once, batch by length, pad, collate.

1. `tokenize_rows(model, rows)`: the token ids of every text, once, unpadded (int32 arrays; each distinct
   text is tokenized once), plus a `length` per row and, for embedders, a stable key per text (`text_key`).
2. `LengthGroupedSampler`: a random order in which each batch holds rows of similar length (so padding to
   the batch's longest text is cheap), optionally duplicate-free (no text twice in one global batch).
3. `Collator(loss_type, pad_id)`: the features of B rows -> one padded batch holding every text the loss
   needs, encoded in one forward pass (`pad`: right padding to the batch's own longest text).

What a batch holds per loss (T texts, padded to L tokens):

====================  =====================================================  ==============================
loss_type             texts, in order                                        extra tensors
====================  =====================================================  ==============================
infonce               B queries, B positives, K real hard negatives          neg_mask (B, N), doc_keys
                      (row-major; ragged rows padded by `pad_negatives`)     (B + K, 2)
cosine_similarity,    B queries, B responses                                 targets (B,) labels
(online_)contrastive
pointwise_reranker    one prompt per (query, document): positive first       targets (T,) 1/label or 0
listwise_reranker     per row the group [positive, negatives...]             group_sizes (B,)
====================  =====================================================  ==============================
"""

from __future__ import annotations

import dataclasses
import hashlib
import random

import numpy as np
import torch

from embedtune.data import RERANKER_LOSSES
from embedtune.losses import pad_negatives
from embedtune.modeling import Embedder, Reranker


def text_key(ids: np.ndarray) -> int:
    """A stable 63-bit key of a text's (truncated) token ids: equal ids, equal key, on every rank (unlike
    `hash`). Texts that differ only past `max_length` are the same text to the model, and get the same key."""
    return int.from_bytes(hashlib.blake2b(ids.tobytes(), digest_size=8).digest(), "little") >> 1


def tokenize_rows(model: Embedder | Reranker, rows: list[dict]) -> list[dict]:
    """Token ids of every text, once, unpadded (int32 arrays); each distinct text is tokenized once.

    Embedding features: `query`, `response` (arrays), `negatives` (list of arrays), `label`, `length`.
    Reranker features: `pairs` (one prompt per [positive, negatives...]), `targets`, `length`.
    `length` (the longest text of the row) drives length-grouped batching.
    """
    if not rows:
        return []

    def ids(texts, **kw) -> dict:
        texts = list(dict.fromkeys(texts))
        out = {}
        for i in range(0, len(texts), 4096):  # chunks bound the tokenizer's memory on big files
            chunk = texts[i : i + 4096]
            enc = model.tokenize(chunk, padding=False, **kw)["input_ids"]
            out.update(zip(chunk, (np.asarray(e, dtype=np.int32) for e in enc), strict=True))
        return out

    feats = []
    if isinstance(model, Embedder):
        q = ids([r["query"] for r in rows], is_query=True)
        d = ids([t for r in rows for t in [r["response"], *r.get("rejected_response", [])]])
        q_keys = {t: text_key(a) for t, a in q.items()}
        d_keys = {t: text_key(a) for t, a in d.items()}
        for i, r in enumerate(rows):
            negs = [d[t] for t in r.get("rejected_response", [])]
            texts = [q[r["query"]], d[r["response"]], *negs]
            feats.append(
                {
                    "idx": i,
                    "query": texts[0],
                    "response": texts[1],
                    "negatives": negs,
                    "label": float(r.get("label", 1.0)),
                    "length": max(len(t) for t in texts),
                    # (query, positive, *negatives): duplicate-free batches and the loss's false-negative mask
                    "text_keys": (
                        q_keys[r["query"]],
                        d_keys[r["response"]],
                        *(d_keys[t] for t in r.get("rejected_response", [])),
                    ),
                }
            )
        return feats
    # Reranker: one prompt per (query, document); the positive first, its label (default 1), negatives 0.
    docs = [[r["response"], *r.get("rejected_response", [])] for r in rows]
    queries = [r["query"] for r, ds in zip(rows, docs, strict=True) for _ in ds]
    flat = [t for ds in docs for t in ds]
    prompts = []
    for i in range(0, len(flat), 4096):
        enc = model.tokenize(queries[i : i + 4096], flat[i : i + 4096], padding=False)["input_ids"]
        prompts += [np.asarray(e, dtype=np.int32) for e in enc]
    start = 0
    for i, (r, ds) in enumerate(zip(rows, docs, strict=True)):
        pairs = prompts[start : start + len(ds)]
        start += len(ds)
        targets = [float(r.get("label", 1.0))] + [0.0] * (len(ds) - 1)
        feats.append({"idx": i, "pairs": pairs, "targets": targets, "length": max(len(p) for p in pairs)})
    return feats


def pad(seqs: list[np.ndarray], pad_id: int, multiple: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(T,) ragged id arrays -> (T, L) ids and mask, L = the longest of *this* batch (right padding),
    rounded up to a multiple of `multiple` when > 1 (fewer distinct shapes for compiled kernels)."""
    longest = max(len(s) for s in seqs)
    if multiple > 1:
        longest = -(-longest // multiple) * multiple
    ids = np.full((len(seqs), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), longest), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


@dataclasses.dataclass
class Collator:
    """Features of B rows -> one padded tensor batch holding every text of the batch (one forward pass)."""

    loss_type: str
    pad_id: int
    hard_negatives: int | None = None
    seed: int = 42
    pad_to_multiple_of: int = 0

    def __call__(self, feats: list[dict]) -> dict:
        if self.loss_type == "infonce":
            # Resampling (hard_negatives > row's count) is seeded by the batch's rows: the same batch draws
            # the same negatives, also after a resume.
            rng = random.Random(f"{self.seed}:{[f['idx'] for f in feats]}")
            rows = [list(zip(f["negatives"], f["text_keys"][2:], strict=True)) for f in feats]
            negs, neg_mask = pad_negatives(rows, self.hard_negatives or None, rng)
            real = [t for row in negs for t in row if t is not None]  # row-major, as pack_negatives expects
            texts = [f["query"] for f in feats] + [f["response"] for f in feats] + [ids for ids, _ in real]
            ids, mask = pad(texts, self.pad_id, self.pad_to_multiple_of)
            # per document (B positives, K negatives): its text key, and its row's query key if a positive
            doc_keys = [(f["text_keys"][1], f["text_keys"][0]) for f in feats] + [(k, -1) for _, k in real]
            return {
                "input_ids": ids,  # texts: B + B + K
                "attention_mask": mask,
                "neg_mask": neg_mask,
                "doc_keys": torch.tensor(doc_keys, dtype=torch.long).reshape(-1, 2),
            }
        if self.loss_type in RERANKER_LOSSES:
            ids, mask = pad(
                [p for f in feats for p in f["pairs"]], self.pad_id, self.pad_to_multiple_of
            )  # texts: sum of group sizes
            batch = {"input_ids": ids, "attention_mask": mask}
            if self.loss_type == "pointwise_reranker":
                batch["targets"] = torch.tensor([t for f in feats for t in f["targets"]], dtype=torch.float32)
            else:
                batch["group_sizes"] = torch.tensor([len(f["pairs"]) for f in feats], dtype=torch.long)
            return batch
        # pair losses: B queries then B responses, a float label per pair
        ids, mask = pad(
            [f["query"] for f in feats] + [f["response"] for f in feats], self.pad_id, self.pad_to_multiple_of
        )
        targets = torch.tensor([f["label"] for f in feats], dtype=torch.float32)
        return {"input_ids": ids, "attention_mask": mask, "targets": targets}


class LengthGroupedSampler(torch.utils.data.Sampler):
    """Random order, but each batch holds rows of similar length, so padding to the batch's longest is cheap.

    Indices are shuffled, cut into mega-batches of 50 batches, each sorted by length and cut into batches; the
    batches are then shuffled (short batches stay last, so every full batch stays aligned). The order depends
    only on (seed, epoch): every rank computes the same one (accelerate shards it by batch), and a resumed run
    replays it exactly.

    `keys` (per row, the keys of its texts) makes batches duplicate-free, like sentence-transformers'
    `no_duplicates` sampler: a row sharing a text with the batch being filled waits for a later batch. For
    infonce this matters more with length grouping than without it: identical texts have identical lengths, so
    sorting puts them side by side, and the copy becomes an in-batch "negative" of its own positive.
    """

    def __init__(
        self,
        lengths: list[int],
        batch_size: int,
        seed: int,
        mega: int = 50,
        keys: list[tuple[int, ...]] | None = None,
        group: bool = True,
    ):
        self.lengths, self.batch_size, self.seed, self.mega, self.epoch = lengths, batch_size, seed, mega, 0
        self.keys, self.group = keys, group

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def _cut(self, rows: list[int]) -> tuple[list[list[int]], list[int]]:
        """Full batches from length-sorted rows, and the rows left over (fewer than a batch, or clashing)."""
        if self.keys is None:
            n = len(rows) - len(rows) % self.batch_size
            return [rows[j : j + self.batch_size] for j in range(0, n, self.batch_size)], rows[n:]
        batches = []
        while len(rows) >= self.batch_size:
            batch, seen, rest = [], set(), []
            for i in rows:  # greedy in length order: the batch stays length-grouped
                if len(batch) < self.batch_size and seen.isdisjoint(self.keys[i]):
                    batch.append(i)
                    seen.update(self.keys[i])
                else:
                    rest.append(i)
            if len(batch) < self.batch_size:  # only clashing rows are left
                return batches, rows
            batches.append(batch)
            rows = rest
        return batches, rows

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        size = self.batch_size * self.mega
        batches, left = [], []
        for i in range(0, len(order), size):
            chunk = left + order[i : i + size]
            if self.group:
                chunk.sort(key=self.lengths.__getitem__, reverse=True)
            full, left = self._cut(chunk)
            batches += full
        shuffled = [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]
        return iter([i for b in shuffled for i in b] + left)
