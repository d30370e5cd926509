"""The one place embedtune spawns processes: `torchrun(step, cfg, nproc)`.

Multi-process training (one process per GPU, or 2 CPU processes in tests) runs the same CLI under torchrun::

    python -m torch.distributed.run --nproc-per-node 2 --master-port 29517 -m embedtune train --model=... --deepspeed=zero3

Every field of the step's config but `nproc` is passed back as a flag (`--flag=value`, so values starting
with `-` or holding newlines survive), with env-var knobs already resolved. The children see `WORLD_SIZE` (set by torchrun)
and so do not launch again. Their output is streamed to our stderr line by line (our stdout stays free for the
step's JSON result); a failure raises `EmbedtuneError` with the exit code and the children's own error line.

    from embedtune.config import TrainConfig
    from embedtune.launch import torchrun

    torchrun("train", TrainConfig(model="Qwen/Qwen3-Embedding-0.6B", train_data="train.jsonl", output_dir="out"), nproc=8)
"""

from __future__ import annotations

import collections
import dataclasses
import os
import socket
import subprocess
import sys

from embedtune.errors import EmbedtuneError
from embedtune.progress import error_line, say

LAUNCHED = (
    "EMBEDTUNE_LAUNCHED"  # set in the children: they know their flags came from a parent that logged them
)


def inside_torchrun() -> bool:
    """True in a process started by torchrun (or any launcher that sets WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_flags(cfg, exclude: tuple[str, ...] = ()) -> list[str]:
    """`--kebab-name=value` for every field of a config dataclass; `None` fields are left out (unset)."""
    flags = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value is None or f.name in exclude:
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        flags.append(f"--{f.name.replace('_', '-')}={value}")
    return flags


def torchrun(step: str, cfg, nproc: int) -> None:
    """Run `embedtune <step>` in `nproc` processes with torchrun and wait; raise `EmbedtuneError` on failure."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "-m",
        "embedtune",
        step,
        # `--nproc` is not passed: torchrun's parser would take it for its own `--nproc-per-node` (prefix
        # match); the children read their number from WORLD_SIZE.
        *config_flags(cfg, exclude=("nproc",)),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", LAUNCHED: "1"}
    # torchrun pins OMP_NUM_THREADS=1 per process when unset: right for GPUs, 8x slower on a 16-core CPU box.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    say(step, f"launching {nproc} processes: {' '.join(cmd[:10])} ...")
    tail: collections.deque[str] = collections.deque(maxlen=40)
    errors: list[str] = []
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env
    )
    try:
        for line in proc.stdout:
            sys.stderr.write(line)
            tail.append(line.rstrip())
            if line.startswith(error_line(step)) and line.rstrip() not in errors:
                errors.append(line.rstrip())  # every rank prints the same user error: keep one
        rc = proc.wait()
    except BaseException:
        proc.terminate()  # torchrun forwards SIGTERM to its workers
        proc.wait()
        raise
    if rc != 0:
        detail = "\n".join(errors) if errors else "last output:\n" + "\n".join(tail)
        raise EmbedtuneError(f"{step} failed under torchrun with exit code {rc}: {detail}")
