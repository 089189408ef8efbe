"""Compile the Triton kernel configurations the launchers pick for a Hopper GPU (sm_90)
without a GPU, with Triton's own ptxas, and report shared memory, registers and spills
per configuration as JSON lines (one per configuration, in a fixed order).

Run without TRITON_INTERPRET (the interpreter replaces ``@triton.jit`` functions)::

    python -m tests.compile_kernels                  # the configurations users run (below)
    python -m tests.compile_kernels --only focal_itc_sweep1   # one kernel family (any substring)
    python -m tests.compile_kernels --all            # every tile, dtype and D the launchers can pick
    python -m tests.compile_kernels --summary        # plus a table of the spills at the end (stderr)

The default set is what the ops run at the shapes users have: focal ITC at D = 256
(ALBEF) and D = 512 (CLIP ViT-B) in bfloat16, float16 and float32, every tile candidate
of :func:`softmask.kernels.focal_itc._tile_candidates` and every structural flag (momentum
targets, ids, one or two key-bank parts); the soft-mask kernels at ALBEF's head size 64
in every dtype. ``--all`` adds float64 and every power-of-two D from 16 to ``MAX_D``
(~760 configurations; float64 at D = 1024 alone takes minutes per kernel).

Cost: each configuration is one Triton compilation (Python front end, LLVM, ptxas), one
to several seconds of one core. Configurations compile in a process pool (``--jobs``,
default one per core); Triton's cache keeps the compiled kernels, and the ptxas statistics
of each compiled kernel (keyed by Triton's hash of it) are kept in
``<triton cache>/softmask_ptxas_stats.json``, so a rerun of unchanged kernels costs only
the front end. The statistics come from Triton's own ptxas run (``dump_ptxas_log``; same
flags as the kernels that run), or where Triton's cache answered without running ptxas,
from ptxas run here with Triton's flags.

``tests/test_gpu_compile.py`` runs a few configurations and asserts the default set's
spill-free ones stay spill-free.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import io
import itertools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time

TL_TYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}
DEFAULT_DTYPES = ("bfloat16", "float16", "float32")
ALL_DTYPES = ("bfloat16", "float16", "float32", "float64")
DEFAULT_FOCAL_D = (256, 512)  # ALBEF's ITC embedding, CLIP ViT-B/16's
SHARED_LIMIT = 227 * 1024  # sm_90's shared memory per block


def _i32(*names):
    return {n: "i32" for n in names}


# --------------------------------------------------------------------------- configurations
# Each spec: (name, (module, kernel attribute), argument types, constexprs, launch options).


def focal_itc_specs(exhaustive: bool = False):
    """Every tile configuration ``_tile_candidates`` returns for each dtype and BLOCK_D,
    for each kernel of the op and each value of its structural flags."""
    import torch

    from softmask.kernels import focal_itc as fk

    mod = "softmask.kernels.focal_itc"
    key_strides = ("stride_k0n", "stride_k0d", "stride_k1n", "stride_k1d")
    id_ptrs = dict(RID="*i64", KID0="*i64", KID1="*i64")
    id_strides = ("stride_rid", "stride_kid0", "stride_kid1")
    # Names of the configurations with ids carry " ids=True" before " parts=": the names
    # without it are those of the configurations without ids (as before ids existed).
    ids_tag = lambda ids: " ids=True" if ids else ""  # noqa: E731
    dtypes = ALL_DTYPES if exhaustive else DEFAULT_DTYPES
    block_ds = [1 << e for e in range(4, (fk.MAX_D - 1).bit_length() + 1)] if exhaustive else DEFAULT_FOCAL_D
    for dname in dtypes:
        dtype = getattr(torch, dname)
        ty = TL_TYPES[dname]
        ptr = "*" + ty
        acc = "*fp64" if dname == "float64" else "*fp32"
        flags = fk._flags(dtype)
        for D in block_ds:
            seen = set()
            for two, ids, has_targets in itertools.product((False, True), (False, True), (True, False)):
                for blocks, launch in fk._tile_candidates(D, dtype, has_targets, ids):
                    tile = f"{ty} D={D} {blocks['BLOCK_M']}x{blocks['BLOCK_N']}"
                    types = dict(Q=ptr, QM=ptr, K0=ptr, K1=ptr, TAU="*fp32", PSTAT=acc, PACC=acc, **id_ptrs)
                    types.update(_i32("B", "N", "N0", "D", "keys_per_split", "pos_offset", "stride_qb", "stride_qd",
                                      "stride_qmb", "stride_qmd", *key_strides, *id_strides, "stride_pstat",
                                      "stride_ps", "stride_pas", "stride_pab"))
                    # With the momentum log-sum-exp apart (fk._momentum_lse_apart) the launcher runs
                    # sweep 1 without targets, twice; the configuration with targets is compiled
                    # for the record but never launched.
                    apart = has_targets and fk._momentum_lse_apart(dtype, blocks, launch)
                    name = f"focal_itc_sweep1 {tile} targets={has_targets}{ids_tag(ids)} parts={2 if two else 1}"
                    if name not in seen:
                        seen.add(name)
                        yield (name, (mod, "_focal_itc_sweep1_kernel"), types,
                               dict(HAS_TARGETS=has_targets, HAS_IDS=ids, TWO_PARTS=two, **flags, **blocks),
                               fk._sweep_launch(launch, blocks, dtype, 1, has_targets, ids), not apart)
                    # Sweep 2 runs with momentum targets, with ids, or both.
                    if not (has_targets or ids):
                        continue
                    types = dict(Q=ptr, QM=ptr, K0=ptr, K1=ptr, TAU="*fp32", PSTAT=acc, P2STAT=acc, P2ACC=acc,
                                 **id_ptrs)
                    types.update(_i32("B", "N", "N0", "D", "keys_per_split", "n_splits", "pos_offset", "stride_qb",
                                      "stride_qd", "stride_qmb", "stride_qmd", *key_strides, *id_strides,
                                      "stride_pstat", "stride_ps", "stride_pas", "stride_pab"))
                    types.update({n: "fp32" for n in ("gamma_hi", "gamma_lo", "alpha_hi", "alpha_lo")})
                    tag = ("" if has_targets else " targets=False") + ids_tag(ids)
                    name = f"focal_itc_sweep2 {tile}{tag} parts={2 if two else 1}"
                    if name not in seen:
                        seen.add(name)
                        yield (name, (mod, "_focal_itc_sweep2_kernel"), types,
                               dict(HAS_MOMENTUM=has_targets, HAS_IDS=ids, TWO_PARTS=two, **flags, **blocks),
                               fk._sweep_launch(launch, blocks, dtype, 2, has_targets, ids), True)
            blocks, launch = fk._key_grad_plan(1 << 20, 1 << 20, D, dtype, torch.device("cpu"))[:2]
            for ids in (False, True):
                types = dict(Q=ptr, K=ptr, TAU="*fp32", STATS=acc, W=acc, W_SCALE=acc, RID="*i64", KID="*i64",
                             DK=acc)
                types.update(_i32("B", "N", "D", "rows_per_split", "pos_offset", "stride_qb", "stride_qd", "stride_kn", "stride_kd",
                                  "stride_dks", "stride_dkn", "stride_sb", "stride_rid", "stride_kid"))
                types.update({n: "fp32" for n in ("gamma_hi", "gamma_lo")})
                yield (f"focal_itc_key_grad {ty} D={D} {blocks['BLOCK_M']}x{blocks['BLOCK_N']}{ids_tag(ids)}",
                       (mod, "_focal_itc_key_grad_kernel"), types, dict(HAS_IDS=ids, **flags, **blocks), launch, True)
            cblocks, claunch = fk._combine_config(D)
            for two, ids in itertools.product((False, True), (False, True)):
                # The combine reads sweep 2's partials whenever sweep 2 ran (targets or ids).
                for two_sweeps in ((True,) if ids else (True, False)):
                    types = dict(PSTAT=acc, PACC=acc, P2STAT=acc, P2ACC=acc, K0=ptr, K1=ptr, TAU="*fp32", LOSS=acc,
                                 DQ=acc, DTAU=acc, STATS=acc)
                    types.update(_i32("B", "N0", "D", "n_splits", "pos_offset", "stride_pstat", "stride_ps", "stride_pas",
                                      "stride_pab", *key_strides, "stride_dqb", "stride_sb"))
                    types.update({n: "fp32" for n in ("gamma_hi", "gamma_lo")})
                    yield (f"focal_itc_combine {ty} D={D} {cblocks['BLOCK_M']}x{cblocks['BLOCK_D']} "
                           f"targets={two_sweeps}{ids_tag(ids)} parts={2 if two else 1}",
                           (mod, "_focal_itc_combine_kernel"), types,
                           dict(TWO_SWEEPS=two_sweeps, HAS_IDS=ids, TWO_PARTS=two, ACC=flags["ACC"], **cblocks),
                           claunch, True)


def soft_mask_specs(exhaustive: bool = False):
    """The soft-mask kernels as the launchers configure them at ALBEF's shapes (head size
    64; N = 257 keys at 256 px, 577 at 384 px; D = 768), both branches of the head and
    cam kernels, key padding on. Integer strides equal to 1 are constexprs, as Triton
    specializes them at launch."""
    from softmask.kernels import soft_mask as K

    mod = "softmask.kernels.soft_mask"
    dh, D = 64, 768
    block_d = 1 << (dh - 1).bit_length()
    block_n = min(1 << (257 - 1).bit_length(), max(16, K._HEAD_TILE // block_d))
    for dname in ALL_DTYPES:  # four small kernels each: cheap, so every dtype by default
        ty = TL_TYPES[dname]
        acc = "fp64" if dname == "float64" else "fp32"
        head = dict(q_ptr="*" + ty, k_ptr="*" + ty, v_ptr="*" + ty, g_ptr="*" + ty, w_ptr="*i64", kpm_ptr="*i8",
                    contrib_ptr="*" + acc, H="i32", T="i32", N="i32", DH="i32", scale_hi="fp32", scale_lo="fp32",
                    **_i32("stride_qb", "stride_qh", "stride_qt", "stride_gb", "stride_gh", "stride_gt", "stride_kb",
                           "stride_kh", "stride_kn", "stride_vb", "stride_vh", "stride_vn", "stride_mb"))
        for single in (False, True):
            yield (f"soft_mask_head_cam {ty} dh={dh} {block_n}x{block_d} single={single}", (mod, "_head_cam_kernel"),
                   head, dict(stride_qd=1, stride_gd=1, stride_kd=1, stride_vd=1, stride_mn=1, HAS_KPM=True,
                              SINGLE=single, BLOCK_N=block_n, BLOCK_D=block_d), dict(num_warps=K._HEAD_WARPS))
        for n_keys in (257, 577):
            cam_block = min(1 << (n_keys - 1).bit_length(), K._CAM_BLOCK)
            yield (f"soft_mask_cam_mask {ty} N={n_keys} block={cam_block}", (mod, "_cam_mask_kernel"),
                   dict(contrib_ptr="*" + acc, kpm_ptr="*i8", cam_ptr="*" + acc, mask_ptr="*" + acc, H="i32",
                        N="i32", omf_hi="fp32", omf_lo="fp32", stride_mb="i32"),
                   dict(stride_mn=1, HAS_KPM=True, SINGLE=True, BLOCK_N=cam_block), dict(num_warps=4))
        yield (f"soft_mask_cam_mask {ty} N=1100 block={K._CAM_BLOCK}", (mod, "_cam_mask_kernel"),
               dict(contrib_ptr="*" + acc, kpm_ptr="*i8", cam_ptr="*" + acc, mask_ptr="*" + acc, H="i32", N="i32",
                    omf_hi="fp32", omf_lo="fp32", stride_mb="i32"),
               dict(stride_mn=1, HAS_KPM=True, SINGLE=False, BLOCK_N=K._CAM_BLOCK), dict(num_warps=4))
        yield (f"soft_mask_scale_rows {ty} D={D} {K._SCALE_ROWS}x{min(1 << (D - 1).bit_length(), K._SCALE_COLS)}",
               (mod, "_scale_rows_kernel"),
               dict(x_ptr="*" + ty, mask_ptr="*" + acc, out_ptr="*" + ty, N="i32", D="i32", stride_xb="i32",
                    stride_xn="i32", stride_ob="i32", stride_on="i32"),
               dict(stride_xd=1, BLOCK_R=K._SCALE_ROWS, BLOCK_D=min(1 << (D - 1).bit_length(), K._SCALE_COLS)),
               dict(num_warps=4))
        yield (f"soft_mask_probs_cam {ty} block=512", (mod, "_probs_cam_kernel"),
               dict(p_ptr="*" + ty, g_ptr="*" + ty, w_ptr="*i64", cam_ptr="*" + acc, H="i32", T="i32", N="i32",
                    **_i32("stride_pb", "stride_ph", "stride_pt", "stride_gb", "stride_gh", "stride_gt")),
               dict(stride_pn=1, stride_gn=1, BLOCK_N=512), dict(num_warps=4))


SPECS = [focal_itc_specs, soft_mask_specs]


# --------------------------------------------------------------------------- compilation


def _stats_cache_path() -> str:
    base = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
    return os.path.join(base, "softmask_ptxas_stats.json")


def parse_ptxas_log(log: str) -> dict:
    """Registers, spill stores / loads and stack frame of the kernel in a ``ptxas -v`` log
    (one block per function; the kernel is the largest user)."""
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", log)]
    spills = [(int(a), int(b)) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)]
    stack = [int(s) for s in re.findall(r"(\d+) bytes stack frame", log)]
    return dict(regs=max(regs) if regs else None,
                spill_stores=max(s for s, _ in spills) if spills else None,
                spill_loads=max(l for _, l in spills) if spills else None,
                stack=max(stack) if stack else None)


def _ptxas_here(ptx: str, arch: int) -> str:
    """``ptxas -v`` on ``ptx`` with the flags Triton's nvidia backend uses (``make_cubin``)."""
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        arch_s = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        cmd = [ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch_s}", src,
               "-o", os.path.join(d, "k.cubin")]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stderr


