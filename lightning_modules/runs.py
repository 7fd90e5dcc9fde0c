"""Load any runs directory for analysis: every run's TensorBoard scalars, where it starts on the lineage's
token axis, its parent, and its stage record; then the per-domain comparison table and loss-vs-tokens plots.

Layout read: ``<runs_dir>/<experiment>/<run>/events.out.tfevents.*`` (what ``stagewise fit`` writes for
stage ``<run>``) and, where present, each run's ``<models_dir>/<experiment>/<run>/stage.json`` (``load_runs``).
Directories named ``<stage>.<something>`` (runs moved aside, ``validate``/``test`` runs) are not training runs.
``notebooks/compare_runs.ipynb`` is these functions plus their output.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from datamodules.errors import StagewiseError
from datamodules.metric_names import STAGE_BOUNDARY, TRAIN_TOKENS, domain_of_val_loss, val_loss
from datamodules.stage_record import read_stage_record, stage_of_checkpoint
from lightning_modules.report import plot_loss_vs_tokens, read_scalars
from lightning_modules.stage import is_run_dir_name

Series = list[tuple[float, float, float]]  # [(step, value, wall_time)]


@dataclass
class Run:
    """One training run (a stage or a baseline) of an experiment.

    Args:
        name: The run's directory name, the stage's name for stagewise runs.
        scalars: Every scalar series of its event files: tag -> [(step, value, wall_time)].
        start_tokens: The lineage's tokens when the run started (its ``stage/boundary``): 0 from scratch.
        parent: The stage whose best checkpoint it started from, or None.
        record: Its ``stage.json`` when the models directory holds one of this experiment (see ``load_runs``).
        baseline: A from-scratch run that no other run continues, in an experiment that has a staged path.
        children: The runs of the experiment that started from this one's best checkpoint.
    """

    name: str
    scalars: dict[str, Series]
    start_tokens: int = 0
    parent: str | None = None
    record: dict | None = None
    baseline: bool = False
    children: list[str] = field(default_factory=list)

    def losses(self, domain: str) -> Series:
        """Held-out loss of ``domain`` at each validation, stepped by optimizer step."""
        return self.scalars.get(val_loss(domain), [])


def load_runs(runs_dir: str | Path = "runs", experiment: str | None = None,
              models_dir: str | Path = "models") -> dict[str, dict[str, Run]]:
    """Every run of ``experiment`` (None: of every experiment) under ``runs_dir``: experiment -> name -> Run.

    A run's ``stage.json`` is ``<models_dir>/<experiment>/<run>/stage.json``. Runs are ordered as a reader wants them: staged runs by
    where they start on the token axis, then baselines. Raises StagewiseError when there is nothing to load.
    """
    runs_dir = Path(runs_dir)
    names = [experiment] if experiment else sorted(p.name for p in runs_dir.glob("*") if p.is_dir())
    out = {}
    for exp in names:
        runs = _load_experiment(runs_dir / exp, exp, Path(models_dir))
        if runs:
            out[exp] = runs
        elif experiment:
            raise StagewiseError(f"no runs with TensorBoard event files under {runs_dir / exp}; check EXPERIMENT "
                                 f"(experiments there: {', '.join(_experiments(runs_dir)) or 'none'})")
    if not out:
        raise StagewiseError(f"no TensorBoard event files under {runs_dir}/<experiment>/<run>/; train first "
                             "(e.g. `make demo`) or point RUNS_DIR at a runs directory")
    return out


def _experiments(runs_dir: Path) -> list[str]:
    return sorted(p.parent.name for p in runs_dir.glob("*/*") if p.is_dir() and any(p.rglob("events.out.tfevents.*")))


def _load_experiment(experiment_dir: Path, experiment: str, models_dir: Path) -> dict[str, Run]:
    runs = {}
    for run_dir in sorted(p for p in experiment_dir.glob("*") if p.is_dir() and is_run_dir_name(p.name)):
        scalars = read_scalars(run_dir, "")
        if not scalars:
            continue
        record = read_stage_record(models_dir / experiment, run_dir.name)
        name = run_dir.name
        runs[name] = Run(name, scalars, _start_tokens(scalars, record), _parent(run_dir, record), record)
    for run in runs.values():
        if run.parent in runs:
            runs[run.parent].children.append(run.name)
    staged_path = any(r.parent for r in runs.values())
    for run in runs.values():
        run.baseline = staged_path and not run.parent and not run.children and run.start_tokens == 0
    return dict(sorted(runs.items(), key=lambda kv: (kv[1].baseline, kv[1].start_tokens, kv[0])))


def _start_tokens(scalars: dict[str, Series], record: dict | None) -> int:
    if scalars.get(STAGE_BOUNDARY):  # StageHandoff logs it at the lineage's tokens when the stage starts
        return int(scalars[STAGE_BOUNDARY][0][0])
    tokens = (record or {}).get("tokens") or {}
    return int(tokens.get("total", 0) - tokens.get("stage", 0))


def _parent(run_dir: Path, record: dict | None) -> str | None:
    if record is not None:
        return (record.get("parent") or {}).get("stage")
    hparams = run_dir / "hparams.yaml"  # TensorBoardLogger's copy of the module's init arguments
    # only its init_from line: the file holds python/tuple tags that a safe loader refuses
    line = re.search(r"^init_from:.*$", hparams.read_text(), re.M) if hparams.exists() else None
    init_from = yaml.safe_load(line.group(0))["init_from"] if line else None
    return stage_of_checkpoint(init_from) if init_from else None


def domains(runs: dict[str, Run]) -> list[str]:
    """The validated domains, in the order the runs first validate them."""
    out: list[str] = []
    for run in runs.values():
        for tag in run.scalars:
            domain = domain_of_val_loss(tag)
            if domain and domain not in out:
                out.append(domain)
    return out


def comparison_rows(runs: dict[str, Run]) -> list[dict]:
    """Per run: tokens trained, the lineage's total tokens at its end, wall time, and per domain the
    final and the lowest held-out loss. Tokens, wall time and final losses come from ``stage.json`` where
    present (``source``), else from the event files; the lowest loss always from the event files."""
    rows = []
    for run in runs.values():
        doms = domains({run.name: run})
        stamps = [p[2] for series in run.scalars.values() for p in series]
        train_tokens = run.scalars.get(TRAIN_TOKENS)
        r = run.record or {}
        tokens = (r.get("tokens") or {}).get("trained", int(train_tokens[-1][1]) if train_tokens else 0)
        final = (r.get("losses") or {}).get("final") or {d: run.losses(d)[-1][1] for d in doms}
        rows.append({"run": run.name, "parent": run.parent, "baseline": run.baseline, "tokens": int(tokens),
                     "total_tokens": run.start_tokens + int(tokens),
                     "wall_time_s": float(r.get("wall_time_s", max(stamps) - min(stamps))),
                     "final": dict(final), "best": {d: min(p[1] for p in run.losses(d)) for d in doms},
                     "source": "stage.json" if run.record is not None else "events"})
    return rows


def comparison_table(runs: dict[str, Run]) -> str:
    """``comparison_rows`` as a markdown table, one ``final / lowest`` column per domain."""
    doms = domains(runs)
    head = ["run", "parent", "tokens", "total tokens", "wall time"] + [f"{d} loss final / lowest" for d in doms]
    lines = ["| " + " | ".join(head + ["from"]) + " |", "|" + "---|" * (len(head) + 1)]
    for row in comparison_rows(runs):
        name = f"{row['run']} (baseline)" if row["baseline"] else row["run"]
        cells = [name, row["parent"] or "–", f"{row['tokens']:,}", f"{row['total_tokens']:,}",
                 f"{row['wall_time_s']:.0f}s"]
        cells += [f"{_fmt(row['final'].get(d))} / {_fmt(row['best'].get(d))}" for d in doms]
        lines.append("| " + " | ".join(cells + [row["source"]]) + " |")
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def plot_domain(runs: dict[str, Run], domain: str, title: str | None = None):
    """One figure: ``domain``'s held-out loss against the lineage's total tokens, staged runs solid with a
    grey line at each stage's start, baselines dashed (``report.plot_loss_vs_tokens``). Returns the Figure."""
    import matplotlib.pyplot as plt

    staged = [n for n, r in runs.items() if not r.baseline]
    baselines = [n for n, r in runs.items() if r.baseline]
    fig, ax = plt.subplots(figsize=(7, 4))
    plot_loss_vs_tokens(ax, domain, {n: r.scalars for n, r in runs.items()}, staged, baselines,
                        {n: f"C{i}" for i, n in enumerate(runs)},
                        starts={n: runs[n].start_tokens for n in staged if runs[n].start_tokens > 0})
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig
