"""`stagewise pipeline -c configs/pipelines/<name>.yaml`: prepare, every stage in order, baselines, report.

Each stage runs as its own ``stagewise fit`` process (a clean process per stage, as a user would run
it) with ``--stage.name``, ``--stage.parent`` (the previous stage unless the pipeline says otherwise)
and the pipeline's experiment and directories, so everything it writes lies under
``<models_dir>/<experiment>/`` and ``<runs_dir>/<experiment>/`` and it reads only ``data_dir``. The pipeline is

- idempotent: a stage whose ``stage.json`` carries the same pipeline key (its config files, the base
  config, its arguments, its parent checkpoint and data) is skipped, and says so;
- resumable: a stage interrupted with the same key continues from its ``last.ckpt``
  (``--ckpt_path last``); one whose key changed starts over, and its old run directory is kept aside;
- stoppable: a SIGTERM or SIGINT is passed on to the stage running, which saves its ``last.ckpt`` and
  stops; then the pipeline stops too (exit status 143 / 130), and running it again resumes that stage.

:func:`run_stage` is the one way a stage is run from code: ``experiments/staged_vs_joint.py`` runs its
conditions through it too.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml
from rich.console import Console

from datamodules.command import run_function
from datamodules.errors import StagewiseError
from datamodules.prepare import main as prepare_main
from datamodules.signals import run_forwarding_signals
from datamodules.stage_record import file_sha256, read_stage_record, update_stage_record
from lightning_modules.cli import COMMANDS
from lightning_modules.report import write_report
from lightning_modules.stage import BASE_CONFIG, Outputs

console = Console(stderr=True)


@dataclass
class StageSpec:
    """One ``stagewise fit`` run of the pipeline.

    Args:
        name: The stage's name (``--stage.name``); its best checkpoint is
            ``<models_dir>/<experiment>/<name>_model_best.ckpt``.
        configs: The ``-c`` files of the run, composed in order after ``configs/base.yaml`` (stage config,
            model preset, overlay, recipe...).
        args: Extra command-line overrides, e.g. ``["--trainer.max_steps=200"]``.
        parent: The stage whose best checkpoint this one starts from: ``previous`` (the default) is the
            stage before it in the list (baselines: none), ``none`` starts from scratch.
        before: A ``stagewise`` command run before the fit (when the stage is not up to date), with
            ``{parent}`` and ``{data_dir}`` replaced by the parent's best checkpoint and the data directory,
            e.g. ``[pairs, --parent, "{parent}", --data_dir, "{data_dir}"]``; part of the stage's key.
    """

    name: str
    configs: list[str]
    args: list[str] = field(default_factory=list)
    parent: str = "previous"
    before: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Workspace:
    """What every stage of one pipeline run shares: its experiment and the directories it reads and writes.

    Args:
        experiment: The experiment's name: ``<runs_dir>/<experiment>/``, ``<models_dir>/<experiment>/``.
        models_dir: Root of the experiments' checkpoints and stage records.
        runs_dir: Root of the experiments' TensorBoard runs.
        data_dir: The prepared data every stage reads.
    """

    experiment: str = "default"
    models_dir: str = "models"
    runs_dir: str = "runs"
    data_dir: str = "data"

    def outputs(self, stage: str) -> Outputs:
        return Outputs(stage, self.experiment, self.models_dir, self.runs_dir)


def fit_command(spec: StageSpec, parent: str | None, where: Workspace) -> list[str]:
    """The ``stagewise fit`` command line of ``spec`` started from stage ``parent`` (None: from scratch). The
    workspace's experiment and directories come last, so they beat anything the stage's configs and args say."""
    cmd = [sys.executable, "-m", "lightning_modules", "fit"]
    for cfg in spec.configs:
        cmd += ["-c", cfg]
    cmd += [f"--stage.name={spec.name}", f"--stage.parent={parent or 'null'}", *spec.args]
    cmd += [f"--stage.experiment={where.experiment}", f"--stage.models_dir={where.models_dir}",
            f"--stage.runs_dir={where.runs_dir}", f"--data.init_args.data_dir={where.data_dir}"]
    return cmd


def _key(spec: StageSpec, parent_ckpt: Path | None, data_dir: Path, cwd: Path) -> str:
    h = hashlib.sha256()
    for cfg in [str(BASE_CONFIG), *spec.configs]:
        h.update(cfg.encode() + b"\0" + ((cwd / cfg).read_bytes() if (cwd / cfg).is_file() else b""))
    h.update(json.dumps(spec.args).encode())
    if spec.before:
        h.update(json.dumps(spec.before).encode())
    h.update((file_sha256(parent_ckpt) if parent_ckpt else "scratch").encode())
    for manifest in sorted(data_dir.glob("*/manifest.json")):
        h.update(json.loads(manifest.read_text()).get("key", "").encode())
    return h.hexdigest()


def run_stage(spec: StageSpec, parent: str | None, where: Workspace, env: dict[str, str] | None = None,
              log_to_files: bool = False, cwd: str | Path | None = None) -> str:
    """Run (or skip, or resume) one stage; returns what happened: ``trained``, ``resumed`` or ``skipped``.

    Args:
        spec: The stage.
        parent: The stage of the same experiment it starts from, or None.
        where: The experiment and directories.
        env: Extra environment variables of the ``stagewise fit`` process (e.g. ``CUDA_VISIBLE_DEVICES``).
        log_to_files: Write the process's output to ``stdout.log`` / ``stderr.log`` in its run directory
            instead of this process's.
        cwd: The working directory of the ``stagewise fit`` process (relative paths are relative to it).
    """
    base = Path(cwd or ".")
    local = Workspace(where.experiment, str(base / where.models_dir), str(base / where.runs_dir),
                      str(base / where.data_dir))  # the same directories, seen from this process
    out = local.outputs(spec.name)
    parent_ckpt = local.outputs(parent).best_checkpoint if parent else None
    key = _key(spec, parent_ckpt, Path(local.data_dir), base)
    record = read_stage_record(out.experiment_models, spec.name)
    if record and record.get("pipeline_key") == key and out.best_checkpoint.exists():
        console.print(f"[green]{spec.name}[/]: up to date ({out.record_dir}/stage.json matches), skipped")
        return "skipped"
    key_file = out.run_dir / "pipeline_key.txt"
    last = out.run_dir / "checkpoints" / "last.ckpt"
    cmd = fit_command(spec, parent, where)
    if spec.before:
        _run_before(spec, where.outputs(parent).best_checkpoint if parent else None, where.data_dir, cwd)
    resumed = key_file.exists() and key_file.read_text() == key and last.exists()
    if resumed:
        cmd += ["--ckpt_path", str(where.outputs(spec.name).run_dir / "checkpoints" / "last.ckpt")]
        console.print(f"[yellow]{spec.name}[/]: resuming from {last}")
    else:
        aside = out.start_over()  # an earlier run with another config: kept, out of the way
        if aside is not None:
            console.print(f"{spec.name}: earlier run with another config moved to {aside}")
        out.run_dir.mkdir(parents=True, exist_ok=True)
        key_file.write_text(key)
        cmd += ["--overwrite"]  # deliberately starting over
        console.print(f"[bold]{spec.name}[/]: " + " ".join(cmd[2:]))
    start = time.perf_counter()
    with ExitStack() as files:
        streams = {}
        if log_to_files:
            streams = {name: files.enter_context(open(out.run_dir / f"{name}.log", "a")) for name in ("stdout", "stderr")}
        status = run_forwarding_signals(cmd, env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})), cwd=cwd,
                                        **streams)
    if status != 0:
        raise StagewiseError(
            f"stage '{spec.name}' failed (exit {status}); fix the error above and re-run the "
            "pipeline: finished stages are skipped and this one resumes from its last checkpoint"
        )
    if not out.best_checkpoint.exists():
        raise StagewiseError(f"stage '{spec.name}' finished without writing {out.best_checkpoint}; does its config "
                             "turn off validation? The best checkpoint is saved after a validation")
    update_stage_record(out.experiment_models, spec.name, {"pipeline_key": key})
    console.print(f"[green]{spec.name}[/]: done in {time.perf_counter() - start:.0f}s")
    return "resumed" if resumed else "trained"


_BEFORE_LOCKS: dict[tuple[str, ...], threading.Lock] = {}  # one per distinct `before` command line and place
_BEFORE_GUARD = threading.Lock()


def _run_before(spec: StageSpec, parent: Path | None, data_dir: str, cwd: str | Path | None) -> None:
    """Run the stage's ``before`` command (e.g. ``stagewise pairs``) as its own process (in ``cwd``, where the
    paths it is given are relative to)."""
    args = [a.replace("{parent}", str(parent or "")).replace("{data_dir}", str(data_dir)) for a in spec.before]
    with _BEFORE_GUARD:
        lock = _BEFORE_LOCKS.setdefault((str(Path(cwd or ".").resolve()), *args), threading.Lock())
    with lock:  # stages run side by side (recipe variants) that need the same step take turns: the later one
        console.print(f"[bold]{spec.name}[/] (before): stagewise " + " ".join(args))  # finds it up to date
        start = time.perf_counter()
        status = run_forwarding_signals([sys.executable, "-m", "lightning_modules", *args],
                                        env=dict(os.environ, PYTHONUNBUFFERED="1"), cwd=cwd)
    if status != 0:
        raise StagewiseError(f"the step before stage '{spec.name}' (`stagewise {' '.join(args)}`) failed "
                             f"(exit {status}); fix the error above and re-run the pipeline")
    console.print(f"{spec.name} (before): done in {time.perf_counter() - start:.0f}s")


def validate_pipeline(stages: list[StageSpec], baselines: list[StageSpec], data: str | None) -> None:
    """Check the whole pipeline before anything runs: unique stage names, every config file and the data
    config exist, every ``before`` names a command, and every ``parent`` names a stage that runs earlier (or
    ``previous`` / ``none``)."""
    fix = "fix the pipeline config (`stagewise pipeline -c <file>`) and run it again; nothing has run yet"
    if not stages:
        raise StagewiseError(f"the pipeline names no stages; list at least one under `stages:`. {fix}")
    names = [s.name for s in stages + baselines]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise StagewiseError(f"stage names must be unique in a pipeline, but {', '.join(duplicates)} appear twice; {fix}")
    if data is not None and not Path(data).is_file():
        raise StagewiseError(f"the data config '{data}' (`data:`) does not exist; {fix}")
    for spec in stages + baselines:
        if not spec.configs:
            raise StagewiseError(f"stage '{spec.name}' lists no `configs:`; {fix}")
        missing = [c for c in spec.configs if not Path(c).is_file()]
        if missing:
            raise StagewiseError(
                f"stage '{spec.name}' names config file {', '.join(map(repr, missing))}, which does not exist "
                f"(paths are relative to {Path.cwd()}); {fix}"
            )
        if spec.before and spec.before[0] not in COMMANDS:
            raise StagewiseError(f"stage '{spec.name}' runs `stagewise {spec.before[0]}` before it (`before:`), which "
                                 f"is not a command; choose one of: {', '.join(COMMANDS)}; {fix}")
    earlier: list[str] = []
    for spec in stages + baselines:
        if spec.parent not in ("previous", "none") and spec.parent not in earlier:
            raise StagewiseError(
                f"stage '{spec.name}' starts from '{spec.parent}' (`parent:`), which is not an earlier stage "
                f"of this pipeline (earlier: {', '.join(earlier) or 'none'}); name one of those, `previous` or `none`; {fix}"
            )
        earlier.append(spec.name)


def parents(stages: list[StageSpec], baselines: list[StageSpec]) -> list[tuple[StageSpec, str | None]]:
    """Every run of the pipeline in order, with the stage it starts from (``previous``: the stage before it
    on the staged path; baselines start from scratch unless they name a parent)."""
    plan, previous = [], None
    for spec, is_baseline in [(s, False) for s in stages] + [(b, True) for b in baselines]:
        named = {"previous": None if is_baseline else previous, "none": None}
        plan.append((spec, named.get(spec.parent, spec.parent)))
        if not is_baseline:
            previous = spec.name
    return plan


def data_dir_of(data: str | Path | None) -> str:
    """The ``data_dir`` of a data config (``data`` without one)."""
    config = yaml.safe_load(Path(data).read_text()) if data else None
    return str((config or {}).get("data_dir") or "data")


def pipeline(
    stages: list[StageSpec],
    experiment: str = "default",
    data: str | None = None,
    baselines: list[StageSpec] | None = None,
    models_dir: str = "models",
    runs_dir: str = "runs",
    data_dir: str | None = None,
    stage_args: list[str] | None = None,
    report: bool = True,
) -> dict[str, str]:
    """Prepare the data, run the stages in order and the baselines, then write the report.

    Args:
        stages: The staged path, in order (language, code, tools...).
        experiment: Name of the experiment: runs go to ``<runs_dir>/<experiment>/<stage>``, checkpoints and
            records to ``<models_dir>/<experiment>/``. ``--experiment`` overrides the config's.
        data: A data config for ``stagewise prepare`` (skipped when its shards are up to date).
        baselines: Runs compared with the staged path (e.g. joint training); each starts from scratch
            unless it names a ``parent``.
        models_dir: Root of the experiments' best checkpoints and ``stage.json`` records.
        runs_dir: Root of the TensorBoard runs.
        data_dir: Where the prepared data is: ``prepare`` writes there and every stage reads it. Default: the
            data config's ``data_dir`` (``data`` without a data config).
        stage_args: Arguments added to every stage's and baseline's command after its own, e.g.
            ``[--trainer.max_steps=20, --model.init_args.size=tiny]`` for a short run of a whole pipeline.
        report: Write ``<runs_dir>/<experiment>/report.md``, its plots and the report card ``report.json``.

    Returns:
        What happened to each stage: ``trained``, ``resumed`` or ``skipped``.
    """
    validate_pipeline(stages, baselines or [], data)
    where = Workspace(experiment, models_dir, runs_dir, data_dir or data_dir_of(data))
    if data is not None:
        prepare_main(["-c", data, f"--data_dir={where.data_dir}"])
    extra = list(stage_args or [])
    outcome = {spec.name: run_stage(replace(spec, args=[*spec.args, *extra]), parent, where)
               for spec, parent in parents(stages, baselines or [])}
    if report:
        command = shlex.join(["stagewise", "pipeline", *sys.argv[2:]]) if sys.argv[1:2] == ["pipeline"] else None
        path = write_report(experiment, [s.name for s in stages], [b.name for b in baselines or []],
                            models_dir=models_dir, runs_dir=runs_dir, data_dir=where.data_dir, command=command)
        print(path.read_text())  # plain: markdown brackets are not rich markup
        print(f"report: {path}")
    return outcome


def main(args: list[str] | None = None) -> None:
    """Entry point of ``stagewise pipeline -c configs/pipelines/<name>.yaml``."""
    run_function(pipeline, args, "stagewise pipeline")
