"""The staged-vs-joint study's results: per-condition summaries, the stability gap, the verdict rules,
``results.md``, the plan's text and the plots. Everything is computed from the entries of ``results.json``
(matched to the study's plan by key), so the verdicts can be recomputed from that file alone."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from datamodules.metric_names import val_tokens_loss
from experiments.staged_vs_joint_plan import (
    DOMAINS, JOINT_CODE_FRACTION, SEED_RECIPE, Study, repo_relative, lr_condition, lr_tag, plan_runs, replay_condition,
)
from lightning_modules.report import plot_loss_vs_tokens

MIN_EFFECT = 0.02  # nats: below this a difference of held-out losses counts as no difference, whatever the seeds say
TIME_SUPPORTED, TIME_NOT_SUPPORTED = 1.25, 1.5  # staged path wall time / joint wall time (claim 3)
PLOTS = ["quality_vs_time.png", "loss_vs_tokens.png", "forgetting_vs_replay.png", "forgetting_vs_lr.png"]
MOST = 0.5  # "removes most of the forgetting": the rise falls by at least this fraction

RULES = f"""\
Rules (a value "clearly" exceeds another when the mean over seeds of their per-seed difference is larger
than twice that difference's standard deviation over seeds and larger than {MIN_EFFECT} nats; with one seed
only the {MIN_EFFECT}-nat floor applies, so one-seed verdicts are indicative). Each arm is judged on its own runs:
the trained arm's staged = stage 2 at its --stage2-lr from the chosen stage 1, the seed arm's staged = 5e-6.
1. supported if staged's final held-out loss is clearly lower than joint's (93/7) in both domains; not supported
   if in neither; mixed if in one. (1b, trained arm) the same against joint with code up-sampled to the staged
   path's code share.
2. rise = final language loss of a stage-2 run − final language loss of the stage 1 it started from (same seed).
   Supported if LR 1e-5 clearly rises and 5e-6 does not; not supported if 1e-5 does not clearly rise; mixed if
   both clearly rise.
3. ratio = wall time of the staged path (stage 1 + stage 2 `fit`) / joint's, mean over seeds. Supported if
   ≤ {TIME_SUPPORTED}; not supported if > {TIME_NOT_SUPPORTED}; mixed in between. Runs that shared a GPU with
   other workers include that sharing in their wall times.
A. (Ibrahim et al. 2024, trained arm) 5% replay removes most forgetting: measurable only if staged's rise is
   clearly positive; then supported if the rise with 5% replay is at most {1 - MOST:.0%} of staged's and
   staged − replay5 is clearly positive, else not supported.
B. (trained arm) carrying the optimizer state: per domain, carried − fresh final loss, clearly lower / higher /
   no clear difference; the same for the stability gap's peak rise.
