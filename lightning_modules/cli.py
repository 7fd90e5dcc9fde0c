"""The `stagewise` command.

``stagewise fit|validate|test`` is a LightningCLI: ``configs/base.yaml`` first (without being
named), then the ``-c`` YAML files in order, then any init argument from the command line
(``--model.init_args.lr 1e-4``); ``--print_config`` prints a complete runnable config. Each run is a stage
(the ``stage:`` section, :mod:`lightning_modules.stage`), from which its files, callbacks, data domains
and starting weights follow. The other subcommands (``prepare``, ``export``, ``pipeline``...) are
jsonargparse commands in the same style. A problem the user can fix (``StagewiseError``) prints one
message and exits with status 2, without a traceback; SIGTERM and SIGINT stop any command with one line
and status 143 / 130 (``datamodules.signals``). Class paths may name modules of the working directory
(``--model experiments.examples.label_smoothing.LabelSmoothingLM``, ``--model mymodule.MyLM``), from the
console script as from ``python -m lightning_modules``.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
from argparse import ArgumentError
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
from jsonargparse import ActionYesNo
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

import callbacks  # noqa: F401  (registers our callbacks so configs may name them by class name)
from callbacks import FinalMetricsToHparams
from callbacks.precision import resolve_precision
from callbacks.safety import AtomicCheckpointIO, LastCheckpoint, PreemptionCheck
from datamodules.datamodule import CorpusDataModule
from datamodules.errors import StagewiseError, argument_error
from datamodules.signals import Stopped, received, stopping_on_signals
from datamodules.stage_record import read_checkpoint
from lightning_modules.causal_lm import CausalLM, shape_mismatch, trained_shape
from lightning_modules.stage import BASE_CONFIG, SECTIONS, Stage, apply_stage

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test")
# Lightning's `predict` needs a predict set, which a language-model stage has none of; what it would do here
# (continue prompts) is `stagewise generate`, with the checkpoint's tokenizer and chat template.
NO_PREDICT = ("`stagewise predict` has nothing to predict: a stage has no predict set. Continue prompts with "
              "`stagewise generate --ckpt <checkpoint> --prompt ...` (the checkpoint's tokenizer and chat template); "
              "score the held-out splits with `stagewise test` (test split) or `stagewise evaluate`")
# The one line after a stop by a signal, per command: what is left and what to do.
AFTER_STOP = {
    "fit": "a run that had trained a step kept its last.ckpt: continue it with the same command and --ckpt_path last",
    "pipeline": "run the pipeline again: finished stages are skipped and the stopped one resumes from its last.ckpt",
    "prepare": "files being written were left as they were: run it again",
}

# name -> (module, function, one-line help). Each function parses its own arguments.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "prepare": ("datamodules.prepare", "main", "corpora -> tokenizer -> token shards"),
    "pack": ("datamodules.pack", "main_pack", "a prepared data dir -> xz pieces of at most N MB, to carry"),
    "unpack": ("datamodules.pack", "main_unpack", "check and extract the pieces of `stagewise pack`"),
    "export": ("lightning_modules.export", "main", "checkpoint -> complete transformers directory (model + tokenizer)"),
    "pipeline": ("lightning_modules.pipeline", "main", "prepare + every stage + joint baseline + report"),
    "evaluate": ("lightning_modules.evaluate", "main", "per-domain losses and tool-call scores of a checkpoint"),
    "generate": ("lightning_modules.generate", "main", "a prompt in, the model's text out (.ckpt or export)"),
    "report": ("lightning_modules.report", "main", "markdown table and plots from finished runs"),
    "interpolate": ("lightning_modules.interpolate", "main", "blend two checkpoints' weights and evaluate"),
    "pairs": ("lightning_modules.pairs", "main", "preference pairs for DPO from a checkpoint's own wrong tool calls"),
}


class StagewiseCLI(LightningCLI):
    """LightningCLI in which every run is a stage: the ``stage:`` section decides where its files go, its
    callbacks' stage, its data domains and starting weights (:func:`lightning_modules.stage.apply_stage`).

    Every stage also gets ``--best_checkpoint.*`` (``callbacks.BestCheckpoint``), ``--handoff.*``
    (``callbacks.StageHandoff``), ``--forgetting.*`` (``callbacks.ForgettingMonitor``), ``last.ckpt`` kept by
    ``--last_checkpoint.*`` for ``--ckpt_path last``, SIGTERM checks every ``--preemption_check.every_n_steps``
    steps in multi-process runs instead of a GPU sync before every step, and atomic checkpoint writes. The
    data's vocabulary and tokenizer are linked into the model. ``fit`` refuses to replace an earlier run of
    its stage unless resuming (``--ckpt_path``) or given ``--overwrite``.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(Stage, "stage")
        for key, cls in SECTIONS.items():
            parser.add_lightning_class_args(cls, key)
        parser.add_lightning_class_args(LastCheckpoint, "last_checkpoint")
        parser.add_lightning_class_args(PreemptionCheck, "preemption_check")
        parser.add_argument(
            "--overwrite", action=ActionYesNo, default=False,
            help="Start this stage afresh even where an earlier run of it exists: its run directory is moved aside "
                 "(<stage>.<time>), its best checkpoint and record are removed. Without it such a fit refuses to start.",
        )
        # The model's embedding size and tokenizer check come from the prepared data, never by hand.
        parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.tokenizer_sha256", "model.init_args.tokenizer_sha256", apply_on="instantiate")
        parser.link_arguments("data.chat_template_sha256", "model.init_args.chat_template_sha256",
                              apply_on="instantiate")
        # `precision: auto` (resolved in before_instantiate_classes): widen the Trainer's Literal type.
        action = next(a for a in parser._actions if a.dest == "trainer.precision")
        action._typehint = Optional[Union[action._typehint, Literal["auto"]]]
        action.default = "auto"

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then point ``--ckpt_path last`` (and ``best`` of ``validate``/``test``) at this stage's file,
        so Lightning reads the model's hyperparameters from it as from any checkpoint path: a run resumes, or is
        scored, with the shape it was trained with."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else None
        if config is None or config.get("ckpt_path") not in ("last", "best"):
            return
        if config.ckpt_path == "best" and subcommand != "fit":
            stage = Stage(**config.stage)
            best = stage.outputs.best_checkpoint
            if not best.is_file():  # Lightning's own "best" would fail with a traceback about ModelCheckpoint
                raise StagewiseError(
                    f"--ckpt_path best names {best}, which does not exist: stage '{stage.name}' of experiment "
                    f"'{stage.experiment}' has not finished here (pass --stage.experiment, or the checkpoint's path)")
            config.ckpt_path = str(best)
            return
        dirpath = config.get("last_checkpoint.dirpath")
        directory = Path(dirpath) if dirpath else Stage(**config.stage).outputs.run_dir / "checkpoints"
        lasts = sorted(directory.glob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
        if config.ckpt_path == "last" and lasts:
            config.ckpt_path = str(lasts[-1])

    def before_instantiate_classes(self) -> None:
        """Apply the stage to the config; give a data module that takes a ``parent`` (the preference pairs')
        the model's ``init_from``; resolve ``trainer.precision: auto`` to bf16-mixed / 16-mixed / 32-true."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        self.stage = Stage(**config.stage)
        if self.subcommand in ("validate", "test") and not config.get("ckpt_path"):
            raise StagewiseError(
                f"`stagewise {self.subcommand}` scores a trained checkpoint: pass --ckpt_path <file.ckpt>, or "
                f"--ckpt_path best for this stage's best ({self.stage.outputs.best_checkpoint})")
        apply_stage(config, self.stage, self.subcommand or "fit", resuming=bool(config.get("ckpt_path")))
        _link_parent(config)
        trainer = config.trainer
        if trainer.get("plugins") and trainer.precision == "auto":
            trainer.precision = None  # a precision plugin (e.g. Float8MixedPrecision) chooses instead
        elif trainer.precision == "auto":
            trainer.precision = resolve_precision("auto", trainer.accelerator)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The Trainer, with :class:`~callbacks.safety.AtomicCheckpointIO` unless the config names a CheckpointIO."""
        plugins = self._get(self.config_init, "trainer", default={}).get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        return super().instantiate_trainer(plugins=plugins, **kwargs)

    def before_fit(self) -> None:
        """Check ``--ckpt_path`` points at a checkpoint this model can resume, or that this fit replaces no
        earlier run of its stage (with ``--overwrite``: move that run aside first), before anything is written."""
        self._run_before = _Before(self.stage.outputs.run_dir)
        if self.trainer.global_rank != 0:  # ranks started by the DDP launcher: rank 0 checked already
            return
        config = self.config[self.subcommand]
        if config.get("ckpt_path"):
            _check_resume_path(self.trainer, str(config.ckpt_path))
            _check_resumable(self.model, str(config.ckpt_path))
        else:
            _check_not_overwriting(self.trainer, self.stage, bool(config.get("overwrite")))

    def fit(self, **kwargs: Any) -> None:
        """``trainer.fit``. A fit that fails or is stopped before its first optimizer step leaves nothing in its
        run directory (nothing of it could be resumed): no config, no empty TensorBoard run."""
        try:
            self.trainer.fit(**kwargs)
        except BaseException:
            if self.trainer.global_step == 0 and self.trainer.is_global_zero:
                self._run_before.remove_new()
            raise


class _Before:
    """What a run directory held before a fit (and which of it and its parents existed), so that what the fit
    added can be taken away again."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.contents = _contents(run_dir)
        self.created = [d for d in (run_dir, run_dir.parent, run_dir.parent.parent) if not d.exists()]

    def remove_new(self) -> None:
        """Remove what appeared in the run directory since, then the directories created since, if empty."""
        for path in sorted(_contents(self.run_dir) - self.contents, key=lambda p: len(p.parts), reverse=True):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        for folder in self.created:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


def _contents(directory: Path) -> set[Path]:
    return set(directory.rglob("*")) if directory.is_dir() else set()


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


class SaveStageConfig(SaveConfigCallback):
    """Writes the run's complete config (the stage applied) to ``config.yaml`` in its run directory. A resumed
    run keeps the config the run started with and writes its own beside it, ``config.resume<k>.yaml``."""

    def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        log_dir = trainer.log_dir
        if not self.already_saved and self.config.get("ckpt_path") and log_dir:
            k = 1
            while Path(log_dir, f"config.resume{k}.yaml").exists():
                k += 1
            if Path(log_dir, self.config_filename).exists():
                self.config_filename = f"config.resume{k}.yaml"
        super().setup(trainer, pl_module, stage)


def _last_dirs(trainer: Trainer) -> list[Path]:
    return [Path(cb.dirpath) if cb.dirpath else Path(trainer.default_root_dir) / "checkpoints"
            for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.save_last]


def _check_resume_path(trainer: Trainer, ckpt_path: str) -> None:
    if ckpt_path == "last":
        dirs = _last_dirs(trainer)
        if not any(any(d.glob("last*.ckpt")) for d in dirs):
            where = ", ".join(map(str, dirs)) or "any checkpoint directory"
            raise StagewiseError(f"--ckpt_path last: no last.ckpt under {where}; start without --ckpt_path")
    elif ckpt_path not in ("best", "hpc", "registry") and "://" not in ckpt_path and not Path(ckpt_path).is_file():
        raise StagewiseError(f"--ckpt_path {ckpt_path}: no such checkpoint; pass an existing .ckpt, `last`, or start "
                             "without --ckpt_path")


def _check_resumable(module: Any, ckpt_path: str) -> None:
    """Refuse a checkpoint this fit cannot continue: one without the training state (a weights-only best
    checkpoint), or one whose model has another shape than this config's."""
    if not Path(ckpt_path).is_file():  # hpc, registry, a URL: Lightning resolves them
        return
    ckpt = read_checkpoint(ckpt_path, "resume from the run's last.ckpt (--ckpt_path last)", prefix="--ckpt_path: ")
    if not ckpt.get("optimizer_states"):
        raise StagewiseError(
            f"--ckpt_path {ckpt_path} holds weights only (a stage's best checkpoint), not the training state a fit "
            "resumes from: continue the run from its last.ckpt (--ckpt_path last), or start a new stage from these "
            "weights with --model.init_args.init_from")
    if not isinstance(module, CausalLM):
        return
    with torch.device("meta"):
        expected = {f"model.{k}": v for k, v in module.build_model().state_dict().items()}
    problem = shape_mismatch(expected, {k: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")})
    if problem:
        hparams = ckpt.get("hyper_parameters")
        trained = f"The run was trained with {trained_shape(hparams)}: resume" if hparams else "Resume"
        raise StagewiseError(
            f"--ckpt_path {ckpt_path} has another model shape than this config gives: {problem}. {trained} it with "
            "the same model settings (the run's config.yaml has them all: stagewise fit -c <run dir>/config.yaml "
            "--ckpt_path last)")


def _check_not_overwriting(trainer: Trainer, stage: Stage, overwrite: bool) -> None:
    """Refuse a fresh fit where an earlier run of the stage left files (run directory, best checkpoint,
    record, a ``last.ckpt``); with ``overwrite``, move that run aside and remove the rest, so nothing of it
    mixes into this one and a later ``--ckpt_path last`` cannot resume it."""
    out = stage.outputs
    lasts = [p for d in _last_dirs(trainer) for p in d.glob("last*.ckpt") if not p.is_relative_to(out.run_dir)]
    taken = out.claimed() + lasts
    if not taken:
        return
    if not overwrite:
        raise StagewiseError(
            f"stage '{stage.name}' of experiment '{stage.experiment}' has run before: {', '.join(map(str, taken))}. "
            "Resume that run with --ckpt_path last, start it over with --overwrite (the old run directory is moved "
            f"aside to {out.run_dir}.<time>), or run this one as another --stage.name or --stage.experiment"
        )
    for last in lasts:
        last.unlink()
    aside = out.start_over()
    if aside is not None:
        print(f"stagewise fit: the earlier run of stage '{stage.name}' was moved to {aside}", file=sys.stderr)


def strategy_from_config(path: str | Path):
    """The Trainer strategy a config file's ``trainer.strategy`` describes (e.g. ``configs/strategies/fsdp.yaml``),
    built as ``stagewise fit -c <path>`` builds it, without a Trainer."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import Strategy

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--trainer.strategy", type=Strategy)
    return parser.instantiate_classes(parser.parse_path(str(path))).trainer.strategy


def persistent_callbacks() -> list:
    """Callbacks every stage gets in addition to its config's and its sections': the run's settings and final
    losses in the HPARAMS tab (``CausalLM`` logs the LR)."""
    return [FinalMetricsToHparams()]


def run_lightning(args: list[str] | None = None, run: bool = True) -> StagewiseCLI:
    """Run a LightningCLI subcommand (``fit``, ``validate``, ``test``, ``predict``); with ``run=False``, only
    build the stage's model, data and Trainer from ``args`` (no subcommand) and return the CLI."""
    subcommand_kwargs = {"exit_on_error": False, "default_config_files": [str(BASE_CONFIG)]}
    parser_kwargs = {name: subcommand_kwargs for name in LIGHTNING_SUBCOMMANDS} if run else subcommand_kwargs
    return StagewiseCLI(
        CausalLM,
        CorpusDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        seed_everything_default=1234,
        # Our samplers split data across ranks themselves (deterministic and resumable).
        trainer_defaults={"use_distributed_sampler": False, "callbacks": persistent_callbacks()},
        save_config_callback=SaveStageConfig,
        save_config_kwargs={"overwrite": True},
        # Parse errors raise ArgumentError (reported in one paragraph by `main`) instead of printing the usage.
        parser_kwargs={"exit_on_error": False, **parser_kwargs},
        args=args,
        run=run,
    )


def _usage() -> str:
    lines = ["usage: stagewise <command> [-h] ...", "", "commands:"]
    for name in LIGHTNING_SUBCOMMANDS:
        lines.append(f"  {name:<12} Lightning {name} (LightningCLI: -c stage.yaml -c model.yaml, --print_config)")
    lines.append(f"  {'predict':<12} none: see `stagewise generate` (prompts) and `stagewise test` (held-out scores)")
    for name, (_, _, help_) in COMMANDS.items():
        lines.append(f"  {name:<12} {help_}")
    return "\n".join(lines)


def import_from_working_directory() -> None:
    """Put the working directory on ``sys.path`` as ``python -m`` does, so class paths may name its modules
    (``experiments.*``, a user's ``mymodule.MyLM``): a console script's path starts with its own bin/."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def main(argv: list[str] | None = None) -> None:
    """Dispatch ``stagewise <command> ...``."""
    import_from_working_directory()
    from_sys = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        raise SystemExit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    with stopping_on_signals():
        try:
            _run(command, rest, from_sys)
        except Stopped as stop:
            _report_stop(command, stop.signum)
        except SystemExit:  # Lightning's SIGTERMException, after a fit stopped at a safe point on a signal
            if received() is None:
                raise
            _report_stop(command, received())
        if received() is not None:  # signalled when nothing could stop any more (a fit's last batch)
            _report_stop(command, received())


def _report_stop(command: str, signum: int) -> None:
    stop = Stopped(signum)
    after = AFTER_STOP.get(command)
    print(f"stagewise {command}: stopped by {stop.name}" + (f"; {after}" if after else ""), file=sys.stderr)
    raise SystemExit(stop.exit_status) from None


def _run(command: str, rest: list[str], from_sys: bool) -> None:
    """Run one command; a ``StagewiseError`` becomes one paragraph and exit status 2."""
    try:
        if command == "predict":
            raise StagewiseError(NO_PREDICT)
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
