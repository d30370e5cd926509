"""The losses against numbers computed by hand (plain `math`), and infonce's padding and multi-rank exactness.

Embeddings in the hand-computed examples are 2-D unit vectors given by an angle, so every cosine is
`cos(angle difference)` and the expected loss can be written out with `math` alone.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from embedtune import losses
from embedtune.data import check_loss_data
from embedtune.errors import DataError
from embedtune.launch import free_port
from embedtune.losses import (
    contrastive_loss,
    cosine_similarity_loss,
    infonce_loss,
    listwise_reranker_loss,
    matryoshka_loss,
    matryoshka_spec,
    online_contrastive_loss,
    pack_negatives,
    pad_negatives,
    pointwise_reranker_loss,
    skipped_groups,
)


def unit(angle: float) -> list[float]:
    return [math.cos(angle), math.sin(angle)]


def vecs(angles) -> torch.Tensor:
    return torch.tensor([unit(a) for a in angles], dtype=torch.float64)


def padded_negs(neg_angles: list[list[float]]):
    """(B, N, 2) negatives and their mask from ragged angle lists; padding filled with junk on purpose."""
    width = max(len(r) for r in neg_angles)
    neg = torch.full((len(neg_angles), width, 2), 7.0, dtype=torch.float64)
    mask = torch.zeros(len(neg_angles), width, dtype=torch.bool)
    for i, row in enumerate(neg_angles):
        for j, a in enumerate(row):
            neg[i, j] = torch.tensor(unit(a))
            mask[i, j] = True
    return neg, mask


def ce(pos_logit: float, other_logits: list[float]) -> float:
    """-log softmax of the positive among [positive, others], by hand."""
    return -pos_logit + math.log(math.exp(pos_logit) + sum(math.exp(x) for x in other_logits))


# --- hand-computed values on a 3-row example ------------------------------------------------------------

Q = [0.0, 1.5, 3.0]
POS = [0.3, 1.7, 2.6]
NEGS = [[1.0], [2.5, 0.9], []]


def test_registry_names_every_loss_once():
    from embedtune.batching import LAYOUTS
    from embedtune.objectives import LOSS_TYPES, OBJECTIVES, TASKS, losses_for

    embedding, reranker = set(losses_for("embedding")), set(losses_for("reranker"))
    assert embedding | reranker == set(LOSS_TYPES) == set(OBJECTIVES)  # one entry per loss, each for one task
    assert not embedding & reranker and {o.task_type for o in OBJECTIVES.values()} == set(TASKS)
    from embedtune import distillation

    for (
        obj
    ) in OBJECTIVES.values():  # each entry names a pure function (losses.py, or module.name) and a layout
        module, _, name = obj.loss.rpartition(".")
        owner = {"": losses, "distillation": distillation}[module]
        assert obj.function is getattr(owner, name) and callable(obj.function) and obj.layout in LAYOUTS


def test_infonce_use_batch_matches_hand_computed_value():
    t = 0.5
    docs = POS + [a for row in NEGS for a in row]
    expected = 0.0
    for i in range(3):
        others = [math.cos(Q[i] - d) / t for d in docs]
        others.remove(math.cos(Q[i] - POS[i]) / t)
        expected += ce(math.cos(Q[i] - POS[i]) / t, others) / 3
    neg, mask = padded_negs(NEGS)
    loss = infonce_loss(
        vecs(Q), vecs(POS), neg, mask, temperature=t, use_batch=True, mask_fake_negative=False
    )
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_infonce_without_batch_uses_only_own_negatives():
    t = 0.5
    expected = sum(
        ce(math.cos(Q[i] - POS[i]) / t, [math.cos(Q[i] - n) / t for n in NEGS[i]]) for i in range(3)
    )
    expected /= 3  # row 2 has no negatives: its term is -log(1) = 0
    neg, mask = padded_negs(NEGS)
    loss = infonce_loss(
        vecs(Q), vecs(POS), neg, mask, temperature=t, use_batch=False, mask_fake_negative=False
    )
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_cosine_similarity_loss_matches_hand_computed_value():
    a = torch.tensor([[3.0, 4.0], [1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[4.0, 3.0], [0.0, 2.0], [-1.0, -1.0]])
    labels = torch.tensor([0.9, 0.5, -0.8])
    cos = [24 / 25, 0.0, -1.0]
    expected = sum((c - y) ** 2 for c, y in zip(cos, [0.9, 0.5, -0.8], strict=True)) / 3
    assert cosine_similarity_loss(a, b, labels).item() == pytest.approx(expected, rel=1e-6)


def pair_with_distances(ds):
    """Pairs (a_i, b_i) of unit vectors whose cosine distance is exactly ds[i]."""
    return vecs([0.0] * len(ds)), vecs([math.acos(1 - d) for d in ds])


def test_contrastive_loss_matches_hand_computed_value():
    ds, labels = [0.2, 0.3, 0.7], [1, 0, 0]
    a, b = pair_with_distances(ds)
    expected = (0.2**2 / 2 + (0.5 - 0.3) ** 2 / 2 + 0.0) / 3  # d=0.7 negative is beyond the margin
    loss = contrastive_loss(a, b, torch.tensor(labels), margin=0.5)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_online_contrastive_loss_keeps_only_hard_pairs_and_averages():
    # positives at d=0.1 and 0.6, one negative at d=0.3. Hard negatives: d < max positive d (0.6) -> 0.3.
    # Hard positives: d > (min negative d, or with a single negative the positives' mean 0.35) -> 0.6 only.
    ds, labels = [0.1, 0.3, 0.6], [1, 0, 1]
    a, b = pair_with_distances(ds)
    expected = (0.6**2 / 2 + (0.5 - 0.3) ** 2 / 2) / 2
    loss = online_contrastive_loss(a, b, torch.tensor(labels), margin=0.5)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_online_contrastive_is_zero_with_a_graph_when_nothing_is_hard():
    a, b = pair_with_distances([0.1, 0.2, 0.9, 0.8])  # positives close, negatives far: nothing hard
    a.requires_grad_(True)
    loss = online_contrastive_loss(a, b, torch.tensor([1, 1, 0, 0]))
    loss.backward()
    assert loss.item() == 0.0 and a.grad is not None


def test_pointwise_reranker_loss_matches_hand_computed_value():
    z, labels = [2.0, -1.0, 0.5], [1, 0, 1]
    expected = (
        math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(-0.5))
    ) / 3
    loss = pointwise_reranker_loss(torch.tensor(z), torch.tensor(labels))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_listwise_reranker_loss_matches_hand_computed_value():
    z, sizes, t = [2.0, 1.0, 0.0, 0.5, -0.5, 3.0], [3, 1, 2], 2.0
    expected = (ce(2.0 / t, [1.0 / t, 0.0]) + ce(-0.5 / t, [3.0 / t])) / 2  # group [0.5] is skipped
    loss = listwise_reranker_loss(torch.tensor(z), sizes, temperature=t)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_listwise_skips_small_groups():
    z, sizes = torch.tensor([2.0, 1.0, 0.0, 0.5, -0.5, 3.0]), torch.tensor([3, 1, 2])
    assert skipped_groups(sizes, 2) == 1 and skipped_groups(sizes, 3) == 2
    only_first = listwise_reranker_loss(z, sizes, min_group_size=3)
    assert only_first.item() == pytest.approx(ce(2.0, [1.0, 0.0]), rel=1e-6)
    # Changing a skipped group's scores never changes the loss.
    z2 = z.clone()
    z2[3] = 100.0
    assert listwise_reranker_loss(z2, sizes).item() == listwise_reranker_loss(z, sizes).item()
    none_kept = listwise_reranker_loss(z.requires_grad_(True), sizes, min_group_size=4)
    none_kept.backward()
    assert none_kept.item() == 0.0


# --- infonce: fake negatives, ragged negatives, padding ------------------------------------------------


def test_infonce_mask_fake_negative_drops_too_similar_negative():
    t = 0.1
    q, pos = [0.0, 2.0], [0.8, 2.2]
    negs = [[0.1, 1.5], [2.9]]  # q0's own negative at 0.1 has cos 0.995 > cos(0.8) + 0.1 = 0.797: fake
    neg, mask = padded_negs(negs)
    got = infonce_loss(vecs(q), vecs(pos), neg, mask, temperature=t, use_batch=False, mask_fake_negative=True)
    expected0 = ce(math.cos(0.8) / t, [math.cos(1.5) / t])  # 0.1 dropped
    expected1 = ce(math.cos(0.2) / t, [math.cos(0.9) / t])
    assert got.item() == pytest.approx((expected0 + expected1) / 2, rel=1e-6)
    kept = infonce_loss(
        vecs(q), vecs(pos), neg, mask, temperature=t, use_batch=False, mask_fake_negative=False
    )
    assert kept.item() > got.item() + 1.0

    # In-batch too: q1's positive (2.2) and q0's fake negative are documents of the batch for every query.
    got_batch = infonce_loss(
        vecs(q), vecs(pos), neg, mask, temperature=t, use_batch=True, mask_fake_negative=True
    )
    docs = [0.8, 2.2, 0.1, 1.5, 2.9]
    expected = 0.0
    for i in range(2):
        p = math.cos(q[i] - pos[i])
        others = [math.cos(q[i] - d) for d in docs if d != pos[i]]
        expected += ce(p / t, [c / t for c in others if c <= p + 0.1]) / 2
    assert got_batch.item() == pytest.approx(expected, rel=1e-6)


def random_batch(seed: int, b: int = 6, d: int = 16, max_neg: int = 5):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
    pos = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
    counts = torch.randint(0, max_neg + 1, (b,), generator=g).tolist()
    counts[0] = max_neg  # at least one full row
    counts[1] = 0  # and one without negatives
    negs = [F.normalize(torch.randn(c, d, generator=g, dtype=torch.float64), dim=-1) for c in counts]
    return q, pos, negs


def pad(negs, width=None, fill=0.0):
    width = max(len(n) for n in negs) if width is None else width
    neg = torch.full((len(negs), width, negs[0].shape[-1]), fill, dtype=torch.float64)
    mask = torch.zeros(len(negs), width, dtype=torch.bool)
    for i, n in enumerate(negs):
        neg[i, : len(n)], mask[i, : len(n)] = n, True
    return neg, mask


@pytest.mark.parametrize("use_batch", [True, False])
@pytest.mark.parametrize("fake", [True, False])
def test_infonce_ragged_equals_per_row(use_batch, fake):
    q, pos, negs = random_batch(0)
    t = 0.05
    # Per row, written independently: the row's logits as a list, then cross-entropy on the positive.
    all_docs = torch.cat([pos, *negs])
    per_row = []
    for i in range(len(q)):
        own_negs = negs[i]
        others = (
            torch.cat([all_docs[:i], all_docs[i + 1 :]])  # everything but its own positive
            if use_batch
            else own_negs
        )
        p = q[i] @ pos[i]
        sims = others @ q[i]
        if fake:
            sims = sims[sims <= p + 0.1]
        logits = torch.cat([p.view(1), sims]) / t
        per_row.append(-torch.log_softmax(logits, 0)[0])
    expected = torch.stack(per_row).mean()
    neg, mask = pad(negs)
    got = infonce_loss(q, pos, neg, mask, temperature=t, use_batch=use_batch, mask_fake_negative=fake)
    assert got.item() == pytest.approx(expected.item(), rel=1e-9)
    # The real negatives as encoded, (K, D) row-major, give the same loss without the padded tensor.
    flat = infonce_loss(
        q, pos, torch.cat(negs), mask, temperature=t, use_batch=use_batch, mask_fake_negative=fake
    )
    assert flat.item() == pytest.approx(expected.item(), rel=1e-9)


@pytest.mark.parametrize("use_batch", [True, False])
def test_infonce_padded_negatives_never_change_loss(use_batch):
    q, pos, negs = random_batch(1)
    neg, mask = pad(negs)
    ref = infonce_loss(q, pos, neg, mask, temperature=0.05, use_batch=use_batch, mask_fake_negative=True)
    # Wider padding filled with vectors equal to the query itself (the most "attractive" junk there is).
    wide, wide_mask = pad(negs, width=neg.shape[1] + 3)
    wide[~wide_mask] = q.repeat_interleave((~wide_mask).sum(1), dim=0)
    got = infonce_loss(
        q, pos, wide, wide_mask, temperature=0.05, use_batch=use_batch, mask_fake_negative=True
    )
    assert got.item() == pytest.approx(ref.item(), rel=1e-12)
    # And the gradient never reaches a padded slot.
    wide.requires_grad_(True)
    infonce_loss(
        q, pos, wide, wide_mask, temperature=0.05, use_batch=use_batch, mask_fake_negative=False
    ).backward()
    assert wide.grad[~wide_mask].abs().max().item() == 0.0


def test_infonce_equal_negatives_use_same_formula_as_ragged():
    # All rows with the same count (no padding at all) agree with the same rows padded one wider.
    q, pos, _ = random_batch(2)
    g = torch.Generator().manual_seed(3)
    negs = [F.normalize(torch.randn(3, q.shape[1], generator=g, dtype=torch.float64), dim=-1) for _ in q]
    a = infonce_loss(q, pos, *pad(negs), temperature=0.1, use_batch=True, mask_fake_negative=False)
    b = infonce_loss(q, pos, *pad(negs, width=4), temperature=0.1, use_batch=True, mask_fake_negative=False)
    assert a.item() == pytest.approx(b.item(), rel=1e-12)


# --- hard-negative sampling -----------------------------------------------------------------------------


def test_hard_negative_padding_never_picks_the_positive():
    rows = [
        {"response": "p0", "rejected_response": ["a0", "b0"]},
        {"response": "p1", "rejected_response": ["a1"]},
        {"response": "p2", "rejected_response": ["a2", "b2", "c2", "d2", "e2"]},
        {"response": "p3", "rejected_response": []},
    ]
    seen_resampled = set()
    for seed in range(200):
        out, mask = pad_negatives([r["rejected_response"] for r in rows], 4, random.Random(seed))
        assert mask.shape == (4, 4)
        for r, got, m in zip(rows, out, mask.tolist(), strict=True):
            own = r["rejected_response"]
            if not own:
                assert got == [None] * 4 and not any(m)
                continue
            assert all(m) and len(got) == 4
            # never the positive, never another row's negative
            assert r["response"] not in got and set(got) <= set(own)
            assert got[: min(len(own), 4)] == own[:4]  # own negatives first, truncation keeps the first N
            seen_resampled.update(got[len(own) :])
    assert seen_resampled == {"a0", "b0", "a1"}  # resampling does draw from every row's own pool


def test_pad_negatives_without_n_keeps_all_and_masks_padding():
    out, mask = pad_negatives([["a"], [], ["b", "c", "d"]], None, random.Random(0))
    assert out == [["a", None, None], [None, None, None], ["b", "c", "d"]]
    assert mask.tolist() == [[True, False, False], [False, False, False], [True, True, True]]
    flat = torch.arange(4 * 2, dtype=torch.float32).view(4, 2)  # embeddings of a, b, c, d
    packed = pack_negatives(flat, mask)
    assert packed.shape == (3, 3, 2)
    assert packed[0, 0].tolist() == [0.0, 1.0] and packed[2, 2].tolist() == [6.0, 7.0]
    assert packed[1].abs().sum() == 0


def test_infonce_keys_keep_copies_of_the_positive_and_other_positives_of_the_same_query_out_of_the_softmax():
    # Rows 0 and 1 are one query (key 10) with two positives (MTEB: one row per positive); row 2 (query 11) has
    # a copy of row 0's positive text (key 20) as its positive, and row 1's own negative is that text too.
    t = 0.1
    q, pos = [0.0, 0.05, 1.0], [0.3, 0.5, 0.3]
    negs = [[2.0], [0.3], []]
    neg, mask = padded_negs(negs)
    # (text key, query key) per document: positives (their rows' queries), then negatives (-1)
    doc_keys = torch.tensor([[20, 10], [21, 10], [20, 11], [30, -1], [20, -1]])
    got = infonce_loss(
        vecs(q), vecs(pos), neg, mask, temperature=t, use_batch=True, mask_fake_negative=False,
        doc_keys=doc_keys,
    )  # fmt: skip
    docs = [0.3, 0.5, 0.3, 2.0, 0.3]  # columns: pos0, pos1, pos2 (= pos0's text), neg of row 0, neg of row 1
    # Negatives each row keeps. Row 0: pos1 is another positive of its query, pos2 and row 1's negative are
    # copies of its positive. Row 1: pos0 is another positive of its query; the rest is no copy of *its*
    # positive, and a negative labelled so stays one. Row 2: pos0 and row 1's negative are copies of its positive.
    kept = {0: [3], 1: [2, 3, 4], 2: [1, 3]}
    expected = sum(
        ce(math.cos(q[i] - pos[i]) / t, [math.cos(q[i] - docs[j]) / t for j in kept[i]]) for i in range(3)
    )
    assert got.item() == pytest.approx(expected / 3, rel=1e-6)
    plain = infonce_loss(
        vecs(q), vecs(pos), neg, mask, temperature=t, use_batch=True, mask_fake_negative=False
    )
    assert plain.item() > got.item() + 0.1  # without keys, those false negatives weigh on the loss


# --- multi-rank exactness --------------------------------------------------------------------------------

FEATURES, DIM, TEMPERATURE = 8, 6, 0.1
NEG_COUNTS = [2, 0, 3, 1, 0, 2]  # per row of the global batch; ranks see different padding widths
QUERY_KEYS = [1, 2, 3, 1, 4, 5]  # rows 0 and 3: one query, two positives (on different ranks)
POSITIVE_KEYS = [100, 101, 102, 103, 104, 100]  # row 5's positive is a copy of row 0's (other rank)


def row_keys(rows):
    """The (B + K, 2) document keys the train step's collator builds."""
    docs = [[POSITIVE_KEYS[i], QUERY_KEYS[i]] for i in rows]
    docs += [[1000 + 10 * i + j, -1] for i in rows for j in range(NEG_COUNTS[i])]
    return torch.tensor(docs).reshape(-1, 2)


