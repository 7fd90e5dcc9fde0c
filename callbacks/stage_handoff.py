"""Hand one stage's result to the next: the best checkpoint, its record, and curves on one token axis."""

from __future__ import annotations

import hashlib
import math
import shutil
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from callbacks.best_checkpoint import BestCheckpoint
from callbacks.precision import precision_label
from callbacks.throughput import device_peak_flops, mfu, model_shape
from datamodules.errors import StagewiseError, TokenizerMismatchError
from datamodules.metric_names import (STAGE_BOUNDARY, TRAIN_TOKENS_LOSS, domain_of_val_loss, val_losses,
                                      val_tokens_loss)
from datamodules.shards import atomic_path
from datamodules.stage_record import (
    checked_record, file_sha256, lineage_domains, read_checkpoint, stage_of_checkpoint, update_stage_record,
)
from datamodules.tokenizer import check_same_ids
from lightning_modules.export import export_hf
from lightning_modules.hf_llama import is_hf_dir


class StageHandoff(L.Callback):
    """Make a stage's best checkpoint the next stage's starting point, and record how it was made.

    When it acts:

    - ``on_fit_start``: with ``model.init_from`` set, reads the parent's ``stage.json``, refuses a parent
      its record does not describe (replaced after the record was written: ``LineageError``) and a parent
      trained with another tokenizer (``TokenizerMismatchError``); for a transformers model directory, one
      whose tokenizer gives other ids than the data's (not that tokenizer or adopted from it).
    - ``on_train_start``: logs the stage boundary to TensorBoard (``stage/boundary`` = 1 and a text entry,
      at the lineage's total tokens), once per stage, not again on resume.
    - every ``log_every_n_steps`` optimizer steps: ``train_tokens/loss`` against the lineage's total tokens;
    - ``on_validation_end``: ``val_tokens/<domain>/loss`` against the lineage's total tokens, so the
      separate runs of the stages (``runs/<experiment>/<stage>/``) read as one curve per domain; remembers
      each validation's per-domain losses by step (the best checkpoint's step picks its losses at fit end);
    - ``on_fit_end`` (rank 0): makes sure the best checkpoint is ``<models_dir>/<stage>_model_best.ckpt``
      (copies it there if the ModelCheckpoint wrote it elsewhere), exports it to
      ``<models_dir>/<stage>/hf`` (transformers format), and writes ``<models_dir>/<stage>/stage.json``:
      stage, experiment, domain and the lineage's domains, checkpoint and parent (path, sha256), tokenizer
      and chat template sha256, tokens and optimizer steps (of the best checkpoint, in this stage and in
      the lineage; and trained in all), wall time, final and best per-domain losses, precision, config,
      and where the optimizer state came from (``optimizer_from``: null for a fresh optimizer).

    Its state (per-validation losses, wall time so far, parent) is saved in checkpoints, so a resumed stage
    records the same numbers as an uninterrupted one.

    ``stagewise fit`` gives every stage one (``--handoff.*``) and sets ``stage``, ``models_dir`` and
    ``experiment`` from ``--stage.*``.

    Args:
        stage: The stage's name: the checkpoint is ``<models_dir>/<stage>_model_best.ckpt``.
        models_dir: Where the experiment's best checkpoints and stage records live.
        experiment: The experiment's name for the record. Default: the logger's name.
        export_hf: Also export the best checkpoint as a transformers directory ``<models_dir>/<stage>/hf``.
        log_every_n_steps: Optimizer steps between ``train_tokens/loss`` points. Default: the Trainer's
            ``log_every_n_steps``.
    """

    def __init__(self, stage: str | None = None, models_dir: str = "models", experiment: str | None = None,
                 export_hf: bool = True, log_every_n_steps: int | None = None) -> None:
        self.stage = stage
        self.models_dir = models_dir
        self.experiment = experiment
        self.export_hf = export_hf
        self.log_every_n_steps = log_every_n_steps
        self.val_history: dict[str, dict[str, float]] = {}  # optimizer step -> per-domain val losses
        self.val_metrics_history: dict[str, dict[str, float]] = {}  # optimizer step -> other val/<domain>/<what>
        self.parent: dict | None = None
        self.boundary_logged = False
        self._wall_before = 0.0  # wall time of earlier runs of this stage (before a resume)
        self._t0: float | None = None
        self._last_train_log = -1
        self._first_step: tuple[float, int] | None = None  # (time, tokens) after this run's first optimizer step
        self._peak_flops: float | None = None  # of the device trained on (at fit end the module is back on the CPU)
        self._device: str | None = None  # its name ("NVIDIA H200", "cpu")
        self._train_end: float | None = None  # when training ended (before the handoff's copies and export)
        self._paused_at: float | None = None  # the running validation's start (after the first step)
        self._between_s = 0.0  # seconds from each validation's start to the next training batch

    @property
    def best_path(self) -> Path:
        return Path(self.models_dir) / f"{self.stage}_model_best.ckpt"

    # ------------------------------------------------------------------------------------- fit start
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.stage is None:
            raise StagewiseError("StageHandoff needs its stage's name: StageHandoff(stage=...), or run the stage "
                                 "with `stagewise fit`, which sets it from --stage.name")
        self._t0 = time.perf_counter()
        init_from = _hparam(pl_module, "init_from")
        if init_from and self.parent is None:
            self.parent = self._check_parent(init_from, _hparam(pl_module, "tokenizer_sha256"),
                                             getattr(trainer.datamodule, "tokenizer_dir", None))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Here, not in on_fit_start: FSDP restores a resumed run's callback state after on_fit_start.
        init_from = _hparam(pl_module, "init_from")
        if trainer.is_global_zero and not self.boundary_logged:
            tokens = _total_tokens(trainer, pl_module)
            origin = f"from `{init_from}` ({self.parent['stage']})" if self.parent else "from scratch"
            for tb in _tensorboards(trainer):
                tb.add_scalar(STAGE_BOUNDARY, 1.0, global_step=tokens)
                tb.add_text(STAGE_BOUNDARY, f"stage **{self.stage}** starts {origin} at {tokens:,} tokens",
                            global_step=tokens)
        self.boundary_logged = True

    def _check_parent(self, init_from: str, tokenizer_sha: str | None, tokenizer_dir: str | Path | None = None) -> dict:
        path = Path(init_from)
        if is_hf_dir(path):  # a transformers model: its tokenizer's ids must mean the same in this stage's data
            if tokenizer_dir is not None:
                check_same_ids(path, tokenizer_dir)
            files = sorted([path / "config.json", *path.glob("*.safetensors")])
            digest = hashlib.sha256("".join(file_sha256(f) for f in files).encode()).hexdigest()
            return {"path": str(path), "sha256": digest, "stage": None, "tokens": 0, "optimizer_steps": 0}
        hint = "run the earlier stage first or point --model.init_args.init_from at a .ckpt written by `stagewise fit`"
        record = checked_record(path) if path.is_file() else None
        parent_sha = (record or {}).get("tokenizer_sha256")
        if parent_sha is None:  # no record (a checkpoint from elsewhere): its hyperparameters say it
            ckpt = read_checkpoint(path, hint, prefix="init_from: ")
            parent_sha = (ckpt.get("hyper_parameters") or {}).get("tokenizer_sha256")
        record = record or {}
        if parent_sha and tokenizer_sha and parent_sha != tokenizer_sha:
            raise TokenizerMismatchError(
                f"'{init_from}' was trained with tokenizer {parent_sha[:12]}…, but this stage's data uses "
                f"tokenizer {tokenizer_sha[:12]}…; token ids would mean different things. Start this stage "
                "from a checkpoint trained on data prepared with the same tokenizer, or re-prepare the data "
                "with the parent's tokenizer (`tokenizer.from_dir` in the data config) and re-run the stages."
            )
        return {
            "path": str(path),
            "sha256": file_sha256(path),
            "stage": record.get("stage") or stage_of_checkpoint(path),
            "tokens": (record.get("tokens") or {}).get("total"),
            "optimizer_steps": (record.get("optimizer_steps") or {}).get("total"),
            "domains": lineage_domains(record),
        }

    # ------------------------------------------------------------------------------------- curves
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._first_step is None and trainer.global_step > 0:  # compiled and stepped once: the clock of record
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize(pl_module.device)
            self._first_step = (time.perf_counter(), int(getattr(pl_module, "tokens_seen", 0)))
            self._peak_flops = device_peak_flops(pl_module.device, precision_label(trainer))
            self._device = (torch.cuda.get_device_name(pl_module.device) if pl_module.device.type == "cuda"
                            else pl_module.device.type)
        every = self.log_every_n_steps or trainer.log_every_n_steps or 50
        step = trainer.global_step
        if not trainer.is_global_zero or step % every or step == self._last_train_log:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        self._last_train_log = step
        for tb in _tensorboards(trainer):
            tb.add_scalar(TRAIN_TOKENS_LOSS, float(loss), global_step=_total_tokens(trainer, pl_module))

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._first_step is not None and not trainer.sanity_checking and trainer.state.fn == "fit":
            if pl_module.device.type == "cuda":  # the training steps still queued are training time
                torch.cuda.synchronize(pl_module.device)
            self._paused_at = time.perf_counter()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._paused_at is not None:  # validation, what callbacks did after it, checkpoint saving: over
            self._between_s += time.perf_counter() - self._paused_at
            self._paused_at = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        losses = _val_losses(trainer)
        if trainer.is_global_zero:
            tokens = _total_tokens(trainer, pl_module)
            for tb in _tensorboards(trainer):
                for domain, loss in losses.items():
                    tb.add_scalar(val_tokens_loss(domain), loss, global_step=tokens)
        self.val_history[str(trainer.global_step)] = losses
        metrics = _val_metrics(trainer)
        if metrics:
            self.val_metrics_history[str(trainer.global_step)] = metrics

    def _best_checkpoint_callback(self, trainer: L.Trainer) -> ModelCheckpoint | None:
        best = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, BestCheckpoint) and cb.stage == self.stage]
        if best:
            return best[0]
        for cb in trainer.checkpoint_callbacks:
            if cb.dirpath and cb.filename and Path(cb.dirpath, cb.filename + cb.FILE_EXTENSION) == self.best_path:
                return cb
        return next((cb for cb in trainer.checkpoint_callbacks if cb.monitor), None)

    # ------------------------------------------------------------------------------------- fit end
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._train_end = time.perf_counter()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        cb = self._best_checkpoint_callback(trainer)
        best = Path(cb.best_model_path) if cb is not None and cb.best_model_path else None
        if best is None or not best.exists():
            rank_zero_warn(f"StageHandoff: no best checkpoint for stage '{self.stage}' (no validation ran?); "
                           f"saving the final weights as {self.best_path}")
            trainer.save_checkpoint(self.best_path)  # collective under sharded strategies: every rank calls it
            best = self.best_path
        # Collective in Lightning 2.6 (a broadcast under DDP): every rank reads it before rank 1 returns.
        log_dir = trainer.log_dir
        if not trainer.is_global_zero:
            return
        if best.resolve() != self.best_path.resolve():
            _copy_atomic(best, self.best_path)
        if self.export_hf:
            self._export(trainer)
        record = update_stage_record(self.models_dir, self.stage, self.record(trainer, pl_module, log_dir))
        rank_zero_info(f"StageHandoff: {self.best_path} + {Path(self.models_dir) / self.stage / 'stage.json'} "
                       f"({record['tokens']['total']:,} tokens in the lineage)")

    def _export(self, trainer: L.Trainer) -> None:
        tokenizer_dir = getattr(trainer.datamodule, "tokenizer_dir", None)
        export_hf(str(self.best_path), str(Path(self.models_dir) / self.stage / "hf"), tokenizer_dir=tokenizer_dir)

    def record(self, trainer: L.Trainer, pl_module: L.LightningModule, log_dir: str | None = None) -> dict:
        """The keys of ``stage.json`` this callback owns (``log_dir``: the run's, where LightningCLI saved
        ``config.yaml``; read on every rank before, as reading ``trainer.log_dir`` is collective).

        ``tokens`` and ``optimizer_steps`` describe the best checkpoint (``stage``: in this stage, ``total``:
        in its whole lineage; the next stage counts on from ``total``); ``trained`` is what this stage
        trained in all, up to its last step. ``last_checkpoint`` is the path of the stage's ``last.ckpt`` (its
        full training state, optimizer included), absent when the run keeps none.
        """
        trained_tokens = int(getattr(pl_module, "tokens_seen", 0))
        trained_steps = int(getattr(pl_module, "optimizer_steps", trainer.global_step))
        parent = self.parent or {}
        parent_tokens = int(getattr(pl_module, "parent_tokens", parent.get("tokens") or 0))
        parent_steps = int(getattr(pl_module, "parent_optimizer_steps", parent.get("optimizer_steps") or 0))
        saved = torch.load(self.best_path, map_location="cpu", mmap=True, weights_only=False)
        counters = {k: int(v) for k, v in (saved.get("stagewise") or {}).items()}
        tokens = counters.get("tokens_seen", trained_tokens)
        steps = counters.get("optimizer_steps", trained_steps)
        best_step = int(saved.get("global_step", trainer.global_step))
        final = _val_losses(trainer)
        if not final and self.val_history:  # a resumed run that ended before its first validation
            final = dict(self.val_history[max(self.val_history, key=int)])
        best = self.val_history.get(str(best_step))
        if best is None:
            rank_zero_warn(f"StageHandoff: no validation at step {best_step}, where {self.best_path} was saved; "
                           "recording the final losses as its losses")
        domain = getattr(trainer.datamodule, "corpus", None)
        trained = [domain] + list(getattr(trainer.datamodule, "mixture_fractions", None) or {}) if domain else []
        record = {
            "stage": self.stage,
            "experiment": self.experiment or _experiment_name(trainer),
            "domain": domain,
            # the domains the lineage has trained on, through this stage: the next stage validates on them
            "domains": list(dict.fromkeys(parent.get("domains", []) + trained)),
            "checkpoint": {"path": str(self.best_path), "sha256": file_sha256(self.best_path)},
            "parent": {k: parent[k] for k in ("path", "sha256", "stage")} if self.parent else None,
            "tokenizer_sha256": _hparam(pl_module, "tokenizer_sha256"),
            "chat_template_sha256": _hparam(pl_module, "chat_template_sha256"),
            "tokens": {"stage": tokens, "total": parent_tokens + tokens, "trained": trained_tokens},
            "optimizer_steps": {"stage": steps, "total": parent_steps + steps, "trained": trained_steps},
            "wall_time_s": round(self.wall_time_s(), 3),
            "losses": {"final": final, "best": best if best is not None else final},
            "best_step": best_step,
            "precision": precision_label(trainer),
            "throughput": self.throughput(trainer, pl_module),
            "config": _resolved_config(trainer, pl_module, log_dir),
            # window fractions of the training mixture (replay / joint), when the data module mixes domains
            "replay": getattr(trainer.datamodule, "mixture_fractions", None),
            # the checkpoint whose AdamW state the stage started from (CausalLM's carry_optimizer), else null
            "optimizer_from": getattr(pl_module, "optimizer_from", None),
            # the text domains' validation window: the next stage validates on the same (see CorpusDataModule)
            "val_seq_len": getattr(trainer.datamodule, "val_seq_len", None) or getattr(trainer.datamodule, "seq_len", None),
            # and on as many of each domain's held-out windows (None: all of them)
            "val_max_windows": getattr(trainer.datamodule, "val_max_windows", None),
        }
        if self.val_metrics_history:  # e.g. val/preference/reward_accuracy: at the best checkpoint and at the end
            last_step = max(self.val_metrics_history, key=int)
            record["val_metrics"] = {"final": self.val_metrics_history[last_step],
                                     "best": self.val_metrics_history.get(str(best_step),
                                                                          self.val_metrics_history[last_step])}
        last = _last_checkpoint(trainer)
        if last is not None:
            record["last_checkpoint"] = str(last)
        return record

    def throughput(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict | None:
        """End-to-end speed of this run of the stage: tokens trained after its first optimizer step (compilation
        and warm-up left out) over the wall time from then to the end of training (validation, tool evaluation and
        checkpoint saving included; the handoff's copy and transformers export after it not), and the MFU that makes on the running device (None off a known GPU).

        ``validation_s`` is the part of ``seconds`` from each validation's start to the next training batch (or
        the end of training): the validation loop, what callbacks do at its end (``ToolCallEval``'s decoding,
        ``TextSamples``), checkpoint saving there; ``training_tokens_per_s`` the rate over the rest."""
        if self._first_step is None:
            return None
        end = self._train_end or time.perf_counter()
        seconds = end - self._first_step[0]
        between = self._between_s + (end - self._paused_at if self._paused_at is not None else 0.0)
        tokens = int(getattr(pl_module, "tokens_seen", 0)) - self._first_step[1]
        if seconds <= 0 or tokens <= 0:
            return None
        rate = tokens / seconds
        peak = self._peak_flops
        seq_len = getattr(trainer.datamodule, "seq_len", None)
        utilisation = round(mfu(rate, trainer.world_size, model_shape(pl_module), seq_len, peak), 4) \
            if peak and seq_len else None
        return {"tokens_per_s": round(rate), "mfu": utilisation, "tokens": tokens, "seconds": round(seconds, 2),
                "validation_s": round(between, 2),
                "training_tokens_per_s": round(tokens / (seconds - between)) if seconds > between else None,
                "devices": trainer.world_size, "device": self._device, "seq_len": seq_len}

    def wall_time_s(self) -> float:
        """Seconds spent in fit for this stage, over every resume."""
        return self._wall_before + (time.perf_counter() - self._t0 if self._t0 is not None else 0.0)

    # ------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "val_history": dict(self.val_history),
            "val_metrics_history": dict(self.val_metrics_history),
            "parent": self.parent,
            "boundary_logged": self.boundary_logged,
            "wall_time_s": self.wall_time_s(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.val_history = dict(state_dict.get("val_history") or {})
        self.val_metrics_history = dict(state_dict.get("val_metrics_history") or {})
        self.parent = state_dict.get("parent")
        self.boundary_logged = bool(state_dict.get("boundary_logged"))
        self._wall_before = float(state_dict.get("wall_time_s") or 0.0)  # _t0 stays: FSDP restores after on_fit_start


# ----------------------------------------------------------------------------------------- helpers
def _hparam(pl_module: L.LightningModule, name: str) -> Any:
    return pl_module.hparams.get(name) if hasattr(pl_module.hparams, "get") else getattr(pl_module.hparams, name, None)


def _total_tokens(trainer: L.Trainer, pl_module: L.LightningModule) -> int:
    """The lineage's tokens so far (``CausalLM.total_tokens``); optimizer steps for modules without it."""
    return int(getattr(pl_module, "total_tokens", trainer.global_step))


def _tensorboards(trainer: L.Trainer) -> list:
    return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


def _val_losses(trainer: L.Trainer) -> dict[str, float]:
    """``val/<domain>/loss`` of the latest validation, by domain (finite values only), in validation order."""
    losses = val_losses(trainer.callback_metrics)
    domains = getattr(trainer.datamodule, "val_domains", None) or []
    return {d: losses[d] for d in domains if d in losses} | losses


def _val_metrics(trainer: L.Trainer) -> dict[str, float]:
    """The latest validation's ``val/<domain>/<what>`` scalars other than losses and perplexities (a preference
    stage's reward accuracy and margin), by name (finite values only)."""
    out = {}
    for name, value in trainer.callback_metrics.items():
        if domain_of_val_loss(name, metric=None) is None or name.endswith(("/loss", "/ppl")):
            continue
        if (not hasattr(value, "numel") or value.numel() == 1) and math.isfinite(float(value)):
            out[name] = float(value)
    return out


def _experiment_name(trainer: L.Trainer) -> str | None:
    return trainer.logger.name if trainer.logger is not None else None


def _last_checkpoint(trainer: L.Trainer) -> Path | None:
    """The ``last.ckpt`` a checkpoint callback with ``save_last`` wrote in this run, if one did."""
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.last_model_path and Path(cb.last_model_path).is_file():
            return Path(cb.last_model_path)
    return None


def _resolved_config(trainer: L.Trainer, pl_module: L.LightningModule, log_dir: str | None) -> dict:
    """The LightningCLI config saved in ``log_dir`` (complete and runnable), else the hyperparameters."""
    import yaml

    if log_dir:
        path = Path(log_dir) / "config.yaml"
        if path.exists():
            return yaml.safe_load(path.read_text()) or {}
    config = {"model": {"class_path": type(pl_module).__qualname__, "init_args": dict(pl_module.hparams)}}
    if trainer.datamodule is not None:
        config["data"] = {"class_path": type(trainer.datamodule).__qualname__,
                          "init_args": dict(getattr(trainer.datamodule, "hparams", {}) or {})}
    return config


def _copy_atomic(src: Path, dst: Path) -> None:
    with atomic_path(dst, durable=True) as tmp:
        shutil.copyfile(src, tmp)
