"""experiments/staged_vs_joint.py: a real tiny end-to-end study on CPU, the rerun that skips finished runs,
failures that do not stop the study, and the verdict rules on hand-made numbers."""

import json
import math
import random
import shlex
from pathlib import Path

import pytest

from datamodules.prepare import Corpus, TokenizerConfig, prepare
from datamodules.sources import TextFiles
from experiments import staged_vs_joint as study

WORDS = ("the a river stone light quick brown fox jumps over lazy dog morning evening city market bread water "
         "winter summer people house window garden music letter night sleep dream king queen").split()
CODE = ["def f(x):", "    return x + 1", "for i in range(10):", "    print(i)", "if x == 0:", "    x = y * 2",
        "class A:", "    pass", "import os", "y = [i for i in x]", "while n > 0:", "    n -= 1"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Prepared ``language`` (English-like) and ``code`` (Python-like) corpora with a 320-token tokenizer."""
    root = tmp_path_factory.mktemp("study_data")
    rng = random.Random(1)
    for name in ("language", "code"):
        (root / name).mkdir()
    for i in range(60):
        text = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "." for _ in range(5)]
        (root / "language" / f"doc{i:02d}.txt").write_text("\n".join(text) + "\n")
        (root / "code" / f"mod{i:02d}.py").write_text("\n".join(rng.choice(CODE) for _ in range(12)) + "\n")
    corpora = {name: Corpus(sources=[TextFiles(paths=["*"], root=str(root / name))], val_fraction=0.2,
                            test_fraction=0.1) for name in ("language", "code")}
    prepare(corpora, TokenizerConfig(vocab_size=320, sample_bytes=40000), str(root / "data"))
    return root / "data"


def tiny_args(data_dir: Path, out: Path) -> list[str]:
    # 32 tokens per step: stage 1 8 steps, stage 2 2 steps (256 / 3 × 7/93 × 10 ≈ 64 tokens), joint 10 steps
    return ["--size", "tiny", "--seeds", "1", "--seq-len", "16", "--batch-size", "2", "--language-tokens", "256",
            "--language-lr", "1e-3", "--val-points", "2", "--val-windows", "4", "--devices", "cpu", "cpu",
            "--data-dir", str(data_dir), "--out", str(out)]


@pytest.mark.slow
def test_tiny_study_end_to_end_and_rerun_skips_finished_runs(data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    study.main(tiny_args(data_dir, out))
    results = json.loads((out / "results.json").read_text())
    runs = {(r["condition"], r["seed"]): r for r in results["runs"]}
    assert set(runs) == {(c, 1) for c in (*study.CONDITIONS, study.STAGE1)}
    for r in runs.values():
        assert r["status"] == "ok", r.get("stderr_tail")
        assert all(math.isfinite(r["losses"]["final"][d]) for d in study.DOMAINS)
        assert r["card"] == "cpu" and r["command"].startswith("python -m lightning_modules fit")
        assert r["losses"]["curve"]["language"] and r["wall_time_s"] > 0
    assert runs[("language", 1)]["optimizer_steps"]["stage"] == 8 and runs[("joint", 1)]["optimizer_steps"]["stage"] == 10
    assert runs[("staged", 1)]["optimizer_steps"] == {"stage": 2, "total": 10, "trained": 2}
    for c in ("staged", "staged_lr1e-5", "replay5", "replay25"):  # equal tokens: staged path = joint
        assert runs[(c, 1)]["tokens"]["total"] == runs[("joint", 1)]["tokens"]["total"] == 10 * 32
        assert runs[(c, 1)]["parent"] == "language/seed1"
    assert runs[("replay25", 1)]["mixture"] == {"code": 0.75, "language": 0.25}
    assert runs[("joint", 1)]["mixture"] == {"language": 0.93, "code": 0.07}
    assert 'lr=5e-06' in runs[("staged", 1)]["command"] and 'lr=1e-05' in runs[("staged_lr1e-5", 1)]["command"]
    assert results["study"]["budget"] == {"tokens_per_step": 32, "language_steps": 8, "code_steps": 2, "joint_steps": 10}

    md = (out / "results.md").read_text()
    assert "| condition | seeds | language loss | code loss |" in md
    for c in study.CONDITIONS:
        assert f"| {c} | 1 | " in md
    assert md.count(": **supported**") + md.count(": **not supported**") + md.count(": **mixed**") == 3
    assert "Rules" in md
    for png in ("quality_vs_time.png", "loss_vs_tokens.png"):
        assert (out / png).stat().st_size > 10_000 and f"]({png})" in md
    assert "| staged |" in capsys.readouterr().out  # the table is printed
    # one experiment per seed, one stage per condition; only stage 1's weights are kept
    assert [p.name for p in (out / "models" / "seed1").glob("*_model_best.ckpt")] == ["language_model_best.ckpt"]
    assert sorted(p.name for p in (out / "runs" / "seed1").iterdir() if p.is_dir()) == sorted(
        (*study.CONDITIONS, study.STAGE1))
    staged = json.loads((out / "models" / "seed1" / "staged" / "stage.json").read_text())
    assert staged["parent"]["stage"] == "language" and staged["domains"] == ["language", "code"]

    before = {p: p.read_text() for p in out.glob("runs/seed1/*/result.json")}
    study.main(tiny_args(data_dir, out))
    assert {p: p.read_text() for p in out.glob("runs/seed1/*/result.json")} == before
    assert capsys.readouterr().out.count("skipped") == 6


def test_failed_runs_are_recorded_the_study_goes_on_and_a_rerun_retries_them(data_dir, tmp_path, monkeypatch):
    calls, summaries = [], []

    def fake_execute(run, args, device, out):
        cmd = study.fit_command_of(run, args, out, device == "cpu")
        calls.append(run.name)
        summary = out / "results.json"  # rewritten after every run: a study cut short keeps what it finished
        summaries.append([r["condition"] for r in json.loads(summary.read_text())["runs"]] if summary.exists() else None)
        if run.condition == "language":
            return {"condition": run.condition, "seed": run.seed, "status": "failed", "stderr_tail": "CUDA out of memory"}
        final = {"language": 3.0, "code": 2.0}
        return {"condition": run.condition, "seed": run.seed, "status": "ok", "command": shlex.join(["python", *cmd[1:]]),
                "parent": run.parent.name if run.parent else None, "card": "cpu", "process_time_s": 1.0,
                "wall_time_s": 1.0, "tokens": {"total": 320}, "losses": {"final": final, "curve": {}}}

    monkeypatch.setattr(study, "execute", fake_execute)
    out = tmp_path / "out"
    args = tiny_args(data_dir, out)
    args.remove("cpu")  # one worker: runs in plan order
    study.main(args)
    assert calls == ["language/seed1", "joint/seed1"]  # the code stages never start without their stage 1
    assert summaries == [None, ["language"]]
    runs = {r["condition"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert runs["language"]["stderr_tail"] == "CUDA out of memory" and runs["joint"]["status"] == "ok"
    assert "its stage 1 (language/seed1) failed" in runs["staged"]["stderr_tail"]
    md = (out / "results.md").read_text()
    assert "## Failed runs" in md and "CUDA out of memory" in md and "**not measured**" in md
    study.main(args)
    assert calls[2:] == ["language/seed1"]  # joint is done; the failed stage 1 is retried


def test_missing_data_says_how_to_prepare(tmp_path):
    with pytest.raises(SystemExit, match="prepare -c configs/data/study.yaml"):
        study.main(["--data-dir", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")])


def paths(**losses_by_condition):
    """{condition: {seed: path}} from {condition: [(language, code, wall time) per seed]}."""
    return {c: {s: {"losses": {"language": lang, "code": code}, "tokens": 100, "wall_time_s": t, "process_time_s": t}
                for s, (lang, code, t) in enumerate(rows, 1)} for c, rows in losses_by_condition.items()}


def verdict_of(by_condition) -> list[str]:
    return [v for _, v, _ in study.verdicts(by_condition)]


def test_verdicts_follow_the_written_rules():
    # The seed's story: staged lower in both domains, 1e-5 forgets language, 5e-6 keeps it, staged 10% slower.
    seed_story = paths(language=[(3.00, 5.0, 50), (3.02, 5.1, 52), (2.98, 5.0, 49)],
                       staged=[(3.01, 2.0, 60), (3.03, 2.1, 61), (2.99, 2.0, 59)],
                       **{"staged_lr1e-5": [(6.5, 1.9, 60), (6.7, 1.9, 61), (6.6, 1.8, 59)]},
                       joint=[(3.5, 3.8, 55), (3.6, 3.9, 55), (3.5, 3.7, 54)])
    assert verdict_of(seed_story) == ["supported", "supported", "supported"]
    # The opposite: joint lower in both, no forgetting at 1e-5, staged twice as slow.
    opposite = paths(language=[(3.0, 5.0, 50), (3.0, 5.0, 50)], staged=[(3.0, 3.0, 200), (3.0, 3.0, 210)],
                     **{"staged_lr1e-5": [(3.0, 2.9, 200), (3.01, 2.9, 200)]}, joint=[(2.9, 2.5, 100), (2.9, 2.5, 100)])
    assert verdict_of(opposite) == ["not supported", "not supported", "not supported"]
    # Mixed: staged lower on code only; both LRs forget; staged 1.4x slower.
    mixed = paths(language=[(3.0, 5.0, 50), (3.0, 5.0, 50)], staged=[(3.5, 2.0, 140), (3.5, 2.0, 140)],
                  **{"staged_lr1e-5": [(4.0, 2.0, 140), (4.0, 2.0, 140)]}, joint=[(3.0, 3.0, 100), (3.0, 3.0, 100)])
    assert verdict_of(mixed) == ["mixed", "mixed", "mixed"]


def test_a_difference_within_the_seed_noise_is_not_clear():
    assert study.clearly_positive([0.5, 0.6, 0.55])
    assert not study.clearly_positive([0.5, -0.4, 0.3])  # mean 0.13 < 2 × std
    assert not study.clearly_positive([0.01, 0.01])  # below the 0.02-nat floor
    noisy = paths(staged=[(3.0, 2.0, 1), (3.4, 2.4, 1)], joint=[(3.3, 2.3, 1), (3.1, 2.1, 1)])
    assert verdict_of(noisy)[0] == "not supported"


def test_budget_scales_like_the_seed():
    args = study.parse_args(["--seq-len", "512", "--batch-size", "16"])  # the defaults: 10M language tokens
    budget = study.plan_budget(args)
    assert budget.tokens_per_step == 8192
    assert budget.language_steps == 1220  # 10M / 8192 = 1220.7, to a multiple of 10 validation points
    assert budget.code_steps == 310  # 10M / 3 × 7/93 × 10 = 2.51M tokens = 306 steps -> 310
    assert budget.joint_steps == 1530


def test_a_staged_path_adds_its_stage_1_and_is_dropped_when_stage_1_failed():
    def result(condition, seed, wall, parent=None, status="ok", curve=None):
        return {"condition": condition, "seed": seed, "status": status, "parent": parent, "wall_time_s": wall,
                "process_time_s": wall + 5, "tokens": {"total": 100 if parent is None else 150},
                "losses": {"final": {"language": 3.0, "code": 2.0}, "curve": curve or {}}}

    results = {"language/seed1": result("language", 1, 40, curve={"code": [[50, 5.0], [100, 4.0]]}),
               "language/seed2": result("language", 2, 40, status="failed"),
               "staged/seed1": result("staged", 1, 10, "language/seed1", curve={"code": [[150, 3.0]]}),
               "staged/seed2": result("staged", 2, 10, "language/seed2", curve={"code": [[150, 1.0]]}),
               "joint/seed1": result("joint", 1, 35, curve={"code": [[75, 4.0], [150, 3.5]]}),
               "joint/seed2": result("joint", 2, 55, curve={"code": [[75, 3.0], [150, 2.5]]})}
    by_condition = study.paths(results)
    assert by_condition["staged"] == {1: {"losses": {"language": 3.0, "code": 2.0}, "tokens": 150,
                                          "wall_time_s": 50, "process_time_s": 60}}  # stage 1 + stage 2; seed 2 out
    assert study.verdicts(by_condition)[2][1] == "mixed"  # 50 s / 35 s = 1.43 (stage 2 alone: 0.29)
    curves, starts = study.mean_curves(results)
    assert curves["staged"]["val_tokens/code/loss"] == [(50, 5.0, 0.0), (100, 4.0, 0.0), (150, 3.0, 0.0)]
    assert curves["joint"]["val_tokens/code/loss"] == [(75, 3.5, 0.0), (150, 3.0, 0.0)]  # mean over seeds
    assert starts == {"staged": 100}
