"""The one place embedtune spawns processes: `torchrun(step, cfg, nproc)`.

Multi-process training (one process per GPU, or 2 CPU processes in tests) runs the same CLI under torchrun::

    python -m torch.distributed.run --nproc-per-node 2 --master-port 29517 -m embedtune train --model=... --deepspeed=zero3

Inside a multi-node job (Kubeflow Trainer's torch runtime, or any launcher that sets torchrun's own
`PET_NNODES`, `PET_NODE_RANK`, `PET_NPROC_PER_NODE`, `PET_MASTER_ADDR`, `PET_MASTER_PORT` in every node's
environment), `job_topology()` reads them and the same launch joins the job: torchrun gets the job's node
count, this node's rank and the job's rendezvous address instead of one node on 127.0.0.1 (flags equal to what
torchrun would read from those variables itself, written out so the log shows them).

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


@dataclasses.dataclass(frozen=True)
class Topology:
    """A multi-node job as torchrun's `PET_*` variables describe it (one value per node, rank aside)."""

    nnodes: int
    node_rank: int
    nproc_per_node: str  # an int, or torchrun's "auto" / "gpu" / "cpu"
    master_addr: str
    master_port: int


PET_VARS = ("PET_NNODES", "PET_NODE_RANK", "PET_NPROC_PER_NODE", "PET_MASTER_ADDR", "PET_MASTER_PORT")


def job_topology(environ=None) -> Topology | None:
    """The multi-node job this process is a node of, from the `PET_*` variables; None outside one.

    Kubeflow Trainer's `torch-distributed` runtime sets all five in every node's pod (`PET_MASTER_ADDR` is
    node 0's pod); a job of one node is no job (None). A partial or malformed set is an error naming the
    variables, not a silent single-node run.
    """
    environ = os.environ if environ is None else environ
    if "PET_NNODES" not in environ:
        return None
    missing = [v for v in PET_VARS if not environ.get(v)]
    if missing:
        raise EmbedtuneError(f"PET_NNODES is set but {', '.join(missing)} not: not a complete multi-node job")
    try:
        topo = Topology(
            nnodes=int(environ["PET_NNODES"]),
            node_rank=int(environ["PET_NODE_RANK"]),
            nproc_per_node=environ["PET_NPROC_PER_NODE"],
            master_addr=environ["PET_MASTER_ADDR"],
            master_port=int(environ["PET_MASTER_PORT"]),
        )
    except ValueError as e:
        raise EmbedtuneError(
            f"PET_* variables: {e} (PET_NNODES, PET_NODE_RANK, PET_MASTER_PORT are integers)"
        ) from None
    if not 0 <= topo.node_rank < topo.nnodes:
        raise EmbedtuneError(f"PET_NODE_RANK={topo.node_rank} is not in [0, PET_NNODES={topo.nnodes})")
    return topo if topo.nnodes > 1 else None


def joined(cfg, topology: Topology | None):
    """A `TrainConfig` as a node of a multi-node job runs it: the job's node count and processes per node (the
    runtime's word: `PET_NPROC_PER_NODE` is what each pod was given), else `cfg` as it is."""
    if topology is None:
        return cfg
    if cfg.nodes not in (1, topology.nnodes):
        raise EmbedtuneError(f"nodes: {cfg.nodes}, but this job has PET_NNODES={topology.nnodes} nodes")
    per_node = topology.nproc_per_node
    nproc = int(per_node) if per_node.isdigit() else cfg.nproc
    if nproc != cfg.nproc and not os.environ.get(LAUNCHED):
        say("train", f"nproc = {nproc} per node (PET_NPROC_PER_NODE; --nproc {cfg.nproc} ignored)")
    return dataclasses.replace(cfg, nodes=topology.nnodes, nproc=nproc)


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


def torchrun(step: str, cfg, nproc: int | str, topology: Topology | None = None) -> None:
    """Run `embedtune <step>` in `nproc` processes with torchrun and wait; raise `EmbedtuneError` on failure.

    With a `topology` (a multi-node job), these are this node's processes of the job: torchrun meets the other
    nodes at the job's master address, and global ranks run across nodes (node r holds r * nproc ...).
    """
    if topology is None:
        where = ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    else:
        where = [
            "--nnodes",
            str(topology.nnodes),
            "--node-rank",
            str(topology.node_rank),
            "--master-addr",
            topology.master_addr,
            "--master-port",
            str(topology.master_port),
        ]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        *where,
        "-m",
        "embedtune",
        step,
        # `--nproc` is not passed: torchrun's parser would take it for its own `--nproc-per-node` (prefix
        # match); the children read their number from WORLD_SIZE.
        *config_flags(cfg, exclude=("nproc",)),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", LAUNCHED: "1"}
    # torchrun pins OMP_NUM_THREADS=1 per process when unset: right for GPUs, 8x slower on a 16-core CPU box.
    per_node = int(nproc) if str(nproc).isdigit() else 1
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // per_node)))
    node = f" on node {topology.node_rank} of {topology.nnodes}" if topology else ""
    say(step, f"launching {nproc} processes{node}: {' '.join(cmd[: cmd.index('-m', 2) + 3])} ...")
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