Stability gap (stage 2, language): start = the stage 1's final loss (step 0); peak = the highest language loss
of stage 2 (dense measurements over its first part, and its validations); gap = peak − start; final rise =
final − start; recovered = (peak − final) / gap."""


# ----------------------------------------------------------------------------------------------- statistics
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


def _fmt(values: list[float], digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def _paired(a: dict[int, dict], b: dict[int, dict], value) -> list[float]:
    """``value(a[seed]) - value(b[seed])`` for the seeds both have (and where both values exist)."""
    out = []
    for s in sorted(set(a) & set(b)):
        x, y = value(a[s]), value(b[s])
        if x is not None and y is not None:
            out.append(x - y)
    return out


# ----------------------------------------------------------------------------------------------- paths
def stability(entry: dict) -> dict | None:
    """The stability gap of a stage-2 entry (language), from its dense points and its validations."""
    start = (entry.get("parent_final") or {}).get("language")
    probe = (((entry.get("stability_gap") or {}).get("domains") or {}).get("language") or {}).get("points") or []
    if start is None and probe:
        start = probe[0][2]
    if start is None:
        return None
    start_tokens = probe[0][1] if probe else entry["tokens"]["total"] - entry["tokens"]["stage"]
    curve = entry["losses"]["curve"].get("language", [])
    points = [(p[1], p[2]) for p in probe if p[0] > 0] + [tuple(p) for p in curve]
    points = [p for p in points if p[0] > start_tokens]
    final = entry["losses"]["final"]["language"]
    if not points:
        return None
    peak_tokens, peak = max(points, key=lambda p: p[1])
    gap = peak - start
    return {"start": start, "peak": peak, "gap": gap, "final_rise": final - start,
            "peak_at_tokens": peak_tokens - start_tokens, "recovered": (peak - final) / gap if gap > 0 else None}


def chosen_runs(study: Study):
    """The plan's runs that make the tables: every run but the sweep's stage 1s at LRs not chosen."""
    lr = study.chosen_lr_if_known()
    for run in study.runs:
        if run.condition == "stage1" and run.arm == "trained" and not (lr is not None and math.isclose(run.lr, lr)):
            continue
        yield run


def paths(study: Study) -> dict[str, dict[str, dict[int, dict]]]:
    """Per arm, per condition (``stage1`` included), per seed: final losses and bits per byte, total tokens, the
    wall time of the whole path (a stage-2 run's includes its stage 1's), the language rise over stage 2 and
    the stability gap. Runs without a finished entry are left out."""
    out: dict[str, dict[str, dict[int, dict]]] = {}
    for run in chosen_runs(study):
        ok = study.ok(run.key)
        if not ok:
            continue
        e = ok[0]
        path = {"losses": e["losses"]["final"], "bpb": (e.get("bpb") or {}).get("final", {}),
                "tokens": e["tokens"]["total"], "wall_time_s": e["wall_time_s"], "process_time_s": e["process_time_s"],
                "entry": e, "rise": None, "gap": None}
        if run.parent is not None:
            parents = study.ok(run.parent.key)
            parent = next((p for p in parents if p.get("checkpoint_sha256") == e.get("parent_checkpoint_sha256")),
                          parents[0] if parents else None)
            if parent is None:
                continue
            path["wall_time_s"] += parent["wall_time_s"]
            path["process_time_s"] += parent["process_time_s"]
            before = e.get("parent_final") or parent["losses"]["final"]
            after = e["losses"]["final"]
            path["rise"] = {d: after[d] - before[d] for d in DOMAINS if d in before and d in after}
            path["gap"] = stability(e)
        out.setdefault(run.arm, {}).setdefault(run.condition, {})[run.seed] = path
    return out


# ----------------------------------------------------------------------------------------------- verdicts
def _loss(d: str):
    return lambda p: p["losses"].get(d)


def _rise(p: dict) -> float | None:
    return (p.get("rise") or {}).get("language")


def _rises(seeds: dict[int, dict]) -> list[float]:
    """The language rise of every seed that has one."""
    return [v for v in map(_rise, seeds.values()) if v is not None]


def _beats(staged: dict, joint: dict, min_effect: float) -> tuple[str, str]:
    better, notes = [], []
    for d in DOMAINS:
        gain = _paired(joint, staged, _loss(d))  # > 0: staged's loss is lower
        better.append(clearly_positive(gain, min_effect))
        worse = clearly_positive([-g for g in gain], min_effect)
        which = "staged clearly lower" if better[-1] else "joint clearly lower" if worse else "no clear difference"
        notes.append(f"{d}: joint − staged = {_fmt(gain)} ({which})")
    return ("supported" if all(better) else "not supported" if not any(better) else "mixed"), "; ".join(notes)


def verdicts(by_condition: dict[str, dict[int, dict]], arm: str, lr_names: dict[float, str],
             min_effect: float = MIN_EFFECT) -> list[tuple[str, str, str]]:
    """(claim, verdict, the numbers behind it) for each of the seed's claims in ``arm``, by the rules of RULES.
    ``lr_names`` maps 5e-6 and 1e-5 to the arm's conditions at those stage-2 LRs."""
    staged, joint = by_condition.get("staged", {}), by_condition.get("joint", {})
    out = []
    claim = "(1) staged training beats joint training (93/7) per domain at equal tokens"
    if not set(staged) & set(joint):
        out.append((claim, "not measured", "no seed has both a staged and a joint result"))
    else:
        out.append((claim, *_beats(staged, joint, min_effect)))
    if arm == "trained":
        up = by_condition.get("joint_upsampled", {})
        claim = "(1b) staged beats joint with code up-sampled to the staged path's code share"
        out.append((claim, *_beats(staged, up, min_effect)) if set(staged) & set(up) else
                   (claim, "not measured", "no seed has both a staged and a joint_upsampled result"))

    claim = "(2) stage-2 LR 1e-5 forgets language while 5e-6 keeps it"
    hi, lo = by_condition.get(lr_names.get(1e-5, ""), {}), by_condition.get(lr_names.get(5e-6, ""), {})
    rise_hi, rise_lo = _rises(hi), _rises(lo)
    if not rise_hi or not rise_lo:
        out.append((claim, "not measured", "a stage-2 run at 1e-5 or at 5e-6 has no result"))
    else:
        forgets_hi, forgets_lo = clearly_positive(rise_hi, min_effect), clearly_positive(rise_lo, min_effect)
        verdict = "not supported" if not forgets_hi else "mixed" if forgets_lo else "supported"
        clear = {True: "clear rise", False: "no clear rise"}
        out.append((claim, verdict, f"language-loss rise over stage 2: LR 1e-5 {_fmt(rise_hi)} ({clear[forgets_hi]}), "
                                    f"LR 5e-6 {_fmt(rise_lo)} ({clear[forgets_lo]}); language loss after LR 1e-5: "
                                    f"{_fmt([p['losses']['language'] for p in hi.values()])} (seed: 6.6)"))

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


