"""The stage's best checkpoint: the weights the next stage starts from."""

from __future__ import annotations

from typing import Literal

from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules.errors import StagewiseError
from datamodules.metric_names import val_loss
from datamodules.stage_record import BEST_SUFFIX


class BestCheckpoint(ModelCheckpoint):
    """Keeps ``<models_dir>/<stage>_model_best.ckpt``: the weights of the stage's best validation.

    When it saves: at the end of a validation whose ``monitor`` is the lowest so far (``keep: best``), or
    at the end of every validation (``keep: final``, the last validation's weights). The file is replaced
    in place (atomically, see ``callbacks.safety.AtomicCheckpointIO``). ``stagewise fit`` gives every stage
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
