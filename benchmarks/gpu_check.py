"""One prepared GPU run: every check a lent H100 must make, in one command that leaves
every result on disk (issue 30).

    PYTHONPATH=. python -m benchmarks.gpu_check --out /tmp/gc --bundle $OUT/gpu_check.tar.gz
    python -m benchmarks.gpu_check --out DIR --dry-run      # every step on the CPU at toy sizes
    python -m benchmarks.gpu_check --out DIR --only bench_focal_albef   # rerun one step (repeatable)
    python -m benchmarks.gpu_check --out DIR --summarize    # rebuild summary.md / summary.json only
    python -m benchmarks.gpu_check --out DIR --collect bench_results   # bench JSON -> bench_results/<device>/, render

Steps, in order (``--list`` prints them with their budgets). Each runs in its own process
with its own time budget (killed when it runs over), writes ``DIR/<step>.json`` as soon
as it ends (workers also update it while they run, so a step that is cut off keeps what
it measured), and the summary is rewritten after every step:

- ``device``: name, SM count, memory, torch / triton / CUDA versions; the two ceilings,
  a large device copy (GB/s, bytes read + written) and a large bf16 matrix product (TFLOP/s).
- ``tests_gpu``, ``tests_kernels``: the kernel tests (``tests/test_focal_itc.py``,
  ``tests/test_focal_itc_ids.py``, ``tests/test_soft_mask.py``) compiled, not interpreted:
  first the GPU-only ones (fp32 / bf16 / fp16 / fp64 on CUDA), then the other triton-backend
  ones (~210; the torch backend's and the input checks stay with the CPU suite); JUnit XML kept.
- ``accuracy``: bf16 and fp16 results of both ops (backend ``auto``) against the float64
  reference at ALBEF's shapes: the largest error relative to max|truth| per output and
  gradient, next to the CPU tests' tolerance (``tests.helpers.NORM_RTOL``) and the
  same-dtype eager reference's own error.
- ``bench_focal_albef_gpu``, ``bench_focal_albef``, ``bench_focal_clip``, ``bench_soft_mask``:
  ``benchmarks/bench_focal_itc.py`` / ``bench_soft_mask.py`` at one shape each (pytest-benchmark
  JSON): fused, eager, ``torch.compile`` (forward + backward graph only: one compilation
  per shape and dtype), open_clip's ``ClipLoss`` at ``clip`` (skipped, with the reason,
  where open_clip is not installed), and the copy ceiling.
- ``train_step``: the ``base`` preset's pretraining step (batch 32, bf16 autocast) fused
  and reference, and fused with the soft-mask branch off: samples/s, peak memory, the
  branch's share of a step (by that ablation), and a profiler table of one fused step.
- ``default_job``: the default job (``softmask-pretrain`` with no settings but the device)
  end to end, with its evaluation metrics; cut off, its ``metrics.jsonl`` gives the rate.
- ``torchrun``: ``torchrun --nproc_per_node 1`` of a worker that initializes NCCL, checks
  an all-reduce and an all-gather, runs two DDP-wrapped steps against the same steps
  unwrapped, and a 2-step training run against the same run in a plain process.

On a lent machine (the device tool: at most 10 minutes per command, 8 files back)::

    run(command="python -m benchmarks.gpu_check --out /tmp/gc --bundle $OUT/gpu_check.tar.gz",
        timeout_s=560)
    # here, after: tar xzf <files_at>/gpu_check.tar.gz -C /tmp
    python -m benchmarks.gpu_check --out /tmp/gc --collect bench_results   # then commit bench_results/

open_clip is not in the machines' image; to time its ``ClipLoss`` at ``clip``, install it
here into an ignored folder (``pip install --target .gpu_deps --no-deps open_clip_torch ftfy
wcwidth``), carry that folder and prefix the command with ``PYTHONPATH=.gpu_deps``; without
it that provider is recorded as skipped, with the reason.

The budgets add up to 460 s, under ``--total-budget`` (465 s): each step gets the smaller of its own
budget and what is left. ``--dry-run`` runs every step at toy sizes on the CPU (Triton
through its interpreter) with small budgets, which ``tests/test_gpu_check.py`` does in CI;
the dry run leaves out ``torch.compile`` (a first compilation takes ~20 s on 2 cores) and
the GPU-only tests skip themselves there.

Outputs under ``DIR``: ``<step>.json``, ``<step>.log``, ``bench/<step>.json`` (pytest-benchmark
format, what ``benchmarks.render`` reads), ``tests_*.junit.xml``, ``summary.json`` and
``summary.md`` (one table of every step's status, time and key figures, the goals of
issue 30 against the measured figures, and the README rows). The device tool brings
back at most 8 files: ``--bundle PATH`` writes all of ``DIR`` into one ``.tar.gz`` after
every step, and the summary is printed last.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from typing import Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_TESTS = ["tests/test_focal_itc.py", "tests/test_focal_itc_ids.py", "tests/test_soft_mask.py"]
TOTAL_BUDGET = 465.0  # seconds: the 8 minutes of issue 30 less a margin for the machine's start-up and transfers


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    budget: float  # seconds on a GPU
    # seconds in --dry-run on the CPU: generous (a toy step takes 5-40 s), so that a loaded CI machine does not kill
    # a step that works (a step killed at 30 s under load made a test flaky); a hang still ends
    dry_budget: float
    kind: str  # "worker", "pytest", "bench" or "torchrun"
    what: str


# Budgets (H100, seconds; the sum is TOTAL_BUDGET). Predicted times are in benchmarks/NOTES.md.
STEPS = [
    Step("device", 15, 150, "worker", "device facts, copy GB/s, bf16 matmul TFLOP/s"),
    Step("tests_gpu", 45, 150, "pytest", "GPU-only kernel tests, compiled"),
    Step("tests_kernels", 55, 150, "pytest", "the other triton-backend kernel tests, compiled"),
    Step("accuracy", 25, 150, "worker", "bf16 / fp16 against float64 at ALBEF's shapes"),
    Step("bench_focal_albef_gpu", 55, 150, "bench", "focal ITC albef_gpu (fp32, bf16)"),
    Step("bench_focal_albef", 40, 150, "bench", "focal ITC albef (bf16)"),
    Step("bench_focal_clip", 45, 150, "bench", "focal ITC clip (bf16) with open_clip"),
    Step("bench_soft_mask", 35, 150, "bench", "soft mask albef (bf16, fp32)"),
    Step("train_step", 45, 150, "worker", "base step fused vs reference, soft-mask share"),
    Step("default_job", 75, 150, "worker", "the default job end to end"),
    Step("torchrun", 25, 150, "torchrun", "torchrun --nproc_per_node 1, NCCL, DDP"),
]
STEP_NAMES = [s.name for s in STEPS]

# Goals of issue 30 (fused against the others, forward + backward).
GOALS = {
    "focal": dict(eager=3.0, compile=1.5, memory=10.0, copy_share=0.6),
    "soft_mask": dict(eager=5.0, compile=2.0),
    "train_step": dict(speedup=1.2, softmask_share=0.35),
    "default_job_s": 60.0,
}


# --------------------------------------------------------------------------- small helpers


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class Recorder:
    """A worker's result: a dict rewritten to ``DIR/<step>.result.json`` after every update,
    so that a step killed by its budget keeps what it measured."""

    def __init__(self, path: str):
        self.path = path
        self.data = {}

    def set(self, key, value):
        self.data[key] = value
        _write_json(self.path, self.data)

    def append(self, key, value):
        self.data.setdefault(key, []).append(value)
        _write_json(self.path, self.data)


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- worker steps (run in a subprocess)


def _torch_setup(dry: bool):
    """Import torch (and set the interpreter up where there is no GPU); the device to use."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before softmask defines its kernels
    return torch, torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _timed(fn: Callable[[], object], device, reps: int, warmup: int = 1, last: Optional[list] = None) -> list:
    """Seconds per call of ``fn`` (synchronized), ``reps`` calls after ``warmup``; the last
    call's result is appended to ``last`` when given."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        res = fn()
        sync()
        out.append(time.perf_counter() - t0)
    if last is not None:
        last.append(res)
    return out


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def worker_device(rec: Recorder, dry: bool) -> None:
    import platform

    torch, dev = _torch_setup(dry)
    facts = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                 device_type=dev.type, commit=_git_commit(), host=platform.node())
    try:
        import triton

        facts["triton"] = triton.__version__
    except ImportError:
        facts["triton"] = None
    from benchmarks.common import device_name, device_slug

    facts["device"] = device_name(dev)
    facts["slug"] = device_slug(dev)
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        facts.update(sm_count=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                     capability=f"{p.major}.{p.minor}", l2_mib=round(getattr(p, "L2_cache_size", 0) / 2**20, 1))
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
            facts["nvidia_smi"] = smi.stdout.strip()
    else:
        facts["sm_count"] = os.cpu_count()
    rec.set("facts", facts)

    # Copy ceiling: bytes read + written by dst.copy_(src).
    n = (32 << 20) if dry else (2 << 30)
    src = torch.empty(n, dtype=torch.uint8, device=dev).random_()
    dst = torch.empty_like(src)
    times = _timed(lambda: dst.copy_(src), dev, reps=5 if dry else 20, warmup=2)
    rec.set("copy", dict(bytes=2 * n, median_s=_median(times), gbps=2 * n / _median(times) / 1e9))
    src = dst = None  # free the 4 GiB before the product
    # Matrix-product ceiling: bf16 on a GPU (fp32 on the CPU: its bf16 products are not a use case).
    m = 512 if dry else 8192
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    a = torch.randn(m, m, device=dev, dtype=dt)
    b = torch.randn(m, m, device=dev, dtype=dt)
    times = _timed(lambda: a @ b, dev, reps=5 if dry else 20, warmup=3)
    rec.set("matmul", dict(n=m, dtype=str(dt).replace("torch.", ""), median_s=_median(times),
                           tflops=2 * m ** 3 / _median(times) / 1e12))


# ALBEF's shapes for the accuracy step: focal ITC (B, queue, D), soft mask (B, H, T, N, dh, D).
ACCURACY_FOCAL = {"albef_gpu": (64, 65536, 256), "albef": (512, 65536, 256)}
ACCURACY_SOFT_MASK = {"albef": (64, 12, 30, 257, 64, 768)}
DRY_FOCAL = {"toy": (8, 40, 16)}
DRY_SOFT_MASK = {"toy": (2, 3, 5, 20, 8, 12)}


def _rel_err(out, truth) -> float:
    o, t = out.detach().double(), truth.detach().double().to(out.device)
    return float((o - t).abs().max() / t.abs().max().clamp_min(1e-300))


def _within_test_tolerance(out, truth, same, dtype, cond) -> bool:
    """The CPU tests' criterion (tests.helpers.assert_close): elementwise
    ``|out - truth| <= 3 |same - truth| + NORM_RTOL[dtype] * cond * max|truth|``."""
    from tests.helpers import NORM_RTOL

    o, t, s = (x.detach().double().to(out.device) for x in (out, truth, same))
    allowed = 3.0 * (s - t).abs() + NORM_RTOL[dtype] * cond * float(t.abs().max())
    return bool(((o - t).abs() <= allowed).all())


def worker_accuracy(rec: Recorder, dry: bool) -> None:
    torch, dev = _torch_setup(dry)
    import torch.nn.functional as F

    import softmask
    from softmask import reference
    from tests.helpers import NORM_RTOL

    tau, gamma, alpha, floor = 0.07, 2.0, 0.4, 0.5
    eps32 = torch.finfo(torch.float32).eps
    for shape, (B, queue, D) in (DRY_FOCAL if dry else ACCURACY_FOCAL).items():
        g = torch.Generator(device=dev).manual_seed(0)
        feat = lambda n: F.normalize(torch.randn(n, D, device=dev, generator=g, dtype=torch.float64), dim=-1)  # noqa
        base = dict(img=feat(B), txt=feat(B), img_m=feat(B), txt_m=feat(B), tb=feat(B), tq=feat(queue),
                    ib=feat(B), iq=feat(queue))

        def run(fn, dtype, tau_dtype, truth=False):
            x = {k: v.to(dtype).to(torch.float64 if truth else dtype) for k, v in base.items()}
            img, txt = x["img"].clone().requires_grad_(), x["txt"].clone().requires_grad_()
            t = torch.tensor(tau, dtype=tau_dtype, device=dev, requires_grad=True)
            loss = fn(img, txt, t, gamma=gamma, alpha=alpha, image_keys=(x["ib"], x["iq"]),
                      text_keys=(x["tb"], x["tq"]), image_feat_m=x["img_m"], text_feat_m=x["txt_m"])
            loss.backward()
            return dict(loss=loss.detach(), d_image=img.grad, d_text=txt.grad, d_tau=t.grad)

        for dtype in (torch.bfloat16, torch.float16):
            # the truth from the same rounded inputs, in float64 (as the tests' ground truth)
            truth = run(reference.focal_itc_loss_reference, dtype, torch.float64, truth=True)
            got = run(softmask.focal_itc_loss, dtype, torch.float32)
            same = run(reference.focal_itc_loss_reference, dtype, torch.float32)
            cond = 1.0 + 0.5 * eps32 / (tau * NORM_RTOL[dtype])  # tests/test_focal_itc.py::_cond
            for name in truth:
                rec.append("rows", dict(op="focal_itc", shape=shape, B=B, N=B + queue, D=D,
                                        dtype=str(dtype).replace("torch.", ""), output=name,
                                        rel_err=_rel_err(got[name], truth[name]),
                                        eager_same_dtype_rel_err=_rel_err(same[name], truth[name]),
                                        test_tolerance=NORM_RTOL[dtype] * cond,
                                        within_test_criterion=_within_test_tolerance(got[name], truth[name],
                                                                                     same[name], dtype, cond)))
            del got, same, truth
        del base
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    for shape, (B, H, T, N, dh, D) in (DRY_SOFT_MASK if dry else ACCURACY_SOFT_MASK).items():
        g = torch.Generator(device=dev).manual_seed(1)
        rnd = lambda *s: torch.randn(*s, device=dev, generator=g, dtype=torch.float64)  # noqa: E731
        base = dict(x=rnd(B, N, D), q=rnd(B, H, T, dh), k=rnd(B, H, N, dh), v=rnd(B, H, N, dh),
                    gc=rnd(B, H, T, dh) * 0.01)
        word = torch.randint(1, T, (B,), device=dev, generator=g)
        grad_out = rnd(B, N, D)

        def run(fn, dtype, truth=False):
            x = {k: v.to(dtype).to(torch.float64 if truth else dtype) for k, v in base.items()}
            xx = x["x"].clone().requires_grad_()
            out, mask = fn(xx, x["q"], x["k"], x["v"], x["gc"], word, floor=floor)
            out.backward(grad_out.to(dtype).to(xx.dtype))
            return dict(mask=mask.detach(), out=out.detach(), d_image_embeds=xx.grad)

        for dtype in (torch.bfloat16, torch.float16):
            truth = run(reference.text_driven_soft_mask_reference, dtype, truth=True)
            got = run(softmask.text_driven_soft_mask, dtype)
            same = run(reference.text_driven_soft_mask_reference, dtype)
            for name in truth:
                # the mask is float32 for half inputs: its tolerance is float32's, as in tests/test_soft_mask.py
                tol_dtype = torch.float32 if name == "mask" else dtype
                rec.append("rows", dict(op="soft_mask", shape=shape, B=B, H=H, T=T, N=N, dh=dh, D=D,
                                        dtype=str(dtype).replace("torch.", ""), output=name,
                                        rel_err=_rel_err(got[name], truth[name]),
                                        eager_same_dtype_rel_err=_rel_err(same[name], truth[name]),
                                        test_tolerance=NORM_RTOL[tol_dtype],
                                        within_test_criterion=_within_test_tolerance(got[name], truth[name],
                                                                                     same[name], tol_dtype, 1.0)))


def _train_api():
    """TrainConfig and train from the public training API (``softmask.train`` where it
    exports them, else ``softmask.train.loop``)."""
    try:
        from softmask.train import TrainConfig, train
    except ImportError:
        from softmask.train.loop import TrainConfig, train
    return TrainConfig, train


def _profile_step(torch, step, device, reps: int) -> dict:
    """torch.profiler over ``reps`` calls of ``step``: device time per step, the top kernels,
    and the time spent under two ranges added around the soft-mask branch's parts (the
    positive ITM pass with its Grad-CAM partial backward, and the fused mask op)."""
    import softmask
    from softmask.model import albef

    ranges = {"softmask:gradcam_inputs": (albef.SoftMaskALBEF, "word_gradcam_inputs"),
              "softmask:text_driven_soft_mask": (softmask, "text_driven_soft_mask")}
    saved = {}
    for label, (owner, attr) in ranges.items():
        orig = getattr(owner, attr)
        saved[label] = (owner, attr, orig)

        def wrapped(*a, _orig=orig, _label=label, **kw):
            with torch.profiler.record_function(_label):
                return _orig(*a, **kw)

        setattr(owner, attr, wrapped)
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    try:
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(reps):
                step()
    finally:
        for owner, attr, orig in saved.values():
            setattr(owner, attr, orig)
    cuda = device.type == "cuda"

    def dev_time(e, total=True):
        names = (("device_time_total", "cuda_time_total") if total else ("self_device_time_total",
                                                                          "self_cuda_time_total"))
        if not cuda:
            names = ("cpu_time_total",) if total else ("self_cpu_time_total",)
        for n in names:
            if hasattr(e, n):
                return float(getattr(e, n))
        return 0.0

    avgs = prof.key_averages()
    # Device time per step: the sum of kernel self times (CPU: the ranges' CPU time is all there is).
    # (the ranges also appear on the device timeline as user annotations: not kernels, left out)
    kernels = [e for e in avgs if cuda and dev_time(e, total=False) > 0 and e.key not in ranges
               and "CUDA" in str(getattr(e, "device_type", ""))]
    total_us = sum(dev_time(e, total=False) for e in kernels) if cuda else sum(
        dev_time(e, total=False) for e in avgs)
    top = sorted(kernels if cuda else avgs, key=lambda e: -dev_time(e, total=False))[:15]
    out = dict(reps=reps, device_time_per_step_ms=total_us / reps / 1e3,
               top=[dict(name=e.key[:90], ms_per_step=dev_time(e, total=False) / reps / 1e3,
                         share=dev_time(e, total=False) / max(total_us, 1e-9), calls=e.count) for e in top])
    for label in ranges:
        ev = [e for e in avgs if e.key == label]
        cpu_side = [e for e in ev if "CUDA" not in str(getattr(e, "device_type", ""))]  # its kernels' time
        t = dev_time((cpu_side or ev)[0]) if ev else 0.0
        out[label] = dict(ms_per_step=t / reps / 1e3, share=t / max(total_us, 1e-9))
    return out


def worker_train_step(rec: Recorder, dry: bool) -> None:
    torch, dev = _torch_setup(dry)
    import gc

    from benchmarks.bench_train_step import _step_fn

    preset, B = ("tiny", 4) if dry or dev.type != "cuda" else ("base", 32)
    warmup, reps = (1, 1) if dry else (3, 10)
    rec.set("config", dict(preset=preset, batch=B, device=str(dev), warmup=warmup, reps=reps,
                           amp="bf16" if dev.type == "cuda" else None))
    for label, impl, sm in (("fused", "fused", True), ("reference", "reference", True),
                            ("fused_no_softmask", "fused", False)):
        t0 = time.perf_counter()
        step, cfg = _step_fn(preset, dev, B, impl, softmask=sm)
        build_s = time.perf_counter() - t0
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        last = []
        times = _timed(step, dev, reps=reps, warmup=warmup, last=last)
        row = dict(provider=label, median_s=_median(times), min_s=min(times), max_s=max(times), times=times,
                   samples_per_s=B / _median(times), build_s=build_s, loss=float(last[0]))
        if dev.type == "cuda":
            row["peak_mem_bytes"] = int(torch.cuda.max_memory_allocated(dev))
        rec.append("rows", row)
        if label == "fused":
            rec.set("profile", _profile_step(torch, step, dev, reps=1 if dry else 3))
        del step
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    rows = {r["provider"]: r for r in rec.data["rows"]}
    rec.set("speedup_fused_vs_reference", rows["reference"]["median_s"] / rows["fused"]["median_s"])
    rec.set("softmask_share_by_ablation", 1.0 - rows["fused_no_softmask"]["median_s"] / rows["fused"]["median_s"])
    # pytest-benchmark-shaped file for benchmarks.render (bench_results/<device>/train_step.json)
    _write_bench_json(os.path.join(os.path.dirname(rec.path), "bench", "train_step.json"), [
        dict(name=f"train_step[{preset}-{r['provider']}]", times=r["times"],
             extra_info=dict(op="train_step", provider="fused" if r["provider"].startswith("fused") else "reference",
                             mode="softmask_branch_off" if r["provider"] == "fused_no_softmask" else "full",
                             shape=f"{preset}-B{B}", dtype="bfloat16" if dev.type == "cuda" else "float32",
                             device=_device_name(dev), peak_mem_bytes=r.get("peak_mem_bytes", 0), preset=preset,
                             batch=B, samples_per_s=r["samples_per_s"]))
        for r in rec.data["rows"]])


def _device_name(dev) -> str:
    from benchmarks.common import device_name

    return device_name(dev)


def _write_bench_json(path: str, benches: list) -> None:
    """A minimal pytest-benchmark JSON (what :func:`benchmarks.render.load` reads)."""
    import datetime

    os.makedirs(os.path.dirname(path), exist_ok=True)
    out = []
    for b in benches:
        ts = sorted(b["times"])
        n = len(ts)
        out.append(dict(name=b["name"], extra_info=b["extra_info"],
                        stats=dict(min=ts[0], max=ts[-1], mean=sum(ts) / n, median=_median(ts), q1=ts[n // 4],
                                   q3=ts[min(n - 1, (3 * n) // 4)], rounds=n)))
    _write_json(path, dict(benchmarks=out, commit_info=dict(id=_git_commit()),
                           datetime=datetime.datetime.now(datetime.timezone.utc).isoformat()))


def _metrics_rows(path: str) -> list:
    rows = []
    with contextlib.suppress(OSError):
        with open(path) as f:
            for line in f:
                with contextlib.suppress(ValueError):
                    rows.append(json.loads(line))
    return rows


def _dry_train_config(TrainConfig, out: str, device: str, steps: int = 2):
    return TrainConfig(out=out, device=device, steps=steps, batch_size=4, train_size=24, queue_size=16,
                       warmup_steps=1, log_every=1, save_every=steps, progress=False, num_workers=0,
                       pointing_every=0, holdout=8, test_size=8, eval_k=2)


def worker_default_job(rec: Recorder, dry: bool) -> None:
    torch, dev = _torch_setup(dry)
    TrainConfig, train = _train_api()
    out = os.path.join(os.path.dirname(rec.path), "default_job")
    shutil.rmtree(out, ignore_errors=True)
    cfg = _dry_train_config(TrainConfig, out, dev.type) if dry else TrainConfig(out=out, device=dev.type,
                                                                                progress=False)
    rec.set("config", dict(out=out, dry=dry, device=dev.type))
    t0 = time.perf_counter()
    summary = train(cfg)
    rec.set("wall_s", time.perf_counter() - t0)
    rec.set("train_wall_s", summary.get("wall_s"))
    rec.set("steps", summary.get("steps"))
    rec.set("last_losses", summary.get("last_losses"))
    rec.set("eval", summary.get("eval"))


def worker_torchrun(rec: Recorder, dry: bool) -> None:
    """Rank 0 of ``torchrun --nproc_per_node 1``: NCCL (gloo on the CPU) collectives, two
    DDP-wrapped steps against the same unwrapped, and a 2-step run against a plain one."""
    torch, dev = _torch_setup(dry)
    import torch.distributed as dist

    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    world = dist.get_world_size()
    rec.set("process_group", dict(backend=backend, world=world, rank=dist.get_rank(),
                                  torchrun=os.environ.get("TORCHELASTIC_RUN_ID") is not None))
    x = torch.arange(4, dtype=torch.float32, device=dev)
    y = x.clone()
    dist.all_reduce(y)
    gathered = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(gathered, x)
    rec.set("collectives_ok", bool(torch.equal(y, x * world) and all(torch.equal(gi, x) for gi in gathered)))

    # Two DDP-wrapped steps of the tiny preset against the same steps unwrapped (same seed, same batch).
    from benchmarks.bench_train_step import _batch
    from softmask.data import get_tokenizer
    from softmask.model import SoftMaskALBEF, model_preset

    tok = get_tokenizer(None)

    def two_steps(wrap: bool):
        cfg = model_preset("tiny", vocab_size=len(tok), hidden_dropout=0.0, attn_dropout=0.0, vision_drop_path=0.0)
        torch.manual_seed(0)
        model = SoftMaskALBEF(cfg).to(dev).train()
        net = (torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index or 0] if dev.type == "cuda"
                                                         else None, find_unused_parameters=True) if wrap else model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        image, ids, mask, mids, labels, cand = _batch(tok, cfg, 4, dev)
        losses = []
        for _ in range(2):
            torch.manual_seed(1)  # the same word draws and negatives in both runs
            out = net(image, ids, mask, mlm_input_ids=mids, mlm_labels=labels, word_candidates=cand, alpha=0.4)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            losses.append(float(out["loss"].detach()))
        return losses

    ddp, plain = two_steps(True), two_steps(False)
    rec.set("ddp_steps", dict(ddp=ddp, plain=plain, max_abs_diff=max(abs(a - b) for a, b in zip(ddp, plain))))

    # The training loop under torchrun (its process group initialized here) against a plain run.
    TrainConfig, train = _train_api()
    base = os.path.dirname(rec.path)
    outs = {k: os.path.join(base, f"torchrun_{k}") for k in ("torchrun", "plain")}
    for k in outs:
        shutil.rmtree(outs[k], ignore_errors=True)

    def cfg_for(out):
        c = _dry_train_config(TrainConfig, out, dev.type, steps=2)
        return dataclasses.replace(c, run_eval=False)

    train(cfg_for(outs["torchrun"]))
    dist.destroy_process_group()
    train(cfg_for(outs["plain"]))
    keys = ("loss", "loss_itc", "loss_itm", "loss_softmask", "loss_mlm")
    rows = {k: {r["step"]: [r.get(n) for n in keys] for r in _metrics_rows(os.path.join(o, "metrics.jsonl"))
                if "step" in r} for k, o in outs.items()}
    diffs = [abs(a - b) for s in rows["plain"] for a, b in zip(rows["torchrun"].get(s, []), rows["plain"][s])
             if a is not None and b is not None]
    rec.set("train_runs", dict(steps=sorted(rows["plain"]), torchrun=rows["torchrun"], plain=rows["plain"],
                               max_abs_diff=max(diffs) if diffs else None))


WORKERS = {"device": worker_device, "accuracy": worker_accuracy, "train_step": worker_train_step,
           "default_job": worker_default_job, "torchrun": worker_torchrun}


# --------------------------------------------------------------------------- step commands (parent)


def _pytest_args(step: Step, out: str, dry: bool, part: str = "") -> list:
    """pytest arguments of the pytest and bench steps; a bench step runs in two parts, the
    fast providers first, then ``part="compile"`` (torch.compile's warm-ups), each with its
    own JSON, so that a compilation cut off by the budget keeps the other rows."""
    name = step.name + (f"_{part}" if part else "")
    # (hypothesis's and anyio's plugins, where installed, cost ~1.4 s of imports per run; no test uses them)
    common = ["-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-p", "no:anyio", "-v", "-rfEs",
              f"--junitxml={os.path.join(out, name + '.junit.xml')}"]
    # Triton's compilations are CPU work (~1-3 s per kernel variant): with pytest-xdist (on the
    # lent machines' image) 4 processes share the GPU
    xdist = [] if dry or importlib.util.find_spec("xdist") is None else ["-n", "4"]
    if step.name == "tests_gpu":
        # the GPU-only tests (skipped without CUDA); in the dry run, the same selection
        return KERNEL_TESTS + common + xdist + ["-k", "gpu"]
    if step.name == "tests_kernels":
        args = KERNEL_TESTS + common
        if dry:  # one interpreted case of each op
            return args + ["-k", "(test_albef_mode_grid and 2.0-0.4-0.07-dtype0-triton) or "
                                 "(test_soft_mask_matches_eager_autograd and triton-float32-H1-N17-dense-floor0)"]
        # the triton-backend tests (the torch backend and input checks run in the CPU suite)
        return args + xdist + ["-k", "triton and not gpu"]
    bench_json = os.path.join(out, "bench", name + ".json")
    bench = ["--benchmark-json", bench_json, "--benchmark-columns=median,iqr,rounds"]
    # one torch.compile graph per shape and dtype (forward + backward): its bwd and full rows
    providers = "compile and not fwd" if part == "compile" else "not compile"
    if step.name.startswith("bench_focal"):
        shape = step.name[len("bench_focal_"):]
        # "[shape-" matches the test ids of that shape alone ("[clip-" not "cpu_clip-" or "open_clip-")
        sel = "[cpu_small- and ((fused or eager) and full or copy)" if dry else f"[{shape}-"
        return ["benchmarks/bench_focal_itc.py"] + common + bench + ["-k", f"({sel}) and {providers}"]
    if step.name == "bench_soft_mask":
        sel = "([cpu_small- and (fused or eager) and full) or copy_bandwidth[cpu_small]" if dry else \
            "[albef- or copy_bandwidth[albef]"
        return ["benchmarks/bench_soft_mask.py"] + common + bench + ["-k", f"({sel}) and {providers}"]
    raise ValueError(step.name)


def _commands(step: Step, out: str, dry: bool) -> list:
    """``[(part, command)]`` of a step: one part, or for a bench step the fast providers and,
    on a GPU, torch.compile's rows (the dry run leaves torch.compile out: ~20 s per graph here)."""
    me = [sys.executable, "-m", "benchmarks.gpu_check", "--out", out] + (["--dry-run"] if dry else [])
    if step.kind == "worker":
        return [("", me + ["--worker", step.name])]
    if step.kind == "pytest":
        return [("", [sys.executable, "-m", "pytest"] + _pytest_args(step, out, dry))]
    if step.kind == "bench":
        return [(part, [sys.executable, "-m", "pytest"] + _pytest_args(step, out, dry, part))
                for part in ("",) + (() if dry else ("compile",))]
    if step.kind == "torchrun":
        return [("", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr",
                      "127.0.0.1", "--master_port", str(_free_port()), "-m", "benchmarks.gpu_check", "--out", out,
                      "--worker", step.name] + (["--dry-run"] if dry else []))]
    raise ValueError(step.kind)


