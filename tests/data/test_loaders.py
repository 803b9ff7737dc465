"""Both loaders on real prepared data: shifted targets, determinism, resume, and rank sharding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln.data.corpus import open_corpus
from kiln.data.loaders import EpochWindows, RandomWindows, SlidingWindows
from kiln.data.prepare import prepare_corpus
from kiln.errors import DataError


@pytest.fixture(scope="module")
def verdict(mirror, tmp_path_factory):
    return prepare_corpus(
        open_corpus("the-verdict", mirror), "gpt2", tmp_path_factory.mktemp("v") / "v", data_dir=mirror
    )


def test_random_windows_are_shifted_slices_of_the_data(shakespeare_prepared):
    tokens = shakespeare_prepared["char"].tokens("train")
    x, y = next(RandomWindows(tokens, block_size=64, batch_size=12, seed=1))
    assert x.shape == y.shape == (12, 64) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x.numpy(), y.numpy(), strict=True):
        start = int(np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(tokens, 64) == row_x, axis=1))[0])
        assert np.array_equal(tokens[start + 1 : start + 65], row_y)


def test_random_windows_are_deterministic_and_resume_exactly(shakespeare_prepared):
    tokens = shakespeare_prepared["char"].tokens("train")
    straight = RandomWindows(tokens, 64, 8, seed=7)
    batches = [next(straight) for _ in range(6)]
    interrupted = RandomWindows(tokens, 64, 8, seed=7)
    for _ in range(3):
        next(interrupted)
    resumed = RandomWindows(tokens, 64, 8, seed=7)
    resumed.load_state_dict(interrupted.state_dict())
    for expected in batches[3:]:
        assert all(torch.equal(a, b) for a, b in zip(next(resumed), expected, strict=True))
    other_seed = next(RandomWindows(tokens, 64, 8, seed=8))
    assert not torch.equal(other_seed[0], batches[0][0])


def test_random_windows_differ_across_ranks(shakespeare_prepared):
    tokens = shakespeare_prepared["char"].tokens("train")
    rank0 = next(RandomWindows(tokens, 64, 8, seed=7, rank=0, world_size=2))[0]
    rank1 = next(RandomWindows(tokens, 64, 8, seed=7, rank=1, world_size=2))[0]
    assert not torch.equal(rank0, rank1)


def test_sliding_windows_match_llms_from_scratch_chapter_5(verdict):
    train = SlidingWindows(verdict.tokens("train"), block_size=256, batch_size=2, stride=256, shuffle=True)
    val = SlidingWindows(verdict.tokens("val"), block_size=256, batch_size=2, stride=256, drop_last=False)
    train_batches, val_batches = list(train), list(val)
    assert len(train_batches) == 9 and len(val_batches) == 1
    assert all(x.shape == (2, 256) for x, _ in train_batches)
    assert sum(x.numel() for x, _ in train_batches) == 4_608
    assert sum(x.numel() for x, _ in val_batches) == 512


def test_sliding_windows_with_overlapping_stride(verdict):
    tokens = verdict.tokens("train")
    loader = SlidingWindows(tokens, block_size=4, batch_size=8, stride=1)
    x, y = next(iter(loader))
    assert x[0].tolist() == tokens[0:4].tolist() and x[1].tolist() == tokens[1:5].tolist()
    assert y[0].tolist() == tokens[1:5].tolist()


def test_sliding_windows_resume_mid_epoch_and_shuffle_per_epoch(verdict):
    tokens = verdict.tokens("train")
    straight = SlidingWindows(tokens, 64, 4, stride=32, shuffle=True, seed=3)
    epoch0, epoch1 = list(straight), list(straight)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(epoch0, epoch1, strict=True))
    interrupted = SlidingWindows(tokens, 64, 4, stride=32, shuffle=True, seed=3)
    iterator = iter(interrupted)
    for _ in range(5):
        next(iterator)
    resumed = SlidingWindows(tokens, 64, 4, stride=32, shuffle=True, seed=3)
    resumed.load_state_dict(interrupted.state_dict())
    rest = list(resumed)
    assert len(rest) == len(epoch0) - 5
    assert all(torch.equal(a[0], b[0]) for a, b in zip(rest, epoch0[5:], strict=True))
    assert resumed.state_dict() == {"epoch": 1, "index": 0}


def test_sliding_windows_shard_the_epoch_across_ranks(verdict):
    tokens = verdict.tokens("train")
    shards = [
        SlidingWindows(tokens, 32, 1, stride=32, shuffle=True, seed=5, rank=r, world_size=2, drop_last=False)
        for r in (0, 1)
    ]
    seen = [tuple(x[0].tolist()) for shard in shards for x, _ in shard]
    everything = [tuple(x[0].tolist()) for x, _ in SlidingWindows(tokens, 32, 1, stride=32)]
    assert sorted(seen) == sorted(everything)


def test_epoch_windows_take_every_window_once_per_epoch_in_a_new_order(verdict):
    tokens = verdict.tokens("train")  # 4,612 tokens: 18 windows of 256, 9 steps of 2 (the book's batches)
    rows = EpochWindows(tokens, block_size=256, rows_per_step=2, seed=123)
    assert rows.steps_per_epoch == 9
    epochs = [np.concatenate([rows.rows(s) for s in range(e * 9, (e + 1) * 9)]) for e in range(3)]
    for starts in epochs:
        assert sorted(starts.tolist()) == list(range(0, 18 * 256, 256))
    assert not np.array_equal(epochs[0], epochs[1])
    again = EpochWindows(tokens, block_size=256, rows_per_step=2, seed=123)
    assert np.array_equal(again.rows(13), rows.rows(13))  # a step's rows from (seed, step) alone: resume is exact
    x, y = rows.batch(rows.rows(0))
    assert x.shape == (2, 256) and torch.equal(x[:, 1:], y[:, :-1])


def test_epoch_windows_leave_out_what_does_not_fill_a_step(verdict):
    rows = EpochWindows(verdict.tokens("train"), block_size=256, rows_per_step=4, seed=1)
    assert rows.steps_per_epoch == 4  # 18 windows: 16 in 4 steps, 2 sit the epoch out
    epoch = np.concatenate([rows.rows(s) for s in range(4)])
    assert len(set(epoch.tolist())) == 16
    with pytest.raises(DataError, match="2 windows of 256 tokens do not fill one step of 4 rows"):
        EpochWindows(verdict.tokens("val"), block_size=256, rows_per_step=4, label="val")


def test_corpus_shorter_than_one_window_is_refused(verdict):
    with pytest.raises(DataError, match="534 tokens is shorter than one window of 1,025"):
        RandomWindows(verdict.tokens("val"), block_size=1024, batch_size=1, label="the-verdict val")
    with pytest.raises(DataError, match="shorter than one window"):
        SlidingWindows(verdict.tokens("val"), block_size=534, batch_size=1)
