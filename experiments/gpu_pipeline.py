"""The GPU pipeline in one command, for a GPU machine that keeps nothing between runs.

Unpacks the prepared data (``stagewise pack``), runs ``stagewise pipeline -c configs/pipelines/gpu.yaml``
(the staged path, then its baselines), scores the tool-calling stages on every held-out example of the seen
and the unseen services (``stagewise evaluate``, decoding freely, with constrained names and keys, and strictly;
the staged path's before the baselines train, so a machine lost during them keeps those scores),
writes the report card (``stagewise report``) and copies
the results into ``experiments/results/gpu_pipeline_<date>/`` and, where ``$OUT`` is set, a tarball of them
under ``$OUT`` after every step, so a command cut short by its time limit still returns what it finished.

    python -m experiments.gpu_pipeline --pack packs/full/full.pack.json          # on the GPU machine
    python -m experiments.gpu_pipeline --steps report                             # the card again, from the runs

Every step is skipped when its output exists (the pipeline itself skips finished stages), so a second run
in the same place continues where the first stopped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import yaml

from datamodules.signals import defer_signals, restore_signals
from lightning_modules.pipeline import data_dir_of
from lightning_modules.report_card import EVAL_FILE, machine_card

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("unpack", "pipeline", "evaluate", "report")


KILL_AFTER_S = 30  # after a SIGTERM, the seconds a command has to stop at its safe point before SIGKILL


def run(cmd: list[str], log: Path, timeout: float | None, cwd: Path = ROOT) -> int:
    """Run ``cmd`` in ``cwd``, its output to the console and ``log``; its exit status.

    The command runs in a process group of its own (the pipeline and the stage it runs), which gets a SIGTERM
    after ``timeout`` seconds and a SIGKILL ``KILL_AFTER_S`` later. A SIGTERM or SIGINT to this harness (the
    session script's ``timeout``) is passed on to that group the same way, then the harness stops (exit 128 +
    the signal): nothing it started outlives it."""
    print(f"$ {shlex.join(cmd)}", flush=True)
    start = time.perf_counter()
    signalled: list[int] = []
    with open(log, "a") as out:
        out.write(f"$ {shlex.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)

        def kill() -> None:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)

        def stop(signum: int) -> None:
            if proc.poll() is None:
                os.killpg(proc.pid, signum)
                later = threading.Timer(KILL_AFTER_S, kill)
                later.daemon = True
                later.start()

        timer = threading.Timer(timeout, stop, (signal.SIGTERM,)) if timeout else None
        if timer is not None:
            timer.start()
        before = defer_signals(lambda signum: (signalled.append(signum), stop(signum)))
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                out.write(line)
            rc = proc.wait()
        finally:
            restore_signals(before)
            if timer is not None:
                timer.cancel()
        out.write(f"exit {rc} after {time.perf_counter() - start:.1f}s\n")
    print(f"exit {rc} after {time.perf_counter() - start:.1f}s", flush=True)
    if signalled:
        raise SystemExit(128 + signalled[0])
    return rc


def stagewise(*args: str) -> list[str]:
    return [sys.executable, "-m", "lightning_modules", *args]


def evaluation(models: Path, experiment: str, stage: str, data_dir: str | Path, max_new_tokens: int,
               limit: int | None) -> list[str] | None:
    """The `stagewise evaluate` command line that scores a stage's held-out tool calls here (bf16 on a GPU),
    writing the report card's ``models/<experiment>/<stage>/eval.json``, ``limit`` examples per group; None when
    the stage has no best checkpoint or is scored already. Paths relative to ``models``' parent."""
    ckpt, out = models / experiment / f"{stage}_model_best.ckpt", models / experiment / stage / EVAL_FILE
    if not ckpt.is_file() or out.is_file():
        return None
    rel = lambda p: str(p.relative_to(models.parent))  # noqa: E731
    return stagewise("evaluate", "--ckpt", rel(ckpt), "--data_dir", str(data_dir), "--domains", "[tools]",
                     "--max_new_tokens", str(max_new_tokens), "--out", rel(out), "--constrained", "true",
                     "--strict", "true",
                     *(["--limit", str(limit)] if limit else []),
                     "--precision", "bf16-mixed" if machine_card() != "cpu" else "32-true")


