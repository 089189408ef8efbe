"""Triton kernels of the focal ITC loss (one contrastive direction at a time).

Notation (DESIGN.md, "Focal ITC loss"): queries ``Q`` [B, D], key bank ``K`` [N, D]
(row i's positive is key i, so N >= B), optional momentum queries ``Qm`` [B, D],
``z = Q K^T / tau``, ``p = softmax(z)``, targets
``q = alpha * softmax(Qm K^T / tau) + (1 - alpha) * onehot``, per-row loss
``L_i = -sum_j q_ij (1 - p_ij)^gamma log p_ij``, and with
``g = (1-p)^gamma - gamma (1-p)^(gamma-1) p log p``, ``S_i = sum_j q_ij g_ij``:
``dL_i/dz_ik = p_ik S_i - q_ik g_ik``.

The forward kernel never builds the [B, N] logits. It returns, per row, the loss,
``dL_i/dQ_i`` (so the autograd backward is a scale), ``dL_i/dtau`` and the row
statistics (lse, S, g_ii) that the key-gradient kernel of the CLIP mode needs.

Sweep 1 (every case): online log-sum-exp of ``z`` and, with targets, of ``zm``,
and in the same pass the rescaled accumulations ``sum_j p_j K_j`` and
``sum_j p_j z_j`` (flash-attention style), so the ``p_k S`` part of the gradient
costs no second sweep because ``S`` is a row scalar.
Sweep 2 (only with momentum targets): the loss, ``S``, ``sum_j q_j g_j K_j`` and
``sum_j q_j g_j z_j``. With one-hot targets only the diagonal term remains and is
computed from the diagonal of the sweep's tiles: one sweep in all.

Work per direction: one-hot targets 2 matmuls of ``B*N*D`` MACs (z, p@K);
momentum targets 6 (z, zm, p@K; z, zm, qg@K). Minimum bytes: K read once per
row block ``ceil(B/BLOCK_M) * N * D * elem``, plus Q, Qm, dQ once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from softmask.kernels._util import split_f32
from softmask.ops._common import interpreting


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
def _focal_itc_fwd_kernel(
    Q, QM, K, TAU,
    LOSS, DQ, DTAU, STATS,
    B, N, D,
    stride_qb, stride_qd, stride_qmb, stride_qmd, stride_kn, stride_kd, stride_dqb, stride_sb,
    gamma_hi, gamma_lo, alpha_hi, alpha_lo,
    HAS_TARGETS: tl.constexpr, ACC: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    qd_mask = rmask[:, None] & dmask[None, :]
    q = _load_tile(Q, rows, offs_d, stride_qb, stride_qd, B, D, DOT_FP32)
    inv_tau = 1.0 / tl.load(TAU).to(ACC)
    # Float scalars reach kernels as fp32; hi + lo halves keep float64 inputs exact.
    gamma = tl.cast(gamma_hi, ACC) + tl.cast(gamma_lo, ACC)
    alpha = tl.cast(alpha_hi, ACC) + tl.cast(alpha_lo, ACC)
    if HAS_TARGETS:
        qm = _load_tile(QM, rows, offs_d, stride_qmb, stride_qmd, B, D, DOT_FP32)
        m_m = tl.full([BLOCK_M], float("-inf"), ACC)
        s_m = tl.zeros([BLOCK_M], ACC)

    # ---- sweep 1: lse of z (and zm), sum_j p_j K_j and sum_j p_j z_j, online-rescaled
    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    s_i = tl.zeros([BLOCK_M], ACC)
    pz_i = tl.zeros([BLOCK_M], ACC)
    z_ii = tl.zeros([BLOCK_M], ACC)
    acc_pk = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cmask = cols < N
        k = _load_tile(K, cols, offs_d, stride_kn, stride_kd, N, D, DOT_FP32)
        z = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC) * inv_tau  # (BLOCK_M, BLOCK_N)
        z = tl.where(cmask[None, :], z, 0.0)  # padded columns of K are zero rows
        m_new = tl.maximum(m_i, tl.max(tl.where(cmask[None, :], z, float("-inf")), 1))
        scale = tl.exp(m_i - m_new)
        e = tl.where(cmask[None, :], tl.exp(z - m_new[:, None]), 0.0)
        s_i = s_i * scale + tl.sum(e, 1)
        pz_i = pz_i * scale + tl.sum(e * z, 1)
        # The positive's logit from the same tile as the lse, so that a saturated row
        # gives log p_ii == 0 exactly (a separate dot product could round differently).
        z_ii += tl.sum(tl.where(cols[None, :] == rows[:, None], z, 0.0), 1)
        acc_pk = acc_pk * scale[:, None] + tl.dot(e.to(k.dtype), k, input_precision=PRECISION, out_dtype=ACC)
        m_i = m_new
        if HAS_TARGETS:
            zm = tl.dot(qm, tl.trans(k), input_precision=PRECISION, out_dtype=ACC) * inv_tau
            zm = tl.where(cmask[None, :], zm, float("-inf"))
            mm_new = tl.maximum(m_m, tl.max(zm, 1))
            s_m = s_m * tl.exp(m_m - mm_new) + tl.sum(tl.exp(zm - mm_new[:, None]), 1)
            m_m = mm_new
    lse = m_i + tl.log(s_i)
    acc_pk = acc_pk / s_i[:, None]  # sum_j p_j K_j
    pz_i = pz_i / s_i  # sum_j p_j z_j
    dq_ptrs = DQ + rows[:, None] * stride_dqb + offs_d[None, :]
    if HAS_TARGETS:
        # Park sum_j p_j K_j in the output while sweep 2 needs its registers for
        # sum_j q_j g_j K_j (two live [BLOCK_M, BLOCK_D] accumulators spilled at D = 256).
        tl.store(dq_ptrs, acc_pk, mask=qd_mask)

    # ---- diagonal (positive) term
    l_ii = z_ii - lse
    t_ii, g_ii = _focal_terms(l_ii, tl.exp(l_ii), gamma, ACC == tl.float64)

    if HAS_TARGETS:
        lse_m = m_m + tl.log(s_m)
        # ---- sweep 2: loss, S, sum_j q_j g_j K_j and sum_j q_j g_j z_j
        loss = tl.zeros([BLOCK_M], ACC)
        s_row = tl.zeros([BLOCK_M], ACC)
        qgz = tl.zeros([BLOCK_M], ACC)
        acc_qgk = tl.zeros([BLOCK_M, BLOCK_D], ACC)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            cmask = cols < N
            k = _load_tile(K, cols, offs_d, stride_kn, stride_kd, N, D, DOT_FP32)
            z = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC) * inv_tau
            zm = tl.dot(qm, tl.trans(k), input_precision=PRECISION, out_dtype=ACC) * inv_tau
            l = tl.where(cmask[None, :], z - lse[:, None], 0.0)  # padded columns: harmless l = 0
            p = tl.exp(l)
            t, g = _focal_terms(l, p, gamma, ACC == tl.float64)
            tgt = alpha * tl.exp(zm - lse_m[:, None])
            tgt = tl.where(cols[None, :] == rows[:, None], tgt + (1.0 - alpha), tgt)
            tgt = tl.where(cmask[None, :], tgt, 0.0)
            loss -= tl.sum(tgt * t * l, 1)
            qg = tgt * g
            s_row += tl.sum(qg, 1)
            qgz += tl.sum(qg * tl.where(cmask[None, :], z, 0.0), 1)
            acc_qgk += tl.dot(qg.to(k.dtype), k, input_precision=PRECISION, out_dtype=ACC)
    else:
        loss = -t_ii * l_ii
        s_row = g_ii
        qgz = g_ii * z_ii
        k_diag = tl.load(K + rows[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=qd_mask, other=0.0)
        acc_qgk = g_ii[:, None] * k_diag.to(ACC)

    if HAS_TARGETS:
        acc_pk = tl.load(dq_ptrs, mask=qd_mask, other=0.0)
    dq = (s_row[:, None] * acc_pk - acc_qgk) * inv_tau
    dtau = -inv_tau * (s_row * pz_i - qgz)
    tl.store(LOSS + rows, loss, mask=rmask)
    tl.store(DTAU + rows, dtau, mask=rmask)
    tl.store(dq_ptrs, dq, mask=qd_mask)
    tl.store(STATS + rows, lse, mask=rmask)
    tl.store(STATS + stride_sb + rows, s_row, mask=rmask)
    tl.store(STATS + 2 * stride_sb + rows, g_ii, mask=rmask)


@triton.jit
def _focal_itc_key_grad_kernel(
    Q, K, TAU, STATS, W, W_SCALE, DK,
    B, N, D,
    stride_qb, stride_qd, stride_kn, stride_kd, stride_dkn, stride_sb,
    ACC: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``dK_k = sum_i w_i * (p_ik S_i - [i == k] g_ii) Q_i / tau`` for one-hot targets:
    one program per block of keys, one sweep over the query rows."""
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    k = _load_tile(K, cols, offs_d, stride_kn, stride_kd, N, D, DOT_FP32)
    inv_tau = 1.0 / tl.load(TAU).to(ACC)
    acc = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    for start in range(0, B, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        rmask = rows < B
        q = _load_tile(Q, rows, offs_d, stride_qb, stride_qd, B, D, DOT_FP32)
        lse = tl.load(STATS + rows, mask=rmask, other=0.0)
        s_row = tl.load(STATS + stride_sb + rows, mask=rmask, other=0.0)
        g_ii = tl.load(STATS + 2 * stride_sb + rows, mask=rmask, other=0.0)
        w = tl.load(W + rows, mask=rmask, other=0.0).to(ACC)
        z = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC) * inv_tau  # (BLOCK_M, BLOCK_N)
        p = tl.where(cmask[None, :], tl.exp(z - lse[:, None]), 0.0)
        dz = p * s_row[:, None] - tl.where(rows[:, None] == cols[None, :], g_ii[:, None], 0.0)
        dz = dz * w[:, None]
        acc += tl.dot(tl.trans(dz.to(q.dtype)), q, input_precision=PRECISION, out_dtype=ACC)
    acc = acc * (inv_tau * tl.load(W_SCALE).to(ACC))
    tl.store(DK + cols[:, None] * stride_dkn + offs_d[None, :], acc, mask=cmask[:, None] & dmask[None, :])


