"""Dense held-out loss early in a stage: the stability gap (the rise of earlier domains' loss when training on
a new domain starts, and how much of it recovers)."""

from __future__ import annotations

import itertools
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from datamodules.errors import StagewiseError
from datamodules.metric_names import stability_loss, stability_tokens_loss
from datamodules.stage_record import update_stage_record


class StabilityGap(L.Callback):
    """Measure held-out losses every few optimizer steps at the start of a stage, where validations are too sparse
    to show the stability gap.

    A measurement is the validation loss (``validation_loss`` of the module: token-weighted cross-entropy) on
    the data module's own validation windows of ``domains`` (as many batches as ``limit_val_batches`` lets a
    validation read), under the validation's precision and in eval mode,
    so at a step where the stage also validates it gives the same number as ``val/<domain>/loss``. It is not a
    validation: no checkpoint is saved and no other callback sees it, so a dense schedule costs only the
    forward passes.

    When it acts:

    - ``on_train_start`` (not again on a resume): measures before the first step (step 0: the parent's weights);
    - ``on_train_batch_end`` at every ``every_n_steps``-th optimizer step up to ``until``: measures, and logs
      ``stability/<domain>/loss`` (by optimizer step) and ``stability_tokens/<domain>/loss`` (by the lineage's
      total tokens) to TensorBoard;
    - ``on_fit_end`` (rank 0): writes ``stability_gap`` into ``<models_dir>/<stage>/stage.json``: per domain its
      ``points`` ``[[step, total tokens, loss], ...]``, ``start`` (step 0), ``peak`` and ``peak_step`` (the
      highest point after step 0).

    Every rank measures all windows (as validation does), so ranks agree without communicating. Its points are
    saved in checkpoints. ``stagewise fit`` sets ``stage`` and ``models_dir`` when it is listed in
    ``trainer.callbacks``.

    Args:
        every_n_steps: Optimizer steps between two measurements.
        until: Last step measured: a fraction (< 1) of the stage's optimizer steps (``trainer.max_steps``, else
            the estimated stepping batches), or a number of steps (≥ 1).
        domains: The validation domains to measure (default: all of the data module's ``val_domains``), e.g.
            only the earlier domains whose loss rises.
        stage: The stage whose ``stage.json`` gets the ``stability_gap`` section (None: not written).
        models_dir: Where stage records live.
    """

    def __init__(self, every_n_steps: int = 10, until: float = 0.2, domains: list[str] | None = None,
                 stage: str | None = None, models_dir: str = "models") -> None:
        if every_n_steps < 1 or until <= 0:
            raise StagewiseError(f"StabilityGap needs every_n_steps >= 1 and until > 0, got {every_n_steps} and "
                                 f"{until}")
        self.every_n_steps, self.until = every_n_steps, until
        self.domains = list(domains) if domains is not None else None
        self.stage, self.models_dir = stage, models_dir
        self.points: dict[str, list[list[float]]] = {}  # domain -> [[step, tokens, loss]]
        self._loaders: dict[str, Any] | None = None

    def _until_step(self, trainer: L.Trainer) -> int:
        if self.until >= 1:
            return int(self.until)
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else trainer.estimated_stepping_batches
        return int(self.until * total)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.points:
            self.measure(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        done = any(p and p[-1][0] == step for p in self.points.values())  # accumulation: one step, several batches
        if step % self.every_n_steps == 0 and 0 < step <= self._until_step(trainer) and not done:
            self.measure(trainer, pl_module)

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Held-out loss of each domain now, recorded and logged at the current optimizer step."""
        if self._loaders is None:
            names = list(getattr(trainer.datamodule, "val_domains", None) or [])
            wanted = [d for d in (self.domains if self.domains is not None else names) if d in names]
            self._loaders = {d: loader for d, loader in zip(names, trainer.datamodule.val_dataloader()) if d in wanted}
        loaders, domains = self._loaders, list(self._loaders)
        was_training = pl_module.training
        pl_module.eval()
        sums = []
        with _eval_grad_mode(trainer), trainer.precision_plugin.val_step_context():
            for domain in domains:
                total = torch.zeros(2, device=pl_module.device, dtype=torch.float64)
                for batch in itertools.islice(loaders[domain], _batches(trainer, loaders[domain])):
                    batch = {k: v.to(pl_module.device, non_blocking=True) for k, v in batch.items()}
                    loss, n = pl_module.validation_loss(batch["input_ids"], batch["targets"], batch.get("loss_mask"))
                    total += torch.stack([loss.double() * n, n.double()])
                sums.append(total)
        pl_module.train(was_training)
        step, tokens = trainer.global_step, int(getattr(pl_module, "total_tokens", trainer.global_step))
        losses = {d: s / n for d, (s, n) in zip(domains, torch.stack(sums).tolist())} if sums else {}  # one host sync
        for domain, loss in losses.items():
            self.points.setdefault(domain, []).append([step, tokens, loss])
        if trainer.is_global_zero:
            for tb in [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]:
                for domain, loss in losses.items():
                    tb.add_scalar(stability_loss(domain), loss, global_step=step)
                    tb.add_scalar(stability_tokens_loss(domain), loss, global_step=tokens)
        return losses

    def summary(self) -> dict[str, Any]:
        """The ``stability_gap`` section of ``stage.json``."""
        out: dict[str, Any] = {"every_n_steps": self.every_n_steps, "domains": {}}
        for domain, points in self.points.items():
            later = points[1:] or points
            peak = max(later, key=lambda p: p[2])
            out["domains"][domain] = {"points": points, "start": points[0][2], "peak": peak[2], "peak_step": peak[0]}
        return out

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and self.stage and self.points:
            update_stage_record(self.models_dir, self.stage, {"stability_gap": self.summary()})

    def state_dict(self) -> dict[str, Any]:
        return {"points": self.points}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.points = {d: [list(p) for p in points] for d, points in (state_dict.get("points") or {}).items()}


def _batches(trainer: L.Trainer, loader: Any) -> int:
    """How many of ``loader``'s batches a validation reads: ``limit_val_batches`` as Lightning applies it."""
    limit, n = trainer.limit_val_batches, len(loader)
    return min(n, limit) if isinstance(limit, int) else int(n * limit)


def _eval_grad_mode(trainer: L.Trainer):
    """The autograd mode Lightning validates under (so a compiled loss sees the same guards): inference mode,
    but no_grad under FSDP, the gloo backend, or ``inference_mode=False``."""
    from lightning.pytorch.strategies import FSDPStrategy

    gloo = torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_backend() == "gloo"
    if gloo or isinstance(trainer.strategy, FSDPStrategy) or not trainer.fit_loop.epoch_loop.val_loop.inference_mode:
        return torch.no_grad()
    return torch.inference_mode()
