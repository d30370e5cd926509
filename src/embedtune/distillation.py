"""Distillation losses: a student trained on a teacher's scores of each row's documents (`teacher_scores`).

The pipeline shape BGE, Tevatron and sentence-transformers train strong retrievers with: mine negatives,
score every (query, document) with a stronger model (`embedtune score`: a reranker, or an embedder's cosine),
store the scores in the row, train on them. A row's group is its positive then its negatives; the teacher
scored each of them (`teacher_scores[0]` the positive's), so a resampled negative brings its score along.

Student scores: an embedder's cosine ``q . d`` (unit vectors), a reranker's ``z`` (logit(yes) - logit(no) or
the classifier's logit); each divided by ``student_temperature`` (0: the task's default, 0.02 for cosines as
Tevatron and FlagEmbedding, 1 for a reranker's logits). Teacher scores are divided by ``teacher_temperature``
(1: raw reranker logits, FlagEmbedding's choice) and never get a gradient.

- ``distill_kl``: ``KL(softmax(teacher / T_t) || softmax(student / T_s))`` over each row's group, the mean over
  rows; plus ``infonce_weight`` times infonce over the whole batch (0: pure KL as Tevatron; 1: FlagEmbedding's
  KL + InfoNCE). sentence-transformers' DistillKLDivLoss is this KL times ``T_s**2`` (Hinton's factor, which
  keeps gradients comparable only for T >= 1: with a cosine student at T_s = 0.02 it would scale the loss by
  4e-4); it is not applied here.
- ``margin_mse``: ``mean over (row, negative) of ((s_pos - s_neg) / T_s - (t_pos - t_neg) / T_t)^2``
  (Hofstätter et al.; sentence-transformers' MarginMSELoss at T_s = T_t = 1).

Embedding losses are exact across ranks like infonce: each rank's sum is scaled by ``world_size / global
count`` (DDP and DeepSpeed average gradients over ranks), so 2 ranks x B rows train like 1 rank x 2B rows.
Reranker losses average this rank's groups, like listwise_reranker.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from embedtune.losses import _up, infonce_loss, pack_negatives

EMBEDDING_STUDENT_TEMPERATURE = (
    0.02  # cosines in [-1, 1]: Tevatron's distil_temperature, FlagEmbedding's 0.02
)
RERANKER_STUDENT_TEMPERATURE = 1.0  # logits already spread like the teacher's


def _global_count(n: torch.Tensor, world_size: int) -> torch.Tensor:
    """``n`` summed over the data-parallel group (every rank must call this when world_size > 1)."""
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        n = n.clone()
        dist.all_reduce(n)
    return n


def _embedding_group(q, pos, neg, neg_mask, teacher, t_s: float, t_t: float):
    """``(student, teacher, real)``, each ``(B, 1 + N)``: each query's cosine with its positive (column 0) and
    its negatives over ``t_s`` (0: EMBEDDING_STUDENT_TEMPERATURE), the teacher's scores over ``t_t``, and
    which slots hold a real document."""
    q = _up(q)
    neg = pack_negatives(neg, neg_mask) if neg.dim() == 2 else neg
    sims = torch.cat([(q * _up(pos)).sum(-1, keepdim=True), torch.einsum("bd,bnd->bn", q, _up(neg))], 1)
    real = torch.cat([neg_mask.new_ones(len(q), 1), neg_mask.to(q.device)], 1)
    return sims / (t_s or EMBEDDING_STUDENT_TEMPERATURE), _up(teacher) / t_t, real


def _reranker_group(z, group_sizes, teacher, t_s: float, t_t: float):
    """``(student, teacher, real)``, each ``(G, longest)``: a reranker's flat scores ``z`` and the teacher's
    ``(M,)`` cut into their groups, over ``t_s`` (0: RERANKER_STUDENT_TEMPERATURE) and ``t_t``."""
    student, real = _groups(_up(z) / (t_s or RERANKER_STUDENT_TEMPERATURE), group_sizes)
    target, _ = _groups(_up(teacher).to(student) / t_t, group_sizes)
    return student, target, real


def _kl_rows(student: torch.Tensor, teacher: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Per row ``KL(softmax(teacher) || softmax(student))`` over its real slots ``(G, L)`` -> ``(G,)``."""
    log_p = torch.log_softmax(student.masked_fill(~real, float("-inf")), -1).masked_fill(~real, 0.0)
    p_t = torch.softmax(teacher.detach().to(student).masked_fill(~real, float("-inf")), -1)
    return (torch.xlogy(p_t, p_t) - p_t * log_p).sum(-1)


