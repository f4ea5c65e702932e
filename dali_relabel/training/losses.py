"""Losses for soft targets."""
from __future__ import annotations

import torch
from torch import nn


def smooth_targets(targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """``(1 - e) * targets + e / C``: label smoothing applied to (soft) targets ``[B, C]``."""
    if smoothing <= 0:
        return targets
    return targets * (1.0 - smoothing) + smoothing / targets.shape[1]


class SoftTargetCrossEntropy(nn.Module):
    """Cross-entropy against a target distribution: ``mean_b sum_c -t[b, c] log softmax(x)[b, c]``.

    Args:
        smoothing: label smoothing mixed into the targets first.
    """

    def __init__(self, smoothing: float = 0.0):
        super().__init__()
        self.smoothing = smoothing

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = smooth_targets(targets.to(torch.float32), self.smoothing)
        log_probs = torch.log_softmax(logits.float(), dim=1)
        return torch.sum(-targets * log_probs, dim=1).mean()
