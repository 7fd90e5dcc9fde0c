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
from typing import Literal, Optional, Union

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from datamodules.errors import StagewiseError

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")

# name -> (module, function, one-line help). Each function parses its own arguments.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "prepare": ("datamodules.prepare", "main", "corpora -> tokenizer -> token shards"),
    "export": ("lightning_modules.export", "main", "checkpoint -> transformers LlamaForCausalLM directory"),
    "pipeline": ("lightning_modules.pipeline", "main", "prepare + every stage + joint baseline + report"),
    "evaluate": ("lightning_modules.evaluate", "main", "per-domain losses and tool-call scores of a checkpoint"),
    "report": ("lightning_modules.report", "main", "markdown table and plots from finished runs"),
    "interpolate": ("lightning_modules.interpolate", "main", "blend two checkpoints' weights and evaluate"),
}


class StagewiseCLI(LightningCLI):
    """LightningCLI with the data's vocabulary and tokenizer linked into the model."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The model's embedding size and tokenizer check come from the prepared data, never by hand.
        parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.tokenizer_sha256", "model.init_args.tokenizer_sha256", apply_on="instantiate")
        # `precision: auto` (resolved in before_instantiate_classes): widen the Trainer's Literal type.
        action = next(a for a in parser._actions if a.dest == "trainer.precision")
        action._typehint = Optional[Union[action._typehint, Literal["auto"]]]
        action.default = "auto"

    def before_instantiate_classes(self) -> None:
        """Resolve ``trainer.precision: auto`` to bf16-mixed / 16-mixed / 32-true for this machine."""
        from callbacks.precision import resolve_precision

        trainer = self.config[self.subcommand].trainer if self.subcommand else self.config.trainer
        if trainer.get("plugins") and trainer.precision == "auto":
            trainer.precision = None  # a precision plugin (e.g. Float8MixedPrecision) chooses instead
        elif trainer.precision == "auto":
            trainer.precision = resolve_precision("auto", trainer.accelerator)


def persistent_callbacks() -> list:
    """Callbacks every stage gets in addition to its config's: ``last.ckpt`` (for ``--ckpt_path last``)
    in the run's ``checkpoints/`` dir and the final losses in the HPARAMS tab (``CausalLM`` logs the LR)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from callbacks import FinalMetricsToHparams

    return [
        ModelCheckpoint(save_last=True, save_top_k=0),
        FinalMetricsToHparams(),
    ]


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
        # jsonargparse wraps an error raised while instantiating a class (e.g. an unknown model size) in a
        # ValueError whose __cause__ is the original: report the user's error, not the wrapper.
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, StagewiseError):
            cause = cause.__cause__
        if cause is None:
            raise
        print(f"stagewise {command}: error: {cause}", file=sys.stderr)
        raise SystemExit(2) from None