def _run_with_budget(cmd: list, log_path: str, budget: float, env: dict, mode: str = "w") -> tuple:
    """``(returncode or None when killed, seconds)``; the whole process group is killed at the budget."""
    t0 = time.perf_counter()
    with open(log_path, mode) as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(budget, 1.0))
        except subprocess.TimeoutExpired:
            rc = None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return rc, time.perf_counter() - t0


def _parse_junit(path: str) -> Optional[dict]:
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    counts = dict(passed=0, failed=0, errors=0, skipped=0)
    failures, skips = [], {}
    for case in root.iter("testcase"):
        nodeid = f"{case.get('classname', '')}::{case.get('name', '')}"
        kids = {c.tag: c for c in case}
        if "failure" in kids or "error" in kids:
            tag = "failure" if "failure" in kids else "error"
            counts["failed" if tag == "failure" else "errors"] += 1
            failures.append(dict(test=nodeid, message=(kids[tag].get("message") or "")[:400]))
        elif "skipped" in kids:
            counts["skipped"] += 1
            reason = (kids["skipped"].get("message") or "")[:160]
            skips[reason] = skips.get(reason, 0) + 1
        else:
            counts["passed"] += 1
    return dict(counts=counts, failures=failures[:50], skip_reasons=skips)


def _parse_verbose_log(path: str) -> dict:
    """Outcome counts from pytest's ``-v`` lines (a step cut off before its JUnit file)."""
    import re

    counts = dict(passed=0, failed=0, errors=0, skipped=0)
    failures = []
    with contextlib.suppress(OSError):
        with open(path) as f:
            for line in f:
                m = re.search(r"(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR)", line) or re.search(
                    r"(PASSED|FAILED|SKIPPED|ERROR) (\S+::\S+)", line)
                if not m:
                    continue
                a, b = m.groups()
                outcome, nodeid = (b, a) if "::" in a else (a, b)
                key = {"PASSED": "passed", "FAILED": "failed", "SKIPPED": "skipped", "ERROR": "errors"}[outcome]
                counts[key] += 1
                if key in ("failed", "errors"):
                    failures.append(dict(test=nodeid, message="see the log"))
    return dict(counts=counts, failures=failures[:50], skip_reasons={}, partial=True)


