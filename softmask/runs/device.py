"""The device a command runs on, checked before any work starts (training and evaluation alike)."""

from __future__ import annotations

from typing import Optional

import torch

from softmask.runs.errors import ConfigError

__all__ = ["check_device"]


def check_device(spec: Optional[str], field: str = "device") -> torch.device:
    """``torch.device(spec)`` (None: cpu) after checking that it exists on this machine.

    Raises:
        ConfigError: not a device string, or its backend (CUDA, MPS, XPU, ...) is not available here,
            or the index is beyond the devices present.
    """
    if spec is None:
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(field, spec, "not a device; expected cpu, cuda, cuda:N or another torch device "
                                       "available here") from None
    if device.type == "cpu":
        return device
    backend = getattr(torch, device.type, None)
    if device.type == "mps":
        backend = getattr(torch.backends, "mps", None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        what = "CUDA is not available on this machine (torch.cuda.is_available() is False)" if device.type == "cuda" \
            else f"no {device.type} device is available on this machine"
        raise ConfigError(field, spec, f"{what}; expected cpu or an available device")
    count = getattr(backend, "device_count", None)
    if device.index is not None and count is not None and device.index >= count():
        raise ConfigError(field, spec, f"this machine has {count()} {device.type} device(s); expected an index below "
                                       f"{count()}")
    return device
