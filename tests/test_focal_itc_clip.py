"""focal_itc_loss's pieces for the distributed CLIP loss: key banks that take gradient
(``key_grad``) and positives at an offset (``pos_offset``), on every backend against the
float64 reference (odd shapes, every CPU dtype, every flag, NaN-poisoned buffers, forced
splits of the triton launcher); the torch backend's tiled one-hot path and its CLIP path
from the shared logits against their untiled forms on tiny tiles; bad input; the CPU
workspace's release."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

import softmask
from softmask import reference
from softmask.kernels import focal_itc as focal_kernels
from softmask.ops import focal_itc as focal_ops
from tests.helpers import assert_close
from tests.test_focal_itc import _assert_tolerance_catches, _cond, _feats, _poison_buffers

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"]
NAMES = ("loss", "d image_feat", "d text_feat", "d temperature", "d text_keys", "d image_keys")


def _keyed_problem(B, N, D, dtype, off, seed=0, momentum=False):
    """Rows [B, D] and key banks [N, D] whose positives (keys off .. off + B - 1) lie near
    their rows, as gathered features of the same pairs do."""
    img = _feats(B, D, dtype=torch.float64, seed=seed)
    txt = _feats(B, D, dtype=torch.float64, seed=seed + 1)
    tk = _feats(N, D, dtype=torch.float64, seed=seed + 2)
    ik = _feats(N, D, dtype=torch.float64, seed=seed + 3)
    tk[off:off + B] = torch.nn.functional.normalize(txt.cpu() + 0.5 * tk[off:off + B].cpu(), dim=-1).to(tk.device)
    ik[off:off + B] = torch.nn.functional.normalize(img.cpu() + 0.5 * ik[off:off + B].cpu(), dim=-1).to(ik.device)
    out = dict(image_feat=img, text_feat=txt, text_keys=tk, image_keys=ik)
    if momentum:
        out.update(image_feat_m=_feats(B, D, dtype=torch.float64, seed=seed + 4),
                   text_feat_m=_feats(B, D, dtype=torch.float64, seed=seed + 5))
    return {k: v.to(dtype) for k, v in out.items()}


def _run_keys(fn, inputs, tau, tau_dtype, keys_leaf, **kw):
    """Loss and gradients (image_feat, text_feat, temperature, text_keys, image_keys) of
    ``sum(loss * upstream)``, the upstream unequal per row for reduction "none"."""
    t = torch.tensor(tau, dtype=tau_dtype, device=inputs["image_feat"].device, requires_grad=True)
    leaves = {k: v.detach().clone().requires_grad_(k in ("image_feat", "text_feat") or
                                                   (keys_leaf and k.endswith("keys")))
              for k, v in inputs.items()}
    img, txt = leaves["image_feat"], leaves["text_feat"]
    rest = {k: v for k, v in leaves.items() if k not in ("image_feat", "text_feat")}
    loss = fn(img, txt, t, **rest, **kw)
    upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device).view(loss.shape)
    (loss * upstream).sum().backward()
    out = [loss.detach(), img.grad, txt.grad, t.grad]
    if keys_leaf:
        out += [rest["text_keys"].grad, rest["image_keys"].grad]
    return out


def _check(inputs, tau, dtype, backend, key_grad, **kw):
    tau_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    got = _run_keys(softmask.focal_itc_loss, inputs, tau, tau_dtype, key_grad, backend=backend, key_grad=key_grad, **kw)
    same = _run_keys(reference.focal_itc_loss_reference, inputs, tau, tau_dtype, key_grad, **kw)
    truth = _run_keys(reference.focal_itc_loss_reference, {k: v.double() for k, v in inputs.items()}, tau,
                      torch.float64, key_grad, **kw)
    cond = _cond(dtype, tau)
    assert len(got) == (6 if key_grad else 4)
    for name, g, s, t in zip(NAMES, got, same, truth):
        assert g is not None, f"{backend} {name}: no gradient"
        assert g.dtype == s.dtype, name
        assert_close(g, t, dtype=dtype, same_dtype_ref=s, cond=cond, name=f"{backend} {name}")
        _assert_tolerance_catches(t, s, dtype, cond, name)


# --------------------------------------------------------------------------- key_grad, pos_offset


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("gamma,tau", [(0.0, 0.07), (0.5, 0.001), (2.0, 0.07)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("B,N,off", [(7, 23, 0), (7, 23, 9), (7, 23, 16), (1, 1, 0), (1, 5, 4)])
def test_key_grad_with_offset(backend, dtype, gamma, tau, reduction, B, N, off):
    """Rows against gathered-style keys that take gradient, positive of row i at key off + i
    (first, middle and last B keys of the bank; B = 1). "mean" takes the torch backend's
    key gradient from the forward, "none" with unequal upstream weights recomputes it."""
    inputs = _keyed_problem(B, N, 12, dtype, off, seed=B + N + off)
    _check(inputs, tau, dtype, backend, True, gamma=gamma, pos_offset=off, reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_offset_without_key_grad(backend, dtype, alpha):
    """pos_offset on constant keys, one-hot and momentum targets (keys get no gradient)."""
    inputs = _keyed_problem(9, 31, 16, dtype, 13, seed=3, momentum=alpha > 0)
    _check(inputs, 0.07, dtype, backend, False, gamma=2.0, alpha=alpha, pos_offset=13, reduction="sum")
    keys = inputs["text_keys"].clone().requires_grad_()
    softmask.focal_itc_loss(inputs["image_feat"].clone().requires_grad_(), inputs["text_feat"], 0.07,
                            text_keys=keys, image_keys=inputs["image_keys"], pos_offset=13, alpha=alpha,
                            image_feat_m=inputs.get("image_feat_m"), text_feat_m=inputs.get("text_feat_m"),
                            backend=backend).backward()
    assert keys.grad is None


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_key_grad_with_ids(backend, dtype):
    """key_grad with positive ids (several positives per row, a row without any, an empty slot)."""
    inputs = _keyed_problem(6, 17, 8, dtype, 0, seed=11)
    ids = torch.tensor([0, 1, 2, 1, 7, -100], device=DEVICE)
    key_ids = torch.tensor([0, 1, 2, 1, 4, 5, 1, -100, 0, 3, 3, 9, 9, 2, -100, 6, 1], device=DEVICE)
    for reduction in ("mean", "none"):
        _check(inputs, 0.07, dtype, backend, True, gamma=2.0, ids=ids, key_ids=key_ids, reduction=reduction)


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("off", [0, 70])
def test_triton_splits_with_offset(monkeypatch, splits, off):
    """Forced key splits (interpreter tiles of 64 keys: 3 splits of N = 200 are [0, 64),
    [64, 128), [128, 200)) and row splits of the key gradient, the positives at an
    offset that puts them across a split boundary; every launcher buffer NaN-poisoned."""
    _poison_buffers(monkeypatch)
    B, N, D, gamma, tau = 40, 200, 16, 2.0, 0.05
    inputs = _keyed_problem(B, N, D, torch.float64, off, seed=splits + off)
    q, k = inputs["image_feat"], inputs["text_keys"]
    tau_t = torch.tensor(tau, dtype=torch.float64, device=q.device)
    w = torch.linspace(0.5, 1.5, B, dtype=torch.float64)
    loss, dq, dtau, stats = focal_kernels.focal_itc_direction_triton(q, k, None, tau_t, gamma, 0.0,
                                                                       pos_offset=off, splits=splits)
    dk = focal_kernels.focal_itc_key_grad_triton(q, k, tau_t, stats, w.to(q.device), gamma=gamma, pos_offset=off,
                                                 splits=splits)
    q64, k64 = q.double().clone().requires_grad_(), k.double().clone().requires_grad_()
    t64 = torch.tensor(tau, dtype=torch.float64, requires_grad=True)
    rows = reference.focal_itc_rows_reference(q64, k64, t64, gamma=gamma, pos_offset=off)
    (rows * w).sum().backward()
    cond = _cond(torch.float64, tau)
    assert_close(loss, rows, dtype=torch.float64, cond=cond, name="loss")
    assert_close(dq * w[:, None], q64.grad, dtype=torch.float64, cond=cond, name="dQ")
    assert_close((dtau * w).sum(), t64.grad, dtype=torch.float64, cond=cond, name="dtau")
    assert_close(dk, k64.grad, dtype=torch.float64, cond=cond, name="dK")


# --------------------------------------------------------------------------- the torch backend's tiles


def _poison_workspace(monkeypatch):
    """Every workspace the torch backend takes starts as NaN (a read before a write shows)."""
    def poisoned(shape, dtype, device):
        return torch.full(shape if isinstance(shape, tuple) else tuple(shape), float("nan"), dtype=dtype,
                          device=device)
    monkeypatch.setattr(focal_ops, "_workspace", poisoned)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gamma,tau", [(0.0, 0.07), (2.0, 0.07), (0.5, 0.001)])
@pytest.mark.parametrize("key_grad,off", [(False, 0), (True, 5), (True, 0)])
def test_torch_onehot_tiles(monkeypatch, dtype, gamma, tau, key_grad, off):
    """The tiled one-hot path with row blocks of 4 rows (B = 13: 4, 3, 3, 3 rows) and key
    tiles of 5 keys (N = 29: 6 tiles, the last of 4), so that the positives cross tiles at
    every offset; NaN workspace; against float64 and against the row-block path."""
    _poison_workspace(monkeypatch)
    monkeypatch.setattr(focal_ops, "TORCH_TILED_BLOCK_ELEMS", 4 * 29)
    monkeypatch.setattr(focal_ops, "TORCH_TILE_ELEMS", 4 * 5)
    inputs = _keyed_problem(13, 29, 12, dtype, off, seed=7)
    for reduction in ("mean", "none"):
        _check(inputs, tau, dtype, "torch", key_grad, gamma=gamma, pos_offset=off, reduction=reduction)
    tau_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    kw = dict(backend="torch", gamma=gamma, pos_offset=off, key_grad=key_grad)
    tiled = _run_keys(softmask.focal_itc_loss, inputs, tau, tau_dtype, key_grad, **kw)
    monkeypatch.setattr(focal_ops, "TILED_ONEHOT", False)
    untiled = _run_keys(softmask.focal_itc_loss, inputs, tau, tau_dtype, key_grad, **kw)
    for name, a, b in zip(NAMES, tiled, untiled):
        assert_close(a, b.double(), dtype=dtype, cond=_cond(dtype, tau), name=f"tiled vs untiled {name}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("gamma,tau", [(0.0, 0.07), (2.0, 0.07), (0.5, 0.001), (5.0, 0.5)])
@pytest.mark.parametrize("B,tile", [(13, 4 * 5), (13, 1 << 18), (1, 1 << 18), (2, 1)])
def test_torch_clip_tiles(monkeypatch, dtype, gamma, tau, B, tile):
    """CLIP mode from the shared logits: tiles of 4 x 5 (B = 13: 4 row blocks, 3 column
    tiles, the diagonal crossing tiles), the default tiles (at most half the rows), B = 1
    and 1 x 1 tiles; NaN workspace; against float64 with unequal upstream weights."""
    _poison_workspace(monkeypatch)
    monkeypatch.setattr(focal_ops, "TORCH_TILE_ELEMS", tile)
    inputs = dict(image_feat=_feats(B, 10, dtype=dtype, seed=B), text_feat=_feats(B, 10, dtype=dtype, seed=B + 1))
    for reduction in ("mean", "none"):
        _check(inputs, tau, dtype, "torch", False, gamma=gamma, reduction=reduction)


def test_torch_clip_path_is_the_shared_one(monkeypatch):
    """CLIP mode without ids runs one matmul of B x B per call in the forward and three in
    the backward (per-direction paths: four and four)."""
    calls = []
    real_mm = torch.mm

    def counting_mm(*a, **k):
        calls.append(a[0].shape[0] * a[1].shape[1])
        return real_mm(*a, **k)

    inputs = dict(image_feat=_feats(64, 8, dtype=torch.float32, seed=1).requires_grad_(),
                  text_feat=_feats(64, 8, dtype=torch.float32, seed=2).requires_grad_())
    monkeypatch.setattr(focal_ops.torch, "mm", counting_mm)
    loss = softmask.focal_itc_loss(inputs["image_feat"], inputs["text_feat"], 0.07, backend="torch")
    assert sum(calls) == 64 * 64, calls
    calls.clear()
    loss.backward()
    assert sum(calls) == 64 * 64, calls  # the recomputed logits; dimg and dtxt are addmm_


# --------------------------------------------------------------------------- bad input


def _good():
    return _keyed_problem(4, 10, 8, torch.float32, 0)


BAD = [
    ("key_grad int", dict(key_grad=1), TypeError, "key_grad: expected a bool, got int"),
    ("key_grad clip", dict(key_grad=True, text_keys=None, image_keys=None), ValueError,
     "key_grad: expected False in CLIP mode"),
    ("key_grad alpha", dict(key_grad=True, alpha=0.4, image_feat_m="m", text_feat_m="m"), ValueError,
     "key_grad: expected alpha = 0 with key_grad=True (momentum targets take keys without gradient), got alpha = 0.4"),
    ("key_grad parts", dict(key_grad=True, text_keys="parts"), ValueError,
     "text_keys: expected one [N, D] tensor with key_grad=True (the gradient goes to one tensor), got 2 parts"),
    ("offset negative", dict(pos_offset=-1), ValueError, "pos_offset: expected an int >= 0, got -1"),
    ("offset float", dict(pos_offset=2.0), TypeError, "pos_offset: expected a Python int, got float"),
    ("offset bool", dict(pos_offset=True), TypeError, "pos_offset: expected a Python int, got bool"),
    ("offset clip", dict(pos_offset=2, text_keys=None, image_keys=None), ValueError,
     "pos_offset: expected 0 in CLIP mode (the keys are the batch itself), got 2"),
    ("offset ids", dict(pos_offset=2, ids="ids"), ValueError,
     "pos_offset: expected 0 with ids (the ids define the positives), got 2"),
    ("offset too far", dict(pos_offset=7), ValueError,
     "text_keys: expected N >= pos_offset + B = 11 keys (row i's positive is key pos_offset + i), got N = 10"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input(case):
    _, change, exc, msg = case
    args = dict(_good(), temperature=0.07)
    for k, v in change.items():
        if v == "m":
            v = args["image_feat"].clone()
        elif v == "parts":
            v = (args[k][:5], args[k][5:])
        elif v == "ids":
            v = torch.arange(4, device=DEVICE)
            args["key_ids"] = torch.arange(10, device=DEVICE)
        args[k] = v
    with pytest.raises(exc, match=re.escape(msg)):
        softmask.focal_itc_loss(**args)


# --------------------------------------------------------------------------- the CPU workspace


RELEASE_SCRIPT = """
import gc, torch, softmask
from softmask.ops import focal_itc as focal_ops

