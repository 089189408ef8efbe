"""Triton kernels of the word-conditional Grad-CAM soft mask, and their launchers.

Tensors in, tensors out; no autograd and no input validation here (both live in
:mod:`softmask.ops.soft_mask`).

The op (one image-caption pair ``b``, heads ``h``, chosen word ``w = word_index[b]``)::

    s[h, n]  = scale * query[b, h, w] . key[b, h, n]          (padded keys: -inf)
    A[h, n]  = softmax_n(s[h, :])
    dA[h, n] = grad_context[b, h, w] . value[b, h, n]
    cam[n]   = (1/H) sum_h A[h, n] * max(dA[h, n], 0)
    c[n]     = (cam[n] - lo) / (hi - lo)   over the valid patch keys n = 1..N-1 (0 where flat)
    mask[n]  = 1 - (1 - floor) * c[n],  mask[0] = 1,  padded keys 1
    out[b, n, :] = image_embeds[b, n, :] * mask[n]

Three launches, each reading its inputs once:

1. :func:`_head_cam_kernel`, grid ``B * H``: one program per (sample, head) reads
   the chosen word's query and grad_context rows (``dh`` each) and streams that
   head's key and value rows once, writing the head's contribution
   ``A * max(dA, 0)`` (``[B, H, N]`` in the accumulation dtype). Parallel over
   ``B * H`` programs rather than ``B``: at the ALBEF shape (B = 64) one program
   per sample would leave half of an H100's 132 SMs idle.
2. :func:`_cam_mask_kernel`, grid ``B``: sums the heads (the head sum needs all
   heads of a sample, a cross-program dependency), takes the min and max over
   the valid patch keys and writes ``cam`` and ``mask`` (``[B, N]``).
3. :func:`_scale_rows_kernel`, grid ``(cdiv(N, BLOCK_R), B)``: ``out = x * mask``
   row-wise, also the backward (``d x = d out * mask``).

Bytes (es = element size of the attention tensors, ex of image_embeds, ea of the
accumulation dtype): the minimum is ``B*H*dh*es*2`` (the two chosen rows)
``+ 2*B*H*N*dh*es`` (key, value) ``+ 2*B*N*D*ex`` (image_embeds in, out) ``+ 2*B*N*ea``
(cam, mask out). The split adds ``2*B*H*N*ea`` (the head contributions written
and read back, 1.5 % of the minimum at the ALBEF shape in bf16) and ``B*N*ea`` (the
mask read by launch 3); where a key row spans several blocks (N > 64 at dh = 64)
launch 1 also parks its scores in its own output row and reads them back
(``2*B*H*N*ea``, cache-resident: written and re-read by the same program).
FLOPs: ``4*B*H*N*dh`` (two dot products per key)
``+ B*N*D`` (the multiply) plus ``O(B*H*N)`` softmax work: about 0.25 FLOP per
byte, far below any GPU's ridge point, so every launch is memory bound.

Padded keys are never read from key/value (their loads are masked off). A sample
whose keys are all padded gets cam 0 and mask 1 (no NaN). An out-of-range word
index (which the public op rejects on the host) is not dereferenced here: the
sample's cam and mask come out NaN instead.

Triton types Python float arguments as fp32, which would round ``scale`` and
``floor`` in the float64 path; each is passed as an fp32 pair ``hi + lo`` whose
sum carries about 48 bits.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from softmask.kernels._util import split_f32


__all__ = [
    "word_gradcam_forward",
    "word_gradcam_from_probs_forward",
    "scale_rows_forward",
]

# Largest [keys, dh] tile that one program of the head kernel holds (elements):
# 4096 = 64 keys x 64 dims at 8 warps. ptxas -v for sm_90a (Triton 3.8): 107-113
# registers for bf16/fp32 and 242 for fp64, no spills, in both branches; 8192 (128
# keys) needs 167-255 registers and spills in fp64. Not timed (no GPU in the session
# that wrote it): key/value are streamed once whatever the block, the block only
# trades loop overhead against register pressure.
_HEAD_TILE = 4096
_HEAD_WARPS = 8
# Keys per block of the head-sum / min-max kernel (one fp32 vector per head loaded
# per step; 1024 keys = 4 KiB per load). Rows up to 1024 keys (ViT-B/16 at 384 px
# has 577) take the single-sweep branch.
_CAM_BLOCK = 1024
# Rows x columns of the row-scaling kernel's tile: 16 x 256 bf16 = 8 KiB in and
# out per step. D = 768 is three steps. Not swept.
_SCALE_ROWS = 16
_SCALE_COLS = 256


def _alloc(shape, dtype, device) -> torch.Tensor:
    """Every output of this module is allocated here (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- kernel 1


@triton.jit
def _head_cam_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, w_ptr, kpm_ptr, contrib_ptr,
    H, T, N, DH, scale_hi, scale_lo,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_gb, stride_gh, stride_gt, stride_gd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mn,
    HAS_KPM: tl.constexpr, SINGLE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """contrib[b, h, n] = softmax_n(scale q.k)[n] * max(g.v[n], 0) for one (b, h)."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // H
    h = pid % H
    acc_ty = contrib_ptr.dtype.element_ty

    w = tl.load(w_ptr + b).to(tl.int64)
    w_ok = (w >= 0) & (w < T)
    w = tl.where(w_ok, w, 0)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = (offs_d < DH) & w_ok
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + w * stride_qt + offs_d * stride_qd,
                mask=d_ok, other=0.0).to(acc_ty)
    g = tl.load(g_ptr + b * stride_gb + h * stride_gh + w * stride_gt + offs_d * stride_gd,
                mask=d_ok, other=0.0).to(acc_ty)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    c_base = contrib_ptr + pid * N  # contrib is a fresh contiguous (B, H, N)
    bad = tl.where(w_ok, 0.0, float("nan")).to(acc_ty)  # NaN-poisons a sample with a bad word index
    offs_n0 = tl.arange(0, BLOCK_N)

    if SINGLE:  # the whole key row fits one block: one sweep, scores stay in registers
        n_ok = offs_n0 < N
        valid = n_ok
        if HAS_KPM:
            valid = valid & (tl.load(kpm_ptr + b * stride_mb + offs_n0 * stride_mn, mask=n_ok, other=0) != 0)
        ld = valid[:, None] & (offs_d < DH)[None, :]
        k = tl.load(k_base + offs_n0[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=ld, other=0.0).to(acc_ty)  # (BLOCK_N, BLOCK_D)
        s = tl.sum(k * q[None, :], axis=1)
        s = s * scale_hi + s * scale_lo
        s = tl.where(valid, s, float("-inf"))
        m = tl.max(s, axis=0)
        m = tl.where(m == float("-inf"), 0.0, m)
        e = tl.exp(s - m)  # 0 at padded keys
        l_sum = tl.sum(e, axis=0)
        inv_l = tl.where(l_sum > 0, 1.0 / tl.where(l_sum > 0, l_sum, 1.0), 0.0)  # a fully padded row attends to nothing
        v = tl.load(v_base + offs_n0[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=ld, other=0.0).to(acc_ty)
        da = tl.sum(v * g[None, :], axis=1)
        c = tl.where(valid, (e * inv_l) * tl.maximum(da, 0.0), 0.0) + bad
        tl.store(c_base + offs_n0, c.to(acc_ty), mask=n_ok)
    else:  # sweep 1 over key blocks: scores (parked in contrib) and per-lane online max / sum
        m_i = tl.full([BLOCK_N], float("-inf"), acc_ty)
        l_i = tl.zeros([BLOCK_N], acc_ty)
        for start in range(0, N, BLOCK_N):
            offs_n = start + offs_n0
            n_ok = offs_n < N
            valid = n_ok
            if HAS_KPM:
                valid = valid & (tl.load(kpm_ptr + b * stride_mb + offs_n * stride_mn, mask=n_ok, other=0) != 0)
            k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                        mask=valid[:, None] & (offs_d < DH)[None, :], other=0.0).to(acc_ty)
            s = tl.sum(k * q[None, :], axis=1)
            s = s * scale_hi + s * scale_lo
            s = tl.where(valid, s, float("-inf"))
            tl.store(c_base + offs_n, s.to(acc_ty), mask=n_ok)
            m_new = tl.maximum(m_i, s)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_safe) + tl.exp(s - m_safe)
            m_i = m_new
        m = tl.max(m_i, axis=0)
        m = tl.where(m == float("-inf"), 0.0, m)
        l_sum = tl.sum(l_i * tl.exp(m_i - m), axis=0)
        inv_l = tl.where(l_sum > 0, 1.0 / tl.where(l_sum > 0, l_sum, 1.0), 0.0)
        tl.debug_barrier()  # the parked scores are read back by other threads of this program
        # sweep 2: probabilities from the parked scores, value rows, contributions
        for start in range(0, N, BLOCK_N):
            offs_n = start + offs_n0
            n_ok = offs_n < N
            s = tl.load(c_base + offs_n, mask=n_ok, other=float("-inf"))
            valid = s > float("-inf")
            v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                        mask=valid[:, None] & (offs_d < DH)[None, :], other=0.0).to(acc_ty)
            da = tl.sum(v * g[None, :], axis=1)
            c = tl.where(valid, (tl.exp(s - m) * inv_l) * tl.maximum(da, 0.0), 0.0) + bad
            tl.store(c_base + offs_n, c.to(acc_ty), mask=n_ok)


# --------------------------------------------------------------------------- kernel 2


@triton.jit
def _cam_mask_kernel(
    contrib_ptr, kpm_ptr, cam_ptr, mask_ptr,
    H, N, omf_hi, omf_lo,  # 1 - floor = omf_hi + omf_lo
    stride_mb, stride_mn,
    HAS_KPM: tl.constexpr, SINGLE: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """cam[b] = mean_h contrib[b, h]; mask[b] = 1 - (1 - floor) * minmax(cam[b]) over valid patch keys."""
    b = tl.program_id(0).to(tl.int64)
    acc_ty = cam_ptr.dtype.element_ty
    c_base = contrib_ptr + b * H * N
    offs_n0 = tl.arange(0, BLOCK_N)
    if SINGLE:
        n_ok = offs_n0 < N
        acc = tl.zeros([BLOCK_N], acc_ty)
        for h in range(0, H):
            acc += tl.load(c_base + h * N + offs_n0, mask=n_ok, other=0.0)
        cam = acc / H
        valid = n_ok & (offs_n0 >= 1)
        if HAS_KPM:
            valid = valid & (tl.load(kpm_ptr + b * stride_mb + offs_n0 * stride_mn, mask=n_ok, other=0) != 0)
        # NaN (a poisoned sample) is carried into the mask explicitly: GPU min/max drop it
        nan = tl.where(tl.max(tl.where(cam != cam, 1.0, 0.0), axis=0) > 0, float("nan"), 0.0)
        lo = tl.min(tl.where(valid, cam, float("inf")), axis=0)
        hi = tl.max(tl.where(valid, cam, float("-inf")), axis=0)
        span = hi - lo
        spread = span > 0  # False for a flat map and a row without valid patch keys (inf - inf is NaN)
        cn = tl.where(valid, tl.where(spread, (cam - lo) / tl.where(spread, span, 1.0), 0.0), 0.0)
        tl.store(cam_ptr + b * N + offs_n0, cam, mask=n_ok)
        tl.store(mask_ptr + b * N + offs_n0, (1.0 - (omf_hi * cn + omf_lo * cn) + nan).to(acc_ty), mask=n_ok)
    else:
        lo_i = tl.full([BLOCK_N], float("inf"), acc_ty)
        nan_i = tl.zeros([BLOCK_N], acc_ty)
        hi_i = tl.full([BLOCK_N], float("-inf"), acc_ty)
        for start in range(0, N, BLOCK_N):
            offs_n = start + offs_n0
            n_ok = offs_n < N
            acc = tl.zeros([BLOCK_N], acc_ty)
            for h in range(0, H):
                acc += tl.load(c_base + h * N + offs_n, mask=n_ok, other=0.0)
            cam = acc / H
            tl.store(cam_ptr + b * N + offs_n, cam, mask=n_ok)
            valid = n_ok & (offs_n >= 1)
            if HAS_KPM:
                valid = valid & (tl.load(kpm_ptr + b * stride_mb + offs_n * stride_mn, mask=n_ok, other=0) != 0)
            nan_i = tl.maximum(nan_i, tl.where(cam != cam, 1.0, 0.0))
            lo_i = tl.minimum(lo_i, tl.where(valid, cam, float("inf")))
            hi_i = tl.maximum(hi_i, tl.where(valid, cam, float("-inf")))
        nan = tl.where(tl.max(nan_i, axis=0) > 0, float("nan"), 0.0)
        lo = tl.min(lo_i, axis=0)
        hi = tl.max(hi_i, axis=0)
        span = hi - lo
        spread = span > 0  # False for a flat map and a row without valid patch keys
        tl.debug_barrier()  # cam is read back by other threads of this program
        for start in range(0, N, BLOCK_N):
            offs_n = start + offs_n0
            n_ok = offs_n < N
            cam = tl.load(cam_ptr + b * N + offs_n, mask=n_ok, other=0.0)
            valid = n_ok & (offs_n >= 1)
            if HAS_KPM:
                valid = valid & (tl.load(kpm_ptr + b * stride_mb + offs_n * stride_mn, mask=n_ok, other=0) != 0)
            cn = tl.where(valid, tl.where(spread, (cam - lo) / tl.where(spread, span, 1.0), 0.0), 0.0)
            tl.store(mask_ptr + b * N + offs_n, (1.0 - (omf_hi * cn + omf_lo * cn) + nan).to(acc_ty), mask=n_ok)


# --------------------------------------------------------------------------- kernel 3


@triton.jit
def _scale_rows_kernel(
    x_ptr, mask_ptr, out_ptr,
    N, D,
    stride_xb, stride_xn, stride_xd,
    stride_ob, stride_on,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[b, n, :] = x[b, n, :] * mask[b, n] (product in the mask's dtype, one rounding)."""
    pid_r = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < N
    m = tl.load(mask_ptr + b * N + offs_r, mask=r_ok, other=0.0)
    offs_d0 = tl.arange(0, BLOCK_D)
    x_base = x_ptr + b * stride_xb + offs_r.to(tl.int64)[:, None] * stride_xn
    o_base = out_ptr + b * stride_ob + offs_r.to(tl.int64)[:, None] * stride_on
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + offs_d0
        ok = r_ok[:, None] & (offs_d < D)[None, :]
        x = tl.load(x_base + offs_d[None, :] * stride_xd, mask=ok, other=0.0)
        y = x.to(m.dtype) * m[:, None]
        tl.store(o_base + offs_d[None, :], y.to(out_ptr.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------- from probabilities


@triton.jit
def _probs_cam_kernel(
    p_ptr, g_ptr, w_ptr, cam_ptr,
    H, T, N,
    stride_pb, stride_ph, stride_pt, stride_pn,
    stride_gb, stride_gh, stride_gt, stride_gn,
    BLOCK_N: tl.constexpr,
):
    """cam[b, n] = mean_h attn_probs[b, h, w_b, n] * max(attn_grads[b, h, w_b, n], 0)."""
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    acc_ty = cam_ptr.dtype.element_ty
    w = tl.load(w_ptr + b).to(tl.int64)
    w_ok = (w >= 0) & (w < T)
    w = tl.where(w_ok, w, 0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    ld = n_ok & w_ok
    p_base = p_ptr + b * stride_pb + w * stride_pt + offs_n * stride_pn
    g_base = g_ptr + b * stride_gb + w * stride_gt + offs_n * stride_gn
    acc = tl.zeros([BLOCK_N], acc_ty)
    for h in range(0, H):
        p = tl.load(p_base + h * stride_ph, mask=ld, other=0.0).to(acc_ty)
        g = tl.load(g_base + h * stride_gh, mask=ld, other=0.0).to(acc_ty)
        acc += p * tl.maximum(g, 0.0)
    cam = acc / H + tl.where(w_ok, 0.0, float("nan")).to(acc_ty)
    tl.store(cam_ptr + b * N + offs_n, cam, mask=n_ok)


# --------------------------------------------------------------------------- launchers


def word_gradcam_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    grad_context: torch.Tensor,
    word_index: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    scale: float,
    floor: float,
):
    """``(cam, mask)``, both ``[B, N]`` in the accumulation dtype (float64 for float64
    inputs, float32 otherwise). Launches 1 and 2 of the module docstring.

    query, grad_context: (B, H, T, dh); key, value: (B, H, N, dh), any strides;
    word_index: (B,) integer; key_padding_mask: (B, N) bool or None.
    """
    B, H, T, dh = query.shape
    N = key.shape[2]
    acc = _acc(query.dtype)
    dev = query.device
    contrib = _alloc((B, H, N), acc, dev)  # (B, H, N)
    cam = _alloc((B, N), acc, dev)
    mask = _alloc((B, N), acc, dev)
    if B == 0:
        return cam, mask
    w = word_index.to(torch.int64)
    has_kpm = key_padding_mask is not None
    kpm = key_padding_mask.view(torch.int8) if has_kpm else w  # dummy pointer when absent
    s_kpm = (kpm.stride(0), kpm.stride(1)) if has_kpm else (0, 0)

    block_d = triton.next_power_of_2(dh)
    block_n = min(triton.next_power_of_2(N), max(16, _HEAD_TILE // block_d))
    scale_hi, scale_lo = split_f32(scale)
    _head_cam_kernel[(B * H,)](
        query, key, value, grad_context, w, kpm, contrib,
        H, T, N, dh, scale_hi, scale_lo,
        *query.stride(), *grad_context.stride(), *key.stride(), *value.stride(), *s_kpm,
        HAS_KPM=has_kpm, SINGLE=N <= block_n, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=_HEAD_WARPS,
    )
    cam_block = min(triton.next_power_of_2(N), _CAM_BLOCK)
    omf_hi, omf_lo = split_f32(1.0 - floor)
    _cam_mask_kernel[(B,)](
        contrib, kpm, cam, mask, H, N, omf_hi, omf_lo, *s_kpm,
        HAS_KPM=has_kpm, SINGLE=N <= cam_block, BLOCK_N=cam_block,
        num_warps=4,
    )
    return cam, mask


def word_gradcam_from_probs_forward(attn_probs: torch.Tensor, attn_grads: torch.Tensor,
                                    word_index: torch.Tensor) -> torch.Tensor:
    """``cam [B, N]`` from the ``[B, H, T, N]`` maps; reads only the chosen word's rows."""
    B, H, T, N = attn_probs.shape
    cam = _alloc((B, N), _acc(attn_probs.dtype), attn_probs.device)
    if B == 0:
        return cam
    w = word_index.to(torch.int64)
    block_n = min(triton.next_power_of_2(N), 1024)
    _probs_cam_kernel[(triton.cdiv(N, block_n), B)](
        attn_probs, attn_grads, w, cam, H, T, N, *attn_probs.stride(), *attn_grads.stride(),
        BLOCK_N=block_n, num_warps=4,
    )
    return cam


def scale_rows_forward(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x * mask[..., None]`` for x ``[B, N, D]`` (any strides) and a contiguous mask
    ``[B, N]``; the product is formed in the mask's dtype and rounded once to x's dtype."""
    B, N, D = x.shape
    out = _alloc((B, N, D), x.dtype, x.device)
    if out.numel() == 0:
        return out
    mask = mask.contiguous()
    _scale_rows_kernel[(triton.cdiv(N, _SCALE_ROWS), B)](
        x, mask, out, N, D, *x.stride(), out.stride(0), out.stride(1),
        BLOCK_R=_SCALE_ROWS, BLOCK_D=min(triton.next_power_of_2(D), _SCALE_COLS),
        num_warps=4,
    )
    return out
