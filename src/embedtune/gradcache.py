"""Gradient cache (GradCache): the loss and gradients of a large batch, exactly, at the memory of a small chunk.

Why: infonce gets better with more in-batch negatives, but one forward pass over a batch keeps the
activations of every text for the backward pass (16 rows of 5 texts at 512 tokens already fill an H200),
and gradient accumulation adds no negatives. The loss itself only needs the outputs: (T, H) embeddings,
tiny next to the activations that produced them. So (Gao et al. 2021, "Scaling Deep Contrastive Learning
Batch Size under Memory Limited Setup"):

1. encode the T texts chunk by chunk without a graph, recording the RNG state before each chunk;
2. compute the loss of the whole batch on a leaf copy of those outputs, with the same loss function as
   without the cache (infonce's cross-rank gather included), and back-propagate it to the leaf only:
   g = d loss / d outputs, (T, H). No parameter is involved yet;
3. per chunk: restore its RNG state (the same dropout masks as in 1), encode it again with a graph and
   back-propagate sum(outputs_chunk * g_chunk). Its gradient with respect to the parameters is
   J_chunk^T g_chunk, so the sum over chunks is the chain rule of the uncached step: the same gradient.

With dropout, "the same gradient" means that of the outputs pass 1 computed: chunked, each chunk with its
own masks. A one-pass forward over the whole batch would draw other masks (different shapes, different
draws), which is a different random sample, not a different loss.

Cost: one more forward pass per step (about 1.33x the compute when backward costs two forwards). Memory:
the activations of one chunk, plus the (T, H) outputs and their gradient.

Everything model- or engine-specific is passed in (`encode`, `loss_of`, `backward`, `no_sync`), so the
same three passes run under a plain module, DDP or DeepSpeed (see `EmbedtuneTrainer.training_step`). The
texts come as model features (`embedtune.features`: a dict of tensors, one row per text), which are only
ever sliced by rows and trimmed of padding columns here, so any input a model takes rides along::

    loss = cached_backward(
        encode=lambda features: model(features),           # n texts -> (n, H) or (n,)
        loss_of=lambda out: loss_fn(out, **batch_extras),  # (T, H) -> scalar
        features=batch["features"], chunk_size=32,
    )                                                      # parameter .grad as after loss.backward()

Under torchrun every rank runs the same number of chunks (`plan`; see `embedtune.distributed`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

import torch

from embedtune.distributed import max_over_ranks
from embedtune.features import Features, count, lengths, take, trim


def _cuda_in_use() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


@dataclasses.dataclass(frozen=True)
class RngState:
    """The default generators' state (CPU, and the current CUDA device's when CUDA is in use): what dropout
    draws its masks from. Restoring it before a chunk's second forward pass replays the first one's masks."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None

    @classmethod
    def capture(cls) -> RngState:
        return cls(torch.get_rng_state(), torch.cuda.get_rng_state() if _cuda_in_use() else None)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda)


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Rows `rows` of the batch; `real` False: a stand-in (row 0, gradient zero) that keeps this rank's number
    of forward passes equal to the other ranks' when it holds fewer texts than chunks."""

    rows: slice
    real: bool = True


