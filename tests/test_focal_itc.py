"""focal_itc_loss: every backend against a float64 ground truth from softmask.reference,
gradcheck, the cross-entropy special case, edges (temperature 0.001, p -> 1), layouts,
reductions, bad inputs and torch.compile."""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch
import torch.nn.functional as F

import softmask
from softmask import reference
from softmask.kernels import focal_itc as focal_kernels
from softmask.ops import focal_itc as focal_ops
from tests.helpers import NORM_RTOL, assert_close

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
BACKENDS = ["torch", "triton"]
CPU_DTYPES = [torch.float16, torch.float32, torch.float64]


def _feats(*shape, dtype, seed, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)
    return x.to(device=device, dtype=dtype)


def _problem(B, N, D, dtype, *, clip, momentum, seed=0):
    inputs = dict(image_feat=_feats(B, D, dtype=dtype, seed=seed), text_feat=_feats(B, D, dtype=dtype, seed=seed + 1))
    if not clip:
        # The batch's positives near their queries, as momentum features are.
        tk = _feats(N, D, dtype=torch.float64, seed=seed + 2)
        ik = _feats(N, D, dtype=torch.float64, seed=seed + 3)
        tk[:B] = F.normalize(inputs["text_feat"].double().cpu() + 0.3 * tk[:B].cpu(), dim=-1).to(tk.device)
        ik[:B] = F.normalize(inputs["image_feat"].double().cpu() + 0.3 * ik[:B].cpu(), dim=-1).to(ik.device)
        inputs.update(text_keys=tk.to(dtype), image_keys=ik.to(dtype))
        if momentum:
            inputs.update(image_feat_m=_feats(B, D, dtype=dtype, seed=seed + 4),
                          text_feat_m=_feats(B, D, dtype=dtype, seed=seed + 5))
    return inputs


def _run(fn, inputs, tau, tau_dtype, **kw):
    """Loss and gradients (image_feat, text_feat, temperature) of ``fn``."""
    t = torch.tensor(tau, dtype=tau_dtype, device=inputs["image_feat"].device, requires_grad=True)
    img = inputs["image_feat"].detach().clone().requires_grad_()
    txt = inputs["text_feat"].detach().clone().requires_grad_()
    rest = {k: v for k, v in inputs.items() if k not in ("image_feat", "text_feat")}
    loss = fn(img, txt, t, **rest, **kw)
    upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device).view(loss.shape)
    (loss * upstream).sum().backward()
    return loss.detach(), img.grad, txt.grad, t.grad


def _truth(inputs, tau, **kw):
    inputs64 = {k: v.double() for k, v in inputs.items()}
    return _run(reference.focal_itc_loss_reference, inputs64, tau, torch.float64, **kw)


# Rounding of the logits: a float32 (float64) accumulator rounds z = Q.K / tau, |z| <= 1/tau
# for unit features, by eps_acc / tau, which moves every p and gradient by about that much
# relative to their scale. The normwise term of the tolerance gets that much on top of the
# dtype's own NORM_RTOL (rather than multiplying NORM_RTOL, which let a bf16 result be off
# by twice its largest value at tau = 0.001). Measured worst float32 case (tau = 0.001,
# test_albef_mode_grid): 1.4e-5 * max|truth| = 0.12 eps_32 / tau; LOGIT_ROUNDING allows 0.5.
LOGIT_ROUNDING = 0.5
ACC_EPS = {torch.float64: torch.finfo(torch.float64).eps}
ACC_EPS.update({d: torch.finfo(torch.float32).eps for d in (torch.float32, torch.float16, torch.bfloat16)})


def _cond(dtype, tau):
    """``cond`` for :func:`assert_close`: normwise bound ``NORM_RTOL + 0.5 * eps_acc / tau``."""
    return 1.0 + LOGIT_ROUNDING * ACC_EPS[dtype] / (tau * NORM_RTOL[dtype])


def _assert_tolerance_catches(truth, same, dtype, cond, name):
    """The tolerance in use must reject an error of 1 % of the largest |truth| placed on the
    largest element (half-precision bf16: 5 %; its NORM_RTOL of 3 % covers the rounding of
    probabilities to bf16 before the tensor-core products, 2^-9 relative each, which the
    dQ = S * sum p K - sum q g K difference can amplify, and has not been measured tighter
    on a GPU yet)."""
    t = truth.detach().double().cpu().flatten()
    scale = float(t.abs().max())
    if scale < 1e-25:
        # Below assert_close's absolute floor (NORM_RTOL x 1e-30 x cond) no relative error is
        # resolvable: such tensors (saturated rows, gradients ~1e-180) are only held that small.
        return
    frac = 0.05 if dtype == torch.bfloat16 else 0.01
    bad = t.clone()
    i = int(t.abs().argmax())
    bad[i] += frac * scale
    with pytest.raises(AssertionError):
        assert_close(bad.view(truth.shape), truth, dtype=dtype, same_dtype_ref=same, cond=cond, name=name)


