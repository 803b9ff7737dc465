"""Shared fixtures: the real data mirror (../shared/data or $KILN_DATA_DIR), an isolated user cache, and the
kill-and-resume loop of the kill tests."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

REPO = Path(__file__).resolve().parents[1]

# Fuzz tests are deterministic for CI: a fixed seed per test, no example database, no timing limits;
# each test sets its own max_examples.
settings.register_profile(
    "kiln",
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("kiln")


def _find_mirror() -> Path | None:
    chosen = os.environ.get("KILN_DATA_DIR")
    candidate = Path(chosen) if chosen else REPO.parent / "shared" / "data"
    return candidate if (candidate / "tinyshakespeare.txt").is_file() else None


os.environ.setdefault("KILN_QUIET", "1")  # session fixtures run before the per-test environment
MIRROR = _find_mirror()
needs_mirror = pytest.mark.skipif(
    MIRROR is None, reason="real data mirror not found: set KILN_DATA_DIR to a folder laid out like ../shared/data"
)


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path_factory, monkeypatch):
    """Every test gets its own empty user cache, no progress bars, and the real mirror if there is one."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("KILN_QUIET", "1")
    if MIRROR is not None:
        monkeypatch.setenv("KILN_DATA_DIR", str(MIRROR))
    else:
        monkeypatch.delenv("KILN_DATA_DIR", raising=False)


@pytest.fixture(scope="session")
def mirror() -> Path:
    if MIRROR is None:
        pytest.skip("real data mirror not found")
    return MIRROR


@pytest.fixture(scope="session")
def verdict_text(mirror) -> str:
    return (mirror / "the-verdict.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def shakespeare_text(mirror) -> str:
    return (mirror / "tinyshakespeare.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def gpt2(mirror):
    from kiln.data.tokenizers import GPT2Tokenizer

    return GPT2Tokenizer.resolve(mirror)


@pytest.fixture(scope="session")
def trained_bpe(mirror, tmp_path_factory):
    """A small byte-level BPE trained on The Verdict, saved and loaded back as users would."""
    from kiln.data.tokenizers import BPETokenizer, load_tokenizer

    text = (mirror / "the-verdict.txt").read_text(encoding="utf-8")
    folder = BPETokenizer.train([text], vocab_size=512).save(tmp_path_factory.mktemp("bpe"))
    return load_tokenizer(folder)


@pytest.fixture(scope="session")
def shakespeare_prepared(mirror, tmp_path_factory):
    """Tiny Shakespeare prepared with char and gpt2, as `kiln prepare tinyshakespeare` does."""
    from kiln.data.corpus import open_corpus
    from kiln.data.prepare import prepare_corpus

    out = tmp_path_factory.mktemp("prepared")
    return {
        tok: prepare_corpus(open_corpus("tinyshakespeare", mirror), tok, out / tok, data_dir=mirror)
        for tok in ("char", "gpt2")
    }


def kill_and_resume(
    command: Callable[[bool], list[str]], out: Path, kills: int, seed: int = 1, folders: tuple = ("last", "best")
) -> None:
    """Run `command(resume)` (a `kiln` subprocess writing the run folder `out`) until it finishes, SIGKILLing it
    `kills` times at seeded random moments and starting it again with resume=True each time. Each kill falls
    soon after the run logs an evaluation: while it writes `folders`, or in the steps after. Going by the run's
    progress, not the clock, keeps it from finishing early on a busy machine. After every run, each of
    `folders` must be what the next start finds it: sound, or not there at all."""
    from kiln.atomic import recover_dir
    from kiln.checkpoint import resumable_step

    env, chance, done = {**os.environ, "KILN_QUIET": "1"}, random.Random(seed), 0
    while True:
        resume = any((out / name).exists() or (out / f".{name}.old").exists() for name in folders)
        run = subprocess.Popen(command(resume), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if done < kills:
            seen, deadline = logged(out), time.time() + 120
            while run.poll() is None and logged(out) <= seen and time.time() < deadline:
                time.sleep(0.005)
            time.sleep(chance.uniform(0, 0.05))
            if run.poll() is None:
                run.send_signal(signal.SIGKILL)
                done += 1
        _, err = run.communicate(timeout=300)
        for name in folders:
            recover_dir(out / name)
            assert not (out / name).exists() or resumable_step(out / name) is not None, f"{name} corrupt"
        if run.returncode == 0:
            break
        assert run.returncode == -signal.SIGKILL, err.decode()
    assert done == kills, f"the run finished after {done} of {kills} kills"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no leftovers


def logged(out: Path) -> int:
    """How many evaluations the run in `out` has logged so far."""
    try:
        return len((out / "metrics.jsonl").read_text().splitlines())
    except OSError:
        return 0


@pytest.fixture(name="kill_and_resume")
def kill_and_resume_fixture() -> Callable:
    """The kill tests' loop (`kill_and_resume`), for training and fine-tuning alike."""
    return kill_and_resume
