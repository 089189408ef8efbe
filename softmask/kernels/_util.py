"""Host-side helpers shared by the kernel launchers."""

import torch


def split_f32(x: float):
    """``x`` as two float32 values ``(hi, lo)`` whose sum is ``x`` to ~48 bits.

    Triton passes Python floats to kernels as float32; a float64 kernel adds the two
    halves in float64 so that scalars such as ``alpha = 0.4`` stay exact enough for
    float64 inputs."""
    hi = float(torch.tensor(x, dtype=torch.float32))
    return hi, float(torch.tensor(x - hi, dtype=torch.float32))
