"""infonce forward + backward: embedtune's padded, vectorized loss vs ms-swift's per-sample Python loop.

Same embeddings, batch 64 queries, 0-15 ragged hard negatives per row, in-batch negatives on (ms-swift's
default path when rows have unequal negative counts). Checks both give the same loss and gradients, then
prints ms per iteration of each and the ratio.

    .venv/bin/python bench/infonce_loss.py [--batch 64] [--dim 384] [--max-neg 15] [--iters 30] [--threads 1]

The embeddings are random unit vectors: the loss's cost does not depend on what the vectors mean, so this
benchmark needs no data set.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from embedtune.losses import infonce_loss, pack_negatives


# --- the peer: ms-swift's InfoNCE path for unequal negative counts (use_batch, single rank) ---------------
def swift_split(sentences, labels):
    """ms-swift `_parse_multi_negative_sentences`: `labels` marks 1 = positive; rows are [q, pos, negs...]."""
    split_indices = torch.nonzero(labels, as_tuple=False).squeeze().tolist()
    if isinstance(split_indices, int):
        split_indices = [split_indices]
    split_indices.append(len(labels))
    split_indices = np.array(split_indices) + np.array(list(range(len(split_indices))))
    return [sentences[split_indices[i] : split_indices[i + 1]] for i in range(len(split_indices) - 1)]


def swift_infonce(sentences, labels, temperature, mask_fake_negative=False, margin=0.1):
    """ms-swift `_compute_cross_batch_loss_unbatched`: one query at a time against all documents."""
    split_tensors = swift_split(sentences, labels)
    all_docs = torch.cat([t[1:] for t in split_tensors], dim=0)
    loss = 0
    offset = 0
    for tensor in split_tensors:
        query = tensor[0]
        target = torch.tensor(offset, device=tensor.device)
        qd_vec = torch.matmul(query, all_docs.T)
        threshold = qd_vec[target].detach() + margin
        if mask_fake_negative:
            qd_vec = torch.where(qd_vec > threshold, torch.tensor(float("-inf")), qd_vec)
        logits_row = torch.cat([qd_vec], dim=-1) / temperature
        loss += nn.CrossEntropyLoss()(logits_row.unsqueeze(0), target.unsqueeze(0))
        offset += tensor.size(0) - 1
    return loss / len(split_tensors)


def make_inputs(batch, dim, max_neg, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, max_neg + 1, (batch,), generator=g)
    unit = lambda n: F.normalize(torch.randn(n, dim, generator=g), dim=-1)  # noqa: E731
    q, pos, flat = unit(batch), unit(batch), unit(int(counts.sum()))
    mask = torch.arange(max(int(counts.max()), 1)) < counts[:, None]  # (B, N) real-negative slots
    # ms-swift's layout: [q0, pos0, negs0..., q1, pos1, ...] with labels 1 at each positive (0 elsewhere)
    rows, labels, start = [], [], 0
    for i, c in enumerate(counts.tolist()):
        rows += [q[i : i + 1], pos[i : i + 1], flat[start : start + c]]
        labels += [1] + [0] * c
        start += c
    sentences = torch.cat(rows)
    return q, pos, flat, mask, sentences, torch.tensor(labels), counts


def time_all(fns: dict, iters: dict, repeats: int = 7) -> dict:
    """Median ms per iteration of each function; repeats interleave them so shared-CPU noise hits all alike."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(iters[name]):
                fn()
            samples[name].append((time.perf_counter() - t0) / iters[name] * 1e3)
    return {name: statistics.median(v) for name, v in samples.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--max-neg", type=int, default=15)
    ap.add_argument("--temperature", type=float, default=0.1)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (the test machine's cores are shared)"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    q, pos, flat, mask, sentences, labels, counts = make_inputs(args.batch, args.dim, args.max_neg)
    ours_leaves = [t.clone().requires_grad_(True) for t in (q, pos, flat)]
    swift_leaf = sentences.clone().requires_grad_(True)

    def ours(padded: bool):
        for t in ours_leaves:
            t.grad = None
        qq, pp, ff = ours_leaves
        loss = infonce_loss(
            qq, pp, pack_negatives(ff, mask) if padded else ff, mask,
            temperature=args.temperature, use_batch=True, mask_fake_negative=False,
        )  # fmt: skip
        loss.backward()
        return loss

    def swift():
        swift_leaf.grad = None
        loss = swift_infonce(swift_leaf, labels, args.temperature)
        loss.backward()
        return loss

    # Same loss and the same gradients (ms-swift's rows are [q, pos, negs...]; map them back to ours).
    ls = swift()
    is_q = torch.cat([torch.tensor([True, False] + [False] * c) for c in counts.tolist()])
    is_pos = torch.cat([torch.tensor([False, True] + [False] * c) for c in counts.tolist()])
    g = swift_leaf.grad
    for padded in (False, True):
        lo = ours(padded)
        assert torch.allclose(lo, ls, rtol=1e-5, atol=1e-6), (lo.item(), ls.item())
        for mine, theirs in zip(ours_leaves, (g[is_q], g[is_pos], g[~is_q & ~is_pos]), strict=True):
            assert torch.allclose(mine.grad, theirs, rtol=1e-4, atol=1e-6)

    fns = {"flat": lambda: ours(False), "padded": lambda: ours(True), "loop": swift}
    ms = time_all(fns, {"flat": args.iters, "padded": args.iters, "loop": max(3, args.iters // 5)})
    print(
        f"infonce fwd+bwd, batch {args.batch}, dim {args.dim}, 0-{args.max_neg} negatives per row "
        f"({int(counts.sum())} in all, padded width {mask.shape[1]}), {args.threads} thread(s), "
        f"torch {torch.__version__}"
    )
    print(f"same loss: ours {lo.item():.6f}  per-sample loop {ls.item():.6f}  (gradients equal too)")
    print(f"embedtune, negatives (K, D) as encoded:  {ms['flat']:8.3f} ms/iter")
    print(f"embedtune, negatives padded (B, N, D):   {ms['padded']:8.3f} ms/iter")
    print(f"ms-swift-style per-sample loop:          {ms['loop']:8.3f} ms/iter")
    print(
        f"speedup vs loop: {ms['loop'] / ms['flat']:.1f}x flat, {ms['loop'] / ms['padded']:.1f}x padded (target >= 20x)"
    )


if __name__ == "__main__":
    main()
