"""`stagewise report`: a markdown table and plots of an experiment's stages and baselines.

Everything comes from what the runs wrote: ``models/<experiment>/<stage>/stage.json`` for the final
numbers and TensorBoard event files under ``runs/<experiment>/<stage>/`` for the curves. Losses of
different domains are never compared with each other: every table column and plot is one domain. The
lineage is checked, not assumed: a stage whose checkpoint or parent no longer matches its record is
flagged in the table and explained under "Lineage".
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from datamodules.command import run_function
from datamodules.errors import StagewiseError
from datamodules.metric_names import val_loss, val_tokens_loss
from datamodules.stage_record import lineage_problems, read_stage_record
from datamodules.preference import PREFERENCE
from lightning_modules.report_card import card_markdown, report_card, write_report_card


def read_scalars(run_dir: Path, prefix: str) -> dict[str, list[tuple[float, float, float]]]:
    """All scalar series under ``run_dir`` whose tag starts with ``prefix``: tag -> [(step, value, wall_time)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, list[tuple[float, float, float]]] = {}
    for events in sorted(run_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            if tag.startswith(prefix):
                series.setdefault(tag, []).extend((e.step, e.value, e.wall_time) for e in acc.Scalars(tag))
    return {tag: sorted(points) for tag, points in series.items()}


def _fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _table(records: dict[str, dict], domains: list[str], broken: dict[str, list[str]]) -> list[str]:
    head = ["run", "parent", "stage tokens", "total tokens", "wall time"]
    head += [f"{d} loss" for d in domains] + ["tools json / name / call"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in records.items():
        final = r.get("losses", {}).get("final", {})
        tools = r.get("tools") or {}
        scores = _tool_scores(tools)
        parent = (r.get("parent") or {}).get("stage") or "–"
        row = [f"{name} (lineage broken)" if broken.get(name) else name, parent, f"{r.get('tokens', {}).get('stage', 0):,}", f"{r.get('tokens', {}).get('total', 0):,}",
               f"{r.get('wall_time_s', 0):.0f}s"]
        row += [_fmt(final.get(d)) for d in domains] + [scores if tools else "–"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _forgetting(records: dict[str, dict]) -> list[str]:
    lines = []
    for name, r in records.items():
        for domain, f in (r.get("forgetting") or {}).items():
            alarms = ", ".join(f"{a.get('level')}@{a.get('step')}" for a in f.get("alarms", [])) or "none"
            lines.append(f"| {name} | {domain} | {_fmt(f.get('baseline'))} | {_fmt(f.get('final'))} | "
                         f"{100 * f.get('max_rise', 0):+.1f}% (step {f.get('max_rise_step')}) | {alarms} |")
    if not lines:
        return []
    return ["", "## Forgetting (held-out loss of earlier domains vs the stage's start)", "",
            "| stage | domain | baseline | final | worst rise | alarms |", "|---|---|---|---|---|---|", *lines]


def _tool_scores(tools: dict | None) -> str:
    """``json / name / call`` of the seen services, and the unseen services' call accuracy where there are some."""
    tools = tools or {}
    scores = " / ".join(_fmt(tools.get(k), 2) for k in ("json_valid", "name_accuracy", "call_accuracy"))
    if "unseen" in tools:  # services no training example calls
        scores += f" (unseen services: call {_fmt(tools['unseen'].get('call_accuracy'), 2)})"
    return scores


def _at_step(points: list[tuple[float, float, float]], step: float) -> float | None:
    """The value logged by the validation that made the checkpoint of optimizer step ``step`` (every tag of a
    validation carries its optimizer step), else the last one."""
    before = [p for p in points if p[0] <= step] or points
    return before[-1][1] if before else None


def _preference(records: dict[str, dict], experiment_dir: Path, experiment_models: Path) -> list[str]:
    """Stages trained on preference pairs: held-out pair metrics at the best checkpoint, tool scores before
    (the parent's) and after."""
    lines = []
    for name, r in records.items():
        if PREFERENCE not in (r.get("losses") or {}).get("final", {}):
            continue
        # at the best checkpoint: the record's values (val_metrics, losses), else the event files'
        recorded = {**((r.get("val_metrics") or {}).get("best") or {})}
        if ((r.get("losses") or {}).get("best") or {}).get(PREFERENCE) is not None:
            recorded[f"val/{PREFERENCE}/loss"] = r["losses"]["best"][PREFERENCE]
        tags = {m: f"val/{PREFERENCE}/{m}" for m in ("reward_accuracy", "reward_margin", "loss")}
        series = read_scalars(experiment_dir / name, f"val/{PREFERENCE}/") if set(tags.values()) - set(recorded) else {}
        at_best = {m: recorded[t] if t in recorded else _at_step(series.get(t, []), r.get("best_step", math.inf))
                   for m, t in tags.items()}
        parent = (r.get("parent") or {}).get("stage")
        before = (records.get(parent) or read_stage_record(experiment_models, parent) or {}) if parent else {}
        lines.append(f"| {name} | {parent or '–'} | {_fmt(at_best['reward_accuracy'], 2)} | "
                     f"{_fmt(at_best['reward_margin'])} | {_fmt(at_best['loss'])} | "
                     f"{_tool_scores(before.get('tools'))} → {_tool_scores(r.get('tools'))} |")
    if not lines:
        return []
    return ["", "## Preference tuning (held-out pairs at the best checkpoint; at a stage's start: accuracy 0, "
            "margin 0, loss 0.693)", "",
            "| stage | parent | reward accuracy | reward margin | pair loss | tools json / name / call: parent → stage |",
            "|---|---|---|---|---|---|", *lines]


def plot_loss_vs_tokens(ax, domain: str, runs: dict[str, dict[str, list]], stages: list[str], baselines: list[str],
                        color: dict[str, str], starts: dict[str, float] | None = None) -> None:
    """Draw one domain's held-out loss against the lineage's total tokens (``val_tokens/<domain>/loss``) on ``ax``.

    ``runs`` maps a run's name to its scalars (``read_scalars``). Stages are solid lines with a grey
    vertical line where each starts: at ``starts[name]`` tokens when ``starts`` is given (stages absent
    from it get none), else at the stage's first validation. Baselines are dashed.
    """
    for name in stages + baselines:
        points = runs[name].get(val_tokens_loss(domain))
        if points:
            ax.plot([p[0] / 1e6 for p in points], [p[1] for p in points], marker=".", color=color[name],
                    label=name, linestyle="--" if name in baselines else "-")
            start = points[0][0] if starts is None else starts.get(name)
            if name in stages and start is not None:
                ax.axvline(start / 1e6, color="grey", linewidth=0.5)
    ax.set(title=f"{domain}: held-out loss", xlabel="total tokens seen (M)", ylabel="loss")
    if ax.get_legend_handles_labels()[0]:  # no run validated this domain: no empty legend (and no warning)
        ax.legend(fontsize=8)


def _plots(experiment_dir: Path, stages: list[str], baselines: list[str], domains: list[str]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {name: read_scalars(experiment_dir / name, "val") for name in stages + baselines}
    if not any(series for run in runs.values() for series in run.values()):
        return []  # no TensorBoard curves here (a report written from the records alone): no empty plots
    color = {name: f"C{i}" for i, name in enumerate(stages + baselines)}  # one colour per run in every panel
    files = []
    # 1. Per-domain held-out loss against total tokens, the stages as one curve with boundaries.
    fig, axes = plt.subplots(1, len(domains), figsize=(5 * len(domains), 3.6), squeeze=False)
    for ax, domain in zip(axes[0], domains):
        plot_loss_vs_tokens(ax, domain, runs, stages, baselines, color)
    fig.tight_layout()
    fig.savefig(experiment_dir / "loss_vs_tokens.png", dpi=110)
    files.append("loss_vs_tokens.png")
    plt.close(fig)
    # 2. The seed's "quality vs training time": staged path (stages back to back) vs baselines.
    fig, axes = plt.subplots(1, len(domains), figsize=(5 * len(domains), 3.6), squeeze=False)
    for ax, domain in zip(axes[0], domains):
        offset, xs, ys = 0.0, [], []
        for name in stages:  # the clock runs through every stage, also those that don't validate this domain
            stamps = [p[2] for series in runs[name].values() for p in series]
            if not stamps:
                continue
            t0 = min(stamps)
            points = runs[name].get(val_loss(domain), [])
            xs += [(offset + p[2] - t0) / 60 for p in points]
            ys += [p[1] for p in points]
            offset += max(stamps) - t0
        if xs:
            ax.plot(xs, ys, marker=".", label="staged", color="C0")
        for name in baselines:
            points = runs[name].get(val_loss(domain))
            if points:
                t0 = min(p[2] for s in runs[name].values() for p in s)
                ax.plot([(p[2] - t0) / 60 for p in points], [p[1] for p in points], marker=".",
                        linestyle="--", label=name, color=color[name])
        ax.set(title=f"{domain}: quality vs training time", xlabel="wall time (min)", ylabel="held-out loss")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(experiment_dir / "quality_vs_time.png", dpi=110)
    files.append("quality_vs_time.png")
    plt.close(fig)
    return files


def lineage(records: dict[str, dict], files: bool = True) -> dict[str, list[str]]:
    """Per run, every way its lineage is broken: its checkpoint or its parent's is not the file its record
    names (replaced or retrained since; only with ``files``), or its parent's record in this report describes
    other weights."""
    out = {}
    for name, r in records.items():
        problems = lineage_problems(r) if files else []
        parent = r.get("parent") or {}
        theirs = (records.get(parent.get("stage")) or {}).get("checkpoint") or {}
        if theirs.get("sha256") and parent.get("sha256") and theirs["sha256"] != parent["sha256"]:
            problems.append(f"the '{parent['stage']}' row of this report describes checkpoint {theirs['sha256'][:12]}…, "
                            f"not the {parent['sha256'][:12]}… '{name}' started from")
        if problems:
            out[name] = list(dict.fromkeys(problems))
    return out


def _lineage_lines(broken: dict[str, list[str]], names: list[str], files: bool = True) -> list[str]:
    if not broken:
        return ["", "Lineage: checked; every run's checkpoint and parent match their records (sha256)." if files else
                "Lineage: checked on the records alone (none of their checkpoints is here): every run's parent is "
                "the checkpoint its parent's record describes (sha256)."]
    lines = ["", "## Lineage: broken", "",
             "These rows do not describe one chain of checkpoints; re-run the stages named below (`--overwrite`):", ""]
    for name in names:
        lines += [f"- **{name}**: {problem}" for problem in broken.get(name, [])]
    return lines


def write_report(experiment: str, stages: list[str], baselines: list[str] | None = None,
                 models_dir: str = "models", runs_dir: str = "runs", data_dir: str | None = None,
                 command: str | None = None, card: str | None = None) -> Path:
    """Write ``<runs_dir>/<experiment>/report.md`` (+ PNG plots) and the report card ``report.json``
    (:mod:`lightning_modules.report_card`) and return the markdown's path; a broken lineage is reported in it
    and on stderr."""
    baselines = baselines or []
    experiment_models = Path(models_dir) / experiment
    records = {}
    for name in stages + baselines:
        record = read_stage_record(experiment_models, name)
        if record is None:
            raise StagewiseError(f"no record for stage '{name}' in {experiment_models / name / 'stage.json'}; "
                                 "run the stage first")
        records[name] = record
    # a report written from records alone (copied back from a GPU machine): the chain is checked on their hashes
    files = any(Path((r.get("checkpoint") or {}).get("path", "")).is_file() for r in records.values())
    broken = lineage(records, files)
    domains: list[str] = []
    for r in records.values():  # the held-out pairs have their own section, not a loss column
        domains += [d for d in r.get("losses", {}).get("final", {}) if d not in domains and d != PREFERENCE]
    experiment_dir = Path(runs_dir) / experiment
    experiment_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"# {experiment}: staged path {' → '.join(stages)}" + (f" vs {', '.join(baselines)}" if baselines else ""),
             "", "Final held-out loss per domain (lower is better; compare within a column only).", ""]
    lines += _table(records, domains, broken)
    lines += _lineage_lines(broken, stages + baselines, files)
    lines += _forgetting(records)
    lines += _preference(records, experiment_dir, experiment_models)
    report = report_card(experiment, stages, baselines, models_dir, data_dir, command, card)
    write_report_card(report, experiment_dir)
    lines += ["", "## Report card (`report.json`)", "", *card_markdown(report)]
    plots = _plots(experiment_dir, stages, baselines, domains)
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    path = experiment_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    for name, problems in broken.items():
        print(f"stagewise report: lineage broken for '{name}': {'; '.join(problems)}", file=sys.stderr)
    return path


def report(experiment: str, stages: list[str], baselines: list[str] | None = None,
           models_dir: str = "models", runs_dir: str = "runs", data_dir: str | None = None,
           card: str | None = None) -> None:
    """Write and print the report of finished runs, and its report card ``runs/<experiment>/report.json``.

    Args:
        experiment: The experiment name (``runs/<experiment>/``).
        stages: The staged path's stage names, in order.
        baselines: Runs compared with the staged path (e.g. ``joint``).
        models_dir: Root of the experiments' records (``<models_dir>/<experiment>/<stage>/stage.json``).
        runs_dir: Root of the TensorBoard runs.
        data_dir: The prepared data (for bits per byte; default: the first stage's).
        card: The machine the runs trained on, for a report written elsewhere from their records (default: the
            device the records name, else this machine).
    """
    import shlex

    command = shlex.join(["stagewise", "report", *sys.argv[2:]]) if sys.argv[1:2] == ["report"] else None
    path = write_report(experiment, stages, baselines, models_dir, runs_dir, data_dir, command, card)
    print(path.read_text())
    print(f"report: {path}")


def main(args: list[str] | None = None) -> None:
    """Entry point of ``stagewise report --experiment demo --stages [language,code,tools] --baselines [joint]``."""
    run_function(report, args, "stagewise report")
