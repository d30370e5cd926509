"""The layout of a training run's folders, and how a run knows where it stands.

    output_dir/                 the final model (sentence-transformers folder, or a LoRA adapter)
        train_result.json       written last: its presence marks a finished run
        checkpoint-N/           while training (or under checkpoint_dir when set); deleted at the end

A re-run of the same command on a finished folder returns `train_result.json` without training again (other
knobs: an error, except bookkeeping ones that do not change the weights). An unfinished one resumes from the
newest *whole* checkpoint: one cut short (a file missing or shorter than its format says) is skipped for the
previous one, and one holding a pickle that would run code is refused (`checkpoint_problem`).
After the final save, `check_saved_weights` proves the weights are whole (ZeRO-3 shards saved without
gathering would be empty tensors).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import zipfile
from pathlib import Path

from embedtune.config import TrainConfig
from embedtune.errors import EmbedtuneError
from embedtune.io import read_json
from embedtune.modeling import Embedder, Reranker
from embedtune.outputs import temp_beside
from embedtune.progress import rank, say
from embedtune.safety import NEVER_LOADED, PICKLE_SUFFIXES, check_pickle

RESULT_FILE = "train_result.json"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Knobs that do not change the trained weights: a finished run re-run with other values is still "the same".
BOOKKEEPING_KNOBS = {
    "eval_data",
    "checkpoint_dir",
    "per_device_eval_batch_size",
    "logging_steps",
    "eval_steps",
    "save_steps",
    "save_total_limit",
    "dataloader_num_workers",
    "shared_dir",  # where a multi-node job staged its files, and the job's name: not the weights
    "run_id",
}


def base_model_id(model: str) -> str:
    """A local base model as an absolute path (adapters name their base), a hub id as given."""
    return str(Path(model).resolve()) if Path(model).exists() else model


def checkpoints(out: Path) -> list[Path]:
    """`checkpoint-N` folders of `out`, by step."""
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found)]


def _safetensors_problem(f: Path) -> str | None:
    """Why a .safetensors file is not whole (its header says how long the file must be), or None."""
    with open(f, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return "cut short (no header)"
        n = int.from_bytes(head, "little")
        if n > f.stat().st_size - 8:
            return "cut short (in its header)"
        try:
            header = json.loads(fh.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError):
            return "unreadable header"
    size = f.stat().st_size
    return None if size == 8 + n + end else f"{size} bytes, its header says {8 + n + end}"


def _ranks(shards: list[Path], suffix: str) -> set:
    """Ranks of DeepSpeed files ending in `suffix` (`zero_pp_rank_R_...`; None for one shared by all ranks)."""
    found = set()
    for f in shards:
        if f.name.endswith(suffix):
            m = re.search(r"zero_pp_rank_(\d+)_", f.name)
            found.add(m.group(1) if m else None)
    return found


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why `ckpt` cannot be resumed from (a file cut short or missing), or None when it is whole.

    The Trainer writes trainer_state.json last, so a checkpoint cut short by a preemption usually lacks it;
    a checkpoint copied half, or written on a filesystem that reorders writes, can hold it and still miss
    bytes elsewhere. So every file is checked against its own format: safetensors against the length its
    header announces, torch pickles (optimizer, scheduler, RNG, DeepSpeed shards) as whole zip archives,
    JSON files as parseable. A pickle that would run code is not "cut short": `safety.check_pickle` refuses
    it (EmbedtuneError), and nothing is loaded.
    """
    try:
        files = sorted(f for f in ckpt.rglob("*") if f.is_file())
        for f in files:  # every file against its format; pickles first of all against running code
            where = f.relative_to(ckpt)
            if f.suffix == ".safetensors" and (why := _safetensors_problem(f)):
                return f"{where}: {why}"
            if f.suffix == ".json":
                try:
                    json.loads(f.read_bytes())
                except ValueError:
                    return f"{where}: not valid JSON (cut short)"
            if f.suffix in PICKLE_SUFFIXES and f.name not in NEVER_LOADED:
                if not zipfile.is_zipfile(f):
                    return f"{where}: not a whole torch file (cut short)"
                check_pickle(f)  # raises: refused, whatever else the checkpoint lacks
        if not (ckpt / "trainer_state.json").is_file():
            return "no trainer_state.json"
        if not any(f.suffix == ".safetensors" for f in files):
            return "no weights"
        shards = [f for f in files if f.parent.name.startswith("global_step")]
        if shards:  # DeepSpeed: its tag file, an optimizer state per rank, model states (ZeRO-3: per rank)
            model = _ranks(shards, "model_states.pt")
            optim = _ranks(shards, "optim_states.pt")
            per_rank = model - {None}
            if not (ckpt / "latest").is_file() or not model or not optim or (per_rank and per_rank != optim):
                return (
                    f"DeepSpeed states incomplete (model states of ranks {sorted(map(str, model))}, "
                    f"optimizer states of ranks {sorted(map(str, optim))})"
                )
        else:  # the HF Trainer silently skips a missing optimizer: that would resume half
            for name in ("optimizer.pt", "scheduler.pt"):
                if not (ckpt / name).is_file():
                    return f"no {name}"
    except OSError as e:  # vanished while we looked (another rank set it aside)
        return f"unreadable: {e}"
    return None


