"""Compile every Triton kernel configuration the launchers can pick for a Hopper GPU
(sm_90) without a GPU, with Triton's own ptxas, and report shared memory, registers
and spills per configuration as JSON lines.

Run without TRITON_INTERPRET (the interpreter replaces ``@triton.jit`` functions):
``python -m tests.compile_kernels [--arch 90]``. ``tests/test_gpu_compile.py`` runs it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

TL_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def _ptxas_stats(ptx: str, arch: int) -> dict:
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        arch_s = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        out = subprocess.run([ptxas, "-v", f"--gpu-name={arch_s}", src, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    # ptxas reports one block per function; the kernel is the largest user of registers.
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", out)]
    spills = [(int(a), int(b)) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)]
    return dict(regs=max(regs) if regs else None,
                spill_stores=max(s for s, _ in spills) if spills else None,
                spill_loads=max(l for _, l in spills) if spills else None)


def focal_itc_specs():
    """Every tile configuration ``_tile_candidates`` can return (each dtype; BLOCK_D from
    16 to ``MAX_D``) for each kernel of the op and each value of its structural flags."""
    from softmask.kernels import focal_itc as fk

    i32 = lambda *names: {n: "i32" for n in names}  # noqa: E731
    key_strides = ("stride_k0n", "stride_k0d", "stride_k1n", "stride_k1d")
    id_ptrs = dict(RID="*i64", KID0="*i64", KID1="*i64")
    id_strides = ("stride_rid", "stride_kid0", "stride_kid1")
    # Names of the configurations with ids carry " ids=True" before " parts=": the names
    # without it are those of the configurations without ids (as before ids existed).
    ids_tag = lambda ids: " ids=True" if ids else ""  # noqa: E731
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        ptr = "*" + TL_TYPES[dtype]
        acc = "*fp64" if dtype == torch.float64 else "*fp32"
        flags = fk._flags(dtype)
        block_ds = [1 << e for e in range(4, (fk.MAX_D - 1).bit_length() + 1)]  # 16 .. MAX_D
        for D in block_ds:
            for blocks, launch in fk._tile_candidates(D, dtype):
                tile = f"{TL_TYPES[dtype]} D={D} {blocks['BLOCK_M']}x{blocks['BLOCK_N']}"
                for two, ids in itertools.product((False, True), (False, True)):
                    for has_targets in (True, False):
                        types = dict(Q=ptr, QM=ptr, K0=ptr, K1=ptr, TAU="*fp32", PSTAT=acc, PACC=acc, **id_ptrs)
                        types.update(i32("B", "N", "N0", "D", "keys_per_split", "stride_qb", "stride_qd",
                                         "stride_qmb", "stride_qmd", *key_strides, *id_strides, "stride_pstat",
                                         "stride_ps", "stride_pas", "stride_pab"))
                        yield (f"focal_itc_sweep1 {tile} targets={has_targets}{ids_tag(ids)} parts={2 if two else 1}",
                               fk._focal_itc_sweep1_kernel, types,
                               dict(HAS_TARGETS=has_targets, HAS_IDS=ids, TWO_PARTS=two, **flags, **blocks), launch)
                    types = dict(Q=ptr, QM=ptr, K0=ptr, K1=ptr, TAU="*fp32", PSTAT=acc, P2STAT=acc, P2ACC=acc,
                                 **id_ptrs)
                    types.update(i32("B", "N", "N0", "D", "keys_per_split", "n_splits", "stride_qb", "stride_qd",
                                     "stride_qmb", "stride_qmd", *key_strides, *id_strides, "stride_pstat",
                                     "stride_ps", "stride_pas", "stride_pab"))
                    types.update({n: "fp32" for n in ("gamma_hi", "gamma_lo", "alpha_hi", "alpha_lo")})
                    # Sweep 2 runs with momentum targets, with ids, or both.
                    for momentum in ((True, False) if ids else (True,)):
                        tag = ("" if momentum else " targets=False") + ids_tag(ids)
                        yield (f"focal_itc_sweep2 {tile}{tag} parts={2 if two else 1}", fk._focal_itc_sweep2_kernel,
                               types, dict(HAS_MOMENTUM=momentum, HAS_IDS=ids, TWO_PARTS=two, **flags, **blocks),
                               launch)
            blocks, launch = fk._tile_candidates(D, dtype)[0]  # the key gradient's tile
            for ids in (False, True):
                types = dict(Q=ptr, K=ptr, TAU="*fp32", STATS=acc, W=acc, W_SCALE=acc, RID="*i64", KID="*i64",
                             DK=acc)
                types.update(i32("B", "N", "D", "rows_per_split", "stride_qb", "stride_qd", "stride_kn", "stride_kd",
                                 "stride_dks", "stride_dkn", "stride_sb", "stride_rid", "stride_kid"))
                types.update({n: "fp32" for n in ("gamma_hi", "gamma_lo")})
                yield (f"focal_itc_key_grad {TL_TYPES[dtype]} D={D} {blocks['BLOCK_M']}x{blocks['BLOCK_N']}"
                       f"{ids_tag(ids)}", fk._focal_itc_key_grad_kernel, types, dict(HAS_IDS=ids, **flags, **blocks),
                       launch)
            cblocks, claunch = fk._combine_config(D)
            for two, ids in itertools.product((False, True), (False, True)):
                # The combine reads sweep 2's partials whenever sweep 2 ran (targets or ids).
                for two_sweeps in ((True,) if ids else (True, False)):
                    types = dict(PSTAT=acc, PACC=acc, P2STAT=acc, P2ACC=acc, K0=ptr, K1=ptr, TAU="*fp32", LOSS=acc,
                                 DQ=acc, DTAU=acc, STATS=acc)
                    types.update(i32("B", "N0", "D", "n_splits", "stride_pstat", "stride_ps", "stride_pas",
                                     "stride_pab", *key_strides, "stride_dqb", "stride_sb"))
                    types.update({n: "fp32" for n in ("gamma_hi", "gamma_lo")})
                    yield (f"focal_itc_combine {TL_TYPES[dtype]} D={D} {cblocks['BLOCK_M']}x{cblocks['BLOCK_D']} "
                           f"targets={two_sweeps}{ids_tag(ids)} parts={2 if two else 1}",
                           fk._focal_itc_combine_kernel, types,
                           dict(TWO_SWEEPS=two_sweeps, HAS_IDS=ids, TWO_PARTS=two, ACC=flags["ACC"], **cblocks),
                           claunch)


SPECS = [focal_itc_specs]


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET to compile kernels", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--only", action="append", default=[],
                        help="compile only configurations whose name contains this text (repeatable)")
    args = parser.parse_args(argv)
    from tests.helpers import compile_for_gpu

    failures = 0
    for spec in SPECS:
        for name, fn, types, constexprs, launch in spec():
            if args.only and not any(o in name for o in args.only):
                continue
            try:
                k = compile_for_gpu(fn, types, constexprs, arch=args.arch, **launch)
                row = dict(kernel=name, ok=True, shared=k.metadata.shared, **launch,
                           **_ptxas_stats(k.asm["ptx"], args.arch))
            except Exception as e:  # report every configuration, then fail
                failures += 1
                row = dict(kernel=name, ok=False, error=f"{type(e).__name__}: {str(e)[-800:]}")
            print(json.dumps(row), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
