"""experiments/staged_vs_joint.py: a tiny version of every condition of both arms end to end on CPU; the order
of the runs, a re-run that skips finished runs (also after a killed command, also on a fresh machine where only
results.json came along), the time budget, a stage 1 that misses its target; and the verdict rules on planted
numbers for every claim and arm."""

import hashlib
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from experiments import staged_vs_joint as study
from experiments import staged_vs_joint_plan as plan_module
from experiments import staged_vs_joint_results as results
from experiments.staged_vs_joint_plan import lr_tag, plan_budget

FILES = ["results.json", "results.md", "quality_vs_time.png", "loss_vs_tokens.png", "forgetting_vs_replay.png",
         "forgetting_vs_lr.png"]


def tiny_args(data_dir: Path, tmp: Path, *extra: str) -> list[str]:
    # 32 tokens per step: stage 1 8 steps, stage 2 2 steps, joint 10 steps; the sweep at two LRs, one more stage-2
    # LR, one replay fraction; the stability gap measured at stage 2's step 1
    return ["--size", "tiny", "--study-seeds", "1", "--seq-len", "16", "--batch-size", "2", "--stage1-tokens", "256",
            "--stage2-tokens", "64", "--stage1-lrs", "1e-3", "3e-3", "--stage2-lr", "1e-3", "--stage2-lrs", "1e-5",
            "--replays", "0.25", "--stage1-target", "100", "--val-points", "2", "--val-windows", "4",
            "--probe-every", "1", "--probe-until", "0.5", "--devices", "cpu", "cpu", "--data-dir", str(data_dir),
            "--out", str(tmp / "out"), "--work-dir", str(tmp / "work"), *extra]


TRAINED = {"staged", "staged_carry", "staged_lr1e-5", "replay25", "joint", "joint_upsampled"}  # and the sweep
SEED = {"staged", "staged_lr1e-5", "joint"}  # and stage 1 at 3e-5