# --------------------------------------------------------------------------- launchers


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _config(D: int, dtype: torch.dtype):
    """Block sizes and warps. BLOCK_D covers D in one tile (the [BLOCK_M, BLOCK_D]
    accumulator lives in registers), so wide D and 4-byte/8-byte inputs take smaller tiles.
    Chosen from ptxas's register/spill report for sm_90 (``python -m tests.compile_kernels``,
    benchmarks/NOTES.md); not yet timed on a GPU."""
    block_d = max(16, triton.next_power_of_2(D))
    if interpreting():
        # Each interpreted program costs ~2.5 ms: few, large programs.
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_D=block_d), {}
    if dtype in (torch.float16, torch.bfloat16) and block_d <= 256:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=block_d), dict(num_warps=8, num_stages=2)
    if dtype in (torch.float16, torch.bfloat16) or block_d <= 128:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=block_d), dict(num_warps=4, num_stages=2)
    return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_D=block_d), dict(num_warps=4, num_stages=1)


def _flags(dtype: torch.dtype):
    dot_fp32 = dtype == torch.bfloat16 and interpreting()
    precision = "tf32" if dtype in (torch.float16, torch.bfloat16) else "ieee"
    return dict(ACC=_tl_acc(dtype), DOT_FP32=dot_fp32, PRECISION=precision)


