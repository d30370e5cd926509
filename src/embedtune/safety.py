"""What embedtune refuses to load or to print: pickles that run code, a model's own Python code, credentials.

- **Pickles.** Weights load through safetensors or torch's weights-only unpickler (transformers, PEFT and the
  HF Trainer's optimizer / scheduler / RNG states all pass `weights_only=True` in the versions pinned here).
  DeepSpeed's checkpoint loader does not (`torch.load(..., weights_only=False)`), and a weights-only failure
  deep inside transformers is a page of text. So before any pickle-format file is loaded (`*.bin`, `*.pt`,
  `*.pth`, `*.ckpt` in a model folder or a checkpoint), `check_pickle` lists the Python callables its
  pickle names, without running any (`torch.serialization.get_unsafe_globals_in_checkpoint`), and refuses
  the file in one line when one is outside torch's weights-only allowlist plus `ALLOWED_GLOBALS` (plain
  classes DeepSpeed and NumPy states hold):

      model/pytorch_model.bin: refused: unpickling it would call posix.system (not weights); embedtune loads
      safetensors, or pickles that hold only tensors and plain data

- **Remote code.** A model folder whose `config.json` / `tokenizer_config.json` has an `auto_map` ships its
  own Python classes. transformers without `trust_remote_code` silently loads the built-in class of the same
  `model_type` instead, a model other than the author's; embedtune refuses the folder and names the knob.

- **Credentials.** `mask_credentials` turns `scheme://user:password@host` into `scheme://***@host`. Every
  progress and error line (`embedtune.progress`), the CLI's JSON result and register's params, tags and
  descriptions go through it.
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

from embedtune.errors import EmbedtuneError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Plain classes (no side effects when the unpickler builds them) that DeepSpeed ZeRO checkpoints and the HF
# Trainer's RNG states name, beyond torch's own weights-only allowlist (seen with deepspeed 0.19, numpy 2).
ALLOWED_GLOBALS = frozenset(
    {
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray.scalar",
        "numpy.ndarray",
        "numpy.dtype",
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
        "deepspeed.runtime.zero.config.ZeroStageEnum",
    }
)
# Pickles a checkpoint holds that nothing ever loads back (the Trainer's copy of its arguments, a full pickle
# of TrainingArguments): not checked, never read.
NEVER_LOADED = frozenset({"training_args.bin"})
_CREDENTIALS = re.compile(r"\b([a-z][\w+.-]*://)[^/@\s'\"]+@", re.IGNORECASE)


def mask_credentials(text: str) -> str:
    """`https://user:pw@host/x` -> `https://***@host/x`, anywhere in `text`."""
    return _CREDENTIALS.sub(r"\1***@", text)


@functools.lru_cache(maxsize=256)
def _unsafe_globals(path: str, size: int, mtime: float) -> tuple[str, ...]:
    import torch

    names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    return tuple(sorted(n for n in names if n not in ALLOWED_GLOBALS and not n.startswith("numpy.dtypes.")))


def check_pickle(path: str | os.PathLike) -> None:
    """Refuse a pickle-format file whose unpickling would call anything but tensor and plain-data builders."""
    path = Path(path)
    st = path.stat()
    try:
        unsafe = _unsafe_globals(str(path), st.st_size, st.st_mtime)
    except Exception as e:  # not a torch zip file, truncated, not a pickle at all
        raise EmbedtuneError(
            f"{path}: refused: not a readable torch file ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None
    if unsafe:
        raise EmbedtuneError(
            f"{path}: refused: unpickling it would call {', '.join(unsafe[:3])} (not weights); embedtune "
            "loads safetensors, or pickles that hold only tensors and plain data"
        )


def check_pickles_in(folder: str | os.PathLike, recursive: bool = False) -> None:
    """`check_pickle` every pickle-format file of a local folder (a hub id is checked by transformers)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    files = folder.rglob("*") if recursive else folder.iterdir()
    for f in sorted(files):
        if f.is_file() and f.suffix in PICKLE_SUFFIXES and f.name not in NEVER_LOADED:
            check_pickle(f)


def check_remote_code(folder: str | os.PathLike, trust_remote_code: bool) -> None:
    """Refuse a local model folder that ships its own Python classes (`auto_map`) unless trusted."""
    if trust_remote_code or not Path(folder).is_dir():
        return
    for name in ("config.json", "tokenizer_config.json"):
        f = Path(folder) / name
        if not f.is_file():
            continue
        try:
            auto_map = json.loads(f.read_text()).get("auto_map")
        except (ValueError, AttributeError, OSError):
            continue  # transformers reports a broken config itself
        if auto_map:
            classes = sorted({v if isinstance(v, str) else str(v) for v in dict(auto_map).values()})
            raise EmbedtuneError(
                f"{f}: auto_map names the model's own Python code ({', '.join(classes[:3])}); embedtune runs "
                "it only with trust_remote_code (train: --trust-remote-code true, or the pipeline parameter "
                "trust_remote_code; evaluate, merge and register follow the value train saved)"
            )


def check_model_folder(folder: str | os.PathLike, trust_remote_code: bool) -> None:
    """Both checks on a local model folder before anything in it is loaded."""
    check_remote_code(folder, trust_remote_code)
    check_pickles_in(folder)
