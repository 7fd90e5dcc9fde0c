"""Fill TensorBoard's HPARAMS tab with the run's final per-domain held-out losses."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger


class FinalMetricsToHparams(L.Callback):
    """At the end of fit, log the hyperparameters with the final ``val/<domain>/loss`` values as metrics.

    Acts once, in ``on_fit_end``, on the TensorBoard logger only. Use it with
    ``TensorBoardLogger(default_hp_metric=False)`` so the tab holds real numbers, not a placeholder.

    Args:
        prefix: Only metrics whose name starts with this are shown in the tab.
    """

    def __init__(self, prefix: str = "val/") -> None:
        self.prefix = prefix

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = {
            f"hp/{name[len(self.prefix):]}": float(value)
            for name, value in trainer.callback_metrics.items()
            if name.startswith(self.prefix) and value.numel() == 1
        }
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger) and metrics:
                logger.log_hyperparams(dict(pl_module.hparams), metrics)
