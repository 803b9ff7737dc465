"""Keys and values of past positions, so generation computes each new token's attention once."""

from __future__ import annotations

import torch


class KVCache:
    """Per-layer key/value tensors preallocated to `max_len`, filled by a prefill and then one step at a time.

    `length` counts the positions stored; the model advances it once all layers have written. A model
    with smeared keys also keeps each layer's unsmeared key of the last position (`last_keys`), which the
    next position's key mixes in.
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        smear_keys: bool = False,
    ):
        shape = (n_layer, batch_size, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        last = (n_layer, batch_size, kv_heads, head_dim)
        self.last_keys = torch.zeros(last, dtype=dtype, device=device) if smear_keys else None
        self.max_len = max_len
        self.length = 0

    @classmethod
    def for_model(cls, model, batch_size: int = 1, max_len: int | None = None) -> KVCache:
        c = model.config
        param = next(model.parameters())
        return cls(
            c.n_layer, batch_size, c.kv_heads, c.head_dim, max_len or c.block_size, param.dtype, param.device,
            c.smear_keys,
        )  # fmt: skip

    def key_before(self, layer: int) -> torch.Tensor | None:
        """The unsmeared key of the last stored position (None: nothing stored, or no smeared keys)."""
        return None if self.last_keys is None or self.length == 0 else self.last_keys[layer]

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, last_key: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new keys/values after the cached ones (and the unsmeared key of the newest
        position, with smeared keys); return all of them so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} asked for")
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        if last_key is not None:
            self.last_keys[layer] = last_key
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def repeat(self, batch_size: int) -> KVCache:
        """A cache of `batch_size` rows, each holding this one-row cache's positions so far."""
        copy = KVCache.__new__(KVCache)
        copy.max_len, copy.length = self.max_len, self.length
        n_layer, _, kv_heads, max_len, head_dim = self.k.shape
        shape = (n_layer, batch_size, kv_heads, max_len, head_dim)
        # Positions past `length` are never read (update returns the filled ones), so they need no zeros.
        copy.k = torch.empty(shape, dtype=self.k.dtype, device=self.k.device)
        copy.v = torch.empty(shape, dtype=self.v.dtype, device=self.v.device)
        copy.k[:, :, :, : self.length] = self.k[:, :, :, : self.length]
        copy.v[:, :, :, : self.length] = self.v[:, :, :, : self.length]
        copy.last_keys = None if self.last_keys is None else self.last_keys.expand(-1, batch_size, -1, -1).clone()
        return copy

    def advance(self, steps: int) -> None:
        self.length += steps

    def reset(self) -> None:
        self.length = 0


class SlotCache:
    """Keys and values for `slots` sequences that each grow at their own pace (a server's requests):
    a prefill fills one slot through `slot(i)`, then `write` adds one position to many slots at once."""

    def __init__(self, model, slots: int):
        c = model.config
        param = next(model.parameters())
        shape = (c.n_layer, slots, c.kv_heads, c.block_size, c.head_dim)
        self.k = torch.zeros(shape, dtype=param.dtype, device=param.device)
        self.v = torch.zeros(shape, dtype=param.dtype, device=param.device)
        last = (c.n_layer, slots, c.kv_heads, c.head_dim)
        self.last_keys = torch.zeros(last, dtype=param.dtype, device=param.device) if c.smear_keys else None
        self.slots = slots

    def slot(self, index: int) -> KVCache:
        """A KVCache that reads and writes slot `index` only (views into this cache), empty."""
        view = KVCache.__new__(KVCache)
        view.k, view.v = self.k[:, index : index + 1], self.v[:, index : index + 1]
        view.last_keys = None if self.last_keys is None else self.last_keys[:, index : index + 1]
        view.max_len, view.length = self.k.shape[3], 0
        return view

    def keys_before(self, layer: int, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        """With smeared keys, the unsmeared key before positions[i] of slot rows[i] [B, kv_heads, head_dim]
        (zeros at position 0); None without."""
        if self.last_keys is None:
            return None
        return self.last_keys[layer][rows] * (positions > 0).to(self.last_keys.dtype)[:, None, None]

    def write(
        self,
        layer: int,
        rows: torch.Tensor,
        positions: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        last_key: torch.Tensor | None = None,
    ):
        """Store k[i], v[i] [B, kv_heads, head_dim] at positions[i] of slot rows[i] (and, with smeared keys,
        the unsmeared last_key[i]); return those slots' keys and values up to the furthest position
        [B, kv_heads, T, head_dim]."""
        keys, values = self.k[layer], self.v[layer]
        keys[rows, :, positions] = k
        values[rows, :, positions] = v
        if last_key is not None:
            self.last_keys[layer][rows] = last_key
        end = int(positions.max()) + 1
        first, count = int(rows[0]), rows.numel()
        if int(rows[-1]) - first + 1 == count:  # neighbouring slots: a view, no copy
            return keys[first : first + count, :, :end], values[first : first + count, :, :end]
        return keys[rows, :, :end], values[rows, :, :end]
