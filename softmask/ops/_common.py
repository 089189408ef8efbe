"""Input validation and backend selection shared by every op.

Errors name the argument, what was expected and what came, so that a bad call
fails at the public boundary and never inside a kernel.
"""

from __future__ import annotations

from typing import Optional

import torch

from softmask.kernels._util import interpreting  # noqa: F401  (re-exported: ops decide on it too)

BACKENDS = ("auto", "triton", "torch", "reference")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``backend`` to one of "triton", "torch", "reference" for tensors on ``device``."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton': triton is not installed; use backend='torch'")
        if device.type == "cuda":
            return backend
        if device.type == "cpu" and interpreting():
            return backend
        raise ValueError(
            f"backend='triton': needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set "
            f"before softmask is imported), got tensors on {device}"
        )
    return backend


def check_tensor(
    name: str,
    t,
    *,
    ndim: Optional[int] = None,
    dtypes=FLOAT_DTYPES,
) -> torch.Tensor:
    """Check that ``t`` is a tensor of the given rank and one of ``dtypes``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({allowed}), got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")
    return t


def check_same(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """Check that ``t`` has the dtype and device of ``ref``."""
    if t.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (as {ref_name}), got {t.device}")
    if t.dtype != ref.dtype:
        raise TypeError(
            f"{name}: expected dtype {str(ref.dtype).replace('torch.', '')} (as {ref_name}), "
            f"got {str(t.dtype).replace('torch.', '')}"
        )


def check_size(name: str, t: torch.Tensor, dim: int, expected: int, what: str) -> None:
    if t.shape[dim] != expected:
        raise ValueError(f"{name}: expected size {expected} at dim {dim} ({what}), got shape {tuple(t.shape)}")


def check_fraction(name: str, value, *, low: float = 0.0, high: float = 1.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a Python float, got {type(value).__name__}")
    value = float(value)
    if not (low <= value <= high):  # also rejects NaN
        raise ValueError(f"{name}: expected a value in [{low}, {high}], got {value}")
    return value


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
