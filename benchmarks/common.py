"""Shared machinery of the pytest-benchmark suites: peak memory, device names and
the result schema every suite records in ``benchmark.extra_info``.

Schema (every benchmark): ``op``, ``provider``, ``mode``, ``shape``, ``dtype``,
``device``, ``peak_mem_bytes`` (extra memory above what was allocated before the
measured call), the problem sizes, and ``tflops`` and/or ``gbps`` achieved
(from the median time), plus library versions.
"""

from __future__ import annotations

import gc
import platform
import re
from typing import Callable, Optional

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {name} ({torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    """Folder name under ``bench_results/`` for this device."""
    return re.sub(r"[^A-Za-z0-9]+", "-", device_name(device)).strip("-").lower()


def _read_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes allocated by one call of ``fn`` above what was live before it.

    CUDA: the caching allocator's peak. CPU: the process's peak resident set
    (VmHWM, reset through /proc/self/clear_refs) minus the resident set before.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        del out
        return torch.cuda.max_memory_allocated(device) - base
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    base = _read_status("VmRSS")
    out = fn()
    peak = _read_status("VmHWM")
    del out
    return max(peak - base, 0)


def record(
    benchmark,
    fn: Callable[[], object],
    *,
    op: str,
    provider: str,
    mode: str,
    shape: str,
    dtype: torch.dtype,
    device: torch.device,
    sizes: dict,
    flops: Optional[float] = None,
    bytes_moved: Optional[float] = None,
    rounds: int = 5,
    warmup_rounds: int = 1,
    setup: Optional[Callable[[], tuple]] = None,
):
    """Time ``fn`` with pytest-benchmark and store the common schema in ``extra_info``.

    ``fn`` must synchronize on CUDA (use :func:`synced`) so the timings are real. With
    ``setup`` (returning ``(args, kwargs)`` for ``fn``, untimed; e.g. the forward pass
    before a timed backward), ``peak_mem_bytes`` covers setup and ``fn`` together.
    """
    if setup is None:
        peak = peak_extra_memory(fn, device)
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    else:
        def both():
            args, kwargs = setup()
            return fn(*args, **kwargs)

        peak = peak_extra_memory(both, device)
        benchmark.pedantic(fn, setup=setup, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    median = benchmark.stats.stats.median
    info = dict(
        op=op,
        provider=provider,
        mode=mode,
        shape=shape,
        dtype=str(dtype).replace("torch.", ""),
        device=device_name(device),
        peak_mem_bytes=int(peak),
        torch=torch.__version__,
        **sizes,
    )
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if flops is not None:
        info["flops"] = float(flops)
        info["tflops"] = float(flops) / median / 1e12
    if bytes_moved is not None:
        info["bytes"] = float(bytes_moved)
        info["gbps"] = float(bytes_moved) / median / 1e9
    benchmark.extra_info.update(info)
    return info


def synced(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """Wrap ``fn`` so that it waits for the device before returning."""
    if device.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run
