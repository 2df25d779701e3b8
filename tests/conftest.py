"""Session-wide test setup."""
import os

import torch

# Triton reads TRITON_INTERPRET when it is first imported, and several paths import it (torch.func
# among them), so it is set here, before any test module: without CUDA, the attention kernel's
# tests then run in Triton's CPU interpreter (tests/test_attention.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
