"""Find a data set's files: data mirror, then user cache, then a checked download moved in atomically."""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from kiln.atomic import atomic_file
from kiln.data.registry import DataSet, RemoteFile
from kiln.errors import DataError
from kiln.progress import progress_bar

MIRROR_ENV = "KILN_DATA_DIR"
_BLOCK = 1 << 20


def mirror_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The data mirror: `--data-dir` if given, else `$KILN_DATA_DIR`, else none."""
    chosen = data_dir or os.environ.get(MIRROR_ENV)
    return Path(chosen).expanduser() if chosen else None


def cache_dir() -> Path:
    """The user cache: `$XDG_CACHE_HOME/kiln`, by default `~/.cache/kiln`."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kiln"


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read a block at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def checksum_problem(path: Path, remote: RemoteFile) -> str | None:
    """Why `path` is not the file `remote` describes, or None when it is."""
    size = path.stat().st_size
    if remote.size is not None and size != remote.size:
        return f"it has {size:,} bytes, expected {remote.size:,}"
    if remote.sha256 is not None and (actual := file_sha256(path)) != remote.sha256:
        return f"its sha256 is {actual}, expected {remote.sha256}"
    return None


def is_present(remote: RemoteFile, data_dir: str | os.PathLike | None = None) -> str | None:
    """Where a local copy of `remote` is ('mirror' or 'cache'), by existence alone, or None."""
    mirror = mirror_dir(data_dir)
    if mirror is not None and (mirror / remote.path).is_file():
        return "mirror"
    if (cache_dir() / remote.path).is_file():
        return "cache"
    return None


def resolve_file(remote: RemoteFile, data_dir: str | os.PathLike | None = None, download: bool = True) -> Path:
    """A verified local path for `remote`: mirror, then cache, then a download into the cache."""
    mirror = mirror_dir(data_dir)
    if mirror is not None:
        candidate = mirror / remote.path
        if candidate.is_file():
            problem = checksum_problem(candidate, remote)
            if problem:
                raise DataError(
                    f"{candidate}: {problem}; replace it with the file from {remote.urls[0]} "
                    f"(or delete it to download a fresh copy)"
                )
            return candidate
    cached = cache_dir() / remote.path
    if cached.is_file():
        problem = checksum_problem(cached, remote)
        if problem is None:
            return cached
        cached.unlink()  # a damaged cache entry is ours to replace
    if not download:
        raise DataError(_place_it_message(remote, mirror, "no local copy"))
    return _download(remote, cached, mirror)


def _place_it_message(remote: RemoteFile, mirror: Path | None, reason: str) -> str:
    places = [str(mirror / remote.path)] if mirror is not None else []
    places.append(str(cache_dir() / remote.path))
    return (
        f"could not get {remote.urls[0]} ({reason}); download it elsewhere and place it at "
        + " or ".join(places)
        + (f", or set {MIRROR_ENV} to a folder that has {remote.path}" if mirror is None else "")
    )


def _download(remote: RemoteFile, target: Path, mirror: Path | None) -> Path:
    errors = []
    for url in remote.urls:
        try:
            with atomic_file(target) as tmp:
                with open(tmp, "wb") as out:
                    _stream(url, out, remote.size, target.name)
                problem = checksum_problem(tmp, remote)
                if problem:
                    raise DataError(
                        f"the download from {url} is not the expected file ({problem}); "
                        "the server may have changed it: report it, or place a checked copy by hand"
                    )
            return target
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            errors.append(getattr(e, "reason", None) or e)
    raise DataError(_place_it_message(remote, mirror, f"download failed: {errors[-1]}"))


def _stream(url: str, out, size: int | None, label: str) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": "kiln"})
    with urllib.request.urlopen(request, timeout=30) as response:
        total = size or int(response.headers.get("Content-Length") or 0) or None
        with progress_bar(f"downloading {label}", total=total, unit="B") as advance:
            while block := response.read(_BLOCK):
                out.write(block)
                advance(len(block))


def resolve_dataset(
    dataset: DataSet, data_dir: str | os.PathLike | None = None, download: bool = True
) -> dict[str, Path]:
    """Local, verified paths for every role of a data set (archive members extracted into the cache)."""
    paths = {role: resolve_file(f, data_dir, download) for role, f in dataset.files.items()}
    if dataset.members:
        archive = paths.pop("archive")
        for role, member in dataset.members.items():
            paths[role] = _extract(archive, member, cache_dir() / Path(dataset.files["archive"].path).parent)
    return paths


def _extract(archive: Path, member: str, into: Path) -> Path:
    target = into / member
    if target.is_file():
        return target
    try:
        with zipfile.ZipFile(archive) as zf, zf.open(member) as src, atomic_file(target) as tmp, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, _BLOCK)
    except (zipfile.BadZipFile, KeyError) as e:
        raise DataError(f"{archive}: cannot extract {member} ({e}); delete the archive to fetch it again") from e
    return target
