"""Focal ITC loss: fused vs eager (softmask.reference) vs torch.compile(reference)
vs a peer library, forward / backward / forward+backward, plus the device's copy
bandwidth over the fused op's key-bank bytes.

    python -m pytest benchmarks/bench_focal_itc.py --benchmark-json=bench_results/<device>/focal_itc.json

FLOPs counted (the useful work, the same for every provider): forward 2*B*N*D per
direction (logits) plus 2*B*N*D per direction for the momentum logits; backward
2*B*N*D per direction (dQ), plus 2*B*N*D per direction for the keys in CLIP mode.

Bytes counted (``extra_info["bytes"]``, the same for every provider, so ``gbps`` is the
rate at which the fused design's unavoidable traffic went by): each key bank read once
per sweep of the fused kernels (two sweeps with momentum targets, one without; CLIP
mode's key gradient reads both sides once more in the backward), the features read once
per sweep, dQ written once in float32; the backward reads dQ and writes the gradients.
The ``copy`` provider times ``dst.copy_(src)`` over as many bytes: its ``gbps`` is the
ceiling to hold ``fused`` against.

ALBEF shapes pass the key banks as ``(feat_m, queue)`` parts, as the model does; the
eager and compile providers then concatenate them inside the timed call (what the
model did with ``torch.cat`` before the op took parts).

Shapes ending in ``_ids`` are their base shape with positive ids (ALBEF's retrieval
fine-tuning): row ids and key ids (``(batch ids, queue ids)`` beside the key-bank parts)
drawn from 113,287 values (COCO's Karpathy train images), so a row has its own key plus
~0.6 queue keys of the same id on average; the eager and compile providers build ALBEF's
materialized ``[B, N]`` positive mask. Their bytes add the key ids, 8 bytes per key per
sweep and direction (benchmarks/NOTES.md).
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

# name: (B, queue, D, gamma, alpha, clip, dtypes, gpu_only)
SHAPES = {
    "cpu_small": (256, 4096, 256, 2.0, 0.4, False, (torch.float32,), False),
    "cpu_goal": (1024, 65536, 256, 2.0, 0.4, False, (torch.float32,), False),
    "cpu_clip": (2048, 0, 256, 0.0, 0.0, True, (torch.float32,), False),
    # CLIP at a batch open_clip runs per process (issue 27's memory goal): ClipLoss holds ~8 [B, B]
    # float32 tensors of 1 GiB; the eager reference (more of them) is not run.
    "cpu_clip_large": (16384, 0, 512, 0.0, 0.0, True, (torch.float32,), False),
    # ALBEF's per-GPU ITC: 64 local rows against [64 momentum features; 65,536 queue].
    "albef_gpu": (64, 65536, 256, 2.0, 0.4, False, (torch.float32, torch.bfloat16), True),
    "albef": (512, 65536, 256, 2.0, 0.4, False, (torch.bfloat16,), True),
    "clip": (32768, 0, 512, 0.0, 0.0, True, (torch.bfloat16,), True),
}
# Shapes run with positive ids: name -> base shape.
WITH_IDS = {"cpu_goal_ids": "cpu_goal", "albef_gpu_ids": "albef_gpu"}
ID_POOL = 113_287  # distinct ids the ids are drawn from (COCO Karpathy-split train images)
CASES = [(shape, dtype) for shape in list(SHAPES) + list(WITH_IDS) for dtype in SHAPES[WITH_IDS.get(shape, shape)][6]]
CASE_IDS = [f"{shape}-{str(dtype).replace('torch.', '')}" for shape, dtype in CASES]
PROVIDERS = ["fused", "eager", "compile", "open_clip"]
MODES = ["fwd", "bwd", "full"]


def _spec(shape):
    """``(SHAPES entry of the base shape, with ids)``."""
    return SHAPES[WITH_IDS.get(shape, shape)], shape in WITH_IDS


def _inputs(B, queue, D, clip, dtype, parts, ids=False):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    feat = lambda n: F.normalize(torch.randn(n, D, device=DEVICE, generator=g), dim=-1).to(dtype)  # noqa: E731
    img, txt = feat(B), feat(B)
    kw = {}
    if not clip:
        bank = (lambda: (feat(B), feat(queue))) if parts else (lambda: torch.cat([feat(B), feat(queue)]))
        kw = dict(text_keys=bank(), image_keys=bank(), image_feat_m=feat(B), text_feat_m=feat(B))
    if ids:
        draw = lambda n: torch.randint(0, ID_POOL, (n,), device=DEVICE, generator=g)  # noqa: E731
        kw["ids"] = draw(B)
        if not clip:
            queue_ids = draw(queue)
            kw["key_ids"] = (kw["ids"], queue_ids) if parts else torch.cat([kw["ids"], queue_ids])
    return img, txt, kw


def _bytes(B, N, D, alpha, clip, dtype, ids=False):
    """Bytes the fused design must move, per mode (module docstring)."""
    es = torch.empty((), dtype=dtype).element_size()
    sweeps = 2 if alpha > 0 or ids else 1  # ids without momentum targets also take sweep 2
    feats = (2 if alpha > 0 else 1) * B * D * es  # Q (and Qm) per direction and sweep
    id_bytes = (N + B) * 8 if ids else 0  # key ids and row ids, int64, per direction and sweep
    fwd = 2 * sweeps * (N * D * es + feats + id_bytes) + 2 * B * D * 4 + 2 * B * 4
    bwd = 2 * (B * D * 4 + B * D * es)  # read dQ, write the gradient, both directions
    if clip:
        bwd += 2 * 2 * B * D * es  # the key gradient reads both sides once more
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}


def _skip(shape, mode):
    shape = WITH_IDS.get(shape, shape)
    gpu_only = SHAPES[shape][7]
    if gpu_only and not CUDA:
        pytest.skip("GPU shape")
    if not gpu_only and CUDA and shape != "cpu_small":
        pytest.skip("CPU-sized shape")
    if shape in ("cpu_goal", "cpu_clip_large") and mode != "full":
        pytest.skip("the CPU goals are measured forward + backward")


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
@pytest.mark.parametrize("shape,dtype", CASES, ids=CASE_IDS)
def test_focal_itc(benchmark, shape, dtype, provider, mode):
    (B, queue, D, gamma, alpha, clip, _, gpu_only), ids = _spec(shape)
    _skip(shape, mode)
    if shape == "cpu_clip_large" and provider == "eager":
        pytest.skip("the eager reference materializes ~16 [B, B] float32 tensors (16 GiB) at this shape")
    N = B if clip else B + queue
    img, txt, kw = _inputs(B, queue, D, clip, dtype, parts=gpu_only and not clip, ids=ids)
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
    rounds = 3 if shape.startswith(("cpu_goal", "cpu_clip_large")) else 5
    record(benchmark, fn, op="focal_itc", provider=provider, mode=mode, shape=shape, dtype=dtype, device=DEVICE,
           sizes=dict(B=B, N=N, D=D, gamma=gamma, alpha=alpha, clip=clip, ids=ids, key_parts=2 if "text_keys" in kw
                      and isinstance(kw["text_keys"], tuple) else 1),
           flops=flops, bytes_moved=_bytes(B, N, D, alpha, clip, dtype, ids)[mode], rounds=rounds, setup=setup)


@pytest.mark.parametrize("shape,dtype", CASES, ids=CASE_IDS)
def test_copy_bandwidth(benchmark, shape, dtype):
    """The device's measured copy bandwidth over the bytes the fused forward + backward moves."""
    (B, queue, D, gamma, alpha, clip, _, _), ids = _spec(shape)
    _skip(shape, "full")
    N = B if clip else B + queue
    nbytes = _bytes(B, N, D, alpha, clip, dtype, ids)["full"]
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=DEVICE).random_()
    dst = torch.empty_like(src)
    record(benchmark, synced(lambda: dst.copy_(src), DEVICE), op="focal_itc", provider="copy", mode="full",
           shape=shape, dtype=dtype, device=DEVICE, sizes=dict(B=B, N=N, D=D, gamma=gamma, alpha=alpha, clip=clip),
           bytes_moved=2 * (nbytes // 2), rounds=10 if CUDA else 5)