def latest_checkpoint(out: Path) -> Path | None:
    """The newest *whole* checkpoint of `out` (see `checkpoint_problem`). Newer ones that are cut short are
    skipped, said so, and set aside by rank 0 as `incomplete-checkpoint-N` (a name the Trainer's checkpoint
    rotation ignores; the run saves at that step again; `remove_checkpoints` deletes them with the rest)."""
    for ckpt in reversed(checkpoints(out)):
        why = checkpoint_problem(ckpt)
        if why is None:
            return ckpt
        say("train", f"skipping {ckpt}: {why}")
        if rank() == 0:
            with contextlib.suppress(OSError):
                ckpt.rename(ckpt.with_name(f"incomplete-{ckpt.name}"))
    return None


def resumed_step(checkpoint: Path | None) -> int:
    """The global step a checkpoint folder was saved at (0 for none)."""
    return int(CHECKPOINT.match(checkpoint.name).group(1)) if checkpoint else 0


CHECKPOINT_WEIGHTS = (
    "checkpoint-weights"  # in a model folder: step-N.safetensors, for merge --merge-with checkpoints
)


def keep_checkpoint_weights(ckpt_dir: Path, dest: Path, k: int, trainer) -> list[int]:
    """Copy the model weights of the newest `k` whole checkpoints (before the trainer's final step) into
    `dest/checkpoint-weights/step-N.safetensors`, named as the inner model's own weights (the TrainModel's
    `inner_weights`); returns their steps. Optimizer states are not kept."""
    if k <= 0:
        return []
    final_step, to_inner = trainer.state.global_step, trainer.model.inner_weights
    from safetensors.torch import load_file, save_file

    whole = [c for c in checkpoints(ckpt_dir) if checkpoint_problem(c) is None and step_of(c) < final_step]
    kept = []
    for ckpt in whole[-k:]:
        weights = ckpt / "model.safetensors"
        if not weights.is_file():
            say("train", f"warning: {ckpt} holds no model.safetensors; its weights are not kept")
            continue
        (dest / CHECKPOINT_WEIGHTS).mkdir(exist_ok=True)
        state = {name: t.contiguous() for name, t in to_inner(load_file(weights)).items()}
        save_file(state, dest / CHECKPOINT_WEIGHTS / f"step-{step_of(ckpt)}.safetensors")
        kept.append(step_of(ckpt))
    return kept


def step_of(ckpt: Path) -> int:
    return int(CHECKPOINT.match(ckpt.name).group(1))


def remove_checkpoints(ckpt_dir: Path, out: Path) -> None:
    """Delete the run's checkpoint-N folders once its final model is saved and verified (they hold optimizer
    states, several times the model's size); a separate `ckpt_dir` goes too when left empty."""
    for ckpt in [*checkpoints(ckpt_dir), *ckpt_dir.glob("incomplete-checkpoint-*")]:
        shutil.rmtree(ckpt, ignore_errors=True)
    if ckpt_dir != out:
        with contextlib.suppress(OSError):
            ckpt_dir.rmdir()  # only when empty: the run's own folder on a shared volume


