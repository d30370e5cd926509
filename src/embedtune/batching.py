"""From canonical rows to the tensors of one training step: tokenize once, batch by length, pad, collate.

1. `tokenize_rows(model, rows)`: the token ids of every text, once, unpadded (int32 arrays; each distinct
   text is tokenized once), plus a `length` per row and, for embedders, a stable key per text (`text_key`).
2. `LengthGroupedSampler`: a random order in which each batch holds rows of similar length (so padding to
   the batch's longest text is cheap), optionally duplicate-free (no text twice in one global batch).
3. `Collator(objective, pad_id)`: the features of B rows -> one batch: `{"features": <model inputs of every
   text the loss needs, encoded in one forward pass>, <the loss's extra tensors>}` (`embedtune.features`:
   right padding to the batch's own longest text).

The objective's `layout` (`LAYOUTS`) says which texts a batch encodes, in which order, and how their encoded
outputs (T texts -> (T, H) embeddings or (T,) reranker scores) are handed to the loss function:

=============  ==================================================  ===================================
layout         texts, in order                                     extra tensors -> loss arguments
=============  ==================================================  ===================================
query_docs     B queries, B positives, K real hard negatives        neg_mask (B, N), doc_keys (B + K, 2)
               (row-major; ragged rows padded by `pad_negatives`)   -> (q, pos, neg, neg_mask, doc_keys=,
                                                                    world_size=, rank=)
text_pairs     B queries, B responses                               targets (B,) labels -> (a, b, labels)
prompts        one prompt per (query, document): positive first     targets (T,) 1/label or 0 -> (z, labels)
prompt_groups  per row the group [positive, negatives...]           group_sizes (B,) -> (z, group_sizes)
scored_docs    as query_docs (rows carry teacher_scores)            as query_docs + teacher (B, 1 + N):
                                                                    -> (q, pos, neg, neg_mask, teacher, ...)
scored_groups  as prompt_groups (rows carry teacher_scores)         group_sizes, teacher (M,)
                                                                    -> (z, group_sizes, teacher)
=============  ==================================================  ===================================
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Callable

import torch

from embedtune.data import row_texts
from embedtune.distributed import world_and_rank
from embedtune.errors import EmbedtuneError
from embedtune.features import Text, ids_of, images_of, pad, texts_of
from embedtune.images import infos_by_text
from embedtune.losses import pack_negatives, pad_negatives
from embedtune.modeling import Embedder, Reranker
from embedtune.objectives import Objective
from embedtune.sources import query_instruction, source_of


def text_key(text: Text) -> int:
    """A stable 63-bit key of a tokenized text's (truncated) token ids and its images' content hashes: equal
    ids and equal image bytes, equal key, on every rank (unlike `hash`). Texts that differ only past
    `max_length` are the same text to the model, and get the same key; the same image under two paths too."""
    h = hashlib.blake2b(ids_of(text).tobytes(), digest_size=8)
    for info in images_of(text):
        h.update(bytes.fromhex(info.sha256))
    return int.from_bytes(h.digest(), "little") >> 1


def tokenize_rows(model: Embedder | Reranker, rows: list[dict], by_source: dict | None = None) -> list[dict]:
    """Token ids of every text, once, unpadded (int32 arrays); each distinct text is tokenized once.

    An embedder's query gets the row's own `instruction`, else its source's (`by_source`, from
    `source_instructions`), else the model's `query_instruction` (`sources.query_instruction`).

    Embedding features: `query`, `response` (arrays), `negatives` (list of arrays), `label`, `length`.
    Reranker features: `pairs` (one prompt per [positive, negatives...]), `targets`, `length`.
    `length` (the longest text of the row) drives length-grouped batching.
    """
    if not rows:
        return []

    def tokenized(items, is_query: bool = False) -> dict:
        """(text, own instruction or None, images) items -> their tokenized texts, each distinct item once."""
        items = list(dict.fromkeys(items))
        out = {}
        for i in range(0, len(items), 4096):  # chunks bound the tokenizer's memory on big files
            chunk = items[i : i + 4096]
            texts, own, imgs = zip(*chunk, strict=True)
            enc = model.texts(texts, is_query, instructions=own, images=imgs if any(imgs) else None)
            out.update(zip(chunk, enc, strict=True))
        return out

    feats = []
    if isinstance(model, Embedder):
        by_source = by_source or {}
        # a query with its own instruction is tokenized with that one (no model instruction): keyed apart
        per_text = [infos_by_text(r) for r in rows]  # (query, response, *negatives) images of each row
        items = [
            [(r["query"], query_instruction(r, by_source), tuple(p[0]))]
            + [(t, None, tuple(x)) for t, x in zip(row_texts(r)[1:], p[1:], strict=True)]
            for r, p in zip(rows, per_text, strict=True)
        ]
        q = tokenized([it[0] for it in items], is_query=True)
        d = tokenized([x for it in items for x in it[1:]])
        q_keys = {k: text_key(a) for k, a in q.items()}
        d_keys = {k: text_key(a) for k, a in d.items()}
        for i, (r, it) in enumerate(zip(rows, items, strict=True)):
            texts = [q[it[0]], *(d[x] for x in it[1:])]
            feats.append(
                {
                    "idx": i,
                    "query": texts[0],
                    "response": texts[1],
                    "negatives": texts[2:],
                    "label": float(r.get("label", 1.0)),
                    "teacher": r.get("teacher_scores"),  # [positive, *negatives] or None
                    "source": source_of(r),
                    "length": max(len(ids_of(t)) for t in texts),
                    # (query, positive, *negatives): duplicate-free batches and the loss's false-negative mask
                    "text_keys": (q_keys[it[0]], *(d_keys[x] for x in it[1:])),
                }
            )
        return feats
    # Reranker: one prompt per (query, document); the positive first, its label (default 1), negatives 0.
    docs = [[r["response"], *r.get("rejected_response", [])] for r in rows]
    queries = [r["query"] for r, ds in zip(rows, docs, strict=True) for _ in ds]
    flat = [t for ds in docs for t in ds]

    def prompts_of(i: int, n: int) -> list:  # one tokenized text per pair (with token types: a cross-encoder)
        return texts_of(model.tokenize(queries[i : i + n], flat[i : i + n], padding=False))

    if any(r.get("images") for r in rows):  # a Qwen2-VL / Qwen3-VL reranker: each pair with its sides' images
        if not hasattr(model, "pairs"):
            raise EmbedtuneError(
                "rows with `images`: this reranker reads no images (a Qwen2-VL / Qwen3-VL one does)"
            )
        per_text = [infos_by_text(r) for r in rows]
        q_imgs = [p[0] for p, ds in zip(per_text, docs, strict=True) for _ in ds]
        d_imgs = [x for p in per_text for x in p[1:]]

        def prompts_of(i: int, n: int) -> list:
            return model.pairs(queries[i : i + n], flat[i : i + n], q_imgs[i : i + n], d_imgs[i : i + n])

    prompts = [t for i in range(0, len(flat), 4096) for t in prompts_of(i, 4096)]
    start = 0
    for i, (r, ds) in enumerate(zip(rows, docs, strict=True)):
        pairs = prompts[start : start + len(ds)]
        start += len(ds)
        targets = [float(r.get("label", 1.0))] + [0.0] * (len(ds) - 1)
        feats.append(
            {
                "idx": i,
                "pairs": pairs,
                "targets": targets,
                "teacher": r.get("teacher_scores"),
                "source": source_of(r),
                "length": max(len(ids_of(p)) for p in pairs),
            }
        )
    return feats


# ------------------------------------------------------------------------------------------------ layouts
# collate(feats, **collate knobs) -> (texts to encode, extra tensors); loss(fn, out, **extras, **loss knobs).


def _query_docs_collate(
    feats: list[dict], seed: int, hard_negatives: int | None = None, scored: bool = False
):
    # Resampling (hard_negatives > row's count) is seeded by the batch's rows: the same batch draws the same
    # negatives, also after a resume. A resampled negative keeps its key and its teacher score.
    rng = random.Random(f"{seed}:{[f['idx'] for f in feats]}")
    scores = [f["teacher"][1:] if scored else [0.0] * len(f["negatives"]) for f in feats]
    rows = [
        list(zip(f["negatives"], f["text_keys"][2:], s, strict=True))
        for f, s in zip(feats, scores, strict=True)
    ]
    negs, neg_mask = pad_negatives(rows, hard_negatives or None, rng)
    real = [t for row in negs for t in row if t is not None]  # row-major, as pack_negatives expects
    texts = (
        [f["query"] for f in feats] + [f["response"] for f in feats] + [ids for ids, _, _ in real]
    )  # B + B + K
    # per document (B positives, K negatives): its text key, and its row's query key if a positive
    doc_keys = [(f["text_keys"][1], f["text_keys"][0]) for f in feats] + [(k, -1) for _, k, _ in real]
    extras = {"neg_mask": neg_mask, "doc_keys": torch.tensor(doc_keys, dtype=torch.long).reshape(-1, 2)}
    if scored:  # (B, 1 + N): the positive's score, then each slot's (0 in empty slots, which are masked)
        extras["teacher"] = torch.tensor(
            [
                [f["teacher"][0]] + [0.0 if t is None else t[2] for t in row]
                for f, row in zip(feats, negs, strict=True)
            ],
            dtype=torch.float32,
        ).reshape(len(feats), 1 + neg_mask.shape[1])
    return texts, extras


def _scored_docs_collate(feats: list[dict], seed: int, hard_negatives: int | None = None):
    return _query_docs_collate(feats, seed, hard_negatives, scored=True)


def _own_documents_only(knobs: dict, in_batch_negatives) -> dict:
    """A batch of a source without in-batch negatives (`source_in_batch_negatives`): infonce on each row's own."""
    if in_batch_negatives is None or bool(in_batch_negatives) or "use_batch" not in knobs:
        return knobs
    return {**knobs, "use_batch": False, "include_qq": False, "include_dd": False}


