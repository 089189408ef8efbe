"""Kill-safe checkpoints: ``<out>/checkpoints/step_NNNNNN/`` plus a ``latest`` pointer.

A checkpoint directory holds ``model.safetensors`` (every parameter and buffer of
the model: online and momentum weights, temperature, queues and queue pointer),
``train_state.pt`` (optimizer, scheduler, step, data cursor, RNG states) and
``config.json``. It is written under a temporary name, flushed, then renamed (or
swapped with an existing directory of the same step); ``latest`` is replaced
atomically afterwards. A kill at any moment leaves every ``step_*`` directory
complete and ``latest`` naming a complete one (see :func:`save_checkpoint` for the
one exception, on systems without an atomic exchange); what it leaves under
temporary names is removed by :func:`remove_stale`, which the training loop calls
at the start of a run and :func:`save_checkpoint` after every save.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import random
import shutil
import sys
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

__all__ = ["save_checkpoint", "latest_checkpoint", "load_model_weights", "load_train_state", "rng_state",
           "set_rng_state", "remove_stale", "holds_run", "NoCheckpointError"]

CKPT_DIR = "checkpoints"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# Names of the entries a save writes next to the ``step_*`` directories before renaming
# them into place (or, for ``.trash-``, after renaming them out of the way). Nothing
# reads them; a kill can leave any of them behind, and they are removed at the start of
# a run and after every successful save.
_STALE_PREFIXES = (".tmp-", ".trash-", ".latest-")
_REQUIRED = ("model.safetensors", "train_state.pt", "config.json")


def remove_stale(out: str) -> list:
    """Remove what interrupted saves left under ``<out>/checkpoints``: temporary
    checkpoint directories, directories moved aside for deletion and temporary
    pointer files. Returns the names removed. Only one process may save into a run
    directory at a time (the rank-0 process of one run)."""
    root = os.path.join(out, CKPT_DIR)
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    removed = []
    for name in sorted(names):
        if not name.startswith(_STALE_PREFIXES):
            continue
        path = os.path.join(root, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
        removed.append(name)
    return removed


def _rename_exchange(a: str, b: str) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``).
    False where the call is unavailable or the file system refuses it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), a)


def _write_pointer(root: str, name: str) -> None:
    tmp = os.path.join(root, f".latest-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, "latest"))
    _fsync_dir(root)


def _complete(ckpt: str) -> bool:
    return all(os.path.isfile(os.path.join(ckpt, fn)) for fn in _REQUIRED)


def _step_dirs(root: str) -> list:
    """``step_*`` directory names under ``root``, oldest first."""
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    return sorted(d for d in names if d.startswith("step_") and os.path.isdir(os.path.join(root, d)))


def save_checkpoint(out: str, step: int, model: torch.nn.Module, train_state: dict, config: dict,
                    keep: int = 2) -> str:
    """Write checkpoint ``step`` and keep the ``keep`` newest. Returns its directory.

    Kill-safe at every point: the checkpoint is written and flushed under a temporary
    name, then renamed into place; a re-save of an existing step swaps the new directory
    with the old one in one atomic exchange (Linux ``renameat2``), so ``latest`` never
    names a missing directory; ``latest`` is replaced atomically afterwards; older
    checkpoints are renamed aside before they are deleted, so no half-deleted ``step_*``
    directory is ever visible. Leftovers of interrupted saves are removed at the end.
    """
    root = os.path.join(out, CKPT_DIR)
    os.makedirs(root, exist_ok=True)
    name = f"step_{step:06d}"
    final = os.path.join(root, name)
    tmp = os.path.join(root, f".tmp-{name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, os.path.join(tmp, "model.safetensors"))
    torch.save(train_state, os.path.join(tmp, "train_state.pt"))
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for fn in os.listdir(tmp):
        with open(os.path.join(tmp, fn), "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(tmp)
    if not os.path.exists(final):
        os.replace(tmp, final)
    elif not _rename_exchange(tmp, final):
        # No atomic exchange here: point ``latest`` at another complete checkpoint while
        # the old directory of this step is moved aside (if there is no other one, a kill
        # in the next two renames leaves ``latest`` dangling and :func:`latest_checkpoint`
        # falls back to the newest complete ``step_*`` directory).
        others = [d for d in _step_dirs(root) if d != name and _complete(os.path.join(root, d))]
        if others:
            _write_pointer(root, others[-1])
        aside = os.path.join(root, f".trash-{name}-{os.getpid()}")
        os.replace(final, aside)
        os.replace(tmp, final)
    # after an exchange ``tmp`` holds the old directory; remove_stale below deletes it
    _fsync_dir(root)
    _write_pointer(root, name)
    steps = _step_dirs(root)
    for old in steps[:-keep] if keep > 0 else []:
        if old != name:
            aside = os.path.join(root, f".trash-{old}-{os.getpid()}")
            os.replace(os.path.join(root, old), aside)
    _fsync_dir(root)
    remove_stale(out)
    return final


def latest_checkpoint(path: str, *, warn: bool = True) -> Optional[str]:
    """The checkpoint directory for ``path``: a checkpoint directory itself, or a run
    directory (``<path>/checkpoints/latest``). None when there is none.

    When the ``latest`` pointer is missing, unreadable or names a missing or incomplete
    directory, the newest complete ``step_*`` directory (model.safetensors,
    train_state.pt and config.json present) is returned instead, and, with ``warn``,
    a line on stderr says so."""
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return path
    root = os.path.join(path, CKPT_DIR)
    pointer = os.path.join(root, "latest")
    problem = None
    try:
        with open(pointer) as f:
            name = f.read().strip()
    except FileNotFoundError:
        problem = f"{pointer} is missing"
    except OSError as e:
        problem = f"{pointer} cannot be read ({e})"
    else:
        ckpt = os.path.join(root, name)
        if name and os.sep not in name and _complete(ckpt):
            return ckpt
        problem = f"{pointer} names {name!r}, which is not a complete checkpoint directory"
    complete = [d for d in _step_dirs(root) if _complete(os.path.join(root, d))]
    if not complete:
        return None
    ckpt = os.path.join(root, complete[-1])
    if warn:
        print(f"softmask: {problem}; using the newest complete checkpoint, {ckpt}", file=sys.stderr)
    return ckpt


class NoCheckpointError(FileNotFoundError):
    """``--resume`` found a run but no checkpoint it can load."""


def holds_run(path: str) -> bool:
    """Whether ``path`` holds (part of) a training run: logged metrics or anything
    under ``checkpoints/``."""
    metrics = os.path.join(path, "metrics.jsonl")
    if os.path.isfile(metrics) and os.path.getsize(metrics) > 0:
        return True
    root = os.path.join(path, CKPT_DIR)
    return os.path.isdir(root) and bool(os.listdir(root))


def load_model_weights(model: torch.nn.Module, ckpt: str) -> None:
    state = load_file(os.path.join(ckpt, "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {ckpt}: weights do not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )


def load_train_state(ckpt: str) -> dict:
    return torch.load(os.path.join(ckpt, "train_state.pt"), map_location="cpu", weights_only=False)
