"""Weight interpolation: a fine-tuned model merged with its base, tensor by tensor (linear or slerp).

Why: fine-tuning on one task costs some general ability; merging the tuned weights back toward the base
keeps much of it (FlagEmbedding's LM-Cocktail: 0.5 base + 0.5 tuned), and Qwen3-Embedding's last training
step is a slerp merge. `t` is the tuned model's weight: 0 gives the base, 1 the tuned model.

- linear: ``(1 - t) * base + t * tuned`` (LM-Cocktail's `merge_param`).
- slerp: per tensor, both flattened, ``sin((1 - t) W) / sin W * base + sin(t W) / sin W * tuned`` with
  ``W = arccos(cos(base, tuned))`` (mergekit's per-tensor convention); tensors that are nearly parallel
  (|cos| > 0.9995, where sin W ~ 0 divides badly) or zero fall back to linear.

Only tensors present in both with the same shape and a floating dtype are merged; the others (integer
buffers, a head the base does not have) keep the tuned model's values, and are counted.
"""

from __future__ import annotations

import torch

METHODS = ("linear", "slerp")
PARALLEL = 0.9995  # |cos| above this: slerp falls back to linear (mergekit's DOT_THRESHOLD)


def lerp(base: torch.Tensor, tuned: torch.Tensor, t: float) -> torch.Tensor:
    return (1 - t) * base + t * tuned


def slerp(base: torch.Tensor, tuned: torch.Tensor, t: float) -> tuple[torch.Tensor, bool]:
    """(the spherical interpolation, whether it fell back to linear). Computed in fp64."""
    a, b = base.double().flatten(), tuned.double().flatten()
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return lerp(base.double(), tuned.double(), t), True
    cos = torch.clamp((a @ b) / (na * nb), -1.0, 1.0)
    if cos.abs() > PARALLEL:
        return lerp(base.double(), tuned.double(), t), True
    omega = torch.arccos(cos)
    s = torch.sin(omega)
    out = torch.sin((1 - t) * omega) / s * a + torch.sin(t * omega) / s * b
    return out.view(base.shape), False


def merge_states(base: dict, tuned: dict, method: str, t: float) -> tuple[dict, dict]:
    """(merged state dict in the tuned model's dtypes, counts: merged / linear_fallback / kept_tuned)."""
    if method not in METHODS:
        raise ValueError(f"merge_method: {method!r} is not one of {', '.join(METHODS)}")
    out, counts = {}, {"merged": 0, "linear_fallback": 0, "kept_tuned": 0}
    for name, value in tuned.items():
        other = base.get(name)
        if other is None or other.shape != value.shape or not value.is_floating_point():
            out[name] = value
            counts["kept_tuned"] += 1
            continue
        if method == "linear":
            merged, fell_back = lerp(other.double(), value.double(), t), False
        else:
            merged, fell_back = slerp(other.to(value.device), value, t)
        out[name] = merged.to(value.dtype)
        counts["merged"] += 1
        counts["linear_fallback"] += fell_back
    return out, counts
