"""A changed training loss: label smoothing, by overriding one method of CausalLM.

    stagewise fit -c configs/stages/language.yaml \\
        --model experiments.examples.label_smoothing.LabelSmoothingLM --model.label_smoothing 0.1

Validation still reports plain cross-entropy (CausalLM.validation_step), so the run's ``val/*/loss``
compares with runs trained without smoothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_modules import CausalLM


class LabelSmoothingLM(CausalLM):
    """CausalLM trained with label-smoothed cross-entropy.

    Args:
        label_smoothing: Probability mass spread uniformly over the vocabulary (0 = plain cross-entropy).
        **kwargs: The arguments of ``CausalLM``.
    """

    def __init__(self, label_smoothing: float = 0.1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.label_smoothing = label_smoothing

    def compute_loss(self, logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor | None) -> torch.Tensor:
        losses = F.cross_entropy(
            logits.float().flatten(0, 1), targets.flatten(), reduction="none", label_smoothing=self.label_smoothing
        )
        if loss_mask is None:
            return losses.mean()
        mask = loss_mask.flatten().to(losses.dtype)
        return (losses * mask).sum() / mask.sum().clamp(min=1)