MAX_D = 1024




def focal_itc_direction_triton(q, k, qm, tau, gamma: float, alpha: float):
    """One direction of the focal ITC loss with its gradients, never building [B, N].

    Args: ``q`` [B, D], ``k`` [N, D], ``qm`` [B, D] or None (one-hot targets),
    ``tau`` 0-dim tensor on the same device. Returns ``loss`` [B], ``dq`` [B, D]
    (``dL_i/dQ_i``), ``dtau`` [B] (``dL_i/dtau``) and ``stats`` [3, B] (lse, S, g_ii),
    all float32 (float64 for float64 inputs).
    """
    B, D = q.shape
    N = k.shape[0]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    loss = torch.empty(B, device=q.device, dtype=acc)
    dtau = torch.empty(B, device=q.device, dtype=acc)
    dq = torch.empty(B, D, device=q.device, dtype=acc)
    stats = torch.empty(3, B, device=q.device, dtype=acc)
    has_targets = qm is not None and alpha > 0
    qm_ = qm if has_targets else q
    blocks, launch = _config(D, q.dtype)
    grid = (triton.cdiv(B, blocks["BLOCK_M"]),)
    _focal_itc_fwd_kernel[grid](
        q, qm_, k, tau, loss, dq, dtau, stats,
        B, N, D,
        q.stride(0), q.stride(1), qm_.stride(0), qm_.stride(1), k.stride(0), k.stride(1), dq.stride(0),
        stats.stride(0),
        *split_f32(gamma), *split_f32(alpha),
        HAS_TARGETS=has_targets, **_flags(q.dtype), **blocks, **launch,
    )
    return loss, dq, dtau, stats


def focal_itc_key_grad_triton(q, k, tau, stats, w):
    """Gradient with respect to the keys for one-hot targets (CLIP mode):
    ``dK = sum_i w_i dL_i/dK`` as float32 [N, D] (float64 for float64 inputs)."""
    B, D = q.shape
    N = k.shape[0]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dk = torch.empty(N, D, device=q.device, dtype=acc)
    # Weights normalized to max |w| = 1 before the half-precision dz @ Q (a mean over a
    # large batch would push dz * w below float16's normal range); the scale is
    # applied to the float32 accumulator. Computed on the device: no host sync.
    w_scale = w.abs().amax().to(acc).clamp_min(torch.finfo(acc).tiny)
    w = (w.to(acc) / w_scale).contiguous()
    blocks, launch = _config(D, q.dtype)
    grid = (triton.cdiv(N, blocks["BLOCK_N"]),)
    _focal_itc_key_grad_kernel[grid](
        q, k, tau, stats, w, w_scale, dk,
        B, N, D,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), dk.stride(0), stats.stride(0),
        **_flags(q.dtype), **blocks, **launch,
    )
    return dk