def make_problem():
    """Identical encoder and inputs in every process: a linear 'encoder' over fixed feature vectors."""
    torch.manual_seed(0)
    encoder = torch.nn.Linear(FEATURES, DIM).double()
    g = torch.Generator().manual_seed(1)
    qx = torch.randn(len(NEG_COUNTS), FEATURES, generator=g, dtype=torch.float64)
    px = torch.randn(len(NEG_COUNTS), FEATURES, generator=g, dtype=torch.float64)
    nx = [torch.randn(c, FEATURES, generator=g, dtype=torch.float64) for c in NEG_COUNTS]
    return encoder, qx, px, nx


def encode_rows(encoder, qx, px, nx, rows, width=None):
    """Encode rows [start, stop) the way the train step does: real negatives only, then packed."""
    counts = [len(nx[i]) for i in rows]
    width = max(counts) if width is None else width
    mask = torch.tensor([[j < c for j in range(width)] for c in counts], dtype=torch.bool).view(
        len(rows), width
    )
    emb = lambda x: F.normalize(encoder(x), dim=-1)  # noqa: E731
    flat = emb(torch.cat([nx[i] for i in rows]))
    return emb(qx[rows]), emb(px[rows]), pack_negatives(flat, mask), mask


def grads(encoder):
    return torch.cat([p.grad.flatten() for p in encoder.parameters()])


