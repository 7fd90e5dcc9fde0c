"""The staged-vs-joint study: the seed's three claims, measured per domain at equal tokens over several seeds.

Conditions (one model size and token budget for all; every one with each ``--seeds`` seed):

  staged         stage 1 language from scratch (LR ``--language-lr``, seed recipe 3e-5), then stage 2 code
                 from its final weights at LR 5e-6 (seed recipe)
  staged_lr1e-5  the same stage 1, stage 2 at LR 1e-5
  replay5        the same stage 1, stage 2 at 5e-6 on code with 5% language replay (token fraction)
  replay25       the same, with 25% language replay
  joint          one run from scratch on language + code mixed 93/7, as many tokens as the staged path

Stage 1 is trained once per seed and shared by the four staged conditions. Budget, scaled like the seed:
stage 1 trains ``--language-tokens`` (≈ ``--language-epochs`` epochs of the language data), stage 2 trains
``--code-epochs`` epochs of a code corpus ``--code-fraction`` / (1 - fraction) the size of the language data
used; the joint run trains their sum. Every run is a stage of the experiment ``seed<k>`` (stage 1 is
``language``, the others are named after their condition, the code conditions with parent ``language``)
with the configs of ``configs/`` and overrides, run by ``lightning_modules.pipeline.run_stage`` (the
pipeline's own orchestration: one ``stagewise fit`` subprocess each, resumed if interrupted), spread over
``--devices`` (one worker per entry: list a GPU twice for two runs on it). Every run hands on and is scored
by its **final** weights (``--best_checkpoint.keep final``; the last validation is at the run's last step);
validation uses the same held-out windows of each domain in all runs.

    stagewise prepare -c configs/data/study.yaml
    python -m experiments.staged_vs_joint --size small --seeds 1 2 3 --devices 0 1

One H100, one worker, ``small`` at the default budget (10M + 4 × 2.5M + 12.5M tokens): 244 s per seed, of which
~13 s per run is process start-up; ``--compile`` adds ~25 s of compilation per run, more than it saves here.

Writes ``--out``: ``results.json`` (every run), ``results.md`` (mean ± std per condition and a verdict on each
seed claim by the rules it states), ``quality_vs_time.png``, ``loss_vs_tokens.png``; TensorBoard runs (and each run's ``result.json`` and logs)
under ``runs/seed<k>/<condition>/``, checkpoints and stage records under ``models/seed<k>/``. Re-running with
the same ``--out`` skips the runs whose result exists with the same command line (after a timeout, only the
missing runs train).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import shutil
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from datamodules.errors import StagewiseError
from datamodules.metric_names import domain_of_val_loss, val_tokens_loss
from datamodules.stage_record import read_stage_record
from experiments.benchmark_throughput import card
from lightning_modules.pipeline import StageSpec, Workspace, fit_command, run_stage
from lightning_modules.report import plot_loss_vs_tokens, read_scalars

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
DOMAINS = ("language", "code")
CONDITIONS = ("staged", "staged_lr1e-5", "replay5", "replay25", "joint")
STAGE1 = "language"  # the shared stage 1's name in runs/ and results.json
MIN_EFFECT = 0.02  # nats: below this a difference of held-out losses counts as no difference, whatever the seeds say
PLOTS = ["quality_vs_time.png", "loss_vs_tokens.png"]
TIME_SUPPORTED, TIME_NOT_SUPPORTED = 1.25, 1.5  # staged path wall time / joint wall time thresholds (claim 3)

console = Console(highlight=False, soft_wrap=True)


# ----------------------------------------------------------------------------------------------- plan
@dataclass
class Budget:
    """Optimizer steps of each kind of run (each a multiple of the validation points) and tokens per step."""

    tokens_per_step: int
    language_steps: int
    code_steps: int

    @property
    def joint_steps(self) -> int:
        return self.language_steps + self.code_steps


def plan_budget(args: argparse.Namespace) -> Budget:
    """Steps from tokens: stage 1 ``--language-tokens``; stage 2 ``--code-epochs`` epochs of a code corpus
    ``code_fraction / (1 - code_fraction)`` the size of the language data (``language_tokens / language_epochs``)."""
    per_step = args.seq_len * args.batch_size
    code_data = args.language_tokens / args.language_epochs * args.code_fraction / (1 - args.code_fraction)
    code_tokens = code_data * args.code_epochs

    def steps(tokens: float) -> int:  # a multiple of val_points, so the last validation is at the last step
        return args.val_points * max(1, round(tokens / per_step / args.val_points))

    return Budget(per_step, steps(args.language_tokens), steps(code_tokens))


@dataclass
class Run:
    """One stage of the study: stage ``condition`` of experiment ``seed<seed>``."""

    condition: str  # one of CONDITIONS, or STAGE1: the stage's name
    seed: int
    configs: list[str]
    lr: float
    steps: int
    args: list[str] = field(default_factory=list)  # overrides beyond the common ones
    parent: Run | None = None

    @property
    def name(self) -> str:
        return f"{self.condition}/seed{self.seed}"


def plan_runs(args: argparse.Namespace, budget: Budget) -> list[Run]:
    """Every run, seed by seed (stage 1 first: the seed's code stages wait for it)."""
    stage = lambda name: str(CONFIGS / "stages" / f"{name}.yaml")  # noqa: E731
    model = str(CONFIGS / "model" / f"{args.size}.yaml")
    code_lr = {"staged": 5e-6, "staged_lr1e-5": 1e-5, "replay5": 5e-6, "replay25": 5e-6}
    replay = {"replay5": 0.05, "replay25": 0.25}
    runs = []
    for seed in args.seeds:
        language = Run(STAGE1, seed, [stage("language"), model], args.language_lr, budget.language_steps,
                       ["--data.init_args.val_domains=[language, code]"])  # code's loss from the start of the curve
        runs.append(language)
        runs.append(Run("joint", seed, [str(CONFIGS / "baselines" / "joint.yaml"), model], args.language_lr,
                        budget.joint_steps, [_mixture({"language": 1 - args.code_fraction, "code": args.code_fraction})]))
        for condition in CONDITIONS[:-1]:
            configs, extra = [stage("code")], []
            if condition in replay:
                configs.append(stage("code_replay"))
                extra.append(_mixture({"code": 1 - replay[condition], "language": replay[condition]}))
            runs.append(Run(condition, seed, configs + [model], code_lr[condition], budget.code_steps,
                            extra, parent=language))
    return runs


def _mixture(fractions: dict[str, float]) -> str:
    return f"--data.init_args.mixture={json.dumps({d: round(f, 6) for d, f in fractions.items()})}"


def _rel(path: Path) -> str:
    """``path`` relative to the repository when inside it (the subprocesses run there), else absolute."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def workspace(out: Path, run: Run, args: argparse.Namespace) -> Workspace:
    """The study's experiment of ``run``'s seed and its directories (relative to the repository, where it runs)."""
    return Workspace(f"seed{run.seed}", _rel(out / "models"), _rel(out / "runs"), _rel(args.data_dir))


def run_dir(out: Path, run: Run) -> Path:
    return out / "runs" / f"seed{run.seed}" / run.condition


def best_checkpoint(out: Path, run: Run) -> Path:
    return out / "models" / f"seed{run.seed}" / f"{run.condition}_model_best.ckpt"


def stage_spec(run: Run, args: argparse.Namespace, cpu: bool) -> StageSpec:
    """The stage of ``run``: its configs and the overrides that make the study's budget."""
    interval = run.steps // args.val_points
    overrides = [
        f"--seed_everything={run.seed}",
        f"--trainer.max_steps={run.steps}",
        "--trainer.max_epochs=-1",
        f"--trainer.val_check_interval={interval}",
        "--trainer.check_val_every_n_epoch=null",
        "--trainer.limit_val_batches=1.0",
        f"--trainer.log_every_n_steps={max(1, min(50, run.steps // 20))}",
        f"--trainer.accelerator={'cpu' if cpu else 'gpu'}",
        "--trainer.devices=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.callbacks=[]",  # wall times are compared: no text samples or throughput probes
        # The final weights are handed on and scored: every validation replaces the file, the last one is at the
        # last step. The next stage starts from them and resumes use last.ckpt, so weights only.
        "--best_checkpoint.keep=final",
        "--best_checkpoint.save_weights_only=true",
        "--handoff.export_hf=false",
        f"--model.init_args.lr={run.lr:g}",
        f"--model.init_args.warmup_steps={min(args.warmup_steps, max(1, run.steps // 10))}",
        f"--model.init_args.compile={str(args.compile).lower()}",
        f"--data.init_args.seq_len={args.seq_len}",
        f"--data.init_args.batch_size={args.batch_size}",
        f"--data.init_args.seed={run.seed}",
        f"--data.init_args.val_max_windows={args.val_windows}",
    ]
    return StageSpec(run.condition, [_rel(Path(c)) for c in run.configs], overrides + run.args)


def fit_command_of(run: Run, args: argparse.Namespace, out: Path, cpu: bool) -> list[str]:
    """The ``stagewise fit`` command line of ``run`` (run from the repository root)."""
    return fit_command(stage_spec(run, args, cpu), run.parent and run.parent.condition, workspace(out, run, args))


# -------------------------------------------------------------------------------------------- execute
def execute(run: Run, args: argparse.Namespace, device: str, out: Path) -> dict:
    """Run one stage on ``device`` through the pipeline's ``run_stage`` and return its result record
    (``status`` ok or failed)."""
    cmd = fit_command_of(run, args, out, device == "cpu")
    env = {} if device == "cpu" else {"CUDA_VISIBLE_DEVICES": device}
    record = {"condition": run.condition, "seed": run.seed, "lr": run.lr,
              "parent": run.parent.name if run.parent else None, "device": device, "card": "cpu" if device == "cpu" else card(device),
              "command": shlex.join(["python", *cmd[1:]]), "date": _now()}
    start = time.perf_counter()
    try:
        run_stage(stage_spec(run, args, device == "cpu"), run.parent and run.parent.condition,
                  workspace(out, run, args), env=env, log_to_files=True, cwd=ROOT)
    except StagewiseError as err:
        stderr = run_dir(out, run) / "stderr.log"
        tail = stderr.read_text(errors="replace")[-3000:] if stderr.exists() else str(err)
        return record | {"status": "failed", "stderr_tail": tail, "process_time_s": round(time.perf_counter() - start, 2)}
    record["process_time_s"] = round(time.perf_counter() - start, 2)
    stage = read_stage_record(out / "models" / f"seed{run.seed}", run.condition)
    curves = {}
    for tag, points in read_scalars(run_dir(out, run), "val_tokens/").items():  # val_tokens/<domain>/loss
        curves[domain_of_val_loss(tag, axis="val_tokens")] = [[int(step), value] for step, value, _ in points]
    return record | {
        "status": "ok",
        "losses": {"final": stage["losses"]["final"], "curve": curves},
        "tokens": stage["tokens"],
        "optimizer_steps": stage["optimizer_steps"],
        "wall_time_s": stage["wall_time_s"],  # inside fit: training, validation and checkpoint saving
        "precision": stage.get("precision"),
        "mixture": stage.get("replay"),
    }


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def run_all(runs: list[Run], args: argparse.Namespace, out: Path, on_result=None) -> dict[str, dict]:
    """Run every run not yet done (or whose command changed) on the devices' workers; return all results by name.
    ``on_result(results)`` is called (one call at a time) after every finished run with the results so far."""
    cpu = args.devices[0] == "cpu"
    results: dict[str, dict] = {}
    todo: list[Run] = []
    for run in runs:
        path = run_dir(out, run) / "result.json"
        cmd = fit_command_of(run, args, out, cpu)
        old = json.loads(path.read_text()) if path.exists() else None
        parent_reruns = run.parent is not None and run.parent in todo
        same = old and old.get("status") == "ok" and old.get("command") == shlex.join(["python", *cmd[1:]])
        if same and not parent_reruns:
            results[run.name] = old
            console.print(f"[dim]{run.name}: done earlier ({path}), skipped[/]")
        else:
            todo.append(run)
    pending, ready, summary_lock = list(todo), threading.Condition(), threading.Lock()
    finished = [0]

    def next_run() -> Run | None:
        with ready:
            while pending:
                for run in pending:
                    parent = run.parent
                    if parent is None or parent.name in results:
                        pending.remove(run)
                        return run
                ready.wait()
            return None

    def worker(device: str) -> None:
        while (run := next_run()) is not None:
            parent = results.get(run.parent.name) if run.parent else None
            if parent is not None and parent["status"] != "ok":
                result = {"condition": run.condition, "seed": run.seed, "status": "failed",
                          "stderr_tail": f"not run: its stage 1 ({run.parent.name}) failed"}
            else:
                console.print(f"[bold]start[/] {run.name} (lr {run.lr:g}, {run.steps} steps) on {device}")
                try:
                    result = execute(run, args, device, out)
                except Exception as err:  # noqa: BLE001  (a broken run must not stop the study)
                    result = {"condition": run.condition, "seed": run.seed, "status": "failed",
                              "stderr_tail": f"{type(err).__name__}: {err}"}
            (run_dir(out, run)).mkdir(parents=True, exist_ok=True)
            (run_dir(out, run) / "result.json").write_text(json.dumps(result, indent=1))
            if result["status"] == "ok":
                final = result["losses"]["final"]
                losses = ", ".join(f"{d} {final[d]:.3f}" for d in DOMAINS if d in final)
                console.print(f"[green]done[/]  {run.name} in {result['process_time_s']:.0f}s "
                              f"(fit {result['wall_time_s']:.0f}s): {losses}")
                if not args.keep_checkpoints:
                    shutil.rmtree(run_dir(out, run) / "checkpoints", ignore_errors=True)  # last.ckpt, unused here
            else:
                console.print(f"[red]failed[/] {run.name}: {result['stderr_tail'][-600:]}")
            with ready:
                results[run.name] = result
                finished[0] += 1
                console.print(f"[dim]{finished[0]}/{len(todo)} runs finished[/]")
                ready.notify_all()
                snapshot = {r.name: results[r.name] for r in runs if r.name in results}
            if on_result is not None:
                with summary_lock:
                    on_result(snapshot)

    threads = [threading.Thread(target=worker, args=(d,), daemon=True) for d in args.devices]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if not args.keep_checkpoints:  # stage 1's weights are needed only by its code stages
        for run in runs:
            if run.condition != STAGE1:
                best_checkpoint(out, run).unlink(missing_ok=True)
    return {run.name: results[run.name] for run in runs}


# ---------------------------------------------------------------------------------------- summarize
def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def clearly_positive(values: list[float], min_effect: float = MIN_EFFECT) -> bool:
    """The rule behind every verdict: per-seed values whose mean exceeds both twice their standard deviation
    over seeds and ``min_effect``."""
    if not values:
        return False
    mean, std = mean_std(values)
    return mean > max(2 * std, min_effect)


def paths(results: dict[str, dict]) -> dict[str, dict[int, dict]]:
    """Per condition (and stage 1), per seed: final losses, total tokens and wall time of the whole path
    (a staged condition's time includes its stage 1). Failed runs are left out."""
    out: dict[str, dict[int, dict]] = {}
    for r in results.values():
        if r.get("status") != "ok":
            continue
        wall, process = r["wall_time_s"], r["process_time_s"]
        if r.get("parent"):
            parent = results.get(r["parent"])
            if not parent or parent.get("status") != "ok":
                continue
            wall, process = wall + parent["wall_time_s"], process + parent["process_time_s"]
        out.setdefault(r["condition"], {})[r["seed"]] = {
            "losses": r["losses"]["final"], "tokens": r["tokens"]["total"], "wall_time_s": wall, "process_time_s": process}
    return out


def _paired(a: dict[int, dict], b: dict[int, dict], value) -> list[float]:
    """``value(a[seed]) - value(b[seed])`` for the seeds both have."""
    return [value(a[s]) - value(b[s]) for s in sorted(set(a) & set(b))]


def _fmt(values: list[float], digits: int = 3) -> str:
    if not values:
        return "–"
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def verdicts(by_condition: dict[str, dict[int, dict]], min_effect: float = MIN_EFFECT) -> list[tuple[str, str, str]]:
    """(claim, verdict, the numbers behind it) for each of the seed's three claims, by the rules of RULES."""
    loss = lambda d: (lambda p: p["losses"][d])  # noqa: E731
    staged, joint = by_condition.get("staged", {}), by_condition.get("joint", {})
    lr1e5, stage1 = by_condition.get("staged_lr1e-5", {}), by_condition.get(STAGE1, {})
    out = []

    claim = "(1) staged training beats joint training per domain at equal tokens"
    if not set(staged) & set(joint):
        out.append((claim, "not measured", "no seed has both a staged and a joint result"))
    else:
        better, notes = [], []
        for d in DOMAINS:
            gain = _paired(joint, staged, loss(d))  # > 0: staged's loss is lower
            better.append(clearly_positive(gain, min_effect))
            worse = clearly_positive([-g for g in gain], min_effect)
            which = "staged clearly lower" if better[-1] else "joint clearly lower" if worse else "no clear difference"
            notes.append(f"{d}: joint − staged = {_fmt(gain)} ({which})")
        verdict = "supported" if all(better) else "not supported" if not any(better) else "mixed"
        out.append((claim, verdict, "; ".join(notes)))

    claim = "(2) stage-2 LR 1e-5 forgets language while 5e-6 keeps it"
    if not set(stage1) & set(lr1e5) or not set(stage1) & set(staged):
        out.append((claim, "not measured", "stage 1 or a stage-2 condition has no result"))
    else:
        rise_hi = _paired(lr1e5, stage1, loss("language"))  # language loss after stage 2 − after stage 1
        rise_lo = _paired(staged, stage1, loss("language"))
        forgets_hi, forgets_lo = clearly_positive(rise_hi, min_effect), clearly_positive(rise_lo, min_effect)
        verdict = "not supported" if not forgets_hi else "mixed" if forgets_lo else "supported"
        lang_hi = [p["losses"]["language"] for p in lr1e5.values()]
        out.append((claim, verdict, f"language-loss rise over stage 2: LR 1e-5 {_fmt(rise_hi)} "
                                    f"({'clear rise' if forgets_hi else 'no clear rise'}), LR 5e-6 {_fmt(rise_lo)} "
                                    f"({'clear rise' if forgets_lo else 'no clear rise'}); language loss after LR 1e-5: "
                                    f"{_fmt(lang_hi)} (seed: 6.6)"))

    claim = "(3) the staged path costs only a little more wall time than joint training"
    ratios = [staged[s]["wall_time_s"] / joint[s]["wall_time_s"] for s in sorted(set(staged) & set(joint))]
    if not ratios:
        out.append((claim, "not measured", "no seed has both a staged and a joint result"))
    else:
        r = statistics.fmean(ratios)
        verdict = "supported" if r <= TIME_SUPPORTED else "not supported" if r > TIME_NOT_SUPPORTED else "mixed"
        out.append((claim, verdict, f"staged path / joint wall time = {_fmt(ratios, 2)} "
                                    f"(staged {_fmt([p['wall_time_s'] for p in staged.values()], 0)} s, "
                                    f"joint {_fmt([p['wall_time_s'] for p in joint.values()], 0)} s)"))
    return out


RULES = f"""\
Rules (a value "clearly" exceeds another when the mean over seeds of their per-seed difference is larger
than twice that difference's standard deviation over seeds and larger than {MIN_EFFECT} nats; with one seed
only the {MIN_EFFECT}-nat floor applies, so one-seed verdicts are indicative):
1. supported if staged's final held-out loss is clearly lower than joint's in both domains; not supported
   if in neither; mixed if in one.
2. language-loss rise over stage 2 = final language loss of the stage-2 run − final language loss of its
   stage 1 (same seed). Supported if LR 1e-5 clearly rises and 5e-6 does not; not supported if 1e-5 does not
   clearly rise; mixed if both clearly rise.
3. ratio = wall time of the staged path (stage 1 + stage 2 `fit`) / joint's, mean over seeds. Supported if
   ≤ {TIME_SUPPORTED}; not supported if > {TIME_NOT_SUPPORTED}; mixed in between."""


def table(by_condition: dict[str, dict[int, dict]]) -> list[str]:
    """Markdown table of mean ± std over seeds per condition (stage 1 alone first, for reference)."""
    lines = ["| condition | seeds | language loss | code loss | total tokens (M) | wall time (s) | process time (s) |",
             "|---|---|---|---|---|---|---|"]
    for condition in (STAGE1, *CONDITIONS):
        seeds = by_condition.get(condition, {})
        if not seeds:
            lines.append(f"| {condition} | 0 | – | – | – | – | – |")
            continue
        p = list(seeds.values())
        label = "stage 1 only (language)" if condition == STAGE1 else condition
        lines.append(" | ".join([
            f"| {label}", str(len(p)),
            *(_fmt([x["losses"][d] for x in p if d in x["losses"]]) for d in DOMAINS),
            _fmt([x["tokens"] / 1e6 for x in p], 2), _fmt([x["wall_time_s"] for x in p], 0),
            _fmt([x["process_time_s"] for x in p], 0)]) + " |")
    return lines


def write_markdown(out: Path, study: dict, results: dict[str, dict], plots: list[str]) -> str:
    by_condition = paths(results)
    b = study["budget"]
    lines = [
        "# Staged vs joint training: the seed's claims, measured", "",
        f"Command: `{study['command']}`  ", f"Date: {study['date']}  ", f"Card: {', '.join(study['cards'])}  ",
        f"Model: `{study['size']}`, seq_len {study['seq_len']}, batch {study['batch_size']} "
        f"({b['tokens_per_step']:,} tokens per step), seeds {study['seeds']}  ",
        f"Workers: {len(study['devices'])} on devices {study['devices']}"
        + (" (several runs shared a device at times, so their wall times include that sharing; claim 3 is "
           "measured cleanly with one worker per device)" if len(set(study["devices"])) < len(study["devices"]) else "")
        + "  ",
        f"Budget: stage 1 {b['language_steps']:,} steps ({b['language_steps'] * b['tokens_per_step'] / 1e6:.2f}M tokens, "
        f"LR {study['language_lr']:g}); stage 2 {b['code_steps']:,} steps "
        f"({b['code_steps'] * b['tokens_per_step'] / 1e6:.2f}M tokens, LR 5e-6 or 1e-5); joint {b['joint_steps']:,} "
        f"steps at LR {study['language_lr']:g}, mixture language/code "
        f"{1 - study['code_fraction']:.2f}/{study['code_fraction']:.2f}  ",
        "",
        "Every number is the **final** weights' held-out loss (the last validation is at each run's last step; "
        "stage 2 starts from stage 1's final weights), on the same validation windows of each domain "
        f"(at most {study['val_windows']} per domain). Compare within a column only. Wall time is `fit`'s "
        "(training, validation, checkpointing; a staged condition adds its stage 1's); process time adds "
        "interpreter start-up and data loading.", "",
        "## Final held-out loss per domain (mean ± std over seeds)", "", *table(by_condition), "",
        "## The seed's claims", "",
    ]
    for claim, verdict, numbers in verdicts(by_condition, study["min_effect"]):
        lines.append(f"- {claim}: **{verdict}**. {numbers}.")
    lines += ["", RULES]
    failed = [r for r in results.values() if r.get("status") != "ok"]
    if failed:
        lines += ["", "## Failed runs", ""]
        for r in failed:
            last = (r.get("stderr_tail") or "").strip().splitlines() or ["(no stderr)"]
            name = f"{r['condition']}/seed{r['seed']}"
            lines.append(f"- {name}: `{last[-1]}` (stderr: runs/seed{r['seed']}/{r['condition']}/stderr.log)")
    lines += ["", "## Plots", "", *(f"![{p}]({p})" for p in plots)]
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    return text


def plot(out: Path, results: dict[str, dict]) -> list[str]:
    """``quality_vs_time.png`` (final loss vs the path's wall time, per domain) and ``loss_vs_tokens.png``
    (held-out loss along total tokens, mean over seeds, one line per condition: ``report.plot_loss_vs_tokens``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_condition = paths(results)
    color = {c: f"C{i}" for i, c in enumerate((*CONDITIONS, STAGE1))}
    fig, axes = plt.subplots(1, len(DOMAINS), figsize=(5 * len(DOMAINS), 3.8), squeeze=False)
    for ax, d in zip(axes[0], DOMAINS):
        for c in CONDITIONS:
            p = [x for x in by_condition.get(c, {}).values() if d in x["losses"]]
            if not p:
                continue
            t, y = [x["wall_time_s"] / 60 for x in p], [x["losses"][d] for x in p]
            ax.scatter(t, y, color=color[c], alpha=0.35, s=14)
            (tm, ts), (ym, ys) = mean_std(t), mean_std(y)
            ax.errorbar([tm], [ym], xerr=[ts], yerr=[ys], fmt="o", color=color[c], label=c, capsize=3)
        ax.set(title=f"{d}: final held-out loss vs wall time", xlabel="wall time of the path (min)", ylabel="loss")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    _save(fig, out / "quality_vs_time.png")

    curves, starts = mean_curves(results)
    staged = [c for c in CONDITIONS[:-1] if c in curves]
    baselines = [c for c in ("joint",) if c in curves]
    fig, axes = plt.subplots(1, len(DOMAINS), figsize=(5 * len(DOMAINS), 3.8), squeeze=False)
    for ax, d in zip(axes[0], DOMAINS):
        plot_loss_vs_tokens(ax, d, curves, staged, baselines, color, starts)
        ax.set_title(f"{d}: held-out loss (mean over seeds)")
    _save(fig, out / "loss_vs_tokens.png")
    return PLOTS


def mean_curves(results: dict[str, dict]) -> tuple[dict[str, dict[str, list]], dict[str, int]]:
    """Per condition, each domain's held-out loss along total tokens, mean over the seeds of ``paths`` (a staged
    condition's curve is its stage 1's followed by its own), as ``read_scalars`` series
    (``val_tokens/<domain>/loss``: [(tokens, loss, 0)]); and where each staged condition's stage 2 starts."""
    by_condition = paths(results)
    curves, starts = {}, {}
    for r in results.values():
        if r.get("condition") not in CONDITIONS or r.get("seed") not in by_condition.get(r["condition"], {}):
            continue
        parent = results[r["parent"]] if r.get("parent") else None
        for run in ([parent] if parent else []) + [r]:
            for d, points in run["losses"]["curve"].items():
                by_tokens = curves.setdefault(r["condition"], {}).setdefault(val_tokens_loss(d), {})
                for tokens, value in points:
                    by_tokens.setdefault(tokens, []).append(value)
        if parent:
            starts[r["condition"]] = parent["tokens"]["total"]
    return ({c: {tag: [(t, statistics.fmean(v[t]), 0.0) for t in sorted(v)] for tag, v in tags.items()}
             for c, tags in curves.items()}, starts)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.staged_vs_joint", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", default="small", help="model preset: tiny, small, base (configs/model/<size>.yaml)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="one run of every condition per seed")
    p.add_argument("--language-tokens", type=float, default=10e6, help="tokens trained in stage 1")
    p.add_argument("--language-epochs", type=float, default=3, help="epochs over the language data those tokens make")
    p.add_argument("--code-epochs", type=float, default=10, help="epochs of stage 2 over the code data")
    p.add_argument("--code-fraction", type=float, default=0.07,
                   help="code share of all data (code data = fraction / (1 - fraction) × language data); joint's mixture")
    p.add_argument("--language-lr", type=float, default=3e-5,
                   help="peak LR of stage 1 and of joint (both from scratch); the seed recipe's is 3e-5")
    p.add_argument("--warmup-steps", type=int, default=300, help="LR warmup (the seed's), at most 10%% of a run's steps")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16, help="sequences per optimizer step")
    p.add_argument("--val-points", type=int, default=10, help="validations per run, evenly spaced, the last at its end")
    p.add_argument("--val-windows", type=int, default=128, help="held-out windows of seq_len per domain")
    p.add_argument("--devices", nargs="+", default=["cpu"],
                   help="GPU ids, one worker each (repeat an id for two runs on it); `cpu` runs on the CPU "
                        "(`cpu cpu`: two at once)")
    p.add_argument("--data-dir", type=Path, default=ROOT / "data" / "study", help="prepared by configs/data/study.yaml")
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "staged_vs_joint")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile every run")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep every run's checkpoints (default: only stage 1's)")
    p.add_argument("--min-effect", type=float, default=MIN_EFFECT, help="smallest loss difference (nats) a verdict counts")
    args = p.parse_args(argv)
    if "cpu" in args.devices and set(args.devices) != {"cpu"}:
        p.error("--devices is either GPU ids or `cpu` (repeated: that many runs at once on the CPU)")
    if not 0 < args.code_fraction < 1:
        p.error("--code-fraction must be in (0, 1)")
    return args


