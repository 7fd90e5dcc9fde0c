"""Safety nets for long runs: checkpoints written atomically, a ``last.ckpt`` to resume from, and a clean
stop on SIGTERM / SIGINT that does not stall the GPU.

``stagewise fit`` installs all three by default (see ``lightning_modules/cli.py``): every checkpoint goes
through :class:`AtomicCheckpointIO`, :class:`LastCheckpoint` keeps
``runs/<experiment>/<version>/checkpoints/last.ckpt`` for ``--ckpt_path last``, and :class:`PreemptionCheck`
stops the fit at the next batch after a signal (across ranks, checked every N steps) once ``last.ckpt`` is
saved. Non-finite steps are skipped by ``CausalLM`` itself (``max_bad_steps``).
"""

from __future__ import annotations

import errno
import itertools
import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from datamodules.errors import StagewiseError
from datamodules.shards import atomic_path
from datamodules.signals import defer_signals


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes every checkpoint to a temporary file beside its target, fsyncs it and renames it into place.

    A process killed while saving leaves the previous checkpoint of that name whole and loadable (a rename
    within one directory is atomic). A full disk (``ENOSPC``) removes the partial temporary file and raises a
    ``StagewiseError`` that names the path and the checkpoints still intact. Paths with a URL scheme
    (``s3://...``) are written by Lightning's own ``TorchCheckpointIO``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        try:
            with atomic_path(path, durable=True) as tmp:
                self.write_temp(checkpoint, tmp)
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
            intact = sorted(str(p) for p in path.parent.glob("*.ckpt")) or ["none"]
            raise StagewiseError(
                f"disk full while writing {path}; earlier checkpoints are intact: {', '.join(intact)}. Free "
                "space (or save elsewhere) and resume with --ckpt_path last"
            ) from None
        for stale in path.parent.glob(f".{path.name}.tmp*"):  # left by a process killed mid-save
            stale.unlink(missing_ok=True)

    def write_temp(self, checkpoint: dict[str, Any], tmp: Path) -> None:
        """Write ``checkpoint`` to ``tmp`` (``atomic_path`` forces it to disk before the rename)."""
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)


class LastCheckpoint(ModelCheckpoint):
    """Keeps ``last.ckpt``, the full training state ``stagewise fit ... --ckpt_path last`` resumes from.

    When it saves: every ``every_n_train_steps`` optimizer steps, after every validation, at the end of
    training, and when the fit is stopped by a signal (:class:`PreemptionCheck`: ``trainer.received_sigterm``
    is set at a batch's end). A save due on a step that is followed by validation waits until that
    validation has run, so a resumed run neither repeats nor skips it. Nothing is saved while ``CausalLM`` is skipping non-finite steps
    (``bad_steps_in_a_row > 0``): the last checkpoint stays the last good one. ``last.ckpt`` is overwritten in
    place (atomically, see :class:`AtomicCheckpointIO`); a killed run loses at most ``every_n_train_steps``
    steps.

    Args:
        every_n_train_steps: Optimizer steps between saves; 0 saves only after validations and at the end.
            Each save writes the weights and the optimizer state (about 16 bytes per parameter).
        dirpath: Directory of ``last.ckpt``. Default: the run's ``checkpoints/`` directory,
            ``<save_dir>/<experiment>/<version>/checkpoints``.
    """

    def __init__(self, every_n_train_steps: int = 500, dirpath: str | None = None) -> None:
        super().__init__(dirpath=dirpath, save_last=True, save_top_k=0, every_n_train_steps=every_n_train_steps,
                         every_n_epochs=0, enable_version_counter=False)

    @property
    def state_key(self) -> str:
        return "LastCheckpoint"  # one per run; keeps its state apart from the stage config's ModelCheckpoints

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # The step test first: reading the bad-step streak may wait for the GPU, so only when a save is due.
        due = self._every_n_train_steps >= 1 and trainer.global_step % self._every_n_train_steps == 0
        stopping = trainer.received_sigterm
        if not (due or stopping) or _validation_follows(trainer) or _bad_streak(pl_module):
            return
        if stopping:
            self._save(trainer)
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and not _bad_streak(pl_module):
            self._save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Epoch ends save nothing extra: the step and validation saves above cover them."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not _bad_streak(pl_module):
            self._save(trainer)

    def _save(self, trainer: L.Trainer) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def _bad_streak(pl_module: L.LightningModule) -> bool:
    return bool(getattr(pl_module, "bad_steps_in_a_row", 0))


def _validation_follows(trainer: L.Trainer) -> bool:
    """Whether the fit loop validates right after the current training batch (Lightning's own decision)."""
    if not trainer.enable_validation:
        return False
    return bool(trainer.fit_loop.epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher))


