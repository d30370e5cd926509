"""What a step writes: never over its own inputs, all its files together or none, in the user's file mode.

Three rules every step that writes files follows, each in one place here:

- `refuse_inputs(inputs, outputs)`: an output that resolves to an input (the same path after symlinks, or
  the same file through a hard link) or a folder output that holds an input is refused before any work, with
  one line naming both (`split --train-data` = `--dataset` used to replace the dataset with its train part).
- `OutputSet`: the files of one result (rows + their stats, train + eval, metrics + report) are staged as
  temporaries beside their destinations and renamed into place together at the end. Before the renames,
  what is there already is moved aside; if any rename fails, the new files are taken back and the earlier
  set restored, so a reader finds the old set or the new one, never a mix (a SIGKILL in the middle of the
  renames, microseconds long, is the one window left).
- `temp_beside(dest)`: temporaries are named `.<name>.<host>-<pid>.<random>.tmp`; the next write to the
  same destination removes the ones whose process is gone (a killed run's 50 MB leftovers), and they are
  created with the mode a plain `open()` would give (the umask's, or the replaced file's own), not 0600.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import IO

from embedtune.errors import EmbedtuneError

_HOST = socket.gethostname().replace(".", "_")[:32] or "host"
_OURS: set[str] = set()  # names of the temporaries this process made (its pid's others are a past life's)


# ---------------------------------------------------------------------------------------- output != input
def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(path)))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)  # hard links: one inode under two names
    except OSError:
        return False


def refuse_inputs(inputs: dict[str, object], outputs: dict[str, object], distinct: bool = True) -> None:
    """Raise `EmbedtuneError` when an output is an input, or a folder that contains one.

    `inputs` / `outputs`: knob name -> a path or a list of paths ("" and hub ids that are not local paths are
    skipped). With `distinct`, two outputs that are one path are refused too (the second would replace the
    first).
    """

    def paths(named):
        for knob, value in named.items():
            for p in value if isinstance(value, (list, tuple)) else [value]:
                if p not in ("", None):
                    yield knob, Path(os.path.expanduser(p)), _real(p)

    ins = [(k, p, r) for k, p, r in paths(inputs) if r.exists() or p.is_symlink()]
    outs = list(paths(outputs))
    for o_knob, o_path, o_real in outs:
        for i_knob, i_path, i_real in ins:
            if o_real == i_real or _same_file(o_path, i_path):
                raise EmbedtuneError(
                    f"{o_knob}: {o_path} is the {i_knob} input ({i_path}); writing it would destroy the "
                    "input: choose another path"
                )
            if i_real.is_relative_to(o_real) and (o_real.is_dir() or not o_real.exists()):
                raise EmbedtuneError(
                    f"{o_knob}: {o_path} contains the {i_knob} input ({i_path}); writing it would destroy "
                    "the input: choose another path"
                )
    for n, (a_knob, a_path, a_real) in enumerate(outs if distinct else []):
        for b_knob, _, b_real in outs[n + 1 :]:
            if a_real == b_real:
                raise EmbedtuneError(f"{a_knob} and {b_knob} are the same file: {a_path}")


# ------------------------------------------------------------------------------------------- temporaries
def file_mode(dest: Path) -> int:
    """The mode a new file at `dest` gets: the existing file's, else 0666 less the umask (as `open()`)."""
    with contextlib.suppress(OSError):
        return dest.stat().st_mode & 0o7777
    return 0o666 & ~_umask()


def _pid_gone(pid: int) -> bool:
    if pid == os.getpid():  # not made by this process (`_OURS`): a past life's, as in a restarted pod
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def clean_stale(dest: Path) -> list[Path]:
    """Remove the temporaries (files or folders) a dead process left beside `dest`; returns what it removed."""
    removed = []
    prefix = f".{dest.name}.{_HOST}-"
    with contextlib.suppress(OSError):
        for entry in dest.parent.iterdir():
            name = entry.name
            if not (name.startswith(prefix) and name.endswith((".tmp", ".old"))) or str(entry) in _OURS:
                continue
            pid = name[len(prefix) :].split(".", 1)[0]
            if pid.isdigit() and _pid_gone(int(pid)):
                if name.endswith(".old") and not (dest.exists() or dest.is_symlink()):
                    os.replace(entry, dest)  # killed inside a commit: the earlier version goes back
                    continue
                _remove(entry)
                removed.append(entry)
    return removed


