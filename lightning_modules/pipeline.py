"""`stagewise pipeline -c configs/pipelines/<name>.yaml`: prepare, every stage in order, baselines, report.

Each stage runs as its own ``stagewise fit`` process (a clean process per stage, as a user would run
it), started from the previous stage's best checkpoint (``--model.init_args.init_from``). The pipeline is

- idempotent: a stage whose ``models/<stage>/stage.json`` carries the same pipeline key (its config
  files, arguments, parent checkpoint and data) is skipped, and says so;
- resumable: a stage interrupted with the same key continues from its ``last.ckpt``
  (``--ckpt_path last``); one whose key changed starts over, and its old run directory is kept aside.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from callbacks.stage_record import file_sha256, read_stage_record, update_stage_record
from datamodules.errors import StagewiseError
from lightning_modules.cli import COMMANDS

console = Console(stderr=True)


@dataclass
class StageSpec:
    """One ``stagewise fit`` run of the pipeline.

    Args:
        name: The stage's name; its best checkpoint is ``<models_dir>/<name>_model_best.ckpt``.
        configs: The ``-c`` files of the run, composed in order (stage config, model preset, recipe...).
        args: Extra command-line overrides, e.g. ``["--trainer.max_steps=200"]``.
        init_from: The stage whose best checkpoint this one starts from; ``previous`` (the default) is the
            stage before it in the list, ``none`` starts from scratch.
        before: A ``stagewise`` command run before the fit (when the stage is not up to date), with
            ``{parent}`` and ``{data_dir}`` replaced by the parent's best checkpoint and the data directory,
            e.g. ``[pairs, --parent, "{parent}", --data_dir, "{data_dir}"]``; part of the stage's key.
    """

    name: str
    configs: list[str]
    args: list[str] = field(default_factory=list)
    init_from: str = "previous"
    before: list[str] = field(default_factory=list)


def _key(spec: StageSpec, parent_ckpt: Path | None, data_dir: Path) -> str:
    h = hashlib.sha256()
    for cfg in spec.configs:
        h.update(cfg.encode() + b"\0" + Path(cfg).read_bytes())
    h.update(json.dumps(spec.args).encode())
    if spec.before:
        h.update(json.dumps(spec.before).encode())
    h.update((file_sha256(parent_ckpt) if parent_ckpt else "scratch").encode())
    for manifest in sorted(data_dir.glob("*/manifest.json")):
        h.update(json.loads(manifest.read_text()).get("key", "").encode())
    return h.hexdigest()


def _run_stage(spec: StageSpec, experiment: str, parent: Path | None, models_dir: Path, runs_dir: Path,
               data_dir: Path) -> str:
    """Run (or skip, or resume) one stage; returns what happened. Its configs exist (``validate_pipeline``)."""
    key = _key(spec, parent, data_dir)
    record = read_stage_record(models_dir, spec.name)
    best = models_dir / f"{spec.name}_model_best.ckpt"
    if record and record.get("pipeline_key") == key and best.exists():
        console.print(f"[green]{spec.name}[/]: up to date (models/{spec.name}/stage.json matches), skipped")
        return "skipped"
    run_dir = runs_dir / experiment / spec.name
    key_file = run_dir / "pipeline_key.txt"
    last = run_dir / "checkpoints" / "last.ckpt"
    cmd = [sys.executable, "-m", "lightning_modules", "fit"]
    for cfg in spec.configs:
        cmd += ["-c", cfg]
    cmd += [f"--trainer.logger.init_args.name={experiment}", f"--trainer.logger.init_args.save_dir={runs_dir}"]
    cmd += [f"--trainer.logger.init_args.version={spec.name}"]
    if parent is not None:
        cmd += [f"--model.init_args.init_from={parent}"]
    cmd += spec.args
    if spec.before:
        _run_before(spec, parent, data_dir)
    resumed = key_file.exists() and key_file.read_text() == key and last.exists()
    if resumed:
        cmd += ["--ckpt_path", str(last)]
        console.print(f"[yellow]{spec.name}[/]: resuming from {last}")
    else:
        if run_dir.exists():  # an earlier run with another config: keep it, out of the way
            aside = run_dir.with_name(f"{spec.name}.{time.strftime('%Y%m%d-%H%M%S')}")
            shutil.move(run_dir, aside)
            console.print(f"{spec.name}: earlier run with another config moved to {aside}")
        run_dir.mkdir(parents=True, exist_ok=True)
        key_file.write_text(key)
        cmd += ["--overwrite"]  # deliberately starting over: replace the stage's earlier best checkpoint
        console.print(f"[bold]{spec.name}[/]: " + " ".join(cmd[2:]))
    start = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    result = subprocess.run(cmd, env=env)
    if result.returncode != 0:
        raise StagewiseError(
            f"stage '{spec.name}' failed (exit {result.returncode}); fix the error above and re-run the "
            "pipeline: finished stages are skipped and this one resumes from its last checkpoint"
        )
    if not best.exists():
        raise StagewiseError(f"stage '{spec.name}' finished without writing {best}; its config needs a "
                             "ModelCheckpoint with dirpath models and filename <stage>_model_best")
    update_stage_record(models_dir, spec.name, {"pipeline_key": key, "experiment": experiment})
    console.print(f"[green]{spec.name}[/]: done in {time.perf_counter() - start:.0f}s")
    return "resumed" if resumed else "trained"


def _run_before(spec: StageSpec, parent: Path | None, data_dir: Path) -> None:
    """Run the stage's ``before`` command (e.g. ``stagewise pairs``) as its own process."""
    args = [a.replace("{parent}", str(parent or "")).replace("{data_dir}", str(data_dir)) for a in spec.before]
    console.print(f"[bold]{spec.name}[/] (before): stagewise " + " ".join(args))
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "lightning_modules", *args], env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if result.returncode != 0:
        raise StagewiseError(f"the step before stage '{spec.name}' (`stagewise {' '.join(args)}`) failed "
                             f"(exit {result.returncode}); fix the error above and re-run the pipeline")
    console.print(f"{spec.name} (before): done in {time.perf_counter() - start:.0f}s")


