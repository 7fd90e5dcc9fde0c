"""L2-SP: pull a stage's weights toward the weights it started from (Li et al., 2018)."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn


class L2SP(L.Callback):
    """Add the gradient of ``coef/2 * ||w - w0||²`` to every trainable parameter's gradient.

    ``w0`` are the stage's starting weights (the ``init_from`` weights of a fine-tuning stage): an L2
    penalty toward them, instead of toward zero, limits how far fine-tuning drifts from what the earlier
    stages learned (L2-SP, Li, Grandvalet & Davoine, "Explicit Inductive Bias for Transfer Learning
    with Convolutional Networks", ICML 2018).

    When it acts:

    - ``on_train_start``: snapshots the trainable parameters (detached copies on their device: one more
      copy of the weights in memory). After a resume (``global_step > 0``) it reads them from
      ``model.init_from`` instead, so ``w0`` stays the stage's start.
    - ``on_before_optimizer_step`` (once per optimizer step): ``grad += coef * (w - w0)`` — the exact
      gradient of the penalty, applied without touching the module's loss. It runs after gradient
      accumulation, after AMP unscaling (16-mixed) and before gradient clipping, so the term is added
      once per step at its true scale; ``on_after_backward`` would add it once per micro-batch and to
      scaled gradients. Under DDP the gradients are already all-reduced there; ``w`` and ``w0`` are the
      same on every rank, so the added term is too. Logs ``train/l2sp`` (the penalty's value) as a
      tensor, without a host sync per step. Under FSDP each rank holds a shard of ``w`` and of its
      gradient, and the term is added to that shard (still exact), but ``train/l2sp`` is then rank 0's
      shard's part of the penalty, and after a resume ``w0`` is the resumed weights (shard shapes
      differ from the checkpoint's; a warning says so). Not measured on GPUs.

    With AdamW the penalty's gradient is normalized like any other gradient (it is not decoupled like
    weight decay, which still pulls toward zero).

    Args:
        coef: Strength of the penalty ``coef/2 * ||w - w0||²`` (summed over all trainable parameters).
    """

    def __init__(self, coef: float = 1e-3) -> None:
        self.coef = coef
        self.start: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = {name: p for name, p in pl_module.named_parameters() if p.requires_grad}
        source = {name: p.detach() for name, p in params.items()}
        init_from = getattr(pl_module.hparams, "init_from", None)
        if trainer.global_step > 0:
            saved = _checkpoint_weights(init_from) if init_from else {}
            if all(name in saved and saved[name].shape == p.shape for name, p in params.items()):
                source = saved
            else:
                rank_zero_warn(f"L2SP: resumed at step {trainer.global_step} without the stage's starting "
                               f"weights (model.init_from={init_from!r}); pulling toward the resumed weights")
        self.start = {name: source[name].to(p.device, p.dtype, copy=True) for name, p in params.items()}

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        squares = []
        for name, p in pl_module.named_parameters():
            if p.grad is None or name not in self.start:
                continue
            diff = p.detach() - self.start[name]
            p.grad.add_(diff, alpha=self.coef)
            squares.append(diff.pow(2).sum())
        if squares:
            pl_module.log("train/l2sp", self.coef / 2 * torch.stack([s.float() for s in squares]).sum(), on_step=True, on_epoch=False)


def _checkpoint_weights(path: str) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("state_dict", {})
