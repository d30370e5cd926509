"""A probe for tests: every trainable parameter's gradient at each optimizer step of a real `embedtune train`
run, as the optimizer receives it (averaged over ranks, before clipping), and the run's result.

The run is the real one (`embedtune.steps.train.run`: Trainer, DDP or DeepSpeed ZeRO-3, optimizer); the probe
only reads gradients, at the one moment they are whole: just before clipping (plain / DDP:
`Trainer._clip_grad_norm`), or just before the engine's optimizer step (DeepSpeed: `DeepSpeedEngine.step`,
full gradients assembled from the ZeRO-3 shards with `deepspeed.utils.safe_get_full_grad`, a collective).

In-process: `steps = install(monkeypatch.setattr); train.run(cfg)`. Under torchrun::

    python -m torch.distributed.run --nproc-per-node 2 tests/grad_probe.py CONFIG.json OUT.pt

runs `train.run(TrainConfig(**CONFIG))` on every rank; rank 0 saves `{"grads": steps, "result": result}`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from embedtune.trainer import EmbedtuneTrainer


def _named_grads(module, grad_of) -> dict[str, torch.Tensor]:
    return {
        name: grad_of(p).detach().float().cpu().clone()
        for name, p in module.named_parameters()
        if p.requires_grad
    }


def install(setattr_) -> list[dict[str, torch.Tensor]]:
    """Patch the two read points with `setattr_(owner, name, value)` (pytest's `monkeypatch.setattr`, or
    the builtin `setattr` in a throwaway process); returns the list each optimizer step appends to."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.utils import safe_get_full_grad

    steps: list[dict[str, torch.Tensor]] = []
    clip, engine_step = EmbedtuneTrainer._clip_grad_norm, DeepSpeedEngine.step

    def clip_grad_norm(self, model):
        if not self.is_deepspeed_enabled:  # DeepSpeed's gradients were read in its step, already taken
            steps.append(_named_grads(self.model, lambda p: p.grad))
        return clip(self, model)

    def step(self, *args, **kwargs):
        if self.is_gradient_accumulation_boundary():
            steps.append(_named_grads(self.module, safe_get_full_grad))
        return engine_step(self, *args, **kwargs)

    setattr_(EmbedtuneTrainer, "_clip_grad_norm", clip_grad_norm)
    setattr_(DeepSpeedEngine, "step", step)
    return steps


def main(config_path: str, out_path: str) -> None:
    import os

    from embedtune.config import TrainConfig
    from embedtune.steps import train

    steps = install(setattr)
    cfg = TrainConfig(**json.loads(Path(config_path).read_text()))
    result = train.run(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save({"grads": steps, "result": result}, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
