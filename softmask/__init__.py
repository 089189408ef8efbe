"""softmask: fused kernels for vision-language pretraining with text-driven soft masks.

Public ops (see each docstring for the exact math):

- :func:`focal_itc_loss` / :class:`FocalITCLoss`: focal image-text contrastive loss
  with momentum-distillation targets and a key queue, never materializing the logits.
- :class:`FocalClipLoss`: open_clip's ``ClipLoss`` with the focal cross-entropy, across
  torch.distributed processes without gathering logits; :func:`release_workspace` frees
  the CPU path's cached scratch buffers.
- :func:`word_gradcam`, :func:`word_gradcam_from_probs`, :func:`soft_mask_from_cam`,
  :func:`text_driven_soft_mask`: word-conditional Grad-CAM on a cross-attention layer
  turned into a soft mask on the image patch embeddings.
"""

from softmask.ops.focal_itc import FocalITCLoss, focal_itc_loss, release_workspace
from softmask.ops.soft_mask import (
    soft_mask_from_cam,
    text_driven_soft_mask,
    word_gradcam,
    word_gradcam_from_probs,
)

from softmask.clip import FocalClipLoss  # noqa: E402  (one layer above the ops)

__version__ = "0.1.0"

__all__ = [
    "focal_itc_loss",
    "FocalITCLoss",
    "FocalClipLoss",
    "release_workspace",
    "word_gradcam",
    "word_gradcam_from_probs",
    "soft_mask_from_cam",
    "text_driven_soft_mask",
]
