"""The focal contrastive loss in open_clip's shape, across processes: :class:`FocalClipLoss`.

A drop-in for open_clip's ``ClipLoss`` (same constructor, same call) whose two
cross-entropies become the focal ones of :func:`softmask.focal_itc_loss`, computed
without the logits. Across ``torch.distributed`` processes a rank gathers the features
only (``[world_size * B, D]``) and the fused op computes its own rows against them
tile by tile (``pos_offset = rank * B``); the keys' gradients go back to the rank that
owns them through the gather's backward (a reduce-scatter, or an all-reduce on
backends without one). No ``[B, world_size * B]`` tensor is formed.

Which gradient ``ClipLoss`` gives, and how it is reproduced (rank r of W, local batch b,
``L_rows`` the per-row losses ``(L_i2t + L_t2i) / 2`` of rank r's rows against all keys):

=====================  =================================  =========================================
local_loss, gather      ClipLoss                           here
=====================  =================================  =========================================
True, True              mean of its rows, keys with grad   same: ``mean(L_rows)``, keys take gradient
True, False             mean of its rows, keys constant    same: keys detached
False, True             global mean on every rank; every   ``mean(L_rows)`` (its sum over ranks is
                        rank's backward sums into every    W times the global mean, as ClipLoss's
                        slot: W x dL/dfeatures             summed backward); value all-reduced
False, False            global mean; only the own slot     ``sum(L_rows) / (W b)``, keys take
                        live: dL/dfeatures                 gradient; value all-reduced
=====================  =================================  =========================================

Without ``local_loss`` every rank's ``logit_scale`` gets the global mean's gradient, as in
``ClipLoss``: the per-rank gradients are summed (and divided by W with
``gather_with_grad``) by an all-reduce in the backward. The layer sits above
``softmask.ops`` and below ``softmask.model``; it imports no open_clip.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from softmask.ops._common import BACKENDS, check_same, check_tensor
from softmask.ops.focal_itc import focal_itc_loss

__all__ = ["FocalClipLoss"]


def _group_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


class _GatherRows(torch.autograd.Function):
    """All ranks' ``[b, D]`` tensors as one ``[W b, D]``; the backward sums the gradient of
    every rank's copy into the owner's rows (``torch.distributed.nn.all_gather``'s
    semantics, in O(W b D) memory)."""

    @staticmethod
    def forward(ctx, x: Tensor, rank: int, world_size: int) -> Tensor:
        ctx.rank, ctx.world_size, ctx.b = rank, world_size, x.shape[0]
        return _gather(x, world_size)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        if dist.get_backend() == "nccl":
            out = grad.new_empty(ctx.b, grad.shape[1])
            dist.reduce_scatter_tensor(out, grad)
        else:  # gloo has no reduce-scatter: sum everywhere, keep the own rows
            dist.all_reduce(grad)
            out = grad[ctx.rank * ctx.b:(ctx.rank + 1) * ctx.b].clone()
        return out, None, None


class _SumGradOverRanks(torch.autograd.Function):
    """Identity forward; the backward all-reduces the gradient and divides it by ``div``."""

    @staticmethod
    def forward(ctx, x: Tensor, div: float) -> Tensor:
        ctx.div = div
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad / ctx.div, None


def _gather(x: Tensor, world_size: int) -> Tensor:
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class FocalClipLoss(torch.nn.Module):
    r"""open_clip's ``ClipLoss`` with the focal cross-entropy, distributed without logits.

    Per rank, with ``s = logit_scale`` (already exponentiated, as open_clip passes it)
    and the rows and keys that ``ClipLoss`` would use (module docstring)::

        z = s * rows @ keys.T                       # never formed
        L_row = -(1 - p_pos) ** gamma * log p_pos   # p = softmax(z, dim=1), p_pos at the row's label
        loss = (mean L_row(image rows vs text keys) + mean L_row(text rows vs image keys)) / 2

    ``gamma = 0`` gives ``ClipLoss``'s loss and gradients (features of every rank and
    ``logit_scale``) for every ``local_loss`` / ``gather_with_grad``; the labels are the
    same (row i of rank r: key ``r * B + i`` with ``local_loss``, the diagonal without).

    Args:
        local_loss, gather_with_grad, cache_labels, rank, world_size, use_horovod: as
            ``ClipLoss``. ``cache_labels`` is accepted and has no effect (no labels are
            built); ``use_horovod=True`` is refused (torch.distributed only). With
            ``world_size > 1`` the torch.distributed process group must be initialized
            with that size, and ``rank`` must be this process's rank.
        gamma: focal exponent >= 0 (default 2.0).
        backend: the op's backend, "auto" (triton on CUDA, torch on the CPU) | "triton" |
            "torch" | "reference" (materialized, for checks).

    ``forward(image_features, text_features, logit_scale, logit_bias=None,
    output_dict=False)``: features [B, D] of one dtype and device, the same B and D on
    every rank (checked with one small all-gather before the features are gathered, so a
    mismatch raises on every rank instead of hanging); ``logit_scale`` a positive finite
    0-dim tensor or float. ``logit_bias`` shifts every logit of a row by one constant,
    which changes no softmax: it is accepted and ignored (``ClipLoss`` gives it a zero
    gradient). Returns the loss (float32 for half/float32 features, float64 for float64),
    or ``{"contrastive_loss": loss}`` with ``output_dict``.
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
        gamma: float = 2.0,
        backend: str = "auto",
    ):
        super().__init__()
        for name, value in (("local_loss", local_loss), ("gather_with_grad", gather_with_grad),
                            ("cache_labels", cache_labels), ("use_horovod", use_horovod)):
            if not isinstance(value, bool):
                raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
        for name, value in (("rank", rank), ("world_size", world_size)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name}: expected a Python int, got {type(value).__name__}")
        if world_size < 1:
            raise ValueError(f"world_size: expected an int >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: expected an int in [0, world_size = {world_size}), got {rank}")
        if use_horovod:
            raise ValueError("use_horovod: expected False (FocalClipLoss gathers with torch.distributed; "
                             "horovod is not supported), got True")
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
            raise TypeError(f"gamma: expected a Python float, got {type(gamma).__name__}")
        if not (gamma >= 0 and math.isfinite(gamma)):
            raise ValueError(f"gamma: expected a finite value >= 0, got {gamma}")
        if not isinstance(backend, str) or backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        self.gamma = float(gamma)
        self.backend = backend

    def extra_repr(self) -> str:
        return (f"gamma={self.gamma}, local_loss={self.local_loss}, gather_with_grad={self.gather_with_grad}, "
                f"rank={self.rank}, world_size={self.world_size}, backend={self.backend!r}")

    def _check_group(self) -> None:
        if not _group_ready():
            if self.world_size > 1:
                raise ValueError(f"world_size: expected 1 without an initialized torch.distributed process group, "
                                 f"got {self.world_size}")
            return
        group_size, group_rank = dist.get_world_size(), dist.get_rank()
        if group_size != self.world_size:
            raise ValueError(f"world_size: expected {group_size} (the size of the torch.distributed process group), "
                             f"got {self.world_size}")
        if group_rank != self.rank:
            raise ValueError(f"rank: expected {group_rank} (this process's rank in the torch.distributed process "
                             f"group), got {self.rank}")

    def _check_sizes_across_ranks(self, image_features: Tensor) -> None:
        """One all-gather of (B, D) per rank; every rank raises the same error on a mismatch."""
        mine = torch.tensor(list(image_features.shape), dtype=torch.int64, device=image_features.device)
        every = _gather(mine[None], self.world_size).tolist()
        if any(shape != every[self.rank] for shape in every):
            raise ValueError(f"image_features: expected the same [B, D] on every rank, got "
                             f"{', '.join(f'rank {r}: {tuple(s)}' for r, s in enumerate(every))}")

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale, logit_bias: Optional[Tensor] = None,
                output_dict: bool = False):
        check_tensor("image_features", image_features, ndim=2)
        check_tensor("text_features", text_features, ndim=2)
        check_same("text_features", text_features, "image_features", image_features)
        if text_features.shape != image_features.shape:
            raise ValueError(f"text_features: expected shape {tuple(image_features.shape)} (as image_features), "
                             f"got {tuple(text_features.shape)}")
        temperature = self._temperature(logit_scale, image_features)
        self._check_group()
        kw = dict(gamma=self.gamma, backend=self.backend)
        W = self.world_size
        if W == 1:
            loss = focal_itc_loss(image_features, text_features, temperature, **kw)
        else:
            self._check_sizes_across_ranks(image_features)
            b = image_features.shape[0]
            kw["pos_offset"] = self.rank * b
            if self.local_loss and not self.gather_with_grad:
                with torch.no_grad():
                    all_img = _gather(image_features.detach(), W)
                    all_txt = _gather(text_features.detach(), W)
                loss = focal_itc_loss(image_features, text_features, temperature, image_keys=all_img,
                                      text_keys=all_txt, **kw)
            else:
                all_img = _GatherRows.apply(image_features, self.rank, W)
                all_txt = _GatherRows.apply(text_features, self.rank, W)
                # c: how many times ClipLoss's summed backward counts the global mean (W with
                # gather_with_grad, whose every rank differentiates the whole loss; 1 without)
                c = W if self.gather_with_grad else 1
                if not self.local_loss and isinstance(temperature, Tensor) and temperature.requires_grad:
                    temperature = _SumGradOverRanks.apply(temperature, float(c))
                mine = focal_itc_loss(image_features, text_features, temperature, image_keys=all_img,
                                      text_keys=all_txt, key_grad=True, **kw)
                if self.local_loss:
                    loss = mine
                else:
                    mine = mine * (c / W)  # sums over the ranks to c times the global mean
                    total = mine.detach().clone()
                    dist.all_reduce(total)
                    loss = mine + (total / c - mine).detach()  # the global mean's value, this rank's gradient
        return {"contrastive_loss": loss} if output_dict else loss

    @staticmethod
    def _temperature(logit_scale, ref: Tensor):
        """``1 / logit_scale`` after checking it (one host read of a tensor, as open_clip's
        trainer does each step when it logs)."""
        if isinstance(logit_scale, bool) or not isinstance(logit_scale, (int, float, Tensor)):
            raise TypeError(f"logit_scale: expected a 0-dim tensor or a Python float, got {type(logit_scale).__name__}")
        if isinstance(logit_scale, Tensor):
            check_tensor("logit_scale", logit_scale)
            if logit_scale.numel() != 1:
                raise ValueError(f"logit_scale: expected one value (a 0-dim tensor), got shape "
                                 f"{tuple(logit_scale.shape)}")
            if logit_scale.device != ref.device:
                raise ValueError(f"logit_scale: expected device {ref.device} (as image_features), "
                                 f"got {logit_scale.device}")
            value = float(logit_scale.detach())
        else:
            value = float(logit_scale)
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"logit_scale: expected a finite value > 0 (the exponentiated scale), got {value}")
        if isinstance(logit_scale, Tensor):
            return 1.0 / logit_scale.reshape(())
        return 1.0 / value