def _check_all(inputs, tau, dtype, backend, **kw):
    tau_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    got = _run(softmask.focal_itc_loss, inputs, tau, tau_dtype, backend=backend, **kw)
    same = _run(reference.focal_itc_loss_reference, inputs, tau, tau_dtype, **kw)
    truth = _truth(inputs, tau, **kw)
    cond = _cond(dtype, tau)
    for name, g, s, t in zip(("loss", "d image_feat", "d text_feat", "d temperature"), got, same, truth):
        assert g.dtype == s.dtype, name
        assert_close(g, t, dtype=dtype, same_dtype_ref=s, cond=cond, name=f"{backend} {name}")
        _assert_tolerance_catches(t, s, dtype, cond, name)


# --------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gamma,alpha,tau", list(itertools.product([0.0, 0.5, 1.0, 2.0, 5.0], [0.0, 0.4, 1.0],
                                                                   [0.001, 0.07, 0.5])))
def test_albef_mode_grid(backend, dtype, gamma, alpha, tau):
    inputs = _problem(7, 83, 24, dtype, clip=False, momentum=alpha > 0, seed=int(gamma * 10 + alpha * 100))
    _check_all(inputs, tau, dtype, backend, gamma=gamma, alpha=alpha)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gamma,alpha,tau", [(0.0, 0.0, 0.07), (2.0, 0.4, 0.07), (0.5, 0.4, 0.001), (5.0, 1.0, 0.5)])
def test_albef_mode_float16(backend, gamma, alpha, tau):
    inputs = _problem(7, 83, 24, torch.float16, clip=False, momentum=alpha > 0)
    _check_all(inputs, tau, torch.float16, backend, gamma=gamma, alpha=alpha)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("gamma,tau", [(0.0, 0.07), (0.5, 0.001), (2.0, 0.07), (5.0, 0.5)])