def _query_docs_loss(fn, out, *, neg_mask, doc_keys, teacher=None, in_batch_negatives=None, **knobs):
    # also scored_docs's: the teacher's (B, 1 + N) scores follow neg_mask when the layout collated them
    knobs = _own_documents_only(knobs, in_batch_negatives)
    b = neg_mask.shape[0]  # rows: out = [B queries, B positives, K real negatives]
    world, rank = world_and_rank()
    neg = pack_negatives(out[2 * b :], neg_mask)  # (B, N, H), zeros where neg_mask is False
    scores = () if teacher is None else (teacher,)
    return fn(out[:b], out[b : 2 * b], neg, neg_mask, *scores, world_size=world, rank=rank, doc_keys=doc_keys,
              **knobs)  # fmt: skip


def _text_pairs_collate(feats: list[dict], seed: int):
    texts = [f["query"] for f in feats] + [f["response"] for f in feats]  # B queries then B responses
    return texts, {"targets": torch.tensor([f["label"] for f in feats], dtype=torch.float32)}


def _text_pairs_loss(fn, out, *, targets, **knobs):
    b = targets.shape[0]
    return fn(out[:b], out[b:], targets, **knobs)


def _prompts_collate(feats: list[dict], seed: int):
    texts = [p for f in feats for p in f["pairs"]]  # sum of group sizes
    return texts, {"targets": torch.tensor([t for f in feats for t in f["targets"]], dtype=torch.float32)}


