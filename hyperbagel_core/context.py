"""The BAGEL context: a KV cache plus the two counters of spec section 3.

Keys are stored after qk-norm and RoPE, so a context never needs positions again. Storage is shared
copy-on-write between forks: ``fork()`` is O(1), a context writes in place only while it is the sole
writer past the protected prefix, otherwise it first copies its own prefix (once: the copy is its own).
Buffers grow geometrically so token-by-token decoding does not reallocate every step.

A block's K/V are always written right after ``kv_len`` (``reserve`` + ``write``), so attention reads one
contiguous [kv_len + n] view. Each layer's K/V live on the device that runs that layer (``reserve(devices=)``,
a model placed over several devices), so no step copies a cache across devices. ``advance`` commits a
block; a read-only query (denoising) skips it, and its write is scratch that no reader can see: forks only
read below the protected prefix, which is <= kv_len whenever a context writes in place.
"""
from __future__ import annotations

import itertools
from typing import NamedTuple

import torch

_sequence = itertools.count()


class Block(NamedTuple):
    """One prefilled block of a context; ``seq`` orders blocks across contexts (the global call order)."""
    kind: str          # "text" | "vit" | "vae"
    n: int             # KV entries (markers included)
    rope: int          # RoPE position of its first token
    ids: tuple         # text ids, or the (start, end) marker ids of an image block
    seq: int


def new_block(kind: str, n: int, rope: int, ids) -> Block:
    return Block(kind, n, rope, tuple(ids), next(_sequence))


class _Storage:
    """Per-layer K/V buffers of one writer; ``protected`` = prefix length that forks may still read."""

    def __init__(self, num_layers: int):
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.protected = 0
        self.capacity = 0
        self.owner: "Context | None" = None
        self.devices: tuple | None = None   # per layer
        self.dtype: torch.dtype | None = None


class Context:
    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.kv_len = 0
        self.rope = 0
        self._store = _Storage(num_layers)
        self._store.owner = self
        self.layout: list[Block] = []  # the prefilled blocks, in order

    # -- inspection ----------------------------------------------------------------------------------------
    def keys(self, layer: int) -> torch.Tensor | None:
        k = self._store.k[layer]
        return None if k is None else k[: self.kv_len]

    def values(self, layer: int) -> torch.Tensor | None:
        v = self._store.v[layer]
        return None if v is None else v[: self.kv_len]

    def __repr__(self) -> str:
        return f"Context(kv_len={self.kv_len}, rope={self.rope})"

    # -- branching -------------------------------------------------------------------------------------------
    def fork(self) -> "Context":
        """A new context with the same tokens; later appends to either one stay private."""
        other = Context.__new__(Context)
        other.num_layers, other.kv_len, other.rope = self.num_layers, self.kv_len, self.rope
        other._store, other.layout = self._store, list(self.layout)
        self._store.protected = max(self._store.protected, self.kv_len)
        return other

    def truncate(self, kv_len: int, rope: int) -> None:
        """Roll back to an earlier length (speculative decoding); never grows."""
        if kv_len > self.kv_len or rope > self.rope:
            raise ValueError(f"truncate can only shrink: {self.kv_len}->{kv_len}, {self.rope}->{rope}")
        self.kv_len, self.rope = kv_len, rope

    # -- writing (used by the model's attention layers) -------------------------------------------------------
    def reserve(self, n: int, like: torch.Tensor, num_kv_heads: int, head_dim: int, grow: bool = True,
                devices=None) -> None:
        """Make room for ``n`` tokens after ``kv_len`` in storage that this context may write in place.

        A fork that does not own its storage, or an owner that truncated below a fork's tokens, first copies
        its ``kv_len`` prefix into storage of its own. ``grow=False`` (scratch for a read-only query, which
        never lengthens the cache) sizes new storage exactly instead of doubling it. ``devices``: one device
        per layer (the layer's execution device when the model is placed over several); None = ``like``'s.
        """
        st, need = self._store, self.kv_len + n
        devices = (like.device,) * self.num_layers if devices is None else tuple(devices)
        in_place = (st.owner is self and st.protected <= self.kv_len and need <= st.capacity
                    and st.devices == devices and st.dtype == like.dtype)
        if in_place:
            return
        cap = max(2 * need, 16) if st.owner is self and grow else need  # a growing cache amortises
        new = _Storage(self.num_layers)
        new.capacity, new.owner, new.devices, new.dtype = cap, self, devices, like.dtype
        for i in range(self.num_layers):
            new.k[i] = torch.empty(cap, num_kv_heads, head_dim, dtype=like.dtype, device=devices[i])
            new.v[i] = torch.empty_like(new.k[i])
            if self.kv_len:
                new.k[i][: self.kv_len] = st.k[i][: self.kv_len]
                new.v[i][: self.kv_len] = st.v[i][: self.kv_len]
        self._store = new

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a block's K/V for ``layer`` at ``kv_len`` (after ``reserve``); return views of all keys/values
        up to it. Without a later ``advance`` this is a scratch write (a read-only query's block)."""
        st, end = self._store, self.kv_len + k.shape[0]
        st.k[layer][self.kv_len:end] = k
        st.v[layer][self.kv_len:end] = v
        return st.k[layer][:end], st.v[layer][:end]

    def advance(self, n_tokens: int, n_positions: int) -> None:
        """Commit a block written by ``write``: spec section 3's counter updates."""
        self.kv_len += n_tokens
        self.rope += n_positions