def check_shared(folders: list[Path], rank: int, world: int) -> None:
    """Under a multi-node job, prove every node sees the same `folders` before any training.

    Global rank 0 alone writes the checkpoints' shared files, the final model and `train_result.json`, every
    rank its own ZeRO shards and RNG state into the same checkpoint folder, and every rank reads the newest
    checkpoint back on resume: a folder that is local to each node would train for hours, then fail to
    save, or resume nodes from different steps. Rank 0 writes a token file into each folder, every rank reads
    it back, and all ranks fail together, naming the folder and the ranks that could not see it.
    Collective: every rank must call it.
    """
    import secrets

    import torch.distributed as dist

    token = [secrets.token_hex(8) if rank == 0 else None]
    dist.broadcast_object_list(token)
    probes = [Path(f) / f".embedtune-shared-{token[0]}" for f in folders]
    if rank == 0:
        for probe in probes:
            probe.parent.mkdir(parents=True, exist_ok=True)
            probe.write_text(token[0])
    dist.barrier()
    seen = [probe.is_file() and probe.read_text() == token[0] for probe in probes]
    everyone: list = [None] * world
    dist.all_gather_object(everyone, seen)
    dist.barrier()  # every rank has looked before rank 0 removes the files
    if rank == 0:
        for probe in probes:
            probe.unlink(missing_ok=True)
    for i, folder in enumerate(folders):
        blind = [r for r, s in enumerate(everyone) if not s[i]]
        if blind:
            raise EmbedtuneError(
                f"{folder}: not shared between the nodes (ranks {blind} do not see what rank 0 wrote there); "
                "a multi-node job needs its output and checkpoint folders on one volume every node mounts "
                "(a ReadWriteMany claim)"
            )


def finished_result(out: Path, cfg: TrainConfig) -> dict | None:
    """The saved result when `out` holds a finished run of the same knobs; an error when of other knobs."""
    if not (out / RESULT_FILE).is_file():
        return None
    result = read_json(out / RESULT_FILE)
    before, now = result.get("config", {}), dataclasses.asdict(cfg)
    changed = [k for k in now if k not in BOOKKEEPING_KNOBS and before.get(k) != now[k]]
    if changed:
        diff = ", ".join(f"{k}: {before.get(k)!r} -> {now[k]!r}" for k in changed)
        raise EmbedtuneError(f"{out}: holds a finished run with other knobs ({diff}); use a new output_dir")
    say("train", f"{out} already holds this finished run (step {result.get('global_step')}); nothing to do")
    return result


def adapter_key(name: str) -> str:
    """The key PEFT saves a trainable parameter of the adapter under (its adapter name dropped; DoRA's magnitude
    vector also its `.weight`)."""
    name = name.replace(".modules_to_save.default", "")
    if "lora_magnitude_vector" in name:
        name = name.replace(".default.weight", "")
    return name.replace(".default", "")


def check_saved_weights(out: Path, model: Embedder | Reranker, train_type: str) -> None:
    """Fail loudly if the saved weights are not whole (e.g. ZeRO-3 shards saved without gathering)."""
    from safetensors import safe_open

    files = sorted(out.glob("adapter_model.safetensors" if train_type == "lora" else "model*.safetensors"))
    if not files:
        raise EmbedtuneError(f"{out}: no safetensors weights were written")
    saved = {}
    for f in files:
        with safe_open(f, "pt") as st:
            saved.update({k: tuple(st.get_slice(k).get_shape()) for k in st.keys()})  # noqa: SIM118
    inner = model.inner

    def shape(p):
        return tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3 keeps the full shape in ds_shape

    if train_type == "lora":  # the adapter: the LoRA matrices, and the modules trained in full (a head)
        expected = {
            adapter_key(n): shape(p)
            for n, p in inner.named_parameters()
            if "lora_" in n or ".modules_to_save." in n
        }
        if not expected or saved != expected:
            missing = sorted(set(expected) - set(saved))[:3]
            wrong = sorted(k for k in set(saved) & set(expected) if saved[k] != expected[k])[:3]
            raise EmbedtuneError(
                f"{out}: saved adapter is not whole (missing {missing}, wrong shapes {wrong})"
            )
        return
    unique = {id(p): math.prod(shape(p)) for p in inner.parameters()}
    empty = [k for k, s in saved.items() if math.prod(s) == 0]
    if empty or sum(math.prod(s) for s in saved.values()) < sum(unique.values()):
        raise EmbedtuneError(f"{out}: saved weights are not whole (empty tensors: {empty[:3]})")


def save_final(out: Path, write) -> None:
    """`write(folder)` the final model into a staging folder beside `out`, then move its files into `out`.

    A save that fails half-way (a full disk) leaves no partial model file in `out` (which may hold the
    run's checkpoints and earlier files) and raises `EmbedtuneError` naming the folder; the moves are
    renames within one filesystem, so they need no space.
    """
    from safetensors import SafetensorError

    out.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(out, folder=True)  # the umask's mode; a dead run's leftover folders removed
    try:
        write(tmp)
        for entry in sorted(tmp.iterdir()):
            target = out / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(entry, target)
    except (OSError, SafetensorError) as e:
        raise EmbedtuneError(f"{out}: cannot save the model: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