def _worker_init():
    os.environ.pop("TRITON_INTERPRET", None)
    import triton

    knobs = getattr(triton, "knobs", None)
    if knobs is not None and hasattr(knobs.nvidia, "dump_ptxas_log"):
        knobs.nvidia.dump_ptxas_log = True  # Triton prints its own ptxas -v log (captured below)


def compile_one(spec, arch: int, cached: dict) -> dict:
    """Compile one configuration; its row (and ``_hash`` / ``_stats`` for the cache)."""
    import importlib

    from tests.helpers import compile_for_gpu

    name, (module, attr), types, constexprs, launch = spec[:5]
    launched = spec[5] if len(spec) > 5 else True
    t0 = time.perf_counter()
    try:
        fn = getattr(importlib.import_module(module), attr)
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            k = compile_for_gpu(fn, types, constexprs, arch=arch, **launch)
        stats = cached.get(k.hash)
        if stats is None:
            log = buf.getvalue()
            stats = parse_ptxas_log(log if "Used " in log else _ptxas_here(k.asm["ptx"], arch))
        row = dict(kernel=name, ok=True, launched=launched, shared=k.metadata.shared, **launch, **stats,
                   seconds=round(time.perf_counter() - t0, 2), _hash=k.hash, _stats=stats)
    except Exception as e:  # report every configuration, then fail
        row = dict(kernel=name, ok=False, launched=launched, error=f"{type(e).__name__}: {str(e)[-800:]}",
                   seconds=round(time.perf_counter() - t0, 2))
    return row


