"""Every training loss embedtune offers, as plain functions on tensors (ms-swift's names and semantics).

The train step encodes a batch, then calls one of these: the function its `loss_type`'s entry in
`embedtune.objectives` names. Nothing here knows about models, tokenizers or the Trainer, so each loss can be
checked against a hand-computed number and timed on its own.

Embedding losses take L2-normalized embeddings (dot product == cosine):

- ``infonce``: each query scored against its positive, its own hard negatives and (``use_batch``) every
  other document of the *global* batch, cross-entropy on the positive. Ragged negatives are padded +
  masked (no per-sample Python loop); other ranks' documents are gathered *with* gradients, so 2 ranks x
  batch B train exactly like 1 rank x batch 2B. Optional query-query and document-document denominator terms
  (Qwen3-Embedding / GTE) and hardness weighting of the negatives.
- ``cosine_similarity``: MSE between cos(a, b) and a float label.
- ``contrastive`` / ``online_contrastive``: sentence-transformers' margin losses on the cosine distance.
- ``cosent`` / ``angle``: sentence-transformers' CoSENT and AnglE ranking of the batch's pair scores by label.

The distillation losses (teacher_scores) are in ``embedtune.distillation``.

Reranker losses take ``z = logit(yes) - logit(no)`` at the last position (sigmoid(z) is the probability of
"yes" under the softmax over [no, yes]):

- ``pointwise_reranker``: binary cross-entropy, label 1 for a positive, 0 for a negative.
- ``listwise_reranker``: per query, softmax cross-entropy over [positive, negatives...] / temperature.

``matryoshka_loss`` wraps any embedding loss: the weighted mean of the loss on each truncated, re-normalized width
of one forward pass's embeddings (Matryoshka Representation Learning; ``--matryoshka-dims``).

Example::

    import torch.nn.functional as F
    from embedtune.losses import infonce_loss, pack_negatives, pad_negatives

    negs, mask = pad_negatives([["n1", "n2"], []], n=None, rng=random.Random(0))
    flat = encode([t for row in negs for t in row if t is not None])        # (mask.sum(), D)
    loss = infonce_loss(F.normalize(encode(queries), dim=-1), F.normalize(encode(positives), dim=-1),
                        pack_negatives(F.normalize(flat, dim=-1), mask), mask,
                        temperature=0.01, use_batch=True, mask_fake_negative=False)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from embedtune.distributed import world_and_rank

# A negative whose cosine similarity to the query exceeds the positive's by more than this is treated as an
# unlabeled positive (a "fake negative") and masked out when mask_fake_negative is on (ms-swift's margin).
FAKE_NEGATIVE_MARGIN = 0.1


def _up(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (bf16/fp16 cosines / 0.01 would lose the ranking); fp64 stays fp64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# --------------------------------------------------------------------------------------------------------
# Hard negatives: sampling and padding


def pad_negatives(
    neg_lists: Sequence[Sequence[Any]], n: int | None, rng
) -> tuple[list[list[Any]], torch.Tensor]:
    """Give every row the same number of negative slots; returns ``(rows, mask)``.

    - ``n > 0``: every row gets exactly ``n`` negatives: its first ``n`` when it has more, else all of
      its own plus ones resampled (with replacement) from *its own* negatives. The positive and other rows'
      negatives are never picked (ms-swift's resampling could pick the positive). A row with no negatives
      gets ``n`` empty slots.
    - ``n`` None or 0: every row keeps all its negatives and is padded to the longest row of the batch.

    Empty slots hold ``None`` and are ``False`` in ``mask`` (a bool tensor ``(B, N)``), so a caller encodes
    only the real ones (``[t for row in rows for t in row if t is not None]``, row-major, the same order as
    ``mask``) and places them with :func:`pack_negatives`.

    ``rng`` is a ``random.Random`` (or a ``numpy.random.Generator``); only resampling uses it.
    """
    out: list[list[Any]] = []
    if n:
        for row in neg_lists:
            row = list(row)
            if len(row) >= n:
                out.append(row[:n])
            elif row:
                out.append(row + [row[_randbelow(rng, len(row))] for _ in range(n - len(row))])
            else:
                out.append([None] * n)
        width = n
    else:
        width = max((len(row) for row in neg_lists), default=0)
        out = [list(row) + [None] * (width - len(row)) for row in neg_lists]
    mask = torch.tensor([[t is not None for t in row] for row in out], dtype=torch.bool).reshape(
        len(out), width
    )
    return out, mask


def _randbelow(rng, k: int) -> int:
    return rng.randrange(k) if hasattr(rng, "randrange") else int(rng.integers(k))


def pack_negatives(flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scatter the real negatives' embeddings ``(mask.sum(), D)`` (row-major) into ``(B, N, D)``; zeros elsewhere."""
    b, n = mask.shape
    slots = mask.to(flat.device).flatten().nonzero().squeeze(1)  # (K,) row-major slot of each real negative
    # index_copy (backward: index_select) is several times faster than masked_scatter on (B, N, D).
    return flat.new_zeros(b * n, flat.shape[-1]).index_copy(0, slots, flat).view(b, n, flat.shape[-1])


# --------------------------------------------------------------------------------------------------------
# infonce


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends each rank the *sum* of every rank's gradient for its slice.

    Every rank's loss depends on every rank's documents; summing the gradients here means the parameters
    of rank r receive d(sum of all ranks' losses)/d(rank r's documents), which is what one process holding
    the whole batch would compute. (ms-swift gathers detached copies instead, losing those terms.)
    Input: ``(L, D)``, the same ``L`` on every rank; output: ``(world_size * L, D)`` in rank order.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.world, ctx.rank = world_and_rank()
        parts = [torch.empty_like(x) for _ in range(ctx.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # Sum over ranks, keep our slice. (A reduce_scatter would move less data, but gloo lacks it on some
        # builds and embeddings are small next to the model's own gradient all-reduce: one path everywhere.)
        grad = grad.contiguous()
        dist.all_reduce(grad)
        length = grad.shape[0] // ctx.world
        return grad[ctx.rank * length : (ctx.rank + 1) * length]


def _gather_docs(
    docs: torch.Tensor, world_size: int, rank: int, batch: int, keys: torch.Tensor | None = None
):
    """Gather every rank's documents ``(L_r, D)`` with gradients, and their ``keys`` ``(L_r, 2)`` (no gradient).

    Returns ``(all_docs (sum L_r, D), offset of this rank's first document, global batch size, all_keys or
    None)``. Ranks may hold different numbers of rows and of real negatives, so each pads to the longest and
    the padding is dropped after the gather.
    """
    sizes = torch.tensor([docs.shape[0], batch], device=docs.device, dtype=torch.long)
    all_sizes = [torch.empty_like(sizes) for _ in range(world_size)]
    dist.all_gather(all_sizes, sizes)
    lengths = [int(s[0]) for s in all_sizes]
    global_batch = sum(int(s[1]) for s in all_sizes)
    longest = max(lengths)
    padded = F.pad(docs, (0, 0, 0, longest - docs.shape[0]))
    gathered = _AllGatherWithGrad.apply(padded)  # (world_size * longest, D)
    keep = torch.cat([torch.arange(longest, device=docs.device) < n for n in lengths])
    all_keys = None
    if keys is not None:
        parts = [keys.new_empty(longest, keys.shape[1]) for _ in range(world_size)]
        dist.all_gather(parts, F.pad(keys, (0, 0, 0, longest - keys.shape[0])).contiguous())
        all_keys = torch.cat(parts)[keep]
    return gathered[keep], sum(lengths[:rank]), global_batch, all_keys


def _same_meaning(doc_keys: torch.Tensor, batch: int, offset: int) -> torch.Tensor:
    """``(B, T)`` True where document column j is not a negative of query i, by token-identity keys.

    ``doc_keys`` ``(T, 2)``: per document column, the key of its text and the key of its row's query when it is
    that row's positive (-1 for a negative); this rank's B positives sit at ``offset``, so their column 1 holds
    the B queries' keys. Column j is no negative of query i when it is a copy of i's own positive, or the
    positive of another row with i's own query (an MTEB set gives one row per positive, so a batch holding two
    rows of one query would otherwise push each positive away from that query).
    """
    own = doc_keys[offset : offset + batch]  # (B, 2) this rank's positives: (text key, query key)
    copy_of_positive = doc_keys[None, :, 0] == own[:, 0, None]  # (B, T)
    positive_of_same_query = doc_keys[None, :, 1] == own[:, 1, None]  # (B, T)
    return copy_of_positive | positive_of_same_query


def infonce_loss(
    q: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor,
    neg_mask: torch.Tensor,
    *,
    temperature: float,
    use_batch: bool,
    mask_fake_negative: bool,
    world_size: int = 1,
    rank: int = 0,
    gather: bool = True,
    doc_keys: torch.Tensor | None = None,
    include_qq: bool = False,
    include_dd: bool = False,
    hardness_strength: float = 0.0,
) -> torch.Tensor:
    """InfoNCE (a.k.a. MultipleNegativesRankingLoss) over ragged hard negatives, exact across ranks.

    Args:
        q: ``(B, D)`` L2-normalized query embeddings of this rank.
        pos: ``(B, D)`` their positives.
        neg: ``(B, N, D)`` hard negatives padded to ``N`` (see :func:`pad_negatives`, :func:`pack_negatives`),
            or just the real ones ``(K, D)`` in row-major order of ``neg_mask`` (``K = neg_mask.sum()``):
            the encoder's output as is, which skips a pad/unpad round trip (faster, same result).
        neg_mask: ``(B, N)`` bool, True where a row has a real negative.
        temperature: logits are cosine / temperature.
        use_batch: also score every other document of the global batch: all ranks' positives and real
            negatives. Off: a query sees only its positive and its own negatives.
        mask_fake_negative: a negative (own or in-batch) whose cosine exceeds the positive's by more than
            0.1 gets a logit of -inf (likely an unlabeled positive).
        world_size, rank: the data-parallel group. With ``world_size > 1``, ``use_batch`` and ``gather``,
            other ranks' documents are gathered *with* gradients (every rank must call this).
        gather: False keeps ``use_batch`` to this rank's own documents (no communication).
        doc_keys: with ``use_batch``, what keeps false negatives out of the batch: ``(B + K, 2)`` int64 keys of
            the documents, in ``docs`` order ([positives, real negatives]): column 0 the text's key, column 1 the
            row's query key for a positive, else -1. In-batch
            documents that are a copy of the row's positive, or another positive of the same query, are then
            left out of its softmax (the sampler keeps most batches free of them; the rest are made harmless).
        include_qq: with ``use_batch``, every other query of the global batch joins query i's denominator
            (Qwen3-Embedding / GTE; ms-swift's ``INFONCE_INCLUDE_QQ``): logits ``q_i . q_j / temperature``, its
            own query (and copies of it, by ``doc_keys``) left out.
        include_dd: with ``use_batch``, query i's denominator also holds ``pos_i . d_j / temperature`` for every
            document d_j of the global batch (other rows' positives and negatives, and its own hard negatives;
            ms-swift's ``INFONCE_INCLUDE_DD``): its own positive, copies of it and other positives of its query
            are left out. The numerator stays ``q_i . pos_i``.
        hardness_strength: alpha >= 0: every negative logit of the query-document block gets
            ``alpha * stopgrad(cos)`` added (after the temperature; sentence-transformers' ``hardness_strength``
            with ``hardness_mode="all_negatives"``, Lan et al. 2025), so harder negatives weigh more. 0: off.

        With ``mask_fake_negative`` the threshold ``stopgrad(q_i . pos_i) + 0.1`` masks every block (qd, qq and dd,
        as the Qwen3-Embedding paper's mask); ms-swift masks qd and qq only.

    Returns:
        Scalar loss. For query ``i``: ``logsumexp(logits_i) - logits_i[own positive]`` with every real
        document counted once, averaged over queries. Across ranks the value is ``sum of this rank's
        terms * world_size / global batch``: DDP and DeepSpeed *average* gradients over ranks, so
        this makes the averaged gradient equal the one of a single process holding the whole global batch
        (for equal per-rank batches it is simply this rank's mean).
    """
    batch = neg_mask.shape[0]
    rows = torch.arange(batch, device=q.device)
    q = _up(q)  # logits are cos / 0.01: keep them fp32 even when the model runs in bf16
    flat_given = neg.dim() == 2
    if not use_batch:
        neg = pack_negatives(neg, neg_mask) if flat_given else neg
        # Own documents only: logits (B, 1 + N), column 0 = positive, padded negatives at -inf.
        sims = torch.cat([(q * _up(pos)).sum(-1, keepdim=True), torch.einsum("bd,bnd->bn", q, _up(neg))], 1)
        allowed = torch.cat([neg_mask.new_ones(batch, 1), neg_mask.to(q.device)], 1)
        target = torch.zeros(batch, dtype=torch.long, device=q.device)
        scale, extra = 1.0 / batch, []
    else:
        # Every real document of the batch, ordered [this rank's positives, this rank's real negatives]
        # per rank; padded negatives are dropped, so no column needs masking.
        if not flat_given:
            slots = neg_mask.to(neg.device).flatten().nonzero().squeeze(1)  # (K,) real negatives, row-major
            neg = neg.reshape(-1, neg.shape[-1]).index_select(0, slots)
        docs = torch.cat([pos, neg])  # (B + K, D)
        offset, global_batch, own_keys = 0, batch, doc_keys
        if world_size > 1 and gather:
            docs, offset, global_batch, doc_keys = _gather_docs(docs, world_size, rank, batch, doc_keys)
        sims = q @ _up(docs).T  # (B, all documents of the global batch)
        target = offset + rows  # own positive's column
        allowed = torch.ones_like(sims, dtype=torch.bool)
        if doc_keys is not None:
            allowed = ~_same_meaning(doc_keys.to(q.device), batch, offset)
        extra = []  # (sims, allowed) of the qq and dd blocks: denominator only
        if include_qq:
            extra.append(_query_block(q, own_keys, world_size, rank, gather))
        if include_dd:  # the documents' own "not a negative" columns are the qd block's, plus the positive
            dd_allowed = allowed.clone()
            dd_allowed[rows, target] = False
            extra.append((_up(pos) @ _up(docs).T, dd_allowed))
        allowed[rows, target] = True
        scale = world_size / global_batch if gather else 1.0 / batch
    is_negative = torch.ones_like(sims, dtype=torch.bool)
    is_negative[rows, target] = False
    if mask_fake_negative:
        threshold = sims[rows, target].detach().unsqueeze(1) + FAKE_NEGATIVE_MARGIN
        allowed = allowed & ~((sims > threshold) & is_negative)
        extra = [(s, a & ~(s > threshold)) for s, a in extra]
    logits = sims / temperature
    if hardness_strength:  # after the temperature: alpha * cos, not alpha * cos / temperature
        logits = logits + hardness_strength * sims.detach() * is_negative
    logits = torch.cat([logits, *(s / temperature for s, _ in extra)], 1)
    allowed = torch.cat([allowed, *(a for _, a in extra)], 1)
    logits = logits.masked_fill(~allowed, float("-inf"))
    return F.cross_entropy(logits, target, reduction="sum") * scale


def _query_block(
    q: torch.Tensor, doc_keys: torch.Tensor | None, world_size: int, rank: int, gather: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q . every query of the global batch (B, B_global), allowed (B, B_global))``: each query's own column
    (and, with ``doc_keys``, every copy of its query) is left out. Other ranks' queries come with gradients."""
    batch = q.shape[0]
    q_keys = doc_keys[:batch, 1:].repeat(1, 2).to(q.device) if doc_keys is not None else None
    queries, offset, keys = q, 0, q_keys
    if world_size > 1 and gather:
        queries, offset, _, keys = _gather_docs(q, world_size, rank, batch, q_keys)
    sims = q @ _up(queries).T
    if keys is not None:  # a copy of one's own query is no negative
        allowed = keys[None, :, 0] != q_keys[:, 0, None]
    else:
        allowed = torch.ones_like(sims, dtype=torch.bool)
    allowed[torch.arange(batch, device=q.device), offset + torch.arange(batch, device=q.device)] = False
    return sims, allowed


# --------------------------------------------------------------------------------------------------------
# Pair losses


def cosine_similarity_loss(a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``mean((cos(a_i, b_i) - label_i)^2)``: sentence-transformers' CosineSimilarityLoss. a, b: ``(B, D)``."""
    cos = F.cosine_similarity(_up(a), _up(b), dim=-1)
    return F.mse_loss(cos, labels.to(cos))


def _pair_terms(d: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    # label 1 pulls together (d^2 / 2), label 0 pushes apart until d >= margin (relu(margin - d)^2 / 2).
    return 0.5 * (labels * d.pow(2) + (1 - labels) * F.relu(margin - d).pow(2))


def contrastive_loss(
    a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor, *, margin: float = 0.5
) -> torch.Tensor:
    """sentence-transformers' ContrastiveLoss on the cosine distance ``d = 1 - cos(a, b)``, mean over pairs.

    Label 1: ``d^2 / 2``; label 0: ``relu(margin - d)^2 / 2``. Labels must be 0 or 1.
    """
    d = 1 - F.cosine_similarity(_up(a), _up(b), dim=-1)
    return _pair_terms(d, labels.to(d), margin).mean()


def online_contrastive_loss(
    a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor, *, margin: float = 0.5
) -> torch.Tensor:
    """Contrastive loss over the hard pairs of the batch only, **mean** over those pairs.

    Hard positives: label-1 pairs farther apart than the closest label-0 pair; hard negatives: label-0 pairs
    closer than the farthest label-1 pair (sentence-transformers' OnlineContrastiveLoss selection, including
    its fallbacks when a side has a single pair). Each selected pair contributes the same term as
    :func:`contrastive_loss` (``d^2/2`` or ``relu(margin - d)^2/2``).

    Scale differs from sentence-transformers / ms-swift on purpose: they *sum* ``d^2`` and ``relu(m-d)^2``
    without the 1/2, so their value is ``2 * n_hard_pairs`` times ours; the mean keeps the learning rate
    independent of the batch size. The batch is this rank's (hard pairs are mined per rank). Returns 0 (with
    a graph) when no pair is hard.
    """
    d = 1 - F.cosine_similarity(_up(a), _up(b), dim=-1)
    labels = labels.to(d)
    is_pos, is_neg = labels == 1, labels == 0
    poss, negs = d[is_pos], d[is_neg]
    with torch.no_grad():
        neg_bound = poss.max() if poss.numel() > 1 else negs.mean()
        pos_bound = negs.min() if negs.numel() > 1 else poss.mean()
    hard = (is_neg & (d < neg_bound)) | (is_pos & (d > pos_bound))
    if not bool(hard.any()):
        return d.sum() * 0.0
    return _pair_terms(d[hard], labels[hard], margin).mean()


def _ranked_pairs_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log(1 + sum over pairs (i, j) with label_i > label_j of exp(s_j - s_i))``: CoSENT's ranking of pair
    scores ``(B,)`` (already scaled) by their labels ``(B,)``. ``(B, B)`` differences: batches are small."""
    diff = scores[None, :] - scores[:, None]  # [i, j] = s_j - s_i
    ranked = labels[:, None] > labels[None, :]  # label_i > label_j: j must score below i
    terms = diff.masked_fill(~ranked, float("-inf")).flatten()
    return torch.logsumexp(torch.cat([terms.new_zeros(1), terms]), 0)


def cosent_loss(
    a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor, *, scale: float = 20.0
) -> torch.Tensor:
    """CoSENT (sentence-transformers' CoSENTLoss): every pair of pairs whose labels are ordered must have their
    cosines ordered the same way; ``s = scale * cos(a_i, b_i)``. a, b: ``(B, D)``; labels any finite scores.
    The batch is this rank's (as sentence-transformers under DDP)."""
    cos = F.cosine_similarity(_up(a), _up(b), dim=-1)
    return _ranked_pairs_loss(cos * scale, labels.to(cos))


def angle_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """AnglE's pair score ``|cos + sin|`` of unit vectors whose halves are read as real and imaginary parts
    (dimension i pairs with i + D/2; an odd D is padded with a zero): sentence-transformers' pairwise_angle_sim."""
    a, b = _up(a), _up(b)
    if a.shape[-1] % 2:
        a, b = F.pad(a, (0, 1)), F.pad(b, (0, 1))
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    (a_re, a_im), (b_re, b_im) = a.chunk(2, dim=-1), b.chunk(2, dim=-1)
    return ((a * b).sum(-1) + (a_im * b_re - a_re * b_im).sum(-1)).abs()


def angle_loss(
    a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor, *, scale: float = 20.0
) -> torch.Tensor:
    """AnglE (sentence-transformers' AnglELoss): CoSENT on :func:`angle_similarity` instead of the cosine."""
    sim = angle_similarity(a, b)
    return _ranked_pairs_loss(sim * scale, labels.to(sim))


# --------------------------------------------------------------------------------------------------------
# Reranker losses


def pointwise_reranker_loss(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits on ``z = logit(yes) - logit(no)`` ``(M,)``, labels 1/0, mean."""
    z = _up(z)
    return F.binary_cross_entropy_with_logits(z, labels.to(z))


def skipped_groups(group_sizes, min_group_size: int = 2) -> int:
    """How many listwise groups :func:`listwise_reranker_loss` skips (fewer than ``min_group_size`` scores)."""
    return int((torch.as_tensor(group_sizes) < min_group_size).sum())


def listwise_reranker_loss(
    z: torch.Tensor, group_sizes, *, temperature: float = 1.0, min_group_size: int = 2
) -> torch.Tensor:
    """Softmax cross-entropy over each query's group of scores, target = the group's first score.

    Args:
        z: ``(M,)`` flat scores of groups laid out consecutively, each ``[positive, negatives...]``.
        group_sizes: ``(G,)`` sizes summing to ``M`` (tensor or list).
        temperature: scores are divided by it before the softmax.
        min_group_size: groups smaller than this are skipped (a group of one has nothing to rank against);
            count them with :func:`skipped_groups` to report them.

    Returns the mean over the kept groups (0 with a graph when none is kept). Vectorized: the groups are
    padded into a ``(G, longest)`` matrix with -inf, so no per-group Python loop.
    """
    sizes = torch.as_tensor(group_sizes, device=z.device, dtype=torch.long)
    z = _up(z) / temperature
    keep = sizes >= min_group_size
    if not bool(keep.any()):
        return z.sum() * 0.0
    # (M,) group of each score, then its position inside the group.
    group = torch.repeat_interleave(torch.arange(len(sizes), device=z.device), sizes)
    starts = torch.cumsum(sizes, 0) - sizes
    slot = torch.arange(z.numel(), device=z.device) - starts[group]
    scores = z.new_full((len(sizes), int(sizes.max())), float("-inf")).index_put((group, slot), z)
    scores = scores[keep]
    return F.cross_entropy(scores, scores.new_zeros(len(scores), dtype=torch.long))


# --------------------------------------------------------------------------------------------------------
# Matryoshka (MRL): any embedding loss at several truncated widths, from one forward pass


def matryoshka_spec(dims: str, weights: str = "") -> tuple[list[int], list[float]]:
    """Parse ``--matryoshka-dims 1024,512,256`` and ``--matryoshka-weights``: (dims, weights), or ([], []) for
    an empty ``dims``. Dims are distinct positive ints; weights are positive, one per dim (default all 1).
    Raises ``ValueError`` naming the knob."""
    if not dims.strip():
        if weights.strip():
            raise ValueError("matryoshka_weights: given without matryoshka_dims")
        return [], []
    try:
        d = [int(x) for x in dims.split(",")]
    except ValueError:
        raise ValueError(f"matryoshka_dims: {dims!r} is not a comma-separated list of integers") from None
    if any(x < 1 for x in d) or len(set(d)) != len(d):
        raise ValueError(f"matryoshka_dims: {dims!r} must be distinct positive integers")
    if not weights.strip():
        return d, [1.0] * len(d)
    try:
        w = [float(x) for x in weights.split(",")]
    except ValueError:
        raise ValueError(
            f"matryoshka_weights: {weights!r} is not a comma-separated list of numbers"
        ) from None
    if len(w) != len(d) or any(not x > 0 for x in w):
        raise ValueError(
            f"matryoshka_weights: {weights!r} must be {len(d)} positive numbers (one per matryoshka_dims entry)"
        )
    return d, w


def truncate(emb: torch.Tensor, dim: int) -> torch.Tensor:
    """The first ``dim`` components of unit vectors ``(..., H)``, re-normalized (unchanged when dim >= H)."""
    return emb if dim >= emb.shape[-1] else F.normalize(emb[..., :dim], p=2, dim=-1)


def matryoshka_loss(
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    emb: torch.Tensor,
    dims: Sequence[int],
    weights: Sequence[float],
) -> torch.Tensor:
    """``sum_i w_i * loss_of(truncate(emb, d_i)) / sum_i w_i``: Matryoshka Representation Learning.

    ``emb``: the ``(T, H)`` unit-norm embeddings of one forward pass (every text of the batch); ``loss_of``
    maps such a tensor to the scalar loss (the split into queries / positives / negatives and the loss
    itself, e.g. infonce with its cross-rank gather). Each width re-runs only the loss on the truncated
    vectors, so the encoder runs once and its gradient is the weighted mean of every width's. A width equal
    to H uses ``emb`` as it is, so ``dims=[H]`` gives exactly the plain loss. Exact across ranks whenever
    ``loss_of`` is (each width's infonce gathers its own truncated documents with gradients).
    (sentence-transformers' MatryoshkaLoss sums the weighted losses; the mean keeps the loss scale, and so
    the learning rate, independent of how many widths are trained.)
    """
    total = sum(w * loss_of(truncate(emb, d)) for d, w in zip(dims, weights, strict=True))
    return total / float(sum(weights))
