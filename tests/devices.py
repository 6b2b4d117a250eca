"""Device parameters: CUDA cases are reported as skipped (with the reason) where there is no GPU,
never left out of the collected tests."""

from __future__ import annotations

import pytest
import torch

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none on this machine")
CUDA = pytest.param("cuda", marks=needs_cuda, id="cuda")
DEVICES = ["cpu", CUDA]
