"""Pooling: each text's hidden states (B, L, H) -> one vector (B, H), padded or packed.

- `last`: the last real token (decoder LLMs: Qwen3-Embedding, gte-Qwen2, after the appended end-of-text token);
- `mean`: the mean of the real tokens (BERT, MiniLM), summed in fp32;
- `cls`: the first real token (gte-modernbert).
Real tokens come from the attention mask (`pool`: either padding side) or from the packed row's segments
(`pool_packed`, padding-free: straight from the packed output, no re-padding).
"""

from __future__ import annotations

import torch

from embedtune.errors import EmbedtuneError
from embedtune.features import segments
from embedtune.knobs import POOLINGS  # noqa: F401  (one source: the knob table)


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, L, H) hidden states + (B, L) mask -> (B, H), independent of the padding side."""
    if pooling == "mean":  # summed in fp32: a bf16 sum over hundreds of tokens would lose the low bits
        m = mask.unsqueeze(-1).to(torch.float32)
        return (hidden.float() * m).sum(1) / m.sum(1).clamp(min=1e-9)
    positions = torch.arange(mask.shape[1], device=mask.device)
    if pooling == "last":
        idx = (mask.long() * positions).argmax(1)  # index of the last 1 in each row
    elif pooling == "cls":
        idx = mask.long().argmax(1)  # index of the first 1 in each row
    else:
        raise EmbedtuneError(f"unknown pooling {pooling!r}: choose one of {POOLINGS}")
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]


def pool_packed(hidden: torch.Tensor, features: dict, pooling: str) -> torch.Tensor:
    """(N, H) hidden states of packed texts (`features.pack`) -> (T, H): the last, first or mean real token of
    each text, read straight from the packed row (no re-padding)."""
    starts, n = segments(features)
    if pooling == "last":
        return hidden[starts + n - 1]
    if pooling == "cls":
        return hidden[starts]
    if pooling == "mean":  # summed in fp32, as `pool`
        text = torch.repeat_interleave(torch.arange(len(n), device=hidden.device), n)
        sums = hidden.new_zeros(len(n), hidden.shape[-1], dtype=torch.float32).index_add_(
            0, text, hidden.float()
        )
        return sums / n.unsqueeze(1).to(torch.float32)
    raise EmbedtuneError(f"unknown pooling {pooling!r}: choose one of {POOLINGS}")


def append_eos_post_processor(tokenizer) -> None:
    """Make a fast tokenizer append its end-of-text token, as Qwen3-Embedding's own tokenizer does.

    Done on the tokenizer itself (not in our batching code) so the saved tokenizer does the same inside
    sentence-transformers: training, evaluation and serving see identical token ids.
    """
    from tokenizers import processors

    eos = "<|endoftext|>" if "<|endoftext|>" in tokenizer.get_vocab() else tokenizer.eos_token
    if eos is None:
        raise EmbedtuneError("last-token pooling needs an end-of-text token; the tokenizer has none")
    eos_id = tokenizer.convert_tokens_to_ids(eos)
    if tokenizer("a")["input_ids"][-1] == eos_id:
        return  # already appends it
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise EmbedtuneError("last-token pooling needs a fast tokenizer to append the end-of-text token")
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A {eos} $B:1 {eos}:1", special_tokens=[(eos, eos_id)]
    )
    assert tokenizer("a")["input_ids"][-1] == eos_id