def temp_beside(dest: Path, folder: bool = False, suffix: str = ".tmp") -> Path:
    """A new temporary file (or folder) in `dest`'s folder, after removing dead processes' leftovers."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(dest)
    prefix = f".{dest.name}.{_HOST}-{os.getpid()}."
    if folder:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=dest.parent))
        os.chmod(tmp, 0o777 & ~_umask())
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=dest.parent)
        os.close(fd)
        tmp = Path(name)
        os.chmod(tmp, file_mode(dest))
    _OURS.add(str(tmp))
    return tmp


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def refuse_folder(dest: Path) -> None:
    """A file output where a folder is: refused before anything is written."""
    if dest.is_dir():
        raise EmbedtuneError(f"{dest}: is a folder; the output is a file: choose another path")


def _rename(src: Path, dst: Path) -> None:
    """One rename of a commit (a function of its own, so tests can make the n-th one fail)."""
    os.replace(src, dst)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------- output sets
class OutputSet:
    """The files (or folders) of one result, committed together when the `with` block ends without error.

        with OutputSet() as outs:
            rows = outs.open(output)           # a file object on a temporary beside `output`
            outs.write_bytes(stats_path, data)
            outs.remove(stale_path)            # gone with the commit, back on a rollback
            folder = outs.folder(model_dir)    # a temporary folder to fill, renamed as a whole

    On an error inside the block, every temporary is deleted and nothing at the destinations changes.
    """

    def __init__(self) -> None:
        self.staged: list[tuple[Path, Path]] = []  # (temporary, destination)
        self.removals: list[Path] = []
        self.files: list[IO] = []

    def __enter__(self) -> OutputSet:
        return self

    def open(self, dest: str | os.PathLike, mode: str = "wb") -> IO:
        dest = Path(dest)
        refuse_folder(dest)
        tmp = temp_beside(dest)
        f = open(tmp, mode)  # noqa: SIM115 (closed by commit or discard)
        self.staged.append((tmp, dest))
        self.files.append(f)
        return f

    def write_bytes(self, dest: str | os.PathLike, data: bytes) -> None:
        self.open(dest).write(data)

    def folder(self, dest: str | os.PathLike) -> Path:
        dest = Path(dest)
        tmp = temp_beside(dest, folder=True)
        self.staged.append((tmp, dest))
        return tmp

    def remove(self, dest: str | os.PathLike) -> None:
        self.removals.append(Path(dest))

    def __exit__(self, kind, value, tb) -> None:
        if kind is not None:
            self.discard()
            return
        try:
            for f in self.files:
                if not f.closed:
                    f.flush()
                    os.fsync(f.fileno())
                    f.close()
            self.commit()
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        for f in self.files:
            with contextlib.suppress(OSError):
                f.close()
        for tmp, _ in self.staged:
            _remove(tmp)
        self.staged = []

    def commit(self) -> None:
        """Move what is at the destinations aside, rename the temporaries in, then drop the old ones; on a
        failure, undo the renames done so far and put the old ones back."""
        moved: list[tuple[Path, Path]] = []  # (destination, where its old version waits)
        placed: list[Path] = []
        try:
            for dest in [d for _, d in self.staged] + self.removals:
                if dest.exists() or dest.is_symlink():
                    old = temp_beside(dest, suffix=".old")
                    _remove(old)
                    _rename(dest, old)
                    moved.append((dest, old))
            for tmp, dest in self.staged:
                _rename(tmp, dest)
                placed.append(dest)
        except BaseException:
            for dest in placed:
                _remove(dest)
            for dest, old in reversed(moved):
                with contextlib.suppress(OSError):
                    os.replace(old, dest)
            raise
        for _, old in moved:
            _remove(old)
        self.staged = []
