"""Moved: checkpoints are read by training and evaluation alike, so they live one floor below both, in
:mod:`softmask.runs.checkpoint`. This name keeps working (every public name is re-exported)."""

from softmask.runs.checkpoint import *  # noqa: F401,F403
from softmask.runs.checkpoint import __all__, CKPT_DIR  # noqa: F401