def collect(results: Path, experiment: str, models: Path, runs: Path, log: Path) -> None:
    """Copy what a reader needs (report card, plots, stage records, evaluations, the log) into ``results``;
    with ``$OUT``, a tarball of it there."""
    results.mkdir(parents=True, exist_ok=True)
    for name in ("report.md", "report.json", "loss_vs_tokens.png", "quality_vs_time.png"):
        if (runs / experiment / name).is_file():
            shutil.copy(runs / experiment / name, results / name)
    for record in sorted((models / experiment).glob("*/stage.json")) + sorted((models / experiment).glob("*/eval.json")):
        target = results / "records" / record.parent.name / record.name
        target.parent.mkdir(parents=True, exist_ok=True)
        data = json.loads(record.read_text())
        data.pop("config", None) if record.name == "stage.json" else None  # the resolved config is long: in runs/
        target.write_text(json.dumps(data, indent=1) + "\n")
    shutil.copy(log, results / "log.txt")
    if os.environ.get("OUT"):
        with tarfile.open(Path(os.environ["OUT"]) / f"{results.name}.tar.gz", "w:gz") as tar:
            tar.add(results, arcname=results.name)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.gpu_pipeline", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/pipelines/gpu.yaml", help="the pipeline config")
    p.add_argument("--pack", help="a `stagewise pack` index to unpack first (data travels in pieces)")
    p.add_argument("--experiment", help="default: the config's `experiment`")
    p.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS)
    p.add_argument("--evaluate", nargs="+", default=["tools", "preference", "joint_tools"],
                   help="stages whose tool calls are scored on held-out examples (those that exist)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest generated call (99%% of answers fit)")
    p.add_argument("--eval-limit", type=int, default=400,
                   help="held-out tool examples scored per group, seen and unseen (0: all; full data: 524 and 948)")
    p.add_argument("--no-baselines", action="store_true",
                   help="the staged path only (a session whose baselines were measured at this config already)")
    p.add_argument("--timeout", type=float, default=560, help="seconds the pipeline step may take")
    p.add_argument("--results", help="default: experiments/results/gpu_pipeline_<date>")
    p.add_argument("--stage-args", type=json.loads, default=[],
                   help='a JSON list added to every stage\'s arguments, e.g. \'["--trainer.max_steps=20"]\' (a smoke run)')
    p.add_argument("--data-dir", help="default: the data config's `data_dir`")
    p.add_argument("--workdir", type=Path, default=ROOT,
                   help="where the commands run and data/, models/, runs/ live (relative paths of the configs too)")
    args = p.parse_args(argv)

    work = args.workdir.resolve()
    config = yaml.safe_load((work / args.config).read_text())
    if args.no_baselines:
        config["baselines"] = []
    experiment = args.experiment or config.get("experiment", "gpu")
    data_dir = args.data_dir or data_dir_of(config.get("data") and work / config["data"])
    models, runs = work / "models", work / "runs"
    date = datetime.date.today().isoformat()
    results = Path(args.results) if args.results else ROOT / "experiments" / "results" / f"gpu_pipeline_{date}"
    log = runs / experiment / "gpu_pipeline.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "-m", "experiments.gpu_pipeline", *(sys.argv[1:] if argv is None else argv)])

    failed: list[int] = []  # exit statuses of failed steps: the harness exits with the first (its results copied)

    def step(cmd: list[str], timeout: float | None = None) -> int:
        rc = run(cmd, log, timeout, work)
        if rc:
            failed.append(rc)
        return rc

    if "unpack" in args.steps and args.pack and not (work / data_dir / "tools" / "manifest.json").is_file():
        step(stagewise("unpack", "--pack", args.pack, "--into", str(Path(data_dir).parent)))

    def evaluate(stages: list[str]) -> None:
        for stage in stages:
            cmd = evaluation(models, experiment, stage, data_dir, args.max_new_tokens, args.eval_limit)
            if cmd:
                step(cmd)
        collect(results, experiment, models, runs, log)

    if "pipeline" in args.steps:
        cmd = stagewise("pipeline", "-c", args.config, "--experiment", experiment, "--data_dir", data_dir,
                        "--report", "false")
        if args.stage_args:
            cmd += ["--stage_args", json.dumps(args.stage_args)]
        if not config.get("data"):
            cmd += ["--data", "null"]
        if args.no_baselines:
            cmd += ["--baselines", "[]"]
        budget = args.timeout
        if "evaluate" in args.steps and config.get("baselines"):
            # the staged path first, then its tool scores, then the baselines (the second call skips the finished
            # stages): a machine taken back during the baselines has scored the staged model already
            start = time.perf_counter()
            step([*cmd, "--baselines", "[]"], budget)
            budget = max(1.0, budget - (time.perf_counter() - start))
            collect(results, experiment, models, runs, log)
            evaluate([s["name"] for s in config["stages"] if s["name"] in args.evaluate])
        step(cmd, budget)
        collect(results, experiment, models, runs, log)
    if "evaluate" in args.steps:
        evaluate(args.evaluate)
    if "report" in args.steps:
        names = [s["name"] for s in config["stages"]]
        baselines = [b["name"] for b in config.get("baselines") or []]
        done = [n for n in names if (models / experiment / n / "stage.json").is_file()]
        done_b = [n for n in baselines if (models / experiment / n / "stage.json").is_file()]
        if done:
            step(stagewise("report", "--experiment", experiment, "--stages", json.dumps(done), "--baselines",
                           json.dumps(done_b), "--data_dir", data_dir))
            card = runs / experiment / "report.json"
            if card.is_file():  # the card names the command that made every number in it
                data = json.loads(card.read_text())
                data["command"] = command
                card.write_text(json.dumps(data, indent=2) + "\n")
        collect(results, experiment, models, runs, log)
    print(f"results: {results}")
    if failed:
        raise SystemExit(failed[0])


if __name__ == "__main__":
    main()