def other_findings(by_condition: dict[str, dict[int, dict]],
                   min_effect: float = MIN_EFFECT) -> list[tuple[str, str, str]]:
    """Rules A (5% replay) and B (carried optimizer state) of RULES, for the trained arm."""
    staged, out = by_condition.get("staged", {}), []
    replay5 = by_condition.get(replay_condition(0.05), {})
    claim = "(A) 5% replay removes most of the forgetting (Ibrahim et al. 2024)"
    rise0, rise5 = _rises(staged), _rises(replay5)
    if not rise0 or not rise5:
        out.append((claim, "not measured", "staged or replay5 has no result"))
    elif not clearly_positive(rise0, min_effect):
        out.append((claim, "not measurable", f"staged shows no clear rise to remove ({_fmt(rise0)})"))
    else:
        reduced = clearly_positive(_paired(staged, replay5, _rise), min_effect)
        most = reduced and statistics.fmean(rise5) <= (1 - MOST) * statistics.fmean(rise0)
        verdict = "supported" if most else "not supported"
        out.append((claim, verdict, f"language rise: staged {_fmt(rise0)}, 5% replay {_fmt(rise5)}"))
    carry = by_condition.get("staged_carry", {})
    claim = "(B) carrying the optimizer state over vs a fresh optimizer"
    if not set(carry) & set(staged):
        out.append((claim, "not measured", "no seed has both staged and staged_carry"))
    else:
        notes = []
        gap = lambda p: (p.get("gap") or {}).get("gap")  # noqa: E731
        for name, value in [(f"{d} loss", _loss(d)) for d in DOMAINS] + [("gap", gap)]:
            diff = _paired(carry, staged, value)
            which = ("carried clearly lower" if clearly_positive([-x for x in diff], min_effect) else
                     "carried clearly higher" if clearly_positive(diff, min_effect) else "no clear difference")
            notes.append(f"{name}: carried − fresh = {_fmt(diff)} ({which})")
        out.append((claim, "measured", "; ".join(notes)))
    return out