def run_step(step: Step, out: str, dry: bool, budget: float) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if dry:  # one thread per step: the dry run's steps are small, and may run two at a time
        env["OMP_NUM_THREADS"] = "1"
    result_path = os.path.join(out, step.name + ".result.json")
    with contextlib.suppress(OSError):
        os.remove(result_path)
    if step.kind == "bench":
        os.makedirs(os.path.join(out, "bench"), exist_ok=True)
        for path in glob.glob(os.path.join(out, "bench", step.name + "*.json")):
            with contextlib.suppress(OSError):
                os.remove(path)
    log_path = os.path.join(out, step.name + ".log")
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    t0 = time.perf_counter()
    rcs, commands, parts_tests, bench_json = [], [], [], []
    for i, (part, cmd) in enumerate(_commands(step, out, dry)):
        left = budget - (time.perf_counter() - t0)
        if left < 3:
            rcs.append(None)
            commands.append(f"not run (budget spent): {' '.join(cmd)}")
            continue
        rc, _ = _run_with_budget(cmd, log_path, left, env, mode="a" if i else "w")
        rcs.append(rc)
        commands.append(" ".join(cmd))
        if step.kind in ("pytest", "bench"):
            name = step.name + (f"_{part}" if part else "")
            tests = _parse_junit(os.path.join(out, name + ".junit.xml")) if rc is not None else None
            parts_tests.append(tests or _parse_verbose_log(log_path))
            if step.kind == "bench" and os.path.exists(os.path.join(out, "bench", name + ".json")):
                bench_json.append(os.path.join("bench", name + ".json"))
    seconds = time.perf_counter() - t0
    rc = next((r for r in rcs if r != 0), 0)
    res = dict(step=step.name, what=step.what, started=started, seconds=round(seconds, 1), budget_s=round(budget, 1),
               returncode=rc, dry_run=dry, command=" ; ".join(commands))
    if step.kind in ("pytest", "bench"):
        res["tests"] = _merge_tests(parts_tests)
        if step.kind == "bench":
            res["bench_json"] = bench_json
    else:
        res["result"] = _read_json(result_path) or {}
    res["status"] = "timeout" if None in rcs else ("ok" if rc == 0 else "failed")
    if res["status"] != "ok":
        res["log_tail"] = _tail(log_path, 2500)
    if step.name == "default_job" and rc is None:  # the rate so far, from the run's metrics
        rows = [r for r in _metrics_rows(os.path.join(out, "default_job", "metrics.jsonl")) if "step" in r]
        if rows:
            res["partial"] = dict(last_step=rows[-1]["step"], last_row=rows[-1])
    return res


