"""L2SP adds the exact gradient of coef/2 * ||w - w0||² and keeps fine-tuning closer to the start."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from callbacks.l2sp import L2SP

V, T = 32, 8


class Tiny(L.LightningModule):
    """Stand-in language model: embedding -> linear, plain SGD so a step is easy to predict."""

    def __init__(self, lr: float = 0.5, init_from: str | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(V, 16)
        self.head = torch.nn.Linear(16, V)

    def training_step(self, batch, batch_idx):
        logits = self.head(self.emb(batch["input_ids"]))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def loader():
    x = torch.randint(0, V, (64, T + 1), generator=torch.Generator().manual_seed(0))
    return DataLoader([{"input_ids": r[:-1], "targets": r[1:]} for r in x], batch_size=8)


class GradProbe(L.Callback):
    """Copies weights and gradients at ``on_before_optimizer_step`` (before or after L2SP, by list order)."""

    def __init__(self):
        self.grads, self.weights = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.clone() for n, p in pl_module.named_parameters()})
        self.weights.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})


def fit(model, callbacks, steps, **kw):
    trainer = L.Trainer(max_steps=steps, callbacks=callbacks, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", **kw)
    trainer.fit(model, loader())
    return trainer


@pytest.mark.parametrize("accumulate", [1, 2])
def test_gradient_is_the_penalty_gradient_once_per_step(accumulate):
    model = Tiny()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    before, after = GradProbe(), GradProbe()
    trainer = fit(model, [before, L2SP(coef=0.3), after], steps=4, accumulate_grad_batches=accumulate)
    assert len(after.grads) == 4
    for step in range(4):
        w = before.weights[step]
        for n in w0:
            expected = before.grads[step][n] + 0.3 * (w[n] - w0[n])
            torch.testing.assert_close(after.grads[step][n], expected)
    penalty = 0.15 * sum(((before.weights[3][n] - w0[n]) ** 2).sum() for n in w0)
    assert penalty > 0
    torch.testing.assert_close(trainer.callback_metrics["train/l2sp"], penalty)


def test_penalty_keeps_weights_closer_to_the_start():
    def distance(coef):
        model = Tiny(lr=0.5)
        w0 = [p.detach().clone() for p in model.parameters()]
        fit(model, [L2SP(coef=coef)] if coef else [], steps=40)
        return sum(((p.detach() - s) ** 2).sum() for p, s in zip(model.parameters(), w0)).sqrt().item()

    free, pulled = distance(0.0), distance(1.0)
    assert pulled < 0.8 * free, (pulled, free)