class PreemptionCheck(L.Callback):
    """Stops a fit cleanly on SIGTERM (preemption, ``scancel``, ``timeout``) or SIGINT (Ctrl-C): the batch in
    progress finishes, and the validation right after it if one is due; ``last.ckpt`` is saved
    (:class:`LastCheckpoint`); then the fit ends with Lightning's ``SIGTERMException`` and ``stagewise`` prints
    one line and exits 143 (SIGTERM) or 130 (SIGINT). ``--ckpt_path last`` continues exactly, as after any
    save (``tests/test_resume.py``). A checkpoint being written when the signal comes is finished first.

    When it acts:

    - ``on_train_start`` (after Lightning has set its own handlers): SIGTERM and SIGINT now only record the
      signal (``datamodules.signals.defer_signals``). Lightning's SIGTERM handler would stop in the middle of
      a validation (which a resumed run then skips) and Python's SIGINT raises wherever the step is. Rank 0
      passes the signal on to the processes Lightning's DDP launcher started. Lightning puts its handlers
      back when the fit ends.
    - ``on_train_batch_end``: the ranks agree whether any was signalled: in one process after every batch (a
      flag on the host, no sync), across processes on batches 0, N, 2N, … of each fit (an all-reduce).
      Signalled: the fit stops after this batch (``trainer.received_sigterm``, which ``LastCheckpoint`` saves
      on and Lightning's loop stops on), or after the validation that follows it (``on_validation_end``).

    Across processes, Lightning 2.6 broadcasts rank 0's SIGTERM flag before each training batch and reads it
    back with ``.item()``: on GPUs a host sync per step, which leaves the GPU idle while the CPU prepares the
    next step. Measured for ``base`` DDP on 2 H200s: 938K tokens/s with N = 20 against 915K with the check
    every step (+2.4%; ``experiments/results/throughput_summary.md``). This check replaces that one; a signal
    still stops all ranks together, at most N−1 batches later. Lightning-AI/pytorch-lightning#21640 proposes
    the same as a Trainer argument.

    ``stagewise fit`` installs it (``--preemption_check.every_n_steps``, 1 = check every step).

    Args:
        every_n_steps: Training batches between two checks across processes.
    """

    def __init__(self, every_n_steps: int = 20) -> None:
        if every_n_steps < 1:
            raise StagewiseError(f"preemption_check.every_n_steps must be at least 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self._signum: int | None = None  # the first signal this fit received
        self._batches = itertools.count()
        self._after_validation = False
        self._stopping = False  # the ranks agreed to stop: no more checks

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loop = trainer.fit_loop.epoch_loop
        if hasattr(type(loop), "_broadcast_sigterm_tensor"):  # Lightning 2.6 internals: replaced by this check
            loop._broadcast_sigterm_tensor = lambda: None  # on the instance: the class's method stays
        self._batches, self._signum, self._after_validation, self._stopping = itertools.count(), None, False, False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        launcher = trainer.strategy.launcher

        def on_signal(signum: int) -> None:
            if self._signum is None:
                self._signum = signum
                if launcher is not None and trainer.is_global_zero:
                    launcher.kill(signum)  # the ranks Lightning started (a no-op for those it did not)

        defer_signals(on_signal)  # Lightning's teardown puts back the handlers it found

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._stopping or not self._agree(trainer):
            return
        self._stopping = True
        rank_zero_info(f"{signal.Signals(self._signum or signal.SIGTERM).name}: stopping after step "
                       f"{trainer.global_step}, once last.ckpt is saved")
        if _validation_follows(trainer):
            self._after_validation = True
        else:
            _stop(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._after_validation:
            _stop(trainer)

    def _agree(self, trainer: L.Trainer) -> bool:
        """Whether the fit stops after this batch: this process was signalled (one process), or, on the checked
        batches, any rank was. Every rank takes part in every check, also one whose own flag is set (Lightning's
        handler, before ``on_train_start``, may have set ``received_sigterm`` on one rank only)."""
        if trainer.world_size == 1 or not torch.distributed.is_initialized():
            return self._signalled(trainer)
        return next(self._batches) % self.every_n_steps == 0 and self._any_rank_signalled(trainer)

    def _signalled(self, trainer: L.Trainer) -> bool:
        return self._signum is not None or trainer.received_sigterm

    def _any_rank_signalled(self, trainer: L.Trainer) -> bool:
        """Collective: whether any rank has received a signal (an all-reduce, read back on the host)."""
        flag = torch.tensor([float(self._signalled(trainer))], device=trainer.strategy.root_device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


def _stop(trainer: L.Trainer) -> None:
    """Make the fit stop at the end of this batch, as Lightning does on a SIGTERM (its loop raises
    ``SIGTERMException`` there); ``LastCheckpoint`` saves first."""
    trainer._signal_connector.received_sigterm = True  # Lightning 2.6 keeps the flag privately
