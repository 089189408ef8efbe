"""The Triton kernels compile for a Hopper GPU (sm_90) with Triton's own ptxas, without
a GPU: the interpreter that runs the other tests on CPU accepts programs the compiler
rejects (and vice versa), so this catches what CPU tests cannot. A few representative
configurations keep CI short; ``python -m tests.compile_kernels --summary`` compiles the
configurations users run (~3 minutes cold on 2 cores) and ``--all`` every one."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ptxas_available

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = [
    # the focal ITC tiles of the albef / albef_gpu shapes: both sweeps, two key-bank parts, no spills
    "focal_itc_sweep1 bf16 D=256 16x64 targets=True parts=2",
    "focal_itc_sweep2 bf16 D=256 32x64 parts=2",
    "focal_itc_combine fp32 D=256 16x32 targets=True parts=2",
    # positive ids (issue 12): sweep 2 with ids on the albef tile (1 stage: 8 / 4 B spilled at 2)
    "focal_itc_sweep2 bf16 D=256 32x64 ids=True parts=1",
    # float32 at D = 256 (issue 30): the sweep-1 pass the launcher runs twice with momentum targets,
    # and sweep 2 with ids alone (2 stages: 6 KB spilled at 1)
    "focal_itc_sweep1 fp32 D=256 16x32 targets=False parts=2",
    "focal_itc_sweep2 fp32 D=256 16x32 targets=False ids=True parts=2",
    # D = 512 half precision (CLIP ViT-B): the momentum tile and the key gradient
    "focal_itc_sweep1 bf16 D=512 16x32 targets=True parts=2",
    "focal_itc_key_grad bf16 D=512 32x32 ids=True",
    # the soft mask's head kernel
    "soft_mask_head_cam bf16 dh=64 64x64 single=False",
]
NO_SPILL = ("focal_itc_", "soft_mask_")


@pytest.mark.skipif(not ptxas_available(), reason="triton's ptxas is not installed")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "tests.compile_kernels"] + [a for c in CONFIGS for a in ("--only", c)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == len(CONFIGS), proc.stdout + proc.stderr
    for row in rows:
        assert row["ok"], row
        assert row["shared"] <= 227 * 1024, row  # sm_90's shared memory per block
        assert row["launched"], row  # each of these is a configuration the launchers run
        if row["kernel"].startswith(NO_SPILL):
            assert row["spill_stores"] == 0 and row["spill_loads"] == 0, row
