"""Word-conditional Grad-CAM on a cross-attention layer, turned into a soft mask on the
image patch embeddings (the text-driven soft masks of Park and Han, CVPR 2023).

Public functions: :func:`word_gradcam`, :func:`word_gradcam_from_probs`,
:func:`soft_mask_from_cam`, :func:`text_driven_soft_mask`. Math (one sample ``b``,
chosen word ``w = word_index[b]``, heads ``h``, image keys ``n``; key 0 is the image
[CLS] token)::

    A[h, n]  = softmax_n(scale * query[b, h, w] . key[b, h, n])     padded keys left out
    dA[h, n] = grad_context[b, h, w] . value[b, h, n]               (= dL/dA of that row)
    cam[n]   = mean_h A[h, n] * max(dA[h, n], 0)
    c        = min-max of cam over the valid patch keys 1..N-1 (0 where the map is flat)
    mask[n]  = 1 - (1 - floor) * c[n];  mask[0] = 1; padded keys 1
    masked_embeds = image_embeds * mask[..., None]                  (mask a constant)

Backends: ``triton`` (three launches that read only the chosen word's rows, see
:mod:`softmask.kernels.soft_mask`), ``torch`` (chunked PyTorch, same bounded memory:
never a ``[B, H, T, N]`` tensor), ``reference`` (materialized probabilities and
gradients, as hook-based code has them). ``auto`` picks ``triton`` on CUDA and
``torch`` elsewhere.

The triton and torch paths run as ``torch.library`` custom ops
(``softmask::word_gradcam_mask``, ``softmask::word_gradcam_from_probs``,
``softmask::apply_soft_mask``) with fake (meta) implementations and an autograd
formula, so ``torch.compile(fullgraph=True)`` traces through
:func:`text_driven_soft_mask` without graph breaks.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from softmask import reference as _ref
from softmask.ops._common import (
    accum_dtype,
    check_fraction,
    check_same,
    check_size,
    check_tensor,
    resolve_backend,
)

__all__ = ["word_gradcam", "word_gradcam_from_probs", "soft_mask_from_cam", "text_driven_soft_mask"]

INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)

# Extra memory of one chunk of the torch backend: one [chunk, H, N, dh] product in
# the accumulation dtype (key * query row, then value * grad row) plus [chunk, H, N]
# scores. A multiply-and-sum whose product stays cache-sized beats the batched
# matrix-vector product (bmm with one column). On this project's 2-core CPU, one
# thread, the ALBEF shape (B = 64, H = 12, N = 257, dh = 64, fp32): the cam took
# 13.7-17.3 ms with 1 MiB chunks, 14.2 ms with 2 MiB, 38-67 ms with 4-32 MiB, and
# the two torch.matmul matvecs alone 22.3 ms (measured on a loaded machine: ratios
# only). 2 MiB = two ALBEF samples per chunk.
_TORCH_CHUNK_BYTES = 2 << 20


# --------------------------------------------------------------------------- validation


def _check_index(word_index, B: int, T: int, device: torch.device) -> torch.Tensor:
    if not isinstance(word_index, torch.Tensor):
        raise TypeError(f"word_index: expected an integer torch.Tensor, got {type(word_index).__name__}")
    if word_index.dtype not in INT_DTYPES:
        raise TypeError(f"word_index: expected an integer dtype, got {str(word_index.dtype).replace('torch.', '')}")
    if word_index.dim() != 1 or word_index.shape[0] != B:
        raise ValueError(f"word_index: expected shape ({B},) (one word per sample), got {tuple(word_index.shape)}")
    if word_index.device != device:
        raise ValueError(f"word_index: expected device {device} (as the attention tensors), got {word_index.device}")
    # Range check: one device-to-host read (a sync on CUDA). Skipped while
    # torch.compile traces; the kernels then never dereference a bad index (the
    # triton path gives that sample a NaN cam, the torch path raises in gather).
    if B > 0 and not torch.compiler.is_compiling():
        lo, hi = int(word_index.min()), int(word_index.max())
        if lo < 0 or hi >= T:
            bad = lo if lo < 0 else hi
            raise IndexError(f"word_index: values must lie in [0, {T}) (T = text length), got {bad}")
    return word_index


def _check_kpm(key_padding_mask, B: int, N: int, device: torch.device) -> Optional[torch.Tensor]:
    if key_padding_mask is None:
        return None
    check_tensor("key_padding_mask", key_padding_mask, ndim=2, dtypes=(torch.bool,))
    if tuple(key_padding_mask.shape) != (B, N):
        raise ValueError(f"key_padding_mask: expected shape ({B}, {N}) (B, N), got {tuple(key_padding_mask.shape)}")
    if key_padding_mask.device != device:
        raise ValueError(f"key_padding_mask: expected device {device}, got {key_padding_mask.device}")
    return key_padding_mask


def _check_scale(scale, dh: int) -> float:
    if scale is None:
        return dh ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a Python float or None, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite number, got {scale}")
    return scale


def _check_attention(query, key, value, grad_context):
    check_tensor("query", query, ndim=4)
    check_tensor("key", key, ndim=4)
    check_tensor("value", value, ndim=4)
    check_tensor("grad_context", grad_context, ndim=4)
    for name, t in (("key", key), ("value", value), ("grad_context", grad_context)):
        check_same(name, t, "query", query)
    B, H, T, dh = query.shape
    for name, t in (("key", key), ("value", value)):
        check_size(name, t, 0, B, "B, as query")
        check_size(name, t, 1, H, "H, as query")
        check_size(name, t, 3, dh, "dh, as query")
    check_size("value", value, 2, key.shape[2], "N, as key")
    if tuple(grad_context.shape) != tuple(query.shape):
        raise ValueError(f"grad_context: expected the shape of query {tuple(query.shape)} (B, H, T, dh), "
                         f"got {tuple(grad_context.shape)}")
    N = key.shape[2]
    for what, size in (("H", H), ("T", T), ("dh", dh), ("N", N)):
        if size == 0:
            raise ValueError(f"query/key: {what} must be positive, got query {tuple(query.shape)}, "
                             f"key {tuple(key.shape)}")
    return B, H, T, N, dh


# --------------------------------------------------------------------------- torch backend


def _gather_word_rows(x: torch.Tensor, word_index: torch.Tensor) -> torch.Tensor:
    B, H, _, dh = x.shape
    idx = word_index.to(torch.int64).view(B, 1, 1, 1).expand(B, H, 1, dh)
    return x.gather(2, idx).squeeze(2)  # (B, H, dh)


def _cam_torch(query, key, value, grad_context, word_index, key_padding_mask, scale) -> torch.Tensor:
    """Chunked over samples; per chunk one ``[chunk, H, N, dh]`` product and
    ``[chunk, H, N]`` scores, never a ``[B, H, T, N]`` tensor."""
    B, H, T, dh = query.shape
    N = key.shape[2]
    acc = accum_dtype(query.dtype)
    q = _gather_word_rows(query, word_index).to(acc).unsqueeze(2)  # (B, H, 1, dh)
    g = _gather_word_rows(grad_context, word_index).to(acc).unsqueeze(2)  # (B, H, 1, dh)
    per_sample = H * N * (dh + 3) * torch.empty((), dtype=acc).element_size()
    chunk = max(1, _TORCH_CHUNK_BYTES // per_sample)
    cam = torch.empty(B, N, dtype=acc, device=query.device)
    for b0 in range(0, B, chunk):
        b1 = min(B, b0 + chunk)
        # half * float promotes to float: the product is formed in acc without a copy of key
        s = (key[b0:b1] * q[b0:b1]).sum(-1).mul_(scale)  # (b, H, N)
        if key_padding_mask is not None:
            s.masked_fill_(~key_padding_mask[b0:b1, None, :], float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num_(0.0)  # a fully padded row attends to nothing
        da = (value[b0:b1] * g[b0:b1]).sum(-1)  # (b, H, N)
        p.mul_(da.clamp_min_(0))
        if key_padding_mask is not None:
            p.masked_fill_(~key_padding_mask[b0:b1, None, :], 0.0)
        torch.mean(p, dim=1, out=cam[b0:b1])  # (b, N)
    return cam


def _mask_torch(cam: torch.Tensor, key_padding_mask: Optional[torch.Tensor], floor: float) -> torch.Tensor:
    B, N = cam.shape
    cam = cam.to(accum_dtype(cam.dtype))
    valid = torch.ones(B, N, dtype=torch.bool, device=cam.device)
    if key_padding_mask is not None:
        valid &= key_padding_mask
    valid[:, 0] = False
    lo = torch.where(valid, cam, float("inf")).amin(dim=1, keepdim=True)  # (B, 1)
    hi = torch.where(valid, cam, float("-inf")).amax(dim=1, keepdim=True)
    span = hi - lo
    spread = span > 0  # False for flat maps and rows without a valid patch key
    c = (cam - lo) / torch.where(spread, span, torch.ones_like(span))
    c = torch.where(valid & spread, c, torch.zeros_like(c))
    return 1.0 - (1.0 - floor) * c


# --------------------------------------------------------------------------- custom ops


def _kernels():
    from softmask.kernels import soft_mask as kernels  # imported lazily: triton is optional

    return kernels


@torch.library.custom_op("softmask::word_gradcam_mask", mutates_args=())
def _word_gradcam_mask_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    grad_context: torch.Tensor,
    word_index: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    scale: float,
    floor: float,
    backend: str,
) -> Tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        return _kernels().word_gradcam_forward(query, key, value, grad_context, word_index,
                                               key_padding_mask, scale, floor)
    cam = _cam_torch(query, key, value, grad_context, word_index, key_padding_mask, scale)
    return cam, _mask_torch(cam, key_padding_mask, floor)


@_word_gradcam_mask_op.register_fake
def _(query, key, value, grad_context, word_index, key_padding_mask, scale, floor, backend):
    B, N = query.shape[0], key.shape[2]
    acc = accum_dtype(query.dtype)
    return query.new_empty((B, N), dtype=acc), query.new_empty((B, N), dtype=acc)


@torch.library.custom_op("softmask::word_gradcam_from_probs", mutates_args=())
def _word_gradcam_from_probs_op(attn_probs: torch.Tensor, attn_grads: torch.Tensor, word_index: torch.Tensor,
                                backend: str) -> torch.Tensor:
    if backend == "triton":
        return _kernels().word_gradcam_from_probs_forward(attn_probs, attn_grads, word_index)
    acc = accum_dtype(attn_probs.dtype)
    B, H, T, N = attn_probs.shape
    idx = word_index.to(torch.int64).view(B, 1, 1, 1).expand(B, H, 1, N)
    a = attn_probs.gather(2, idx).squeeze(2).to(acc)  # (B, H, N): gather first, then upcast
    g = attn_grads.gather(2, idx).squeeze(2).to(acc)
    return (a * g.clamp_min(0)).mean(dim=1)


@_word_gradcam_from_probs_op.register_fake
def _(attn_probs, attn_grads, word_index, backend):
    B, N = attn_probs.shape[0], attn_probs.shape[3]
    return attn_probs.new_empty((B, N), dtype=accum_dtype(attn_probs.dtype))


@torch.library.custom_op("softmask::apply_soft_mask", mutates_args=())
def _apply_soft_mask_op(image_embeds: torch.Tensor, mask: torch.Tensor, backend: str) -> torch.Tensor:
    if backend == "triton":
        return _kernels().scale_rows_forward(image_embeds, mask)
    return image_embeds * mask.to(image_embeds.dtype)[..., None]


@_apply_soft_mask_op.register_fake
def _(image_embeds, mask, backend):
    return torch.empty_like(image_embeds, memory_format=torch.contiguous_format)


def _apply_setup_context(ctx, inputs, output):
    _, mask, backend = inputs
    ctx.save_for_backward(mask)
    ctx.backend = backend


def _apply_backward(ctx, grad_out):
    (mask,) = ctx.saved_tensors
    # The mask is a constant (stop-gradient): d image_embeds = d out * mask, nothing for the mask.
    return _apply_soft_mask_op(grad_out, mask, ctx.backend), None, None


_apply_soft_mask_op.register_autograd(_apply_backward, setup_context=_apply_setup_context)


# --------------------------------------------------------------------------- public API


def word_gradcam(query, key, value, grad_context, word_index, *, key_padding_mask=None, scale=None,
                 backend="auto") -> torch.Tensor:
    """Word-conditional Grad-CAM of one cross-attention layer, recomputed from its inputs.

    ``cam[b, n] = mean_h A[b,h,w_b,n] * max(dA[b,h,w_b,n], 0)`` with
    ``A = softmax_n(scale * query @ key^T)`` and ``dA = grad_context @ value^T`` for the
    chosen word's row ``w_b = word_index[b]`` only: the ``[B, H, T, N]`` maps are never
    built (except by ``backend="reference"``).

    Args:
        query, grad_context: ``(B, H, T, dh)``; ``grad_context`` is the gradient of the
            score (e.g. the summed positive ITM logits) with respect to the layer's
            attention output, per head. Any strides.
        key, value: ``(B, H, N, dh)``, same dtype and device as ``query``; key 0 is the
            image [CLS] token.
        word_index: integer ``(B,)``, values in ``[0, T)``.
        key_padding_mask: bool ``(B, N)``, True for a real key, or None. Padded keys are
            left out of the softmax and get cam 0; a sample with every key padded gets
            cam 0 (no NaN).
        scale: softmax scale, default ``dh ** -0.5``.
        backend: "auto", "triton", "torch" or "reference".

    Returns:
        cam ``(B, N)``, float32 for float16/bfloat16/float32 inputs, float64 for float64.
        It does not require grad: no gradient flows to any input.

    Raises:
        TypeError for non-tensors and wrong dtypes, ValueError for wrong ranks or sizes,
        mismatched devices and unknown backends, IndexError for ``word_index`` outside
        ``[0, T)``. The range check reads ``word_index`` on the host (a device sync on
        CUDA); it is skipped while ``torch.compile`` traces.
    """
    B, H, T, N, dh = _check_attention(query, key, value, grad_context)
    word_index = _check_index(word_index, B, T, query.device)
    key_padding_mask = _check_kpm(key_padding_mask, B, N, query.device)
    scale = _check_scale(scale, dh)
    backend = resolve_backend(backend, query.device)
    if backend == "reference":
        with torch.no_grad():
            return _ref.word_gradcam_reference(query, key, value, grad_context, word_index,
                                               key_padding_mask=key_padding_mask, scale=scale)
    cam, _ = _word_gradcam_mask_op(query.detach(), key.detach(), value.detach(), grad_context.detach(),
                                   word_index, key_padding_mask, scale, 0.0, backend)
    return cam


def word_gradcam_from_probs(attn_probs, attn_grads, word_index, *, backend="auto") -> torch.Tensor:
    """Grad-CAM from materialized attention maps, as hook-based code captures them.

    ``cam[b, n] = mean_h attn_probs[b,h,w_b,n] * max(attn_grads[b,h,w_b,n], 0)``; reads
    only the chosen word's rows.

    Args:
        attn_probs, attn_grads: ``(B, H, T, N)``, same dtype and device (any strides).
        word_index: integer ``(B,)``, values in ``[0, T)``.
        backend: "auto", "triton", "torch" or "reference".

    Returns:
        cam ``(B, N)``, float32 (float64 for float64 maps); it does not require grad.

    Raises:
        as :func:`word_gradcam`.
    """
    check_tensor("attn_probs", attn_probs, ndim=4)
    check_tensor("attn_grads", attn_grads, ndim=4)
    check_same("attn_grads", attn_grads, "attn_probs", attn_probs)
    if attn_grads.shape != attn_probs.shape:
        raise ValueError(f"attn_grads: expected the shape of attn_probs {tuple(attn_probs.shape)} (B, H, T, N), "
                         f"got {tuple(attn_grads.shape)}")
    B, H, T, N = attn_probs.shape
    if min(H, T, N) == 0:
        raise ValueError(f"attn_probs: H, T and N must be positive, got shape {tuple(attn_probs.shape)}")
    word_index = _check_index(word_index, B, T, attn_probs.device)
    backend = resolve_backend(backend, attn_probs.device)
    if backend == "reference":
        with torch.no_grad():
            return _ref.word_gradcam_from_probs_reference(attn_probs, attn_grads, word_index)
    return _word_gradcam_from_probs_op(attn_probs.detach(), attn_grads.detach(), word_index, backend)


def soft_mask_from_cam(cam, *, key_padding_mask=None, floor=0.0) -> torch.Tensor:
    """Soft mask from a Grad-CAM map.

    ``c`` = min-max normalization of ``cam`` over the valid patch keys ``1..N-1``
    (valid: not padded), ``mask = 1 - (1 - floor) * c``; key 0 (the image [CLS]
    token), padded keys and every key of a flat map (max == min, or no valid patch
    key) get mask 1. Plain PyTorch on ``[B, N]`` (cheap, any device).

    Args:
        cam: ``(B, N)`` floating tensor.
        key_padding_mask: bool ``(B, N)``, True for a real key, or None.
        floor: the mask value at the cam's maximum, in ``[0, 1]``.

    Returns:
        mask ``(B, N)`` in float32 (float64 for a float64 cam), values in
        ``[floor, 1]``; differentiable with respect to ``cam`` as plain torch ops.
    """
    check_tensor("cam", cam, ndim=2)
    floor = check_fraction("floor", floor)
    key_padding_mask = _check_kpm(key_padding_mask, cam.shape[0], cam.shape[1], cam.device)
    return _mask_torch(cam, key_padding_mask, floor)


def text_driven_soft_mask(image_embeds, query, key, value, grad_context, word_index, *, key_padding_mask=None,
                          scale=None, floor=0.0, backend="auto"):
    """Soft-mask the image patch embeddings by the Grad-CAM of one word per sample.

    ``cam = word_gradcam(query, key, value, grad_context, word_index)``,
    ``mask = soft_mask_from_cam(cam, floor=floor)``,
    ``masked_embeds = image_embeds * mask[..., None]``, computed without building the
    ``[B, H, T, N]`` attention maps (backends triton and torch).

    Autograd: the mask is a constant (stop-gradient). ``d image_embeds = d masked_embeds
    * mask``; no gradient reaches query, key, value or grad_context, and the returned
    mask does not require grad.

    Args:
        image_embeds: ``(B, N, D)`` floating tensor on the attention tensors' device (its
            dtype may differ from theirs, e.g. float32 embeddings next to bf16 attention;
            the output keeps it). Any strides.
        query, key, value, grad_context, word_index, key_padding_mask, scale, backend:
            as :func:`word_gradcam`.
        floor: the mask value at the cam's maximum, in ``[0, 1]`` (0: the most
            word-related patch is zeroed; 1: no masking).

    Returns:
        ``(masked_embeds (B, N, D) in image_embeds' dtype, mask (B, N))``, the mask in
        float32 (float64 for float64 attention tensors). The triton backend forms the
        product in the mask's dtype and rounds once; torch and reference round the mask
        to image_embeds' dtype first (a difference of at most one rounding step).

    Raises:
        as :func:`word_gradcam`; also ValueError for ``image_embeds`` whose B or N differ
        from the keys' and for ``floor`` outside ``[0, 1]``, TypeError for a non-float
        ``floor``.
    """
    check_tensor("image_embeds", image_embeds, ndim=3)
    B, H, T, N, dh = _check_attention(query, key, value, grad_context)
    check_size("image_embeds", image_embeds, 0, B, "B, as query")
    check_size("image_embeds", image_embeds, 1, N, "N, the number of image keys")
    if image_embeds.device != query.device:
        raise ValueError(f"image_embeds: expected device {query.device} (as query), got {image_embeds.device}")
    word_index = _check_index(word_index, B, T, query.device)
    key_padding_mask = _check_kpm(key_padding_mask, B, N, query.device)
    scale = _check_scale(scale, dh)
    floor = check_fraction("floor", floor)
    backend = resolve_backend(backend, query.device)
    if backend == "reference":
        return _ref.text_driven_soft_mask_reference(image_embeds, query, key, value, grad_context, word_index,
                                                    key_padding_mask=key_padding_mask, scale=scale, floor=floor)
    _, mask = _word_gradcam_mask_op(query.detach(), key.detach(), value.detach(), grad_context.detach(),
                                    word_index, key_padding_mask, scale, floor, backend)
    return _apply_soft_mask_op(image_embeds, mask, backend), mask

