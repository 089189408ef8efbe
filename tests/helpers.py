"""Shared test helpers: dtype-scaled comparisons that report the worst element, and
compilation of Triton kernels for a GPU target without a GPU."""

from __future__ import annotations

import os
from typing import Optional

import pytest
import torch

# Error allowed relative to the largest |truth| of a tensor, by dtype of the inputs
# (a few units of the dtype's epsilon: fp16/bf16 inputs go through half-precision
# tensor-core products inside the kernels).
NORM_RTOL = {
    torch.float64: 1e-12,
    torch.float32: 2e-6,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}


def assert_close(
    out: torch.Tensor,
    truth: torch.Tensor,
    *,
    dtype: torch.dtype,
    same_dtype_ref: Optional[torch.Tensor] = None,
    k: float = 3.0,
    cond: float = 1.0,
    name: str = "output",
) -> None:
    """Require ``|out - truth| <= k * |same_dtype_ref - truth| + NORM_RTOL[dtype] * max|truth|``
    elementwise, where ``truth`` is a float64 ground truth and ``same_dtype_ref`` the plain
    PyTorch result computed from inputs of ``dtype``. ``cond`` scales the normwise term for
    ill-conditioned problems (e.g. logits of magnitude 1000: a rounding of z moves p by
    ``eps * |z|``). Reports the worst element, the share of
    failing elements and any NaN/inf."""
    assert out.shape == truth.shape, f"{name}: shape {tuple(out.shape)} != {tuple(truth.shape)}"
    o = out.detach().double().cpu()
    t = truth.detach().double().cpu()
    bad = ~torch.isfinite(o)
    if bad.any():
        raise AssertionError(f"{name}: {int(bad.sum())} non-finite values of {o.numel()} (first at "
                             f"{tuple(int(i) for i in bad.nonzero()[0])})")
    assert torch.isfinite(t).all(), f"{name}: the ground truth itself is not finite"
    scale = float(t.abs().max()) if t.numel() else 0.0
    allowed = torch.full_like(t, NORM_RTOL[dtype] * cond * max(scale, 1e-30))
    if same_dtype_ref is not None:
        allowed = allowed + k * (same_dtype_ref.detach().double().cpu() - t).abs()
    err = (o - t).abs()
    fail = err > allowed
    if fail.any():
        idx = int((err - allowed).flatten().argmax())
        pos = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), t.shape)) if t.dim() else ()
        raise AssertionError(
            f"{name} ({dtype}): {int(fail.sum())}/{t.numel()} elements out of tolerance; worst at {pos}: "
            f"got {o.flatten()[idx].item():.6g}, truth {t.flatten()[idx].item():.6g}, "
            f"|err| {err.flatten()[idx].item():.3g} > allowed {allowed.flatten()[idx].item():.3g} "
            f"(max|truth| {scale:.3g})"
        )


def ptxas_available() -> bool:
    try:
        import triton
    except ImportError:
        return False
    base = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return os.path.exists(base)


def compile_for_gpu(fn, arg_types: dict, constexprs: dict, *, arch: int = 90, num_warps: int = 4,
                    num_stages: int = 2):
    """Compile a ``@triton.jit`` kernel down to a cubin for ``sm_<arch>`` without a GPU
    (Triton's own ptxas), so kernels the interpreter accepts are also checked to compile.

    ``arg_types`` maps every non-constexpr argument to a Triton type string ("*bf16",
    "i32", "fp32", ...). Returns the compiled kernel (``.metadata.shared`` etc.)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jit_fn = getattr(fn, "fn", fn)
    if not hasattr(jit_fn, "arg_names"):  # an InterpretedFunction wraps the JITFunction's Python function
        jit_fn = triton.JITFunction(jit_fn)
    sig = {}
    for name in jit_fn.arg_names:
        sig[name] = "constexpr" if name in constexprs else arg_types[name]
    src = ASTSource(jit_fn, sig, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's training runs (import it into the module with ``usefixtures``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
