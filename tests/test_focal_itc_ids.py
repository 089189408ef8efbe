"""focal_itc_loss with positive ids (issue 12, item 1): every backend against a float64
oracle written the way ALBEF's ``model_retrieval.py`` writes it (materialized ``pos_idx``,
``sim_targets = pos_idx / pos_idx.sum(1)``, mixed with ``alpha * softmax`` of the momentum
similarities, then the focal weight; autograd for every gradient), with duplicate ids in
the batch and in the queue, empty (-100) queue slots, rows without a positive, ALBEF and
CLIP modes, forced splits over the keys, ``ids = arange(B)`` against no ids, and bad ids.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

import softmask
from softmask import reference
from softmask.kernels import focal_itc as focal_kernels
from softmask.ops import focal_itc as focal_ops
from tests.helpers import assert_close
from tests.test_focal_itc import _assert_tolerance_catches, _cond, _feats, _poison_buffers, _problem, _run

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
BACKENDS = ["reference", "torch", "triton"]
EMPTY = -100
NAMES = ("loss", "d image_feat", "d text_feat", "d temperature")


# --------------------------------------------------------------------------- the oracle


def _albef_rows(sim, sim_m, idx, idx_all, alpha, gamma):
    """One direction as ALBEF's retrieval model writes it, plus the focal weight:
    ``pos_idx = idx == idx_all``, ``sim_targets = pos_idx / pos_idx.sum(1)`` (empty
    slots match nothing; a row with no positive gets a zero row, the documented rule
    where ALBEF would divide 0 by 0), ``alpha * softmax(sim_m) + (1 - alpha) * sim_targets``."""
    pos_idx = torch.eq(idx.view(-1, 1), idx_all.view(1, -1)) & (idx_all != EMPTY).view(1, -1)
    pos_idx = pos_idx.double()
    count = pos_idx.sum(1, keepdim=True)
    sim_targets = torch.where(count > 0, pos_idx / count.clamp_min(1), torch.zeros_like(pos_idx))
    if alpha > 0:
        sim_targets = alpha * F.softmax(sim_m, dim=1) + (1 - alpha) * sim_targets
    logp = F.log_softmax(sim, dim=1)
    # (1 - p)^gamma through expm1, clamped so that its derivative stays finite at p = 1
    # for 0 < gamma < 1 (the loss gradient's limit there is 0, which the clamp gives).
    weight = (-torch.expm1(logp)).clamp_min(torch.finfo(torch.float64).tiny).pow(gamma)
    return -torch.sum(sim_targets * weight * logp, dim=1)


def _oracle(image_feat, text_feat, temp, *, gamma, alpha=0.0, image_keys=None, text_keys=None,
            image_feat_m=None, text_feat_m=None, ids=None, key_ids=None, reduction="mean"):
    """float64 focal ITC with ids, ALBEF's way; same call as ``softmask.focal_itc_loss``."""
    cat = lambda x: x.double() if isinstance(x, torch.Tensor) else torch.cat([t.double() for t in x])  # noqa: E731
    cat_ids = lambda x: x if isinstance(x, torch.Tensor) else torch.cat(list(x))  # noqa: E731
    image_feat, text_feat = image_feat.double(), text_feat.double()
    if text_keys is None:  # CLIP mode: the keys are the batch, their ids are ids
        text_feat_all, image_feat_all, idx_all = text_feat, image_feat, ids
    else:
        text_feat_all, image_feat_all, idx_all = cat(text_keys), cat(image_keys), cat_ids(key_ids)
    sim_i2t = image_feat @ text_feat_all.t() / temp
    sim_t2i = text_feat @ image_feat_all.t() / temp
    sim_i2t_m = sim_t2i_m = None
    if alpha > 0:
        with torch.no_grad():
            sim_i2t_m = image_feat_m.double() @ text_feat_all.t() / temp
            sim_t2i_m = text_feat_m.double() @ image_feat_all.t() / temp
    rows = 0.5 * (_albef_rows(sim_i2t, sim_i2t_m, ids, idx_all, alpha, gamma)
                  + _albef_rows(sim_t2i, sim_t2i_m, ids, idx_all, alpha, gamma))
    return {"mean": rows.mean, "sum": rows.sum, "none": lambda: rows}[reduction]()