def validate_pipeline(stages: list[StageSpec], baselines: list[StageSpec], data: str | None) -> None:
    """Check the whole pipeline before anything runs: unique stage names, every config file and the data
    config exist, every ``before`` names a command, and every ``init_from`` names a stage that runs earlier (or
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
        if spec.init_from not in ("previous", "none") and spec.init_from not in earlier:
            raise StagewiseError(
                f"stage '{spec.name}' starts from '{spec.init_from}' (`init_from:`), which is not an earlier stage "
                f"of this pipeline (earlier: {', '.join(earlier) or 'none'}); name one of those, `previous` or `none`; {fix}"
            )
        earlier.append(spec.name)


def pipeline(
    stages: list[StageSpec],
    experiment: str = "default",
    data: str | None = None,
    baselines: list[StageSpec] | None = None,
    models_dir: str = "models",
    runs_dir: str = "runs",
    data_dir: str = "data",
    report: bool = True,
) -> dict[str, str]:
    """Prepare the data, run the stages in order and the baselines, then write the report.

    Args:
        stages: The staged path, in order (language, code, tools...).
        experiment: Name of the experiment: runs go to ``<runs_dir>/<experiment>/<stage>``.
        data: A data config for ``stagewise prepare`` (skipped when its shards are up to date).
        baselines: Runs compared with the staged path (e.g. joint training); each starts from scratch
            unless it names ``init_from``.
        models_dir: Where the stages' best checkpoints and ``stage.json`` records are.
        runs_dir: Root of the TensorBoard runs.
        data_dir: Where ``prepare`` put the shards (must match the data config's ``data_dir``).
        report: Write ``<runs_dir>/<experiment>/report.md`` and its plots at the end.

    Returns:
        What happened to each stage: ``trained``, ``resumed`` or ``skipped``.
    """
    validate_pipeline(stages, baselines or [], data)
    if data is not None:
        from datamodules.prepare import main as prepare_main

        prepare_main(["-c", data])
    models, runs, data_root = Path(models_dir), Path(runs_dir), Path(data_dir)
    outcome: dict[str, str] = {}
    previous: str | None = None
    plan = [(spec, False) for spec in stages] + [(spec, True) for spec in baselines or []]
    for spec, is_baseline in plan:
        parent_name = {"previous": None if is_baseline else previous, "none": None}.get(spec.init_from, spec.init_from)
        parent = models / f"{parent_name}_model_best.ckpt" if parent_name else None
        outcome[spec.name] = _run_stage(spec, experiment, parent, models, runs, data_root)
        if not is_baseline:
            previous = spec.name
    if report:
        from lightning_modules.report import write_report

        path = write_report(experiment, [s.name for s in stages], [b.name for b in baselines or []],
                            models_dir=models_dir, runs_dir=runs_dir)
        print(path.read_text())  # plain: markdown brackets are not rich markup
        print(f"report: {path}")
    return outcome


def main(args: list[str] | None = None) -> None:
    """Entry point of ``stagewise pipeline -c configs/pipelines/<name>.yaml``."""
    from datamodules.command import run_function

    run_function(pipeline, args, "stagewise pipeline")
