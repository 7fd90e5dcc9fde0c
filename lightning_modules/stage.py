"""The stage: one object from which everything that must agree in a stage's run follows.

A stage config states its ``stage:`` section (name, domain, parent) and how it differs from
``configs/base.yaml``; ``StagewiseCLI`` then derives, before any class is built (:func:`apply_stage`):

- where its files go (:class:`Outputs`): the run ``<runs_dir>/<experiment>/<name>/`` (TensorBoard events,
  ``config.yaml``, ``checkpoints/last.ckpt``), the best checkpoint
  ``<models_dir>/<experiment>/<name>_model_best.ckpt`` and ``<models_dir>/<experiment>/<name>/``
  (``stage.json``, ``hf/``);
- the logger's ``save_dir``/``name``/``version``, and every stage callback's ``stage``, ``stage_domain``,
  ``models_dir`` and ``experiment`` init arguments (the best checkpoint's monitor is ``val/<domain>/loss``);
- the data's ``corpus`` (the domain) and ``val_domains`` (every domain of the lineage so far, read from the
  parent's ``stage.json``, then this stage's);
- ``model.init_from``: the parent's best checkpoint, checked against its record (and, with
  ``model.carry_optimizer``, that the parent's ``last.ckpt`` is there to carry its optimizer state from).

Precedence: an explicit ``--model.init_args.init_from`` beats ``stage.parent``; explicit
``data.val_domains`` and ``forgetting.domains`` beat the lineage's; the other derived values always
follow the stage (set them through ``--stage.*``).
"""

from __future__ import annotations

import importlib
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from callbacks import BestCheckpoint, ForgettingMonitor, StageHandoff
from datamodules.errors import StagewiseError
from datamodules.stage_record import BEST_SUFFIX, checked_record, lineage_domains, stage_record_for_checkpoint
from lightning_modules.causal_lm import optimizer_state_source
from lightning_modules.hf_llama import is_hf_dir

# What every stage shares, applied before its -c files (``configs/base.yaml`` of the checkout).
BASE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "base.yaml"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_EXPERIMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
RUN_CONTENTS = ("events.out.tfevents.*", "checkpoints", "config*.yaml", "hparams.yaml")


@dataclass(frozen=True)
class Outputs:
    """Where one stage of one experiment keeps its files; nothing of another experiment is under them.

    Args:
        name: The stage's name.
        experiment: The experiment's name.
        models_dir: Root of every experiment's checkpoints and stage records.
        runs_dir: Root of every experiment's TensorBoard runs.
    """

    name: str
    experiment: str = "default"
    models_dir: str | Path = "models"
    runs_dir: str | Path = "runs"

    @property
    def experiment_models(self) -> Path:
        """``<models_dir>/<experiment>``: the experiment's best checkpoints and stage records."""
        return Path(self.models_dir) / self.experiment

    @property
    def best_checkpoint(self) -> Path:
        """``<models_dir>/<experiment>/<name>_model_best.ckpt``: what the next stage starts from."""
        return self.experiment_models / f"{self.name}{BEST_SUFFIX}.ckpt"

    @property
    def record_dir(self) -> Path:
        """``<models_dir>/<experiment>/<name>/``: ``stage.json`` and the transformers export ``hf/``."""
        return self.experiment_models / self.name

    @property
    def run_dir(self) -> Path:
        """``<runs_dir>/<experiment>/<name>/``: TensorBoard events, ``config.yaml``, ``checkpoints/last.ckpt``."""
        return Path(self.runs_dir) / self.experiment / self.name

    def claimed(self) -> list[Path]:
        """The files of an earlier run of this stage that a fresh run would replace."""
        run = [self.run_dir] if holds_a_run(self.run_dir) else []
        return run + [p for p in (self.best_checkpoint, self.record_dir / "stage.json") if p.exists()]

    def start_over(self) -> Path | None:
        """Make room for a fresh run of the stage: move the earlier run directory aside (whole: events,
        config, hparams, checkpoints; returned) and remove the best checkpoint, the record and the export."""
        aside = None
        if holds_a_run(self.run_dir):
            stamp = time.strftime("%Y%m%d-%H%M%S")
            aside = self.run_dir.with_name(f"{self.name}.{stamp}")
            k = 1
            while aside.exists():
                aside, k = self.run_dir.with_name(f"{self.name}.{stamp}-{k}"), k + 1
            shutil.move(str(self.run_dir), str(aside))
        self.best_checkpoint.unlink(missing_ok=True)
        shutil.rmtree(self.record_dir, ignore_errors=True)
        return aside