# ----------------------------------------------------------------------------------------------- text
def settings(study: Study, bytes_per_token: dict[str, float]) -> dict:
    """The study's settings and history for results.json (the newest command's)."""
    args, b = study.args, study.budget
    train = {}
    for d in DOMAINS:
        manifest = args.data_dir / d / "manifest.json"
        if manifest.is_file():
            train[d] = json.loads(manifest.read_text())["tokens"]["train"]
    return {
        "size": args.size, "seq_len": args.seq_len, "batch_size": args.batch_size, "tokens_per_step": b.tokens_per_step,
        "budget": {"stage1_steps": b.stage1_steps, "stage2_steps": b.stage2_steps, "joint_steps": b.joint_steps,
                   "stage1_tokens": b.stage1_steps * b.tokens_per_step,
                   "stage2_tokens": b.stage2_steps * b.tokens_per_step,
                   "code_share": round(b.code_share, 6)},
        "seeds": args.study_seeds, "stage1_lrs": args.stage1_lrs, "stage1_lr_chosen": study.chosen_lr_if_known(),
        "stage1_target": args.stage1_target, "stage2_lr": args.stage2_lr, "stage2_lrs": args.stage2_lrs,
        "replays": args.replays, "warmup_fraction": args.warmup_fraction, "seed_recipe": SEED_RECIPE,
        "joint_code_fraction": JOINT_CODE_FRACTION, "val_points": args.val_points, "val_windows": args.val_windows,
        "probe": {"every_n_steps": args.probe_every, "until": args.probe_until},
        "data_dir": str(args.data_dir), "data_fingerprint": study.fingerprint, "data_train_tokens": train,
        "heldout_bytes_per_token": {d: round(v, 4) for d, v in bytes_per_token.items()},
        "cards": sorted({e["card"] for e in study.entries if e.get("card")}),
        "commits": sorted({e["commit"] for e in study.entries if e.get("commit")}),
        "weights": "final", "commands": study.commands,
    }


def estimate(study: Study, runs: list) -> tuple[float, float]:
    """(tokens, estimated seconds) of ``runs`` on the study's workers, all busy (``Study.estimate_s``)."""
    scale = study.time_scale()
    tokens = sum(r.steps for r in runs) * study.budget.tokens_per_step
    return tokens, sum(study.estimate_s(r, scale) for r in runs) / len(study.args.devices)


def plan_text(study: Study) -> str:
    """The runs of the study, what is done and what is left, with tokens and an estimated time."""
    args, b = study.args, study.budget
    scale = study.time_scale()
    seconds = {r.key: study.estimate_s(r, scale) for r in study.runs}
    lines = [f"staged vs joint: {args.size}, {b.tokens_per_step:,} tokens per step; stage 1 {b.stage1_steps} steps "
             f"({b.stage1_steps * b.tokens_per_step / 1e6:.2f}M tokens), stage 2 {b.stage2_steps} "
             f"({b.stage2_steps * b.tokens_per_step / 1e6:.2f}M), joint {b.joint_steps}; workers {args.devices}", "",
             "| status | arm | condition | seed | lr | steps | tokens (M) | est. s |",
             "|---|---|---|---|---|---|---|---|"]
    todo = study.todo()
    for run in todo + [r for r in study.runs if r not in todo]:  # in the order they would start
        status = ("to run" + (" again" if study.done(run.key) else "") if run in todo else
                  "done" if study.done(run.key) else "not asked for")
        why = study.blocked(run) if run in todo else None
        if why and "waits" not in why:
            status += f" (blocked: {why})"
        lines.append(f"| {status} | {run.arm} | {run.condition} | {run.seed} | {lr_tag(run.lr)} | {run.steps} | "
                     f"{run.steps * b.tokens_per_step / 1e6:.1f} | {seconds[run.key]:.0f} |")
    tokens, total = estimate(study, todo)
    longest = max((seconds[r.key] for r in todo), default=0)
    lines += ["", f"to run now: {len(todo)} runs, {tokens / 1e6:.0f}M tokens, ≈{total / 60:.1f} min on "
                  f"{args.devices} (assuming {args.assume_tokens_per_s / 1e6:.2f}M tokens/s per GPU, "
                  f"{args.assume_start_s:.0f} s start-up per run, scaled by the finished runs' times); the longest "
                  f"run ≈{longest:.0f} s: a command may end that long after --time-budget"]
    if study.chosen_lr_if_known() is None and "trained" in args.arms:
        later = [r for r in plan_runs(args, b, args.stage1_lrs[0]) if r.arm == "trained" and not r.sweep]
        tokens, total = estimate(study, later)
        lines.append(f"after the sweep: the trained arm's {len(later)} other runs, {tokens / 1e6:.0f}M tokens, "
                     f"≈{total / 60:.1f} min more")
    return "\n".join(lines)


