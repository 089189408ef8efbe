"""Host-side helpers shared by the kernel launchers."""

import os

import torch


def interpreting() -> bool:
    """True when Triton kernels run through Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def split_f32(x: float):
    """``x`` as two float32 values ``(hi, lo)`` whose sum is ``x`` to ~48 bits.

    Triton passes Python floats to kernels as float32; a float64 kernel adds the two
    halves in float64 so that scalars such as ``alpha = 0.4`` stay exact enough for
    float64 inputs."""
    hi = float(torch.tensor(x, dtype=torch.float32))
    return hi, float(torch.tensor(x - hi, dtype=torch.float32))
