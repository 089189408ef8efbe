"""FocalClipLoss (gamma 0) against open_clip's ClipLoss across 2 gloo processes on the CPU:
step time (forward + backward of the loss, collectives included) and peak extra memory
of each rank, one thread per rank.

    python -m pytest benchmarks/bench_focal_clip_dist.py --benchmark-json=bench_results/<device>/focal_clip_dist.json

The pytest process is rank 0 (pytest-benchmark times its steps, which wait for rank 1 in
every collective); rank 1 is a spawned process that runs the same sequence of steps and
reports its own peak (``peak_mem_bytes_rank1``). Both ranks run one step before the
measured ones and release the fused op's CPU workspace before the step whose peak is taken
(the workspace then counts). Work per rank, local batch b, W = 2, N = W b:
ClipLoss forms [b, N] logits per direction with ``local_loss`` (6 matmuls of b N D), and
[N, N] without (its every rank computes the whole loss: 6 of N N D); the fused loss runs
its b rows against the N gathered keys in either case (6 matmuls of b N D: logits, dQ, dK
per direction) and never forms the logits.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import softmask
from benchmarks.common import peak_extra_memory, record

CPU = torch.device("cpu")
W = 2
# name: (local batch b, D)
SHAPES = {"dist_cpu_small": (256, 64), "dist_cpu": (4096, 512)}
COMBOS = {"local": (True, True), "global": (False, False)}  # (local_loss, gather_with_grad); "global": open_clip's default
PROVIDERS = ["fused", "open_clip"]
ROUNDS, WARMUP = 3, 1


def _loss(provider, rank, local_loss, gather_with_grad):
    kw = dict(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=W)
    if provider == "fused":
        return softmask.FocalClipLoss(gamma=0.0, backend="torch", **kw)
    from open_clip.loss import ClipLoss

    return ClipLoss(**kw)


def _step_fn(provider, rank, b, D, combo):
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(W * b, D, generator=g), dim=-1)[rank * b:(rank + 1) * b].contiguous()
    txt = F.normalize(torch.randn(W * b, D, generator=g), dim=-1)[rank * b:(rank + 1) * b].contiguous()
    loss_fn = _loss(provider, rank, *COMBOS[combo])

    def step():
        i, t = img.clone().requires_grad_(), txt.clone().requires_grad_()
        s = torch.tensor(14.0, requires_grad=True)
        loss_fn(i, t, s).backward()
        return i.grad, t.grad

    return step


def _rank1(port):
    """Rank 1: runs the steps rank 0 announces (one process group for the whole module:
    a process group created again in the same process after a destroy hung here)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=1, world_size=W)
    while True:
        job = [None]
        dist.broadcast_object_list(job, src=0)
        if job[0] is None:
            break
        provider, b, D, combo, calls = job[0]
        step = _step_fn(provider, 1, b, D, combo)
        step()  # as rank 0: one step before the measured ones, then the workspace released
        softmask.release_workspace()
        peak = peak_extra_memory(step, CPU)  # the call rank 0 measures its peak on
        for _ in range(calls - 1):
            step()
        dist.broadcast_object_list([peak], src=1)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rank1():
    """This process as rank 0 of a 2-process gloo group, rank 1 spawned."""
    if torch.cuda.is_available():
        pytest.skip("a CPU (gloo) benchmark")
    port = _free_port()
    proc = mp.get_context("spawn").Process(target=_rank1, args=(port,))
    proc.start()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=W)
    try:
        yield proc
    finally:
        dist.broadcast_object_list([None], src=0)
        dist.destroy_process_group()
        torch.set_num_threads(threads)
        proc.join(timeout=120)


@pytest.mark.parametrize("combo", list(COMBOS))
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_focal_clip_dist(benchmark, rank1, shape, provider, combo):
    if provider == "open_clip":
        pytest.importorskip("open_clip.loss")
    b, D = SHAPES[shape]
    calls = 1 + WARMUP + ROUNDS  # record(): one call for the peak, then warmup and rounds
    dist.broadcast_object_list([(provider, b, D, combo, calls)], src=0)
    step = _step_fn(provider, 0, b, D, combo)
    # One step first (the process's one-time costs: thread pools, gloo buffers), then the fused
    # op's cached workspace released, so that the measured peak holds it.
    step()
    softmask.release_workspace()
    local_loss, gather_with_grad = COMBOS[combo]
    rows = b if local_loss or provider == "fused" else W * b
    record(benchmark, step, op="focal_clip_dist", provider=provider, mode="full", shape=f"{shape}_{combo}",
           dtype=torch.float32, device=CPU,
           sizes=dict(B=b, N=W * b, D=D, world_size=W, local_loss=local_loss, gather_with_grad=gather_with_grad,
                      threads_per_rank=1),
           flops=6 * 2 * rows * W * b * D, rounds=ROUNDS, warmup_rounds=WARMUP)
    peak1 = [None]
    dist.broadcast_object_list(peak1, src=1)
    benchmark.extra_info["peak_mem_bytes_rank1"] = int(peak1[0])
    assert rank1.is_alive()