def _margin_terms(student: torch.Tensor, teacher: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """``(G, L - 1)`` squared margin errors, zero where the negative slot is padding."""
    teacher = teacher.detach().to(student).masked_fill(~real, 0.0)
    err = (student[:, :1] - student[:, 1:]) - (teacher[:, :1] - teacher[:, 1:])
    return err.pow(2) * real[:, 1:]


def distill_kl_loss(
    q: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor,
    neg_mask: torch.Tensor,
    teacher: torch.Tensor,
    *,
    student_temperature: float = 0.0,
    teacher_temperature: float = 1.0,
    infonce_weight: float = 0.0,
    world_size: int = 1,
    rank: int = 0,
    doc_keys: torch.Tensor | None = None,
    **infonce_knobs,
) -> torch.Tensor:
    """KL from the teacher's distribution over each row's group to the student's (see the module docstring).

    q, pos: ``(B, D)`` unit embeddings; neg ``(B, N, D)`` (or the real ones ``(K, D)``) with ``neg_mask``
    ``(B, N)``; teacher: ``(B, 1 + N)`` scores, column 0 the positive's (padding slots are ignored).
    ``infonce_knobs`` (temperature, use_batch, mask_fake_negative, ...) go to :func:`losses.infonce_loss`
    when ``infonce_weight > 0``.
    """
    kl = _kl_rows(*_embedding_group(q, pos, neg, neg_mask, teacher, student_temperature, teacher_temperature))
    rows = _global_count(torch.tensor(float(len(kl)), device=kl.device), world_size)
    loss = kl.sum() * (world_size / rows)
    if infonce_weight:
        loss = loss + infonce_weight * infonce_loss(
            q, pos, neg, neg_mask, world_size=world_size, rank=rank, doc_keys=doc_keys, **infonce_knobs
        )
    return loss


def margin_mse_loss(
    q: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor,
    neg_mask: torch.Tensor,
    teacher: torch.Tensor,
    *,
    student_temperature: float = 0.0,
    teacher_temperature: float = 1.0,
    world_size: int = 1,
    rank: int = 0,
    doc_keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """Margin-MSE over every (row, real negative): the student's margin pos - neg regresses the teacher's.
    Shapes as :func:`distill_kl_loss`. Rows without a negative add nothing."""
    student, target, real = _embedding_group(
        q, pos, neg, neg_mask, teacher, student_temperature, teacher_temperature
    )
    terms = _margin_terms(student, target, real)
    pairs = _global_count(real[:, 1:].sum().to(terms), world_size).clamp(min=1)
    return terms.sum() * (world_size / pairs)


def _groups(flat: torch.Tensor, group_sizes) -> tuple[torch.Tensor, torch.Tensor]:
    """Consecutive groups of ``flat`` ``(M,)`` as ``(G, longest)`` padded with 0, and where they are real."""
    sizes = torch.as_tensor(group_sizes, device=flat.device, dtype=torch.long)
    real = torch.arange(int(sizes.max()), device=flat.device)[None, :] < sizes[:, None]  # (G, longest)
    return flat.new_zeros(real.shape).masked_scatter(real, flat), real


def distill_kl_reranker_loss(
    z: torch.Tensor,
    group_sizes,
    teacher: torch.Tensor,
    *,
    student_temperature: float = 0.0,
    teacher_temperature: float = 1.0,
) -> torch.Tensor:
    """:func:`distill_kl_loss` for a reranker: z ``(M,)`` flat scores of groups [positive, negatives...]
    (``group_sizes`` ``(G,)``), teacher ``(M,)`` in the same order; the mean over this rank's groups."""
    return _kl_rows(
        *_reranker_group(z, group_sizes, teacher, student_temperature, teacher_temperature)
    ).mean()


def margin_mse_reranker_loss(
    z: torch.Tensor,
    group_sizes,
    teacher: torch.Tensor,
    *,
    student_temperature: float = 0.0,
    teacher_temperature: float = 1.0,
) -> torch.Tensor:
    """:func:`margin_mse_loss` for a reranker (shapes as :func:`distill_kl_reranker_loss`), this rank's pairs."""
    student, target, real = _reranker_group(z, group_sizes, teacher, student_temperature, teacher_temperature)
    terms = _margin_terms(student, target, real)
    return terms.sum() / real[:, 1:].sum().clamp(min=1)