# --------------------------------------------------------------------------- problems


def _id_problem(B, Q, D, dtype, *, clip, momentum, seed, ids_as_tensor=False):
    """Features as in test_focal_itc (the batch's positives near their queries) with ids:
    duplicates in the batch (ids drawn from B // 2 values), the last row's id -100 (so it
    has no positive), and in ALBEF mode a queue of ``Q`` keys whose ids repeat the batch's,
    with every third slot empty. Key banks and key ids come as ``(batch, queue)`` parts."""
    inputs = _problem(B, B + Q, D, dtype, clip=clip, momentum=momentum, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    ids = torch.randint(0, max(2, B // 2), (B,), generator=g)
    ids[-1] = EMPTY
    inputs["ids"] = ids.to(DEVICE)
    if not clip:
        queue_ids = torch.randint(0, max(2, B // 2) + 2, (Q,), generator=g)
        queue_ids[::3] = EMPTY
        key_ids = torch.cat([ids, queue_ids]).to(DEVICE)
        inputs["key_ids"] = key_ids if ids_as_tensor else (key_ids[:B], key_ids[B:])
        inputs["text_keys"] = (inputs["text_keys"][:B], inputs["text_keys"][B:])
        inputs["image_keys"] = (inputs["image_keys"][:B], inputs["image_keys"][B:])
    return inputs


def _counts(inputs):
    kid = inputs["ids"] if "key_ids" not in inputs else (
        inputs["key_ids"] if isinstance(inputs["key_ids"], torch.Tensor) else torch.cat(list(inputs["key_ids"])))
    return ((inputs["ids"][:, None] == kid[None, :]) & (kid != EMPTY)[None, :]).sum(1).cpu()


def _oracle_run(inputs, tau, **kw):
    inputs64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else
                    tuple(t.double() if t.is_floating_point() else t for t in v) if isinstance(v, tuple) else v)
                for k, v in inputs.items()}
    return _run(_oracle, inputs64, tau, torch.float64, **kw)


def _check_ids(inputs, tau, dtype, backend, **kw):
    """Loss and the gradients of both features and the temperature against the oracle:
    ``|got - truth| <= 3 |reference_same_dtype - truth| + NORM_RTOL * cond * max|truth|``,
    the bound rejecting a 1 % error on the largest element (test_focal_itc's helpers)."""
    tau_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    got = _run(softmask.focal_itc_loss, inputs, tau, tau_dtype, backend=backend, **kw)
    same = _run(reference.focal_itc_loss_reference, inputs, tau, tau_dtype, **kw)
    truth = _oracle_run(inputs, tau, **kw)
    cond = _cond(dtype, tau)
    for name, g, s, t in zip(NAMES, got, same, truth):
        assert g.dtype == s.dtype, name
        assert_close(g, t, dtype=dtype, same_dtype_ref=s, cond=cond, name=f"{backend} {name}")
        _assert_tolerance_catches(t, s, dtype, cond, name)
    return got, truth


# --------------------------------------------------------------------------- accuracy against the oracle


def test_problem_has_the_cases_it_claims():
    """The generated ids hold what the tests below rely on: a row with several positives
    (batch and queue), a row without any, and empty queue slots."""
    for clip in (False, True):
        inputs = _id_problem(7, 40, 16, torch.float64, clip=clip, momentum=False, seed=0)
        c = _counts(inputs)
        assert int(c.max()) >= (3 if not clip else 2) and int(c[-1]) == 0, c
        if not clip:
            assert int((inputs["key_ids"][1] == EMPTY).sum()) >= 10


ALBEF_CASES = [(0.0, 0.0, 0.07), (2.0, 0.0, 0.07), (2.0, 0.4, 0.07), (0.5, 0.4, 0.001), (5.0, 1.0, 0.5)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gamma,alpha,tau", ALBEF_CASES)
def test_albef_mode_matches_oracle(backend, dtype, gamma, alpha, tau):
    inputs = _id_problem(7, 40, 16, dtype, clip=False, momentum=alpha > 0, seed=int(10 * gamma + 100 * alpha))
    _check_ids(inputs, tau, dtype, backend, gamma=gamma, alpha=alpha)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_albef_mode_half_precision(backend, dtype):
    inputs = _id_problem(7, 40, 16, dtype, clip=False, momentum=True, seed=2)
    _check_ids(inputs, 0.07, dtype, backend, gamma=2.0, alpha=0.4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("gamma,tau", [(0.0, 0.07), (0.5, 0.001), (2.0, 0.07)])
def test_clip_mode_matches_oracle(backend, dtype, gamma, tau):
    """CLIP mode: both directions match ids against ids (gradient into both sides,
    including the key gradient, which recomputes the focal terms at the positives)."""
    inputs = _id_problem(9, 0, 16, dtype, clip=True, momentum=False, seed=int(10 * gamma))
    _check_ids(inputs, tau, dtype, backend, gamma=gamma)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction,ids_as_tensor", [("sum", True), ("none", False)])
def test_reductions_and_key_ids_layouts(backend, reduction, ids_as_tensor):
    """Key ids as one [N] tensor beside key banks in parts, or as parts; reductions."""
    inputs = _id_problem(7, 40, 16, torch.float64, clip=False, momentum=True, seed=5, ids_as_tensor=ids_as_tensor)
    _check_ids(inputs, 0.07, torch.float64, backend, gamma=2.0, alpha=0.4, reduction=reduction)


# --------------------------------------------------------------------------- rows without a positive


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clip", [False, True])
def test_row_without_positive(backend, clip):
    """The last row's id is -100, which matches nothing (not even the -100 of its own key):
    with alpha = 0 its loss is exactly 0 and so is its share of the gradient (upstream
    weight only on that row); with alpha = 0.4 its loss is the distillation term alone,
    ``-0.4 * sum softmax(zm) (1-p)^gamma log p``, not renormalized."""
    B = 7
    for alpha in ((0.0,) if clip else (0.0, 0.4)):
        inputs = _id_problem(B, 40, 16, torch.float64, clip=clip, momentum=alpha > 0, seed=3)
        assert int(_counts(inputs)[-1]) == 0
        rest = {k: v for k, v in inputs.items() if k not in ("image_feat", "text_feat")}
        img = inputs["image_feat"].clone().requires_grad_()
        txt = inputs["text_feat"].clone().requires_grad_()
        tau = torch.tensor(0.07, dtype=torch.float64, device=img.device, requires_grad=True)
        rows = softmask.focal_itc_loss(img, txt, tau, gamma=2.0, alpha=alpha, reduction="none", backend=backend,
                                       **rest)
        assert torch.isfinite(rows).all()
        if alpha == 0:
            assert float(rows[-1].detach()) == 0.0 and float(rows[:-1].detach().abs().min()) > 0
            rows[-1].backward()
            if not clip:  # in CLIP mode the row's features are also other rows' keys
                for g in (img.grad, txt.grad, tau.grad):
                    assert float(g.abs().max()) == 0.0
        else:
            i, t = inputs["image_feat"][-1:], inputs["text_feat"][-1:]
            tk, ik = torch.cat(rest["text_keys"]), torch.cat(rest["image_keys"])
            distill = 0.0
            for q, qm, k in ((i, rest["image_feat_m"][-1:], tk), (t, rest["text_feat_m"][-1:], ik)):
                logp = torch.log_softmax(q @ k.t() / 0.07, dim=1)
                soft = torch.softmax(qm @ k.t() / 0.07, dim=1)
                distill = distill + 0.5 * -(0.4 * soft * (-torch.expm1(logp)) ** 2 * logp).sum()
            assert_close(rows[-1], distill, dtype=torch.float64, name="distillation-only row")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fewer_keys_than_rows_with_ids(backend):
    """With ids the position rule (row i's positive is key i) is gone, so N < B is valid."""
    inputs = _id_problem(9, 0, 16, torch.float64, clip=False, momentum=True, seed=8)
    inputs["text_keys"], inputs["image_keys"] = inputs["text_keys"][0][:5], inputs["image_keys"][0][:5]
    inputs["key_ids"] = torch.tensor([0, 1, EMPTY, 3, 1], device=DEVICE)
    inputs["ids"] = torch.tensor([0, 1, 2, 3, 1, 0, 9, 3, EMPTY], device=DEVICE)
    _check_ids(inputs, 0.07, torch.float64, backend, gamma=2.0, alpha=0.4)


# --------------------------------------------------------------------------- arange ids == no ids


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["albef-onehot", "albef-distill", "clip"])
def test_arange_ids_equal_no_ids(backend, dtype, mode):
    """``ids = arange(B)``, batch key ids ``arange(B)`` and an empty queue (-100) give the
    loss and gradients of no ids: bit for bit on the reference backend and on the torch
    backend's momentum-target path (same values, sums with exact zeros); within the dtype's
    normwise bound where no ids take another path than ids: triton's one-hot shortcut, the
    torch backend's tiled one-hot and CLIP paths (ids take its row-block path)."""
    B, Q = 7, 40
    clip, alpha = mode == "clip", 0.4 if mode == "albef-distill" else 0.0
    inputs = _problem(B, B + Q, 16, dtype, clip=clip, momentum=alpha > 0, seed=4)
    if not clip:
        inputs["text_keys"] = (inputs["text_keys"][:B], inputs["text_keys"][B:])
        inputs["image_keys"] = (inputs["image_keys"][:B], inputs["image_keys"][B:])
    tau_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    kw = dict(gamma=2.0, alpha=alpha, backend=backend)
    base = _run(softmask.focal_itc_loss, inputs, 0.07, tau_dtype, **kw)
    ids = torch.arange(B, device=DEVICE)
    with_ids = dict(inputs, ids=ids)
    if not clip:
        with_ids["key_ids"] = (ids.clone(), torch.full((Q,), EMPTY, device=DEVICE))
    got = _run(softmask.focal_itc_loss, with_ids, 0.07, tau_dtype, **kw)
    for name, a, b in zip(NAMES, base, got):
        if backend == "triton" or (backend == "torch" and alpha == 0):
            assert_close(b, a, dtype=dtype, name=f"{name} with arange ids")
        else:
            assert torch.equal(a, b), f"{backend} {name}: arange ids differ from no ids"


# --------------------------------------------------------------------------- splits over the keys (triton)


def _direction_truth(q, parts, qm, tau, gamma, alpha, ids, key_ids, w):
    """Oracle of one direction: rows [B], and the gradients of ``sum_i w_i L_i`` with
    respect to Q, tau and the (concatenated) keys."""
    q64 = q.double().clone().requires_grad_()
    k64 = torch.cat([p.double() for p in parts]).requires_grad_()
    t = torch.tensor(tau, dtype=torch.float64, device=q.device, requires_grad=True)
    sim_m = None if qm is None else (qm.double() @ k64.detach().t() / t.detach())
    rows = _albef_rows(q64 @ k64.t() / t, sim_m, ids, key_ids, alpha, gamma)
    (rows * w).sum().backward()
    return rows.detach(), q64.grad, t.grad, k64.grad


@pytest.mark.parametrize("splits,gamma,alpha,tau", [(1, 2.0, 0.4, 0.07), (3, 2.0, 0.4, 0.07), (4, 2.0, 0.4, 0.07),
                                                    (3, 0.5, 0.0, 0.07), (4, 0.5, 0.0, 0.07), (3, 0.3, 0.4, 0.001)])
def test_split_over_keys_with_ids(monkeypatch, splits, gamma, alpha, tau):
    """Forced key splits of the triton launcher with ids, NaN-poisoned buffers. The
    interpreter's tiles hold 64 keys: 3 splits of N = 130 are [0, 64), [64, 128),
    [128, 130) and the 4th of 4 holds only padding. Key ids ``j % 13`` (every 7th slot
    empty) put each row's positives in every split, so the counts are merged across
    splits; row ids include -100 and an id no key has (no positive), and the key bank and
    its ids come in two parts split at row 50 (with 3 splits the ids come as one tensor,
    which the launcher cuts into views at the parts' boundary)."""
    _poison_buffers(monkeypatch)
    B, N = 40, 130
    q = _feats(B, 24, dtype=torch.float64, seed=31)
    k = _feats(N, 24, dtype=torch.float64, seed=32)
    qm = _feats(B, 24, dtype=torch.float64, seed=33) if alpha > 0 else None
    key_ids = torch.arange(N) % 13
    key_ids[::7] = EMPTY
    ids = torch.arange(B) % 13
    ids[5], ids[6] = EMPTY, 99
    key_ids, ids = key_ids.to(DEVICE), ids.to(DEVICE)
    parts = (k[:50], k[50:])
    kid_arg = key_ids if splits == 3 else (key_ids[:50], key_ids[50:])
    tau_t = torch.tensor(tau, dtype=torch.float64, device=q.device)
    w = torch.linspace(0.5, 1.5, B, dtype=torch.float64, device=q.device)
    loss, dq, dtau, stats = focal_kernels.focal_itc_direction_triton(q, parts, qm, tau_t, gamma, alpha, ids=ids,
                                                                     key_ids=kid_arg, splits=splits)
    rows, dq_true, dtau_true, _ = _direction_truth(q, parts, qm, tau, gamma, alpha, ids, key_ids, w)
    counts = ((ids[:, None] == key_ids[None, :]) & (key_ids != EMPTY)[None, :]).sum(1)
    assert int(counts.min()) == 0 and int(counts.max()) >= 8
    cond = _cond(torch.float64, tau)
    assert_close(loss, rows, dtype=torch.float64, cond=cond, name=f"loss, {splits} splits")
    assert_close(dq * w[:, None], dq_true, dtype=torch.float64, cond=cond, name=f"dQ, {splits} splits")
    assert_close((dtau * w).sum(), dtau_true, dtype=torch.float64, cond=cond, name=f"dtau, {splits} splits")
    assert torch.equal(stats[3].cpu(), counts.double().cpu()), "positive counts"
    assert_close(stats[0], torch.logsumexp(q @ k.t() / tau, dim=1), dtype=torch.float64, cond=cond, name="lse")


@pytest.mark.parametrize("with_ids", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gamma,tau", [(2.0, 0.07), (1.0, 0.07), (0.0, 0.07), (0.5, 0.001), (2.0, 0.001), (3.0, 0.5)])
def test_torch_key_tiles(monkeypatch, with_ids, dtype, gamma, tau):
    """The torch backend's momentum-target path tiled over the keys: a block budget of
    3 x 130 logits gives row blocks of 14 or 13 rows (B = 40: 3 blocks), a tile budget
    of 3 x 14 x 7 gives tiles of 21 keys (N = 130: 7 tiles, the last of 4 keys), so the
    diagonal's one-hot mass and a row's positives fall in several tiles and every tile
    of a block both holds and lacks them. Against the float64 oracle, and against the
    untiled path of the same dtype."""
    monkeypatch.setattr(focal_ops, "TORCH_TILED_BLOCK_ELEMS", 3 * 130)
    monkeypatch.setattr(focal_ops, "TORCH_TILE_ELEMS", 3 * 14 * 7)
    B, N, D, alpha = 40, 130, 24, 0.4
    q = _feats(B, D, dtype=dtype, seed=51)
    k = _feats(N, D, dtype=dtype, seed=52)
    qm = _feats(B, D, dtype=dtype, seed=53)
    k[:B] = F.normalize(q.double().cpu() + 0.3 * k[:B].double().cpu(), dim=-1).to(device=k.device, dtype=dtype)
    if with_ids:
        key_ids = torch.arange(N) % 13
        key_ids[::7] = EMPTY
        ids = torch.arange(B) % 13
        ids[5], ids[6] = EMPTY, 99
        key_ids, ids = key_ids.to(DEVICE), ids.to(DEVICE)
    else:
        ids, key_ids = None, None
    tau_t = torch.tensor(tau, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=q.device)
    w = torch.linspace(0.5, 1.5, B, dtype=torch.float64, device=q.device)
    before = [x.clone() for x in (q, k, qm)]
    tiled = focal_ops.focal_itc_direction_torch(q, (k[:50], k[50:]), qm, tau_t, gamma, alpha, ids=ids,
                                                key_ids=None if ids is None else (key_ids[:50], key_ids[50:]))[:4]
    assert all(torch.equal(a, b) for a, b in zip(before, (q, k, qm))), "the inputs were written to"
    monkeypatch.setattr(focal_ops, "TILED_TARGETS", False)
    untiled = focal_ops.focal_itc_direction_torch(q, k, qm, tau_t, gamma, alpha, ids=ids, key_ids=key_ids)[:4]
    o_ids = torch.arange(B, device=DEVICE) if ids is None else ids
    o_kids = torch.arange(N, device=DEVICE) if ids is None else key_ids
    rows, dq_true, dtau_true, _ = _direction_truth(q, (k,), qm, tau, gamma, alpha, o_ids, o_kids, w)
    cond = _cond(dtype, tau)
    for name, (loss, dq, dtau, stats) in (("tiled", tiled), ("untiled", untiled)):
        assert_close(loss.double(), rows, dtype=dtype, cond=cond, name=f"{name} loss")
        assert_close(dq.double() * w[:, None], dq_true, dtype=dtype, cond=cond, name=f"{name} dQ")
        assert_close((dtau.double() * w).sum(), dtau_true, dtype=dtype, cond=cond, name=f"{name} dtau")
    lse = torch.logsumexp(q.double() @ k.double().t() / tau, dim=1)
    assert_close(tiled[3][0].double(), lse, dtype=dtype, cond=cond, name="lse")
    # S and g at the diagonal (stats[1], stats[2]; g is recorded for the key gradient, which never runs with
    # momentum targets): the two paths write the focal terms in different forms, equal up to float64 rounding,
    # a few float32 ulps apart (the loss and gradients above are what the float32 bound is for)
    assert torch.equal(tiled[3][3], untiled[3][3]), "positive counts"
    if dtype == torch.float64:
        for i, what in enumerate(("lse", "S", "g_ii")):
            assert_close(tiled[3][i], untiled[3][i], dtype=dtype, cond=cond, name=f"stats {what}")


@pytest.mark.parametrize("splits", [2, 6])
def test_key_gradient_row_splits_with_ids(monkeypatch, splits):
    """CLIP mode's key gradient with ids and forced splits of the query rows (interpreter
    tiles of 32 rows: B = 130 makes 5 tiles; of 6 splits the last holds none)."""
    _poison_buffers(monkeypatch)
    B, gamma, tau = 130, 2.0, 0.05
    q = _feats(B, 24, dtype=torch.float64, seed=41)
    k = _feats(B, 24, dtype=torch.float64, seed=42)
    ids = torch.arange(B) % 17
    ids[::11] = EMPTY
    ids = ids.to(DEVICE)
    tau_t = torch.tensor(tau, dtype=torch.float64, device=q.device)
    w = torch.linspace(0.5, 1.5, B, dtype=torch.float64, device=q.device)
    _, _, _, stats = focal_kernels.focal_itc_direction_triton(q, k, None, tau_t, gamma, 0.0, ids=ids, key_ids=ids)
    dk = focal_kernels.focal_itc_key_grad_triton(q, k, tau_t, stats, w, ids=ids, key_ids=ids, gamma=gamma,
                                                 splits=splits)
    _, _, _, dk_true = _direction_truth(q, (k,), None, tau, gamma, 0.0, ids, ids, w)
    assert_close(dk, dk_true, dtype=torch.float64, name=f"dK, {splits} row splits")


# --------------------------------------------------------------------------- API surface


def test_module_and_compile_take_ids():
    """``FocalITCLoss`` forwards ids; ``torch.compile(fullgraph=True)`` traces the op with
    ids (torch backend, aot_eager) and gives the eager loss and gradients."""
    inputs = _id_problem(6, 20, 16, torch.float32, clip=False, momentum=True, seed=6)
    rest = {k: v for k, v in inputs.items() if k not in ("image_feat", "text_feat")}
    mod = softmask.FocalITCLoss(gamma=2.0, alpha=0.4, backend="torch")

    def fn_loss(i, t, temp):
        return softmask.focal_itc_loss(i, t, temp, gamma=2.0, alpha=0.4, backend="torch", **rest)

    torch.testing.assert_close(mod(inputs["image_feat"], inputs["text_feat"], 0.07, **rest),
                               fn_loss(inputs["image_feat"], inputs["text_feat"], 0.07), rtol=0, atol=0)
    torch._dynamo.reset()
    compiled = torch.compile(fn_loss, fullgraph=True, backend="aot_eager")
    outs = []
    for f in (fn_loss, compiled):
        img = inputs["image_feat"].clone().requires_grad_()
        txt = inputs["text_feat"].clone().requires_grad_()
        temp = torch.tensor(0.07, requires_grad=True, device=img.device)
        loss = f(img, txt, temp)
        loss.backward()
        outs.append((loss.detach(), img.grad, txt.grad, temp.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)


def _good():
    """ALBEF mode, B = 4, banks of 4 + 6 keys in parts, with ids."""
    inputs = _problem(4, 10, 8, torch.float32, clip=False, momentum=True)
    inputs["text_keys"] = (inputs["text_keys"][:4], inputs["text_keys"][4:])
    inputs["image_keys"] = (inputs["image_keys"][:4], inputs["image_keys"][4:])
    ids = torch.tensor([0, 1, 1, 2], device=DEVICE)
    inputs.update(ids=ids, key_ids=(ids, torch.tensor([1, EMPTY, 2, 5, EMPTY, 0], device=DEVICE)))
    return inputs


def _clip(a):
    for k in ("text_keys", "image_keys", "image_feat_m", "text_feat_m", "key_ids"):
        a.pop(k)
    a["alpha"] = 0.0


BAD_IDS = [
    ("ids float", lambda a: a.update(ids=a["ids"].float()), TypeError, "ids: expected dtype in (int64), got float32"),
    ("ids int32", lambda a: a.update(ids=a["ids"].int()), TypeError, "ids: expected dtype in (int64), got int32"),
    ("ids list", lambda a: a.update(ids=[0, 1, 1, 2]), TypeError,
     "ids: expected a torch.Tensor of int64 ids, got list"),
    ("ids length", lambda a: a.update(ids=a["ids"][:3]), ValueError,
     "ids: expected shape (4,) (one id per row of image_feat), got (3,)"),
    ("ids 2-D", lambda a: a.update(ids=a["ids"][:, None]), ValueError, "ids: expected shape (4,)"),
    ("ids device", lambda a: a.update(ids=a["ids"].to("meta")), ValueError, "ids: expected device"),
    ("ids without key_ids", lambda a: a.pop("key_ids"), ValueError, "key_ids: expected the key banks' ids"),
    ("key_ids without ids", lambda a: a.pop("ids"), ValueError, "ids: expected [B] int64 row ids since key_ids"),
    ("key_ids length", lambda a: a.update(key_ids=torch.cat(a["key_ids"])[:9]), ValueError,
     "key_ids: expected shape (10,) (one id per key of text_keys), got (9,)"),
    ("key_ids float", lambda a: a.update(key_ids=torch.cat(a["key_ids"]).double()), TypeError,
     "key_ids: expected dtype in (int64), got float64"),
    ("key_ids part count", lambda a: a.update(key_ids=(a["key_ids"][0], a["key_ids"][1][:3], a["key_ids"][1][3:])),
     ValueError, "key_ids: expected 2 part(s) matching the parts of text_keys (lengths [4, 6]), got 3"),
    ("key_ids part length", lambda a: a.update(key_ids=(a["key_ids"][0][:3], torch.cat([a["key_ids"][0][3:],
                                                                                        a["key_ids"][1]]))),
     ValueError, "key_ids[0]: expected shape (4,) (as text_keys[0]), got (3,)"),
    ("key_ids parts vs one bank", lambda a: a.update(text_keys=torch.cat(a["text_keys"])), ValueError,
     "key_ids: expected 1 part(s) matching the parts of text_keys (lengths [10]), got 2"),
    ("key_ids part dtype", lambda a: a.update(key_ids=(a["key_ids"][0], a["key_ids"][1].float())), TypeError,
     "key_ids[1]: expected dtype in (int64), got float32"),
    ("key_ids part device", lambda a: a.update(key_ids=(a["key_ids"][0], a["key_ids"][1].to("meta"))), ValueError,
     "key_ids[1]: expected device"),
    ("key_ids part not a tensor", lambda a: a.update(key_ids=(a["key_ids"][0], [1, 2, 3, 4, 5, 6])), TypeError,
     "key_ids[1]: expected a torch.Tensor of int64 ids, got list"),
    ("key_ids dict", lambda a: a.update(key_ids={"q": a["key_ids"][1]}), TypeError,
     "key_ids: expected a [N] int64 tensor or a tuple/list of [N_p] int64 tensors"),
    ("banks of different lengths", lambda a: a.update(key_ids=torch.cat(a["key_ids"]),
                                                      image_keys=torch.cat(a["image_keys"])[:9]), ValueError,
     "key_ids: expected shape (9,) (one id per key of image_keys), got (10,)"),
    ("key_ids in CLIP mode", lambda a: (_clip(a), a.update(key_ids=a["ids"])), ValueError,
     "key_ids: expected None in CLIP mode"),
    ("CLIP ids length", lambda a: (_clip(a), a.update(ids=a["ids"][:2])), ValueError,
     "ids: expected shape (4,) (one id per row of image_feat), got (2,)"),
]


@pytest.mark.parametrize("case", BAD_IDS, ids=[c[0] for c in BAD_IDS])
def test_bad_ids(case):
    _, mutate, exc, msg = case
    args = dict(_good(), temperature=0.07, gamma=2.0, alpha=0.4)
    mutate(args)
    with pytest.raises(exc, match=re.escape(msg)):
        softmask.focal_itc_loss(**args)


def test_good_inputs_pass_validation():
    """The base of the bad-input cases is itself accepted (so each case fails for its own
    reason), in ALBEF and CLIP mode."""
    args = dict(_good(), temperature=0.07, gamma=2.0, alpha=0.4)
    assert torch.isfinite(softmask.focal_itc_loss(**args))
    _clip(args)
    assert torch.isfinite(softmask.focal_itc_loss(**args))
