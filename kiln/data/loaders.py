"""Batches of (input, target) windows over a memory-mapped token array, target shifted by one.

The loaders are deterministic under a seed, save and restore their position, and shard across
data-parallel ranks (`rank`, `world_size`) so each rank sees different windows.
"""

from __future__ import annotations

import numpy as np
import torch

from kiln.errors import DataError


def _check_long_enough(tokens: np.ndarray, block_size: int, label: str) -> None:
    if len(tokens) <= block_size:
        raise DataError(
            f"{label or 'the data'}: {len(tokens):,} tokens is shorter than one window of {block_size + 1:,} "
            "(block size + 1); use a smaller block size or more text"
        )


def windows_at(tokens: np.ndarray, starts: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (input, target) windows of `block_size` tokens starting at `starts`, target shifted by one."""
    windows = tokens[starts[:, None] + np.arange(block_size + 1)].astype(np.int64)
    return torch.from_numpy(windows[:, :-1].copy()), torch.from_numpy(windows[:, 1:].copy())


def stride_starts(length: int, block_size: int, stride: int | None = None) -> np.ndarray:
    """Offsets 0, stride, 2*stride, ... of the windows (with their next-token target) that fit in
    `length` tokens, as LLMs-from-scratch cuts them; stride defaults to the block size."""
    return np.arange(0, length - block_size, stride or block_size)


class _Windows:
    """What both loaders share: the token array, window and batch sizes, seed, and rank sharding."""

    def __init__(
        self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int, rank: int, world_size: int, label: str
    ):
        _check_long_enough(tokens, block_size, label)
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size


class RandomWindows(_Windows):
    """nanoGPT's loader: every batch takes `batch_size` windows at uniformly random offsets, forever.

    Batch k depends only on (seed, rank, k), so the position is just the step count.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        block_size: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        label: str = "",
    ):
        super().__init__(tokens, block_size, batch_size, seed, rank, world_size, label)
        self.step = 0

    def __iter__(self) -> RandomWindows:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.rank, self.step])
        starts = rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size)
        self.step += 1
        return windows_at(self.tokens, starts, self.block_size)

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


class StepWindows:
    """Pretraining's rows for the training engine: step s reads `rows_per_step` windows at offsets drawn
    uniformly from (seed, s) alone, so any step's batch can be rebuilt (exact resume) and shared out
    between processes without any of them reading another's windows twice."""

    def __init__(self, tokens: np.ndarray, block_size: int, rows_per_step: int, seed: int = 0, label: str = ""):
        _check_long_enough(tokens, block_size, label)
        self.tokens, self.block_size, self.rows_per_step, self.seed = tokens, block_size, rows_per_step, seed

    def rows(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, len(self.tokens) - self.block_size, size=self.rows_per_step)

    def batch(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return windows_at(self.tokens, starts, self.block_size)


class EpochWindows(StepWindows):
    """Pretraining's rows for a run counted in epochs: the windows at 0, block_size, 2*block_size, ...
    (none overlapping), each epoch all of them in a new order drawn from (seed, epoch), as
    LLMs-from-scratch's shuffled DataLoader takes them. Steps are whole: the windows that would only
    part-fill an epoch's last step sit that epoch out (drop_last). Step s's rows still depend on (seed, s)
    alone, so resume stays exact."""

    def __init__(self, tokens: np.ndarray, block_size: int, rows_per_step: int, seed: int = 0, label: str = ""):
        super().__init__(tokens, block_size, rows_per_step, seed, label)
        self.starts = stride_starts(len(tokens), block_size)
        self.steps_per_epoch = len(self.starts) // rows_per_step
        if not self.steps_per_epoch:
            raise DataError(
                f"{label or 'the data'}: {len(self.starts):,} windows of {block_size:,} tokens do not fill one step "
                f"of {rows_per_step:,} rows; use a smaller batch size or block size, or more text"
            )
        self._order = (-1, self.starts)

    def rows(self, step: int) -> np.ndarray:
        epoch, index = divmod(step, self.steps_per_epoch)
        if self._order[0] != epoch:
            self._order = (epoch, self.starts[np.random.default_rng([self.seed, epoch]).permutation(len(self.starts))])
        return self._order[1][index * self.rows_per_step : (index + 1) * self.rows_per_step]


class SlidingWindows(_Windows):
    """LLMs-from-scratch's loader: windows start at 0, stride, 2*stride, ...; one pass is an epoch.

    Iterating yields the rest of the current epoch (shuffled per epoch when asked), then moves on to
    the next epoch, like a DataLoader. Rank r takes every world_size-th window of the epoch's order.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        block_size: int,
        batch_size: int,
        stride: int | None = None,
        shuffle: bool = False,
        drop_last: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        label: str = "",
    ):
        super().__init__(tokens, block_size, batch_size, seed, rank, world_size, label)
        self.stride = stride or block_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.starts = stride_starts(len(tokens), block_size, self.stride)
        self.epoch = self.index = 0

    def _epoch_starts(self) -> np.ndarray:
        starts = self.starts
        if self.shuffle:
            starts = starts[np.random.default_rng([self.seed, self.epoch]).permutation(len(starts))]
        return starts[self.rank :: self.world_size]

    def __len__(self) -> int:
        n = len(self.starts[self.rank :: self.world_size])
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        starts = self._epoch_starts()
        while self.index < len(self):
            batch = starts[self.index * self.batch_size : (self.index + 1) * self.batch_size]
            self.index += 1
            yield windows_at(self.tokens, batch, self.block_size)
        self.epoch, self.index = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
