"""Read text to train on: documents streamed as chunks, from files, folders, JSONL, tables or built-ins.

Nothing here holds a whole corpus in memory: a document is an iterator of text chunks, so a 500 MB
file is read a megabyte at a time.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kiln.data.fetch import file_sha256, resolve_dataset
from kiln.data.registry import DATASETS, get_dataset
from kiln.errors import DataError

TEXT_SUFFIXES = {".txt", ".md", ".text", ".raw"}
TABLE_SUFFIXES = {".json": "json", ".csv": "csv", ".parquet": "parquet"}
_BLOCK = 1 << 20

Documents = Iterator[Iterator[str]]


@dataclass
class ReadOptions:
    """How to read user files: decoding errors, the JSON/table text field, and bad JSONL lines."""

    errors: str = "strict"  # strict | replace
    text_field: str | None = None
    skip_bad_lines: bool = False
    one_per_line: bool = False  # text files: each non-empty line is its own document (an example)


@dataclass
class Corpus:
    """A source of documents; `documents()` may be called more than once (prepare reads twice)."""

    label: str
    options: ReadOptions = field(default_factory=ReadOptions)
    skipped_lines: int = 0

    def documents(self) -> Documents:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """sha256 that changes whenever the source's contents do."""
        raise NotImplementedError


@dataclass
class TextFiles(Corpus):
    """Plain UTF-8 text files, one document each, in the order given."""

    paths: list[Path] = field(default_factory=list)
    known_sha256: str | None = None

    def documents(self) -> Documents:
        for path in self.paths:
            if self.options.one_per_line:
                yield from (iter([line]) for line in _lines(_read_text(path, self.options.errors)) if line.strip())
            else:
                yield _read_text(path, self.options.errors)

    def fingerprint(self) -> str:
        """A single file's own sha256 (so a data set's registry checksum serves); for several, a hash
        of their names and sha256s. Read one example per line, the same text makes other documents."""
        if self.known_sha256:
            digest = self.known_sha256
        elif len(self.paths) == 1:
            digest = file_sha256(self.paths[0])
        else:
            listing = "".join(f"{p.name}\0{file_sha256(p)}\n" for p in self.paths)
            digest = hashlib.sha256(listing.encode()).hexdigest()
        return hashlib.sha256(f"{digest}\0lines".encode()).hexdigest() if self.options.one_per_line else digest


def _lines(blocks: Iterator[str]) -> Iterator[str]:
    """The lines of a text read in blocks, without their line ends."""
    pending = ""
    for block in blocks:
        *complete, pending = (pending + block).split("\n")
        yield from (line.rstrip("\r") for line in complete)
    if pending:
        yield pending.rstrip("\r")


# Byte-order marks: the encoding they announce, and how many bytes they take.
_BOMS = ((codecs.BOM_UTF8, "utf-8", 3), (codecs.BOM_UTF16_LE, "utf-16", 0), (codecs.BOM_UTF16_BE, "utf-16", 0))


def _read_text(path: Path, errors: str) -> Iterator[str]:
    """A text file in blocks: UTF-8 (a BOM dropped), or UTF-16 when its BOM says so; Windows line
    ends become "\n" (a "\r" would otherwise become a token of its own)."""
    with open(path, "rb") as f:
        head = f.read(4)
        encoding, skip = next(((enc, n) for bom, enc, n in _BOMS if head.startswith(bom)), ("utf-8", 0))
        f.seek(skip)
        decoder = codecs.getincrementaldecoder(encoding)(errors)
        offset, held = skip, ""
        while block := f.read(_BLOCK):
            if encoding == "utf-8" and errors == "strict" and (nul := block.find(b"\0")) >= 0:
                raise DataError(
                    f"{path}: looks binary (NUL byte at byte {offset + nul:,}); give a text file, "
                    "or pass --errors replace to read it anyway"
                )
            pending = len(decoder.getstate()[0])
            try:
                text = held + decoder.decode(block)
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}: not {encoding.upper()} at byte {offset - pending + e.start:,}; convert it to UTF-8, "
                    "or pass --errors replace to read it anyway"
                ) from None
            offset += len(block)
            held = "\r" if text.endswith("\r") else ""  # its "\n" may open the next block
            text = text[: len(text) - len(held)].replace("\r\n", "\n")
            if text:
                yield text
    try:
        tail = held + decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise DataError(
            f"{path}: ends inside a {encoding.upper()} character; convert it to UTF-8, or pass --errors replace"
        ) from None
    if tail:
        yield tail.replace("\r\n", "\n")


@dataclass
class JsonlRecords(Corpus):
    """JSON Lines: one record per line, its text field one document."""

    path: Path = Path()

    def documents(self) -> Documents:
        text_field = self.options.text_field or "text"
        self.skipped_lines = 0
        with open(self.path, "rb") as f:  # line by line, so that a byte that is not UTF-8 names its line
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                problem = None
                try:
                    record = json.loads(line.decode("utf-8-sig" if number == 1 else "utf-8", self.options.errors))
                except UnicodeDecodeError as e:
                    problem = f"not UTF-8 at byte {e.start} of the line (--errors replace reads it anyway)"
                except json.JSONDecodeError as e:
                    problem = f"not valid JSON ({e.msg} at column {e.colno})"
                except (ValueError, RecursionError) as e:  # an integer past 4,300 digits; nesting past the stack
                    problem = "nested too deeply" if isinstance(e, RecursionError) else str(e).split(":")[0]
                else:
                    if not isinstance(record, dict):
                        problem = "not a JSON object"
                    elif not isinstance(record.get(text_field), str):
                        # A name holding a line break or another control character is escaped: one line still.
                        found = ", ".join(n if n.isprintable() else repr(n) for n in sorted(record)) or "none"
                        problem = f"no text field '{text_field}' (fields: {found}); choose one with --text-field"
                if problem is None:
                    yield iter((record[text_field],))
                elif self.options.skip_bad_lines:
                    self.skipped_lines += 1
                else:
                    raise DataError(f"{self.path}:{number}: {problem}; fix the line or pass --skip-bad-lines")

    def fingerprint(self) -> str:
        return _records_fingerprint(self.path, self.options.text_field)