def _prompts_loss(fn, out, *, targets, **knobs):
    return fn(out, targets, **knobs)


def _prompt_groups_collate(feats: list[dict], seed: int):
    texts = [p for f in feats for p in f["pairs"]]
    return texts, {"group_sizes": torch.tensor([len(f["pairs"]) for f in feats], dtype=torch.long)}


def _prompt_groups_loss(fn, out, *, group_sizes, teacher=None, **knobs):
    # also scored_groups's: the teacher's (M,) scores, in the order of out
    return fn(out, group_sizes, *(() if teacher is None else (teacher,)), **knobs)


def _scored_groups_collate(feats: list[dict], seed: int):
    texts, extras = _prompt_groups_collate(feats, seed)
    return texts, {
        **extras,
        "teacher": torch.tensor([t for f in feats for t in f["teacher"]], dtype=torch.float32),
    }


@dataclasses.dataclass(frozen=True)
class Layout:
    collate: Callable  # (row features, seed, **collate knobs) -> (texts' token ids, extra tensors)
    loss: Callable  # (loss function, outputs (T, ...), **extra tensors, **loss knobs) -> scalar


LAYOUTS = {
    "query_docs": Layout(_query_docs_collate, _query_docs_loss),
    "text_pairs": Layout(_text_pairs_collate, _text_pairs_loss),
    "prompts": Layout(_prompts_collate, _prompts_loss),
    "prompt_groups": Layout(_prompt_groups_collate, _prompt_groups_loss),
    "scored_docs": Layout(_scored_docs_collate, _query_docs_loss),
    "scored_groups": Layout(_scored_groups_collate, _prompt_groups_loss),
}


