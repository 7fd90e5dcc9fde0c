"""The staged-vs-joint study: the seed's three claims, measured per domain at equal tokens over several seeds, in
two arms: models trained properly (``trained``) and the seed's literal recipe (``seed``).

Arms and conditions (every condition with each seed; all of one arm at equal total tokens, validated on the
same held-out windows of each domain):

  trained   stage 1 (language from scratch) at the LR the stage-1 sweep chose (``--stage1-lrs``, one seed, lowest
            final held-out language loss; it must reach ``--stage1-target`` nats/token), trained once per seed
            and shared by that seed's stage-2 conditions; then, from its final weights, code:
              staged           fresh optimizer, LR ``--stage2-lr`` (re-warmed, cosine), no replay (replay 0%)
              staged_carry     the same with the AdamW moments of stage 1 carried over (``carry_optimizer``)
              staged_lr<x>     the stage-2 LR sweep ``--stage2-lrs`` (the staged run is its ``--stage2-lr`` point)
              replay<p>        ``--replays``: p% of stage 2's tokens are language windows
            and from scratch, as many tokens as stage 1 + stage 2, at stage 1's LR:
              joint            language/code 93/7 (the seed's mix)
              joint_upsampled  code up-sampled to the staged path's code share (stage-2 / all tokens)
  seed      the seed's recipe: stage 1 at 3e-5, then staged (5e-6) and staged_lr1e-5; joint 93/7 at 3e-5;
            warmup 300 steps (the seed's), at most half of a run

Every run is a stage of the experiment ``<arm>_s<seed>`` (stage 1 is ``language_lr<lr>``, the others are named
after their condition) with the configs of ``configs/`` and the study's overrides, run by
``lightning_modules.pipeline.run_stage`` (one ``stagewise fit`` process each), spread over ``--devices`` (one
worker per entry: ``--devices 0 0 0`` runs three at once on GPU 0). Runs hand on and are scored by their
**final** weights; stage-2 runs also measure the language loss every ``--probe-every`` steps over the first
``--probe-until`` of the stage (``callbacks.StabilityGap``: the stability gap).

Order: the stage-1 sweep first, then the decisive conditions with all seeds (staged and the joint baselines of
both arms, and the seed arm's 1e-5 run, the only other run of its stage 1), then seed by seed the rest: claim
2's LRs, carry and 5% replay, the other LRs and replays, runs whose stage 1 is on disk before runs that need one.
``--arms``, ``--conditions`` and ``--seeds`` run subsets; ``--time-budget`` starts no run after that many seconds,
and no stage 1 for later runs that would not finish with them in time; ``--plan`` prints the runs, their tokens
and an estimated GPU time, and runs nothing.

Resumable: ``results.json`` in ``--out`` holds one entry per finished run, keyed by its stage's command and its
parent's key, rewritten after every run, so a re-run (also after a killed command, also on a fresh machine where
only ``results.json`` came along) skips what is done. A stage 1 whose checkpoint is gone (another machine) is
trained again when a stage-2 run still needs it; each stage-2 entry keeps its own parent's losses.

    make prepare-full     # data/full: language 22.0M, code 38.7M train tokens, vocab 8192
    python -m experiments.staged_vs_joint --plan --devices 0 0 0 0
    python -m experiments.staged_vs_joint --devices 0 0 0 0 --time-budget 360   # in a 600-s command: the
    # longest run (joint) may start just before the budget ends; --plan prints its estimate

Budget (defaults, ``small``, seq_len 1,024 × batch 32 = 32,768 tokens per step, the GPU pipeline's shape):
stage 1 1,144 steps = 37.5M tokens (1.7 epochs of data/full's language; the seed trains 3), stage 2 288 steps =
9.4M (a quarter of stage 1, as in the seed; ≈0.24 epoch of data/full's code), joint 1,432 steps = 46.9M. One
seed of the trained arm: 37.5M + 9 stage-2 runs × 9.4M + 2 joints × 46.9M = 216M tokens; the whole study (both
arms, 3 seeds, the sweep) ~1.07B tokens. At the one measured rate (770K tokens/s: the GPU pipeline's language
stage, ``small`` at this shape, one process alone on an H200, 39.3M tokens to a held-out language loss of 3.14
at LR 1.5e-3; ``experiments/results/gpu_pipeline_2026-12-01_run1/records/language/stage.json``) that is ~23 min
of training plus ~40 s of start-up and compilation per run. Measured since: five workers on one H200 trained 41
runs (752M tokens) in 761 s, 0.99M tokens/s together (commit 0505edf, results.json's commands). ``--plan`` prints
the estimate; once runs have finished, their times scale it.

Writes ``--out``: ``results.json``, ``results.md`` (per-condition mean ± std, the sweep, the stability gap,
verdicts per claim and arm by the rules it states, what has not run yet), ``quality_vs_time.png``,
``loss_vs_tokens.png``, ``forgetting_vs_replay.png``, ``forgetting_vs_lr.png``; with ``$OUT`` set, a copy of those
under ``$OUT`` after every run. Runs and checkpoints go to ``--work-dir`` (``runs/<experiment>/<stage>/``,
``models/<experiment>/``); only stage 1's checkpoints are kept.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import shlex
import shutil
import sys
import threading
import time
from pathlib import Path

from datamodules.errors import StagewiseError
from datamodules.metric_names import domain_of_val_loss
from datamodules.stage_record import read_stage_record, write_json_atomic
from experiments import staged_vs_joint_results as report
from lightning_modules.report_card import machine_card as card
from experiments.staged_vs_joint_plan import (
    ARMS, DOMAINS, ROOT, Run, Study, best_checkpoint, command_of, conditions_of, console, data_fingerprint,
    plan_budget, run_dir, stage_spec, workspace,
)
from lightning_modules import report_card
from lightning_modules.pipeline import run_stage
from lightning_modules.report import read_scalars
from lightning_modules.report_card import bits_per_byte, current_commit

FILES = ["results.json", "results.md", "quality_vs_time.png", "loss_vs_tokens.png", "forgetting_vs_replay.png",
         "forgetting_vs_lr.png"]  # what --out holds and $OUT gets a copy of
PLOT_EVERY_S = 60  # the plots take a few seconds: redrawn after a run at most this often, and at the end


# -------------------------------------------------------------------------------------------- execute
def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def execute(run: Run, args: argparse.Namespace, device: str, bytes_per_token: dict[str, float]) -> dict:
    """Run one stage on ``device`` through the pipeline's ``run_stage`` and return its entry (``status`` ok,
    diverged or failed)."""
    env = {} if device == "cpu" else {"CUDA_VISIBLE_DEVICES": device}
    entry = {"key": run.key, "arm": run.arm, "condition": run.condition, "seed": run.seed, "stage": run.stage,
             "name": run.name, "experiment": run.experiment, "lr": run.lr, "warmup_steps": run.warmup,
             "steps": run.steps, "mixture": run.mixture, "replay": run.replay, "carry_optimizer": run.carry,
             "parent": run.parent.name if run.parent else None, "parent_key": run.parent.key if run.parent else None,
             "device": device, "card": "cpu" if device == "cpu" else card(device),
             "commit": current_commit() or "unknown",
             "command": command_of(run, args), "date": _now()}
    start = time.perf_counter()
    try:
        run_stage(stage_spec(run, args), run.parent and run.parent.name, workspace(run, args), env=env,
                  log_to_files=True, cwd=ROOT)
    except StagewiseError as err:
        stderr = run_dir(run, args) / "stderr.log"
        tail = stderr.read_text(errors="replace")[-3000:] if stderr.exists() else str(err)
        status = "diverged" if "non-finite loss or gradient" in tail else "failed"  # diverged: a result, not retried
        return entry | {"status": status, "stderr_tail": tail, "process_time_s": round(time.perf_counter() - start, 2)}
    entry["process_time_s"] = round(time.perf_counter() - start, 2)
    models = args.work_dir / "models" / run.experiment
    record = read_stage_record(models, run.name)
    curves = {}
    for tag, points in read_scalars(run_dir(run, args), "val_tokens/").items():  # val_tokens/<domain>/loss
        curves[domain_of_val_loss(tag, axis="val_tokens")] = [[int(step), value] for step, value, _ in points]
    final = record["losses"]["final"]
    entry |= {
        "status": "ok",
        "losses": {"final": final, "curve": curves},
        "bpb": {"final": {d: round(bits_per_byte(loss, bytes_per_token[d]), 4) for d, loss in final.items()
                          if d in bytes_per_token}},
        "tokens": record["tokens"],
        "optimizer_steps": record["optimizer_steps"],
        "wall_time_s": record["wall_time_s"],  # inside fit: training, validation and checkpoint saving
        "precision": record.get("precision"),
        "checkpoint_sha256": record["checkpoint"]["sha256"],
        "mixture_trained": record.get("replay"),  # the fractions the data module resolved (stage.json's replay)
        "optimizer_from": record.get("optimizer_from"),
        "stability_gap": record.get("stability_gap"),
    }
    if run.parent:
        parent = read_stage_record(models, run.parent.name) or {}
        entry["parent_final"] = (parent.get("losses") or {}).get("final")
        entry["parent_checkpoint_sha256"] = (record.get("parent") or {}).get("sha256")
    return entry


def heldout_bytes_per_token(args: argparse.Namespace) -> dict[str, float]:
    """UTF-8 bytes per token of the validation windows every run scores (the first ``--val-windows`` windows of
    ``seq_len`` of each domain's val split)."""
    from datamodules.tokenizer import load_tokenizer

    tok = load_tokenizer(args.data_dir / "tokenizer")
    span = args.val_windows * args.seq_len + 1
    return {d: report_card.bytes_per_token(args.data_dir / d, tok, max_tokens=span) for d in DOMAINS}


# ----------------------------------------------------------------------------------------------- run
def worker(study: Study, device: str, bytes_per_token: dict[str, float], summarize) -> None:
    args = study.args
    while (run := study.next_run()) is not None:
        console.print(f"[bold]start[/] {run.label} ({run.steps} steps, lr {run.lr:g}) on {device}")
        try:
            entry = execute(run, args, device, bytes_per_token)
        except Exception as err:  # noqa: BLE001  (a broken run must not stop the study)
            entry = {"key": run.key, "arm": run.arm, "condition": run.condition, "seed": run.seed, "stage": run.stage,
                     "name": run.name, "status": "failed", "stderr_tail": f"{type(err).__name__}: {err}",
                     "date": _now()}
        if entry["status"] == "ok":
            final = entry["losses"]["final"]
            losses = ", ".join(f"{d} {final[d]:.3f}" for d in DOMAINS if d in final)
            console.print(f"[green]done[/]  {run.label} in {entry['process_time_s']:.0f}s (fit "
                          f"{entry['wall_time_s']:.0f}s): {losses}")
        else:
            console.print(f"[red]{entry['status']}[/] {run.label}: {entry['stderr_tail'][-600:]}")
        if run.condition != "stage1" and not args.keep_checkpoints:  # only stage 1's are read again
            shutil.rmtree(run_dir(run, args) / "checkpoints", ignore_errors=True)
            best_checkpoint(run, args).unlink(missing_ok=True)
        study.finish(run, entry)
        summarize()


def check_data(data_dir: Path) -> None:
    missing = [d for d in DOMAINS if not (data_dir / d / "manifest.json").is_file()]
    if missing or not (data_dir / "tokenizer" / "tokenizer.json").is_file():
        raise SystemExit(
            f"staged_vs_joint: no prepared {', '.join(missing) or 'tokenizer'} in {data_dir}; prepare the study's data "
            "first: `make prepare-full` (data/full), or `stagewise unpack` a pack of it; or pass --data-dir to a "
            "directory prepared with language and code corpora")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.staged_vs_joint", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", default="small", help="model preset (configs/model/<size>.yaml)")
    p.add_argument("--study-seeds", type=int, nargs="+", default=[1, 2, 3],
                   help="the study's seeds (the first also runs the stage-1 sweep)")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS), help="run only these arms")
    p.add_argument("--conditions", nargs="+", default=None,
                   help="run only these conditions (and the stage 1s they need); `sweep` is the stage-1 LR sweep")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="run only these of the study's seeds")
    p.add_argument("--stage1-tokens", type=float, default=37.5e6, help="tokens of stage 1")
    p.add_argument("--stage2-tokens", type=float, default=9.4e6, help="tokens of stage 2 (joint: the sum)")
    p.add_argument("--stage1-lrs", type=float, nargs="+", default=[3e-4, 1e-3, 2e-3, 4e-3],
                   help="the trained arm's stage-1 LR sweep (seed: the first study seed)")
    p.add_argument("--stage1-lr", type=float, default=None,
                   help="the trained arm's stage-1 (and joint) LR; default: the sweep's best")
    p.add_argument("--stage1-target", type=float, default=3.6,
                   help="held-out language loss (nats/token) the trained arm's stage 1 must reach")
    p.add_argument("--ignore-target", action="store_true", help="run the trained arm even if stage 1 misses the target")
    p.add_argument("--stage2-lr", type=float, default=1e-4,
                   help="the trained arm's stage-2 LR (staged, carry, replay); code.yaml's")
    p.add_argument("--stage2-lrs", type=float, nargs="+", default=[5e-6, 1e-5, 3e-5, 1e-4, 3e-4],
                   help="the trained arm's stage-2 LR sweep")
    p.add_argument("--replays", type=float, nargs="+", default=[0.01, 0.05, 0.25],
                   help="language replay fractions of stage 2 (0 is `staged`)")
    p.add_argument("--warmup-fraction", type=float, default=0.05,
                   help="the trained arm's LR warmup, of each run's steps")
    p.add_argument("--seq-len", type=int, default=1024, help="training and held-out windows (the GPU pipeline's)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per optimizer step")
    p.add_argument("--val-points", type=int, default=8, help="validations per run, evenly spaced, the last at its end")
    p.add_argument("--val-windows", type=int, default=128, help="held-out windows of seq_len per domain")
    p.add_argument("--probe-every", type=int, default=6, help="stage 2: steps between stability-gap measurements")
    p.add_argument("--probe-until", type=float, default=0.25, help="stage 2: measure over this fraction of its steps")
    p.add_argument("--devices", nargs="+", default=["cpu"],
                   help="GPU ids, one worker each (repeat an id for several runs on it: `0 0 0`); `cpu` runs on "
                        "the CPU (`cpu cpu`: two at once)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds after which no new run starts (running ones finish, results are written)")
    p.add_argument("--plan", action="store_true",
                   help="print the runs, their tokens and the estimated time; run nothing")
    p.add_argument("--assume-tokens-per-s", type=float, default=7.7e5,
                   help="--plan: training tokens/s of one GPU with all its workers together (default: measured for "
                        "one `small` process alone at seq 1024 x batch 32 on an H200, experiments/results/"
                        "gpu_pipeline_2026-12-01_run1; several together: not measured)")
    p.add_argument("--assume-start-s", type=float, default=40.0,
                   help="--plan: seconds of start-up and compilation per run (that process: ~28 s of its fit outside "
                        "steady training, plus the process's start)")
    p.add_argument("--data-dir", type=Path, default=ROOT / "data" / "full",
                   help="prepared by `make prepare-full` (configs/data/full.yaml)")
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "staged_vs_joint",
                   help="results.json, results.md and the plots")
    p.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "staged_vs_joint",
                   help="the runs (runs/<experiment>/<stage>/) and checkpoints (models/<experiment>/)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile every run (default: on GPUs)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep every run's checkpoints (default: stage 1's)")
    args = p.parse_args(argv)
    if "cpu" in args.devices and set(args.devices) != {"cpu"}:
        p.error("--devices is either GPU ids or `cpu` (repeated: that many runs at once on the CPU)")
    if args.compile is None:
        args.compile = args.devices[0] != "cpu"
    if any(not 0 < f < 1 for f in args.replays):
        p.error("--replays are fractions in (0, 1); replay 0 is the `staged` condition")
    args.seeds = args.seeds or list(args.study_seeds)
    args.run_arms = list(args.arms)
    args.arms = list(ARMS)  # the plan holds both arms (results.md says what is left); --arms filters what runs
    unknown = set(args.conditions or []) - {c for cs in conditions_of(args).values() for c in cs}
    if unknown:
        p.error(f"unknown condition(s) {sorted(unknown)}; the conditions are {conditions_of(args)}")
    args.work_dir, args.out, args.data_dir = args.work_dir.resolve(), args.out.resolve(), args.data_dir.resolve()
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    command = shlex.join(["python", "-m", "experiments.staged_vs_joint", *(sys.argv[1:] if argv is None else argv)])
    budget = plan_budget(args)
    if args.plan:
        study = Study(args, budget, data_fingerprint(args.data_dir))
        print(report.plan_text(study))
        if not (args.data_dir / "language" / "manifest.json").is_file():
            print(f"(no prepared data in {args.data_dir}: runs are keyed without it, so none counts as done)")
        return {"todo": [r.label for r in study.todo()]}
    check_data(args.data_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    study = Study(args, budget, data_fingerprint(args.data_dir))
    bytes_per_token = heldout_bytes_per_token(args)
    print(report.plan_text(study))
    study.commands.append(this := {"command": command, "date": _now(), "devices": args.devices,
                                   "commit": current_commit() or "unknown", "runs_finished": 0, "tokens_trained": 0})
    summary_lock, first, plotted = threading.Lock(), len(study.entries), [-math.inf]

    def summarize(final: bool = False) -> None:
        """results.json and results.md of everything so far after every run (a command cut short keeps what it
        finished), the plots at most every PLOT_EVERY_S seconds and at the end; and their copy under $OUT."""
        with summary_lock, study.lock:
            finished = [e for e in study.entries[first:] if e.get("status") == "ok"]
            this.update(wall_time_s=round(study.elapsed(), 1), runs_finished=len(finished),
                        tokens_trained=sum(e["tokens"]["trained"] for e in finished))
            settings = report.settings(study, bytes_per_token)
            write_json_atomic(args.out / "results.json", {"study": settings, "runs": study.entries})
            plots = final or study.elapsed() - plotted[0] >= PLOT_EVERY_S
            report.write(study, settings, plots=plots)
            if plots:
                plotted[0] = study.elapsed()
            target = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
            if target is not None and target.resolve() != args.out.resolve():  # --out may be $OUT itself
                target.mkdir(parents=True, exist_ok=True)
                for name in FILES:
                    if (args.out / name).is_file():
                        shutil.copyfile(args.out / name, target / name)

    threads = [threading.Thread(target=worker, args=(study, d, bytes_per_token, summarize), daemon=True)
               for d in args.devices]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    summarize(final=True)
    console.print(f"results: {args.out / 'results.md'} ({this['wall_time_s']:.0f}s, {this['runs_finished']} run(s) "
                  f"finished); {len(study.todo())} run(s) still to run")
    return {"entries": study.entries, "todo": [r.label for r in study.todo()]}


if __name__ == "__main__":
    main()
