"""The focal ITC launcher's configuration choices (issue 30): the tiles and launch options
ptxas showed spill-free for the configurations users run, and the momentum log-sum-exp
computed in a pass of its own (float32 at D = 256, where sweep 1 with targets spilled at
every tile): that plan must give the same results as the single sweep 1, bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from softmask.kernels import focal_itc as fk

HALF = (torch.bfloat16, torch.float16)


def _gpu_plan(monkeypatch):
    monkeypatch.setattr(fk, "interpreting", lambda: False)
    monkeypatch.setattr(fk, "sm_count", lambda device: 132)


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_choices(monkeypatch, dtype):
    _gpu_plan(monkeypatch)
    (t32, l32), (t16, l16) = fk._tile_candidates(256, dtype)
    assert (t32["BLOCK_M"], t32["BLOCK_N"], l32) == (32, 64, dict(num_warps=8, num_stages=2))
    assert (t16["BLOCK_M"], t16["BLOCK_N"], l16) == (16, 64, dict(num_warps=4, num_stages=1))
    # sweep 2 with ids on the 32-row tile: one stage (ptxas: 8 / 4 B spilled at two)
    assert fk._sweep_launch(l32, t32, dtype, 2, True, True)["num_stages"] == 1
    assert fk._sweep_launch(l32, t32, dtype, 2, True, False) == l32
    assert fk._sweep_launch(l32, t32, dtype, 1, True, True) == l32
    # D = 512: 32 x 32 at 8 warps for one-hot targets, 16 x 32 with momentum targets or ids
    [(t, l)] = fk._tile_candidates(512, dtype)
    assert (t["BLOCK_M"], t["BLOCK_N"], l) == (32, 32, dict(num_warps=8, num_stages=2))
    for momentum, ids in ((True, False), (False, True), (True, True)):
        [(t, l)] = fk._tile_candidates(512, dtype, momentum, ids)
        assert (t["BLOCK_M"], t["BLOCK_N"], l) == (16, 32, dict(num_warps=8, num_stages=1))
    assert not fk._momentum_lse_apart(dtype, t32, l32)


def test_float32_choices(monkeypatch):
    _gpu_plan(monkeypatch)
    [(t, l)] = fk._tile_candidates(256, torch.float32)
    assert (t["BLOCK_M"], t["BLOCK_N"], l) == (16, 32, dict(num_warps=8, num_stages=1))
    assert fk._momentum_lse_apart(torch.float32, t, l)
    assert fk._sweep_launch(l, t, torch.float32, 2, False, True)["num_stages"] == 2
    assert fk._sweep_launch(l, t, torch.float32, 2, True, True) == l
    blocks, launch, _, _ = fk._plan(64, 65600, 256, torch.float32, torch.device("cuda"), momentum=True)
    assert fk._momentum_lse_apart(torch.float32, blocks, launch)


def test_the_interpreter_keeps_one_sweep_1():
    [(t, l)] = fk._tile_candidates(256, torch.float32)
    assert l == {} and not fk._momentum_lse_apart(torch.float32, t, l)


def _problem(B, n_queue, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    f = lambda n: F.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=-1).to(dtype)  # noqa
    return f(B), (f(B), f(n_queue)), f(B)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ids", [False, True])
@pytest.mark.parametrize("parts", [1, 2])
def test_momentum_lse_apart_is_bit_identical(monkeypatch, dtype, ids, parts):
    B, Q, D = 20, 130, 32
    q, keys, qm = _problem(B, Q, D, dtype, seed=3 * parts + ids)
    if parts == 1:
        keys = torch.cat(keys)
    tau = torch.tensor(0.07, dtype=torch.float32)
    kw = {}
    if ids:
        g = torch.Generator().manual_seed(9)
        row_ids = torch.randint(0, 12, (B,), generator=g)
        key_ids = torch.cat([row_ids, torch.randint(0, 12, (Q,), generator=g)])
        key_ids[B + 5] = fk.EMPTY_ID
        kw = dict(ids=row_ids, key_ids=key_ids)
    # every buffer poisoned: an element read but never written shows as NaN
    monkeypatch.setattr(fk, "_empty", lambda *s, device, dtype: torch.full(s, float("nan"), device=device,
                                                                           dtype=dtype))
    one = fk.focal_itc_direction_triton(q, keys, qm, tau, 2.0, 0.4, splits=3, **kw)
    monkeypatch.setattr(fk, "_momentum_lse_apart", lambda dtype, blocks, launch: True)
    apart = fk.focal_itc_direction_triton(q, keys, qm, tau, 2.0, 0.4, splits=3, **kw)
    for name, a, b in zip(("loss", "dq", "dtau", "stats"), one, apart):
        assert torch.isfinite(a).all() and torch.equal(a, b), name