def plan(
    n: int, chunk_size: int, device: torch.device | str = "cpu", lengths=None, chunk_tokens: int = 0
) -> list[Chunk]:
    """Chunks of a batch of `n` texts: at most `chunk_size` texts each (0: no cap on texts), or with
    `chunk_tokens` at most that many padded tokens each (texts x the chunk's longest, `lengths` per text:
    the same memory per chunk whatever the lengths; a text longer than the budget gets a chunk of its own);
    the same number of chunks on every rank.

    The count is the largest over the ranks (one all_reduce under torchrun). By texts, each rank cuts its own
    `n` into that many near-equal consecutive parts (sizes differ by at most one, so a rank with a few texts
    less runs no nearly empty chunk); by tokens, consecutive texts are taken while the budget holds. A rank with
    fewer chunks pads with stand-ins. `device`: where the all_reduce's tensor lives (CUDA under NCCL).
    """
    if chunk_tokens > 0:
        bounds, longest = [0], 0
        for i, length in enumerate(lengths):
            taken = i - bounds[-1]
            longest = max(longest, int(length))
            if taken and ((taken + 1) * longest > chunk_tokens or (chunk_size and taken >= chunk_size)):
                bounds.append(i)
                longest = int(length)
        bounds.append(n)
        cuts = [Chunk(slice(a, b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        return cuts + [Chunk(slice(0, 1), real=False)] * (max_over_ranks(len(cuts), device) - len(cuts))
    chunks = max_over_ranks(-(-n // chunk_size), device)
    bounds = [n * i // chunks for i in range(chunks + 1)]
    return [
        Chunk(slice(a, b)) if b > a else Chunk(slice(0, 1), real=False)
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]


def encode_without_graph(
    encode: Callable[[Features], torch.Tensor], features: Features, chunk_size: int, chunk_tokens: int = 0
) -> tuple[torch.Tensor, list[Chunk], list[RngState]]:
    """Pass 1: every text's output, chunk by chunk, without a graph; returns `(outputs (T, ...), chunks,
    the RNG state before each chunk)`. Also the eval loss path: the memory of one chunk, same outputs."""
    mask = features["attention_mask"]
    chunks = plan(count(features), chunk_size, mask.device, lengths(features).tolist(), chunk_tokens)
    states, outs = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(RngState.capture())
            out = encode(trim(take(features, chunk.rows)))
            if chunk.real:
                outs.append(out)
    return torch.cat(outs), chunks, states


def _backward(loss: torch.Tensor, last: bool) -> None:
    loss.backward()


def cached_backward(
    encode: Callable[[Features], torch.Tensor],
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    features: Features,
    chunk_size: int,
    backward: Callable[[torch.Tensor, bool], None] = _backward,
    no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    chunk_tokens: int = 0,
) -> torch.Tensor:
    """The three passes (module docstring); the parameters' gradients accumulate as after
    `loss_of(encode(features)).backward()`. Returns the loss, detached.

    Args:
        encode: the features of n texts (one chunk) -> their `(n, ...)` outputs; called twice per chunk,
            first without a graph.
        loss_of: the batch's outputs `(T, ...)` -> scalar loss (any scaling, e.g. for gradient accumulation,
            included). Called once, on a leaf tensor: only its gradient with respect to the outputs is used.
        features: the model inputs of every text of the batch (`embedtune.features`, T rows).
        chunk_size: at most this many texts per forward pass (0 with `chunk_tokens`: no cap on texts).
        backward: `backward(scalar, last)` back-propagates one chunk's surrogate scalar (`last`: the batch's
            final chunk, after which an engine may reduce gradients and step). Default: `.backward()`. A
            scalar, not `out.backward(g)`, because engines (DeepSpeed) take a scalar loss and scale it
            (fp16 loss scaling) the same way they would scale the uncached loss.
        no_sync: a context for every chunk but the last (DDP's `no_sync`: all-reduce once, not per chunk).
        chunk_tokens: > 0: also at most this many padded tokens per forward pass (`plan`).
    """
    outputs, chunks, states = encode_without_graph(encode, features, chunk_size, chunk_tokens)
    leaf = outputs.detach().requires_grad_()
    loss = loss_of(leaf)
    (grad,) = torch.autograd.grad(loss, leaf, allow_unused=True)  # (T, ...) d loss / d outputs
    if grad is None:  # the loss ignores the outputs (e.g. every listwise group skipped)
        grad = torch.zeros_like(leaf)
    del leaf, outputs
    # fork_rng: once replayed, the generators are left where pass 1 left them (the next step draws anew).
    devices = [torch.cuda.current_device()] if _cuda_in_use() else []
    with torch.random.fork_rng(devices=devices):
        for i, (chunk, state) in enumerate(zip(chunks, states, strict=True)):
            last = i == len(chunks) - 1
            with contextlib.nullcontext() if last else no_sync():
                state.restore()
                out = encode(trim(take(features, chunk.rows)))
                g = grad[chunk.rows] if chunk.real else torch.zeros_like(out)
                # d/d params of sum(out * g) = J^T g: this chunk's share of the uncached gradient.
                backward((out * g.to(out.dtype)).sum(), last)
    return loss.detach()
