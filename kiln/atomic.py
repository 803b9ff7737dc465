"""Write files and folders so a reader sees the old version or the new one, never half of one."""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kiln.errors import KilnError

# Rust-backed writers (safetensors, tokenizers) raise their own exception types, with the system's
# error number in the message; numpy's tofile says only how much of a short write went through.
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")


def write_failure(error: BaseException, target: Path, tmp: Path | None = None) -> OSError | None:
    """`error`, raised while writing `target` (through its temporary copy `tmp`), as an OSError that
    names `target` and says why in the system's words (a full disk, a read-only place, a file where a
    folder should be); None when it is no failed write of ours (a bug, or trouble reading another file)."""
    target = Path(target)
    if isinstance(error, KilnError):
        return None  # already said in the user's terms
    if not isinstance(error, OSError):
        found = _RUST_OS_ERROR.search(str(error))
        return OSError(int(found[1]), os.strerror(int(found[1])), str(target)) if found else None
    named = Path(os.fsdecode(error.filename)) if error.filename is not None else None
    if named is not None and not _is_ours(named, target, tmp):
        return None
    code = error.errno
    if isinstance(error, FileExistsError) and named != target:
        code = errno.ENOTDIR  # a folder on the way is a file
    elif code is None and _SHORT_WRITE.search(str(error)):
        code = errno.ENOSPC  # a write to a regular file falls short when the disk is full
    return OSError(code, os.strerror(code) if code else error.strerror or str(error), str(target))


def _is_ours(path: Path, target: Path, tmp: Path | None) -> bool:
    """`path` is `target`, a folder on the way to it, its temporary copy or something inside that."""
    return (
        path == target
        or target.is_relative_to(path)
        or path.name.startswith(f".{target.name}.")
        or (tmp is not None and path.is_relative_to(tmp))
    )


@contextmanager
def _writing(target: Path, tmp: Path | None = None) -> Iterator[None]:
    try:
        yield
    except Exception as e:
        failure = write_failure(e, target, tmp)
        if failure is None:
            raise
        raise failure from e


def _refuse_special(target: Path) -> None:
    """A device, pipe or socket (such as /dev/full) is never replaced by a file or folder of ours."""
    try:
        mode = target.lstat().st_mode
    except OSError:
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
        raise KilnError(f"{target}: is a device, pipe or socket, not a file or folder; give the path of one to write")


@contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it replaces `target`, on failure it is removed.
    A failed write is an OSError naming `target` (see `write_failure`)."""
    target = Path(target)
    _refuse_special(target)
    with _writing(target):
        if target.is_dir():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(target))
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        os.close(fd)
    tmp = Path(tmp_name)
    try:
        with _writing(target, tmp):
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
    puts it back. A failed write (a full disk, say) leaves `target` as it was and is an OSError naming
    it (see `write_failure`).
    """
    target = Path(target)
    _refuse_special(target)
    with _writing(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        recover_dir(target)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part"))
    try:
        with _writing(target, tmp):
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
        if _old(target).exists() and not target.exists():  # the second rename failed: the old one goes back
            os.replace(_old(target), target)


def linked_copy(source: Path, target: Path) -> None:
    """Make folder `target` a copy of folder `source` whose files are hard links to the source's, so no
    data is written twice (a file is copied where the file system has no hard links); atomic as
    `atomic_dir`. Safe as long as files are replaced, never rewritten in place, as `atomic_dir` does."""
    source = Path(source)
    with atomic_dir(target) as tmp:
        for root, folders, files in os.walk(source):
            here = tmp / Path(root).relative_to(source)
            for name in folders:
                (here / name).mkdir()
            for name in files:
                try:
                    os.link(Path(root) / name, here / name)
                except OSError:
                    shutil.copy2(Path(root) / name, here / name)


def refuse_to_replace(target: Path, force: bool) -> None:
    """A user-named output that already holds something is replaced only when asked: an atomic write
    swaps the whole folder, so whatever else was in it would be gone."""
    target = Path(target)
    taken = target.is_file() or (target.is_dir() and any(target.iterdir()))
    if taken and not force:
        raise KilnError(f"{target}: already exists; choose another path, or pass --force to replace it")
