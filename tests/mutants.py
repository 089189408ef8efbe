"""Mutation check of the test suite (issue 14): ``python -m tests.mutants``.

Applies deliberate faults, one at a time, to a *copy* of the package (``softmask/``,
``tests/``, ``conftest.py`` and ``pyproject.toml`` copied into a temporary directory,
which goes first on ``PYTHONPATH``; the real tree is never modified), runs the tests
that should notice each fault (``pytest -x`` on a small selection) and prints, per
fault, whether the suite caught it. Exit status 0 only when every fault was caught.

A fault is applied by exact-string replacement. When its target string is not found
exactly once (the code was rewritten since the fault was written), the fault is
reported as ``NOT APPLICABLE`` and counts as a failure of this tool: update the
fault, do not drop it.

Usage::

    python -m tests.mutants                 # all faults, on the working tree
    python -m tests.mutants --rev HEAD      # on a committed revision (git archive)
    python -m tests.mutants --list          # the faults and their test selections
    python -m tests.mutants --only NAME ... # some faults (names from --list)
    python -m tests.mutants --baseline      # first check that the selections pass unmutated

Not part of the default test run (this file is not named ``test_*.py``). It takes a
few minutes on a 2-core CPU: every fault costs one pytest process (about 7 s of
imports) plus its tests, which run until the first failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COPIED = ("softmask", "tests", "conftest.py", "pyproject.toml")

# Test selections (pytest arguments after ``-x -q``).
FOCAL_TRITON = ["tests/test_focal_itc.py", "-k", "albef_mode_grid and triton and 0.07"]
FOCAL_TORCH = ["tests/test_focal_itc.py", "-k", "albef_mode_grid and torch and 0.07"]
# The focal reference is the ground truth of the tests above, so a fault in it fails
# them trivially; these selections hold only the tests that check the reference itself
# against independently written math.
FOCAL_REFERENCE = ["tests/test_focal_itc.py", "-k", "reference and not triton and not torch_backend"]
# the torch backend's tiled CLIP and one-hot paths (issue 27), on tiles small enough to cross every boundary
CLIP_TORCH = ["tests/test_focal_itc_clip.py", "-k", "torch_clip_tiles and dtype1"]  # dtype1: float32
ONEHOT_TORCH = ["tests/test_focal_itc_clip.py", "-k", "torch_onehot_tiles and dtype0"]  # dtype0: float32
MASK_TRITON = ["tests/test_soft_mask.py", "-k", "matches_eager_autograd and triton and float32"]
MASK_TORCH = ["tests/test_soft_mask.py", "-k", "matches_eager_autograd and torch and float32"]
MASK_REFERENCE = ["tests/test_soft_mask.py", "-k", "albef_hooks or without_same_dtype_term or soft_mask_from_cam_random "
                  "or (matches_eager_autograd and reference and float64)"]


@dataclasses.dataclass(frozen=True)
class Fault:
    name: str
    op: str  # "focal_itc" or "soft_mask"
    backend: str  # "triton", "torch" or "reference"
    path: str  # file relative to the repository root
    old: str  # exact text replaced (must occur exactly once)
    new: str
    tests: Sequence[str]
    what: str


FK = "softmask/kernels/focal_itc.py"
FO = "softmask/ops/focal_itc.py"
SK = "softmask/kernels/soft_mask.py"
SO = "softmask/ops/soft_mask.py"
REF = "softmask/reference.py"

FAULTS: List[Fault] = [
    # ------------------------------------------------------------------ focal ITC
    Fault("focal-exponent-triton", "focal_itc", "triton", FK,
          "t = tl.where(pos, tl.exp(gamma * tl.log(safe_om))",
          "t = tl.where(pos, tl.exp(1.03 * gamma * tl.log(safe_om))",
          FOCAL_TRITON, "(1-p)^gamma computed as (1-p)^(1.03 gamma)"),
    Fault("focal-grad-term-triton", "focal_itc", "triton", FK,
          "g = t * (1.0 - gamma * p * ratio)",
          "g = t * (1.0 - 1.03 * gamma * p * ratio)",
          FOCAL_TRITON, "the -gamma (1-p)^(gamma-1) p log p gradient term 3 % too large"),
    Fault("distill-target-mass-triton", "focal_itc", "triton", FK,
          "tgt = tl.where(cols[None, :] == rows[:, None] + pos_offset, tgt + (1.0 - alpha), tgt)",
          "tgt = tl.where(cols[None, :] == rows[:, None] + pos_offset, tgt + 0.97 * (1.0 - alpha), tgt)",
          FOCAL_TRITON, "one-hot part of the distillation targets 3 % too small"),
    Fault("temperature-grad-sign-triton", "focal_itc", "triton", FK,
          "tl.store(DTAU + rows, -inv_tau * (s_row * pz - qgz), mask=first)",
          "tl.store(DTAU + rows, inv_tau * (s_row * pz - qgz), mask=first)",
          FOCAL_TRITON, "dL/dtau with the wrong sign"),
    Fault("focal-exponent-torch", "focal_itc", "torch", FO,
          "        t.pow_(gamma)\n",
          "        t.pow_(1.03 * gamma)\n",
          FOCAL_TORCH, "(1-p)^gamma computed as (1-p)^(1.03 gamma)"),
    Fault("focal-grad-term-torch", "focal_itc", "torch", FO,
          "g.mul_(p).mul_(-gamma * LN2)",
          "g.mul_(p).mul_(-1.03 * gamma * LN2)",
          FOCAL_TORCH, "the -gamma (1-p)^(gamma-1) p log p gradient term 3 % too large"),
    Fault("distill-target-mass-torch", "focal_itc", "torch", FO,
          "tgt[di, di + (r0 + off - c0)] += 1.0 - alpha",
          "tgt[di, di + (r0 + off - c0)] += 0.97 * (1.0 - alpha)",
          FOCAL_TORCH, "one-hot part of the distillation targets 3 % too small"),
    Fault("temperature-grad-sign-torch", "focal_itc", "torch", FO,
          "dtau[r0:r1] = dt.mul_(-LN2 * inv_tau)",
          "dtau[r0:r1] = dt.mul_(LN2 * inv_tau)",
          FOCAL_TORCH, "dL/dtau with the wrong sign"),
    Fault("focal-exponent-reference", "focal_itc", "reference", REF,
          "return -(targets * om.pow(gamma) * logp).sum(dim=1)",
          "return -(targets * om.pow(1.03 * gamma) * logp).sum(dim=1)",
          FOCAL_REFERENCE, "the oracle's (1-p)^gamma computed as (1-p)^(1.03 gamma)"),
    Fault("distill-target-mass-reference", "focal_itc", "reference", REF,
          "targets = alpha * soft + (1.0 - alpha) * targets",
          "targets = alpha * soft + 0.97 * (1.0 - alpha) * targets",
          FOCAL_REFERENCE, "the oracle's one-hot target part 3 % too small"),
    Fault("clip-column-rescale-torch", "focal_itc", "torch", FO,
          "sc[c0:c1] = sc[c0:c1].mul_(fc).add_(e.sum(0))",
          "sc[c0:c1] = sc[c0:c1].add_(e.sum(0))",
          CLIP_TORCH, "CLIP mode: text-to-image's online sum not rescaled when a column's max grows"),
    Fault("clip-temperature-grad-sign-torch", "focal_itc", "torch", FO,
          "d_tau = torch.linalg.vecdot(img.to(acc), d_img).sum().mul_(-inv_tau)",
          "d_tau = torch.linalg.vecdot(img.to(acc), d_img).sum().mul_(inv_tau)",
          CLIP_TORCH, "CLIP mode: dL/dtau with the wrong sign"),
    Fault("onehot-temperature-grad-sign-torch", "focal_itc", "torch", FO,
          "dtau[r0:r1] = (g_ii * pz2 - g_ii * z_ii).mul_(-LN2 * inv_tau)",
          "dtau[r0:r1] = (g_ii * pz2 - g_ii * z_ii).mul_(LN2 * inv_tau)",
          ONEHOT_TORCH, "alpha = 0 with key banks, tiled: dL/dtau with the wrong sign"),
    # ------------------------------------------------------------------ soft mask
    Fault("relu-removed-triton", "soft_mask", "triton", SK,
          "c = tl.where(valid, (e * inv_l) * tl.maximum(da, 0.0), 0.0) + bad",
          "c = tl.where(valid, (e * inv_l) * da, 0.0) + bad",
          MASK_TRITON, "attention gradient not clamped at 0 (keys in one block)"),
    Fault("relu-removed-triton-blocked", "soft_mask", "triton", SK,
          "c = tl.where(valid, (tl.exp(s - m) * inv_l) * tl.maximum(da, 0.0), 0.0) + bad",
          "c = tl.where(valid, (tl.exp(s - m) * inv_l) * da, 0.0) + bad",
          MASK_TRITON, "attention gradient not clamped at 0 (keys over several blocks)"),
    Fault("head-count-triton", "soft_mask", "triton", SK,
          "cam = acc / H\n        valid = n_ok & (offs_n0 >= 1)",
          "cam = acc / (H + 1)\n        valid = n_ok & (offs_n0 >= 1)",
          MASK_TRITON, "mean over heads divides by H + 1"),
    Fault("floor-ignored-triton", "soft_mask", "triton", SK,
          "omf_hi, omf_lo = split_f32(1.0 - floor)",
          "omf_hi, omf_lo = split_f32(1.0)",
          MASK_TRITON, "mask floor ignored (as if 0)"),
    Fault("word-row-off-by-one-triton", "soft_mask", "triton", SK,
          "w = tl.where(w_ok, w, 0)\n    offs_d = tl.arange(0, BLOCK_D)",
          "w = tl.where(w_ok, (w + 1) % T, 0)\n    offs_d = tl.arange(0, BLOCK_D)",
          MASK_TRITON, "Grad-CAM of the word after the chosen one"),
    Fault("padded-keys-in-minmax-triton", "soft_mask", "triton", SK,
          "        valid = n_ok & (offs_n0 >= 1)\n        if HAS_KPM:\n"
          "            valid = valid & (tl.load(kpm_ptr + b * stride_mb + offs_n0 * stride_mn, mask=n_ok, other=0) != 0)\n",
          "        valid = n_ok & (offs_n0 >= 1)\n",
          MASK_TRITON, "padded keys take part in the min-max normalization"),
    Fault("relu-removed-torch", "soft_mask", "torch", SO,
          "p.mul_(da.clamp_min_(0))",
          "p.mul_(da)",
          MASK_TORCH, "attention gradient not clamped at 0"),
    Fault("head-count-torch", "soft_mask", "torch", SO,
          "torch.mean(p, dim=1, out=cam[b0:b1])",
          "torch.div(p.sum(dim=1), p.shape[1] + 1, out=cam[b0:b1])",
          MASK_TORCH, "mean over heads divides by H + 1"),
    Fault("padded-keys-in-minmax-torch", "soft_mask", "torch", SO,
          "    if key_padding_mask is not None:\n        valid &= key_padding_mask\n    valid[:, 0] = False\n"
          "    lo = torch.where(valid, cam, float(\"inf\"))",
          "    valid[:, 0] = False\n    lo = torch.where(valid, cam, float(\"inf\"))",
          MASK_TORCH, "padded keys take part in the min-max normalization"),
    Fault("word-row-off-by-one-torch", "soft_mask", "torch", SO,
          "idx = word_index.to(torch.int64).view(B, 1, 1, 1).expand(B, H, 1, dh)",
          "idx = ((word_index.to(torch.int64) + 1) % x.shape[2]).view(B, 1, 1, 1).expand(B, H, 1, dh)",
          MASK_TORCH, "Grad-CAM of the word after the chosen one"),
    Fault("mask-not-in-backward", "soft_mask", "torch", SO,
          "return _apply_soft_mask_op(grad_out, mask, ctx.backend), None, None",
          "return grad_out, None, None",
          MASK_TORCH, "d image_embeds = d out (the mask left out of the backward)"),
    Fault("relu-removed-reference", "soft_mask", "reference", REF,
          "return (a * g.clamp_min(0)).mean(dim=1)",
          "return (a * g).mean(dim=1)",
          MASK_REFERENCE, "the oracle's attention gradient not clamped at 0"),
    Fault("head-count-reference", "soft_mask", "reference", REF,
          "return (a * g.clamp_min(0)).mean(dim=1)",
          "return (a * g.clamp_min(0)).sum(dim=1) / (H + 1)",
          MASK_REFERENCE, "the oracle's mean over heads divides by H + 1"),
    Fault("floor-ignored-reference", "soft_mask", "reference", REF,
          "return 1.0 - (1.0 - floor) * c",
          "return 1.0 - c",
          MASK_REFERENCE, "the oracle's mask floor ignored"),
    Fault("padded-keys-in-minmax-reference", "soft_mask", "reference", REF,
          "    if key_padding_mask is not None:\n        valid &= key_padding_mask\n    valid[:, 0] = False\n"
          "    big = torch.finfo(cam.dtype).max",
          "    valid[:, 0] = False\n    big = torch.finfo(cam.dtype).max",
          MASK_REFERENCE, "the oracle's min-max includes padded keys"),
    Fault("word-row-off-by-one-reference", "soft_mask", "reference", REF,
          "idx = word_index.long().view(B, 1, 1, 1).expand(B, H, 1, N)",
          "idx = ((word_index.long() + 1) % T).view(B, 1, 1, 1).expand(B, H, 1, N)",
          MASK_REFERENCE, "the oracle reads the word after the chosen one"),
]


@dataclasses.dataclass
class Result:
    fault: Fault
    status: str  # "caught", "SURVIVED", "NOT APPLICABLE", "ERROR"
    detail: str
    seconds: float


def _copy_tree(dst: str, rev: Optional[str]) -> None:
    """The package, the tests, conftest.py and pyproject.toml, from the working tree or a revision."""
    if rev is None:
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
        for name in COPIED:
            src = os.path.join(ROOT, name)
            if os.path.isdir(src):
                shutil.copytree(src, os.path.join(dst, name), ignore=ignore)
            else:
                shutil.copy2(src, os.path.join(dst, name))
        return
    archive = subprocess.run(["git", "-C", ROOT, "archive", "--format=tar", rev, *COPIED], capture_output=True,
                             check=False)
    if archive.returncode != 0:
        raise SystemExit(f"mutants: git archive {rev} failed: {archive.stderr.decode(errors='replace').strip()}")
    os.makedirs(dst, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", dst], input=archive.stdout, check=True)


def _env(copy_dir: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([copy_dir] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _check_imports_copy(copy_dir: str, timeout: float) -> None:
    try:
        out = subprocess.run([sys.executable, "-c", "import softmask, os; print(os.path.realpath(softmask.__file__))"],
                             cwd=copy_dir, env=_env(copy_dir), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"mutants: importing the copy took more than {timeout:.0f} s (a busy machine?); "
                         f"nothing was checked") from None
    got = out.stdout.strip()
    want = os.path.realpath(os.path.join(copy_dir, "softmask", "__init__.py"))
    if got != want:
        raise SystemExit(f"mutants: the copy is not what Python imports (expected {want}, got {got!r}; "
                         f"stderr: {out.stderr[-2000:]})")


def _pytest(copy_dir: str, selection: Sequence[str], timeout: float):
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *selection]
    try:
        return subprocess.run(cmd, cwd=copy_dir, env=_env(copy_dir), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def _summary_line(stdout: str) -> str:
    lines = [ln for ln in stdout.strip().splitlines() if ln.strip()]
    failed = [ln for ln in lines if ln.startswith("FAILED") or ln.startswith("ERROR")]
    return (failed[0] if failed else (lines[-1] if lines else ""))[:160]


def run_fault(fault: Fault, base_dir: str, timeout: float) -> Result:
    t0 = time.perf_counter()
    work = os.path.join(base_dir, fault.name)
    shutil.copytree(os.path.join(base_dir, "_pristine"), work)
    path = os.path.join(work, fault.path)
    with open(path) as f:
        text = f.read()
    n = text.count(fault.old)
    if n != 1:
        why = "pattern not found" if n == 0 else f"pattern found {n} times"
        shutil.rmtree(work, ignore_errors=True)
        return Result(fault, "NOT APPLICABLE", f"mutant not applicable: {why} in {fault.path}", 0.0)
    with open(path, "w") as f:
        f.write(text.replace(fault.old, fault.new))
    res = _pytest(work, fault.tests, timeout)
    dt = time.perf_counter() - t0
    shutil.rmtree(work, ignore_errors=True)
    if res is None:
        return Result(fault, "ERROR", f"tests ran past {timeout:.0f} s", dt)
    if res.returncode == 1:  # some test failed: the fault was noticed
        return Result(fault, "caught", _summary_line(res.stdout), dt)
    if res.returncode == 0:
        return Result(fault, "SURVIVED", _summary_line(res.stdout), dt)
    if res.returncode == 5:
        return Result(fault, "ERROR", "no tests selected: " + " ".join(fault.tests), dt)
    return Result(fault, "ERROR", f"pytest exit status {res.returncode}: "
                  + (_summary_line(res.stdout) or res.stderr.strip()[-160:]), dt)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.mutants", description=__doc__.splitlines()[0])
    p.add_argument("--rev", default=None, help="test a committed revision (git archive) instead of the working tree")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME", help="run only these faults")
    p.add_argument("--list", action="store_true", help="list the faults and exit")
    p.add_argument("--baseline", action="store_true",
                   help="first run every selection on the unmutated copy; stop if one fails")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per fault (default 900)")
    a = p.parse_args(argv)

    faults = FAULTS
    if a.only:
        unknown = sorted(set(a.only) - {f.name for f in FAULTS})
        if unknown:
            p.error(f"--only: unknown fault(s) {unknown}; expected names from --list")
        faults = [f for f in FAULTS if f.name in a.only]
    if a.list:
        for f in faults:
            print(f"{f.name:34s} {f.op:9s} {f.backend:9s} {f.what}\n{'':34s} tests: {' '.join(f.tests)}")
        return 0

    with tempfile.TemporaryDirectory(prefix="softmask-mutants-") as tmp:
        pristine = os.path.join(tmp, "_pristine")
        os.makedirs(pristine)
        _copy_tree(pristine, a.rev)
        _check_imports_copy(pristine, a.timeout)
        source = f"revision {a.rev}" if a.rev else f"working tree {ROOT}"
        print(f"mutants: {len(faults)} faults on a copy of the {source}", flush=True)
        if a.baseline:
            for sel in dict.fromkeys(tuple(f.tests) for f in faults):
                res = _pytest(pristine, sel, a.timeout)
                if res is None or res.returncode != 0:
                    print(f"mutants: baseline failed for {' '.join(sel)}: "
                          f"{'timeout' if res is None else _summary_line(res.stdout)}")
                    return 2
            print("mutants: baseline passes", flush=True)
        results = []
        for f in faults:
            r = run_fault(f, tmp, a.timeout)
            results.append(r)
            print(f"  {r.status:14s} {f.name:34s} {r.seconds:6.1f} s  {r.detail}", flush=True)

    w = max(len(f.name) for f in faults)
    print()
    print(f"| {'fault':{w}s} | op        | backend   | result         |   time |")
    print(f"|{'-' * (w + 2)}|-----------|-----------|----------------|--------|")
    for r in results:
        f = r.fault
        print(f"| {f.name:{w}s} | {f.op:9s} | {f.backend:9s} | {r.status:14s} | {r.seconds:5.1f}s |")
    bad = [r for r in results if r.status != "caught"]
    print(f"\n{len(results) - len(bad)}/{len(results)} faults caught")
    for r in bad:
        print(f"  {r.status}: {r.fault.name}: {r.detail}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
