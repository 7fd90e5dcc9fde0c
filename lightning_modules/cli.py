"""The `stagewise` command.

``stagewise fit|validate|test|predict`` is a LightningCLI: compose several ``-c`` YAML files, override
any init argument from the command line (``--model.lr 1e-4``), ``--print_config`` for a complete
runnable config. The other subcommands (``prepare``, ``export``, ``pipeline``...) are jsonargparse
commands in the same style. A problem the user can fix (``StagewiseError``) prints one message and
exits with status 2, without a traceback.
"""

from __future__ import annotations

import importlib
import sys
from argparse import ArgumentError
from pathlib import Path
from typing import Any, Literal, Optional, Union

from jsonargparse import ActionYesNo
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from datamodules.errors import StagewiseError, argument_error

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")

# name -> (module, function, one-line help). Each function parses its own arguments.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "prepare": ("datamodules.prepare", "main", "corpora -> tokenizer -> token shards"),
    "export": ("lightning_modules.export", "main", "checkpoint -> transformers LlamaForCausalLM directory"),
    "pipeline": ("lightning_modules.pipeline", "main", "prepare + every stage + joint baseline + report"),
    "evaluate": ("lightning_modules.evaluate", "main", "per-domain losses and tool-call scores of a checkpoint"),
    "report": ("lightning_modules.report", "main", "markdown table and plots from finished runs"),
    "interpolate": ("lightning_modules.interpolate", "main", "blend two checkpoints' weights and evaluate"),
    "pairs": ("lightning_modules.pairs", "main", "preference pairs for DPO from a checkpoint's own wrong tool calls"),
}


