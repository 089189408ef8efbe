"""Triton kernels of the focal ITC loss (one contrastive direction at a time).

Notation (DESIGN.md, "Focal ITC loss"): queries ``Q`` [B, D], key bank ``K`` [N, D]
(row i's positive is key i, so N >= B), optional momentum queries ``Qm`` [B, D],
``z = Q K^T / tau``, ``p = softmax(z)``, targets
``q = alpha * softmax(Qm K^T / tau) + (1 - alpha) * onehot``, per-row loss
``L_i = -sum_j q_ij (1 - p_ij)^gamma log p_ij``, and with
``g = (1-p)^gamma - gamma (1-p)^(gamma-1) p log p``, ``S_i = sum_j q_ij g_ij``:
``dL_i/dz_ik = p_ik S_i - q_ik g_ik``.

The key bank is one tensor or two (``[part 0; part 1]``, e.g. ALBEF's momentum
features of the batch and its queue): the kernels read both through two base
pointers and the boundary row ``N0`` (:func:`_load_keys`), never a concatenated copy.

Positive ids (ALBEF's retrieval fine-tuning): with row ids ``ids`` [B] and key ids
``key_ids`` [N] (int64, in the same one or two parts as the keys), the one-hot part of
the targets becomes ``(1 - alpha) * [key_ids_j == ids_i] / c_i`` with the positive count
``c_i = sum_j [key_ids_j == ids_i]``, where a key id of :data:`EMPTY_ID` (an empty
queue slot) matches nothing; a row with ``c_i = 0`` gets no one-hot part (divided by
``max(c_i, 1)``). The match is compared per tile from the two id vectors (8 bytes per
key per sweep), never stored as [B, N]. ``c_i`` is counted in sweep 1 (a partial per
split, merged in sweep 2's prologue), so sweep 2 has the target of every key; with ids
sweep 2 runs even without momentum targets (the one-hot shortcut of the combine holds
for one positive at a known column only). ``dL/dz = p S - q g`` holds for any targets.

Split over the keys (flash-decoding style). Programs run over (block of BLOCK_M
rows) x (split of ``keys_per_split`` consecutive keys, a multiple of BLOCK_N), the row
block varying fastest so that the programs of one split run together and share its
keys in L2. Each writes partial statistics to small buffers in the accumulation dtype:

* sweep 1 (every case), per split: running max ``m`` and rescaled sum ``s`` of
  ``exp(z)``, ``sum e z``, the positive's logit ``z_ii`` (0 outside its split; not
  tracked with ids), with targets the max and sum of ``exp(zm)``, with ids the positive
  count: ``[4 / 6 / 7, SPLITS, B]``; the rescaled ``sum_j e_j K_j``: ``[SPLITS, B, D]``.
* sweep 2 (with momentum targets or ids), per split: each program first merges the
  sweep-1 ``(m, s)`` of its rows over all splits into the global log-sum-exps of
  ``z`` and ``zm`` (and sums the positive counts; ``SPLITS x BLOCK_M`` values: no
  separate launch between the sweeps), then writes ``(loss, S, sum q g z)``:
  ``[3, SPLITS, B]``, and ``sum q g K``: ``[SPLITS, B, D]``. These are plain sums over
  the keys, so they merge linearly.
* combine (one launch over rows x chunks of D): ``m = max_s m_s``,
  ``w_s = exp(m_s - m)``, ``lse = m + log(sum_s w_s s_s)``,
  ``sum p K = sum_s w_s (sum e K)_s / sum_s w_s s_s``; then
  ``dQ = (S sum p K - sum q g K) / tau`` (``S`` is a row scalar, so the product with the
  merged ``sum p K`` is exact), ``dL/dtau = -(S sum p z - sum q g z) / tau``. With
  one-hot targets only the positive term remains: ``S = g_ii`` and ``sum q g K = g_ii K_i``.
  A Triton kernel rather than torch ops on the buffers: the merge as torch ops is ~10
  launches per direction (max, exp, weighted sums, log, division, focal terms), a few
  microseconds each, against a whole op predicted at ~60-90 us at ALBEF's per-GPU shape
  (benchmarks/NOTES.md).

A split holding only padding (possible when a split count is forced) stores
``m = -inf``, ``s = 0`` and zero accumulators: its weight ``exp(-inf - m)`` is 0.
Split 0 always holds key 0, so ``m`` is finite.

The CLIP-mode key gradient ``dK_k = sum_i w_i (p_ik S_i - q_ik g_ik) Q_i / tau`` (one-hot
targets: ``q_ik g_ik = [k == i + pos_offset] g_ii``; with ids ``[ids_i == ids_k] g_ik / c_i``, ``g``
recomputed at the matched entries) sums over the query rows, so its split is over the
rows: programs over (block of keys) x (split of rows) write ``[SPLITS, N, D]`` partial
sums that one ``sum(0)`` merges.

Work per direction: one-hot targets 2 matmuls of ``B*N*D`` MACs (z, e@K);
momentum targets 6 (z, zm, e@K; z, zm, qg@K). Bytes: K read once per row block and
sweep from L2 (once from HBM when the row blocks of a split run together), plus the
partial buffers, at most ``8 * BLOCK_M / (keys_per_split * elem)`` of the key bytes
per sweep by the choice of splits (:func:`_plan`), plus Q, Qm, dQ once.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from softmask.kernels._util import interpreting, split_f32
from softmask.reference import EMPTY_ID

# The id of an empty key slot inside the kernels (a compile-time constant).
_EMPTY = tl.constexpr(EMPTY_ID)


@triton.jit
def _neg_expm1(l, IS_FP64: tl.constexpr):
    """``1 - exp(l)`` for ``l <= 0``, accurate as ``l -> 0`` (where ``exp(l) - 1`` cancels).

    Taylor series for ``|l| < 1/4`` (terms to l^8 in fp32, l^13 in fp64: truncation
    below the dtype's epsilon), ``1 - exp(l)`` elsewhere (no cancellation there).
    """
    x = tl.maximum(l, -0.25)
    if IS_FP64:
        poly = 1.0 + x * (1.0 / 13.0)
        poly = 1.0 + x * poly / 12.0
        poly = 1.0 + x * poly / 11.0
        poly = 1.0 + x * poly / 10.0
        poly = 1.0 + x * poly / 9.0
    else:
        poly = 1.0 + x * (1.0 / 9.0)
    poly = 1.0 + x * poly / 8.0
    poly = 1.0 + x * poly / 7.0
    poly = 1.0 + x * poly / 6.0
    poly = 1.0 + x * poly / 5.0
    poly = 1.0 + x * poly / 4.0
    poly = 1.0 + x * poly / 3.0
    poly = 1.0 + x * poly / 2.0
    small = -x * poly
    return tl.where(l > -0.25, small, 1.0 - tl.exp(l))


@triton.jit
def _focal_terms(l, p, gamma, IS_FP64: tl.constexpr):
    """Elementwise ``t = (1-p)^gamma`` and ``g = t * (1 - gamma * p * l / (1-p))``.

    ``(1-p)^(gamma-1) * l`` is written as ``t * (l / (1-p))``: the ratio tends to -1 as
    ``p -> 1`` and stays finite for every ``gamma >= 0`` (including 0 < gamma < 1).
    """
    om = _neg_expm1(l, IS_FP64)
    pos = om > 0
    safe_om = tl.where(pos, om, 1.0)
    t = tl.where(pos, tl.exp(gamma * tl.log(safe_om)), tl.where(gamma == 0.0, 1.0, 0.0))
    ratio = tl.where(pos, l / safe_om, -1.0)
    g = t * (1.0 - gamma * p * ratio)
    return t, g


@triton.jit
def _load_tile(PTR, idx, offs_d, stride_r, stride_d, n_rows, D, DOT_FP32: tl.constexpr):
    """Rows ``idx`` of a [n_rows, D] matrix as a (len(idx), BLOCK_D) tile, zero outside.
    With DOT_FP32 the tile is upcast (the interpreter's bf16 ``tl.dot`` is wrong)."""
    mask = (idx < n_rows)[:, None] & (offs_d < D)[None, :]
    tile = tl.load(PTR + idx[:, None] * stride_r + offs_d[None, :] * stride_d, mask=mask, other=0.0)
    if DOT_FP32:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _load_keys(K0, K1, idx, offs_d, s0n, s0d, s1n, s1d, N0, n_valid, D,
               TWO_PARTS: tl.constexpr, DOT_FP32: tl.constexpr):
    """Rows ``idx`` of the key bank ``[part 0 (rows 0..N0-1); part 1 (rows N0..)]`` as a
    (len(idx), BLOCK_D) tile, zero where ``idx >= n_valid`` or ``offs_d >= D``. Each row's
    address is taken from its own part, then one masked load reads the tile (so a tile
    that straddles ``N0`` costs the same bytes, and the load still feeds ``tl.dot``
    directly, which lets the compiler pipeline it through shared memory)."""
    mask = (idx < n_valid)[:, None] & (offs_d < D)[None, :]
    ptrs = K0 + idx[:, None] * s0n + offs_d[None, :] * s0d
    if TWO_PARTS:
        in1 = (idx >= N0)[:, None]
        i1 = tl.where(idx >= N0, idx - N0, 0)
        ptrs = tl.where(in1, K1 + i1[:, None] * s1n + offs_d[None, :] * s1d, ptrs)
    tile = tl.load(ptrs, mask=mask, other=0.0)
    if DOT_FP32:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _load_key_ids(KID0, KID1, idx, s0, s1, N0, n_valid, TWO_PARTS: tl.constexpr):
    """Key ids of the bank rows ``idx`` (parts split at ``N0`` as the keys), :data:`EMPTY_ID`
    where ``idx >= n_valid`` so that padding columns match no row."""
    ptrs = KID0 + idx * s0
    if TWO_PARTS:
        ptrs = tl.where(idx >= N0, KID1 + tl.where(idx >= N0, idx - N0, 0) * s1, ptrs)
    return tl.load(ptrs, mask=idx < n_valid, other=_EMPTY)


@triton.jit
def _id_match(rid, kid):
    """``[kid_j == rid_i]`` as a (len(rid), len(kid)) mask; an empty key slot matches nothing."""
    return (rid[:, None] == kid[None, :]) & (kid != _EMPTY)[None, :]


@triton.jit
def _merged_lse(PM, PS, rows, rmask, n_splits, stride_ps, ACC: tl.constexpr, BLOCK_M: tl.constexpr):
    """``log(sum_s exp(m_s) s_s)`` over the splits' partial ``(m, s)`` of ``rows``:
    the global max first, so that an empty split (``m_s = -inf``) weighs exactly 0."""
    m = tl.full([BLOCK_M], float("-inf"), ACC)
    for sp in range(0, n_splits):
        m = tl.maximum(m, tl.load(PM + sp * stride_ps + rows, mask=rmask, other=0.0))
    s = tl.zeros([BLOCK_M], ACC)
    for sp in range(0, n_splits):
        m_s = tl.load(PM + sp * stride_ps + rows, mask=rmask, other=0.0)
        s += tl.exp(m_s - m) * tl.load(PS + sp * stride_ps + rows, mask=rmask, other=1.0)
    return m + tl.log(s)


@triton.jit
def _focal_itc_sweep1_kernel(
    Q, QM, K0, K1, TAU, RID, KID0, KID1, PSTAT, PACC,
    B, N, N0, D, keys_per_split, pos_offset,
    stride_qb, stride_qd, stride_qmb, stride_qmd, stride_k0n, stride_k0d, stride_k1n, stride_k1d,
    stride_rid, stride_kid0, stride_kid1,
    stride_pstat, stride_ps, stride_pas, stride_pab,
    HAS_TARGETS: tl.constexpr, HAS_IDS: tl.constexpr, TWO_PARTS: tl.constexpr, ACC: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Partial log-sum-exp of ``z`` (and ``zm``), ``sum e z``, ``z_ii`` (or with ids the
    positive count) and ``sum e K`` over one split of the keys, online-rescaled
    (flash-attention style)."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q, rows, offs_d, stride_qb, stride_qd, B, D, DOT_FP32)
    inv_tau = 1.0 / tl.load(TAU).to(ACC)
    lo = pid_s * keys_per_split
    hi = tl.minimum(lo + keys_per_split, N)
    if HAS_TARGETS:
        qm = _load_tile(QM, rows, offs_d, stride_qmb, stride_qmd, B, D, DOT_FP32)
        m_m = tl.full([BLOCK_M], float("-inf"), ACC)
        s_m = tl.zeros([BLOCK_M], ACC)
    if HAS_IDS:
        rid = tl.load(RID + rows * stride_rid, mask=rmask, other=_EMPTY)
        cnt = tl.zeros([BLOCK_M], ACC)  # integers, exact in fp32 up to 2^24 keys
    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    s_i = tl.zeros([BLOCK_M], ACC)
    pz_i = tl.zeros([BLOCK_M], ACC)
    z_ii = tl.zeros([BLOCK_M], ACC)
    acc_pk = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cmask = cols < hi
        k = _load_keys(K0, K1, cols, offs_d, stride_k0n, stride_k0d, stride_k1n, stride_k1d, N0, hi, D,
                       TWO_PARTS, DOT_FP32)
        z = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC) * inv_tau  # (BLOCK_M, BLOCK_N)
        z = tl.where(cmask[None, :], z, 0.0)  # padded columns of K are zero rows
        # Every tile of a split holds >= 1 valid column (the split starts below hi), so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(tl.where(cmask[None, :], z, float("-inf")), 1))
        scale = tl.exp(m_i - m_new)
        e = tl.where(cmask[None, :], tl.exp(z - m_new[:, None]), 0.0)
        s_i = s_i * scale + tl.sum(e, 1)
        pz_i = pz_i * scale + tl.sum(e * z, 1)
        if HAS_IDS:
            kid = _load_key_ids(KID0, KID1, cols, stride_kid0, stride_kid1, N0, hi, TWO_PARTS)
            cnt += tl.sum(_id_match(rid, kid).to(ACC), 1)
        else:
            # The positive's logit from the same tile as the max, so that a saturated row
            # gives log p_ii == 0 exactly (a separate dot product could round differently).
            z_ii += tl.sum(tl.where(cols[None, :] == rows[:, None] + pos_offset, z, 0.0), 1)
        acc_pk = acc_pk * scale[:, None] + tl.dot(e.to(k.dtype), k, input_precision=PRECISION, out_dtype=ACC)
        m_i = m_new
        if HAS_TARGETS:
            zm = tl.dot(qm, tl.trans(k), input_precision=PRECISION, out_dtype=ACC) * inv_tau
            zm = tl.where(cmask[None, :], zm, float("-inf"))
            mm_new = tl.maximum(m_m, tl.max(zm, 1))
            s_m = s_m * tl.exp(m_m - mm_new) + tl.sum(tl.exp(zm - mm_new[:, None]), 1)
            m_m = mm_new
    pst = PSTAT + pid_s * stride_ps + rows
    tl.store(pst, m_i, mask=rmask)
    tl.store(pst + stride_pstat, s_i, mask=rmask)
    tl.store(pst + 2 * stride_pstat, pz_i, mask=rmask)
    tl.store(pst + 3 * stride_pstat, z_ii, mask=rmask)
    if HAS_TARGETS:
        tl.store(pst + 4 * stride_pstat, m_m, mask=rmask)
        tl.store(pst + 5 * stride_pstat, s_m, mask=rmask)
    if HAS_IDS:
        tl.store(pst + 6 * stride_pstat, cnt, mask=rmask)
    tl.store(PACC + pid_s * stride_pas + rows[:, None] * stride_pab + offs_d[None, :], acc_pk,
             mask=rmask[:, None] & (offs_d < D)[None, :])


@triton.jit
def _focal_itc_sweep2_kernel(
    Q, QM, K0, K1, TAU, RID, KID0, KID1, PSTAT, P2STAT, P2ACC,
    B, N, N0, D, keys_per_split, n_splits, pos_offset,
    stride_qb, stride_qd, stride_qmb, stride_qmd, stride_k0n, stride_k0d, stride_k1n, stride_k1d,
    stride_rid, stride_kid0, stride_kid1,
    stride_pstat, stride_ps, stride_pas, stride_pab,
    gamma_hi, gamma_lo, alpha_hi, alpha_lo,
    HAS_MOMENTUM: tl.constexpr, HAS_IDS: tl.constexpr, TWO_PARTS: tl.constexpr, ACC: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Momentum targets and/or positive ids: partial loss, ``S``, ``sum q g z`` and
    ``sum q g K`` over one split of the keys, with the global log-sum-exps (and positive
    counts) merged from sweep 1's partials."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q, rows, offs_d, stride_qb, stride_qd, B, D, DOT_FP32)
    inv_tau = 1.0 / tl.load(TAU).to(ACC)
    # Float scalars reach kernels as fp32; hi + lo halves keep float64 inputs exact.
    gamma = tl.cast(gamma_hi, ACC) + tl.cast(gamma_lo, ACC)
    alpha = tl.cast(alpha_hi, ACC) + tl.cast(alpha_lo, ACC)
    lse = _merged_lse(PSTAT, PSTAT + stride_pstat, rows, rmask, n_splits, stride_ps, ACC, BLOCK_M)
    if HAS_MOMENTUM:
        qm = _load_tile(QM, rows, offs_d, stride_qmb, stride_qmd, B, D, DOT_FP32)
        lse_m = _merged_lse(PSTAT + 4 * stride_pstat, PSTAT + 5 * stride_pstat, rows, rmask, n_splits, stride_ps,
                            ACC, BLOCK_M)
    if HAS_IDS:
        rid = tl.load(RID + rows * stride_rid, mask=rmask, other=_EMPTY)
        cnt = tl.zeros([BLOCK_M], ACC)
        for sp in range(0, n_splits):
            cnt += tl.load(PSTAT + 6 * stride_pstat + sp * stride_ps + rows, mask=rmask, other=0.0)
        # One-hot mass per positive; a row without positives gets none (0 / max(0, 1)).
        w_pos = (1.0 - alpha) / tl.maximum(cnt, 1.0)
    lo = pid_s * keys_per_split
    hi = tl.minimum(lo + keys_per_split, N)
    loss = tl.zeros([BLOCK_M], ACC)
    s_row = tl.zeros([BLOCK_M], ACC)
    qgz = tl.zeros([BLOCK_M], ACC)
    acc_qgk = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cmask = cols < hi
        k = _load_keys(K0, K1, cols, offs_d, stride_k0n, stride_k0d, stride_k1n, stride_k1d, N0, hi, D,
                       TWO_PARTS, DOT_FP32)
        z = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC) * inv_tau
        l = tl.where(cmask[None, :], z - lse[:, None], 0.0)  # padded columns: harmless l = 0
        p = tl.exp(l)
        t, g = _focal_terms(l, p, gamma, ACC == tl.float64)
        if HAS_MOMENTUM:
            zm = tl.dot(qm, tl.trans(k), input_precision=PRECISION, out_dtype=ACC) * inv_tau
            tgt = alpha * tl.exp(zm - lse_m[:, None])
        else:
            tgt = tl.zeros([BLOCK_M, BLOCK_N], ACC)
        if HAS_IDS:
            kid = _load_key_ids(KID0, KID1, cols, stride_kid0, stride_kid1, N0, hi, TWO_PARTS)
            # + 0.0 off the positives: the sum is exact, so ids = arange(B) with empty
            # queue slots give the bits of the one-hot line below.
            tgt = tgt + tl.where(_id_match(rid, kid), w_pos[:, None], 0.0)
        else:
            tgt = tl.where(cols[None, :] == rows[:, None] + pos_offset, tgt + (1.0 - alpha), tgt)
        tgt = tl.where(cmask[None, :], tgt, 0.0)
        loss -= tl.sum(tgt * t * l, 1)
        qg = tgt * g
        s_row += tl.sum(qg, 1)
        qgz += tl.sum(qg * tl.where(cmask[None, :], z, 0.0), 1)
        acc_qgk += tl.dot(qg.to(k.dtype), k, input_precision=PRECISION, out_dtype=ACC)
    pst = P2STAT + pid_s * stride_ps + rows
    tl.store(pst, loss, mask=rmask)
    tl.store(pst + stride_pstat, s_row, mask=rmask)
    tl.store(pst + 2 * stride_pstat, qgz, mask=rmask)
    tl.store(P2ACC + pid_s * stride_pas + rows[:, None] * stride_pab + offs_d[None, :], acc_qgk,
             mask=rmask[:, None] & (offs_d < D)[None, :])


@triton.jit
def _focal_itc_combine_kernel(
    PSTAT, PACC, P2STAT, P2ACC, K0, K1, TAU,
    LOSS, DQ, DTAU, STATS,
    B, N0, D, n_splits, pos_offset,
    stride_pstat, stride_ps, stride_pas, stride_pab, stride_k0n, stride_k0d, stride_k1n, stride_k1d,
    stride_dqb, stride_sb,
    gamma_hi, gamma_lo,
    TWO_SWEEPS: tl.constexpr, HAS_IDS: tl.constexpr, TWO_PARTS: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Merge the splits' partials of BLOCK_M rows and BLOCK_D feature columns into the
    loss, ``dL/dQ``, ``dL/dtau`` and the row statistics (lse, S, g_ii, positive count;
    with ids g_ii is 0 and the count is summed over the splits, else 1)."""
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    qd_mask = rmask[:, None] & (offs_d < D)[None, :]
    inv_tau = 1.0 / tl.load(TAU).to(ACC)
    gamma = tl.cast(gamma_hi, ACC) + tl.cast(gamma_lo, ACC)

    m = tl.full([BLOCK_M], float("-inf"), ACC)
    for sp in range(0, n_splits):
        m = tl.maximum(m, tl.load(PSTAT + sp * stride_ps + rows, mask=rmask, other=0.0))
    s = tl.zeros([BLOCK_M], ACC)
    pz = tl.zeros([BLOCK_M], ACC)
    z_ii = tl.zeros([BLOCK_M], ACC)
    cnt = tl.full([BLOCK_M], 1.0, ACC)
    if HAS_IDS:
        cnt = tl.zeros([BLOCK_M], ACC)
    pk = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for sp in range(0, n_splits):
        pst = PSTAT + sp * stride_ps + rows
        w = tl.exp(tl.load(pst, mask=rmask, other=0.0) - m)  # 0 for an empty split (m_s = -inf)
        s += w * tl.load(pst + stride_pstat, mask=rmask, other=1.0)
        pz += w * tl.load(pst + 2 * stride_pstat, mask=rmask, other=0.0)
        if HAS_IDS:
            cnt += tl.load(pst + 6 * stride_pstat, mask=rmask, other=0.0)
        else:
            z_ii += tl.load(pst + 3 * stride_pstat, mask=rmask, other=0.0)  # nonzero in the positive's split only
        pk += w[:, None] * tl.load(PACC + sp * stride_pas + rows[:, None] * stride_pab + offs_d[None, :],
                                   mask=qd_mask, other=0.0)
    lse = m + tl.log(s)
    pk = pk / s[:, None]  # sum_j p_j K_j
    pz = pz / s  # sum_j p_j z_j
    l_ii = z_ii - lse
    t_ii, g_ii = _focal_terms(l_ii, tl.exp(l_ii), gamma, ACC == tl.float64)
    if HAS_IDS:
        g_ii = tl.zeros([BLOCK_M], ACC)  # no single positive column: the key gradient recomputes g
    if TWO_SWEEPS:
        loss = tl.zeros([BLOCK_M], ACC)
        s_row = tl.zeros([BLOCK_M], ACC)
        qgz = tl.zeros([BLOCK_M], ACC)
        qgk = tl.zeros([BLOCK_M, BLOCK_D], ACC)
        for sp in range(0, n_splits):
            pst = P2STAT + sp * stride_ps + rows
            loss += tl.load(pst, mask=rmask, other=0.0)
            s_row += tl.load(pst + stride_pstat, mask=rmask, other=0.0)
            qgz += tl.load(pst + 2 * stride_pstat, mask=rmask, other=0.0)
            qgk += tl.load(P2ACC + sp * stride_pas + rows[:, None] * stride_pab + offs_d[None, :],
                           mask=qd_mask, other=0.0)
    else:
        loss = -t_ii * l_ii
        s_row = g_ii
        qgz = g_ii * z_ii
        k_diag = _load_keys(K0, K1, rows + pos_offset, offs_d, stride_k0n, stride_k0d, stride_k1n, stride_k1d, N0,
                            B + pos_offset, D, TWO_PARTS, False)
        qgk = g_ii[:, None] * k_diag.to(ACC)
    dq = (s_row[:, None] * pk - qgk) * inv_tau
    tl.store(DQ + rows[:, None] * stride_dqb + offs_d[None, :], dq, mask=qd_mask)
    first = rmask & (pid_d == 0)  # the row results once, from the first chunk of D
    tl.store(LOSS + rows, loss, mask=first)
    tl.store(DTAU + rows, -inv_tau * (s_row * pz - qgz), mask=first)
    tl.store(STATS + rows, lse, mask=first)
    tl.store(STATS + stride_sb + rows, s_row, mask=first)
    tl.store(STATS + 2 * stride_sb + rows, g_ii, mask=first)
    tl.store(STATS + 3 * stride_sb + rows, cnt, mask=first)


@triton.jit
def _focal_itc_key_grad_kernel(
    Q, K, TAU, STATS, W, W_SCALE, RID, KID, DK,
    B, N, D, rows_per_split, pos_offset,
    stride_qb, stride_qd, stride_kn, stride_kd, stride_dks, stride_dkn, stride_sb, stride_rid, stride_kid,
    gamma_hi, gamma_lo,
    HAS_IDS: tl.constexpr, ACC: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``dK_k = sum_i w_i * (p_ik S_i - q_ik g_ik) Q_i / tau`` for targets without
    momentum: one-hot (``q_ik g_ik = [i == k] g_ii``) or, with ids, ``[ids_i == kid_k] / c_i``
    (``g_ik`` recomputed from ``l_ik``), summed over one split of the query rows: one
    program per (block of keys, split)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    k = _load_tile(K, cols, offs_d, stride_kn, stride_kd, N, D, DOT_FP32)
    inv_tau = 1.0 / tl.load(TAU).to(ACC)
    if HAS_IDS:
        gamma = tl.cast(gamma_hi, ACC) + tl.cast(gamma_lo, ACC)
        kid = tl.load(KID + cols * stride_kid, mask=cmask, other=_EMPTY)
    lo = pid_s * rows_per_split
    hi = tl.minimum(lo + rows_per_split, B)
    acc = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    for start in range(lo, hi, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        rmask = rows < hi
        q = _load_tile(Q, rows, offs_d, stride_qb, stride_qd, hi, D, DOT_FP32)
        lse = tl.load(STATS + rows, mask=rmask, other=0.0)
        s_row = tl.load(STATS + stride_sb + rows, mask=rmask, other=0.0)
        g_ii = tl.load(STATS + 2 * stride_sb + rows, mask=rmask, other=0.0)
        w = tl.load(W + rows, mask=rmask, other=0.0).to(ACC)
        z = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC) * inv_tau  # (BLOCK_M, BLOCK_N)
        p = tl.where(cmask[None, :], tl.exp(z - lse[:, None]), 0.0)
        if HAS_IDS:
            rid = tl.load(RID + rows * stride_rid, mask=rmask, other=_EMPTY)
            inv_cnt = 1.0 / tl.maximum(tl.load(STATS + 3 * stride_sb + rows, mask=rmask, other=1.0), 1.0)
            match = _id_match(rid, kid)
            l = tl.where(match, z - lse[:, None], 0.0)  # only matched entries are used
            _, g = _focal_terms(l, tl.exp(l), gamma, ACC == tl.float64)
            dz = p * s_row[:, None] - tl.where(match, g * inv_cnt[:, None], 0.0)
        else:
            dz = p * s_row[:, None] - tl.where(rows[:, None] + pos_offset == cols[None, :], g_ii[:, None], 0.0)
        dz = dz * w[:, None]
        acc += tl.dot(tl.trans(dz.to(q.dtype)), q, input_precision=PRECISION, out_dtype=ACC)
    acc = acc * (inv_tau * tl.load(W_SCALE).to(ACC))
    tl.store(DK + pid_s * stride_dks + cols[:, None] * stride_dkn + offs_d[None, :], acc,
             mask=cmask[:, None] & dmask[None, :])


# --------------------------------------------------------------------------- launchers

MAX_D = 1024
MAX_PARTS = 2  # key-bank parts the kernels read directly (ALBEF: batch momentum features, queue)

# Grid target: at least this many programs per SM (issue 7), so that one program's
# memory stalls are covered by another's work on the same SM.
PROGRAMS_PER_SM = 2

# A split's partial accumulator ([BLOCK_M, D] in fp32, written once and read once by
# the combine: 8 * BLOCK_M * D bytes) may cost at most 1/4 of the key bytes it replaces
# (keys_per_split * D * elem): keys_per_split * elem >= PARTIAL_BYTES_FACTOR * BLOCK_M,
# with PARTIAL_BYTES_FACTOR = 4 * 8. With two sweeps that bounds the partials to half the
# key traffic in the worst case; at albef_gpu the choice lands far below (NOTES.md).
PARTIAL_BYTES_FACTOR = 32

# Merge kernel tile: 16 rows x 32 feature columns (512 elements, 4 per thread at 4
# warps) gives 32 programs at B = 64, D = 256, each reading 2 x SPLITS x 2 KB.
COMBINE_BLOCK_M = 16
COMBINE_BLOCK_D = 32


def _empty(*shape, device, dtype) -> torch.Tensor:
    """Allocation of every buffer the kernels write (tests replace it with a NaN fill to
    prove that every element is written)."""
    return torch.empty(*shape, device=device, dtype=dtype)


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _tile_candidates(D: int, dtype: torch.dtype, momentum: bool = False, ids: bool = False):
    """Block sizes and launch options the launcher may pick for ``D`` and ``dtype`` (and,
    where ptxas asked for it, the sweeps' flags: momentum targets, ids), largest row block
    first. BLOCK_D covers D in one tile (the [BLOCK_M, BLOCK_D] accumulator lives in
    registers), so wide D and 4-byte/8-byte inputs take smaller tiles. Chosen from
    ptxas's register/spill report for sm_90 (``python -m tests.compile_kernels``,
    benchmarks/NOTES.md); not yet timed on a GPU. The 16-row half-precision tile serves
    small batches, where 64-row blocks would need so many splits that the partial
    accumulators cost more than the keys (:func:`_plan`). :func:`_sweep_launch` adjusts
    the launch options of one sweep."""
    block_d = max(16, triton.next_power_of_2(D))
    if interpreting():
        # Each interpreted program costs ~2.5 ms: few, large programs.
        return [(dict(BLOCK_M=32, BLOCK_N=64, BLOCK_D=block_d), {})]
    if dtype in (torch.float16, torch.bfloat16) and block_d <= 256:
        # 64-row tiles spilled in both sweeps at D = 256 (ptxas: 72 / 244 bytes at 8 warps,
        # more at 16 warps); 32 x 64 at 8 warps uses 174-178 registers, no spill. The 16-row
        # tile at 4 warps spilled 8-120 B in sweep 2 with ids at 2 stages, none at 1 stage
        # (204-254 registers in every sweep and flag).
        return [(dict(BLOCK_M=32, BLOCK_N=64, BLOCK_D=block_d), dict(num_warps=8, num_stages=2)),
                (dict(BLOCK_M=16, BLOCK_N=64, BLOCK_D=block_d), dict(num_warps=4, num_stages=1))]
    if dtype in (torch.float16, torch.bfloat16) and block_d == 512:
        # D = 512 (CLIP ViT-B), ptxas: 32 x 32 at 4 warps spilled 116-876 B in every kernel;
        # at 8 warps the one-hot sweep 1, sweep 2 and the key gradient are clean (168-226
        # registers), but sweep 1 with momentum targets puts ~15 KB in local memory and ids
        # spill 8-80 B; 16 x 32 at 8 warps and 1 stage is clean in every sweep and flag
        # (128-207 registers).
        if momentum or ids:
            return [(dict(BLOCK_M=16, BLOCK_N=32, BLOCK_D=block_d), dict(num_warps=8, num_stages=1))]
        return [(dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=block_d), dict(num_warps=8, num_stages=2))]
    if dtype in (torch.float16, torch.bfloat16) or block_d <= 128:
        return [(dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=block_d), dict(num_warps=4, num_stages=2))]
    # 4- and 8-byte inputs at D > 128. fp32 D = 256, ptxas: 4 warps spilled 13-21 KB per
    # thread in both sweeps; 8 warps leaves sweep 2 clean and sweep 1 (targets) at 668 B.
    return [(dict(BLOCK_M=16, BLOCK_N=32, BLOCK_D=block_d), dict(num_warps=8, num_stages=1))]


def _sweep_launch(launch: dict, blocks: dict, dtype: torch.dtype, sweep: int, momentum: bool, ids: bool) -> dict:
    """Launch options of sweep ``sweep`` (1 or 2) on the tile ``blocks``: the tile's own,
    except where ptxas showed a spill that another pipelining depth removes."""
    if not launch:  # the interpreter
        return launch
    tile = (blocks["BLOCK_M"], blocks["BLOCK_N"], blocks["BLOCK_D"])
    if sweep == 2 and ids and dtype in (torch.float16, torch.bfloat16) and tile == (32, 64, 256):
        return dict(launch, num_stages=1)  # ptxas: 8 / 4 B spilled at 2 stages, 255 registers clean at 1
    if sweep == 2 and ids and not momentum and dtype == torch.float32 and tile == (16, 32, 256):
        return dict(launch, num_stages=2)  # ptxas: 6 KB spilled at 1 stage, 212 registers clean at 2
    return launch


def _momentum_lse_apart(dtype: torch.dtype, blocks: dict, launch: dict) -> bool:
    """Whether sweep 1 leaves the momentum logits' log-sum-exp to a pass of its own (sweep 1
    without targets on ``Qm``). float32 at D = 256 (16 x 32, 8 warps): ptxas spilled
    660-820 B per thread in sweep 1 with targets at every tile and warp count tried (16 x 16
    to 32 x 32, 4 to 16 warps, 1-2 stages: the two loop-invariant [16, 256] float32 operands
    of the FMA products, Q and Qm, do not fit beside the accumulator), while sweep 1
    without targets is clean (171 registers). The pass costs one more read of the keys and
    a discarded ``sum e K`` ([SPLITS, B, D]); predicted cheaper than the spill's local
    memory traffic in the inner loop, not yet timed."""
    return bool(launch) and dtype == torch.float32 and blocks["BLOCK_D"] == 256


def _combine_config(D: int):
    block_d = max(16, triton.next_power_of_2(D))
    if interpreting():
        return dict(BLOCK_M=32, BLOCK_D=block_d), {}
    return dict(BLOCK_M=COMBINE_BLOCK_M, BLOCK_D=min(COMBINE_BLOCK_D, block_d)), dict(num_warps=4)


@functools.lru_cache(maxsize=None)
def _sm_count_cuda(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; 1 under the interpreter (CPU tensors),
    which keeps interpreted grids small."""
    if device.type == "cuda":
        return _sm_count_cuda(device.index if device.index is not None else torch.cuda.current_device())
    return 1


def _split_count(n_tiles: int, wanted: int, max_splits: int):
    """Tiles per split and split count for at least ``wanted`` splits (at most
    ``max_splits``, at least 1) of ``n_tiles`` tiles: ``floor`` tiles per split, so the
    rounding gives more splits, never fewer."""
    want = max(1, min(wanted, max_splits, n_tiles))
    per = max(1, n_tiles // want)
    return per, triton.cdiv(n_tiles, per)


def _plan(B: int, N: int, D: int, dtype: torch.dtype, device: torch.device, splits: Optional[int] = None,
          momentum: bool = False, ids: bool = False):
    """Blocks, launch options, keys per split and split count of the two sweeps.

    The grid is ``ceil(B / BLOCK_M) x SPLITS`` programs. For each candidate tile (largest
    row block first) the split count aims at ``PROGRAMS_PER_SM`` programs per SM, capped
    so that every split holds at least one BLOCK_N tile and at least
    ``PARTIAL_BYTES_FACTOR * BLOCK_M / elem`` keys. The first candidate that reaches the
    target is taken, else the one with the most programs. ``splits`` forces the count
    (tests): keys are then dealt in BLOCK_N multiples and trailing splits may be empty.
    """
    elem = torch.empty((), dtype=dtype).element_size()
    target = PROGRAMS_PER_SM * sm_count(device)
    best = None
    for blocks, launch in _tile_candidates(D, dtype, momentum, ids):
        bm, bn = blocks["BLOCK_M"], blocks["BLOCK_N"]
        row_blocks = triton.cdiv(B, bm)
        n_tiles = triton.cdiv(N, bn)
        if splits is not None:
            per = triton.cdiv(n_tiles, splits)
            return blocks, launch, per * bn, splits
        min_keys = triton.cdiv(PARTIAL_BYTES_FACTOR * bm, elem)
        per, n_splits = _split_count(n_tiles, triton.cdiv(target, row_blocks), max(1, N // min_keys))
        programs = row_blocks * n_splits
        if best is None or programs > best[0]:
            best = (programs, blocks, launch, per * bn, n_splits)
        if programs >= target:
            break
    _, blocks, launch, keys_per_split, n_splits = best
    return blocks, launch, keys_per_split, n_splits


def _flags(dtype: torch.dtype):
    dot_fp32 = dtype == torch.bfloat16 and interpreting()
    precision = "tf32" if dtype in (torch.float16, torch.bfloat16) else "ieee"
    return dict(ACC=_tl_acc(dtype), DOT_FP32=dot_fp32, PRECISION=precision)


def _key_parts(keys):
    """``(K0, K1, N0, N, two_parts)`` for a [N, D] tensor or a sequence of 1-2 of them."""
    parts = [keys] if isinstance(keys, torch.Tensor) else list(keys)
    if not 1 <= len(parts) <= MAX_PARTS:
        raise ValueError(f"keys: the triton kernels take 1 to {MAX_PARTS} key-bank parts, got {len(parts)}")
    k0 = parts[0]
    k1 = parts[1] if len(parts) == 2 else k0
    n0 = k0.shape[0]
    return k0, k1, n0, n0 + (k1.shape[0] if len(parts) == 2 else 0), len(parts) == 2


def _key_id_parts(key_ids, n0: int, N: int, two_parts: bool):
    """``(KID0, KID1)`` in the layout of the keys: a [N] tensor is cut at ``n0`` (views,
    no copy); a sequence must hold one [N_p] tensor per key part."""
    if isinstance(key_ids, torch.Tensor):
        if key_ids.shape != (N,):
            raise ValueError(f"key_ids: expected shape ({N},) (one id per key), got {tuple(key_ids.shape)}")
        return (key_ids[:n0], key_ids[n0:]) if two_parts else (key_ids, key_ids)
    parts = list(key_ids)
    lengths = [n0, N - n0] if two_parts else [N]
    if [tuple(p.shape) for p in parts] != [(n,) for n in lengths]:
        raise ValueError(f"key_ids: expected parts of shapes {[(n,) for n in lengths]} (as the keys), "
                         f"got {[tuple(p.shape) for p in parts]}")
    return (parts[0], parts[1]) if two_parts else (parts[0], parts[0])


def focal_itc_direction_triton(q, keys, qm, tau, gamma: float, alpha: float, *, ids=None, key_ids=None,
                               pos_offset: int = 0, splits: Optional[int] = None):
    """One direction of the focal ITC loss with its gradients, never building [B, N].

    Args: ``q`` [B, D]; ``keys`` a [N, D] tensor or a sequence of up to
    :data:`MAX_PARTS` tensors [N_p, D] read as their concatenation (no copy);
    ``qm`` [B, D] or None (one-hot targets); ``tau`` 0-dim tensor on the same device;
    ``ids`` [B] int64 row ids and ``key_ids`` the keys' int64 ids (a [N] tensor or one
    [N_p] tensor per key part), or both None (row i's positive is key ``pos_offset + i``,
    ``N >= pos_offset + B``).
    ``splits`` (tests) forces the number of key splits. Returns ``loss`` [B], ``dq``
    [B, D] (``dL_i/dQ_i``), ``dtau`` [B] (``dL_i/dtau``) and ``stats`` [4, B]
    (lse, S, g_ii, positive count; with ids g_ii is 0, without the count is 1), all
    float32 (float64 for float64 inputs).
    """
    k0, k1, n0, N, two_parts = _key_parts(keys)
    B, D = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device
    has_targets = qm is not None and alpha > 0
    has_ids = ids is not None
    two_sweeps = has_targets or has_ids
    qm_ = qm if has_targets else q
    # Without ids the id pointers are never read; q stands in for them.
    kid0, kid1 = _key_id_parts(key_ids, n0, N, two_parts) if has_ids else (q, q)
    rid = ids if has_ids else q
    id_args = (rid.stride(0), kid0.stride(0), kid1.stride(0))
    blocks, launch, keys_per_split, n_splits = _plan(B, N, D, q.dtype, dev, splits, momentum=has_targets, ids=has_ids)
    flags = _flags(q.dtype)
    lse_apart = has_targets and _momentum_lse_apart(q.dtype, blocks, launch)
    # Partial buffers; every element the later kernels read is written by the sweeps
    # (rows < B, d < D; rows 4-5 with momentum targets, row 6 with ids; with the momentum
    # log-sum-exp apart its pass writes rows 4-7, of which 6-7 are not read or are rewritten).
    pstat = _empty(8 if lse_apart else 7 if has_ids else (6 if has_targets else 4), n_splits, B, device=dev,
                   dtype=acc)
    pacc = _empty(n_splits, B, D, device=dev, dtype=acc)
    if two_sweeps:
        p2stat = _empty(3, n_splits, B, device=dev, dtype=acc)
        p2acc = _empty(n_splits, B, D, device=dev, dtype=acc)
    else:
        p2stat, p2acc = pstat, pacc  # unused (TWO_SWEEPS=False)
    key_args = (k0.stride(0), k0.stride(1), k1.stride(0), k1.stride(1))
    grid = (triton.cdiv(B, blocks["BLOCK_M"]), n_splits)
    if lse_apart:  # (max, sum) of exp(zm) into rows 4-5: sweep 1 without targets over Qm
        scratch = _empty(n_splits, B, D, device=dev, dtype=acc)
        _focal_itc_sweep1_kernel[grid](
            qm_, qm_, k0, k1, tau, rid, kid0, kid1, pstat[4:], scratch,
            B, N, n0, D, keys_per_split, pos_offset,
            qm_.stride(0), qm_.stride(1), qm_.stride(0), qm_.stride(1), *key_args, *id_args,
            pstat.stride(0), pstat.stride(1), scratch.stride(0), scratch.stride(1),
            HAS_TARGETS=False, HAS_IDS=False, TWO_PARTS=two_parts, **flags, **blocks,
            **_sweep_launch(launch, blocks, q.dtype, 1, False, False),
        )
    _focal_itc_sweep1_kernel[grid](
        q, qm_, k0, k1, tau, rid, kid0, kid1, pstat, pacc,
        B, N, n0, D, keys_per_split, pos_offset,
        q.stride(0), q.stride(1), qm_.stride(0), qm_.stride(1), *key_args, *id_args,
        pstat.stride(0), pstat.stride(1), pacc.stride(0), pacc.stride(1),
        HAS_TARGETS=has_targets and not lse_apart, HAS_IDS=has_ids, TWO_PARTS=two_parts, **flags, **blocks,
        **_sweep_launch(launch, blocks, q.dtype, 1, has_targets and not lse_apart, has_ids),
    )
    if two_sweeps:
        _focal_itc_sweep2_kernel[grid](
            q, qm_, k0, k1, tau, rid, kid0, kid1, pstat, p2stat, p2acc,
            B, N, n0, D, keys_per_split, n_splits, pos_offset,
            q.stride(0), q.stride(1), qm_.stride(0), qm_.stride(1), *key_args, *id_args,
            pstat.stride(0), pstat.stride(1), p2acc.stride(0), p2acc.stride(1),
            *split_f32(gamma), *split_f32(alpha),
            HAS_MOMENTUM=has_targets, HAS_IDS=has_ids, TWO_PARTS=two_parts, **flags, **blocks,
            **_sweep_launch(launch, blocks, q.dtype, 2, has_targets, has_ids),
        )
    loss = _empty(B, device=dev, dtype=acc)
    dtau = _empty(B, device=dev, dtype=acc)
    dq = _empty(B, D, device=dev, dtype=acc)
    stats = _empty(4, B, device=dev, dtype=acc)
    cblocks, claunch = _combine_config(D)
    cgrid = (triton.cdiv(B, cblocks["BLOCK_M"]), triton.cdiv(D, cblocks["BLOCK_D"]))
    _focal_itc_combine_kernel[cgrid](
        pstat, pacc, p2stat, p2acc, k0, k1, tau,
        loss, dq, dtau, stats,
        B, n0, D, n_splits, pos_offset,
        pstat.stride(0), pstat.stride(1), pacc.stride(0), pacc.stride(1), *key_args,
        dq.stride(0), stats.stride(0),
        *split_f32(gamma),
        TWO_SWEEPS=two_sweeps, HAS_IDS=has_ids, TWO_PARTS=two_parts, ACC=flags["ACC"], **cblocks, **claunch,
    )
    return loss, dq, dtau, stats


def _key_grad_plan(B: int, N: int, D: int, dtype: torch.dtype, device: torch.device,
                   splits: Optional[int] = None):
    """The largest tile of :func:`_tile_candidates` (ptxas: the 16-row half-precision tile
    spills in this kernel at D = 256, the 32-row one does not) and the split of the query
    rows: ``ceil(N / BLOCK_N) x SPLITS`` programs, aiming at ``PROGRAMS_PER_SM`` per SM,
    each split at least one BLOCK_M tile of rows."""
    blocks, launch = _tile_candidates(D, dtype)[0]  # D = 512 half, ptxas: 32 x 32 / 8 warps clean with ids too
    bm = blocks["BLOCK_M"]
    row_tiles = triton.cdiv(B, bm)
    if splits is not None:
        return blocks, launch, triton.cdiv(row_tiles, splits) * bm, splits
    target = PROGRAMS_PER_SM * sm_count(device)
    per, n_splits = _split_count(row_tiles, triton.cdiv(target, triton.cdiv(N, blocks["BLOCK_N"])), row_tiles)
    return blocks, launch, per * bm, n_splits


def focal_itc_key_grad_triton(q, k, tau, stats, w, *, ids=None, key_ids=None, gamma: float = 0.0,
                              pos_offset: int = 0, splits: Optional[int] = None):
    """Gradient with respect to the keys for targets without momentum (CLIP mode):
    ``dK = sum_i w_i dL_i/dK`` as float32 [N, D] (float64 for float64 inputs). ``stats``
    from :func:`focal_itc_direction_triton` of the same ``q``, ``k``, ids and ``gamma``;
    ``ids`` [B] / ``key_ids`` [N] (int64) select positives by id (``gamma`` is then
    needed to recompute ``g`` at them); without ids row i's positive is key
    ``pos_offset + i``. ``splits`` (tests) forces the number of row splits."""
    B, D = q.shape
    N = k.shape[0]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    # Weights normalized to max |w| = 1 before the half-precision dz @ Q (a mean over a
    # large batch would push dz * w below float16's normal range); the scale is
    # applied to the float32 accumulator. Computed on the device: no host sync.
    w_scale = w.abs().amax().to(acc).clamp_min(torch.finfo(acc).tiny)
    w = (w.to(acc) / w_scale).contiguous()
    has_ids = ids is not None
    rid, kid = (ids, key_ids) if has_ids else (q, q)  # q: never read without ids
    blocks, launch, rows_per_split, n_splits = _key_grad_plan(B, N, D, q.dtype, q.device, splits)
    part = _empty(n_splits, N, D, device=q.device, dtype=acc)
    grid = (triton.cdiv(N, blocks["BLOCK_N"]), n_splits)
    _focal_itc_key_grad_kernel[grid](
        q, k, tau, stats, w, w_scale, rid, kid, part,
        B, N, D, rows_per_split, pos_offset,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), part.stride(0), part.stride(1), stats.stride(0),
        rid.stride(0), kid.stride(0),
        *split_f32(gamma),
        HAS_IDS=has_ids, **_flags(q.dtype), **blocks, **launch,
    )
    return part[0] if n_splits == 1 else part.sum(0)
