"""Text-driven soft mask: fused (``softmask.text_driven_soft_mask``, backend auto:
triton on CUDA, torch on CPU) vs eager (``softmask.reference``: materialized
[B, H, T, N] probabilities and gradients, then the mask) vs torch.compile of the
reference; forward / backward / forward+backward, plus the device's copy bandwidth.

    python -m pytest benchmarks/bench_soft_mask.py --benchmark-json=bench_results/<device>/soft_mask.json

Bytes counted (the minimum, the same for every provider; es: attention dtype size,
ex: image_embeds dtype size, 4: the float32 mask):
    fwd  = es * (2*B*H*dh + 2*B*H*N*dh) + ex * 2*B*N*D   the chosen query / grad_context rows,
                                                        key, value, image_embeds in, output out
    bwd  = ex * 2*B*N*D + 4*B*N                         d out in, d image_embeds out, mask in
    full = fwd + bwd
FLOPs: fwd 4*B*H*N*dh + B*N*D (two dot products per key, the multiply), bwd B*N*D.
The ``copy`` provider times ``dst.copy_(src)`` over as many bytes as the fused
forward moves: achieved GB/s of the others should be read against it.
"""

from __future__ import annotations

import functools

import pytest
import torch

import softmask
from benchmarks.common import record, synced
from softmask import reference

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")

# name: (B, H, T, N, dh, D, where): "gpu" shapes are skipped on CPU; "cpu" shapes on a GPU
SHAPES = {
    "cpu_small": (8, 12, 30, 257, 64, 768, "cpu"),
    "albef": (64, 12, 30, 257, 64, 768, "any"),  # ALBEF: ViT-B/16 at 256 px, BERT-base fusion layer
    "large": (256, 12, 40, 577, 64, 768, "gpu"),  # ViT-B/16 at 384 px
}
DTYPES = [torch.bfloat16, torch.float32] if CUDA else [torch.float32]  # CPU half matmuls are not a use case
PROVIDERS = ["fused", "eager", "compile"]
MODES = ["fwd", "bwd", "full"]


def _skip_shape(shape):
    where = SHAPES[shape][-1]
    if where == "gpu" and not CUDA:
        pytest.skip("GPU shape")
    if where == "cpu" and CUDA:
        pytest.skip("CPU-sized shape")


def _inputs(B, H, T, N, dh, D, dtype):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device=DEVICE, generator=g).to(dtype)  # noqa: E731
    query, grad_context = rnd(B, H, T, dh), rnd(B, H, T, dh) * 0.01
    key, value = rnd(B, H, N, dh), rnd(B, H, N, dh)
    image_embeds = rnd(B, N, D)
    word_index = torch.randint(1, T, (B,), device=DEVICE, generator=g)
    kpm = torch.ones(B, N, dtype=torch.bool, device=DEVICE)
    return image_embeds, query, key, value, grad_context, word_index, kpm


@functools.lru_cache(maxsize=None)
def _compiled_reference():
    return torch.compile(reference.text_driven_soft_mask_reference)


def _op(provider):
    if provider == "fused":
        return softmask.text_driven_soft_mask
    if provider == "eager":
        return reference.text_driven_soft_mask_reference
    if provider == "compile":
        return _compiled_reference()
    raise ValueError(provider)


def _bytes(B, H, T, N, dh, D, dtype):
    es = ex = torch.empty((), dtype=dtype).element_size()
    fwd = es * (2 * B * H * dh + 2 * B * H * N * dh) + ex * 2 * B * N * D
    bwd = ex * 2 * B * N * D + 4 * B * N
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_soft_mask(benchmark, shape, provider, mode, dtype):
    _skip_shape(shape)
    B, H, T, N, dh, D, _ = SHAPES[shape]
    x, q, k, v, g, w, kpm = _inputs(B, H, T, N, dh, D, dtype)
    op = _op(provider)
    call = lambda xx: op(xx, q, k, v, g, w, key_padding_mask=kpm, floor=0.0)  # noqa: E731

    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                return call(x)
        fn = synced(fwd, DEVICE)
    elif mode == "full":
        grad = torch.randn_like(x)

        def full():
            xx = x.detach().requires_grad_(True)
            out, _ = call(xx)
            out.backward(grad)
            return xx.grad
        fn = synced(full, DEVICE)
    else:  # the backward of one retained forward graph, timed alone
        grad = torch.randn_like(x)
        xx = x.detach().requires_grad_(True)
        out, _ = call(xx)

        def bwd():
            return torch.autograd.grad(out, xx, grad, retain_graph=True)[0]
        fn = synced(bwd, DEVICE)

    fn()  # first call outside the measurement: compilation, lazy initialization
    flops = {"fwd": 4 * B * H * N * dh + B * N * D, "bwd": B * N * D}
    flops["full"] = flops["fwd"] + flops["bwd"]
    record(benchmark, fn, op="soft_mask", provider=provider, mode=mode, shape=shape, dtype=dtype, device=DEVICE,
           sizes=dict(B=B, H=H, T=T, N=N, dh=dh, D=D), flops=flops[mode],
           bytes_moved=_bytes(B, H, T, N, dh, D, dtype)[mode], rounds=10 if CUDA else 5)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_copy_bandwidth(benchmark, shape):
    """The device's measured copy bandwidth over the bytes the fused forward moves."""
    _skip_shape(shape)
    B, H, T, N, dh, D, _ = SHAPES[shape]
    dtype = DTYPES[0]
    nbytes = _bytes(B, H, T, N, dh, D, dtype)["fwd"]
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=DEVICE).random_()
    dst = torch.empty_like(src)
    record(benchmark, synced(lambda: dst.copy_(src), DEVICE), op="soft_mask", provider="copy", mode="fwd",
           shape=shape, dtype=torch.uint8, device=DEVICE, sizes=dict(B=B, H=H, T=T, N=N, dh=dh, D=D),
           bytes_moved=2 * (nbytes // 2), rounds=10 if CUDA else 5)