class StagewiseCLI(LightningCLI):
    """LightningCLI with the data's vocabulary and tokenizer linked into the model, and safety nets.

    Every checkpoint is written atomically (``callbacks.safety.AtomicCheckpointIO``); ``last.ckpt`` is kept
    by ``--last_checkpoint.*`` (``callbacks.safety.LastCheckpoint``) for ``--ckpt_path last``; multi-process runs
    check for SIGTERM every ``--preemption_check.every_n_steps`` steps (``callbacks.safety.PreemptionCheck``)
    instead of syncing with the GPU before every step; ``fit``
    refuses to write into a run directory or best checkpoint of another run unless resuming
    (``--ckpt_path``) or given ``--overwrite``.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        from callbacks.safety import LastCheckpoint, PreemptionCheck

        parser.add_lightning_class_args(LastCheckpoint, "last_checkpoint")
        parser.add_lightning_class_args(PreemptionCheck, "preemption_check")
        parser.add_argument(
            "--overwrite", action=ActionYesNo, default=False,
            help="Start this run even where its run directory already holds checkpoints or its best checkpoint "
                 "exists (both get replaced); without it such a fit refuses to start.",
        )
        # The model's embedding size and tokenizer check come from the prepared data, never by hand.
        parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.tokenizer_sha256", "model.init_args.tokenizer_sha256", apply_on="instantiate")
        # `precision: auto` (resolved in before_instantiate_classes): widen the Trainer's Literal type.
        action = next(a for a in parser._actions if a.dest == "trainer.precision")
        action._typehint = Optional[Union[action._typehint, Literal["auto"]]]
        action.default = "auto"

    def before_instantiate_classes(self) -> None:
        """Resolve ``trainer.precision: auto`` to bf16-mixed / 16-mixed / 32-true for this machine; give a data
        module that takes a ``parent`` (the preference pairs') the model's ``init_from``."""
        from callbacks.precision import resolve_precision

        config = self.config[self.subcommand] if self.subcommand else self.config
        _link_parent(config)
        trainer = config.trainer
        if trainer.get("plugins") and trainer.precision == "auto":
            trainer.precision = None  # a precision plugin (e.g. Float8MixedPrecision) chooses instead
        elif trainer.precision == "auto":
            trainer.precision = resolve_precision("auto", trainer.accelerator)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The Trainer, with :class:`~callbacks.safety.AtomicCheckpointIO` unless the config names a CheckpointIO."""
        from lightning.fabric.plugins import CheckpointIO

        from callbacks.safety import AtomicCheckpointIO

        plugins = self._get(self.config_init, "trainer", default={}).get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        return super().instantiate_trainer(plugins=plugins, **kwargs)

    def before_fit(self) -> None:
        """Check ``--ckpt_path`` points at a checkpoint, or that this fit overwrites no other run's files."""
        if self.trainer.global_rank != 0:  # ranks started by the DDP launcher: rank 0 checked already
            return
        config = self.config[self.subcommand]
        if config.get("ckpt_path"):
            _check_resume_path(self.trainer, str(config.ckpt_path))
        else:
            _check_not_overwriting(self.trainer, bool(config.get("overwrite")))


def _link_parent(config) -> None:
    """``data.init_args.parent`` follows ``model.init_args.init_from`` (one parent per stage): set when unset,
    refused when it names another checkpoint."""
    init_args, model = config.get("data.init_args"), config.get("model.init_args")
    if init_args is None or "parent" not in init_args:
        return
    init_from = model.get("init_from") if model is not None else None
    if init_args.parent is None:
        init_args.parent = init_from
    elif init_from and Path(init_args.parent).resolve() != Path(init_from).resolve():
        raise StagewiseError(f"data.init_args.parent ({init_args.parent}) and model.init_args.init_from ({init_from}) "
                             "name different checkpoints; the pairs must come from the model the stage starts from: "
                             "leave data.init_args.parent unset (it follows init_from)")


def _run_dir(trainer: Trainer) -> Path:
    """The run's directory ``<save_dir>/<experiment>/<version>`` (where Lightning puts ``checkpoints/``)."""
    if not trainer.loggers:
        return Path(trainer.default_root_dir)
    logger = trainer.loggers[0]
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return Path(logger.save_dir or trainer.default_root_dir, str(logger.name), version)


def _last_dirs(trainer: Trainer) -> list[Path]:
    return [Path(cb.dirpath) if cb.dirpath else _run_dir(trainer) / "checkpoints"
            for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.save_last]


def _check_resume_path(trainer: Trainer, ckpt_path: str) -> None:
    if ckpt_path == "last":
        dirs = _last_dirs(trainer)
        if not any(any(d.glob("last*.ckpt")) for d in dirs):
            fixed = bool(trainer.loggers) and isinstance(trainer.loggers[0].version, str)
            hint = "" if fixed else (" (the logger has no fixed version, so this run got a new directory: pass the "
                                     "path of the run's last.ckpt instead)")
            where = ", ".join(map(str, dirs)) or "any checkpoint directory"
            raise StagewiseError(f"--ckpt_path last: no last.ckpt under {where}{hint}; start without --ckpt_path")
    elif ckpt_path not in ("best", "hpc", "registry") and "://" not in ckpt_path and not Path(ckpt_path).is_file():
        raise StagewiseError(f"--ckpt_path {ckpt_path}: no such checkpoint; pass an existing .ckpt, `last`, or start "
                             "without --ckpt_path")


def _check_not_overwriting(trainer: Trainer, overwrite: bool) -> None:
    """Refuse a fresh fit whose run directory holds checkpoints or whose fixed-name checkpoints exist; with
    ``overwrite``, remove the old ``last.ckpt`` so a later ``--ckpt_path last`` cannot resume the old run."""
    run_dir = _run_dir(trainer)
    taken = sorted({*(run_dir / "checkpoints").glob("*.ckpt"), *(p for d in _last_dirs(trainer) for p in d.glob("last*.ckpt"))})
    for cb in trainer.callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath and cb.filename and "{" not in cb.filename:
            taken += [p for p in [Path(cb.dirpath, cb.filename + cb.FILE_EXTENSION)] if p.exists()]
        best = getattr(cb, "best_path", None)  # StageHandoff's models/<stage>_model_best.ckpt
        if isinstance(best, Path) and best.exists() and best not in taken:
            taken.append(best)
    if not taken:
        return
    if not overwrite:
        raise StagewiseError(
            f"this run would overwrite another run's checkpoints: {', '.join(map(str, taken))} (run directory "
            f"{run_dir}). Resume that run with --ckpt_path last, start over with --overwrite, or give this run "
            "another --trainer.logger.init_args.version (and its stage another best checkpoint name)"
        )
    for d in _last_dirs(trainer):
        for last in d.glob("last*.ckpt"):
            last.unlink()


def strategy_from_config(path: str | Path):
    """The Trainer strategy a config file's ``trainer.strategy`` describes (e.g. ``configs/strategies/fsdp.yaml``),
    built as ``stagewise fit -c <path>`` builds it, without a Trainer."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import Strategy

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--trainer.strategy", type=Strategy)
    return parser.instantiate_classes(parser.parse_path(str(path))).trainer.strategy


def persistent_callbacks() -> list:
    """Callbacks every stage gets in addition to its config's: the final losses in the HPARAMS tab
    (``last.ckpt`` comes from ``--last_checkpoint.*``; ``CausalLM`` logs the LR)."""
    from callbacks import FinalMetricsToHparams

    return [FinalMetricsToHparams()]


def run_lightning(args: list[str] | None = None) -> StagewiseCLI:
    """Run a LightningCLI subcommand (``fit``, ``validate``, ``test``, ``predict``)."""
    import callbacks  # noqa: F401  (registers our callbacks so configs may name them by class name)
    from datamodules.datamodule import CorpusDataModule
    from lightning_modules.causal_lm import CausalLM

    return StagewiseCLI(
        CausalLM,
        CorpusDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        seed_everything_default=1234,
        # Our samplers split data across ranks themselves (deterministic and resumable).
        trainer_defaults={"use_distributed_sampler": False, "callbacks": persistent_callbacks()},
        save_config_kwargs={"overwrite": True},
        # Parse errors raise ArgumentError (reported in one paragraph by `main`) instead of printing the usage.
        parser_kwargs={"exit_on_error": False, **{name: {"exit_on_error": False} for name in LIGHTNING_SUBCOMMANDS}},
        args=args,
    )


def _usage() -> str:
    lines = ["usage: stagewise <command> [-h] ...", "", "commands:"]
    for name in LIGHTNING_SUBCOMMANDS:
        lines.append(f"  {name:<12} Lightning {name} (LightningCLI: -c stage.yaml -c model.yaml, --print_config)")
    for name, (_, _, help_) in COMMANDS.items():
        lines.append(f"  {name:<12} {help_}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Dispatch ``stagewise <command> ...``."""
    from_sys = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        raise SystemExit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    try:
        if command in LIGHTNING_SUBCOMMANDS:
            run_lightning(None if from_sys else [command, *rest])  # None: LightningCLI reads sys.argv
        elif command in COMMANDS:
            module, function, _ = COMMANDS[command]
            try:
                entry = getattr(importlib.import_module(module), function)
            except ModuleNotFoundError as err:
                if err.name != module:
                    raise
                raise StagewiseError(f"`stagewise {command}` is not available in this version yet") from None
            entry(rest)
        else:
            print(f"stagewise: unknown command '{command}'\n\n{_usage()}", file=sys.stderr)
            raise SystemExit(2)
    except Exception as err:
        if isinstance(err, ArgumentError):  # an unknown option or a wrong type: one paragraph, not the usage
            err = argument_error(str(err), f"stagewise {command}")
        # jsonargparse wraps an error raised while instantiating a class (e.g. an unknown model size) in a
        # ValueError whose __cause__ is the original: report the user's error, not the wrapper.
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, StagewiseError):
            cause = cause.__cause__
        if cause is None:
            raise
        print(f"stagewise {command}: error: {cause}", file=sys.stderr)
        raise SystemExit(2) from None