@pytest.mark.slow
def test_every_condition_of_both_arms_end_to_end(corpora, tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path / "copy"))
    study.main(tiny_args(corpora, tmp_path))
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    entries = saved["runs"]
    assert all(e["status"] == "ok" for e in entries), [e.get("stderr_tail") for e in entries]
    got = {(e["arm"], e["condition"], e["seed"], e["lr"] if e["condition"] == "stage1" else None) for e in entries}
    sweep = {e["lr"]: e["losses"]["final"]["language"] for e in entries
             if e["arm"] == "trained" and e["condition"] == "stage1"}
    chosen = min(sweep, key=sweep.get)
    assert saved["study"]["stage1_lr_chosen"] == chosen and set(sweep) == {1e-3, 3e-3}
    assert got == ({("trained", c, 1, None) for c in TRAINED} | {("trained", "stage1", 1, lr) for lr in sweep}
                   | {("seed", c, 1, None) for c in SEED} | {("seed", "stage1", 1, 3e-5)})
    by = {(e["arm"], e["condition"]): e for e in entries if e["condition"] != "stage1" or e["lr"] in (chosen, 3e-5)}
    for e in entries:
        assert e["card"] == "cpu" and e["commit"] and e["command"].startswith("python -m lightning_modules fit")
        assert all(math.isfinite(e["losses"]["final"][d]) and e["bpb"]["final"][d] > 0 for d in ("language", "code"))
        assert e["stage"] == (2 if e["parent"] else 1) and e["wall_time_s"] > 0
    for arm in ("trained", "seed"):  # equal total tokens; each stage 2 from its arm's stage 1
        joint, stage1 = by[(arm, "joint")]["tokens"]["total"], by[(arm, "stage1")]
        assert joint == 10 * 32
        for (a, c), e in by.items():
            if a == arm and c != "stage1":
                assert e["tokens"]["total"] == joint
            if a == arm and e["parent"]:
                assert e["parent"] == stage1["name"] and e["parent_final"] == stage1["losses"]["final"]
                points = e["stability_gap"]["domains"]["language"]["points"]
                assert [p[0] for p in points] == [0, 1]  # step 0 (stage 1's weights) and step 1
                assert points[0][2] == pytest.approx(e["parent_final"]["language"], abs=1e-4)
    assert by[("trained", "stage1")]["name"] == f"language_lr{lr_tag(chosen)}" and by[("seed", "stage1")]["lr"] == 3e-5
    assert "lr=5e-06" in by[("seed", "staged")]["command"] and "lr=1e-05" in by[("seed", "staged_lr1e-5")]["command"]
    assert f"lr={chosen:g}" in by[("trained", "joint")]["command"] and "lr=3e-05" in by[("seed", "joint")]["command"]
    # replay as each condition states it, whatever code.yaml's default (25%): what the data module trained on
    assert by[("trained", "replay25")]["mixture_trained"] == {"code": 0.75, "language": 0.25}
    for arm, condition in [("trained", "staged"), ("trained", "staged_carry"), ("trained", "staged_lr1e-5"),
                           ("seed", "staged"), ("seed", "staged_lr1e-5")]:
        assert by[(arm, condition)]["mixture_trained"] == {"code": 1.0}
    assert by[("trained", "joint")]["mixture"] == {"language": 0.93, "code": 0.07}
    assert by[("trained", "joint_upsampled")]["mixture"] == {"language": 0.8, "code": 0.2}  # 2 of 10 steps are code
    carry, fresh = by[("trained", "staged_carry")], by[("trained", "staged")]
    assert carry["optimizer_from"]["path"].endswith(f"trained_s1/language_lr{lr_tag(chosen)}/checkpoints/last.ckpt")
    assert carry["optimizer_from"]["optimizer_step"] == 8 and fresh["optimizer_from"] is None
    assert fresh["losses"]["final"] != carry["losses"]["final"]  # the carried moments changed the training

    md = (tmp_path / "out" / "results.md").read_text()
    for heading in ("## Stage 1: the LR sweep", "## Final held-out loss per condition, trained arm", "### seed arm",
                    "## Stability gap of stage 2", "## Not run yet", "Rules"):
        assert heading in md
    assert f"| {lr_tag(chosen)} **chosen** | ok |" in md and "- nothing: every run of the plan has a result" in md
    for verdict_line in ("(1) staged training beats joint", "(1b)", "(2) stage-2 LR 1e-5", "(3) the staged path"):
        assert md.count(verdict_line) == (1 if verdict_line == "(1b)" else 2)
    assert md.count(": **") >= 9  # 4 claims in the trained arm, 3 in the seed arm, A and B
    for png in FILES[2:]:
        assert (tmp_path / "out" / png).stat().st_size > 10_000 and f"]({png})" in md
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == sorted(FILES)  # $OUT: the small files only
    kept = sorted(p.name for p in (tmp_path / "work" / "models").glob("*/*_model_best.ckpt"))
    assert kept == sorted(f"language_lr{lr_tag(lr)}_model_best.ckpt" for lr in [*sweep, 3e-5])

    def refuse(*a, **k):
        raise AssertionError("a finished run ran again")

    monkeypatch.setattr(study, "execute", refuse)
    before = (tmp_path / "out" / "results.json").read_text()
    monkeypatch.setenv("OUT", str(tmp_path / "out"))  # $OUT is --out itself (gpu_session.sh): no copy onto itself
    study.main(tiny_args(corpora, tmp_path))
    assert json.loads((tmp_path / "out" / "results.json").read_text())["runs"] == json.loads(before)["runs"]