def data_section(config: str | Path) -> dict[str, Any]:
    """The ``data:`` section (``class_path``, ``init_args``) ``stagewise fit -c <config>`` would build: the base
    config's, then ``config``'s (a new ``class_path`` keeps the init arguments given before it), with
    ``corpus`` the config's ``stage.domain``. For commands that read a stage config's data without a fit."""
    sections = [yaml.safe_load(Path(path).read_text()) or {} for path in (BASE_CONFIG, config) if Path(path).is_file()]
    data: dict[str, Any] = {"init_args": {}}
    for section in (s.get("data") or {} for s in sections):
        data["class_path"] = section.get("class_path", data.get("class_path"))
        data["init_args"].update(section.get("init_args") or {})
    domain = ((sections[-1] if sections else {}).get("stage") or {}).get("domain")
    if domain:
        data["init_args"]["corpus"] = domain
    return data


def holds_a_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds what a run writes (events, config, hparams, checkpoints), not only notes."""
    return run_dir.is_dir() and any(any(run_dir.glob(pattern)) for pattern in RUN_CONTENTS)


def is_run_dir_name(name: str) -> bool:
    """Whether a directory under ``<runs_dir>/<experiment>/`` is a stage's training run: stage names have no
    dot, while runs moved aside (``<stage>.<time>``) and evaluations (``<stage>.validate``) do."""
    return _NAME.fullmatch(name) is not None


@dataclass
class Stage:
    """One stage of an experiment: its files, its callbacks' stage, data domains and weights follow from it.

    A stage config states these fields under ``stage:`` (the README's "The stage").

    Args:
        name: The stage's name (letters, digits, ``_``, ``-``): its run is ``<runs_dir>/<experiment>/<name>/``,
            its best checkpoint ``<models_dir>/<experiment>/<name>_model_best.ckpt``, its record and export
            ``<models_dir>/<experiment>/<name>/``.
        domain: The prepared corpus it trains on (``data.corpus``); its held-out loss ``val/<domain>/loss``
            chooses the best checkpoint.
        parent: What the stage starts from: the name of a stage of the same experiment (its best checkpoint)
            or a checkpoint path; ``null``: from scratch. An explicit ``--model.init_args.init_from`` wins.
        experiment: The experiment the stage belongs to; experiments never share a file.
        models_dir: Root of the experiments' checkpoints and stage records.
        runs_dir: Root of the experiments' TensorBoard runs.
    """

    name: str
    domain: str
    parent: str | None = None
    experiment: str = "default"
    models_dir: str = "models"
    runs_dir: str = "runs"

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise StagewiseError(f"stage.name '{self.name}' must be letters, digits, '_' and '-' (it names files "
                                 "and directories); rename the stage")
        if not _EXPERIMENT.fullmatch(self.experiment):
            raise StagewiseError(f"stage.experiment '{self.experiment}' must be letters, digits, '_', '-' and '.' "
                                 "(it names directories); rename the experiment")
        if self.parent == self.name:
            raise StagewiseError(f"stage '{self.name}' names itself as its parent; name the stage it starts from")

    @property
    def outputs(self) -> Outputs:
        return Outputs(self.name, self.experiment, self.models_dir, self.runs_dir)

    @property
    def parent_is_stage(self) -> bool:
        """Whether ``parent`` names a stage of this experiment (a name has no ``/`` and no ``.``)."""
        return bool(self.parent) and _NAME.fullmatch(self.parent) is not None

    def parent_checkpoint(self) -> Path | None:
        """The checkpoint the stage starts from: a parent stage's best checkpoint, or the path given."""
        if not self.parent:
            return None
        if self.parent_is_stage:
            return Outputs(self.parent, self.experiment, self.models_dir, self.runs_dir).best_checkpoint
        return Path(self.parent)


# ----------------------------------------------------------------------------------------- derivation
# The callbacks every stage has, each a CLI section (``--handoff.export_hf false``), not a list entry.
SECTIONS = {"best_checkpoint": BestCheckpoint, "handoff": StageHandoff, "forgetting": ForgettingMonitor}


def apply_stage(config: Namespace, stage: Stage, subcommand: str, resuming: bool = False) -> None:
    """Fill in ``config`` (one LightningCLI subcommand's, before instantiation) from ``stage``.

    ``fit`` writes to the stage's run directory; ``validate``/``test``/``predict`` log to
    ``<runs_dir>/<experiment>/<name>.<subcommand>/version_<n>/`` and never touch a training run. A fresh
    ``fit`` (not ``resuming``) checks its parent before anything is written.
    """
    fitting = subcommand == "fit"
    _place_run(config.trainer, stage, subcommand)
    record = _start_from(config.model.get("init_args") or config.model, stage, fitting, check=fitting and not resuming)
    lineage = None if record is None else lineage_domains(record)  # None: no record, the lineage is unknown
    data = config.data.get("init_args") or config.data
    for key in ("val_seq_len", "val_max_windows"):  # a lineage's held-out losses: the same windows in every stage
        if key in data and data[key] is None and (record or {}).get(key):
            data[key] = record[key]
        elif fitting and key in data and key in (record or {}) and data[key] != record[key]:
            rank_zero_warn(f"stage '{stage.name}': data.{key}={data[key]} but its parent validated with "
                           f"{record[key]}: their held-out windows differ, so forgetting compares other windows")
    if record is not None and fitting:
        _warn_batch_limited_validation(config.trainer, stage)
    if "corpus" in data:
        data.corpus = stage.domain
    trained = [stage.domain] + (list(data.mixture) if isinstance(data.get("mixture"), (dict, Namespace)) else [])
    if "val_domains" in data and not data.val_domains and lineage is not None:  # unknown: the data module's default
        data.val_domains = list(dict.fromkeys(lineage + trained))
    _name_callbacks(config, stage)
    if config.forgetting.domains is None and lineage is not None:  # unknown lineage: every other validated domain
        config.forgetting.domains = [d for d in lineage if d != stage.domain]


def _warn_batch_limited_validation(trainer: Namespace, stage: Stage) -> None:
    """Warn when ``limit_val_batches`` cuts a stage's validation that continues a lineage: how many windows it
    scores then depends on the batch size, so its held-out losses and the forgetting against its parent's may
    come from other windows (run 7's preference stage, at 4 pairs a batch, scored 200 of 448 language windows)."""
    limit = trainer.get("limit_val_batches")
    if limit is None or limit == 0 or (isinstance(limit, float) and limit == 1.0):  # 0: off; an int 1 is one batch
        return
    rank_zero_warn(f"stage '{stage.name}': trainer.limit_val_batches={limit} validates a number of batches, so its "
                   "held-out windows depend on data.batch_size and may differ from its parent stage's; forgetting then "
                   "compares other windows. Cap validation with data.init_args.val_max_windows instead (inherited "
                   "along a lineage).")


def _place_run(trainer: Namespace, stage: Stage, subcommand: str) -> None:
    """The run's directory, for the Trainer and its TensorBoard / CSV loggers."""
    out = stage.outputs
    if subcommand == "fit":
        trainer.default_root_dir = str(out.run_dir)
        log_to = (str(out.runs_dir), stage.experiment, stage.name)
    else:
        trainer.default_root_dir = str(out.run_dir.with_name(f"{stage.name}.{subcommand}"))
        log_to = (str(Path(out.runs_dir) / stage.experiment), f"{stage.name}.{subcommand}", None)
    for logger in _specs(trainer.get("logger")):
        if _is_subclass(logger.class_path, (TensorBoardLogger, CSVLogger)):
            logger.init_args.save_dir, logger.init_args.name, logger.init_args.version = log_to


def _start_from(model: Namespace, stage: Stage, fitting: bool, check: bool) -> dict | None:
    """Set ``init_from`` (an explicit one wins) and return the parent's record: ``{}`` without a parent, None
    for a parent whose lineage is unknown (a checkpoint without a record, a transformers model)."""
    explicit = model.get("init_from")
    parent = Path(explicit) if explicit else stage.parent_checkpoint()
    if parent is None:
        return {}
    if fitting and "init_from" in model:
        model.init_from = str(parent)
    carry = check and model.get("carry_optimizer")  # its source is checked now, before anything is written
    if is_hf_dir(parent):  # a transformers model: no lineage of ours (CausalLM.load_init_from checks it)
        if carry:
            optimizer_state_source(parent)  # refused: such a directory holds no optimizer state
        return None
    if not check:
        return (stage_record_for_checkpoint(parent) if parent.is_file() else None) or None
    from_stage = stage.parent_is_stage and not explicit
    if not parent.is_file():
        if from_stage:
            raise StagewiseError(
                f"stage '{stage.name}' starts from stage '{stage.parent}' of experiment '{stage.experiment}', but "
                f"{parent} does not exist; run that stage first (same --stage.experiment and --stage.models_dir), "
                "or point --stage.parent at a checkpoint"
            )
        raise StagewiseError(f"init_from: no checkpoint at {parent}; train the previous stage first or fix the path")
    record = checked_record(parent)
    if record is None and from_stage:
        where = Outputs(stage.parent, stage.experiment, stage.models_dir).record_dir / "stage.json"
        raise StagewiseError(
            f"stage '{stage.name}' starts from stage '{stage.parent}', whose best checkpoint {parent} has no record "
            f"({where}): that stage did not finish. Resume it with --ckpt_path last, or start from the file as it "
            "is with --model.init_args.init_from"
        )
    if carry:
        optimizer_state_source(parent)
    return record or None


def _name_callbacks(config: Namespace, stage: Stage) -> None:
    """Every stage callback's ``stage``, ``stage_domain``, ``models_dir`` and ``experiment`` init arguments,
    in the sections and in ``trainer.callbacks``; a progress bar goes when ``enable_progress_bar`` is false."""
    trainer = config.trainer
    if trainer.get("enable_progress_bar") is False:  # the base config's progress bar goes with it
        trainer.callbacks = [cb for cb in trainer.get("callbacks") or []
                             if not (isinstance(cb, Namespace) and _is_subclass(cb.class_path, (ProgressBar,)))]
    listed = [cb for cb in trainer.get("callbacks") or [] if isinstance(cb, Namespace)]
    _refuse_duplicates(listed)
    values = {"stage": stage.name, "stage_domain": stage.domain, "models_dir": str(stage.outputs.experiment_models),
              "experiment": stage.experiment}
    for args in [cb.get("init_args") or Namespace() for cb in listed] + [config[k] for k in SECTIONS]:
        for key, value in values.items():
            if key in args:
                args[key] = value


def _refuse_duplicates(callbacks: list[Namespace]) -> None:
    for cb in callbacks:
        for section, cls in SECTIONS.items():
            if _is_subclass(cb.class_path, (cls,)):
                raise StagewiseError(
                    f"trainer.callbacks lists {cls.__name__}, which every stage already has; remove it from the list "
                    f"and set its options under `{section}:` (e.g. --{section}.<option>)"
                )


def _specs(value: Any) -> list[Namespace]:
    items = value if isinstance(value, list) else [value]
    return [v for v in items if isinstance(v, Namespace) and "class_path" in v]


def _is_subclass(class_path: str, bases: tuple[type, ...]) -> bool:
    """Whether ``class_path`` (as jsonargparse resolved it) names a subclass of one of ``bases``."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):  # jsonargparse has resolved it: not expected
        return False
    return isinstance(cls, type) and issubclass(cls, bases)