def _table(by_condition: dict[str, dict[int, dict]], conditions: list[str]) -> list[str]:
    lines = ["| condition | seeds | language loss | language bits/byte | code loss | code bits/byte | language rise "
             "over stage 2 | total tokens (M) | path wall time (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for c in conditions:
        p = list(by_condition.get(c, {}).values())
        if not p:
            lines.append(f"| {c} | 0 | – | – | – | – | – | – | – |")
            continue
        cells = []
        for d in DOMAINS:
            cells += [_fmt([x["losses"].get(d) for x in p]), _fmt([x["bpb"].get(d) for x in p])]
        cells += [_fmt([_rise(x) for x in p]), _fmt([x["tokens"] / 1e6 for x in p], 2),
                  _fmt([x["wall_time_s"] for x in p], 0)]
        lines.append(" | ".join([f"| {c}", str(len(p)), *cells]) + " |")
    return lines


def _gap_table(by_arm: dict[str, dict[str, dict[int, dict]]], tokens_per_step: int) -> list[str]:
    lines = ["| arm | condition | seeds | start | peak | gap | peak at stage-2 step | final rise | recovered |",
             "|---|---|---|---|---|---|---|---|---|"]
    for arm, by_condition in by_arm.items():
        for c, seeds in by_condition.items():
            gaps = [p["gap"] for p in seeds.values() if p.get("gap")]
            if not gaps:
                continue
            cells = [_fmt([g[k] for g in gaps]) for k in ("start", "peak", "gap")]
            cells += [_fmt([g["peak_at_tokens"] / tokens_per_step for g in gaps], 0),
                      _fmt([g["final_rise"] for g in gaps]), _fmt([g["recovered"] for g in gaps], 2)]
            lines.append(f"| {arm} | {c} | {len(gaps)} | " + " | ".join(cells) + " |")
    return lines


def _sweep(study: Study) -> list[str]:
    args, lr = study.args, study.chosen_lr_if_known()
    lines = [f"Stage 1 of the trained arm, seed {args.study_seeds[0]}, {study.budget.stage1_steps} steps; chosen by "
             f"the lowest final held-out language loss; target ≤ {args.stage1_target} nats/token.", "",
             "| LR | status | language loss | language bits/byte | code loss (not trained) | ≤ target |",
             "|---|---|---|---|---|---|"]
    for run in study.sweep_runs():
        ok, done = study.ok(run.key), study.done(run.key)
        if ok:
            e = ok[0]
            loss, bpb = e["losses"]["final"]["language"], (e.get("bpb") or {}).get("final", {}).get("language")
            mark = " **chosen**" if lr is not None and math.isclose(run.lr, lr) else ""
            code = _fmt([e["losses"]["final"].get("code")])
            lines.append(f"| {lr_tag(run.lr)}{mark} | ok | {loss:.3f} | {_fmt([bpb])} | {code} | "
                         f"{'yes' if loss <= args.stage1_target else 'no'} |")
        else:
            lines.append(f"| {lr_tag(run.lr)} | {'diverged' if done else 'not run yet'} | – | – | – | – |")
    loss = study.stage1_loss()
    if lr is not None and loss is not None:
        edge = lr in (min(args.stage1_lrs), max(args.stage1_lrs)) and args.stage1_lr is None
        lines += ["", f"Chosen stage-1 LR {lr_tag(lr)}: language loss {loss:.3f} "
                      + ("reaches the target." if loss <= args.stage1_target else
                         "**misses the target**: the trained arm's conditions wait; raise --stage1-tokens.")
                      + (" The chosen LR is at the edge of the sweep: extend --stage1-lrs." if edge else "")]
    return lines


def _not_run(study: Study) -> list[str]:
    lines = []
    todo = set(id(r) for r in study.todo())
    for run in study.runs:
        failed = [e for e in study.entries if e.get("key") == run.key and e.get("status") == "failed"]
        if study.done(run.key) or (run.condition == "stage1" and not run.sweep and not failed):
            continue
        why = study.blocked(run) if id(run) in todo else None
        last = ((failed[-1].get("stderr_tail") or "?").strip().splitlines() or ["?"])[-1] if failed else ""
        note = f" (failed {len(failed)}×, last: `{last}`; its stderr.log is in its run directory)" if failed else ""
        lines.append(f"- {run.label}" + (f": {why}" if why and "waits" not in why else "") + note)
    if study.chosen_lr_if_known() is None:
        later = [r for r in plan_runs(study.args, study.budget, study.args.stage1_lrs[0])
                 if r.arm == "trained" and not r.sweep]
        lines.append(f"- the trained arm's {len(later)} runs after the stage-1 sweep (its LR decides their stage 1)")
    return lines


def _order(run) -> tuple:
    """Tables list stage 1, staged, carry, the stage-2 LRs, the replays, then the joint baselines."""
    kinds = ("stage1", "staged", "staged_carry", "staged_lr", "replay", "joint")
    kind = next(i for i, k in reversed(list(enumerate(kinds))) if run.condition.startswith(k))
    return kind, run.lr if kind == 3 else run.replay, run.condition


def _header(study: Study, settings: dict) -> list[str]:
    """The settings of the study, its arms, cards, commits and commands, as the first lines of results.md."""
    args, b, lr = study.args, settings["budget"], study.chosen_lr_if_known()
    seed = SEED_RECIPE

    def command(c: dict) -> str:
        speed = f" = {c['tokens_trained'] / c['wall_time_s'] / 1e6:.2f}M tokens/s" if c.get("wall_time_s") else ""
        return (f"`{c['command']}` ({c['date']}, {c.get('runs_finished', 0)} runs, {c.get('wall_time_s', 0):.0f} s, "
                f"{c.get('tokens_trained', 0) / 1e6:.0f}M tokens{speed})")

    return [
        "# Staged vs joint training: the seed's claims, measured in two arms", "",
        f"Model `{args.size}`, seq_len {args.seq_len}, batch {args.batch_size} ({settings['tokens_per_step']:,} "
        f"tokens per step); data `{repo_relative(Path(settings['data_dir']))}` (train tokens "
        f"{settings['data_train_tokens']}; held-out bytes per token {settings['heldout_bytes_per_token']}); "
        f"{args.val_windows} validation windows per domain, the same for every run; seeds {args.study_seeds}.  ",
        f"Budget: stage 1 {b['stage1_steps']:,} steps ({b['stage1_tokens'] / 1e6:.2f}M tokens), stage 2 "
        f"{b['stage2_steps']:,} ({b['stage2_tokens'] / 1e6:.2f}M), joint {b['joint_steps']:,} (their sum; code "
        f"share of the staged path {b['code_share']:.3f}).  ",
        f"**trained** arm: stage 1 and joint at LR {'(after the sweep)' if lr is None else lr_tag(lr)} (warmup "
        f"{args.warmup_fraction:.0%} of each run), stage 2 at {lr_tag(args.stage2_lr)} (staged, carry, replay) and "
        f"the sweep {', '.join(map(lr_tag, args.stage2_lrs))}, re-warmed.  ",
        f"**seed** arm: stage 1 and joint at {lr_tag(seed['stage1_lr'])}, stage 2 at {lr_tag(seed['staged_lr'])} "
        f"(staged) and {lr_tag(seed['forgetting_lr'])}, warmup {seed['warmup_steps']} steps (at most half a run).  ",
        f"Cards: {', '.join(settings['cards']) or '–'}; commits: {', '.join(settings['commits']) or '–'}.  ",
        f"Commands ({len(settings['commands'])}, the last 6): " + "; ".join(map(command, settings["commands"][-6:])),
        "", "Every number is the **final** weights' held-out loss (stage 2 starts from stage 1's final weights). "
        "Compare within a column only; bits per byte = loss / ln 2 / bytes per token. Path wall time is `fit`'s (a "
        "stage-2 condition adds its stage 1's); runs that shared a GPU include that sharing.", "",
    ]


def write(study: Study, settings: dict, plots: bool = True) -> None:
    """``results.md`` in ``--out``, and the plots (with ``plots``; else the ones drawn last stay)."""
    args, by_arm = study.args, paths(study)
    plots = plot(study, by_arm) if plots else PLOTS
    lines = _header(study, settings) + ["## Stage 1: the LR sweep", "", *_sweep(study), ""]
    conditions: dict[str, list[str]] = {"trained": [], "seed": []}
    for run in sorted(chosen_runs(study), key=_order):
        if run.condition not in conditions[run.arm]:
            conditions[run.arm].append(run.condition)
    for arm in conditions:
        lines += [f"## Final held-out loss per condition, {arm} arm (mean ± std over seeds)", "",
                  *_table(by_arm.get(arm, {}), conditions[arm]), ""]
    lines += ["## Stability gap of stage 2 (language held-out loss)", "",
              *_gap_table(by_arm, study.budget.tokens_per_step), "", "## The seed's claims", ""]
    for arm in conditions:
        lr_names = {x: lr_condition(arm, x, args) for x in (5e-6, 1e-5)}
        lines += [f"### {arm} arm", ""]
        lines += [f"- {claim}: **{verdict}**. {numbers}." for claim, verdict, numbers in
                  verdicts(by_arm.get(arm, {}), arm, lr_names)] + [""]
    lines += ["## Replay and the optimizer state (trained arm; the stage-2 LRs: the staged_lr rows above and "
              "forgetting_vs_lr.png)", ""]
    lines += [f"- {claim}: **{verdict}**. {numbers}." for claim, verdict, numbers in
              other_findings(by_arm.get("trained", {}))]
    left = _not_run(study) or ["- nothing: every run of the plan has a result"]
    lines += ["", RULES, "", "## Not run yet", "", *left, "", "## Plots", "", *(f"![{p}]({p})" for p in plots)]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------- plots
def plot(study: Study, by_arm: dict[str, dict[str, dict[int, dict]]]) -> list[str]:
    """The four figures in ``--out``; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, args = study.args.out, study.args
    names = sorted({c for by in by_arm.values() for c in by})
    color = {c: f"C{i % 10}" for i, c in enumerate(names)}
    marker = {"trained": "o", "seed": "s"}

    fig, axes = plt.subplots(1, len(DOMAINS), figsize=(12, 4.2), squeeze=False)
    for ax, d in zip(axes[0], DOMAINS):
        for arm, by in by_arm.items():
            for c, seeds in by.items():
                if c == "stage1":
                    continue
                p = [x for x in seeds.values() if d in x["losses"]]
                if p:
                    (tm, ts) = mean_std([x["wall_time_s"] / 60 for x in p])
                    (ym, ys) = mean_std([x["losses"][d] for x in p])
                    ax.errorbar([tm], [ym], xerr=[ts], yerr=[ys], fmt=marker[arm], color=color[c], capsize=3,
                                label=f"{arm}: {c}")
        ax.set(title=f"{d}: final held-out loss vs wall time", xlabel="wall time of the path (min)", ylabel="loss")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, ncol=2)
    _save(fig, out / "quality_vs_time.png")

    fig, axes = plt.subplots(2, len(DOMAINS), figsize=(12, 8), squeeze=False)
    for row, arm in zip(axes, ("trained", "seed")):
        curves, starts = mean_curves(by_arm.get(arm, {}))
        staged = [c for c in curves if c not in ("joint", "joint_upsampled", "stage1")
                  and (arm == "seed" or c in ("staged", "staged_carry", replay_condition(0.05)))]
        baselines = [c for c in ("joint", "joint_upsampled") if c in curves]
        for ax, d in zip(row, DOMAINS):
            plot_loss_vs_tokens(ax, d, curves, staged, baselines, color, starts)
            ax.set_title(f"{arm} arm, {d}: held-out loss (mean over seeds)")
    _save(fig, out / "loss_vs_tokens.png")

    trained = by_arm.get("trained", {})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    xs = [0.0] + sorted(args.replays)
    _sweep_plot(axes[0], trained, [(100 * f, replay_condition(f)) for f in xs], "language replay in stage 2 (%)")
    _save(fig, out / "forgetting_vs_replay.png")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    _sweep_plot(axes[0], trained, [(x, lr_condition("trained", x, args)) for x in sorted(args.stage2_lrs)],
                "stage-2 peak LR", log=True, label="trained")
    seed = by_arm.get("seed", {})
    seed_lrs = (SEED_RECIPE["staged_lr"], SEED_RECIPE["forgetting_lr"])
    _sweep_plot(axes[0], seed, [(x, lr_condition("seed", x, args)) for x in seed_lrs], "stage-2 peak LR", log=True,
                label="seed")
    _save(fig, out / "forgetting_vs_lr.png")
    return PLOTS


def _sweep_plot(axes, by_condition: dict, points: list[tuple[float, str]], xlabel: str, log: bool = False,
                label: str | None = None) -> None:
    """Left: language rise over stage 2 (and the stability gap's peak rise, dashed); right: final code loss; each
    mean ± std over seeds at every x with results."""
    series = {"rise": [], "gap": [], "code": []}
    for x, condition in points:
        p = list(by_condition.get(condition, {}).values())
        for name, values in (("rise", [_rise(q) for q in p]), ("gap", [(q.get("gap") or {}).get("gap") for q in p]),
                             ("code", [q["losses"].get("code") for q in p])):
            values = [v for v in values if v is not None]
            if values:
                series[name].append((x, *mean_std(values)))
    tag = f"{label}: " if label else ""
    labels = {"rise": "final rise", "gap": "peak rise (stability gap)", "code": "final"}
    panels = ((axes[0], ("rise", "gap"), "language loss − stage 1's"), (axes[1], ("code",), "code loss"))
    for ax, names, ylabel in panels:
        for name in names:
            if series[name]:
                x, m, s = zip(*series[name])
                ax.errorbar(x, m, yerr=s, marker="o", capsize=3, linestyle="--" if name == "gap" else "-",
                            label=tag + labels[name])
        ax.set(xlabel=xlabel, ylabel=ylabel, xscale="log" if log else "linear")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[0].set_title("language: forgetting over stage 2")
    axes[1].set_title("code: final held-out loss")


def mean_curves(by_condition: dict[str, dict[int, dict]]) -> tuple[dict[str, dict[str, list]], dict[str, int]]:
    """Per condition, each domain's held-out loss along total tokens, mean over seeds (a stage-2 condition's curve
    is its stage 1's followed by its own), as ``read_scalars`` series; and where each stage 2 starts."""
    curves, starts = {}, {}
    for c, seeds in by_condition.items():
        for p in seeds.values():
            e = p["entry"]
            runs = [e]
            if e.get("parent_key"):
                parent = by_condition.get("stage1", {}).get(e["seed"])
                if parent is not None:
                    runs.insert(0, parent["entry"])
                starts[c] = e["tokens"]["total"] - e["tokens"]["stage"]
            for run in runs:
                dense = ((run.get("stability_gap") or {}).get("domains") or {})  # stage 2's early points
                for d, points in run["losses"]["curve"].items():
                    by_tokens = curves.setdefault(c, {}).setdefault(val_tokens_loss(d), {})
                    for tokens, value in points + [p[1:] for p in (dense.get(d) or {}).get("points", [])[1:]]:
                        by_tokens.setdefault(tokens, []).append(value)
    return ({c: {tag: [(t, statistics.fmean(v[t]), 0.0) for t in sorted(v)] for tag, v in tags.items()}
             for c, tags in curves.items()}, starts)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
