"""Focal image-text contrastive loss: public function, module, validation, backends,
autograd and ``torch.library`` registration.

Backends: ``triton`` (``softmask.kernels.focal_itc``), ``torch`` (blocks of rows in
plain PyTorch with the analytic gradient; at most :data:`TORCH_BLOCK_ELEMS` logits
live at once, :data:`TORCH_TILED_BLOCK_ELEMS` twice over on the momentum-target path,
whose elementwise work runs on key tiles of :data:`TORCH_TILE_ELEMS`), ``reference``
(``softmask.reference``, materialized, autograd).
"""

from __future__ import annotations

import threading

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from softmask import reference
from softmask.reference import EMPTY_ID
from softmask.ops._common import (
    accum_dtype,
    check_fraction,
    check_same,
    check_size,
    check_tensor,
    resolve_backend,
)

__all__ = ["focal_itc_loss", "FocalITCLoss", "release_workspace"]

# A key bank: one [N, D] tensor or a sequence of [N_p, D] tensors read as their concatenation.
KeyBank = Union[Tensor, Sequence[Tensor]]
# Key ids: one [N] int64 tensor or a sequence of [N_p] int64 tensors (one per key-bank part).
KeyIds = Union[Tensor, Sequence[Tensor]]

REDUCTIONS = ("mean", "sum", "none")

# Logits held at once by the torch backend (rows x keys); 2^22 float32 = 16 MiB per
# temporary. At B=1024, N=66,560, D=256 on a 2-core CPU a sweep over 2^20..2^24 gave
# the same time within noise; 2^22 keeps the peak at a few such temporaries.
TORCH_BLOCK_ELEMS = 1 << 22
# Key-tile size (rows x keys) of the torch backend's momentum-target path: the elementwise
# chain runs on tiles of at most this many logits (1 MiB in float32, the L2 of one core of
# the CPU measured in benchmarks/NOTES.md), so its ~15 passes stay in cache and only the
# stored logits stream from memory.
TORCH_TILE_ELEMS = 1 << 18
# Row block of the momentum-target path: its logits and momentum logits are stored whole
# (2 x 64 MiB in float32), so that the matmuls run on ~250 rows at once (at 63 rows they
# ran at 2/3 of the speed on the CPU of benchmarks/NOTES.md).
TORCH_TILED_BLOCK_ELEMS = 1 << 24
# The momentum-target path tiled over the keys (False: the row-block path, kept as the
# tiled path's reference in tests/test_focal_itc_ids.py::test_torch_key_tiles).
TILED_TARGETS = True
# The one-hot path (no momentum targets, no ids) tiled over the keys likewise (False: the
# row-block path, kept as its reference in tests/test_focal_itc_clip.py).
TILED_ONEHOT = True


# --------------------------------------------------------------------------- torch backend


def _focal_terms_torch(l: Tensor, p: Tensor, gamma: float) -> Tuple[Tensor, Tensor]:
    """``t = (1-p)^gamma`` and ``g = t (1 - gamma p l / (1-p))`` without inf/NaN at p -> 1.

    ``1 - p = -expm1(l)`` is exact to the last bit as p -> 1 and is 0 only where l = 0
    exactly; there ``t = 0^gamma`` (1 for gamma = 0, else 0) and the ratio l / (1-p), whose
    limit is -1, is taken as 0 instead (l / tiny): g = t either way, because t = 0 unless
    gamma = 0, where the ratio's factor gamma is 0. No select, one buffer per output."""
    om = torch.expm1(l).neg_()  # 1 - p >= 0
    t = om * om if gamma == 2.0 else om.pow(gamma)
    g = l / om.clamp_min_(torch.finfo(om.dtype).tiny)  # the ratio l / (1 - p)
    g.mul_(p).mul_(-gamma).add_(1.0).mul_(t)
    return t, g


_WORKSPACE = threading.local()

# Largest scratch buffer the CPU workspace keeps between calls (per thread and dtype). The
# paths of this file ask for at most 132 MiB (the momentum-target path's two stored fp32
# blocks and four tiles), so every call at the default block sizes is served from the
# cache; a larger request (block sizes raised by hand) is allocated for that call only.
WORKSPACE_CACHE_BYTES = 256 << 20