def test_clip_mode(backend, dtype, gamma, tau):
    inputs = _problem(23, 0, 40, dtype, clip=True, momentum=False)
    _check_all(inputs, tau, dtype, backend, gamma=gamma)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,N", [(1, 1), (1, 70), (7, 7), (123, 301)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_batch_sizes_and_reductions(backend, B, N, reduction):
    inputs = _problem(B, N, 40, torch.float32, clip=False, momentum=True, seed=B)
    _check_all(inputs, 0.07, torch.float32, backend, gamma=2.0, alpha=0.4, reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B", [1, 123])
def test_clip_mode_batch_sizes(backend, B):
    inputs = _problem(B, 0, 33, torch.float64, clip=True, momentum=False, seed=B)
    _check_all(inputs, 0.05, torch.float64, backend, gamma=1.0, reduction="none")


def test_torch_backend_row_blocks(monkeypatch):
    """Several row blocks of the torch backend (tiny block budget) give the same result."""
    monkeypatch.setattr(focal_ops, "TORCH_BLOCK_ELEMS", 3 * 101)
    for clip in (False, True):
        inputs = _problem(11, 101, 16, torch.float64, clip=clip, momentum=not clip)
        kw = dict(gamma=2.0, alpha=0.0 if clip else 0.4)
        _check_all(inputs, 0.07, torch.float64, "torch", **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    for clip in (False, True):
        inputs = _problem(3, 5, 4, torch.float64, clip=clip, momentum=not clip, seed=3)
        rest = {k: v for k, v in inputs.items() if k not in ("image_feat", "text_feat")}
        img = inputs["image_feat"].clone().requires_grad_()
        txt = inputs["text_feat"].clone().requires_grad_()
        for alpha in ((0.0,) if clip else (0.0, 0.4)):
            # The distillation targets depend on the temperature but are constants for
            # autograd (stop-gradient), so the temperature is checked at alpha = 0 only.
            tau = torch.tensor(0.2, dtype=torch.float64, requires_grad=alpha == 0)

            def fn(i, t, temp):
                return softmask.focal_itc_loss(i, t, temp, gamma=0.5, alpha=alpha, reduction="none",
                                               backend=backend, **(rest if alpha else {k: v for k, v in rest.items()
                                                                                       if k.endswith("keys")}))

            assert torch.autograd.gradcheck(fn, (img, txt, tau), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("clip", [False, True])
def test_gamma_alpha_zero_is_cross_entropy(backend, clip):
    inputs = _problem(9, 9 if clip else 50, 16, torch.float64, clip=clip, momentum=False)
    tau = 0.07
    i, t = inputs["image_feat"], inputs["text_feat"]
    tk = t if clip else inputs["text_keys"]
    ik = i if clip else inputs["image_keys"]
    labels = torch.arange(9)
    expected = 0.5 * (F.cross_entropy(i @ tk.t() / tau, labels) + F.cross_entropy(t @ ik.t() / tau, labels))
    got = softmask.focal_itc_loss(i, t, tau, gamma=0.0, alpha=0.0, backend=backend,
                                  **{k: v for k, v in inputs.items() if k not in ("image_feat", "text_feat")})
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- the reference, checked by loops


def _loop_direction(Q, K, Qm, tau, gamma, alpha):
    """One direction written out over rows and keys with Python floats (no torch): per-row
    losses and the gradients of their sum with respect to Q, K and tau, from the DESIGN.md
    formulas (targets are constants, as the op's stop-gradient makes them)."""
    B, D, N = len(Q), len(Q[0]), len(K)
    rows, dQ, dK, dtau = [], [[0.0] * D for _ in range(B)], [[0.0] * D for _ in range(N)], 0.0
    for i in range(B):
        z = [sum(Q[i][d] * K[j][d] for d in range(D)) / tau for j in range(N)]
        top = max(z)
        lse = top + math.log(sum(math.exp(v - top) for v in z))
        l = [v - lse for v in z]
        p = [math.exp(v) for v in l]
        tgt = [0.0] * N
        if alpha > 0:
            zm = [sum(Qm[i][d] * K[j][d] for d in range(D)) / tau for j in range(N)]
            top_m = max(zm)
            total_m = sum(math.exp(v - top_m) for v in zm)
            tgt = [alpha * math.exp(v - top_m) / total_m for v in zm]
        tgt[i] += 1.0 - alpha
        om = [-math.expm1(v) for v in l]  # 1 - p
        rows.append(-sum(tgt[j] * om[j] ** gamma * l[j] for j in range(N)))
        g = [om[j] ** gamma - gamma * om[j] ** (gamma - 1.0) * p[j] * l[j] for j in range(N)]
        S = sum(tgt[j] * g[j] for j in range(N))
        dz = [p[k] * S - tgt[k] * g[k] for k in range(N)]
        for d in range(D):
            dQ[i][d] = sum(dz[k] * K[k][d] for k in range(N)) / tau
            for k in range(N):
                dK[k][d] += dz[k] * Q[i][d] / tau
        dtau -= sum(dz[k] * z[k] for k in range(N)) / tau
    return rows, dQ, dK, dtau


@pytest.mark.parametrize("clip,gamma,alpha", [(False, 0.5, 0.4), (False, 2.0, 0.4), (False, 0.3, 1.0),
                                              (False, 2.0, 0.0), (True, 0.5, 0.0), (True, 2.0, 0.0)])
def test_reference_matches_explicit_loops(clip, gamma, alpha):
    """``focal_itc_loss_reference`` (materialized, autograd) against :func:`_loop_direction`
    in float64 at tiny sizes: loss rows and every gradient, temperature included."""
    B, N, D, tau = 3, 3 if clip else 5, 4, 0.2
    inputs = _problem(B, N, D, torch.float64, clip=clip, momentum=alpha > 0, seed=11)
    inputs = {k: v.cpu() for k, v in inputs.items()}
    got = _run(reference.focal_itc_loss_reference, inputs, tau, torch.float64, gamma=gamma, alpha=alpha,
               reduction="sum")
    lst = lambda t: t.tolist()  # noqa: E731
    img, txt = lst(inputs["image_feat"]), lst(inputs["text_feat"])
    tk, ik = (txt, img) if clip else (lst(inputs["text_keys"]), lst(inputs["image_keys"]))
    qm_i = lst(inputs["image_feat_m"]) if alpha > 0 else None
    qm_t = lst(inputs["text_feat_m"]) if alpha > 0 else None
    r1, dq1, dk1, dt1 = _loop_direction(img, tk, qm_i, tau, gamma, alpha)
    r2, dq2, dk2, dt2 = _loop_direction(txt, ik, qm_t, tau, gamma, alpha)
    # _run backpropagates the "sum" loss times its one upstream value 0.5 (linspace(0.5, 1.5, 1)).
    w = 0.5
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    d_img, d_txt = t(dq1), t(dq2)
    if clip:  # the keys are the other side's online features
        d_img, d_txt = d_img + t(dk2), d_txt + t(dk1)
    truth = (t(0.5 * (sum(r1) + sum(r2))), w * 0.5 * d_img, w * 0.5 * d_txt, t(w * 0.5 * (dt1 + dt2)))
    assert float(truth[3].abs()) > 1e-3 and float(truth[1].abs().max()) > 1e-3  # nothing vanishes by accident
    for name, g, x in zip(("loss", "d image_feat", "d text_feat", "d temperature"), got, truth):
        assert_close(g, x, dtype=torch.float64, name=f"reference {name}")


# --------------------------------------------------------------------------- split over the keys


def _poison_buffers(monkeypatch):
    """Every buffer the launchers allocate starts as NaN: an element a kernel forgets to
    write (a partial of an empty split, a row of the merge) shows up in the results."""
    monkeypatch.setattr(focal_kernels, "_empty",
                        lambda *shape, device, dtype: torch.full(shape, float("nan"), device=device, dtype=dtype))


def _direction_truth(q, parts, qm, tau, gamma, alpha, w):
    """float64 reference of one direction: rows [B] and the gradients of ``sum_i w_i L_i``
    with respect to Q [B, D], tau and the (concatenated) keys [N, D]."""
    q64 = q.double().clone().requires_grad_()
    k64 = torch.cat([p.double() for p in parts]).requires_grad_()
    t = torch.tensor(tau, dtype=torch.float64, requires_grad=True)
    rows = reference.focal_itc_rows_reference(q64, k64, t, gamma=gamma, alpha=alpha,
                                              query_m=None if qm is None else qm.double())
    (rows * w).sum().backward()
    return rows.detach(), q64.grad, t.grad, k64.grad


@pytest.mark.parametrize("splits", [1, 3, 4])
@pytest.mark.parametrize("gamma,alpha,tau", [(2.0, 0.4, 0.07), (0.5, 0.0, 0.07), (0.3, 0.4, 0.001)])
def test_split_over_keys_matches_float64(monkeypatch, splits, gamma, alpha, tau):
    """Forced key splits of the triton launcher against the float64 reference. The
    interpreter's tiles hold 64 keys, so 3 splits of N = 130 keys are [0, 64), [64, 128),
    [128, 130): they do not divide N, each holds positives (B = N), and the last holds 2
    keys and 62 padding columns; the 4th of 4 splits holds only padding. The bank comes in
    two parts split at row 50. tau = 0.001 saturates the positives (p_ii -> 1)."""
    _poison_buffers(monkeypatch)
    B = N = 130
    inputs = _problem(B, N, 24, torch.float64, clip=False, momentum=True, seed=7)
    q, k, qm = inputs["image_feat"], inputs["text_keys"], inputs["image_feat_m"] if alpha > 0 else None
    parts = (k[:50], k[50:])
    tau_t = torch.tensor(tau, dtype=torch.float64, device=q.device)
    w = torch.linspace(0.5, 1.5, B, dtype=torch.float64)
    loss, dq, dtau, stats = focal_kernels.focal_itc_direction_triton(q, parts, qm, tau_t, gamma, alpha, splits=splits)
    rows, dq_true, dtau_true, _ = _direction_truth(q, parts, qm, tau, gamma, alpha, w)
    cond = _cond(torch.float64, tau)
    assert_close(loss, rows, dtype=torch.float64, cond=cond, name=f"loss, {splits} splits")
    assert_close(dq * w[:, None].to(dq.device), dq_true, dtype=torch.float64, cond=cond, name=f"dQ, {splits} splits")
    assert_close((dtau.cpu() * w).sum(), dtau_true, dtype=torch.float64, cond=cond, name=f"dtau, {splits} splits")
    lse_true = torch.logsumexp(q.double() @ k.double().t() / tau, dim=1)
    assert_close(stats[0], lse_true, dtype=torch.float64, cond=cond, name="lse")


@pytest.mark.parametrize("splits", [1, 2, 6])
def test_key_gradient_row_splits_match_float64(monkeypatch, splits):
    """CLIP mode's key gradient with forced splits of the query rows (interpreter tiles of
    32 rows): B = 130 rows make 5 tiles; 2 splits are [0, 96) and [96, 130); of 6 splits
    the 5th holds rows [128, 130) and the 6th none."""
    _poison_buffers(monkeypatch)
    B, gamma, tau = 130, 2.0, 0.05
    q = _feats(B, 24, dtype=torch.float64, seed=21)
    k = _feats(B, 24, dtype=torch.float64, seed=22)
    tau_t = torch.tensor(tau, dtype=torch.float64, device=q.device)
    w = torch.linspace(0.5, 1.5, B, dtype=torch.float64)
    _, _, _, stats = focal_kernels.focal_itc_direction_triton(q, k, None, tau_t, gamma, 0.0)
    dk = focal_kernels.focal_itc_key_grad_triton(q, k, tau_t, stats, w.to(q.device), splits=splits)
    _, _, _, dk_true = _direction_truth(q, (k,), None, tau, gamma, 0.0, w)
    assert_close(dk, dk_true, dtype=torch.float64, name=f"dK, {splits} row splits")


def test_split_plan_fills_the_gpu(monkeypatch):
    """The launcher's plan for a 132-SM GPU: at least 2 programs per SM for B from 32 to
    32,768 at N = B + 65,536 keys, no empty split, each split's partial accumulator at most
    1/4 of its key bytes (or a single split), and the same for the CLIP key gradient."""
    monkeypatch.setattr(focal_kernels, "interpreting", lambda: False)
    monkeypatch.setattr(focal_kernels, "sm_count", lambda device: 132)
    cuda = torch.device("cuda")
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        elem = torch.empty((), dtype=dtype).element_size()
        for B in (32, 64, 100, 128, 512, 1000, 4096, 32768):
            N = B + 65536
            blocks, _, per_split, splits = focal_kernels._plan(B, N, 256, dtype, cuda)
            bm, bn = blocks["BLOCK_M"], blocks["BLOCK_N"]
            assert -(-B // bm) * splits >= 2 * 132, (dtype, B, blocks, splits)
            assert per_split % bn == 0 and (splits - 1) * per_split < N, (dtype, B, per_split, splits)
            assert splits == 1 or per_split * elem >= focal_kernels.PARTIAL_BYTES_FACTOR * bm, (dtype, B)
        for B in (2048, 32768):
            blocks, _, per_split, splits = focal_kernels._key_grad_plan(B, B, 512, dtype, cuda)
            assert -(-B // blocks["BLOCK_N"]) * splits >= 2 * 132 and (splits - 1) * per_split < B, (dtype, B)


# --------------------------------------------------------------------------- key banks as parts


def _as_parts(inputs, B):
    """ALBEF's layout: (momentum features of the batch, queue); the image queue stored
    column-major (as ALBEF's [D, Q] buffer transposed) to exercise part strides."""
    tk, ik = inputs["text_keys"], inputs["image_keys"]
    image_queue = ik[B:].t().contiguous().t()
    return dict(inputs, text_keys=(tk[:B], tk[B:]), image_keys=[ik[:B], image_queue])


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_key_bank_parts_equal_concatenation(backend, alpha):
    """``(feat_m, queue)`` gives the loss and gradients of ``torch.cat([feat_m, queue])``:
    bit for bit on the torch and reference backends, within float32 rounding on triton
    (whose tiles then straddle the part boundary at row 7)."""
    B = 7
    inputs = _problem(B, 83, 24, torch.float32, clip=False, momentum=alpha > 0, seed=3)
    kw = dict(gamma=2.0, alpha=alpha, backend=backend)
    whole = _run(softmask.focal_itc_loss, inputs, 0.07, torch.float32, **kw)
    split = _run(softmask.focal_itc_loss, _as_parts(inputs, B), 0.07, torch.float32, **kw)
    for name, a, b in zip(("loss", "d image_feat", "d text_feat", "d temperature"), whole, split):
        if backend == "triton":
            assert_close(b, a, dtype=torch.float32, name=name)
        else:
            assert torch.equal(a, b), f"{backend} {name}: parts differ from the concatenated bank"


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_enqueue_after_loss_does_not_change_backward(backend):
    """ALBEF writes the batch's momentum features into the queue right after the loss and
    before backward. The backward must see the keys of the forward (the op keeps no key
    part for the backward), not the overwritten queue."""
    B = 6
    inputs = _problem(B, B + 40, 16, torch.float32, clip=False, momentum=True, seed=9)

    def step(enqueue):
        tq, iq = inputs["text_keys"][B:].clone(), inputs["image_keys"][B:].clone()
        img = inputs["image_feat"].clone().requires_grad_()
        txt = inputs["text_feat"].clone().requires_grad_()
        temp = torch.tensor(0.07, requires_grad=True, device=img.device)
        kw = dict(gamma=2.0, alpha=0.4, image_feat_m=inputs["image_feat_m"], text_feat_m=inputs["text_feat_m"],
                  backend=backend)
        loss = softmask.focal_itc_loss(img, txt, temp, text_keys=(inputs["text_keys"][:B], tq),
                                       image_keys=(inputs["image_keys"][:B], iq), **kw)
        if enqueue:  # in place, as the model's ring-buffer enqueue
            tq[:B] = inputs["text_feat_m"]
            iq[:B] = inputs["image_feat_m"]
            after = softmask.focal_itc_loss(img.detach(), txt.detach(), 0.07, text_keys=(inputs["text_keys"][:B], tq),
                                            image_keys=(inputs["image_keys"][:B], iq), **kw)
            assert not torch.equal(after, loss.detach())  # the write does change what a new call sees
        loss.backward()
        return loss.detach(), img.grad, txt.grad, temp.grad

    for name, a, b in zip(("loss", "d image_feat", "d text_feat", "d temperature"), step(False), step(True)):
        assert torch.equal(a, b), f"{backend} {name} changed by the enqueue"


# --------------------------------------------------------------------------- edges and layouts


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_saturated_probabilities_are_finite(backend, gamma, dtype):
    """Temperature 0.001 and positives equal to their queries: p_ii rounds to exactly 1,
    log p_ii to 0, and (1-p)^(gamma-1) would be inf for gamma < 1."""
    B, N, D = 6, 40, 8
    img = _feats(B, D, dtype=dtype, seed=1)
    txt = img.clone()
    keys_t = torch.cat([txt, _feats(N - B, D, dtype=dtype, seed=2)])
    keys_i = torch.cat([img, _feats(N - B, D, dtype=dtype, seed=3)])
    inputs = dict(image_feat=img, text_feat=txt, text_keys=keys_t, image_keys=keys_i,
                  image_feat_m=img.clone(), text_feat_m=txt.clone())
    tau_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for alpha in (0.0, 0.4):
        got = _run(softmask.focal_itc_loss, inputs, 0.001, tau_dtype, gamma=gamma, alpha=alpha, backend=backend)
        truth = _truth(inputs, 0.001, gamma=gamma, alpha=alpha)
        same = _run(reference.focal_itc_loss_reference, inputs, 0.001, tau_dtype, gamma=gamma, alpha=alpha)
        for name, g, s, t in zip(("loss", "d image", "d text", "d tau"), got, same, truth):
            assert_close(g, t, dtype=dtype, same_dtype_ref=s, cond=_cond(dtype, 0.001), name=f"{name} alpha={alpha}")
            _assert_tolerance_catches(t, s, dtype, _cond(dtype, 0.001), name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits_do_not_overflow(backend):
    """Logits of magnitude 1000 (temperature 0.001, unit features) in float16 inputs: the
    loss and every gradient finite and equal to the float64 truth within float16's bound."""
    inputs = _problem(8, 64, 32, torch.float16, clip=False, momentum=True)
    _check_all(inputs, 0.001, torch.float16, backend, gamma=0.5, alpha=0.4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    B, N, D = 10, 70, 24
    base = _problem(B, N, D, torch.float64, clip=False, momentum=True, seed=5)
    strided = {}
    for k, v in base.items():
        wide = torch.zeros(v.shape[0], 2 * D, dtype=v.dtype, device=v.device)
        wide[:, ::2] = v
        strided[k] = wide[:, ::2]  # last-dim stride 2
    strided["text_keys"] = base["text_keys"].t().contiguous().t()  # column-major
    assert not strided["image_feat"].is_contiguous() and not strided["text_keys"].is_contiguous()
    _check_all(strided, 0.07, torch.float64, backend, gamma=2.0, alpha=0.4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_not_modified(backend):
    inputs = _problem(5, 30, 16, torch.float32, clip=False, momentum=True)
    before = {k: v.clone() for k, v in inputs.items()}
    _run(softmask.focal_itc_loss, inputs, 0.07, torch.float32, gamma=2.0, alpha=0.4, backend=backend)
    for k in inputs:
        assert torch.equal(inputs[k], before[k]), k


def test_python_float_temperature_and_parameter():
    inputs = _problem(5, 30, 16, torch.float64, clip=False, momentum=True)
    a = softmask.focal_itc_loss(**inputs, temperature=0.07, gamma=2.0, alpha=0.4)
    temp = torch.nn.Parameter(torch.tensor(0.07, dtype=torch.float64))
    b = softmask.focal_itc_loss(**inputs, temperature=temp, gamma=2.0, alpha=0.4)
    torch.testing.assert_close(a, b)
    b.backward()
    # The Parameter's gradient against the float64 truth of the same mean loss.
    t = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
    reference.focal_itc_loss_reference(**inputs, temperature=t, gamma=2.0, alpha=0.4).backward()
    assert temp.grad is not None and temp.grad.dtype == torch.float64
    assert abs(float(t.grad)) > 1.0  # a gradient that a zero or a sign flip would miss
    assert_close(temp.grad, t.grad, dtype=torch.float64, name="d temperature")


def test_module_matches_function():
    inputs = _problem(5, 30, 16, torch.float64, clip=False, momentum=True)
    mod = softmask.FocalITCLoss(gamma=1.0, alpha=0.4, reduction="sum", backend="torch")
    assert "gamma=1.0" in repr(mod)
    keys = {k: v for k, v in inputs.items() if k not in ("image_feat", "text_feat")}
    torch.testing.assert_close(
        mod(inputs["image_feat"], inputs["text_feat"], 0.07, **keys),
        softmask.focal_itc_loss(inputs["image_feat"], inputs["text_feat"], 0.07, gamma=1.0, alpha=0.4,
                                reduction="sum", **keys),
    )


def test_keys_receive_no_gradient():
    inputs = _problem(5, 30, 16, torch.float64, clip=False, momentum=True)
    tk = inputs["text_keys"].clone().requires_grad_()
    loss = softmask.focal_itc_loss(inputs["image_feat"].clone().requires_grad_(), inputs["text_feat"], 0.07,
                                   text_keys=tk, image_keys=inputs["image_keys"], alpha=0.4,
                                   image_feat_m=inputs["image_feat_m"], text_feat_m=inputs["text_feat_m"],
                                   backend="torch")
    loss.backward()
    assert tk.grad is None


# --------------------------------------------------------------------------- bad input


def _good():
    return _problem(4, 10, 8, torch.float32, clip=False, momentum=True)


BAD_CASES = [
    ("image_feat 3-D", lambda a: a.update(image_feat=a["image_feat"][None]), ValueError, "image_feat: expected a 2-D"),
    ("text_feat shape", lambda a: a.update(text_feat=a["text_feat"][:3]), ValueError, "text_feat: expected shape"),
    ("integer feats", lambda a: a.update(image_feat=torch.ones(4, 8, dtype=torch.int64)), TypeError, "image_feat: expected dtype"),
    ("dtype mismatch", lambda a: a.update(text_feat=a["text_feat"].double()), TypeError, "text_feat: expected dtype float32"),
    ("not a tensor", lambda a: a.update(image_feat=[[1.0]]), TypeError, "image_feat: expected a torch.Tensor"),
    ("keys N < B", lambda a: a.update(text_keys=a["text_keys"][:3]), ValueError, "text_keys: expected N >= B = 4"),
    ("keys D", lambda a: a.update(image_keys=a["image_keys"][:, :5]), ValueError, "image_keys: expected size 8"),
    ("one key bank", lambda a: a.update(image_keys=None), ValueError, "image_keys: expected a [N, D] key bank"),
    ("keys dtype", lambda a: a.update(text_keys=a["text_keys"].half()), TypeError, "text_keys: expected dtype float32"),
    ("temperature 0", lambda a: a.update(temperature=0.0), ValueError, "temperature: expected a finite value > 0"),
    ("temperature < 0 tensor", lambda a: a.update(temperature=torch.tensor(-0.1)), ValueError, "temperature: expected a finite value > 0, got -0.1"),
    ("temperature 1-D", lambda a: a.update(temperature=torch.tensor([0.1])), ValueError, "temperature: expected a 0-D"),
    ("temperature str", lambda a: a.update(temperature="0.1"), TypeError, "temperature: expected a Python float"),
    ("gamma < 0", lambda a: a.update(gamma=-1.0), ValueError, "gamma: expected a finite value >= 0, got -1.0"),
    ("alpha > 1", lambda a: a.update(alpha=1.5), ValueError, "alpha: expected a value in [0.0, 1.0], got 1.5"),
    ("alpha without momentum", lambda a: a.update(image_feat_m=None), ValueError, "image_feat_m: expected momentum features"),
    ("alpha in CLIP mode", lambda a: a.update(image_keys=None, text_keys=None), ValueError, "text_keys: momentum distillation"),
    ("momentum shape", lambda a: a.update(text_feat_m=a["text_feat_m"][:2]), ValueError, "text_feat_m: expected shape"),
    ("reduction", lambda a: a.update(reduction="avg"), ValueError, "reduction: expected one of"),
    ("backend", lambda a: a.update(backend="cuda"), ValueError, "backend: expected one of"),
    ("empty batch", lambda a: a.update(image_feat=a["image_feat"][:0], text_feat=a["text_feat"][:0]), ValueError, "image_feat: expected a non-empty"),
    ("key part dtype", lambda a: a.update(text_keys=(a["text_keys"][:4], a["text_keys"][4:].to(torch.bfloat16))), TypeError, "text_keys[1]: expected dtype float32 (as image_feat), got bfloat16"),
    ("key part D", lambda a: a.update(image_keys=[a["image_keys"][:4], a["image_keys"][4:, :5]]), ValueError, "image_keys[1]: expected size 8 at dim 1"),
    ("key part 1-D", lambda a: a.update(image_keys=(a["image_keys"][0], a["image_keys"])), ValueError, "image_keys[0]: expected a 2-D tensor"),
    ("key part not a tensor", lambda a: a.update(text_keys=(a["text_keys"], [[0.0] * 8])), TypeError, "text_keys[1]: expected a torch.Tensor, got list"),
    ("key parts N < B", lambda a: a.update(text_keys=(a["text_keys"][:2], a["text_keys"][2:3])), ValueError, "text_keys: expected N >= B = 4 keys (row i's positive is key i), got N = 3"),
    ("key parts empty", lambda a: a.update(text_keys=()), ValueError, "text_keys: expected a [N, D] tensor or a non-empty tuple/list"),
    ("key bank dict", lambda a: a.update(image_keys={"k": a["image_keys"]}), TypeError, "image_keys: expected a [N, D] tensor or a tuple/list of [N_p, D] tensors, got dict"),
    ("key part device", lambda a: a.update(text_keys=(a["text_keys"], a["text_keys"].to("meta"))), ValueError, "text_keys[1]: expected device"),
]


@pytest.mark.parametrize("case", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input(case):
    _, mutate, exc, msg = case
    args = dict(_good(), temperature=0.07, gamma=2.0, alpha=0.4)
    mutate(args)
    with pytest.raises(exc, match=re.escape(msg)):
        softmask.focal_itc_loss(**args)


def test_triton_reads_at_most_two_key_parts():
    args = dict(_good(), temperature=0.07, gamma=2.0, alpha=0.4, backend="triton")
    k = args["text_keys"]
    args["text_keys"] = (k[:4], k[4:7], k[7:])
    with pytest.raises(ValueError, match=r"text_keys: backend='triton' reads at most 2 non-empty key-bank parts, got 3"):
        softmask.focal_itc_loss(**args)


@pytest.mark.skipif(CUDA, reason="checks the CPU-only triton error")
def test_triton_backend_needs_cuda_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton': needs CUDA tensors"):
        softmask.focal_itc_loss(**_good(), temperature=0.07, alpha=0.4, backend="triton")


# --------------------------------------------------------------------------- torch.compile


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    inputs = _problem(6, 20, 16, torch.float32, clip=False, momentum=True)
    rest = {k: v for k, v in inputs.items() if k not in ("image_feat", "text_feat")}

    def step(img, txt, temp):
        return softmask.focal_itc_loss(img, txt, temp, gamma=2.0, alpha=0.4, backend="torch", **rest) * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    outs = []
    for f in (step, compiled):
        img = inputs["image_feat"].clone().requires_grad_()
        txt = inputs["text_feat"].clone().requires_grad_()
        temp = torch.tensor(0.07, requires_grad=True)
        loss = f(img, txt, temp)
        loss.backward()
        outs.append((loss.detach(), img.grad, txt.grad, temp.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- GPU (compiled kernels)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("gamma,tau", [(2.0, 0.07), (0.5, 0.001)])
def test_gpu_compiled_kernels(dtype, clip, gamma, tau):
    B, N, D = (257, 0, 256) if clip else (129, 4097, 256)
    inputs = _problem(B, N, D, dtype, clip=clip, momentum=not clip)
    _check_all(inputs, tau, dtype, "triton", gamma=gamma, alpha=0.0 if clip else 0.4)