# ------------------------------------------------------------------------------- the scheduler, with fake runs
def fake_runs(monkeypatch, losses=None, fail=(), diverge=(), clock: list | None = None):
    """Replace ``execute`` by a fake that records the runs it gets, writes a stage 1's best checkpoint (so its
    children find it) and returns planted losses, ``losses[(arm, condition, lr)]`` or 3.0 / 2.0; runs in ``fail``
    fail, runs in ``diverge`` diverge. The plots are left out (the end-to-end test draws them)."""
    calls = []
    monkeypatch.setattr(results, "plot", lambda study, by_arm: results.PLOTS)

    def fake(run, args, device, bytes_per_token):
        calls.append(run)
        if clock is not None:
            clock[0] += 0.3
        entry = {"key": run.key, "arm": run.arm, "condition": run.condition, "seed": run.seed, "stage": run.stage,
                 "name": run.name, "lr": run.lr, "parent": run.parent and run.parent.name, "card": "cpu", "date": "d",
                 "parent_key": run.parent and run.parent.key, "command": study.command_of(run, args)}
        if (run.arm, run.condition, run.lr) in diverge:
            return entry | {"status": "diverged", "stderr_tail": "non-finite loss or gradient"}
        if (run.arm, run.condition, run.seed) in fail:
            return entry | {"status": "failed", "stderr_tail": "Traceback...\nCUDA out of memory"}
        language, code = (losses or {}).get((run.arm, run.condition, run.lr), (3.0, 2.0))
        entry |= {"status": "ok", "losses": {"final": {"language": language, "code": code}, "curve": {}},
                  "tokens": {"total": 10, "stage": 5, "trained": 5}, "wall_time_s": 0.3, "process_time_s": 0.3}
        if run.condition == "stage1":
            best = study.best_checkpoint(run, args)
            best.parent.mkdir(parents=True, exist_ok=True)
            best.write_bytes(f"{run.key} {len(calls)}".encode())
            entry["checkpoint_sha256"] = hashlib.sha256(best.read_bytes()).hexdigest()
        else:
            entry["parent_final"] = {"language": 3.0, "code": 5.0}
        return entry

    monkeypatch.setattr(study, "execute", fake)
    return calls


def one_worker(data_dir: Path, tmp: Path, *extra: str) -> list[str]:
    args = tiny_args(data_dir, tmp, "--study-seeds", "1", "2", *extra)
    del args[args.index("--devices") + 2]  # `--devices cpu cpu` -> one worker: runs in plan order
    return args


def test_the_sweep_and_the_decisive_conditions_with_all_seeds_run_first(corpora, tmp_path, monkeypatch):
    calls = fake_runs(monkeypatch)
    study.main(one_worker(corpora, tmp_path))
    order = [(r.arm, r.condition, r.seed) for r in calls]
    assert order[:2] == [("trained", "stage1", 1)] * 2  # the sweep
    # decisive: staged vs the joint baselines, with the stage 1s they need; in the seed arm also its 1e-5 run, the
    # only other stage-2 run of its stage 1
    decisive = [o for o in order if o[1] in ("stage1", "staged", "joint", "joint_upsampled") or o[0] == "seed"]
    assert order[:len(decisive)] == decisive
    seeds = [o[2] for o in decisive[2:]]
    assert seeds == sorted(seeds)  # seed 1's decisive runs, then seed 2's
    rest = [o[1:] for o in order[len(decisive):]]  # then seed by seed (one stage 1 at a time): claim 2, carry, rest
    assert rest == [(c, seed) for seed in (1, 2) for c in ("staged_lr1e-5", "staged_carry", "replay25")]
    assert len(order) == len(set((r.key for r in calls)))  # every run once


def test_a_rerun_skips_finished_runs_also_after_a_killed_command(corpora, tmp_path, monkeypatch):
    out = tmp_path / "out"
    snapshots = []
    calls = fake_runs(monkeypatch)
    real = study.execute

    def snapshot(run, args, device, bpt):  # results.json as it is when each run starts
        snapshots.append((out / "results.json").read_text() if (out / "results.json").exists() else None)
        return real(run, args, device, bpt)

    monkeypatch.setattr(study, "execute", snapshot)
    study.main(one_worker(corpora, tmp_path))
    n = len(calls)
    assert snapshots[0] is None and len(json.loads(snapshots[5])["runs"]) == 5  # rewritten after every run
    study.main(one_worker(corpora, tmp_path))
    assert len(calls) == n  # all done: nothing runs
    # a command killed during its 6th run leaves results.json as it was when that run started, and its work dir
    (out / "results.json").write_text(snapshots[5])
    study.main(one_worker(corpora, tmp_path))
    assert len(calls) == n + n - 5 and {r.key for r in calls[n:]} == {r.key for r in calls[5:n]}


