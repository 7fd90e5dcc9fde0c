"""The stage's best checkpoint: the weights the next stage starts from."""

from __future__ import annotations

from typing import Literal

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn

from datamodules.errors import StagewiseError
from datamodules.metric_names import domain_of_val_loss, val_loss
from datamodules.stage_record import BEST_SUFFIX


class BestCheckpoint(ModelCheckpoint):
    """Keeps ``<models_dir>/<stage>_model_best.ckpt``: the weights of the stage's best validation.

    When it saves: at the end of a validation whose ``monitor`` is the lowest so far (``keep: best``), or
    at the end of every validation (``keep: final``, the last validation's weights). The file is replaced
    in place (atomically, see ``callbacks.safety.AtomicCheckpointIO``). Before training it refuses a
    ``monitor`` of a domain the stage does not validate (``val/<domain>/...`` with ``<domain>`` not in the
    data's ``val_domains``), and warns when the run will never validate (its best is then its final weights). ``stagewise fit`` gives every stage
    one (``--best_checkpoint.*``) and sets ``stage``, ``stage_domain`` and ``models_dir`` from ``--stage.*``.

    Args:
        stage: The stage's name: the file is ``<stage>_model_best.ckpt``.
        models_dir: The directory of the file (under ``stagewise fit``: ``<models_dir>/<experiment>``).
        stage_domain: The domain the stage trains on; its ``val/<domain>/loss`` is the default ``monitor``.
        monitor: The metric whose lowest value marks the best weights, e.g. ``val/code/loss``.
        keep: ``best``: the validation with the lowest ``monitor``; ``final``: the last validation's weights.
        save_weights_only: Save the weights, the hyperparameters, the data settings and the stage's counters
            (tokens, optimizer steps) without the optimizer, scheduler and callback states: what the next
            stage, ``evaluate`` and ``export`` read, at a third of the size (``small`` at vocab 8192: 96.0 MB
            instead of 288.0 MB). A stage resumes from its ``last.ckpt`` (the full state), never from this file.
    """

    def __init__(self, stage: str | None = None, models_dir: str = "models", stage_domain: str | None = None,
                 monitor: str | None = None, keep: Literal["best", "final"] = "best",
                 save_weights_only: bool = True) -> None:
        if keep not in ("best", "final"):
            raise StagewiseError(f"best_checkpoint.keep must be 'best' or 'final', got {keep!r}")
        monitor = monitor or (val_loss(stage_domain) if stage_domain else None)
        super().__init__(
            dirpath=models_dir, filename=f"{stage}{BEST_SUFFIX}" if stage else None,
            monitor="step" if keep == "final" else monitor, mode="max" if keep == "final" else "min",
            save_top_k=1, save_weights_only=save_weights_only, auto_insert_metric_name=False,
            enable_version_counter=False,
        )
        self.stage, self.stage_domain, self.keep = stage, stage_domain, keep

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        domains = getattr(trainer.datamodule, "val_domains", None)
        domain = domain_of_val_loss(self.monitor or "", metric=None)
        if stage == "fit" and domains is not None and domain is not None and domain not in domains:
            raise StagewiseError(
                f"the best checkpoint follows {self.monitor}, but this stage validates on {', '.join(domains)} only, "
                f"so that metric is never logged; monitor one of those (--best_checkpoint.monitor "
                f"val/<domain>/loss) or validate on '{domain}' too (--data.init_args.val_domains)")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        why = _never_validates(trainer)
        if why is not None:
            rank_zero_warn(
                f"this run will never validate ({why}): no validation curves, no per-domain losses in its "
                "stage.json, and its best checkpoint is its final weights. Lower --trainer.val_check_interval "
                "or raise --trainer.max_steps")


def _never_validates(trainer: L.Trainer) -> str | None:
    """Why the fit never validates within ``max_steps`` (counted over the whole run, before any resume), or None
    when it does."""
    if not trainer.enable_validation:
        return "validation is off: limit_val_batches is 0 or there is no validation data"
    every_n_epochs = trainer.check_val_every_n_epoch
    per_epoch = trainer.num_training_batches
    first = trainer.val_check_batch if every_n_epochs is None else \
        (every_n_epochs - 1) * per_epoch + min(trainer.val_check_batch, per_epoch)
    if trainer.max_steps > 0 and first > trainer.max_steps * trainer.accumulate_grad_batches:
        return f"max_steps is {trainer.max_steps}, and the first validation is due after training batch {first}"
    return None