def _workspace(shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A scratch tensor of ``shape``. On the CPU one buffer per thread and dtype is kept and
    reused between calls (at most 6 blocks of TORCH_BLOCK_ELEMS elements, 96 MiB in fp32, or 2 of
    TORCH_TILED_BLOCK_ELEMS plus 4 tiles, 132 MiB), up to :data:`WORKSPACE_CACHE_BYTES`:
    a fresh allocation of this size is mmapped and page-faulted anew by every call, which
    measured up to 40 % of a call's time. :func:`release_workspace` frees the kept buffers.
    Elsewhere the device's caching allocator does this."""
    numel = math.prod(shape)
    if device.type != "cpu":
        return torch.empty(shape, device=device, dtype=dtype)
    cache = _WORKSPACE.__dict__.setdefault("buffers", {})
    buf = cache.get(dtype)
    if buf is None or buf.numel() < numel:
        cache.pop(dtype, None)  # the smaller buffer goes before the larger one is allocated
        buf = torch.empty(numel, dtype=dtype)
        if numel * buf.element_size() <= WORKSPACE_CACHE_BYTES:
            cache[dtype] = buf
    return buf[:numel].view(shape)


def release_workspace() -> int:
    """Free the CPU scratch buffers that the torch backend keeps for the calling thread
    between calls (at most 132 MiB per dtype at the default block sizes; see
    :data:`WORKSPACE_CACHE_BYTES`) and return the bytes released. Call it when a process
    is done with the loss (e.g. after training, before evaluation); the next call of the
    op allocates them again. Other threads' buffers are theirs to release."""
    cache = _WORKSPACE.__dict__.get("buffers", {})
    freed = sum(b.numel() * b.element_size() for b in cache.values())
    cache.clear()
    return freed


def _focal_terms_into(l: Tensor, p: Tensor, gamma: float, t: Tensor, g: Tensor) -> None:
    """:func:`_focal_terms_torch` written into the buffers ``t`` and ``g`` (same values)."""
    torch.expm1(l, out=g).neg_()  # 1 - p
    if gamma == 2.0:
        torch.mul(g, g, out=t)
    else:
        torch.pow(g, gamma, out=t)
    g.clamp_min_(torch.finfo(g.dtype).tiny)
    torch.div(l, g, out=g).mul_(p).mul_(-gamma).add_(1.0).mul_(t)


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """``(a * b).sum(1)`` for [rows, N] blocks, without a [rows, N] temporary."""
    return torch.linalg.vecdot(a, b, dim=1)


def _key_bank(keys: KeyBank, acc: torch.dtype) -> Tensor:
    """The key bank as one [N, D] tensor in the accumulation dtype. A sequence of parts is
    copied into one contiguous buffer (the CPU path's matmuls then see exactly the layout
    and values of ``torch.cat(parts)``, so results match the concatenated bank bit for
    bit); a single tensor is only cast (no copy for float32/float64)."""
    if isinstance(keys, Tensor):
        return keys.to(acc)
    parts = list(keys)
    if len(parts) == 1:
        return parts[0].to(acc)
    out = parts[0].new_empty(sum(p.shape[0] for p in parts), parts[0].shape[1], dtype=acc)
    row = 0
    for p in parts:
        out[row:row + p.shape[0]].copy_(p)
        row += p.shape[0]
    return out


def _key_id_bank(key_ids) -> Tensor:
    """The key ids as one [N] tensor (parts concatenated: 8 bytes per key)."""
    if isinstance(key_ids, Tensor):
        return key_ids
    parts = list(key_ids)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _positives(ids: Tensor, kid: Tensor, kid_valid: Tensor, alpha: float, acc: torch.dtype):
    """Positives of one block of rows: ``(rows, cols)`` of the matches in row-major order
    (the [rows, N] match mask lives only inside this call), the counts ``c`` [rows] and
    the one-hot mass per positive ``(1 - alpha) / max(c, 1)`` [rows]."""
    match = (ids[:, None] == kid[None, :]) & kid_valid[None, :]  # (rows, N) bool, one block
    cnt = match.sum(1).to(acc)
    w_pos = torch.full_like(cnt, 1.0 - alpha) / cnt.clamp_min(1)
    mr, mc = match.nonzero(as_tuple=True)
    return mr, mc, cnt, w_pos


def _row_blocks(B: int, N: int, budget: int):
    """Row blocks of at most ``budget // N`` rows (at least 1), their sizes within one row of each other:
    a remainder block of a few rows would run its matmuls at a fraction of the speed."""
    nb = -(-B // max(1, budget // max(N, 1)))
    edges = [B * i // nb for i in range(nb + 1)]
    return [(edges[i], edges[i + 1]) for i in range(nb)]


LOG2E = 1.0 / math.log(2.0)
LN2 = math.log(2.0)


def _online_lse2(zt: Tensor, m: Tensor, s: Tensor, scratch: Tensor, arg: Optional[Tensor] = None,
                 tile: int = 0) -> None:
    """Merge one tile [rows, T] of base-2 logits into the running row max ``m`` and sum ``s``
    of exp2(z - m); with ``arg``, also the index of the tile that holds the row max (the
    first of ties; ``max`` with indices costs 8 ``amax`` on the CPU, so the column is found
    later, in that tile only)."""
    mt = zt.amax(1)
    if arg is not None:
        arg.masked_fill_(mt > m, tile)
    m_new = torch.maximum(m, mt)
    s.mul_(torch.exp2(m - m_new)).add_(torch.exp2(torch.sub(zt, m_new[:, None], out=scratch), out=scratch).sum(1))
    m.copy_(m_new)


def _focal_terms_tile(l2: Tensor, p: Tensor, gamma: float, t: Tensor, g: Tensor) -> None:
    """The focal terms ``t = (1-p)^gamma`` and ``g = t (1 - gamma p l / (1-p))`` of one tile,
    from base-2 log-probabilities ``l2`` (l = l2 ln 2), with ``1 - p`` as a subtraction: exact
    to a relative eps wherever p <= 1/2, i.e. everywhere except possibly at a row's largest
    logit, which :func:`_direction_targets_tiled` then recomputes with ``expm1``. For
    gamma 2 (the paper's) and 1, ``g = (1-p)^(gamma-1) (1 - p - gamma p l)`` has no division."""
    torch.sub(1.0, p, out=t)  # 1 - p
    if gamma == 2.0:
        torch.addcmul(t, p, l2, value=-2.0 * LN2, out=g).mul_(t)  # (1 - p)(1 - p - 2 p l)
        t.mul_(t)
    elif gamma == 1.0:
        torch.addcmul(t, p, l2, value=-LN2, out=g)  # 1 - p - p l
    else:
        torch.div(l2, t.clamp_min(torch.finfo(t.dtype).tiny), out=g)  # l / (1 - p), up to ln 2
        t.pow_(gamma)
        g.mul_(p).mul_(-gamma * LN2).add_(1.0).mul_(t)


def _direction_targets_tiled(q, kk, qm, inv_tau, gamma, alpha, ids, kid, kid_valid, acc, off=0):
    """The momentum-target path of :func:`focal_itc_direction_torch`, tiled over the keys.

    Per block of rows, three sweeps over key tiles of at most :data:`TORCH_TILE_ELEMS`
    logits: (1) the logits z and momentum logits z_m, stored tile by tile, their
    log-sum-exps merged online, and each row's largest logit; (2) targets, focal terms,
    the loss, and q g written over z_m, with S = sum_j q_j g_j; (3) dz = p S - q g,
    recomputed per tile, into dq (an accumulated matmul) and dtau. The logits are kept in
    base 2 (log2(e) / tau folded into the matmul's rows) because ``exp2`` costs half of
    ``exp`` on the CPU, and ``1 - p`` is a subtraction except at each row's largest logit,
    the only place where p may exceed 1/2, which is recomputed with ``expm1`` (``expm1``
    over a whole tile costs 1.8 ``exp``). Each [rows, N] logit block crosses memory 7
    times instead of ~20, and the elementwise chain runs on tiles that stay in cache
    (benchmarks/NOTES.md)."""
    B, D = q.shape
    N = kk.shape[0]
    loss = torch.empty(B, device=q.device, dtype=acc)
    dtau = torch.empty_like(loss)
    dq = torch.empty(B, D, device=q.device, dtype=acc)
    stats = torch.empty(4, B, device=q.device, dtype=acc)
    stats[3] = 1.0
    blocks = _row_blocks(B, N, TORCH_TILED_BLOCK_ELEMS)
    R = max(r1 - r0 for r0, r1 in blocks)
    TK = min(N, max(1, TORCH_TILE_ELEMS // R))
    tiles = _tiles(N, TK)
    # workspace: the stored logits z and z_m of one row block, tile-major so that every tile is contiguous,
    # then four [rows, TK] scratch tiles
    ws = _workspace((2 * R * N + 4 * R * TK,), acc, q.device)
    scale = inv_tau * LOG2E
    for r0, r1 in blocks:
        n = r1 - r0
        rows = torch.arange(n, device=q.device)
        qb = q[r0:r1].to(acc) * scale  # base-2 logits straight from the matmul (not in place: .to() returns
        qmb = qm[r0:r1].to(acc) * scale  # the caller's tensor when it already has the dtype)
        zs = [ws[n * c0:n * c1].view(n, c1 - c0) for c0, c1 in tiles]
        zms = [ws[R * N + n * c0:R * N + n * c1].view(n, c1 - c0) for c0, c1 in tiles]
        scr = [ws[2 * R * N + i * R * TK:2 * R * N + i * R * TK + n * TK].view(n, TK) for i in range(4)]
        m = torch.full((n,), -math.inf, device=q.device, dtype=acc)
        s = torch.zeros_like(m)
        mm_, sm = m.clone(), s.clone()
        arg = torch.zeros(n, device=q.device, dtype=torch.long)
        # sweep 1: logits, stored; online log-sum-exp of both; each row's largest logit
        for ti, ((c0, c1), zt, zmt) in enumerate(zip(tiles, zs, zms)):
            sc = scr[0][:, :c1 - c0]
            torch.mm(qb, kk[c0:c1].t(), out=zt)
            _online_lse2(zt, m, s, sc, arg, ti)
            torch.mm(qmb, kk[c0:c1].t(), out=zmt)
            _online_lse2(zmt, mm_, sm, sc)
        lse2 = s.log2_().add_(m)[:, None]
        lse2_t = sm.log2_().add_(mm_)[:, None]
        if ids is not None:
            mr, mc, cnt, w_pos = _positives(ids[r0:r1], kid, kid_valid, alpha, acc)
            stats[3, r0:r1] = cnt
        loss_b = torch.zeros_like(m)
        S = torch.zeros_like(m)
        g_ii = torch.zeros_like(m)
        # sweep 2: targets, focal terms, loss, q g (over z_m), S
        for ti, ((c0, c1), zt, zmt) in enumerate(zip(tiles, zs, zms)):
            w = c1 - c0
            l2, p, t, g = (x[:, :w] for x in scr)
            torch.sub(zt, lse2, out=l2)
            torch.exp2(l2, out=p)
            # alpha softmax(z_m): alpha as a factor, not folded into the exponent, so that a saturated row
            # (p = 1, targets 1) cancels exactly in dz = p S - q g, as in the float64 truth
            tgt = zmt.sub_(lse2_t).exp2_().mul_(alpha)
            if ids is None:  # the positives' one-hot mass, where it falls in this tile
                di = _diag_in_tile(r0, r1, c0, c1, off, q.device)
                if di is not None:
                    tgt[di, di + (r0 + off - c0)] += 1.0 - alpha
            else:
                sel = (mc >= c0) & (mc < c1)
                tr, tc = mr[sel], mc[sel] - c0
                tgt[tr, tc] += w_pos[tr]
            _focal_terms_tile(l2, p, gamma, t, g)
            # the rows' largest logits in this tile: 1 - p = -expm1(l), exact as p -> 1
            ar = rows[arg == ti]
            if ar.numel():
                ac = zt[ar].argmax(1)
                l_max = l2[ar, ac] * LN2
                t[ar, ac], g[ar, ac] = _focal_terms_torch(l_max, p[ar, ac], gamma)
            loss_b.add_(_rowdot(t.mul_(tgt), l2))
            S.add_(tgt.mul_(g).sum(1))  # tgt now holds q g
            if ids is None and di is not None:
                g_ii[di] = g[di, di + (r0 + off - c0)]
        # sweep 3: dz = p S - q g, into dq and dtau
        dqb = torch.zeros(n, D, device=q.device, dtype=acc)
        dt = torch.zeros_like(m)
        for (c0, c1), zt, qgt in zip(tiles, zs, zms):
            dz = scr[1][:, :c1 - c0]
            torch.sub(zt, lse2, out=dz).exp2_().mul_(S[:, None]).sub_(qgt)
            dqb.addmm_(dz, kk[c0:c1])
            dt.add_(_rowdot(dz, zt))
        loss[r0:r1] = loss_b.mul_(-LN2)
        dq[r0:r1] = dqb.mul_(inv_tau)
        dtau[r0:r1] = dt.mul_(-LN2 * inv_tau)  # z = z2 ln 2
        stats[0, r0:r1] = lse2[:, 0] * LN2
        stats[1, r0:r1] = S
        stats[2, r0:r1] = g_ii
    return loss, dq, dtau, stats


def _tiles(n: int, size: int):
    return [(c0, min(n, c0 + size)) for c0 in range(0, n, size)]


def _diag_in_tile(r0: int, r1: int, c0: int, c1: int, off: int, device):
    """Rows (relative to r0) of the block [r0, r1) whose positive column ``r0 + i + off``
    falls in the key tile [c0, c1), or None."""
    i0, i1 = max(r0 + off, c0) - r0 - off, min(r1 + off, c1) - r0 - off
    return torch.arange(i0, i1, device=device) if i0 < i1 else None


def _direction_onehot_tiled(q, kk, inv_tau, gamma: float, off: int, acc, want_dk: bool, w=None):
    """The one-hot path of :func:`focal_itc_direction_torch` (no momentum targets, no ids),
    tiled over the keys as :func:`_direction_targets_tiled` is; row i's positive is key
    ``off + i``. With ``want_dk`` it also returns the key gradient ``sum_i w_i dL_i/dK``
    [N, D] (unit weights without ``w``; else None), from the same sweep (one more matmul
    per tile). The backward's key gradient for unequal weights reruns this function, so
    that its logits are those of the forward, bit for bit (a recomputation in another
    form moves p by eps |z| and, at p -> 1, dz = p S - g by as much relative).

    Per block of rows, two sweeps over key tiles of at most :data:`TORCH_TILE_ELEMS` logits:
    (1) base-2 logits z of a tile from the matmul (in cache), the tile's row max m_t, the
    unnormalized ``e_t = exp2(z - m_t)`` stored tile-major (the only [rows, N] store),
    its row sum and ``sum e z``; the positive's logit taken from its tile. Merging the
    tiles (``w_t = exp2(m_t - m)``) gives the lse, ``sum p z``, the focal terms at the
    positive (S = g_ii) and dL/dtau without touching the logits again. (2) ``dz = e_t *
    (S w_t / s)`` in place, minus g_ii at the positive, into dq (and dK) by matmuls. One
    ``exp2`` per logit; each logit crosses memory twice (stored, read back)."""
    B, D = q.shape
    N = kk.shape[0]
    dev = q.device
    loss = torch.empty(B, device=dev, dtype=acc)
    dtau = torch.empty_like(loss)
    dq = torch.empty(B, D, device=dev, dtype=acc)
    stats = torch.empty(4, B, device=dev, dtype=acc)
    stats[3] = 1.0
    dk = torch.zeros(N, D, device=dev, dtype=acc) if want_dk else None
    # at least two row blocks: the stored block never holds all [B, N] logits
    blocks = _row_blocks(B, N, min(TORCH_TILED_BLOCK_ELEMS, -(-B // 2) * N))
    R = max(r1 - r0 for r0, r1 in blocks)
    TK = min(N, max(1, TORCH_TILE_ELEMS // R))
    tiles = _tiles(N, TK)
    ws = _workspace((R * N,), acc, dev)
    zt_scratch = torch.empty(R * TK, device=dev, dtype=acc)
    scale = inv_tau * LOG2E
    for r0, r1 in blocks:
        n = r1 - r0
        qa = q[r0:r1].to(acc)
        qb = qa * scale  # base-2 logits from the matmul (not in place: qa may be the caller's tensor)
        qw = qa if w is None else qa * w[r0:r1, None].to(acc)
        es = [ws[n * c0:n * c1].view(n, c1 - c0) for c0, c1 in tiles]
        zt_buf = zt_scratch[:n * TK].view(n, TK)
        mt = torch.empty(n, len(tiles), device=dev, dtype=acc)
        st = torch.empty_like(mt)
        ezt = torch.empty_like(mt)
        z_ii = torch.zeros(n, device=dev, dtype=acc)
        diags = []
        for ti, ((c0, c1), et) in enumerate(zip(tiles, es)):
            zt = zt_buf[:, :c1 - c0]
            torch.mm(qb, kk[c0:c1].t(), out=zt)
            di = _diag_in_tile(r0, r1, c0, c1, off, dev)
            diags.append(di)
            if di is not None:
                z_ii[di] = zt[di, di + (r0 + off - c0)]
            torch.amax(zt, 1, out=mt[:, ti])
            torch.sub(zt, mt[:, ti:ti + 1], out=et).exp2_()
            torch.sum(et, 1, out=st[:, ti])
            ezt[:, ti] = _rowdot(et, zt)
        m = mt.amax(1)
        wt = torch.exp2(mt - m[:, None])  # (rows, tiles)
        s = _rowdot(st, wt)
        lse2 = torch.log2(s).add_(m)
        pz2 = _rowdot(ezt, wt).div_(s)  # sum_j p_j z_j, base 2
        l_ii = (z_ii - lse2) * LN2
        t_ii, g_ii = _focal_terms_torch(l_ii, torch.exp(l_ii), gamma)
        coef = wt.mul_((g_ii / s)[:, None])  # S w_t / s, S = g_ii
        dqb = torch.zeros(n, D, device=dev, dtype=acc)
        for (c0, c1), et, di, ti in zip(tiles, es, diags, range(len(tiles))):
            dz = et.mul_(coef[:, ti:ti + 1])  # p S
            if di is not None:
                dz[di, di + (r0 + off - c0)] -= g_ii[di]
            dqb.addmm_(dz, kk[c0:c1])
            if want_dk:
                dk[c0:c1].addmm_(dz.t(), qw)
        loss[r0:r1] = -t_ii * l_ii
        dq[r0:r1] = dqb.mul_(inv_tau)
        dtau[r0:r1] = (g_ii * pz2 - g_ii * z_ii).mul_(-LN2 * inv_tau)  # -(S sum p z - g_ii z_ii) / tau
        stats[0, r0:r1] = lse2 * LN2
        stats[1, r0:r1] = g_ii
        stats[2, r0:r1] = g_ii
    if want_dk:
        dk.mul_(inv_tau)
    return loss, dq, dtau, stats, dk


def _clip_tile(B: int):
    """Rows and columns of the CLIP path's tiles of Z: square-ish (the matmuls' M and N both
    large), at most :data:`TORCH_TILE_ELEMS` logits, and at most half of Z's rows."""
    TM = max(1, min(-(-B // 2), math.isqrt(TORCH_TILE_ELEMS)))
    return TM, min(B, max(1, TORCH_TILE_ELEMS // TM))


def _clip_stats_torch(img, txt, inv_tau, gamma: float, acc):
    """CLIP mode forward on the torch backend, both directions from one pass over the
    shared logits: ``Z = img @ txt.T / tau`` [B, B] is image-to-text's logits and its
    transpose text-to-image's, so tiles of Z (at most :data:`TORCH_TILE_ELEMS`) give each
    row's log-sum-exp, ``sum p z`` online over the column tiles, and each column's online
    over the row blocks. One matmul of B*B*D per call (against 2 per direction for the
    per-direction path); the gradients, which need every row's and column's lse, come in
    the backward (:func:`_clip_grads_torch`: 3 matmuls, 4 in all against ClipLoss's 6).

    Returns ``(loss_i2t, loss_t2i)`` [B] each and ``stats`` [5, B]: base-2 lse of rows and
    columns, g at the diagonal per direction, and the base-2 diagonal logit. The
    temperature's gradient comes with the features' in the backward: both directions'
    logits are ``img @ txt.T / tau``, so ``dL/dtau = -(1/tau) sum_i img_i . dL/dimg_i``
    (no ``sum p z`` pass here)."""
    B, D = img.shape
    dev = img.device
    TM, TK = _clip_tile(B)
    rblocks, ctiles = _tiles(B, TM), _tiles(B, TK)
    ws = _workspace((2 * TM * TK,), acc, dev)
    scale = inv_tau * LOG2E
    ta = txt.to(acc)
    z_d = torch.zeros(B, device=dev, dtype=acc)  # the diagonal, base 2
    mc = torch.full((B,), -math.inf, device=dev, dtype=acc)  # column (text-to-image) running max and sum
    sc = torch.zeros(B, device=dev, dtype=acc)
    mr = torch.empty(B, device=dev, dtype=acc)
    sr = torch.empty_like(mr)
    for r0, r1 in rblocks:
        n = r1 - r0
        ib = img[r0:r1].to(acc) * scale
        m = torch.full((n,), -math.inf, device=dev, dtype=acc)
        s = torch.zeros(n, device=dev, dtype=acc)
        for c0, c1 in ctiles:
            w = c1 - c0
            z = ws[:n * w].view(n, w)
            e = ws[TM * TK:TM * TK + n * w].view(n, w)
            torch.mm(ib, ta[c0:c1].t(), out=z)
            di = _diag_in_tile(r0, r1, c0, c1, 0, dev)
            if di is not None:
                z_d[di + r0] = z[di, di + (r0 - c0)]
            # rows: online over the column tiles
            m_new = torch.maximum(m, z.amax(1))
            f = torch.exp2(m - m_new)
            torch.sub(z, m_new[:, None], out=e).exp2_()
            s.mul_(f).add_(e.sum(1))
            m = m_new
            # columns: online over the row blocks
            mcn = torch.maximum(mc[c0:c1], z.amax(0))
            fc = torch.exp2(mc[c0:c1] - mcn)
            torch.sub(z, mcn[None, :], out=e).exp2_()
            sc[c0:c1] = sc[c0:c1].mul_(fc).add_(e.sum(0))
            mc[c0:c1] = mcn
        mr[r0:r1], sr[r0:r1] = m, s
    losses = []
    stats = torch.empty(5, B, device=dev, dtype=acc)
    for i, (m, s) in enumerate(((mr, sr), (mc, sc))):
        lse2 = torch.log2(s).add_(m)
        l_d = (z_d - lse2) * LN2
        t_d, g_d = _focal_terms_torch(l_d, torch.exp(l_d), gamma)
        losses.append(-t_d * l_d)
        stats[i], stats[2 + i] = lse2, g_d
    stats[4] = z_d
    return losses[0], losses[1], stats


def _clip_grads_torch(img, txt, inv_tau, stats, w1, w2, acc):
    """Gradients of ``sum_i w1_i L_i2t_i + w2_i L_t2i_i`` with respect to img and txt from
    :func:`_clip_stats_torch`'s statistics: per tile of Z,
    ``dZ = w1_i g1_i p_row + w2_j g2_j p_col`` minus ``w1_i g1_i + w2_i g2_i`` on the diagonal
    (the focal ``dL/dz = p S - q g`` of both directions, S = g at the positive), then
    ``dimg += dZ @ txt_tile``, ``dtxt_tile += dZ.T @ img_block``. 3 matmuls of B*B*D.
    Returns ``(dimg, dtxt, dtau)``, ``dtau = -(1/tau) sum_i img_i . dimg_i``."""
    B, D = img.shape
    dev = img.device
    TM, TK = _clip_tile(B)
    ws = _workspace((2 * TM * TK,), acc, dev)
    scale = inv_tau * LOG2E
    ta = txt.to(acc)
    lse_r, lse_c, g1, g2 = stats[0], stats[1], stats[2], stats[3]
    a_r = w1.to(acc) * g1
    a_c = w2.to(acc) * g2
    a_d = a_r + a_c
    d_img = torch.zeros(B, D, device=dev, dtype=acc)
    d_txt = torch.zeros(B, D, device=dev, dtype=acc)
    for r0, r1 in _tiles(B, TM):
        n = r1 - r0
        ia = img[r0:r1].to(acc)
        ib = ia * scale
        for c0, c1 in _tiles(B, TK):
            w = c1 - c0
            z = ws[:n * w].view(n, w)
            e = ws[TM * TK:TM * TK + n * w].view(n, w)
            torch.mm(ib, ta[c0:c1].t(), out=z)
            torch.sub(z, lse_r[r0:r1, None], out=e).exp2_()  # p_row
            dz = z.sub_(lse_c[None, c0:c1]).exp2_().mul_(a_c[None, c0:c1])  # w2 g2 p_col
            dz.addcmul_(e, a_r[r0:r1, None])  # + w1 g1 p_row
            di = _diag_in_tile(r0, r1, c0, c1, 0, dev)
            if di is not None:
                dz[di, di + (r0 - c0)] -= a_d[di + r0]
            d_img[r0:r1].addmm_(dz, ta[c0:c1])
            d_txt[c0:c1].addmm_(dz.t(), ia)
    d_img.mul_(inv_tau)
    d_tau = torch.linalg.vecdot(img.to(acc), d_img).sum().mul_(-inv_tau)
    return d_img, d_txt.mul_(inv_tau), d_tau


def focal_itc_direction_torch(q, k, qm, tau, gamma: float, alpha: float, *, ids=None, key_ids=None,
                              pos_offset: int = 0, want_dk: bool = False):
    """Same contract as :func:`softmask.kernels.focal_itc.focal_itc_direction_triton`
    (``k``: a [N, D] tensor or a sequence of parts; ``key_ids`` likewise; row i's positive
    is key ``pos_offset + i`` without ids), plus a fifth result: with ``want_dk`` and
    one-hot targets without ids, the key gradient for unit row weights ``sum_i dL_i/dK``
    [N, D] from the forward's sweep (:func:`_direction_onehot_tiled`), else None.

    With ids the positives of a block of rows are found from its [rows, N] match mask and
    handled as index lists: the focal terms of a row without momentum targets are computed
    at its positives only, so ``ids = arange(B)`` with empty queue slots gives the bits of
    the one-hot path (same values, same vector lengths, sums with exact zeros)."""
    B, D = q.shape
    acc = accum_dtype(q.dtype)
    kk = _key_bank(k, acc)
    N = kk.shape[0]
    inv_tau = 1.0 / tau.to(acc)
    has_targets = qm is not None and alpha > 0
    kid = kid_valid = None
    if ids is not None:
        kid = _key_id_bank(key_ids)
        kid_valid = kid != EMPTY_ID
    if has_targets and TILED_TARGETS:
        return (*_direction_targets_tiled(q, kk, qm, inv_tau, gamma, alpha, ids, kid, kid_valid, acc, pos_offset),
                None)
    if not has_targets and ids is None and TILED_ONEHOT:
        return _direction_onehot_tiled(q, kk, inv_tau, gamma, pos_offset, acc, want_dk)
    loss = torch.empty(B, device=q.device, dtype=acc)
    dtau = torch.empty_like(loss)
    dq = torch.empty(B, D, device=q.device, dtype=acc)
    stats = torch.empty(4, B, device=q.device, dtype=acc)
    stats[3] = 1.0  # positive counts: 1 without ids
    # one workspace of [rows, N] blocks for the whole call: every elementwise step writes into it
    # (out= / in place), so the blocks are allocated (and their pages touched) once, not per op
    blocks = _row_blocks(B, N, TORCH_BLOCK_ELEMS)
    ws = _workspace((6 if has_targets else 3, max(r1 - r0 for r0, r1 in blocks), N), acc, q.device)
    for r0, r1 in blocks:
        n = r1 - r0
        rows = torch.arange(n, device=q.device)
        diag = rows + r0 + pos_offset
        z, l, p = ws[0, :n], ws[1, :n], ws[2, :n]
        torch.mm(q[r0:r1].to(acc), kk.t(), out=z).mul_(inv_tau)  # (rows, N)
        # lse as logsumexp does it (max, then the sum of exp(z - max)), with the block buffers as scratch;
        # l = z - lse exactly as the key-gradient pass recomputes it
        m = z.amax(1, keepdim=True)
        lse = torch.exp(torch.sub(z, m, out=p), out=p).sum(1, keepdim=True).log_().add_(m)
        torch.exp(torch.sub(z, lse, out=l), out=p)
        lse = lse.squeeze(1)
        if ids is not None:
            mr, mc, cnt, w_pos = _positives(ids[r0:r1], kid, kid_valid, alpha, acc)
            stats[3, r0:r1] = cnt
        if has_targets:
            tgt, t, g = ws[3, :n], ws[4, :n], ws[5, :n]
            torch.mm(qm[r0:r1].to(acc), kk.t(), out=tgt).mul_(inv_tau)
            tgt.sub_(tgt.amax(1, keepdim=True)).exp_()
            tgt.mul_(alpha / tgt.sum(1, keepdim=True))  # alpha * softmax(momentum logits)
            if ids is None:
                tgt[rows, diag] += 1.0 - alpha
            else:
                tgt[mr, mc] += w_pos[mr]
            _focal_terms_into(l, p, gamma, t, g)
            loss[r0:r1] = _rowdot(t.mul_(tgt), l).neg_()
            qg = tgt.mul_(g)  # q * g, in place of the targets
            s_row = qg.sum(1)
            g_ii = g[rows, diag] if ids is None else torch.zeros_like(s_row)
            dz = p.mul_(s_row[:, None]).sub_(qg)  # p S - q g
        elif ids is not None:
            l_pos, p_pos = l[mr, mc], p[mr, mc]
            t_pos, g_pos = _focal_terms_torch(l_pos, p_pos, gamma)
            qg_pos = g_pos * w_pos[mr]  # q g at the positives
            loss[r0:r1] = -torch.zeros_like(lse).index_add_(0, mr, t_pos * l_pos * w_pos[mr])
            s_row = torch.zeros_like(lse).index_add_(0, mr, qg_pos)
            g_ii = torch.zeros_like(s_row)
            dz = p.mul_(s_row[:, None])
            dz[mr, mc] -= qg_pos
        else:
            l_ii = l[rows, diag]
            t_ii, g_ii = _focal_terms_torch(l_ii, p[rows, diag], gamma)
            loss[r0:r1] = -t_ii * l_ii
            s_row = g_ii
            dz = p.mul_(s_row[:, None])
            dz[rows, diag] -= g_ii
        dq[r0:r1] = (dz @ kk).mul_(inv_tau)
        dtau[r0:r1] = _rowdot(dz, z).mul_(-inv_tau)
        stats[0, r0:r1] = lse
        stats[1, r0:r1] = s_row
        stats[2, r0:r1] = g_ii
    return loss, dq, dtau, stats, None


def focal_itc_key_grad_torch(q, k, tau, stats, w, *, ids=None, key_ids=None, gamma: float = 0.0,
                             pos_offset: int = 0):
    """Same contract as :func:`softmask.kernels.focal_itc.focal_itc_key_grad_triton`."""
    B, D = q.shape
    N = k.shape[0]
    acc = accum_dtype(q.dtype)
    kk = k.to(acc)
    inv_tau = 1.0 / tau.to(acc)
    if ids is not None:
        kid_valid = key_ids != EMPTY_ID
    dk = torch.zeros(N, D, device=q.device, dtype=acc)
    for r0, r1 in _row_blocks(B, N, TORCH_BLOCK_ELEMS):
        rows = torch.arange(r1 - r0, device=q.device)
        qb = q[r0:r1].to(acc)
        z = (qb @ kk.t()).mul_(inv_tau)
        if ids is None:
            dz = z.sub_(stats[0, r0:r1, None]).exp_().mul_(stats[1, r0:r1, None])
            dz[rows, rows + r0 + pos_offset] -= stats[2, r0:r1]
        else:
            # g at the positives, recomputed exactly as the forward computed it
            mr, mc, _, w_pos = _positives(ids[r0:r1], key_ids, kid_valid, 0.0, acc)
            l = z.sub_(stats[0, r0:r1, None])
            l_pos = l[mr, mc]
            p = l.exp_()
            _, g_pos = _focal_terms_torch(l_pos, p[mr, mc], gamma)
            dz = p.mul_(stats[1, r0:r1, None])
            dz[mr, mc] -= g_pos * w_pos[mr]
        dz.mul_(w[r0:r1, None].to(acc))
        dk += dz.t() @ qb
    return dk.mul_(inv_tau)


def _direction(q, k, qm, tau, gamma, alpha, ids, key_ids, backend, pos_offset=0, want_dk=False):
    """``(loss, dq, dtau, stats, dk)`` of one direction; ``dk`` (unit row weights) or None."""
    if backend == "triton":
        from softmask.kernels.focal_itc import focal_itc_direction_triton

        return (*focal_itc_direction_triton(q, k, qm, tau, gamma, alpha, ids=ids, key_ids=key_ids,
                                            pos_offset=pos_offset), None)
    return focal_itc_direction_torch(q, k, qm, tau, gamma, alpha, ids=ids, key_ids=key_ids, pos_offset=pos_offset,
                                     want_dk=want_dk)


def _key_grad(q, k, tau, stats, w, ids, key_ids, gamma, backend, pos_offset=0):
    """``sum_i w_i dL_i/dK`` for targets without momentum (in CLIP mode the keys' ids are ids)."""
    if backend == "triton":
        from softmask.kernels.focal_itc import focal_itc_key_grad_triton

        return focal_itc_key_grad_triton(q, k, tau, stats, w, ids=ids, key_ids=key_ids, gamma=gamma,
                                         pos_offset=pos_offset)
    if ids is None and TILED_ONEHOT:  # the forward's tiled path again, with the weights (docstring there)
        acc = accum_dtype(q.dtype)
        return _direction_onehot_tiled(q, k.to(acc), 1.0 / tau.to(acc), gamma, pos_offset, acc, True, w)[4]
    return focal_itc_key_grad_torch(q, k, tau, stats, w, ids=ids, key_ids=key_ids, gamma=gamma, pos_offset=pos_offset)


def _dk_in_forward(backend: str, key_grad: bool, ids, alpha: float) -> bool:
    """Whether the forward returns the keys' gradient for unit row weights (the torch
    backend's tiled one-hot path computes it in the same sweep as dq)."""
    return backend == "torch" and key_grad and ids is None and alpha == 0 and TILED_ONEHOT


# --------------------------------------------------------------------------- registered ops


@torch.library.custom_op("softmask::focal_itc_rows", mutates_args=())
def _focal_itc_rows(
    image_feat: Tensor,
    text_feat: Tensor,
    temperature: Tensor,
    image_keys: List[Tensor],
    text_keys: List[Tensor],
    image_feat_m: Optional[Tensor],
    text_feat_m: Optional[Tensor],
    ids: Optional[Tensor],
    image_key_ids: List[Tensor],
    text_key_ids: List[Tensor],
    gamma: float,
    alpha: float,
    backend: str,
    key_grad: bool,
    pos_offset: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-row losses of both directions plus what the backward needs:
    ``(loss_i2t [B], loss_t2i [B], dL_i2t/dimage [B, D], dL_t2i/dtext [B, D],
    dL_i2t/dtau [B], dL_t2i/dtau [B], stats_i2t [4, B], stats_t2i [4, B],
    dk_i2t, dk_t2i)``, the last two the key banks' gradients for unit row weights
    ([N, D], or [0, D] where the backward computes them, see :func:`_dk_in_forward`).
    ``image_keys`` / ``text_keys``: the parts of each key bank; empty lists select the
    CLIP mode. ``image_key_ids`` / ``text_key_ids``: the key ids, one tensor per part of
    the bank (empty without ids, and in CLIP mode, where the keys' ids are ``ids``).
    ``key_grad``: the key banks (one part each) take gradient. Row i's positive is key
    ``pos_offset + i`` (without ids)."""
    clip = len(text_keys) == 0
    tk = text_feat if clip else text_keys
    ik = image_feat if clip else image_keys
    tk_ids = ids if clip else text_key_ids
    ik_ids = ids if clip else image_key_ids
    tau = temperature.detach()
    want_dk = _dk_in_forward(backend, key_grad, ids, alpha)
    l1, dq1, dt1, st1, dk1 = _direction(image_feat, tk, image_feat_m, tau, gamma, alpha, ids, tk_ids, backend,
                                        pos_offset, want_dk)
    l2, dq2, dt2, st2, dk2 = _direction(text_feat, ik, text_feat_m, tau, gamma, alpha, ids, ik_ids, backend,
                                        pos_offset, want_dk)
    none = lambda: image_feat.new_empty(0, image_feat.shape[1], dtype=dq1.dtype)  # noqa: E731
    return l1, l2, dq1, dq2, dt1, dt2, st1, st2, none() if dk1 is None else dk1, none() if dk2 is None else dk2


@_focal_itc_rows.register_fake
def _(image_feat, text_feat, temperature, image_keys, text_keys, image_feat_m, text_feat_m, ids, image_key_ids,
      text_key_ids, gamma, alpha, backend, key_grad, pos_offset):
    B, D = image_feat.shape
    acc = accum_dtype(image_feat.dtype)
    row = lambda: image_feat.new_empty(B, dtype=acc)  # noqa: E731
    feat = lambda: image_feat.new_empty(B, D, dtype=acc)  # noqa: E731
    stats = lambda: image_feat.new_empty(4, B, dtype=acc)  # noqa: E731
    want_dk = _dk_in_forward(backend, key_grad, ids, alpha)
    dk = lambda bank: image_feat.new_empty(sum(p.shape[0] for p in bank) if want_dk else 0, D, dtype=acc)  # noqa: E731
    return row(), row(), feat(), feat(), row(), row(), stats(), stats(), dk(text_keys), dk(image_keys)


@torch.library.custom_op("softmask::focal_itc_key_grad", mutates_args=())
def _focal_itc_key_grad(q: Tensor, k: Tensor, temperature: Tensor, stats: Tensor, w: Tensor, ids: Optional[Tensor],
                        key_ids: Optional[Tensor], gamma: float, backend: str, pos_offset: int) -> Tensor:
    """``sum_i w_i dL_i/dK`` for targets without momentum (one-hot at key ``pos_offset + i``,
    or uniform over the keys with the row's id), [N, D] in the accumulation dtype."""
    return _key_grad(q, k, temperature.detach(), stats, w, ids, key_ids, gamma, backend, pos_offset)


@_focal_itc_key_grad.register_fake
def _(q, k, temperature, stats, w, ids, key_ids, gamma, backend, pos_offset):
    return k.new_empty(k.shape, dtype=accum_dtype(k.dtype))


def _setup_context(ctx, inputs, output):
    (image_feat, text_feat, temperature, image_keys, text_keys, _, _, ids, image_key_ids, text_key_ids, gamma, _,
     backend, key_grad, pos_offset) = inputs
    _, _, dq1, dq2, dt1, dt2, st1, st2, dk1, dk2 = output
    ctx.clip = len(text_keys) == 0
    ctx.backend = backend
    ctx.gamma = gamma
    ctx.key_grad = key_grad
    ctx.pos_offset = pos_offset
    ctx.n_parts = (len(image_keys), len(text_keys), len(image_key_ids), len(text_key_ids))
    # No key-bank tensor is saved unless the keys take gradient: the forward computed
    # dL/dfeatures and dL/dtau, so a write into a queue part after the loss (ALBEF's
    # enqueue) cannot change the backward. The row ids are kept for CLIP mode's key
    # gradient (they are the keys' ids there).
    keys = (text_keys[0], image_keys[0]) if key_grad else (None, None)
    key_ids = (text_key_ids[0], image_key_ids[0]) if key_grad and len(text_key_ids) else (None, None)
    ctx.save_for_backward(image_feat, text_feat, temperature, dq1, dq2, dt1, dt2, st1, st2,
                          ids if ctx.clip or key_grad else None, *keys, *key_ids, dk1, dk2)
    ctx.mark_non_differentiable(*output[2:])


def _uniform(w: Tensor) -> bool:
    return bool((w == w[0]).all())


def _bank_grad(ctx, q, k, temperature, stats, w, ids, key_ids, dk_unit):
    """``sum_i w_i dL_i/dK`` of one direction: the forward's unit-weight gradient scaled
    where the row weights are one value (every reduction but "none"), else computed."""
    if dk_unit.shape[0] and _uniform(w):
        return (w[0] * dk_unit).to(k.dtype)
    return _focal_itc_key_grad(q, k, temperature, stats, w, ids, key_ids, ctx.gamma, ctx.backend,
                               ctx.pos_offset).to(k.dtype)


def _backward(ctx, g1, g2, *_unused):
    (image_feat, text_feat, temperature, dq1, dq2, dt1, dt2, st1, st2, ids, tk, ik, tk_ids, ik_ids, dk1,
     dk2) = ctx.saved_tensors
    g1 = torch.zeros_like(dt1) if g1 is None else g1.to(dt1.dtype)
    g2 = torch.zeros_like(dt2) if g2 is None else g2.to(dt2.dtype)
    d_image = d_text = d_tau = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        d_image = g1[:, None] * dq1
        d_text = g2[:, None] * dq2
        if ctx.clip:  # the keys are the other side's online features
            d_image = d_image + _focal_itc_key_grad(text_feat, image_feat, temperature, st2, g2, ids, ids, ctx.gamma,
                                                    ctx.backend, 0)
            d_text = d_text + _focal_itc_key_grad(image_feat, text_feat, temperature, st1, g1, ids, ids, ctx.gamma,
                                                  ctx.backend, 0)
        d_image = d_image.to(image_feat.dtype)
        d_text = d_text.to(text_feat.dtype)
    if ctx.needs_input_grad[2]:
        d_tau = (g1 * dt1 + g2 * dt2).sum().to(temperature.dtype)
    no_grad_bank = lambda n: [None] * n  # noqa: E731  (one entry per key-bank or key-id part)
    d_ik, d_tk = no_grad_bank(ctx.n_parts[0]), no_grad_bank(ctx.n_parts[1])
    if ctx.key_grad:
        d_tk = [_bank_grad(ctx, image_feat, tk, temperature, st1, g1, ids, tk_ids, dk1)]
        d_ik = [_bank_grad(ctx, text_feat, ik, temperature, st2, g2, ids, ik_ids, dk2)]
    return (d_image, d_text, d_tau, d_ik, d_tk, None, None, None, no_grad_bank(ctx.n_parts[2]),
            no_grad_bank(ctx.n_parts[3]), None, None, None, None, None)


_focal_itc_rows.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("softmask::focal_clip_rows", mutates_args=())
def _focal_clip_rows(image_feat: Tensor, text_feat: Tensor, temperature: Tensor,
                     gamma: float) -> Tuple[Tensor, Tensor, Tensor]:
    """The torch backend's CLIP mode without ids (:func:`_clip_stats_torch`):
    ``(loss_i2t [B], loss_t2i [B], stats [5, B])``."""
    acc = accum_dtype(image_feat.dtype)
    return _clip_stats_torch(image_feat, text_feat, 1.0 / temperature.detach().to(acc), gamma, acc)


@_focal_clip_rows.register_fake
def _(image_feat, text_feat, temperature, gamma):
    B = image_feat.shape[0]
    acc = accum_dtype(image_feat.dtype)
    row = lambda: image_feat.new_empty(B, dtype=acc)  # noqa: E731
    return row(), row(), image_feat.new_empty(5, B, dtype=acc)


@torch.library.custom_op("softmask::focal_clip_grads", mutates_args=())
def _focal_clip_grads(image_feat: Tensor, text_feat: Tensor, temperature: Tensor, stats: Tensor, w1: Tensor,
                      w2: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``sum_i w1_i L_i2t_i + w2_i L_t2i_i`` with respect to the features and
    the temperature (:func:`_clip_grads_torch`)."""
    acc = accum_dtype(image_feat.dtype)
    return _clip_grads_torch(image_feat, text_feat, 1.0 / temperature.detach().to(acc), stats, w1, w2, acc)


@_focal_clip_grads.register_fake
def _(image_feat, text_feat, temperature, stats, w1, w2):
    acc = accum_dtype(image_feat.dtype)
    return (image_feat.new_empty(image_feat.shape, dtype=acc), text_feat.new_empty(text_feat.shape, dtype=acc),
            image_feat.new_empty((), dtype=acc))


def _clip_setup_context(ctx, inputs, output):
    image_feat, text_feat, temperature, _ = inputs
    ctx.save_for_backward(image_feat, text_feat, temperature, output[2])
    ctx.mark_non_differentiable(output[2])


def _clip_backward(ctx, g1, g2, *_unused):
    image_feat, text_feat, temperature, stats = ctx.saved_tensors
    g1 = torch.zeros_like(stats[0]) if g1 is None else g1.to(stats.dtype)
    g2 = torch.zeros_like(stats[0]) if g2 is None else g2.to(stats.dtype)
    d_image, d_text, d_tau = _focal_clip_grads(image_feat, text_feat, temperature, stats, g1, g2)
    return (d_image.to(image_feat.dtype) if ctx.needs_input_grad[0] else None,
            d_text.to(text_feat.dtype) if ctx.needs_input_grad[1] else None,
            d_tau.to(temperature.dtype) if ctx.needs_input_grad[2] else None, None)


_focal_clip_rows.register_autograd(_clip_backward, setup_context=_clip_setup_context)


# --------------------------------------------------------------------------- validation


def _check_temperature(temperature, ref: Tensor) -> Tensor:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, Tensor)):
        raise TypeError(f"temperature: expected a Python float or a 0-dim tensor, got {type(temperature).__name__}")
    if not isinstance(temperature, Tensor):
        t = float(temperature)
        if not (t > 0 and math.isfinite(t)):
            raise ValueError(f"temperature: expected a finite value > 0, got {t}")
        return torch.tensor(t, dtype=accum_dtype(ref.dtype), device=ref.device)
    check_tensor("temperature", temperature, ndim=0)
    if temperature.device != ref.device:
        raise ValueError(f"temperature: expected device {ref.device} (as image_feat), got {temperature.device}")
    if not torch.compiler.is_compiling():
        # One scalar read from the device (a sync on CUDA): a non-positive temperature
        # would otherwise flip every logit's sign and train silently wrong.
        t = float(temperature.detach())
        if not (t > 0 and math.isfinite(t)):
            raise ValueError(f"temperature: expected a finite value > 0, got {t}")
    return temperature


def _validate(image_feat, text_feat, image_keys, text_keys, image_feat_m, text_feat_m, gamma, alpha, reduction,
              ids=None, key_ids=None, key_grad=False, pos_offset=0):
    check_tensor("image_feat", image_feat, ndim=2)
    check_tensor("text_feat", text_feat, ndim=2)
    check_same("text_feat", text_feat, "image_feat", image_feat)
    if text_feat.shape != image_feat.shape:
        raise ValueError(
            f"text_feat: expected shape {tuple(image_feat.shape)} (as image_feat [B, D]), got {tuple(text_feat.shape)}"
        )
    B, D = image_feat.shape
    if B == 0 or D == 0:
        raise ValueError(f"image_feat: expected a non-empty [B, D] tensor, got shape {tuple(image_feat.shape)}")
    if (image_keys is None) != (text_keys is None):
        given, missing = ("image_keys", "text_keys") if text_keys is None else ("text_keys", "image_keys")
        raise ValueError(f"{missing}: expected a [N, D] key bank since {given} is given (or both None), got None")
    if isinstance(key_grad, bool) is False:
        raise TypeError(f"key_grad: expected a bool, got {type(key_grad).__name__}")
    if isinstance(pos_offset, bool) or not isinstance(pos_offset, int):
        raise TypeError(f"pos_offset: expected a Python int, got {type(pos_offset).__name__}")
    if pos_offset < 0:
        raise ValueError(f"pos_offset: expected an int >= 0, got {pos_offset}")
    clip = text_keys is None and image_keys is None
    if clip and key_grad:
        raise ValueError("key_grad: expected False in CLIP mode (no key banks: the keys are the batch, whose "
                         "gradient is always computed), got True")
    if clip and pos_offset:
        raise ValueError(f"pos_offset: expected 0 in CLIP mode (the keys are the batch itself), got {pos_offset}")
    if ids is not None and pos_offset:
        raise ValueError(f"pos_offset: expected 0 with ids (the ids define the positives), got {pos_offset}")
    banks, lengths = {}, {}
    for name, keys in (("text_keys", text_keys), ("image_keys", image_keys)):
        if keys is not None:
            banks[name], lengths[name] = _key_parts(name, keys, image_feat, by_position=ids is None,
                                                    pos_offset=pos_offset)
            if key_grad and len(lengths[name]) != 1:
                raise ValueError(f"{name}: expected one [N, D] tensor with key_grad=True (the gradient goes to one "
                                 f"tensor), got {len(lengths[name])} parts")
        else:
            banks[name] = None
    key_id_parts = _validate_ids(ids, key_ids, lengths, image_feat)
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
        raise TypeError(f"gamma: expected a Python float, got {type(gamma).__name__}")
    if not (gamma >= 0 and math.isfinite(gamma)):
        raise ValueError(f"gamma: expected a finite value >= 0, got {gamma}")
    alpha = check_fraction("alpha", alpha)
    if key_grad and alpha > 0:
        raise ValueError(f"key_grad: expected alpha = 0 with key_grad=True (momentum targets take keys without "
                         f"gradient), got alpha = {alpha}")
    for name, feat in (("image_feat_m", image_feat_m), ("text_feat_m", text_feat_m)):
        if feat is None:
            if alpha > 0:
                raise ValueError(f"{name}: expected momentum features [B, D] since alpha = {alpha} > 0, got None")
            continue
        check_tensor(name, feat, ndim=2)
        check_same(name, feat, "image_feat", image_feat)
        if feat.shape != image_feat.shape:
            raise ValueError(f"{name}: expected shape {tuple(image_feat.shape)} (as image_feat), got {tuple(feat.shape)}")
    if alpha > 0 and text_keys is None:
        raise ValueError(
            f"text_keys: momentum distillation (alpha = {alpha} > 0) needs the key banks image_keys and text_keys, got None"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    return float(gamma), alpha, banks["image_keys"], banks["text_keys"], key_id_parts


def _check_id_tensor(name: str, t, length: int, what: str, image_feat: Tensor) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of int64 ids, got {type(t).__name__}")
    check_tensor(name, t, dtypes=(torch.int64,))
    if t.shape != (length,):
        raise ValueError(f"{name}: expected shape ({length},) ({what}), got {tuple(t.shape)}")
    if t.device != image_feat.device:
        raise ValueError(f"{name}: expected device {image_feat.device} (as image_feat), got {t.device}")
    return t


def _validate_ids(ids, key_ids, lengths: dict, image_feat: Tensor):
    """Check ``ids`` and ``key_ids`` against the batch and the key banks (``lengths``: the
    part lengths of each bank as given, empty in CLIP mode) and return, per bank, the key
    ids as one tensor per non-empty bank part: ``{"text_keys": (...), "image_keys": (...)}``,
    or None without ids."""
    clip = not lengths
    if ids is None:
        if key_ids is not None:
            raise ValueError("ids: expected [B] int64 row ids since key_ids is given, got None")
        return None
    _check_id_tensor("ids", ids, image_feat.shape[0], "one id per row of image_feat", image_feat)
    if clip:
        if key_ids is not None:
            raise ValueError(
                f"key_ids: expected None in CLIP mode (no key banks: the keys are the batch, whose ids are ids), "
                f"got {type(key_ids).__name__}"
            )
        return None
    if key_ids is None:
        raise ValueError("key_ids: expected the key banks' ids (a [N] int64 tensor, or one [N_p] int64 tensor per "
                         "key-bank part) since ids is given, got None")
    out = {}
    for bank, lens in lengths.items():
        n = sum(lens)
        if isinstance(key_ids, Tensor):
            whole = _check_id_tensor("key_ids", key_ids, n, f"one id per key of {bank}", image_feat)
            parts = whole.split(lens)
        elif isinstance(key_ids, (tuple, list)):
            if len(key_ids) != len(lens):
                raise ValueError(f"key_ids: expected {len(lens)} part(s) matching the parts of {bank} "
                                 f"(lengths {list(lens)}), got {len(key_ids)}")
            parts = [_check_id_tensor(f"key_ids[{i}]", part, lens[i], f"as {bank}[{i}]", image_feat)
                     for i, part in enumerate(key_ids)]
        else:
            raise TypeError(f"key_ids: expected a [N] int64 tensor or a tuple/list of [N_p] int64 tensors "
                            f"matching the key-bank parts, got {type(key_ids).__name__}")
        out[bank] = tuple(part for part, n_p in zip(parts, lens) if n_p > 0)
    return out


def _key_parts(name: str, keys, image_feat: Tensor, by_position: bool = True, pos_offset: int = 0):
    """Validate a key bank (a [N, D] tensor, or a tuple/list of [N_p, D] tensors read as
    their concatenation) part by part; return its non-empty parts as a tuple and the
    lengths of all its parts as given. ``by_position``: row i's positive is key i, so
    N >= B (with ids N >= 1 suffices)."""
    B, D = image_feat.shape
    if isinstance(keys, Tensor):
        named = [(name, keys)]
    elif isinstance(keys, (tuple, list)):
        if len(keys) == 0:
            raise ValueError(f"{name}: expected a [N, D] tensor or a non-empty tuple/list of [N_p, D] tensors, "
                             f"got an empty {type(keys).__name__}")
        named = [(f"{name}[{i}]", part) for i, part in enumerate(keys)]
    else:
        raise TypeError(f"{name}: expected a [N, D] tensor or a tuple/list of [N_p, D] tensors, "
                        f"got {type(keys).__name__}")
    for part_name, part in named:
        check_tensor(part_name, part, ndim=2)
        # Mixed dtypes between parts are rejected: the dtype of the keys sets the
        # precision of the products and the bytes read, so it must be the features' dtype.
        check_same(part_name, part, "image_feat", image_feat)
        check_size(part_name, part, 1, D, "D, as image_feat")
    n = sum(part.shape[0] for _, part in named)
    if by_position and n < B + pos_offset:
        if pos_offset:
            raise ValueError(f"{name}: expected N >= pos_offset + B = {pos_offset + B} keys (row i's positive is key "
                             f"pos_offset + i), got N = {n}")
        raise ValueError(f"{name}: expected N >= B = {B} keys (row i's positive is key i), got N = {n}")
    if n == 0:
        raise ValueError(f"{name}: expected at least one key, got N = 0")
    return tuple(part for _, part in named if part.shape[0] > 0), [part.shape[0] for _, part in named]


# --------------------------------------------------------------------------- public API


def focal_itc_loss(
    image_feat: Tensor,
    text_feat: Tensor,
    temperature,
    *,
    gamma: float = 2.0,
    image_keys: Optional[KeyBank] = None,
    text_keys: Optional[KeyBank] = None,
    image_feat_m: Optional[Tensor] = None,
    text_feat_m: Optional[Tensor] = None,
    alpha: float = 0.0,
    ids: Optional[Tensor] = None,
    key_ids: Optional[KeyIds] = None,
    key_grad: bool = False,
    pos_offset: int = 0,
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    r"""Focal image-text contrastive loss with momentum distillation and key queues,
    computed without materializing the ``[B, N]`` logits.

    For each direction (image-to-text: queries ``image_feat``, keys ``text_keys``,
    momentum queries ``image_feat_m``; text-to-image: ``text_feat``, ``image_keys``,
    ``text_feat_m``)::

        z = Q @ K.T / temperature                     # (B, N), never built by triton/torch
        p = softmax(z, dim=1)
        q = alpha * softmax(Qm @ K.T / temperature, dim=1) + (1 - alpha) * one_hot(arange(B), N)
        L_row = -(q * (1 - p) ** gamma * log(p)).sum(1)           # (B,)

    and with positive ids (ALBEF's retrieval fine-tuning; ``key_ids`` concatenated)::

        pos = (ids[:, None] == key_ids[None, :]) & (key_ids != -100)[None, :]   # (B, N), never built
        q = alpha * softmax(Qm @ K.T / temperature, dim=1) + (1 - alpha) * pos / pos.sum(1, keepdim=True).clamp(min=1)

    and ``rows = (L_row_i2t + L_row_t2i) / 2``; ``reduction`` "mean" gives
    ``rows.mean()`` (ALBEF's ITC loss at ``gamma = 0``), "sum" ``rows.sum()``,
    "none" ``rows`` [B]. ``gamma = alpha = 0`` is ``F.cross_entropy(z, arange(B))``
    averaged over the two directions.

    Args:
        image_feat, text_feat: [B, D] online (normalized) features; gradients flow.
        temperature: Python float or 0-dim tensor (a learnable Parameter receives its
            gradient). Must be > 0; a tensor is read once on the host to check it
            (skipped under ``torch.compile``).
        gamma: focal exponent >= 0.
        text_keys, image_keys: key banks, each a [N, D] tensor or a tuple/list of
            [N_p, D] tensors that is read as their concatenation along dim 0 without
            building it (ALBEF: ``(text_feat_m, text_queue)``, i.e. the momentum
            features of the batch then the queue, passed as they are). N >= B in all;
            row i's positive is key i. Every part has the features' dtype and device
            (mixed dtypes, e.g. a bfloat16 queue with float32 features, are rejected
            with a TypeError naming the part: cast the smaller part, not the queue).
            backend="triton" reads at most 2 non-empty parts; "torch" copies the parts
            into one buffer per call (the CPU path); "reference" concatenates.
            Treated as constants: no gradient reaches them, and no part is kept for the
            backward, so writing into a queue after the loss (the enqueue) does not
            change the gradients. Both None selects the CLIP mode: each direction
            uses the other modality's online batch features as keys and gradients flow
            into both sides.
        image_feat_m, text_feat_m: [B, D] momentum features for the distillation
            targets; required when ``alpha > 0`` (which also needs the key banks).
        alpha: distillation weight in [0, 1].
        ids: [B] int64 ids of the rows (e.g. image ids, one per image-caption pair), or
            None (row i's positive is key i). With ids, row i's one-hot target becomes
            uniform over the keys j with ``key_ids[j] == ids[i]`` (e.g. every caption of
            the same image), mixed with the distillation targets as ALBEF does; the focal
            weight applies as without ids. The id ``-100`` (:data:`softmask.reference.EMPTY_ID`,
            ALBEF's empty ``idx_queue`` slot) matches nothing: a key with it is never a
            positive, and a row with it has no positive. A row with no positive key gets
            no one-hot part (``pos / max(count, 1)``): its target is the
            ``alpha * softmax(momentum logits)`` part alone, not renormalized, so with
            ``alpha = 0`` its loss and gradients are exactly 0 (never NaN); it still
            counts in the "mean". Without the position rule, key banks may hold fewer
            than B keys. CLIP mode takes ``ids`` alone: the keys are the batch itself, so
            both directions match ``ids`` against ``ids``.
        key_ids: the int64 ids of the key-bank rows, required with ``ids`` when key banks
            are given, and used for both banks (which must then have the same length):
            a [N] tensor, or a tuple/list with one [N_p] tensor per part of each key bank
            (ALBEF: ``(ids, idx_queue)`` beside ``(text_feat_m, text_queue)``). The match
            is made inside the kernels from the two id vectors (8 bytes per key per sweep);
            no [B, N] mask exists in the triton backend, and the torch backend holds one
            block of rows' mask at a time.
        key_grad: the key banks take gradient (default False: they are constants). For keys
            that are features of a batch, e.g. all ranks' features gathered across processes
            (:class:`softmask.FocalClipLoss`). Needs one [N, D] tensor per bank and
            ``alpha = 0``; the backward then keeps the banks. The torch backend computes
            the keys' gradient in the forward's sweep (for the row weights of a "mean" or
            "sum" reduction; "none" with unequal upstream weights recomputes it); triton
            runs one more sweep in the backward, as in CLIP mode.
        pos_offset: without ids, row i's positive is key ``pos_offset + i`` (default 0), so
            ``N >= pos_offset + B``: rank r's rows against keys gathered from all ranks have
            ``pos_offset = r * B``. Key banks only (CLIP mode's keys are the batch).
        reduction: "mean" | "sum" | "none".
        backend: "auto" (triton on CUDA, torch elsewhere) | "triton" | "torch" | "reference".

    Returns:
        The loss, float32 for float16/bfloat16/float32 inputs and float64 for float64;
        a scalar, or [B] for ``reduction="none"``.

    Inputs are float16, bfloat16, float32 or float64, all of one dtype and device;
    any stride. The triton backend needs D <= 1024. Accumulation is float32 (float64
    for float64 inputs). No inf/NaN for temperatures down to 0.001 and any gamma >= 0.
    Gradients: the forward computes ``dL/dfeatures`` and ``dL/dtemperature`` in the
    same sweeps over the key bank, and the backward only scales them (plus one sweep
    for the key gradient in CLIP mode). Double backward is not supported. With ids and
    ``alpha = 0`` the triton backend runs the second sweep over the keys that momentum
    targets would run (two sweeps instead of one); with ``alpha > 0`` ids add the id
    reads and compares only. ``ids = arange(B)`` with ``key_ids`` ``arange(B)`` for the
    batch keys and ``-100`` for the queue gives the loss and gradients of no ids (bit for
    bit on the torch backend with momentum targets; without them, no ids take the tiled
    one-hot or CLIP path and agree to rounding).
    """
    gamma, alpha, image_keys, text_keys, key_id_parts = _validate(
        image_feat, text_feat, image_keys, text_keys, image_feat_m, text_feat_m, gamma, alpha, reduction, ids, key_ids,
        key_grad, pos_offset)
    temperature = _check_temperature(temperature, image_feat)
    backend = resolve_backend(backend, image_feat.device)
    if backend == "triton":
        from softmask.kernels.focal_itc import MAX_D, MAX_PARTS

        if image_feat.shape[1] > MAX_D:
            raise ValueError(
                f"image_feat: backend='triton' supports D <= {MAX_D}, got D = {image_feat.shape[1]}; use backend='torch'"
            )
        for name, parts in (("text_keys", text_keys), ("image_keys", image_keys)):
            if parts is not None and len(parts) > MAX_PARTS:
                raise ValueError(
                    f"{name}: backend='triton' reads at most {MAX_PARTS} non-empty key-bank parts, got {len(parts)}; "
                    f"pass fewer parts or use backend='torch'"
                )
    if alpha == 0:
        image_feat_m = text_feat_m = None
    if backend == "reference":
        bank = lambda parts: parts if parts is None or key_grad else [p.detach() for p in parts]  # noqa: E731
        return reference.focal_itc_loss_reference(
            image_feat, text_feat, temperature, gamma=gamma, image_keys=bank(image_keys), text_keys=bank(text_keys),
            image_feat_m=image_feat_m, text_feat_m=text_feat_m, alpha=alpha, ids=ids, key_ids=key_ids,
            pos_offset=pos_offset, reduction=reduction,
        )
    if backend == "torch" and text_keys is None and ids is None:
        out = _focal_clip_rows(image_feat, text_feat, temperature, gamma)
    else:
        detach = lambda t: None if t is None else t.detach()  # noqa: E731
        bank = lambda parts: [] if parts is None else [p if key_grad else p.detach() for p in parts]  # noqa: E731
        id_parts = lambda bank: [] if key_id_parts is None else list(key_id_parts[bank])  # noqa: E731
        out = _focal_itc_rows(
            image_feat, text_feat, temperature, bank(image_keys), bank(text_keys), detach(image_feat_m),
            detach(text_feat_m), ids, id_parts("image_keys"), id_parts("text_keys"), gamma, alpha, backend, key_grad,
            pos_offset,
        )
    rows = 0.5 * (out[0] + out[1])
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows


class FocalITCLoss(torch.nn.Module):
    """Module form of :func:`focal_itc_loss`; ``forward`` takes the same arguments
    (features, temperature and the keyword key banks / momentum features / ids)."""

    def __init__(self, gamma: float = 2.0, alpha: float = 0.0, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        self.gamma = gamma
        self.alpha = alpha
        self.reduction = reduction
        self.backend = backend

    def forward(
        self,
        image_feat: Tensor,
        text_feat: Tensor,
        temperature,
        *,
        image_keys: Optional[KeyBank] = None,
        text_keys: Optional[KeyBank] = None,
        image_feat_m: Optional[Tensor] = None,
        text_feat_m: Optional[Tensor] = None,
        ids: Optional[Tensor] = None,
        key_ids: Optional[KeyIds] = None,
        key_grad: bool = False,
        pos_offset: int = 0,
    ) -> Tensor:
        return focal_itc_loss(
            image_feat, text_feat, temperature, gamma=self.gamma, image_keys=image_keys, text_keys=text_keys,
            image_feat_m=image_feat_m, text_feat_m=text_feat_m, alpha=self.alpha, ids=ids, key_ids=key_ids,
            key_grad=key_grad, pos_offset=pos_offset, reduction=self.reduction, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, alpha={self.alpha}, reduction={self.reduction!r}, backend={self.backend!r}"