def _compile_star(args):
    return compile_one(*args)


def is_bad(row) -> bool:
    """A compiled configuration that spills or needs more shared memory than sm_90 has."""
    return bool(row.get("ok") and ((row.get("spill_stores") or 0) or (row.get("spill_loads") or 0)
                                   or row.get("shared", 0) > SHARED_LIMIT))


def spill_summary(rows) -> str:
    """A markdown table of the configurations that spill or exceed the shared-memory limit
    (those the launchers never launch listed apart)."""
    bad = [r for r in rows if is_bad(r)]
    launched = [r for r in bad if r.get("launched", True)]
    failed = [r for r in rows if not r.get("ok")]
    out = [f"{len(rows)} configurations, {len(launched)} launched ones spilling or over {SHARED_LIMIT // 1024} KB "
           f"of shared memory ({len(bad) - len(launched)} more compiled but never launched), {len(failed)} failed "
           "to compile", "",
           "| kernel | launched | warps | stages | regs | spill st / ld B | shared KB |", "|---|---|---|---|---|---|---|"]
    for r in sorted(bad, key=lambda r: not r.get("launched", True)):
        out.append(f"| {r['kernel']} | {'yes' if r.get('launched', True) else 'no'} | {r.get('num_warps', '')} | "
                   f"{r.get('num_stages', '')} | {r['regs']} | {r['spill_stores']} / {r['spill_loads']} | "
                   f"{r['shared'] / 1024:.0f} |")
    for r in failed:
        out.append(f"| {r['kernel']} | | | compile failed: {r['error'][:120]} | |")
    return "\n".join(out)


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET to compile kernels", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--only", action="append", default=[],
                        help="compile only configurations whose name contains this text, e.g. a kernel family "
                             "'focal_itc_sweep1' or 'soft_mask' (repeatable: any of them)")
    parser.add_argument("--all", action="store_true",
                        help="every dtype (float64 too) and every D from 16 to MAX_D, not only the default set")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes (default: cores)")
    parser.add_argument("--summary", action="store_true", help="print a table of spills and failures to stderr")
    parser.add_argument("--no-cache", action="store_true", help="ignore the stored ptxas statistics")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    specs = [s for gen in SPECS for s in gen(args.all) if not args.only or any(o in s[0] for o in args.only)]
    cache_path = _stats_cache_path()
    cached = {}
    if not args.no_cache:
        with contextlib.suppress(OSError, ValueError):
            with open(cache_path) as f:
                cached = json.load(f)
    # Largest first: the long compilations start early and the pool ends together.
    order = sorted(range(len(specs)), key=lambda i: -_cost_guess(specs[i]))
    rows = [None] * len(specs)
    work = [(specs[i], args.arch, cached) for i in order]
    if args.jobs > 1 and len(specs) > 1:
        ctx = multiprocessing.get_context("fork")
        with cf.ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx, initializer=_worker_init) as pool:
            futures = {pool.submit(_compile_star, w): i for i, w in zip(order, work)}
            for fut in cf.as_completed(futures):
                rows[futures[fut]] = fut.result()
    else:
        _worker_init()
        for i, w in zip(order, work):
            rows[i] = _compile_star(w)
    failures = 0
    for row in rows:
        if row.get("ok"):
            cached[row.pop("_hash")] = row.pop("_stats")
        else:
            failures += 1
        print(json.dumps(row), flush=True)
    if not args.no_cache:
        with contextlib.suppress(OSError):
            os.makedirs(os.path.dirname(cache_path), exist_ok=True)
            tmp = cache_path + f".{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(cached, f)
            os.replace(tmp, cache_path)
    if args.summary:
        print(spill_summary(rows), file=sys.stderr)
    print(f"{len(rows)} configurations compiled for sm_{args.arch} in {time.perf_counter() - t0:.0f} s "
          f"with {args.jobs} process(es)", file=sys.stderr)
    return 1 if failures else 0


def _cost_guess(spec) -> int:
    """Relative compile cost of a configuration, for scheduling only: tile elements times
    the element size (the float64 and wide-D kernels take longest)."""
    name, constexprs = spec[0], spec[3]
    size = 8 if " fp64 " in name else 4 if " fp32 " in name else 2
    return size * constexprs.get("BLOCK_D", 64) * constexprs.get("BLOCK_M", 16) * (2 if "sweep" in name else 1)


if __name__ == "__main__":
    sys.exit(main())
