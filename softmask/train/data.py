"""Deterministic, resumable data order for training.

Every batch is a pure function of ``(seed, cursor)`` where ``cursor`` counts the
batches consumed since the start of training: epoch ``e = cursor // per_epoch``
shuffles the data set with a generator seeded by ``(seed, e)``, each rank takes
every ``world``-th index of its batches (a distributed sampler), and the random
image distortions of an item are drawn from a generator seeded by
``(seed, e, index)``. So ``--resume`` continues with exactly the batches of an
uninterrupted run, with any number of loader worker processes.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["SeededItems", "EpochBatches", "batch_stream", "mix_seed"]


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (SplitMix-style mixing, stable across runs)."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


class SeededItems(Dataset):
    """``ds[(index, item_seed)]``: ``base[index]`` with torch / numpy / random seeded by ``item_seed``
    for the duration of the call (the caller's RNG states are restored afterwards)."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        index, item_seed = key
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(item_seed)
            random.seed(item_seed)
            np.random.seed(item_seed % (2**32))
            try:
                return self.base[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


class EpochBatches(Sampler):
    """Batches of ``(index, item_seed)`` keys of one epoch for one rank, from batch ``start`` on."""

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, start: int = 0, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, epoch
        self.start, self.rank, self.world = start, rank, world

    @staticmethod
    def per_epoch(n: int, batch_size: int, world: int) -> int:
        return n // (batch_size * world)

    def __len__(self) -> int:
        return max(self.per_epoch(self.n, self.batch_size, self.world) - self.start, 0)

    def __iter__(self):
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        perm = torch.randperm(self.n, generator=g).tolist()
        gb = self.batch_size * self.world
        for b in range(self.start, self.per_epoch(self.n, self.batch_size, self.world)):
            chunk = perm[b * gb : (b + 1) * gb][self.rank :: self.world]  # (batch_size,)
            yield [(i, mix_seed(self.seed, self.epoch, i, 1)) for i in chunk]


def batch_stream(dataset: Dataset, collate, *, batch_size: int, seed: int, cursor: int, rank: int = 0,
                 world: int = 1, num_workers: int = 0):
    """Yield ``(cursor, batch)`` forever from ``cursor`` on (batches that collate to None are
    yielded as None so the caller can count them)."""
    n = len(dataset)
    per_epoch = EpochBatches.per_epoch(n, batch_size, world)
    if per_epoch == 0:
        raise ValueError(
            f"data set of {n} items is smaller than one global batch ({batch_size} x {world} ranks)"
        )
    items = SeededItems(dataset)
    while True:
        epoch, start = divmod(cursor, per_epoch)
        sampler = EpochBatches(n, batch_size, seed, epoch, start, rank, world)
        loader = DataLoader(items, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
                            generator=torch.Generator().manual_seed(mix_seed(seed, epoch, 2)),
                            persistent_workers=False)
        for batch in loader:
            yield cursor, batch
            cursor += 1