@dataclass
class TableRecords(Corpus):
    """JSON, CSV or parquet read through the `datasets` library: each row's text field one document."""

    path: Path = Path()
    table_format: str = "json"

    def documents(self) -> Documents:
        text_field = self.options.text_field or "text"
        rows = iter(_load_table(self.path, self.table_format))
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except Exception as e:  # datasets raises parser errors lazily, in many types
                raise DataError(f"{self.path}: cannot read it as {self.table_format.upper()} ({_first_line(e)})") from e
            if text_field not in row:
                raise DataError(
                    f"{self.path}: no column '{text_field}' (columns: {', '.join(row)}); choose one with --text-field"
                )
            if isinstance(row[text_field], str):
                yield iter((row[text_field],))

    def fingerprint(self) -> str:
        return _records_fingerprint(self.path, self.options.text_field)


def _load_table(path: Path, table_format: str):
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its parse errors come back as one DataError
    try:
        return datasets.load_dataset(table_format, data_files=str(path), split="train", streaming=True)
    except Exception as e:
        raise DataError(f"{path}: cannot read it as {table_format.upper()} ({_first_line(e)})") from e


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _records_fingerprint(path: Path, text_field: str | None) -> str:
    """The file's sha256 combined with the field read from it: another field is another corpus."""
    return hashlib.sha256(f"{text_field or 'text'}\0{file_sha256(path)}".encode()).hexdigest()


@dataclass
class PythonDocs(Corpus):
    """The Python standard library's reference topics, one document each: real English on any machine."""

    def documents(self) -> Documents:
        for _, text in _python_topics():
            yield iter((text,))

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for name, text in _python_topics():
            h.update(name.encode() + b"\0" + text.encode() + b"\0")
        return h.hexdigest()


def _python_topics() -> list[tuple[str, str]]:
    try:
        from pydoc_data.topics import topics
    except ImportError as e:
        raise DataError(
            "python-docs: this Python has no pydoc_data module; install the full standard library "
            "(on Debian: the python3 package, not only python3-minimal)"
        ) from e
    return sorted(topics.items())


def open_corpus(
    spec: str | os.PathLike, data_dir: str | os.PathLike | None = None, options: ReadOptions | None = None
) -> dict[str, Corpus]:
    """A file, folder or data-set name as corpora: {'all': c}, or {'train': c, 'val': c} for data sets
    that ship their own validation split."""
    options = options or ReadOptions()
    path = Path(spec).expanduser()
    if path.exists():
        return {"all": _open_path(path, options)}
    if str(spec) not in DATASETS and (os.sep in str(spec) or path.suffix):
        raise DataError(f"{path}: no such file or folder")
    dataset = get_dataset(str(spec))
    if dataset.format == "builtin":
        return {"all": PythonDocs(label=dataset.name, options=options)}
    if dataset.format == "tokenizer":
        raise DataError(f"'{dataset.name}' is a tokenizer's files, not text; use it with --tokenizer gpt2")
    if dataset.format in ("instructions", "preferences") and not options.text_field:
        raise DataError(
            f"'{dataset.name}' is an instruction data set (records, not running text): fine-tune on it, "
            "or pass --text-field output to read one field of each record as text"
        )
    paths = resolve_dataset(dataset, data_dir)
    corpora = {}
    for role, local in paths.items():
        corpus = _open_path(local, options, label=f"{dataset.name}" + ("" if role == "text" else f" ({role})"))
        if isinstance(corpus, TextFiles) and role in dataset.files:
            corpus.known_sha256 = dataset.files[role].sha256
        corpora["all" if role == "text" else role] = corpus
    return corpora


def _open_path(path: Path, options: ReadOptions, label: str | None = None) -> Corpus:
    label = label or str(path)
    if path.is_dir():
        files = sorted(
            (
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in TEXT_SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            ),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        # a prepared folder whose meta.json no longer reads (its tokenizer/words.txt is no corpus)
        if (path / "meta.json").is_file() and (not files or (path / "train.bin").is_file()):
            raise DataError(
                f"{path / 'meta.json'}: not the meta.json of a Kiln prepared corpus (damaged?); "
                "prepare the data again with `kiln prepare`"
            )
        if not files:
            raise DataError(f"{path}: folder has no {'/'.join(sorted(TEXT_SUFFIXES))} files")
        return TextFiles(label=label, options=options, paths=files)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return JsonlRecords(label=label, options=options, path=path)
    if suffix in TABLE_SUFFIXES:
        return TableRecords(label=label, options=options, path=path, table_format=TABLE_SUFFIXES[suffix])
    return TextFiles(label=label, options=options, paths=[path])