def reference_grads(fake: bool, keyed: bool = False) -> torch.Tensor:
    encoder, qx, px, nx = make_problem()
    rows = list(range(len(NEG_COUNTS)))
    q, pos, neg, mask = encode_rows(encoder, qx, px, nx, rows)
    dk = row_keys(rows) if keyed else None
    infonce_loss(
        q, pos, neg, mask, temperature=TEMPERATURE, use_batch=True, mask_fake_negative=fake,
        doc_keys=dk,
    ).backward()  # fmt: skip
    return grads(encoder)


def _two_rank_worker(rank: int, world: int, port: int, out_path: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = {}
    # (rows per rank, mask_fake_negative): equal halves, and an uneven 4 + 2 split (a last partial batch).
    # keyed: false negatives across ranks (see QUERY_KEYS, POSITIVE_KEYS) masked as in one process.
    for split, fake, keyed in [(3, False, False), (3, True, False), (4, False, False), (3, False, True)]:
        encoder, qx, px, nx = make_problem()
        rows = list(range(split)) if rank == 0 else list(range(split, len(NEG_COUNTS)))
        q, pos, neg, mask = encode_rows(encoder, qx, px, nx, rows)
        dk = row_keys(rows) if keyed else None
        loss = infonce_loss(
            q, pos, neg, mask, temperature=TEMPERATURE, use_batch=True, mask_fake_negative=fake,
            world_size=world, rank=rank, doc_keys=dk,
        )  # fmt: skip
        loss.backward()
        g = grads(encoder)
        dist.all_reduce(g)
        results[("ours", split, fake, keyed)] = g / world  # what DDP / DeepSpeed apply: the mean over ranks
    # ms-swift's way: gather detached copies, put back this rank's own (with grad), every rank computes the
    # loss of the whole global batch.
    encoder, qx, px, nx = make_problem()
    rows = [0, 1, 2] if rank == 0 else [3, 4, 5]
    local = encode_rows(encoder, qx, px, nx, rows, width=max(NEG_COUNTS))
    gathered = []
    for t in local:
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.detach().contiguous())
        parts[rank] = t
        gathered.append(torch.cat(parts))
    infonce_loss(*gathered, temperature=TEMPERATURE, use_batch=True, mask_fake_negative=False).backward()
    g = grads(encoder)
    dist.all_reduce(g)
    results["detached"] = g / world
    if rank == 0:
        torch.save(results, out_path)
    dist.destroy_process_group()


