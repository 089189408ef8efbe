"""Focal ITC loss: fused vs eager (softmask.reference) vs torch.compile(reference)
vs a peer library, forward / backward / forward+backward.

    python -m pytest benchmarks/bench_focal_itc.py --benchmark-json=bench_results/<device>/focal_itc.json

FLOPs counted (the useful work, the same for every provider): forward 2*B*N*D per
direction (logits) plus 2*B*N*D per direction for the momentum logits; backward
2*B*N*D per direction (dQ), plus 2*B*N*D per direction for the keys in CLIP mode.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import softmask
from benchmarks.common import record, synced
from softmask import reference

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")

# name: (B, queue, D, gamma, alpha, clip, dtype, gpu_only)
SHAPES = {
    "cpu_small": (256, 4096, 256, 2.0, 0.4, False, torch.float32, False),
    "cpu_goal": (1024, 65536, 256, 2.0, 0.4, False, torch.float32, False),
    "cpu_clip": (2048, 0, 256, 0.0, 0.0, True, torch.float32, False),
    "albef": (512, 65536, 256, 2.0, 0.4, False, torch.bfloat16, True),
    "clip": (32768, 0, 512, 0.0, 0.0, True, torch.bfloat16, True),
}
PROVIDERS = ["fused", "eager", "compile", "open_clip"]
MODES = ["fwd", "bwd", "full"]


def _inputs(B, queue, D, clip, dtype):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    feat = lambda n: F.normalize(torch.randn(n, D, device=DEVICE, generator=g), dim=-1).to(dtype)  # noqa: E731
    img, txt = feat(B), feat(B)
    kw = {}
    if not clip:
        kw = dict(text_keys=torch.cat([feat(B), feat(queue)]), image_keys=torch.cat([feat(B), feat(queue)]),
                  image_feat_m=feat(B), text_feat_m=feat(B))
    return img, txt, kw


@functools.lru_cache(maxsize=None)
def _compiled_reference():
    return torch.compile(reference.focal_itc_loss_reference)


def _loss_fn(provider, gamma, alpha, clip):
    if provider == "fused":
        return lambda i, t, tau, **kw: softmask.focal_itc_loss(i, t, tau, gamma=gamma, alpha=alpha, **kw)
    if provider == "eager":
        return lambda i, t, tau, **kw: reference.focal_itc_loss_reference(i, t, tau, gamma=gamma, alpha=alpha, **kw)
    if provider == "compile":
        fn = _compiled_reference()
        return lambda i, t, tau, **kw: fn(i, t, tau, gamma=gamma, alpha=alpha, **kw)
    if provider == "open_clip":
        if not clip or gamma != 0:
            pytest.skip("open_clip's ClipLoss computes the plain CLIP loss only (CLIP mode, gamma = 0)")
        open_clip_loss = pytest.importorskip("open_clip.loss")
        loss = open_clip_loss.ClipLoss()
        return lambda i, t, tau, **kw: loss(i, t, 1.0 / tau)
    raise ValueError(provider)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_focal_itc(benchmark, shape, provider, mode):
    B, queue, D, gamma, alpha, clip, dtype, gpu_only = SHAPES[shape]
    if gpu_only and not CUDA:
        pytest.skip("GPU shape")
    if not gpu_only and CUDA and shape != "cpu_small":
        pytest.skip("CPU-sized shape")
    if shape == "cpu_goal" and mode != "full":
        pytest.skip("the CPU goal is measured forward + backward")
    N = B if clip else B + queue
    img, txt, kw = _inputs(B, queue, D, clip, dtype)
    loss_fn = _loss_fn(provider, gamma, alpha, clip)
    tau = torch.tensor(0.07, device=DEVICE, requires_grad=True)
    leaves = lambda: (img.clone().requires_grad_(), txt.clone().requires_grad_())  # noqa: E731

    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                return loss_fn(img, txt, tau, **kw)
        fn, setup = synced(fwd, DEVICE), None
    elif mode == "full":
        def full():
            i, t = leaves()
            loss_fn(i, t, tau, **kw).backward()
            return i.grad, t.grad
        fn, setup = synced(full, DEVICE), None
    else:
        def setup():
            i, t = leaves()
            return (loss_fn(i, t, tau, **kw), i, t), {}

        def bwd(loss, i, t):
            loss.backward()
            return i.grad
        fn = synced(bwd, DEVICE)

    per_dir_fwd = 2 * B * N * D * (2 if alpha > 0 else 1)
    per_dir_bwd = 2 * B * N * D * (2 if clip else 1)
    flops = {"fwd": 2 * per_dir_fwd, "bwd": 2 * per_dir_bwd, "full": 2 * (per_dir_fwd + per_dir_bwd)}[mode]
    rounds = 3 if shape == "cpu_goal" else 5
    record(benchmark, fn, op="focal_itc", provider=provider, mode=mode, shape=shape, dtype=dtype, device=DEVICE,
           sizes=dict(B=B, N=N, D=D, gamma=gamma, alpha=alpha, clip=clip), flops=flops, rounds=rounds,
           setup=setup)