def _merge_tests(parts: list) -> dict:
    """The test outcomes of a step's parts together."""
    if len(parts) == 1:
        return parts[0]
    out = dict(counts=dict(passed=0, failed=0, errors=0, skipped=0), failures=[], skip_reasons={})
    for p in parts:
        for k, v in p["counts"].items():
            out["counts"][k] += v
        out["failures"] += p["failures"]
        for k, v in p["skip_reasons"].items():
            out["skip_reasons"][k] = out["skip_reasons"].get(k, 0) + v
        if p.get("partial"):
            out["partial"] = True
    return out


def _tail(path: str, n: int) -> str:
    with contextlib.suppress(OSError):
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    return ""


# --------------------------------------------------------------------------- summary


def _bench_rows(path: str) -> list:
    data = _read_json(path) or {}
    rows = []
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        if "op" in info:
            rows.append(dict(info, median=b["stats"]["median"]))
    return rows


def _fmt(x, spec=".3g"):
    return "" if x is None else format(x, spec)


def _bench_figures(rows: list, copy_gbps: Optional[float], readme: Optional[list] = None) -> tuple:
    """(table lines, goal lines) of one bench step's rows; with ``readme``, one README row per
    op, shape and dtype (forward + backward) is appended to it."""
    lines = ["| op | shape | dtype | mode | provider | median ms | x fused | peak MiB | GB/s | TFLOP/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    goals = []
    groups = {}
    for r in rows:
        groups.setdefault((r["op"], r["shape"], r["dtype"], r["mode"]), {})[r["provider"]] = r
    for (op, shape, dtype, mode), provs in sorted(groups.items()):
        fused = provs.get("fused")
        for name, r in sorted(provs.items(), key=lambda kv: kv[0] != "fused"):
            ratio = r["median"] / fused["median"] if fused and name != "fused" else None
            lines.append(f"| {op} | {shape} | {dtype} | {mode} | {name} | {r['median'] * 1e3:.3g} | {_fmt(ratio)} | "
                         f"{r.get('peak_mem_bytes', 0) / 2**20:.1f} | {_fmt(r.get('gbps'))} | {_fmt(r.get('tflops'))} |")
        if mode != "full" or not fused:
            continue
        if readme is not None:
            x = {p: provs[p]["median"] / fused["median"] for p in ("eager", "compile", "open_clip") if p in provs}
            mem = (provs["eager"]["peak_mem_bytes"] / max(fused.get("peak_mem_bytes") or 0, 1)
                   if "eager" in provs else None)
            share = fused["gbps"] / copy_gbps if copy_gbps and fused.get("gbps") else None
            readme.append(f"| {op} | {shape} | {dtype} | {fused['median'] * 1e3:.3g} | {_fmt(x.get('eager'), '.2f')} | "
                          f"{_fmt(x.get('compile'), '.2f')} | {_fmt(x.get('open_clip'), '.2f')} | {_fmt(mem, '.1f')} | "
                          f"{_fmt(fused.get('tflops'))} | {'' if share is None else f'{100 * share:.0f} %'} |")
        g = GOALS["focal"] if op == "focal_itc" else GOALS["soft_mask"] if op == "soft_mask" else None
        if g is None:
            continue
        checks = []
        for prov in ("eager", "compile"):
            if prov in provs:
                x = provs[prov]["median"] / fused["median"]
                checks.append(f"{x:.2f}x {prov} (goal >= {g[prov]}: {'met' if x >= g[prov] else 'MISSED'})")
        if "memory" in g and "eager" in provs and fused.get("peak_mem_bytes"):
            x = provs["eager"]["peak_mem_bytes"] / max(fused["peak_mem_bytes"], 1)
            checks.append(f"{x:.1f}x less memory than eager (goal >= {g['memory']}: "
                          f"{'met' if x >= g['memory'] else 'MISSED'})")
        if "copy_share" in g and dtype == "bfloat16" and copy_gbps and fused.get("gbps"):
            x = fused["gbps"] / copy_gbps
            checks.append(f"{100 * x:.0f} % of the copy bandwidth (goal >= {100 * g['copy_share']:.0f} %: "
                          f"{'met' if x >= g['copy_share'] else 'MISSED'})")
        if checks:
            goals.append(f"- {op} `{shape}` {dtype}: " + "; ".join(checks))
    return lines, goals


def _key_figures(res: dict, out: str, facts: dict) -> str:
    name, r = res["step"], res.get("result") or {}
    if name == "device":
        f = r.get("facts", {})
        return (f"{f.get('device', '?')}, {f.get('sm_count', '?')} SMs, torch {f.get('torch')}, triton {f.get('triton')}"
                f", CUDA {f.get('cuda')}; copy {_fmt((r.get('copy') or {}).get('gbps'), '.0f')} GB/s, "
                f"{(r.get('matmul') or {}).get('dtype', '')} matmul {_fmt((r.get('matmul') or {}).get('tflops'))} "
                f"TFLOP/s")
    if "tests" in res:
        c = res["tests"]["counts"]
        s = f"{c['passed']} passed, {c['failed']} failed, {c['errors']} errors, {c['skipped']} skipped"
        if res["tests"].get("partial"):
            s += " (from the log: cut off)"
        return s
    if name == "accuracy":
        rows = r.get("rows", [])
        bad = [x for x in rows if not x["within_test_criterion"]]
        worst = max(rows, key=lambda x: x["rel_err"] / x["test_tolerance"], default=None)
        s = f"{len(rows)} outputs, {len(bad)} outside the CPU tests' criterion"
        if worst:
            s += (f"; worst {worst['op']} {worst['shape']} {worst['dtype']} {worst['output']}: "
                  f"{worst['rel_err']:.2e} (tolerance {worst['test_tolerance']:.1e})")
        return s
    if name == "train_step":
        rows = {x["provider"]: x for x in r.get("rows", [])}
        parts = [f"{p} {x['samples_per_s']:.1f} samples/s" + (f", {x['peak_mem_bytes'] / 2**30:.2f} GiB"
                                                               if "peak_mem_bytes" in x else "")
                 for p, x in rows.items()]
        if "speedup_fused_vs_reference" in r:
            parts.append(f"fused {r['speedup_fused_vs_reference']:.2f}x reference")
        if "softmask_share_by_ablation" in r:
            parts.append(f"soft-mask branch {100 * r['softmask_share_by_ablation']:.0f} % of a step (ablation)")
        return "; ".join(parts)
    if name == "default_job":
        if "partial" in res:
            return f"cut off at step {res['partial']['last_step']}"
        ev = r.get("eval") or {}
        keys = [k for k in ev if isinstance(ev[k], (int, float))][:6]
        return (f"{_fmt(r.get('wall_s'), '.1f')} s for {r.get('steps')} steps; "
                + ", ".join(f"{k} {ev[k]:.3g}" for k in keys))
    if name == "torchrun":
        pg = r.get("process_group", {})
        d = (r.get("ddp_steps") or {}).get("max_abs_diff")
        t = (r.get("train_runs") or {}).get("max_abs_diff")
        return (f"{pg.get('backend')} world {pg.get('world')}, collectives "
                f"{'ok' if r.get('collectives_ok') else 'not checked' if 'collectives_ok' not in r else 'WRONG'}; "
                f"DDP vs plain loss diff {_fmt(d)}; training run vs plain {_fmt(t)}")
    return ""


def summarize(out: str) -> dict:
    """``summary.json`` and ``summary.md`` from the step files present in ``out``."""
    results = [r for r in (_read_json(os.path.join(out, s + ".json")) for s in STEP_NAMES) if r]
    dev = next((r for r in results if r["step"] == "device"), None)
    facts = ((dev or {}).get("result") or {}).get("facts", {})
    copy_gbps = (((dev or {}).get("result") or {}).get("copy") or {}).get("gbps")
    md = [f"# GPU check: {facts.get('device', 'unknown device')}", "",
          f"Commit `{facts.get('commit', '')[:10]}`, torch {facts.get('torch')}, triton {facts.get('triton')}, "
          f"CUDA {facts.get('cuda')}. Dry run: {any(r.get('dry_run') for r in results)}. "
          f"Every figure below was measured on this device by `python -m benchmarks.gpu_check`.", "",
          "| step | status | s (budget) | key figures |", "|---|---|---|---|"]
    for r in results:
        md.append(f"| {r['step']} | {r['status']} | {r['seconds']:.0f} ({r['budget_s']:.0f}) | "
                  f"{_key_figures(r, out, facts).replace('|', '/')} |")
    not_run = [s for s in STEP_NAMES if s not in {r["step"] for r in results}]
    if not_run:
        md += ["", "Not run: " + ", ".join(not_run)]
    goal_lines, tables, readme = [], [], []
    for r in results:
        if r["step"].startswith("bench") and r.get("bench_json"):
            paths = [r["bench_json"]] if isinstance(r["bench_json"], str) else r["bench_json"]
            rows = [row for p in paths for row in _bench_rows(os.path.join(out, p))]
            lines, goals = _bench_figures(rows, copy_gbps, readme)
            if rows:
                tables += ["", f"### {r['step']}", ""] + lines
            goal_lines += goals
        if r["step"] == "train_step":
            x = r.get("result") or {}
            if "speedup_fused_vs_reference" in x:
                s, g = x["speedup_fused_vs_reference"], GOALS["train_step"]
                goal_lines.append(f"- train step: fused {s:.2f}x reference (goal >= {g['speedup']}: "
                                  f"{'met' if s >= g['speedup'] else 'MISSED'})")
            if "softmask_share_by_ablation" in x:
                s = x["softmask_share_by_ablation"]
                goal_lines.append(f"- train step: soft-mask branch {100 * s:.0f} % of a step by ablation (goal <= "
                                  f"{100 * GOALS['train_step']['softmask_share']:.0f} %: "
                                  f"{'met' if s <= GOALS['train_step']['softmask_share'] else 'MISSED'})")
        if r["step"] == "default_job" and r["status"] == "ok":
            w = (r.get("result") or {}).get("wall_s")
            if w is not None:
                goal_lines.append(f"- default job: {w:.1f} s (goal < {GOALS['default_job_s']:.0f} s: "
                                  f"{'met' if w < GOALS['default_job_s'] else 'MISSED'})")
    if goal_lines:
        md += ["", "## Goals of issue 30", ""] + goal_lines
    if readme:
        md += ["", f"## README rows ({facts.get('device', 'unknown device')}, forward + backward, medians)", "",
               "| op | shape | dtype | fused ms | x eager | x compile | x open_clip | eager / fused memory | "
               "fused TFLOP/s | fused bytes / copy GB/s |", "|---|---|---|---|---|---|---|---|---|---|"] + readme
    acc = next((r for r in results if r["step"] == "accuracy"), None)
    if acc and (acc.get("result") or {}).get("rows"):
        md += ["", "## Accuracy against float64 (max |err| / max |truth|)", "",
               "| op | shape | dtype | output | fused | eager same dtype | CPU tests' tolerance | within |",
               "|---|---|---|---|---|---|---|---|"]
        for x in acc["result"]["rows"]:
            md.append(f"| {x['op']} | {x['shape']} | {x['dtype']} | {x['output']} | {x['rel_err']:.2e} | "
                      f"{x['eager_same_dtype_rel_err']:.2e} | {x['test_tolerance']:.1e} | "
                      f"{'yes' if x['within_test_criterion'] else 'NO'} |")
    if tables:
        md += ["", "## Benchmarks (forward + backward where mode is full)"] + tables
    ts = next((r for r in results if r["step"] == "train_step"), None)
    prof = ((ts or {}).get("result") or {}).get("profile")
    if prof:
        md += ["", f"## Profile of one fused training step ({prof['device_time_per_step_ms']:.2f} ms of device time "
                   f"per step)", ""]
        for label in ("softmask:gradcam_inputs", "softmask:text_driven_soft_mask"):
            if label in prof:
                md.append(f"- `{label}` range: {prof[label]['ms_per_step']:.2f} ms per step "
                          f"({100 * prof[label]['share']:.0f} % of the step's device time)")
        md += ["", "| kernel | ms per step | share | calls |", "|---|---|---|---|"]
        for k in prof["top"]:
            md.append(f"| `{k['name']}` | {k['ms_per_step']:.3f} | {100 * k['share']:.1f} % | {k['calls']} |")
    failing = [r for r in results if r["status"] != "ok"]
    if failing:
        md += ["", "## Steps that did not pass", ""]
        for r in failing:
            md.append(f"### {r['step']}: {r['status']} (rc {r['returncode']})")
            fails = (r.get("tests") or {}).get("failures") or []
            for f in fails[:10]:
                md.append(f"- `{f['test']}`: {f['message'][:300]}")
            if r.get("log_tail"):
                md += ["", "```", r["log_tail"][-1500:], "```"]
    summary = dict(device=facts, steps=results, not_run=not_run, goals=goal_lines)
    _write_json(os.path.join(out, "summary.json"), summary)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    return summary


BUNDLE_MAX_FILE = 4 << 20  # bytes: larger files (checkpoints) stay out of the bundle


def bundle(out: str, path: str) -> None:
    """All of ``out`` in one .tar.gz (the device tool brings back at most 8 files, 16 MiB
    each), less checkpoints and files over 4 MiB, which ``bundle_left_out.txt`` lists."""
    left_out = []

    def keep(info):
        if info.isfile() and (info.size > BUNDLE_MAX_FILE or "/checkpoints/" in info.name
                              or info.name.endswith((".safetensors", ".pt", ".bin"))):
            left_out.append(f"{info.name} ({info.size} bytes)")
            return None
        return info

    tmp = path + ".tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(out, arcname=os.path.basename(os.path.normpath(out)) or "gpu_check", filter=keep)
        if left_out:
            data = ("\n".join(left_out) + "\n").encode()
            info = tarfile.TarInfo(os.path.join(os.path.basename(os.path.normpath(out)), "bundle_left_out.txt"))
            info.size = len(data)
            import io

            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)
    md = os.path.join(out, "summary.md")
    if os.path.exists(md):
        shutil.copyfile(md, os.path.join(os.path.dirname(os.path.abspath(path)), "summary.md"))


