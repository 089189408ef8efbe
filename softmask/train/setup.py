"""The process a run trains in: its device, its intra-op threads, its memory allocator, its process group.

Everything here acts on the process, not on the model or the data, and changes no result: thread counts change
the floating-point reduction order only, the allocator setting not a bit (tested).
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import torch
import torch.distributed as dist

from softmask.runs.device import check_device

__all__ = ["check_device", "setup_distributed", "dist_info", "set_threads", "auto_num_workers", "keep_freed_memory",
           "ThreadGuard"]


def dist_info():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def setup_distributed(device_arg: Optional[str]):
    """Initialize the process group under torchrun (WORLD_SIZE > 1). Returns the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = check_device(device_arg)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    if device.type == "cuda":
        if world > 1:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def auto_num_workers(device: str = "cpu", cores: Optional[int] = None) -> int:
    """The data loader's worker processes when ``num_workers`` is None.

    On a GPU, one per core beyond the first, at most 4: a worker builds the next batches (drawing or
    decoding the images, the augmentation, tokenizing) while the GPU trains on this one. On the CPU, none:
    the intra-op threads already use every core, and a worker only competes with them. Measured on the
    2-core machine (150-step runs, run in the order A B C C B A): 1 worker took 79.9 and 86.9 s where
    building each batch between steps took 81.0 and 74.2 s, with 4-25 % more user time
    (benchmarks/NOTES.md). Every item is seeded by its own key, so the batches are the same with any number
    of workers (tested)."""
    if device != "cuda":
        return 0
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4, cores - 1))


def set_threads(threads: Optional[int], device: torch.device) -> None:
    """``threads``: a fixed intra-op thread count, or None: torch's default to start with, then
    :class:`ThreadGuard` picks between all cores and 1 while training."""
    if threads is not None:
        torch.set_num_threads(threads)


#: glibc ``mallopt`` parameters (``malloc.h``)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep freed blocks for reuse instead of handing them back to the kernel
    (Linux with glibc; elsewhere a no-op). Returns whether the setting took.

    By default glibc serves every block above its mmap threshold with a fresh ``mmap`` and returns it
    with ``munmap`` when freed, and trims the heap's free top; the next tensor of that size then
    touches new pages, and the kernel faults in and zeroes each 4 KiB page again. A CPU training step
    allocates and frees its activations (a ``[48, 69, 512]`` float32 tensor is 6.8 MB) on every step, so
    on the 2-core machine the default job took 6.0 million minor page faults and 59 s of system time.
    Raising the mmap threshold to 1 GiB and switching off trimming keeps the freed memory in the heap,
    where the next step reuses it: 0.3 million faults, 42 s, and the job took 587 s instead of 653 s
    (benchmarks/NOTES.md). The process's resident size stays at its peak instead of shrinking between
    steps. Tensor alignment is PyTorch's own (64 bytes) either way, so the results are bit-identical
    (tested).

    Process-wide: :func:`train` calls it for a CPU run (the training CLIs' process)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # no C library to load, or one without mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # some glibc versions cap the mmap threshold at HEAP_MAX_SIZE / 2 (32 MiB on 64-bit): fall back to the cap
    took = mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1 or mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1
    return took and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1


class ThreadGuard:
    """Pick the faster intra-op thread count while training (automatic mode only: no ``threads``
    given, CPU, single process).

    Every ``period`` steps it times ``probe`` steps with the other count (all cores, or 1) and
    keeps whichever gave the shorter median step. Measured on the 2-core machine: idle, a tiny
    step takes 0.5 s with 2 threads and 0.7 s with 1; with another job running, 11 s with 2
    OpenMP threads (threads spinning on barriers while one of them is descheduled) and 0.9 s
    with 1. Thread counts change the floating-point reduction order, not the math.
    """

    def __init__(self, enabled: bool, period: int = 100, probe: int = 3, skip: int = 2,
                 prog: str = "softmask-pretrain"):
        self.prog = prog
        self.full = torch.get_num_threads()
        self.enabled = enabled and self.full > 1
        self.period, self.probe, self.skip = period, probe, skip
        self.current = self.full
        self.n = 0
        self.recent: list[float] = []
        self.trial: list[float] = []
        self.trying, self.first, self.since = False, True, 0

    def _other(self) -> int:
        return 1 if self.current == self.full else self.full

    def observe(self, dt: float) -> None:
        if not self.enabled:
            return
        self.n += 1
        if self.n <= self.skip:  # first steps: allocator and caches warming up
            return
        if self.trying:  # this step ran with the other count
            self.trial.append(dt)
            if len(self.trial) == self.probe:
                self._decide()
                self.trying, self.since = False, 0
            return
        self.recent = (self.recent + [dt])[-10:]
        self.since += 1
        base = sorted(self.recent[:-2])[len(self.recent[:-2]) // 2] if len(self.recent) >= 5 else None
        sudden = base is not None and min(self.recent[-2:]) > 3 * base  # another job just took a core
        if sudden:
            self.recent = self.recent[-2:]
        if len(self.recent) >= min(self.probe, 2) and (self.first or sudden or self.since >= self.period):
            self.first, self.trying = False, True
            torch.set_num_threads(self._other())

    def _decide(self) -> None:
        med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
        other = self._other()
        if med(self.trial) < 0.9 * med(self.recent[-self.probe:]):
            print(f"{self.prog}: {other} intra-op thread(s) are faster here ({med(self.trial):.2f} s against "
                  f"{med(self.recent[-self.probe:]):.2f} s per step): switching (--threads N fixes the count)", file=sys.stderr)
            self.current = other
            self.recent = list(self.trial)
        torch.set_num_threads(self.current)
        self.trial = []
