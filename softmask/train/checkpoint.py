"""Atomic checkpoints: ``<out>/checkpoints/step_NNNNNN/`` plus a ``latest`` pointer.

A checkpoint directory holds ``model.safetensors`` (every parameter and buffer of
the model: online and momentum weights, temperature, queues and queue pointer),
``train_state.pt`` (optimizer, scheduler, step, data cursor, RNG states) and
``config.json``. It is written under a temporary name, flushed, then renamed;
``latest`` is replaced atomically afterwards, so an interrupted save never
leaves a half-written checkpoint behind the pointer.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

__all__ = ["save_checkpoint", "latest_checkpoint", "load_model_weights", "load_train_state", "rng_state",
           "set_rng_state"]

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


def save_checkpoint(out: str, step: int, model: torch.nn.Module, train_state: dict, config: dict,
                    keep: int = 2) -> str:
    """Write checkpoint ``step`` atomically and keep the ``keep`` newest. Returns its directory."""
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
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    pointer_tmp = os.path.join(root, f".latest-{os.getpid()}")
    with open(pointer_tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer_tmp, os.path.join(root, "latest"))
    _fsync_dir(root)
    steps = sorted(d for d in os.listdir(root) if d.startswith("step_"))
    for old in steps[:-keep] if keep > 0 else []:
        if old != name:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return final


def latest_checkpoint(path: str) -> Optional[str]:
    """The checkpoint directory for ``path``: a checkpoint directory itself, or a run
    directory (``<path>/checkpoints/latest``). None when there is none."""
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return path
    pointer = os.path.join(path, CKPT_DIR, "latest")
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        name = f.read().strip()
    ckpt = os.path.join(path, CKPT_DIR, name)
    return ckpt if os.path.isfile(os.path.join(ckpt, "model.safetensors")) else None


def load_model_weights(model: torch.nn.Module, ckpt: str) -> None:
    state = load_file(os.path.join(ckpt, "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {ckpt}: weights do not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )


def load_train_state(ckpt: str) -> dict:
    return torch.load(os.path.join(ckpt, "train_state.pt"), map_location="cpu", weights_only=False)
