"""What keeps a merge from destroying other work: a lock per output, and outputs kept out of inputs.

**The lock.** A merge into ``OUT_DIR`` holds an exclusive ``flock`` on ``OUT_DIR.partial.lock`` (beside
the partial directory, not in it: a fresh run deletes and recreates the partial directory, and must
find the lock before it touches anything) from before its plan until ``OUT_DIR`` is published or the
merge has failed. A second merge into the same ``OUT_DIR`` is refused at once, naming the process
that holds it; the file records the holder's pid only for that message. The kernel drops a flock when
its process ends however it ends, so a lock file left by a killed run holds nothing and never blocks
``--resume``. The holder removes the file when it lets go (while still holding it: a process that
opened the old file meanwhile sees, once it has the lock, that the path now names another file or
none, and tries again). Under torch.distributed rank 0, which creates the output, takes it.

**Inputs.** ``OUT_DIR`` equal to or inside an input model's directory (base, models, LoRA adapters,
the tokenizer's source) would write into, or with ``--overwrite`` replace, that model; an input inside
``OUT_DIR`` would be deleted by ``--overwrite``'s publish; ``OUT_DIR.partial`` equal to an input
would be deleted by a fresh run. All are refused, on resolved paths (symlinks followed), before
anything is written.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

from .writer import OutputError

LOCK_SUFFIX = ".partial.lock"

# locks this process holds: (thread, lock path) -> [lock fd, depth]; a multi-document merge holds its
# OUT_DIR's lock around its final merge, which takes the same lock again
_held: dict[tuple[int, str], list[int]] = {}


def lock_path(out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    return out.with_name(out.name + LOCK_SUFFIX)


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "another process"


def _acquire(path: Path, out_dir: Path) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{path.parent}: cannot be created ({exc})") from exc
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            raise OutputError(f"{path}: cannot be created ({exc})") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # no locks on this filesystem
                warnings.warn(
                    f"{path}: cannot be locked ({exc.strerror}); nothing keeps a second merge into "
                    f"{out_dir} out while this one runs",
                    stacklevel=4,
                )
                return fd
            holder = _holder(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputError(f"{path}: cannot be locked ({exc})") from exc
            raise OutputError(
                f"{out_dir}: another merge into it is running ({holder} holds {path}); wait for it to "
                "finish or stop it, or choose another output directory"
            ) from None
        try:  # the previous holder may have removed the file between our open and our lock
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)


@contextlib.contextmanager
def output_lock(out_dir: str | os.PathLike, take: bool = True) -> Iterator[None]:
    """Hold OUT_DIR's lock for the block (nothing when ``take`` is False: ranks other than 0).

    Raises:
        OutputError: naming OUT_DIR and the pid holding it, when another merge into it is running.
    """
    if not take:
        yield
        return
    path = lock_path(os.path.abspath(out_dir))
    key = (threading.get_ident(), str(path))
    if key in _held:  # this thread holds it already (a multi-document merge's final merge)
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    fd = _acquire(path, Path(out_dir))
    _held[key] = [fd, 1]
    try:
        yield
    finally:
        del _held[key]
        with contextlib.suppress(OSError):
            os.unlink(path)  # still held: see the module docstring
        os.close(fd)


def local_inputs(references: Iterable[str | None]) -> list[Path]:
    """The local paths (directories, or a single-file model's file) the model references name
    (``model+lora``: both); hub ids are left to the check after they are resolved."""
    found = []
    for reference in references:
        if not reference:
            continue
        parts = [reference] if os.path.exists(reference) else reference.split("+", 1)
        found += [Path(p) for p in parts if p and os.path.exists(p)]
    return found


def check_output_path(out_dir: str | os.PathLike, inputs: Iterable[str | os.PathLike]) -> None:
    """Refuse an OUT_DIR that would write into, or delete, an input model's directory (``inputs``:
    model directories, or the file of a single-file model: a new directory beside it harms nothing,
    but one that holds it does).

    Raises:
        OutputError: naming OUT_DIR and the input directory.
    """
    out = Path(out_dir).resolve()
    given = Path(out_dir)
    partial = given.with_name(given.name + ".partial").resolve()
    for directory in dict.fromkeys(Path(d).resolve() for d in inputs):
        if out == directory or directory in out.parents:
            where = "is" if out == directory else "is inside"
            raise OutputError(
                f"{out_dir}: {where} the directory of an input model ({directory}); the merge would "
                "write into it: choose an output directory outside every input"
            )
        if out in directory.parents:
            raise OutputError(
                f"{out_dir}: holds an input model ({directory}), which replacing the output would "
                "delete: choose an output directory outside every input"
            )
        if partial == directory or directory in partial.parents or partial in directory.parents:
            raise OutputError(
                f"{out_dir}: its partial directory {partial} would write into or delete an input model "
                f"({directory}): choose an output directory outside every input"
            )
