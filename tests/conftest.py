"""Session-wide test setup."""
import os

import torch

# Triton reads TRITON_INTERPRET when it is first imported, and several paths import it (torch.func
# among them), so it is set here, before any test module: without CUDA, the attention kernel's
# tests then run in Triton's CPU interpreter (tests/test_attention.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The tests' networks are tiny: a second intra-op thread gains little, and on a machine whose cores
# other processes also use it makes small ops wait on each other (the toy run took 12x longer).
torch.set_num_threads(1)
