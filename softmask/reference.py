"""Plain, fully materialized PyTorch implementations of every softmask op.

These are the oracles of the tests and the ``eager`` provider of the
benchmarks: they build the whole logits / attention tensors and rely on
autograd, exactly as a user would write the ops by hand. They take the same
arguments as the public ops but do no input validation of their own.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = [
    "EMPTY_ID",
    "focal_itc_loss_reference",
    "focal_itc_rows_reference",
    "positive_targets_reference",
    "word_gradcam_reference",
    "word_gradcam_from_probs_reference",
    "soft_mask_from_cam_reference",
    "text_driven_soft_mask_reference",
    "cross_attention_probs_reference",
]


# --------------------------------------------------------------------------- focal ITC


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# Id of an empty key slot (ALBEF's ``idx_queue`` starts filled with it): it matches no
# row id, not even a row id of -100.
EMPTY_ID = -100


def _key_bank(keys) -> torch.Tensor:
    """A key bank given as a tensor or a sequence of parts, as one [N, D] tensor."""
    return keys if isinstance(keys, torch.Tensor) else torch.cat(list(keys), dim=0)


def positive_targets_reference(ids: torch.Tensor, key_ids, dtype: torch.dtype) -> torch.Tensor:
    """ALBEF's ``sim_targets``, materialized ``[B, N]``: ``pos_idx = ids[:, None] ==
    key_ids[None, :]`` (key ids of :data:`EMPTY_ID` excluded), ``pos_idx / pos_idx.sum(1)``;
    a row with no positive key gets a zero row (``0 / max(0, 1)``). ``key_ids`` may be a
    sequence of parts, concatenated here."""
    kid = key_ids if isinstance(key_ids, torch.Tensor) else torch.cat(list(key_ids), dim=0)
    pos = (ids[:, None] == kid[None, :]) & (kid != EMPTY_ID)[None, :]  # (B, N)
    return pos.to(dtype) / pos.sum(dim=1, keepdim=True).clamp_min(1).to(dtype)


def focal_itc_rows_reference(
    query: torch.Tensor,
    keys: torch.Tensor,
    temperature,
    *,
    gamma: float = 2.0,
    query_m: Optional[torch.Tensor] = None,
    alpha: float = 0.0,
    ids: Optional[torch.Tensor] = None,
    key_ids=None,
    pos_offset: int = 0,
    upcast: bool = True,
) -> torch.Tensor:
    """Per-row focal contrastive loss of one direction, ``[B]``.

    ``z = query @ keys.T / t``, ``p = softmax(z)``, targets
    ``q = alpha * softmax(query_m @ keys.T / t) + (1 - alpha) * onehot`` (row i's
    positive is key ``pos_offset + i``), ``L_i = -sum_j q_ij (1 - p_ij)^gamma log p_ij``. With ``ids``
    [B] and ``key_ids`` [N] the one-hot part is :func:`positive_targets_reference`
    (uniform over the keys whose id equals the row's; zero for a row with none).
    With ``upcast`` the math runs in float32 (float64 stays float64). ``keys`` (and
    ``key_ids``) may be sequences of parts, concatenated here.
    """
    B = query.shape[0]
    keys = _key_bank(keys)
    dt = _acc(query.dtype) if upcast else query.dtype
    q, k = query.to(dt), keys.to(dt)
    logits = q @ k.t() / temperature  # (B, N)
    logp = torch.log_softmax(logits, dim=1)
    # 1 - p via expm1 stays accurate as p -> 1; the clamp keeps the derivative of
    # om**gamma finite at om == 0 for 0 < gamma < 1 (the exact limit of the loss
    # gradient there is 0, which the clamp's zero gradient gives).
    om = (-torch.expm1(logp)).clamp_min(torch.finfo(dt).tiny)
    if ids is None:
        targets = F.one_hot(torch.arange(B, device=query.device) + pos_offset, keys.shape[0]).to(dt)
    else:
        targets = positive_targets_reference(ids, key_ids, dt)
    if alpha > 0:
        with torch.no_grad():
            soft = torch.softmax(query_m.to(dt) @ k.t() / temperature, dim=1)
        targets = alpha * soft + (1.0 - alpha) * targets
    return -(targets * om.pow(gamma) * logp).sum(dim=1)


def focal_itc_loss_reference(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    temperature,
    *,
    gamma: float = 2.0,
    image_keys: Optional[torch.Tensor] = None,
    text_keys: Optional[torch.Tensor] = None,
    image_feat_m: Optional[torch.Tensor] = None,
    text_feat_m: Optional[torch.Tensor] = None,
    alpha: float = 0.0,
    ids: Optional[torch.Tensor] = None,
    key_ids=None,
    pos_offset: int = 0,
    reduction: str = "mean",
    upcast: bool = True,
) -> torch.Tensor:
    """Materialized focal ITC loss (both directions), same semantics as
    :func:`softmask.focal_itc_loss` (key banks and key ids: tensors or sequences of
    parts, which are concatenated). Builds the ``[B, N]`` logits and, with ``ids``, the
    ``[B, N]`` positive mask. ``key_ids`` serves both key banks; in CLIP mode the keys'
    ids are ``ids``. Key banks that require grad receive it (the public op detaches
    them unless ``key_grad``); row i's positive is key ``pos_offset + i``."""
    if text_keys is None and image_keys is None:  # CLIP mode: in-batch keys, gradient into both
        text_keys, image_keys = text_feat, image_feat
        key_ids = ids
    rows = 0.5 * (
        focal_itc_rows_reference(image_feat, text_keys, temperature, gamma=gamma, query_m=image_feat_m,
                                 alpha=alpha, ids=ids, key_ids=key_ids, pos_offset=pos_offset, upcast=upcast)
        + focal_itc_rows_reference(text_feat, image_keys, temperature, gamma=gamma, query_m=text_feat_m,
                                   alpha=alpha, ids=ids, key_ids=key_ids, pos_offset=pos_offset, upcast=upcast)
    )
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows


# --------------------------------------------------------------------------- soft mask


def cross_attention_probs_reference(query, key, key_padding_mask=None, scale=None) -> torch.Tensor:
    """Materialized attention probabilities ``[B, H, T, N]`` (what hooks capture)."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    dt = _acc(query.dtype)
    s = torch.einsum("bhtd,bhnd->bhtn", query.to(dt), key.to(dt)) * scale
    if key_padding_mask is not None:
        s = s.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.nan_to_num(p, nan=0.0)  # a row with every key padded attends to nothing


def word_gradcam_from_probs_reference(attn_probs, attn_grads, word_index) -> torch.Tensor:
    """``cam[b, n] = mean_h A[b,h,w_b,n] * relu(dA[b,h,w_b,n])`` from ``[B, H, T, N]`` maps."""
    B, H, T, N = attn_probs.shape
    dt = _acc(attn_probs.dtype)
    idx = word_index.long().view(B, 1, 1, 1).expand(B, H, 1, N)
    a = attn_probs.to(dt).gather(2, idx).squeeze(2)  # (B, H, N)
    g = attn_grads.to(dt).gather(2, idx).squeeze(2)  # (B, H, N)
    return (a * g.clamp_min(0)).mean(dim=1)


def word_gradcam_reference(query, key, value, grad_context, word_index, *, key_padding_mask=None,
                           scale=None) -> torch.Tensor:
    """Grad-CAM through the materialized maps: ``A = softmax(scale q k^T)`` and
    ``dA = grad_context @ value^T`` (the gradient of ``A @ value``), both ``[B, H, T, N]``."""
    probs = cross_attention_probs_reference(query, key, key_padding_mask, scale)
    dt = probs.dtype
    grads = torch.einsum("bhtd,bhnd->bhtn", grad_context.to(dt), value.to(dt))
    return word_gradcam_from_probs_reference(probs, grads, word_index)


def soft_mask_from_cam_reference(cam, *, key_padding_mask=None, floor: float = 0.0) -> torch.Tensor:
    """Min-max normalize ``cam`` over the valid patch keys ``1..N-1`` and return
    ``mask = 1 - (1 - floor) * c`` with ``mask[:, 0] = 1``, padded keys 1, flat maps 1.
    Computed and returned in float32 (float64 for a float64 cam)."""
    B, N = cam.shape
    cam = cam.to(_acc(cam.dtype))
    valid = torch.ones(B, N, dtype=torch.bool, device=cam.device)
    if key_padding_mask is not None:
        valid &= key_padding_mask
    valid[:, 0] = False
    big = torch.finfo(cam.dtype).max
    lo = torch.where(valid, cam, torch.full_like(cam, big)).amin(dim=1, keepdim=True)
    hi = torch.where(valid, cam, torch.full_like(cam, -big)).amax(dim=1, keepdim=True)
    span = hi - lo
    flat = ~(span > 0)  # also rows with no valid patch key
    c = torch.where(flat, torch.zeros_like(cam), (cam - lo) / torch.where(flat, torch.ones_like(span), span))
    c = torch.where(valid, c, torch.zeros_like(c))
    return 1.0 - (1.0 - floor) * c


def text_driven_soft_mask_reference(image_embeds, query, key, value, grad_context, word_index, *,
                                    key_padding_mask=None, scale=None, floor: float = 0.0):
    """``(image_embeds * mask[..., None], mask)`` with the mask a constant (stop-gradient)."""
    with torch.no_grad():
        cam = word_gradcam_reference(query, key, value, grad_context, word_index,
                                     key_padding_mask=key_padding_mask, scale=scale)
        mask = soft_mask_from_cam_reference(cam, key_padding_mask=key_padding_mask, floor=floor)
    return image_embeds * mask.to(image_embeds.dtype)[..., None], mask
