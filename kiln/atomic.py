"""Write files and folders so a reader sees the old version or the new one, never half of one."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kiln.errors import KilnError


@contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it replaces `target`, on failure it is removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _old(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Files first, then their folders: after this a power cut cannot leave the tree with empty files."""
    for root, _, files in os.walk(folder):
        for name in files:
            _fsync(Path(root) / name)
        _fsync(Path(root))


@contextmanager
def write_lock(target: Path) -> Iterator[None]:
    """Hold `target`'s writer lock (`.NAME.lock` beside it) until the block ends.

    For folders that several processes may build at once, such as the cached corpus that every rank of
    a run asks for: they take turns, so none sweeps away another's half-written `.part` folder, and the
    later ones find the first one's finished work. The kernel frees the lock if its holder dies.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(f".{target.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def recover_dir(target: Path) -> None:
    """Finish what a save killed part way left: put the previous folder back if the kill fell between
    the two renames, and remove half-written temporary folders and old copies."""
    target = Path(target)
    old = _old(target)
    if old.exists():
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)  # the swap was done; only the clean-up was cut short
        else:
            os.replace(old, target)  # killed between the renames: the previous folder is whole
    for part in target.parent.glob(f".{target.name}.*.part"):
        shutil.rmtree(part, ignore_errors=True)


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `target`; on success it takes `target`'s place.

    The new folder is fsynced before the swap. The old folder is moved aside before the rename and
    deleted only after it, so at every instant either `target` is whole (old or new) or the old one
    waits at `.NAME.old`, where `recover_dir` (run before every save, and by training at its start)
    puts it back.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(target)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part"))
    try:
        yield tmp
        _fsync_tree(tmp)
        old = _old(target)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync(target.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def refuse_to_replace(target: Path, force: bool) -> None:
    """A user-named output that already holds something is replaced only when asked: an atomic write
    swaps the whole folder, so whatever else was in it would be gone."""
    target = Path(target)
    taken = target.is_file() or (target.is_dir() and any(target.iterdir()))
    if taken and not force:
        raise KilnError(f"{target}: already exists; choose another path, or pass --force to replace it")
