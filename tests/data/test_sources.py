"""Data sets resolve in order (explicit path, mirror, cache, download) and every file is checked."""

from __future__ import annotations

import hashlib
import http.server
import re
import threading
import zipfile
from pathlib import Path

import pytest

from kiln.data.fetch import cache_dir, resolve_dataset, resolve_file
from kiln.data.registry import DATASETS, DataSet, RemoteFile, get_dataset
from kiln.errors import DataError

CONTENT = b"Kiln test file\n" * 100


def remote(url: str = "http://127.0.0.1:9/nothing.txt", content: bytes = CONTENT, path: str = "demo/file.txt"):
    return RemoteFile(path, (url,), len(content), hashlib.sha256(content).hexdigest())


@pytest.fixture
def server(tmp_path):
    """A loopback HTTP server over tmp_path/www; yields its base URL."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_registry_checksums_match_the_shared_manifest(mirror):
    manifest = (mirror / "MANIFEST.md").read_text()
    published = dict(re.findall(r"^\| data/(\S+) \| \d+ \| ([0-9a-f]{64}) \|", manifest, re.M))
    checked = 0
    for dataset in DATASETS.values():
        for f in dataset.files.values():
            if f.path in published:
                assert f.sha256 == published[f.path], f.path
                assert (mirror / f.path).stat().st_size == f.size
                checked += 1
    # tinyshakespeare, the-verdict, wikitext-2 (2 files), instruction-data (plain and with preferences), gpt2 (2 files)
    assert checked == 8
    assert get_dataset("dolly-15k").files["text"].sha256 in manifest
    assert get_dataset("dolly-15k").files["text"].size == 13_085_339


def test_every_data_set_the_issue_names_is_registered():
    for name in [
        "tinyshakespeare",
        "the-verdict",
        "wikitext-2",
        "wikitext-103",
        "tinystories",
        "alpaca",
        "dolly-15k",
        "instruction-data",
        "instruction-data-with-preference",
        "python-docs",
    ]:
        dataset = get_dataset(name)
        assert dataset.license
        if dataset.format != "builtin":
            assert all(f.urls[0].startswith("https://") and f.sha256 and f.size for f in dataset.files.values())
    assert get_dataset("alpaca").records == 52_002
    assert set(get_dataset("wikitext-2").files) == {"train", "val"}


def test_unknown_name_suggests_close_names():
    with pytest.raises(DataError, match="did you mean tinyshakespeare"):
        get_dataset("tinyshakespear")


def test_mirror_hit(tmp_path):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "file.txt").write_bytes(CONTENT)
    assert resolve_file(remote(), tmp_path) == tmp_path / "demo" / "file.txt"


def test_mirror_file_with_wrong_checksum_is_refused(tmp_path):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "file.txt").write_bytes(CONTENT[:-1] + b"X")
    with pytest.raises(DataError, match=r"file\.txt: its sha256 is [0-9a-f]{64}, expected"):
        resolve_file(remote(), tmp_path)


def test_mirror_file_with_wrong_size_is_refused(tmp_path):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "file.txt").write_bytes(CONTENT + b"more")
    with pytest.raises(DataError, match="expected 1,500"):
        resolve_file(remote(), tmp_path)


def test_cache_hit_when_the_mirror_lacks_the_file(tmp_path):
    cached = cache_dir() / "demo" / "file.txt"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(CONTENT)
    assert resolve_file(remote(), tmp_path / "empty-mirror") == cached


def test_download_goes_into_the_cache_checked_and_whole(server):
    root, url = server
    (root / "file.txt").write_bytes(CONTENT)
    path = resolve_file(remote(f"{url}/file.txt"))
    assert path == cache_dir() / "demo" / "file.txt"
    assert path.read_bytes() == CONTENT
    assert [p.name for p in path.parent.iterdir()] == ["file.txt"]  # no .part left behind


def test_damaged_cache_entry_is_fetched_again(server):
    root, url = server
    (root / "file.txt").write_bytes(CONTENT)
    cached = cache_dir() / "demo" / "file.txt"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"truncated")
    assert resolve_file(remote(f"{url}/file.txt")).read_bytes() == CONTENT


def test_download_with_other_content_is_refused_and_not_kept(server):
    root, url = server
    (root / "file.txt").write_bytes(CONTENT.replace(b"Kiln", b"Klin"))
    with pytest.raises(DataError, match="not the expected file"):
        resolve_file(remote(f"{url}/file.txt"))
    assert not (cache_dir() / "demo").exists() or not any((cache_dir() / "demo").iterdir())


def test_offline_error_names_the_places_to_put_the_file(tmp_path):
    with pytest.raises(DataError) as error:
        resolve_file(remote("http://127.0.0.1:9/file.txt"), tmp_path / "mirror")
    message = str(error.value)
    assert "could not get http://127.0.0.1:9/file.txt" in message
    assert str(tmp_path / "mirror" / "demo" / "file.txt") in message
    assert str(cache_dir() / "demo" / "file.txt") in message


def test_without_a_mirror_the_error_says_how_to_set_one(monkeypatch):
    monkeypatch.delenv("KILN_DATA_DIR", raising=False)
    with pytest.raises(DataError, match="set KILN_DATA_DIR"):
        resolve_file(remote())


def test_archive_members_are_extracted_into_the_cache(tmp_path):
    archive = tmp_path / "mirror" / "zipped" / "corpus.zip"
    archive.parent.mkdir(parents=True)
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("corpus/train.raw", "train text\n")
        zf.writestr("corpus/valid.raw", "valid text\n")
    data = archive.read_bytes()
    dataset = DataSet(
        "zipped",
        "test",
        "none",
        "text",
        files={
            "archive": RemoteFile(
                "zipped/corpus.zip", ("http://127.0.0.1:9/x",), len(data), hashlib.sha256(data).hexdigest()
            )
        },
        members={"train": "corpus/train.raw", "val": "corpus/valid.raw"},
    )
    paths = resolve_dataset(dataset, tmp_path / "mirror")
    assert paths["train"].read_text() == "train text\n"
    assert paths["val"] == cache_dir() / "zipped" / "corpus" / "valid.raw"


def test_real_data_sets_resolve_from_the_mirror(mirror):
    paths = resolve_dataset(get_dataset("wikitext-2"), mirror)
    assert paths == {"train": mirror / "wikitext-2" / "train.txt", "val": mirror / "wikitext-2" / "valid.txt"}
    assert resolve_dataset(get_dataset("gpt2-tokenizer"))["merges"] == Path(mirror) / "gpt2-tokenizer" / "vocab.bpe"
