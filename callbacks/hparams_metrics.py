"""Fill TensorBoard's HPARAMS tab with what defines the run and its final per-domain held-out losses."""

from __future__ import annotations

import os
from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

from datamodules.metric_names import VAL_PREFIX


class FinalMetricsToHparams(L.Callback):
    """At the end of fit, log the run's settings with the final ``val/<domain>/loss`` values as metrics.

    Acts once, in ``on_fit_end``, on the TensorBoard logger only. The settings are the module's init
    arguments, the data module's (its ``state_dict()``: corpus, domains, ``data_dir``, ``seq_len``,
    ``batch_size``, ``data_seed``...; a mixture's fractions), the Trainer's that shape the optimisation
    (``trainer/max_steps``, ``trainer/accumulate_grad_batches``, ``trainer/precision``, ``trainer/world_size``...)
    and ``seed``, so runs can be told apart in the tab. Use it with ``TensorBoardLogger(default_hp_metric=False)``
    so the tab holds real numbers, not a placeholder.

    Args:
        prefix: Only metrics whose name starts with this are shown in the tab.
    """

    def __init__(self, prefix: str = VAL_PREFIX) -> None:
        self.prefix = prefix

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = {
            f"hp/{name[len(self.prefix):]}": float(value)
            for name, value in trainer.callback_metrics.items()
            if name.startswith(self.prefix) and value.numel() == 1
        }
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger) and metrics:
                logger.log_hyperparams(run_settings(trainer, pl_module), metrics)


def run_settings(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
    """The module's init arguments, the data module's settings, the Trainer's optimisation settings and the seed."""
    datamodule = trainer.datamodule
    data = dict(datamodule.state_dict() or {}) if datamodule is not None else {}
    if getattr(datamodule, "mixture_fractions", None):
        data["mixture"] = dict(datamodule.mixture_fractions)
    settings = {**dict(pl_module.hparams), **data}
    settings["trainer"] = {
        "max_steps": trainer.max_steps, "max_epochs": trainer.max_epochs,
        "accumulate_grad_batches": trainer.accumulate_grad_batches, "gradient_clip_val": trainer.gradient_clip_val,
        "precision": trainer.precision, "world_size": trainer.world_size,
        "val_check_interval": trainer.val_check_interval, "limit_val_batches": trainer.limit_val_batches,
    }
    settings["seed"] = int(os.environ.get("PL_GLOBAL_SEED", -1))
    return {k: v for k, v in settings.items() if not k.startswith("_")}
