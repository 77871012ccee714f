"""The memory value lookup behind one function, so faster kernels and sharded tables can replace it.

out[n] = sum_j weights[n, j] * values[indices[n, j]]   (a weighted bag of value rows per token)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def value_lookup(values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of value rows.

    values: [M, D] table; indices: [N, K] int64 rows into it; weights: [N, K] (any float dtype).
    Returns [N, D] in values' dtype. PyTorch reference: `embedding_bag` with per-sample weights reads only
    the K rows per token and its backward writes only those rows, which is what the layer needs.
    """
    if indices.shape != weights.shape or indices.dim() != 2:
        raise ValueError(f"value_lookup: indices {tuple(indices.shape)} and weights {tuple(weights.shape)}")
    return F.embedding_bag(indices, values, per_sample_weights=weights.to(values.dtype), mode="sum")
