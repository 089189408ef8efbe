"""Root pytest configuration.

Without a CUDA device every Triton kernel runs through Triton's interpreter.
The variable must be set before any ``@triton.jit`` function is defined, i.e.
before ``softmask`` is imported, which is why it lives in the root conftest.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
