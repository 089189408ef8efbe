"""Deterministic, resumable data order for training.

Every batch is a pure function of ``(seed, cursor)`` where ``cursor`` counts the
batches consumed since the start of training: epoch ``e = cursor // per_epoch``
shuffles the data set with a generator seeded by ``(seed, e)``, each rank takes
every ``world``-th index of its batches (a distributed sampler), and the random
image distortions of an item are drawn from a generator seeded by
``(seed, e, index)``. So ``--resume`` continues with exactly the batches of an
uninterrupted run, with any number of loader worker processes.

It also prepares a run's data (:func:`prepare_data`): the training set, the set that
retrieval is evaluated on, and the checks that turn a bad data setting into a
:class:`ConfigError` before any training starts.

Held-out evaluation of caption-JSON data: with ``test_data`` the run is evaluated on
that file. Without it, ``holdout`` images (default at most 1000, and at most a tenth
of the images) are held out of the training JSON: chosen by a hash of the image path
as written in the file (the same images for every seed, every run and any entry
order), with all their captions, written to ``<out>/heldout.json`` and never trained
on. When nothing can be held out (``holdout`` 0, or fewer than 20 images), the run is
evaluated on its training data, and the log and ``eval.json``
(``eval_on_training_data: true``) say so.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

# the settings' error and the checked JSON sets live one floor down (evaluation reads them too); re-exported here
from softmask.runs.datasets import (HOLDOUT_FILE, annotate_eval, check_test_json, eval_target,
                                    dropped_note as _dropped_note, load_json_set as _load_json_set, root_of as _root_of,
                                    write_json_atomic as _write_json_atomic)
from softmask.runs.errors import NO_VALUE, ConfigError, print_notes

__all__ = ["SeededItems", "EpochBatches", "batch_stream", "mix_seed", "ConfigError", "NO_VALUE", "prepare_data",
           "PreparedData", "eval_target", "annotate_eval", "check_test_json", "HOLDOUT_FILE", "print_notes"]

# fewest images a JSON training set needs for a hold-out (a tenth of them, at least 2 images, are held out)
_HOLDOUT_MIN_IMAGES = 20


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


class StreamBatches(Sampler):
    """The batches of :class:`EpochBatches` epoch after epoch, forever, from global batch ``cursor`` on."""

    def __init__(self, n: int, batch_size: int, seed: int, cursor: int, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed, self.cursor = n, batch_size, seed, cursor
        self.rank, self.world = rank, world

    def __iter__(self):
        per_epoch = EpochBatches.per_epoch(self.n, self.batch_size, self.world)
        epoch, start = divmod(self.cursor, per_epoch)
        while True:
            yield from EpochBatches(self.n, self.batch_size, self.seed, epoch, start, self.rank, self.world)
            epoch, start = epoch + 1, 0


def batch_stream(dataset: Dataset, collate, *, batch_size: int, seed: int, cursor: int, rank: int = 0,
                 world: int = 1, num_workers: int = 0):
    """Yield ``(cursor, batch)`` forever from ``cursor`` on (batches that collate to None are
    yielded as None so the caller can count them).

    One loader serves every epoch, so its ``num_workers`` worker processes start once and build the next
    batches while the caller trains on this one. Every item is drawn with its own seed (:class:`SeededItems`),
    so the batches do not depend on ``num_workers``."""
    n = len(dataset)
    per_epoch = EpochBatches.per_epoch(n, batch_size, world)
    if per_epoch == 0:
        raise ValueError(
            f"data set of {n} items is smaller than one global batch ({batch_size} x {world} ranks)"
        )
    loader = DataLoader(SeededItems(dataset), batch_sampler=StreamBatches(n, batch_size, seed, cursor, rank, world),
                        collate_fn=collate, num_workers=num_workers,
                        generator=torch.Generator().manual_seed(mix_seed(seed, cursor // per_epoch, 2)))
    for batch in loader:
        yield cursor, batch
        cursor += 1


# ----------------------------------------------------------------------------- a run's data


@dataclass
class PreparedData:
    """What :func:`prepare_data` gives the training loop.

    ``train``: the training data set. ``eval_data`` / ``eval_image_root``: the data set retrieval is
    evaluated on (``None``: the run's own default, i.e. the shapes held-out split). ``eval_split``:
    ``"test"`` (``test_data``), ``"heldout"`` (images held out of the training JSON), ``"train"`` (the
    training data itself) or ``"shapes_test"``. ``notes``: lines for the log."""

    train: Dataset
    eval_data: Optional[str]
    eval_image_root: Optional[str]
    eval_split: str
    notes: list


def _holdout_ids(names: list, k: int) -> list:
    """The ``k`` image ids whose names hash lowest (SHA-1 of the path as written in the JSON)."""
    keyed = sorted(range(len(names)), key=lambda i: (hashlib.sha1(names[i].encode("utf-8")).hexdigest(), i))
    return sorted(keyed[:k])


def prepare_data(cfg, image_size: int, out: str, *, write: bool = True) -> PreparedData:
    """The training set and the evaluation set of the run ``cfg`` (a ``TrainConfig``), checked before
    training: a missing or malformed JSON, a JSON whose images are all missing, a test set without
    readable images, raise :class:`ConfigError` naming the setting. Missing training images are dropped
    here (unreadable ones are dropped when they are read). ``write``: write ``<out>/heldout.json`` when
    images are held out (the rank-0 process)."""
    from softmask.data import build_dataset, image_transform, is_shapes

    notes = []
    transform = image_transform(image_size, True, cfg.image_aug)
    if cfg.test_data is not None:
        notes += check_test_json("test_data", cfg.test_data, cfg.test_image_root)
    if is_shapes(cfg.data):
        ds = build_dataset(cfg.data, "train", image_size, train=True, seed=cfg.data_rng_seed, size=cfg.train_size,
                           distort=cfg.image_aug)
        if cfg.test_data is not None:
            return PreparedData(ds, cfg.test_data, _root_of(cfg.test_data, cfg.test_image_root), "test", notes)
        return PreparedData(ds, None, None, "shapes_test", notes)

    ds, dropped, n_images = _load_json_set("data", cfg.data, cfg.image_root, transform, open_images=False)
    if dropped:
        notes.append(_dropped_note("data", cfg.data, dropped, n_images))
    if cfg.test_data is not None:
        return PreparedData(ds, cfg.test_data, _root_of(cfg.test_data, cfg.test_image_root), "test", notes)
    n = len(ds.image_paths)
    k = min(cfg.holdout, n // 10)
    if cfg.holdout > 0 and n >= _HOLDOUT_MIN_IMAGES and k >= 2:
        held = _holdout_ids(ds.image_names, k)
        held_set = set(held)
        test = ds.subset(held)
        ds = ds.subset(i for i in range(n) if i not in held_set)
        path = os.path.join(out, HOLDOUT_FILE)
        if write:
            _write_json_atomic(path, test.entries(absolute=True))
        notes.append(f"no --test-data: {k} of the {n} images of --data {cfg.data} (with their {len(test)} captions) "
                     f"are held out for evaluation and not trained on; they are listed in {path} (--holdout N "
                     f"sets how many, --holdout 0 trains on all of them)")
        return PreparedData(ds, path, os.path.dirname(os.path.abspath(path)), "heldout", notes)
    why = "--holdout 0" if cfg.holdout == 0 else f"only {n} image(s), fewer than {_HOLDOUT_MIN_IMAGES} to hold out from"
    notes.append(f"no --test-data and {why}: retrieval is evaluated on the training data ({cfg.data}); those "
                 f"numbers measure how well the training pairs were fit, not how the model generalizes "
                 f"(eval.json says \"eval_on_training_data\": true). Give --test-data PATH.json for held-out numbers")
    return PreparedData(ds, cfg.data, _root_of(cfg.data, cfg.image_root), "train", notes)
