"""The ALBEF-style model with text-driven soft masks (see :mod:`softmask.model.albef`)."""

from softmask.model.albef import SoftMaskALBEF
from softmask.model.config import PRESETS, ModelConfig, model_preset

__all__ = ["SoftMaskALBEF", "ModelConfig", "model_preset", "PRESETS"]