@dataclasses.dataclass
class Collator:
    """Features of B rows -> one batch: `{"features": padded model inputs of every text, **extra tensors}`
    (one forward pass), laid out as the objective's `layout` says. `knobs`: the layout's
    (`objectives.resolve_knobs(objective, cfg, collate=True)`)."""

    objective: Objective
    pad_id: int
    seed: int = 42
    pad_to_multiple_of: int = 0
    knobs: dict = dataclasses.field(default_factory=dict)
    without_in_batch: frozenset = frozenset()  # sources whose batches score no in-batch negatives
    pixels: Callable | None = None  # texts with images: their pixel tensors (`vision.ImageFeaturizer`)

    def __call__(self, feats: list[dict]) -> dict:
        texts, extras = LAYOUTS[self.objective.layout].collate(feats, self.seed, **self.knobs)
        if self.without_in_batch and all(f["source"] in self.without_in_batch for f in feats):
            extras["in_batch_negatives"] = torch.tensor(False)
        return {"features": pad(texts, self.pad_id, self.pad_to_multiple_of, self.pixels), **extras}


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
        sources: list[str] | None = None,
        sampling: str = "mixed",
    ):
        self.lengths, self.batch_size, self.seed, self.mega, self.epoch = lengths, batch_size, seed, mega, 0
        self.keys, self.group, self.sources, self.sampling = keys, group, sources, sampling

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.sampling == "mixed":
            return len(self.lengths)
        return sum(
            len(b) for b in self._one_source_batches(torch.Generator().manual_seed(self.seed + self.epoch))
        )

    def _batches(self, order: list[int]) -> tuple[list[list[int]], list[int]]:
        """Full batches of `order` (mega-batches of `mega` batches, each sorted by length when grouping), and
        the rows left over."""
        size = self.batch_size * self.mega
        batches, left = [], []
        for i in range(0, len(order), size):
            chunk = left + order[i : i + size]
            if self.group:
                chunk.sort(key=self.lengths.__getitem__, reverse=True)
            full, left = self._cut(chunk)
            batches += full
        return batches, left

    def _one_source_batches(self, g: torch.Generator) -> list[list[int]]:
        """round_robin / proportional: batches of one source each, in the order the mode says (see
        `embedtune.sources`); each source's leftover rows are dropped this epoch."""
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        by_source: dict[str, list[int]] = {}
        for i in order:
            by_source.setdefault(self.sources[i], []).append(i)
        per = {s: self._batches(rows)[0] for s, rows in sorted(by_source.items())}
        for s, batches in per.items():  # length grouping sorted them: shuffle each source's batches
            per[s] = [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]
        if self.sampling == "round_robin":
            rounds = min((len(b) for b in per.values()), default=0)
            return [per[s][r] for r in range(rounds) for s in per]
        every = [b for batches in per.values() for b in batches]
        return [every[j] for j in torch.randperm(len(every), generator=g).tolist()]

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
        if self.sampling != "mixed":
            return iter([i for b in self._one_source_batches(g) for i in b])
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        batches, left = self._batches(order)
        shuffled = [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]
        return iter([i for b in shuffled for i in b] + left)
