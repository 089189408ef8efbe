"""TEMPORARY: dispatches to softmask.reference until the fused op is written (issue 2)."""
import torch
from softmask import reference as _ref


def focal_itc_loss(image_feat, text_feat, temperature, *, gamma=2.0, image_keys=None, text_keys=None,
                   image_feat_m=None, text_feat_m=None, alpha=0.0, reduction="mean", backend="auto"):
    return _ref.focal_itc_loss_reference(image_feat, text_feat, temperature, gamma=gamma, image_keys=image_keys,
                                         text_keys=text_keys, image_feat_m=image_feat_m, text_feat_m=text_feat_m,
                                         alpha=alpha, reduction=reduction)


class FocalITCLoss(torch.nn.Module):
    def __init__(self, gamma=2.0, alpha=0.0, reduction="mean", backend="auto"):
        super().__init__()
        self.gamma, self.alpha, self.reduction, self.backend = gamma, alpha, reduction, backend

    def forward(self, image_feat, text_feat, temperature, **kw):
        return focal_itc_loss(image_feat, text_feat, temperature, gamma=self.gamma, alpha=self.alpha,
                              reduction=self.reduction, backend=self.backend, **kw)