def check_data(data_dir: Path) -> None:
    missing = [d for d in DOMAINS if not (data_dir / d / "manifest.json").is_file()]
    if missing or not (data_dir / "tokenizer").is_dir():
        raise SystemExit(f"staged_vs_joint: no prepared {', '.join(missing) or 'tokenizer'} in {data_dir}; prepare the "
                         "study's corpora first:\n  python -m lightning_modules prepare -c configs/data/study.yaml"
                         "\n(or pass --data-dir to a directory prepared with language and code corpora)")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    check_data(args.data_dir)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    budget = plan_budget(args)
    runs = plan_runs(args, budget)
    train_tokens = {d: json.loads((args.data_dir / d / "manifest.json").read_text())["tokens"]["train"] for d in DOMAINS}
    console.print(f"[bold]staged vs joint[/]: {len(runs)} runs ({args.size}, seeds {args.seeds}) on {args.devices}; "
                  f"stage 1 {budget.language_steps} steps = {budget.language_steps * budget.tokens_per_step / 1e6:.2f}M "
                  f"tokens ({budget.language_steps * budget.tokens_per_step / train_tokens['language']:.1f} epochs of "
                  f"{train_tokens['language'] / 1e6:.2f}M), stage 2 {budget.code_steps} steps "
                  f"({budget.code_steps * budget.tokens_per_step / train_tokens['code']:.1f} epochs of "
                  f"{train_tokens['code'] / 1e6:.2f}M), joint {budget.joint_steps} steps")
    start = time.perf_counter()
    study = {
        "command": shlex.join(["python", "-m", "experiments.staged_vs_joint", *(sys.argv[1:] if argv is None else argv)]),
        "date": _now(), "size": args.size, "seeds": args.seeds, "devices": args.devices, "seq_len": args.seq_len,
        "batch_size": args.batch_size, "language_lr": args.language_lr, "code_fraction": args.code_fraction,
        "val_windows": args.val_windows, "min_effect": args.min_effect, "data_train_tokens": train_tokens,
        "budget": {"tokens_per_step": budget.tokens_per_step, "language_steps": budget.language_steps,
                   "code_steps": budget.code_steps, "joint_steps": budget.joint_steps},
        "weights": "final",
    }

    def summarize(results: dict[str, dict], plots: bool = False) -> str:
        """results.json and results.md of the runs so far, and at the end the plots (rewritten after every run:
        a study cut short by a time limit still leaves its summary)."""
        study["cards"] = sorted({r["card"] for r in results.values() if r.get("card")})
        study["study_wall_time_s"] = round(time.perf_counter() - start, 1)
        (out / "results.json").write_text(json.dumps({"study": study, "runs": list(results.values())}, indent=1))
        return write_markdown(out, study, results, plot(out, results) if plots else PLOTS)

    results = run_all(runs, args, out, on_result=summarize)
    text = summarize(results, plots=True)
    print(text[text.index("## Final"):text.index("## Plots")].rstrip())
    console.print(f"results: {out / 'results.md'} ({study['study_wall_time_s']:.0f}s)")
    return {"study": study, "runs": results}


if __name__ == "__main__":
    main()