def test_infonce_two_ranks_match_one_rank_gradients(tmp_path):
    out = tmp_path / "grads.pt"
    mp.spawn(_two_rank_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    results = torch.load(out)
    for fake in (False, True):
        ref = reference_grads(fake)
        assert ref.abs().max() > 1e-3
        torch.testing.assert_close(results[("ours", 3, fake, False)], ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(results[("ours", 4, False, False)], reference_grads(False), rtol=0, atol=1e-5)
    keyed = reference_grads(False, keyed=True)
    assert (keyed - reference_grads(False)).abs().max() > 1e-3  # the masks change the problem
    torch.testing.assert_close(results[("ours", 3, False, True)], keyed, rtol=0, atol=1e-5)
    # The detached gather does not match: it yields 1/world_size of the large-batch gradient.
    ref = reference_grads(False)
    assert (results["detached"] - ref).abs().max() > 1e-3
    torch.testing.assert_close(results["detached"] * 2, ref, rtol=0, atol=1e-5)


# --- Matryoshka --------------------------------------------------------------------------------------------


def test_matryoshka_with_only_the_full_dimension_is_the_plain_loss_exactly():
    neg, mask = padded_negs(NEGS)
    q, pos = vecs(Q), vecs(POS)
    emb = torch.cat([q, pos, neg[mask]])  # (T, 2) as the model returns them: [queries, positives, negatives]

    def infonce_of(out):
        b = len(Q)
        return infonce_loss(
            out[:b], out[b : 2 * b], pack_negatives(out[2 * b :], mask), mask,
            temperature=0.5, use_batch=True, mask_fake_negative=False,
        )  # fmt: skip

    plain = infonce_of(emb)
    assert matryoshka_loss(infonce_of, emb, [2], [1.0]).item() == plain.item()
    assert matryoshka_loss(infonce_of, emb, [2], [3.0]).item() == pytest.approx(plain.item(), rel=1e-15)
    labels = torch.tensor([1.0, 0.0, 1.0])
    cos_of = lambda out: cosine_similarity_loss(out[:3], out[3:6], labels)  # noqa: E731
    assert matryoshka_loss(cos_of, emb, [2], [1.0]).item() == cos_of(emb).item()


def test_matryoshka_two_dims_match_hand_computed_value():
    """a = (1, 0, 1, 0)/sqrt2, b = (0, 1, 1, 0)/sqrt2: cos 0.5 at width 4; truncated to 2 and re-normalized
    they are (1, 0) and (0, 1): cos 0. Label 1, weights 1 (width 4) and 3 (width 2):
    (1 * (0.5 - 1)^2 + 3 * (0 - 1)^2) / 4 = 0.8125."""
    r = 1 / math.sqrt(2)
    emb = torch.tensor([[r, 0, r, 0], [0, r, r, 0]], dtype=torch.float64, requires_grad=True)
    loss = matryoshka_loss(
        lambda out: cosine_similarity_loss(out[:1], out[1:], torch.tensor([1.0])), emb, [4, 2], [1.0, 3.0]
    )
    assert loss.item() == pytest.approx(0.8125, rel=1e-12)
    loss.backward()
    assert emb.grad.abs().sum() > 0

    # infonce, 2 queries x 2 positives, in-batch only: each width's softmax by hand.
    q = [[1, 0, 0, 1], [0, 1, 1, 0]]
    p = [[1, 0, 1, 0], [0, 1, 0, 1]]
    t, mask = 0.5, torch.zeros(2, 0, dtype=torch.bool)
    emb = torch.tensor([[x / math.sqrt(2) for x in v] for v in q + p], dtype=torch.float64)

    def infonce_of(out):
        return infonce_loss(
            out[:2], out[2:4], out.new_zeros(0, out.shape[1]), mask,
            temperature=t, use_batch=True, mask_fake_negative=False,
        )  # fmt: skip

    def by_hand(qs, ps):
        unit = lambda v: [x / math.sqrt(sum(y * y for y in v)) for x in v]  # noqa: E731
        qs, ps = [unit(v) for v in qs], [unit(v) for v in ps]
        dot = lambda a, b: sum(x * y for x, y in zip(a, b, strict=True))  # noqa: E731
        return sum(ce(dot(qs[i], ps[i]) / t, [dot(qs[i], ps[1 - i]) / t]) for i in range(2)) / 2

    full = by_hand(q, p)  # width 4: cos(q0, p0) = 0.5, cos(q0, p1) = 0.5 ...
    half = by_hand([v[:2] for v in q], [v[:2] for v in p])  # width 2: q0 = p0 = (1, 0), q1 = p1 = (0, 1)
    got = matryoshka_loss(infonce_of, emb, [4, 2], [2.0, 1.0])
    assert got.item() == pytest.approx((2 * full + half) / 3, rel=1e-12)
    assert abs(full - half) > 0.1  # the two widths differ: the test sees each term


def test_matryoshka_spec_parses_and_names_bad_values():
    assert matryoshka_spec("") == ([], [])
    assert matryoshka_spec("1024, 512,256") == ([1024, 512, 256], [1.0, 1.0, 1.0])
    assert matryoshka_spec("8,4", "1,0.5") == ([8, 4], [1.0, 0.5])
    for dims, weights, match in [
        ("8,x", "", "matryoshka_dims: .* not a comma-separated list"),
        ("8,8", "", "distinct positive"),
        ("8,0", "", "distinct positive"),
        ("8,4", "1", "must be 2 positive numbers"),
        ("8,4", "1,-1", "must be 2 positive numbers"),
        ("", "1", "without matryoshka_dims"),
    ]:
        with pytest.raises(ValueError, match=match):
            matryoshka_spec(dims, weights)


MRL_DIMS, MRL_WEIGHTS = [DIM, 4, 2], [1.0, 0.5, 0.25]


def mrl_loss(q, pos, neg, mask, **kw):
    """infonce under Matryoshka, from the concatenated embeddings as the train step holds them."""
    b = len(q)
    emb = torch.cat([q, pos, neg[mask]])

    def loss_of(out):
        return infonce_loss(
            out[:b], out[b : 2 * b], pack_negatives(out[2 * b :], mask), mask,
            temperature=TEMPERATURE, use_batch=True, mask_fake_negative=False, **kw,
        )  # fmt: skip

    return matryoshka_loss(loss_of, emb, MRL_DIMS, MRL_WEIGHTS)


def _matryoshka_two_rank_worker(rank: int, world: int, port: int, out_path: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    encoder, qx, px, nx = make_problem()
    rows = [0, 1, 2] if rank == 0 else [3, 4, 5]
    q, pos, neg, mask = encode_rows(encoder, qx, px, nx, rows)
    mrl_loss(q, pos, neg, mask, world_size=world, rank=rank).backward()
    g = grads(encoder)
    dist.all_reduce(g)
    if rank == 0:
        torch.save(g / world, out_path)  # what DDP / DeepSpeed apply: the mean over ranks
    dist.destroy_process_group()


def test_matryoshka_infonce_two_ranks_match_one_rank_gradients(tmp_path):
    out = tmp_path / "grads.pt"
    mp.spawn(_matryoshka_two_rank_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    encoder, qx, px, nx = make_problem()
    q, pos, neg, mask = encode_rows(encoder, qx, px, nx, list(range(len(NEG_COUNTS))))
    mrl_loss(q, pos, neg, mask).backward()
    ref = grads(encoder)
    assert (ref - reference_grads(False)).abs().max() > 1e-3  # the truncated widths change the gradient
    torch.testing.assert_close(torch.load(out), ref, rtol=0, atol=1e-5)


# --- data checks -----------------------------------------------------------------------------------------


PARAMS = {"use_batch": False, "min_group_size": 2}  # the loss knobs check_loss_data reads (resolve_knobs)


def test_check_loss_data_names_problem_rows():
    rows = [
        {"_line": 3, "query": "q", "response": "r"},
        {"_line": 5, "query": "q", "response": "r", "rejected_response": ["n"]},
        {"_line": 7, "query": "q", "response": "r", "rejected_response": []},
    ]
    with pytest.raises(DataError, match=r"train.jsonl lines 3, 7: rejected_response: infonce needs"):
        check_loss_data("infonce", rows, PARAMS, source="train.jsonl")
    check_loss_data("infonce", rows, None, source="train.jsonl")  # use_batch (default): fine

    labelled = [{"query": "q", "response": "r", "label": y} for y in (1, 0.5, 0, None, "1")]
    with pytest.raises(DataError, match=r"rows 2, 4, 5: label: contrastive needs label 0 or 1") as err:
        check_loss_data("contrastive", labelled + [{"query": "q", "response": "", "label": 1}])
    assert "\n" not in str(err.value) and "rows 6: response:" in str(err.value)  # every problem, one line
    with pytest.raises(DataError, match=r"rows 4, 5: label: cosine_similarity needs a numeric label"):
        check_loss_data("cosine_similarity", labelled)
    with pytest.raises(DataError, match=r"listwise_reranker needs rows with at least 1 negative"):
        check_loss_data("listwise_reranker", [rows[0], rows[2]], PARAMS)
    check_loss_data("listwise_reranker", rows, PARAMS)  # some groups too small: skipped, reported by the loss