def collect(out: str, results: str) -> str:
    """Copy the bench JSON files of ``out`` into ``results/<device slug>/`` and render
    ``results/README.md`` with :mod:`benchmarks.render`. Returns the folder."""
    dev = _read_json(os.path.join(out, "device.json")) or {}
    slug = ((dev.get("result") or {}).get("facts") or {}).get("slug") or "unknown-device"
    dest = os.path.join(results, slug)
    os.makedirs(dest, exist_ok=True)
    for path in glob.glob(os.path.join(out, "bench", "*.json")):
        shutil.copyfile(path, os.path.join(dest, os.path.basename(path)))
    for name in ("summary.md", "summary.json"):
        if os.path.exists(os.path.join(out, name)):
            shutil.copyfile(os.path.join(out, name), os.path.join(dest, "gpu_check_" + name))
    from benchmarks import render

    render.main(["--results", results])
    return dest


# --------------------------------------------------------------------------- command line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required="--list" not in (sys.argv[1:] if argv is None else argv),
                        help="folder for every result (created)")
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU (Triton interpreted)")
    parser.add_argument("--only", action="append", default=[], choices=STEP_NAMES, metavar="STEP",
                        help="run only this step (repeatable); the others' results in --out are kept")
    parser.add_argument("--skip", action="append", default=[], choices=STEP_NAMES, metavar="STEP")
    parser.add_argument("--total-budget", type=float, default=None,
                        help=f"seconds for all steps together (default {TOTAL_BUDGET:.0f}; dry run: no limit)")
    parser.add_argument("--bundle", help="write all of --out into this .tar.gz after every step")
    parser.add_argument("--summarize", action="store_true", help="only rebuild summary.md / summary.json")
    parser.add_argument("--collect", metavar="RESULTS", help="copy bench JSON into RESULTS/<device>/ and render")
    parser.add_argument("--jobs", type=int, default=1,
                        help="dry run only: steps run this many at a time (the CI test uses 2)")
    parser.add_argument("--allow-no-gpu", action="store_true", help="run the full sizes without a GPU")
    parser.add_argument("--list", action="store_true", help="print the steps and their budgets")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.list:
        for s in STEPS:
            print(f"{s.name:24s} {s.budget:5.0f} s (dry {s.dry_budget:3.0f} s)  {s.what}")
        print(f"{'total':24s} {sum(s.budget for s in STEPS):5.0f} s")
        return 0
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    if args.worker:
        WORKERS[args.worker](Recorder(os.path.join(out, args.worker + ".result.json")), args.dry_run)
        return 0
    if args.collect:
        print(collect(out, args.collect))
        return 0
    if args.jobs > 1 and not args.dry_run:
        parser.error("--jobs: only with --dry-run (GPU timings need the machine to themselves)")
    if not (args.dry_run or args.summarize or args.allow_no_gpu or os.path.exists("/dev/nvidiactl")
            or shutil.which("nvidia-smi")):
        parser.error("no NVIDIA GPU here (no /dev/nvidiactl, no nvidia-smi): use --dry-run for the CPU rehearsal, "
                     "or --allow-no-gpu to run the full sizes anyway")
    if not args.summarize:
        steps = [s for s in STEPS if (not args.only or s.name in args.only) and s.name not in args.skip]
        total = args.total_budget if args.total_budget is not None else (None if args.dry_run else TOTAL_BUDGET)
        deadline = None if total is None else time.perf_counter() + total
        lock = threading.Lock()

        def one(step):
            budget = step.dry_budget if args.dry_run else step.budget
            if deadline is not None:
                budget = min(budget, deadline - time.perf_counter())
            if budget < 3:
                res = dict(step=step.name, what=step.what, status="not run (total budget spent)", seconds=0.0,
                           budget_s=0.0, returncode=None, dry_run=args.dry_run)
            else:
                print(f"[gpu_check] {step.name}: budget {budget:.0f} s", flush=True)
                res = run_step(step, out, args.dry_run, budget)
            with lock:
                _write_json(os.path.join(out, step.name + ".json"), res)
                print(f"[gpu_check] {step.name}: {res['status']} in {res['seconds']:.1f} s", flush=True)
                summarize(out)
                if args.bundle:
                    bundle(out, args.bundle)

        if args.jobs > 1:  # the longest first, so that the workers end together
            import concurrent.futures as cf

            with cf.ThreadPoolExecutor(args.jobs) as pool:
                list(pool.map(one, sorted(steps, key=lambda s: -s.dry_budget)))
        else:
            for step in steps:
                one(step)
    summary = summarize(out)
    if args.bundle:
        bundle(out, args.bundle)
    with open(os.path.join(out, "summary.md")) as f:
        print(f.read())
    return 0 if all(r["status"] == "ok" for r in summary["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
