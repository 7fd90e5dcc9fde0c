"""Watch the held-out loss of earlier domains while a stage trains on a new one, and act when it rises."""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from datamodules.errors import StagewiseError
from datamodules.metric_names import (
    FORGETTING_ALARMS, VAL_PREFIX, domain_of_val_loss, forgetting, forgetting_max_rise, forgetting_vs_tokens,
    val_loss,
)
from datamodules.stage_record import stage_record_for_checkpoint, update_stage_record


class ForgettingMonitor(L.Callback):
    """Measure forgetting of earlier domains during a stage; warn, stop, or back off the LR when it grows.

    When it acts:

    - ``on_fit_start``: takes each watched domain's **baseline** (held-out loss at the start of the stage)
      from the parent's ``stage.json`` (``losses.best``, else ``losses.final``) of ``model.init_from``.
    - ``on_train_start``: for domains the record lacks, runs the validation loop once before the first
      step and takes the baselines from it (this also puts a step-0 point on the ``val/*`` curves).
    - ``on_validation_end`` (every validation): logs ``forgetting/<d>`` = (loss - baseline) / baseline
      and ``forgetting/<d>/max_rise`` against the optimizer step, and the same under
      ``forgetting_vs_tokens/<d>`` against the stage's total tokens (TensorBoard). After the grace
      period, a rise above ``warn`` or ``stop`` for ``patience`` consecutive validations raises an alarm
      (console + TensorBoard text); ``warn`` only logs, ``stop`` does what ``action`` says.
    - ``on_fit_end``: writes ``forgetting`` {domain: {baseline, final, max_rise, max_rise_step, alarms}}
      into ``<models_dir>/<stage>/stage.json``.

    ``max_rise`` covers every validation, the grace period included, so the early dip that recovers
    ("stability gap") stays visible in the record even though it never raises an alarm.

    Rank 0 decides and broadcasts the decision, so every rank stops or backs off together. The state
    (baselines, rises, counters, alarms, backoffs) is saved in checkpoints; the weights kept for a backoff
    are not, so after a resume from ``last.ckpt`` a backoff restores the weights at the resume point.
    After a backoff the optimizer's moments are kept as they are.

    ``stagewise fit`` gives every stage one (``--forgetting.*``) and sets ``stage``, ``stage_domain`` and
    ``models_dir`` from ``--stage.*``, and ``domains`` (unless given) to the earlier domains of the lineage,
    so a stage from scratch watches nothing. It acts in ``fit`` only.

    Args:
        stage: The stage's name; ``stage.json`` goes to ``<models_dir>/<stage>/stage.json``.
        stage_domain: The domain this stage trains on (never watched). A backoff restores the weights of
            its best validation among those where no watched domain rose above ``warn`` (or the stage's
            starting weights). Defaults to ``stage``.
        domains: The earlier domains to watch. Default: every validation domain of the datamodule
            (``trainer.datamodule.val_domains``) except ``stage_domain``.
        models_dir: Where stage records live.
        warn: Relative rise over the baseline that logs a warning (0.05 = 5% higher loss).
        stop: Relative rise over the baseline that triggers ``action``.
        patience: Consecutive validations over a threshold before its alarm fires.
        grace: The start of the stage during which no alarm fires: a fraction (< 1) of the stage's
            optimizer steps (``trainer.max_steps`` or the estimated stepping batches), or a number of
            steps (≥ 1).
        action: What the ``stop`` threshold does: ``log`` only, ``stop`` training, or ``backoff``
            (multiply the LR by ``backoff_factor`` and restore the best weights so far; after
            ``max_backoffs`` backoffs it stops).
        backoff_factor: LR multiplier of a backoff.
        max_backoffs: Backoffs before a further stop alarm stops training.
    """

    def __init__(
        self,
        stage: str | None = None,
        stage_domain: str | None = None,
        domains: list[str] | None = None,
        models_dir: str = "models",
        warn: float = 0.05,
        stop: float = 0.25,
        patience: int = 2,
        grace: float = 0.1,
        action: Literal["log", "stop", "backoff"] = "log",
        backoff_factor: float = 0.5,
        max_backoffs: int = 2,
    ) -> None:
        if action not in ("log", "stop", "backoff"):
            raise ValueError(f"action must be 'log', 'stop' or 'backoff', got {action!r}")
        if not 0 < warn <= stop:
            raise ValueError(f"need 0 < warn <= stop, got warn={warn}, stop={stop}")
        self.stage = stage
        self.stage_domain = stage_domain or stage
        self.domains = list(domains) if domains is not None else None
        self.models_dir = models_dir
        self.warn, self.stop = warn, stop
        self.patience = max(1, patience)
        self.grace = grace
        self.action = action
        self.backoff_factor = backoff_factor
        self.max_backoffs = max_backoffs

        self.baselines: dict[str, float] = {}
        self.baseline_source = ""
        self.final: dict[str, float] = {}
        self.max_rise: dict[str, float] = {}
        self.max_rise_step: dict[str, int] = {}
        self.over: dict[str, dict[str, int]] = {"warn": {}, "stop": {}}  # consecutive validations over a threshold
        self.alarms: dict[str, list[dict]] = {}
        self.backoffs = 0
        self.best_own_loss = math.inf
        self._best_weights: dict[str, torch.Tensor] | None = None
        self._measuring_baseline = False
        self._pending_text: list[str] = []

    # ----------------------------------------------------------------------------------------- baselines
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        if self.stage is None:
            raise StagewiseError("ForgettingMonitor needs its stage's name: ForgettingMonitor(stage=...), or run the "
                                 "stage with `stagewise fit`, which sets it from --stage.name")

        if self.action == "backoff" and isinstance(trainer.strategy, FSDPStrategy):
            raise StagewiseError("ForgettingMonitor action 'backoff' restores a kept copy of the weights, which it "
                                 "cannot do under FSDP (each rank holds a shard); use action 'stop' or 'log', or "
                                 "train this stage without the FSDP strategy")
        val_domains = getattr(trainer.datamodule, "val_domains", None)
        if self.domains is None and val_domains is not None:
            self.domains = [d for d in val_domains if d != self.stage_domain]
        if self.baselines:  # restored from a checkpoint (resume)
            return
        init_from = getattr(pl_module.hparams, "init_from", None)
        if init_from:
            losses = ((stage_record_for_checkpoint(init_from) or {}).get("losses")) or {}
            for key in ("best", "final"):
                for d in self.domains:
                    if d not in self.baselines and d in (losses.get(key) or {}):
                        self.baselines[d] = float(losses[key][d])
            if self.baselines:
                self.baseline_source = f"stage record of {init_from}"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        missing = [d for d in self.domains or [] if d not in self.baselines]
        if (self.domains is None or missing) and trainer.enable_validation:
            self._measure_baselines(trainer, pl_module, missing)
        if self.action == "backoff" and self._best_weights is None:
            self._best_weights = _cpu_copy(pl_module)  # the stage's starting (or resumed) weights

    def _measure_baselines(self, trainer: L.Trainer, pl_module: L.LightningModule, missing: list[str]) -> None:
        """Run one validation pass before the first step, the way the training loop runs one."""
        if trainer.global_step > 0:
            rank_zero_warn(f"ForgettingMonitor: no baseline for {missing or 'any domain'}; measuring it now, at "
                           f"step {trainer.global_step}, not at the stage's start")
        self._measuring_baseline = True
        try:
            trainer.validating = True
            trainer.fit_loop.epoch_loop.val_loop.run()
        finally:
            trainer.training = True
            self._measuring_baseline = False
        if self.domains is None:
            missing = self.domains = self._validated_domains(trainer)
        metrics = _val_metrics(trainer)
        for d in missing:
            if val_loss(d) in metrics:
                self.baselines[d] = metrics[val_loss(d)]
        self._keep_if_best(pl_module, metrics)
        self.baseline_source = " + ".join(filter(None, [self.baseline_source, f"validation at step {trainer.global_step}"]))
        rank_zero_info(f"ForgettingMonitor baselines ({self.baseline_source}): {self.baselines}")

    # ----------------------------------------------------------------------------------------- each validation
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self._measuring_baseline or trainer.state.fn != TrainerFn.FITTING:
            return
        step = trainer.global_step
        metrics = _val_metrics(trainer)
        if self.domains is None:
            self.domains = self._validated_domains(trainer)
        decision = self._update(metrics, step, self._grace_steps(trainer)) if trainer.is_global_zero else None
        # Rank 0's state and decision win, so every rank does the same thing.
        state, decision = trainer.strategy.broadcast((self.state_dict(), decision), src=0)
        self.load_state_dict(state)
        self._log(trainer, pl_module, step)
        if decision is None:
            self._keep_if_best(pl_module, metrics)
            return
        domain, rise = decision
        if self.action == "backoff" and self.backoffs < self.max_backoffs:
            self._backoff(trainer, pl_module, domain, rise, step)
        elif self.action in ("stop", "backoff"):
            trainer.should_stop = True
            why = f" after {self.backoffs} LR backoffs" if self.action == "backoff" else ""
            self._announce(trainer, f"ForgettingMonitor stops training{why}: val/{domain}/loss is {rise:.1%} "
                                    f"above its baseline at step {step} (stop threshold {self.stop:.0%})", step)

    def _validated_domains(self, trainer: L.Trainer) -> list[str]:
        """Every domain with a ``val/<d>/loss`` metric but the stage's own (when no datamodule names them)."""
        names = {domain_of_val_loss(k) for k in trainer.callback_metrics} - {None, self.stage_domain}
        return sorted(names)

    def _keep_if_best(self, pl_module: L.LightningModule, metrics: dict[str, float]) -> None:
        """Track the best own-domain loss among validations where no watched domain rose above ``warn``;
        with ``action="backoff"`` keep a CPU copy of those weights as the restore target."""
        own = metrics.get(val_loss(self.stage_domain))
        rising = any(
            (metrics[val_loss(d)] - b) / abs(b) > self.warn
            for d, b in self.baselines.items()
            if val_loss(d) in metrics
        )
        if own is None or rising or own >= self.best_own_loss:
            return
        self.best_own_loss = own
        if self.action == "backoff":
            self._best_weights = _cpu_copy(pl_module)

    def _update(self, metrics: dict[str, float], step: int, grace_steps: int) -> tuple[str, float] | None:
        """Record this validation's rises; return (domain, rise) when a stop alarm fires (rank 0 only)."""
        fired = None
        for d in self.domains or []:
            loss, base = metrics.get(val_loss(d)), self.baselines.get(d)
            if loss is None or base is None:
                continue
            rise = (loss - base) / abs(base)
            self.final[d] = loss
            if rise > self.max_rise.get(d, -math.inf):
                self.max_rise[d], self.max_rise_step[d] = rise, step
            for level, threshold in (("warn", self.warn), ("stop", self.stop)):
                over = rise > threshold and step >= grace_steps
                count = self.over[level][d] = self.over[level].get(d, 0) + 1 if over else 0
                if count != self.patience:
                    continue
                action = "log" if level == "warn" else self.action
                self.alarms.setdefault(d, []).append(
                    {"level": level, "step": step, "loss": loss, "rise": rise, "action": action}
                )
                msg = (f"ForgettingMonitor {level}: val/{d}/loss {loss:.4f} is {rise:.1%} above its baseline "
                       f"{base:.4f} for {self.patience} validations (step {step})")
                rank_zero_warn(msg)
                self._pending_text.append(msg)
                if level == "stop" and self.action != "log" and fired is None:
                    fired = (d, rise)
        return fired

    def _grace_steps(self, trainer: L.Trainer) -> int:
        if self.grace >= 1:
            return int(self.grace)
        total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        return 0 if math.isinf(total) else int(self.grace * total)

    def _backoff(self, trainer: L.Trainer, pl_module: L.LightningModule, domain: str, rise: float, step: int) -> None:
        """Scale every LR (and the schedules' base LRs) by ``backoff_factor``; restore the best weights."""
        f = self.backoff_factor
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] *= f
                if "initial_lr" in group:
                    group["initial_lr"] *= f
        for config in trainer.lr_scheduler_configs:
            for scheduler in [config.scheduler, *getattr(config.scheduler, "_schedulers", [])]:
                if hasattr(scheduler, "base_lrs"):
                    scheduler.base_lrs = [lr * f for lr in scheduler.base_lrs]
        if self._best_weights is not None:
            pl_module.load_state_dict(self._best_weights)
        self.backoffs += 1
        for counts in self.over.values():
            counts.clear()
        self._announce(trainer, f"ForgettingMonitor backoff {self.backoffs}/{self.max_backoffs}: val/{domain}/loss "
                                f"is {rise:.1%} above its baseline at step {step}; LR x{f}, best weights restored", step)

    # ----------------------------------------------------------------------------------------- logging
    def _announce(self, trainer: L.Trainer, msg: str, step: int) -> None:
        rank_zero_warn(msg)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text(FORGETTING_ALARMS, msg, global_step=step)

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        values = {}
        for d in self.domains or []:
            if d in self.final:
                values[forgetting(d)] = (self.final[d] - self.baselines[d]) / abs(self.baselines[d])
                values[forgetting_max_rise(d)] = self.max_rise[d]
        tokens = getattr(pl_module, "total_tokens", None)
        texts, self._pending_text = self._pending_text, []
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step)
            if isinstance(logger, TensorBoardLogger):
                for msg in texts:
                    logger.experiment.add_text(FORGETTING_ALARMS, msg, global_step=step)
                if tokens is not None:
                    for tag, v in values.items():
                        logger.experiment.add_scalar(forgetting_vs_tokens(tag), v, global_step=int(tokens))

    # ----------------------------------------------------------------------------------------- record, state
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or not self.baselines:
            return
        update_stage_record(self.models_dir, self.stage, {"forgetting": self.summary()})

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per watched domain: baseline, final, max_rise, max_rise_step, alarms (the stage.json section)."""
        return {
            d: {
                "baseline": self.baselines[d],
                "final": self.final.get(d),
                "max_rise": self.max_rise.get(d),
                "max_rise_step": self.max_rise_step.get(d),
                "alarms": self.alarms.get(d, []),
            }
            for d in self.domains or self.baselines
            if d in self.baselines
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "baselines": dict(self.baselines),
            "baseline_source": self.baseline_source,
            "final": dict(self.final),
            "max_rise": dict(self.max_rise),
            "max_rise_step": dict(self.max_rise_step),
            "over": {level: dict(c) for level, c in self.over.items()},
            "alarms": {d: list(a) for d, a in self.alarms.items()},
            "backoffs": self.backoffs,
            "best_own_loss": self.best_own_loss,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.baselines = dict(state_dict["baselines"])
        self.baseline_source = state_dict["baseline_source"]
        self.final = dict(state_dict["final"])
        self.max_rise = dict(state_dict["max_rise"])
        self.max_rise_step = dict(state_dict["max_rise_step"])
        self.over = {level: dict(c) for level, c in state_dict["over"].items()}
        self.alarms = {d: list(a) for d, a in state_dict["alarms"].items()}
        self.backoffs = state_dict["backoffs"]
        self.best_own_loss = state_dict["best_own_loss"]


def _val_metrics(trainer: L.Trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(VAL_PREFIX)}


def _cpu_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