def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

torch.set_num_threads(1)
B, N, D = 16, 1 << 21, 4  # the stored block: 8 rows x 2^21 keys, float32 = 64 MiB
g = torch.Generator().manual_seed(0)
feat = lambda n: torch.nn.functional.normalize(torch.randn(n, D, generator=g), dim=-1)
img, txt, tk, ik = feat(B), feat(B), feat(N), feat(N)
softmask.focal_itc_loss(img, txt, 0.07, text_keys=tk, image_keys=ik, backend="torch")
gc.collect()
before = rss()
freed = softmask.release_workspace()
gc.collect()
after = rss()
again = softmask.release_workspace()
ok = bool(torch.isfinite(softmask.focal_itc_loss(img[:2], txt[:2], 0.07, backend="torch")))
print(before, after, freed, again, ok)
"""


def test_release_workspace_gives_the_memory_back():
    """A user who calls the op once and calls softmask.release_workspace() gets the
    workspace's memory back (resident set, in a fresh process: glibc settings such as
    softmask.train's keep_freed_memory are process-wide), and the op works after it."""
    proc = subprocess.run([sys.executable, "-c", RELEASE_SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, after, freed, again, ok = proc.stdout.split()
    before, after, freed = int(before), int(after), int(freed)
    assert freed >= 8 * (1 << 21) * 4, freed  # the stored block of 8 rows x N keys, float32
    assert before - after >= 0.9 * freed, f"resident set {before} -> {after} bytes, {freed} released"
    assert again == "0" and ok == "True"


def test_workspace_cap(monkeypatch):
    """A buffer above WORKSPACE_CACHE_BYTES serves its call and is not kept."""
    softmask.release_workspace()
    monkeypatch.setattr(focal_ops, "WORKSPACE_CACHE_BYTES", 1 << 20)
    small = focal_ops._workspace((1000,), torch.float32, torch.device("cpu"))
    assert focal_ops._workspace((10,), torch.float32, torch.device("cpu")).data_ptr() == small.data_ptr()
    big = focal_ops._workspace((1 << 19,), torch.float32, torch.device("cpu"))  # 2 MiB > 1 MiB
    assert big.numel() == 1 << 19
    assert softmask.release_workspace() == 0  # the small one went before the big one was allocated, which was not kept