def test_a_fresh_machine_trains_a_needed_stage_1_again(corpora, tmp_path, monkeypatch):
    calls = fake_runs(monkeypatch)
    study.main(one_worker(corpora, tmp_path))
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    lost = next(e for e in saved["runs"] if e["arm"] == "seed" and e["condition"] == "staged" and e["seed"] == 2)
    saved["runs"].remove(lost)
    (tmp_path / "out" / "results.json").write_text(json.dumps(saved))
    shutil.rmtree(tmp_path / "work")  # only results.json came along
    n = len(calls)
    study.main(one_worker(corpora, tmp_path))
    assert [(r.arm, r.condition, r.seed) for r in calls[n:]] == [("seed", "stage1", 2), ("seed", "staged", 2)]
    again = [e for e in json.loads((tmp_path / "out" / "results.json").read_text())["runs"] if e["key"] == calls[n].key]
    assert [e.get("retrain") for e in again] == [None, 1]


def test_the_time_budget_stops_new_runs_and_results_say_what_is_left(corpora, tmp_path, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(plan_module, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    calls = fake_runs(monkeypatch, clock=clock)  # every run takes 0.3 s
    study.main(one_worker(corpora, tmp_path, "--time-budget", "0.5"))
    assert len(calls) == 2  # started at 0 s and 0.3 s; none after 0.5 s
    md = (tmp_path / "out" / "results.md").read_text()
    assert "- seed/staged/seed1" in md and "- the trained arm's" not in md  # the sweep has finished: its LR is known
    runs = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert len(runs) == 2


def test_a_stage_1_is_trained_again_only_when_its_stage_2_runs_fit_in_the_time_budget(corpora, tmp_path, monkeypatch):
    fake_runs(monkeypatch)
    study.main(one_worker(corpora, tmp_path))  # everything, then a fresh machine that lacks the trained arm's rest
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    rest = ("staged_lr1e-5", "staged_carry", "replay25")
    saved["runs"] = [e for e in saved["runs"] if not (e["arm"] == "trained" and e["condition"] in rest)]
    (tmp_path / "out" / "results.json").write_text(json.dumps(saved))
    shutil.rmtree(tmp_path / "work")
    clock = [0.0]
    monkeypatch.setattr(plan_module, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    calls = fake_runs(monkeypatch, clock=clock)  # every run takes 0.3 s, and so the estimates say (from results.json)
    study.main(one_worker(corpora, tmp_path, "--time-budget", "1.3"))
    # stage 1 of seed 1 and its 3 runs fill 1.2 of the 1.3 s; seed 2's would not fit: not trained for nothing
    assert [(r.condition, r.seed) for r in calls] == [("stage1", 1)] + [(c, 1) for c in rest]


def test_a_stage_1_that_misses_its_target_holds_the_trained_arm_back(corpora, tmp_path, monkeypatch):
    losses = {("trained", "stage1", 1e-3): (4.0, 6.0), ("trained", "stage1", 3e-3): (3.9, 6.0)}
    calls = fake_runs(monkeypatch, losses=losses, diverge={("trained", "stage1", 1e-3)})
    args = one_worker(corpora, tmp_path)
    args[args.index("--stage1-target") + 1] = "3.6"
    study.main(args)
    trained = [r for r in calls if r.arm == "trained"]
    assert [(r.condition, r.lr) for r in trained] == [("stage1", 1e-3), ("stage1", 3e-3)]  # the sweep only
    assert {r.arm for r in calls[2:]} == {"seed"}
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| 1e-3 | diverged |" in md and "| 3e-3 **chosen** | ok | 3.900 |" in md and "**misses the target**" in md
    assert "misses the target of 3.6 nats/token" in md  # in "Not run yet", for each held-back run
    n = len(calls)
    study.main(args + ["--ignore-target"])
    assert {r.arm for r in calls[n:]} == {"trained"}  # diverged counts as done; the rest of the trained arm runs


def test_a_failed_run_holds_back_its_stage_2_runs_and_a_rerun_retries_it(corpora, tmp_path, monkeypatch):
    calls = fake_runs(monkeypatch, fail={("seed", "stage1", 2)})
    study.main(one_worker(corpora, tmp_path))
    assert ("seed", "stage1", 2) in [(r.arm, r.condition, r.seed) for r in calls]
    assert not [r for r in calls if r.arm == "seed" and r.seed == 2 and r.parent]  # its stage-2 runs never start
    md = (tmp_path / "out" / "results.md").read_text()
    assert "- seed/staged/seed2: its stage 1 failed in this command" in md
    assert "- seed/stage1/seed2 (lr 3e-05) (failed 1×, last: `CUDA out of memory`" in md
    fake_runs(monkeypatch)  # the cause is gone
    study.main(one_worker(corpora, tmp_path))
    runs = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert {(e["condition"], e["status"]) for e in runs if e["arm"] == "seed" and e["seed"] == 2} == {
        ("stage1", "failed"), ("stage1", "ok"), ("staged", "ok"), ("staged_lr1e-5", "ok"), ("joint", "ok")}


def test_subsets_and_the_plan(corpora, tmp_path, monkeypatch, capsys):
    calls = fake_runs(monkeypatch)
    study.main(one_worker(corpora, tmp_path, "--plan"))
    assert calls == [] and not (tmp_path / "out").exists()
    text = capsys.readouterr().out
    assert "| to run | trained | stage1 | 1 | 1e-3 | 8 | 0.0 |" in text and "after the sweep: the trained arm's" in text
    study.main(one_worker(corpora, tmp_path, "--conditions", "staged", "--arms", "trained", "--seeds", "2"))
    assert [(r.condition, r.seed) for r in calls] == [("stage1", 1), ("stage1", 1), ("stage1", 2), ("staged", 2)]
    with pytest.raises(SystemExit):
        study.parse_args(["--conditions", "nonsense"])


def test_missing_data_says_how_to_prepare(tmp_path):
    with pytest.raises(SystemExit, match="make prepare-full"):
        study.main(["--data-dir", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")])


def test_budget_of_the_defaults():
    budget = plan_budget(study.parse_args([]))
    assert budget.tokens_per_step == 32768
    assert (budget.stage1_steps, budget.stage2_steps, budget.joint_steps) == (1144, 288, 1432)  # 37.5M, 9.4M, 46.9M
    assert round(budget.code_share, 3) == 0.201


# ------------------------------------------------------------------------------- the verdicts, planted numbers
def paths(**rows):
    """{condition: {seed: path}} from {condition: [(language, code, wall time, language rise, gap) per seed]}."""
    return {c: {s: {"losses": {"language": lang, "code": code}, "bpb": {}, "tokens": 100, "wall_time_s": t,
                    "process_time_s": t, "rise": None if rise is None else {"language": rise},
                    "gap": None if gap is None else {"gap": gap}}
                for s, (lang, code, t, rise, gap) in enumerate(seeds, 1)} for c, seeds in rows.items()}


LR_NAMES = {"trained": {5e-6: "staged_lr5e-6", 1e-5: "staged_lr1e-5"}, "seed": {5e-6: "staged", 1e-5: "staged_lr1e-5"}}


def verdicts(by, arm):
    return [v for _, v, _ in results.verdicts(by, arm, LR_NAMES[arm])]


def test_the_seeds_story_is_supported_in_both_arms():
    s = [(3.01, 2.0, 60, 0.01, 0.2), (3.03, 2.1, 61, 0.0, 0.2), (2.99, 2.0, 59, 0.01, 0.2)]
    forget = [(6.5, 1.9, 60, 3.5, 3.6), (6.7, 1.9, 61, 3.7, 3.8), (6.6, 1.8, 59, 3.6, 3.7)]
    joint = [(3.5, 3.8, 55, None, None), (3.6, 3.9, 55, None, None), (3.5, 3.7, 54, None, None)]
    trained = paths(staged=s, **{"staged_lr5e-6": s, "staged_lr1e-5": forget}, joint=joint, joint_upsampled=joint)
    assert verdicts(trained, "trained") == ["supported", "supported", "supported", "supported"]
    assert verdicts(paths(staged=s, **{"staged_lr1e-5": forget}, joint=joint), "seed") == ["supported"] * 3


def test_the_opposite_is_not_supported_and_a_split_is_mixed():
    staged, joint = [(3.0, 3.0, 200, 0.0, 0.0)] * 2, [(2.9, 2.5, 100, None, None)] * 2
    no_rise = [(3.0, 2.9, 200, 0.0, 0.0), (3.01, 2.9, 200, 0.01, 0.0)]
    opposite = paths(staged=staged, **{"staged_lr1e-5": no_rise, "staged_lr5e-6": staged}, joint=joint,
                     joint_upsampled=joint)
    assert verdicts(opposite, "trained") == ["not supported"] * 4
    assert verdicts(opposite, "seed") == ["not supported"] * 3  # the seed arm's staged is its 5e-6 run
    mixed = paths(staged=[(3.5, 2.0, 140, 0.5, 0.6)] * 2, **{"staged_lr1e-5": [(4.0, 2.0, 140, 1.0, 1.1)] * 2},
                  joint=[(3.0, 3.0, 100, None, None)] * 2)
    assert verdicts(mixed, "seed") == ["mixed"] * 3
    assert verdicts(mixed, "trained")[1:3] == ["not measured", "not measured"]  # no joint_upsampled, no 5e-6 run


def test_replay_and_carry_findings():
    staged = [(3.3, 2.0, 1, 0.3, 0.5), (3.32, 2.0, 1, 0.32, 0.5), (3.31, 2.0, 1, 0.31, 0.5)]
    replay = [(3.05, 2.1, 1, 0.05, 0.1), (3.06, 2.1, 1, 0.06, 0.1), (3.05, 2.1, 1, 0.05, 0.1)]
    carry = [(3.2, 1.9, 1, 0.2, 0.3), (3.21, 1.9, 1, 0.21, 0.3), (3.2, 1.9, 1, 0.2, 0.3)]
    a, b = results.other_findings(paths(staged=staged, replay5=replay, staged_carry=carry))
    assert a[1] == "supported"
    assert "carried clearly lower" in b[2].split(";")[0] and "gap: carried − fresh = -0.200" in b[2]
    half = [(3.2, 2.1, 1, 0.2, 0.3), (3.21, 2.1, 1, 0.21, 0.3), (3.2, 2.1, 1, 0.2, 0.3)]  # a third less: not most
    assert results.other_findings(paths(staged=staged, replay5=half))[0][1] == "not supported"
    flat = [(3.0, 2.0, 1, 0.0, 0.0)] * 3
    assert results.other_findings(paths(staged=flat, replay5=flat))[0][1] == "not measurable"


def test_a_difference_within_the_seed_noise_is_not_clear():
    assert results.clearly_positive([0.5, 0.6, 0.55])
    assert not results.clearly_positive([0.5, -0.4, 0.3])  # mean 0.13 < 2 × std
    assert not results.clearly_positive([0.01, 0.01])  # below the 0.02-nat floor
    noisy = paths(staged=[(3.0, 2.0, 1, None, None), (3.4, 2.4, 1, None, None)],
                  joint=[(3.3, 2.3, 1, None, None), (3.1, 2.1, 1, None, None)])
    assert verdicts(noisy, "seed")[0] == "not supported"


def test_the_stability_gap_of_an_entry():
    entry = {"parent_final": {"language": 3.0}, "tokens": {"total": 200, "stage": 100},
             "losses": {"final": {"language": 3.1}, "curve": {"language": [[150, 3.2], [200, 3.1]]}},
             "stability_gap": {"domains": {"language": {"points": [[0, 100, 3.0], [2, 110, 3.5], [4, 120, 3.3]]}}}}
    gap = results.stability(entry)
    assert gap["gap"] == pytest.approx(0.5) and gap["peak_at_tokens"] == 10
    assert gap["final_rise"] == pytest.approx(0.1) and gap["recovered"] == pytest.approx(0.8)


def test_the_data_fingerprint_is_the_datas_content_not_where_its_sources_were_installed(tmp_path):
    """The same data prepared again on a fresh machine (other source mtimes, so other manifest keys) counts as
    the same data; other documents or tokens do not."""
    def prepared(root: Path, key: str, train_tokens: int) -> Path:
        for domain in plan_module.DOMAINS:
            (root / domain).mkdir(parents=True, exist_ok=True)
            (root / domain / "manifest.json").write_text(json.dumps({
                "key": key, "config_key": f"config-{domain}", "tokenizer_sha256": "t",
                "documents": {"train": 10, "val": 2}, "tokens": {"train": train_tokens, "val": 50}}))
        return root

    here = plan_module.data_fingerprint(prepared(tmp_path / "a", "mtimes-here", 1000))
    assert plan_module.data_fingerprint(prepared(tmp_path / "b", "mtimes-there", 1000)) == here
    assert plan_module.data_fingerprint(prepared(tmp_path / "c", "mtimes-here", 1001)) != here
    assert plan_module.data_fingerprint(tmp_path / "none") != here
