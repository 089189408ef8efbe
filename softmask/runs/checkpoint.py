"""Kill-safe checkpoints: ``<out>/checkpoints/step_NNNNNN/`` plus a ``latest`` pointer.

A checkpoint directory holds ``model.safetensors`` (every parameter and buffer of
the model: online and momentum weights, temperature, queues and queue pointer),
``train_state.pt`` (optimizer, scheduler, step, data cursor, RNG states) and
``config.json``. ``train_state.pt`` holds only tensors and plain containers (the
NumPy RNG state is stored as a tensor), and :func:`load_train_state` reads it with
``torch.load(..., weights_only=True)``: a file that holds any other Python object
(which unpickling could run as code) is refused, and a truncated or corrupt
checkpoint file raises :class:`CheckpointError`. It is written under a temporary name, flushed, then renamed (or
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
import pickle
import random
import shutil
import sys
import zipfile
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

__all__ = ["save_checkpoint", "latest_checkpoint", "load_model_weights", "load_train_state", "rng_state",
           "set_rng_state", "remove_stale", "holds_run", "NoCheckpointError", "CheckpointError",
           "load_checkpoint_config"]

CKPT_DIR = "checkpoints"


def rng_state() -> dict:
    """The global RNG states (torch, Python, NumPy, CUDA) as tensors and plain containers only, so that
    ``torch.load(..., weights_only=True)`` reads them back: NumPy's MT19937 key array is stored as an
    int64 tensor."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned (or the NumPy state as NumPy's own tuple, as checkpoints
    written before the RNG state held only tensors stored it)."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((name, keys.astype(np.uint32), int(pos), int(has_gauss), float(cached)))
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


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded: truncated, corrupt, altered, or holding Python
    objects that unpickling would have to construct (refused: that can run code)."""


def _first_line(e: BaseException) -> str:
    """``Type: first sentence of the message`` (torch's zip errors go on for several sentences)."""
    msg = (str(e).strip().splitlines() or [""])[0].split(". ")[0]
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def load_model_weights(model: torch.nn.Module, ckpt: str) -> None:
    """Load ``<ckpt>/model.safetensors`` into ``model`` (every key must match).

    Raises:
        CheckpointError: the file is truncated or corrupt, or its tensors do not fit the model.
    """
    path = os.path.join(ckpt, "model.safetensors")
    try:
        state = load_file(path)
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError) for damaged files
        raise CheckpointError(f"checkpoint {path}: cannot be read, the file is truncated or corrupt "
                              f"({_first_line(e)})") from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path}: tensors do not fit the model ({_first_line(e)})") from None
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {ckpt}: weights do not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )


def _legacy_numpy_globals() -> list:
    """What a NumPy RNG state array needs to be unpickled: ``ndarray``, ``dtype`` and the array
    reconstructor (``numpy.core`` or ``numpy._core``, whichever this NumPy has). Checkpoints written
    before the RNG state held only tensors stored ``np.random.get_state()`` as it is."""
    reconstruct = np.zeros(1).__reduce__()[0]
    extra = [type(np.dtype(np.uint32))] if type(np.dtype(np.uint32)) is not np.dtype else []
    return [reconstruct, np.ndarray, np.dtype, *extra]


def _check_train_state(state, path: str) -> dict:
    def bad(what):
        return CheckpointError(f"checkpoint {path}: {what}; the file was altered or does not come from softmask")

    if not isinstance(state, dict):
        raise bad(f"expected a dict of training state, got {type(state).__name__}")
    missing = [k for k in ("step", "cursor", "optimizer", "scheduler", "rng") if k not in state]
    if missing:
        raise bad(f"missing entries {missing}")
    for key in ("step", "cursor"):
        if isinstance(state[key], bool) or not isinstance(state[key], int) or state[key] < 0:
            raise bad(f"'{key}' must be a non-negative int, got {state[key]!r}")
    for key in ("optimizer", "scheduler", "rng"):
        if not isinstance(state[key], dict):
            raise bad(f"'{key}' must be a dict, got {type(state[key]).__name__}")
    return state


def load_train_state(ckpt: str) -> dict:
    """``<ckpt>/train_state.pt`` (step, cursor, optimizer, scheduler, RNG states), read with
    ``torch.load(weights_only=True)``: only tensors and plain containers (plus the three NumPy globals of
    the RNG state of older checkpoints) can be unpickled, so a file that would run code is refused.

    Raises:
        CheckpointError: refused (it holds other Python objects), truncated or corrupt, or not a training
            state (entries missing or of the wrong type).
    """
    path = os.path.join(ckpt, "train_state.pt")
    try:
        with torch.serialization.safe_globals(_legacy_numpy_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as e:
        why = next((ln.strip() for ln in str(e).splitlines() if "Unsupported" in ln or "Unpickler" in ln),
                   _first_line(e))
        why = why.split("WeightsUnpickler error: ")[-1].split(" was not an allowed global")[0]
        raise CheckpointError(
            f"checkpoint {path}: refused, it holds Python objects that loading would have to construct, which can "
            f"run code ({why}); softmask writes only tensors and plain containers there, so this file was altered "
            f"or comes from elsewhere") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, pickle.PickleError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot be read, the file is truncated or corrupt "
                              f"({_first_line(e)})") from None
    return _check_train_state(state, path)


def load_checkpoint_config(ckpt: str) -> dict:
    """``<ckpt>/config.json`` (``{"train": ..., "model": ..., ...}``).

    Raises:
        CheckpointError: not valid JSON, or not an object with a ``"train"`` object.
    """
    path = os.path.join(ckpt, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("train"), dict):
        raise CheckpointError(f"checkpoint {path}: expected an object with a 'train' object (the run's settings)")
    return cfg
