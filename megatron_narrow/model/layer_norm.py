"""LayerNorm: NVIDIA apex's fused kernel when it is importable and on CUDA, torch's otherwise.

The PyPI package named `apex` is an unrelated web toolkit; only NVIDIA's build has
`apex.normalization.FusedLayerNorm`, so the import is checked for that class, not the name.
"""

from __future__ import annotations

import torch
from torch import nn

try:
    from apex.normalization import FusedLayerNorm as _ApexFusedLayerNorm

    HAVE_APEX = True
except ImportError:  # no NVIDIA apex: torch's LayerNorm is the default
    _ApexFusedLayerNorm = None
    HAVE_APEX = False


def layer_norm(hidden_size: int, eps: float) -> nn.Module:
    """A LayerNorm over the last dimension; apex's fused one on CUDA when available (same parameters)."""
    if HAVE_APEX and torch.cuda.is_available():
        return _ApexFusedLayerNorm(hidden_size, eps=eps)
    return nn.LayerNorm(hidden_size, eps=eps)
