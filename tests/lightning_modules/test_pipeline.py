"""The pipeline's skip / resume / restart decisions, and the report's contents.

The stages' training itself is covered elsewhere; here the process the pipeline runs for a stage
(`run_forwarding_signals`) is replaced by a fake stage that records its command line and writes what a real
`stagewise fit` leaves behind.
"""

from pathlib import Path

import pytest
import yaml

from datamodules.stage_record import update_stage_record
from datamodules.errors import StagewiseError
from lightning_modules import pipeline as pl
from lightning_modules.report import write_report


@pytest.fixture
def fake_fit(monkeypatch, tmp_path):
    """A stand-in for the `stagewise fit` subprocess: records argv, writes the best ckpt and stage.json (other
    commands, a stage's `before`, are only recorded)."""
    monkeypatch.chdir(tmp_path)
    calls: list[list[str]] = []

    def run(cmd, env=None, cwd=None, **streams):
        calls.append(cmd)
        if "fit" not in cmd:  # a stage's `before` command
            return 0
        arg = lambda name: [a.split("=", 1)[1] for a in cmd if a.startswith(f"--{name}=")][-1]  # noqa: E731
        name, models = arg("stage.name"), Path(arg("stage.models_dir")) / arg("stage.experiment")
        models.mkdir(parents=True, exist_ok=True)
        (models / f"{name}_model_best.ckpt").write_bytes(f"weights of {name} {len(calls)}".encode())
        parent = arg("stage.parent")
        update_stage_record(models, name, {"stage": name, "parent": {"stage": parent} if parent != "null" else None,
                                           "losses": {"final": {"language": 3.0}}})
        return 0

    monkeypatch.setattr(pl, "run_forwarding_signals", run)
    Path("stage.yaml").write_text("trainer: {max_steps: 3}\n")
    return calls


def _stages():
    return [pl.StageSpec("language", ["stage.yaml"]), pl.StageSpec("code", ["stage.yaml"], ["--trainer.max_steps=2"])]


def test_stages_chain_from_the_previous_best_and_rerun_is_skipped(fake_fit):
    assert pl.pipeline(_stages(), experiment="t", report=False) == {"language": "trained", "code": "trained"}
    assert "--stage.parent=null" in fake_fit[0] and "--stage.parent=language" in fake_fit[1]
    assert "--trainer.max_steps=2" in fake_fit[1]
    for cmd in fake_fit:  # the pipeline's experiment and directories come after the stage's own args: they win
        assert cmd[-5:] == ["--stage.experiment=t", "--stage.models_dir=models", "--stage.runs_dir=runs",
                            "--data.init_args.data_dir=data", "--overwrite"]
    assert pl.pipeline(_stages(), experiment="t", report=False) == {"language": "skipped", "code": "skipped"}
    assert len(fake_fit) == 2


def test_changed_config_reruns_that_stage_and_its_children(fake_fit):
    pl.pipeline(_stages(), experiment="t", report=False)
    Path("runs/t/language/events.out.tfevents.1").write_text("old run")
    Path("stage.yaml").write_text("trainer: {max_steps: 4}\n")
    assert pl.pipeline(_stages(), experiment="t", report=False) == {"language": "trained", "code": "trained"}
    moved = [p for p in Path("runs/t").iterdir() if p.name.startswith("language.")]
    assert len(moved) == 1 and (moved[0] / "events.out.tfevents.1").read_text() == "old run"  # kept aside
    assert not list(Path("runs/t/language").glob("events*"))  # nothing of the old run mixes into the new one


def test_interrupted_stage_resumes_from_its_last_checkpoint(fake_fit):
    pl.pipeline(_stages(), experiment="t", report=False)
    # code was interrupted: no matching record, but its run dir has the same key and a last.ckpt
    update_stage_record(Path("models/t"), "code", {"pipeline_key": "stale"})
    (Path("runs/t/code/checkpoints")).mkdir(parents=True)
    Path("runs/t/code/checkpoints/last.ckpt").write_bytes(b"x")
    assert pl.pipeline(_stages(), experiment="t", report=False) == {"language": "skipped", "code": "resumed"}
    assert fake_fit[-1][-2:] == ["--ckpt_path", "runs/t/code/checkpoints/last.ckpt"]


def test_bad_pipelines_are_refused(fake_fit):
    with pytest.raises(StagewiseError, match="does not exist"):
        pl.pipeline([pl.StageSpec("language", ["missing.yaml"])], report=False)
    with pytest.raises(StagewiseError, match="not an earlier stage"):
        pl.pipeline([pl.StageSpec("code", ["stage.yaml"], parent="language")], report=False)
    with pytest.raises(StagewiseError, match="unique"):
        pl.pipeline([pl.StageSpec("a", ["stage.yaml"]), pl.StageSpec("a", ["stage.yaml"])], report=False)


def test_report_has_a_column_per_domain_forgetting_and_plots(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    models, runs = tmp_path / "models", tmp_path / "runs"
    records = {
        "language": {"tokens": {"stage": 100, "total": 100}, "wall_time_s": 10,
                     "losses": {"final": {"language": 4.25}}},
        "code": {"parent": {"stage": "language"}, "tokens": {"stage": 50, "total": 150}, "wall_time_s": 5,
                 "losses": {"final": {"language": 4.5, "code": 3.75}},
                 "forgetting": {"language": {"baseline": 4.25, "final": 4.5, "max_rise": 0.0588,
                                             "max_rise_step": 40, "alarms": [{"level": "warn", "step": 40}]}}},
        "joint": {"tokens": {"stage": 150, "total": 150}, "wall_time_s": 14,
                  "losses": {"final": {"language": 4.0, "code": 4.125}},
                  "tools": {"json_valid": 0.5, "name_accuracy": 0.25, "call_accuracy": 0.125}},
    }
    for name, record in records.items():
        update_stage_record(models / "exp", name, record)
        writer = SummaryWriter(runs / "exp" / name)
        for step, tokens in ((1, 50), (2, 100)):
            for domain in record["losses"]["final"]:
                writer.add_scalar(f"val/{domain}/loss", 5.0 - step, step)
                writer.add_scalar(f"val_tokens/{domain}/loss", 5.0 - step, tokens)
        writer.close()
    path = write_report("exp", ["language", "code"], ["joint"], models_dir=str(models), runs_dir=str(runs))
    text = path.read_text()
    assert "| language loss | code loss |" in text
    assert "| code | language | 50 | 150 | 5s | 4.500 | 3.750 | – |" in text
    assert "0.50 / 0.25 / 0.12" in text  # joint's tool-call scores
    assert "+5.9% (step 40) | warn@40" in text
    for png in ("loss_vs_tokens.png", "quality_vs_time.png"):
        assert (path.parent / png).stat().st_size > 10_000 and f"]({png})" in text


def test_report_refuses_a_stage_that_has_not_run(tmp_path):
    with pytest.raises(StagewiseError, match="run the stage first"):
        write_report("exp", ["language"], models_dir=str(tmp_path / "models"), runs_dir=str(tmp_path / "runs"))


def test_command_line_dirs_and_experiment_reach_every_stage_and_prepare(fake_fit, monkeypatch):
    prepared = []
    monkeypatch.setattr(pl, "prepare_main", prepared.append)
    Path("data.yaml").write_text("data_dir: data_from_config\ncorpora: {}\n")
    Path("pipe.yaml").write_text(yaml.safe_dump({
        "experiment": "from_config", "data": "data.yaml", "report": False,
        "stages": [{"name": "language", "configs": ["stage.yaml"]}, {"name": "code", "configs": ["stage.yaml"]}],
        "baselines": [{"name": "joint", "configs": ["stage.yaml"], "args": ["--data.init_args.data_dir=elsewhere"]}]}))
    pl.main(["-c", "pipe.yaml", "--experiment", "b", "--models_dir", "X", "--runs_dir", "R", "--data_dir", "Y"])
    assert prepared == [["-c", "data.yaml", "--data_dir=Y"]]
    for cmd in fake_fit:  # after the stage's own arguments: they win over its configs and args
        assert cmd[-5:-1] == ["--stage.experiment=b", "--stage.models_dir=X", "--stage.runs_dir=R",
                              "--data.init_args.data_dir=Y"]
    assert sorted(p.name for p in Path("X/b").glob("*.ckpt")) == [
        "code_model_best.ckpt", "joint_model_best.ckpt", "language_model_best.ckpt"]
    assert not Path("models").exists() and set(Path("R").iterdir()) == {Path("R/b")}
    pl.main(["-c", "pipe.yaml", "--models_dir", "X", "--runs_dir", "R"])  # the config's experiment and data_dir
    assert fake_fit[-1][-5:-1] == ["--stage.experiment=from_config", "--stage.models_dir=X", "--stage.runs_dir=R",
                                   "--data.init_args.data_dir=data_from_config"]
    assert prepared[-1] == ["-c", "data.yaml", "--data_dir=data_from_config"]


def test_report_says_when_a_lineage_is_broken(tmp_path, capsys):
    from datamodules.stage_record import file_sha256

    exp = tmp_path / "models" / "exp"
    exp.mkdir(parents=True)
    for name in ("language", "code"):
        (exp / f"{name}_model_best.ckpt").write_bytes(f"weights of {name}".encode())
    language, code = exp / "language_model_best.ckpt", exp / "code_model_best.ckpt"
    update_stage_record(exp, "language", {"checkpoint": {"path": str(language), "sha256": file_sha256(language)},
                                          "losses": {"final": {"language": 4.0}}})
    update_stage_record(exp, "code", {"checkpoint": {"path": str(code), "sha256": file_sha256(code)},
                                      "parent": {"stage": "language", "path": str(language), "sha256": file_sha256(language)},
                                      "losses": {"final": {"language": 4.5, "code": 3.0}}})
    runs = str(tmp_path / "runs")
    text = write_report("exp", ["language", "code"], models_dir=str(tmp_path / "models"), runs_dir=runs).read_text()
    assert "Lineage: checked" in text and "broken" not in text
    # language is trained again (another experiment's copy lands here): code no longer continues it
    language.write_bytes(b"weights of another language stage")
    update_stage_record(exp, "language", {"checkpoint": {"path": str(language), "sha256": file_sha256(language)}})
    capsys.readouterr()
    text = write_report("exp", ["language", "code"], models_dir=str(tmp_path / "models"), runs_dir=runs).read_text()
    assert "| code (lineage broken) | language |" in text and "## Lineage: broken" in text
    assert "it started from" in text and "the parent was retrained or replaced after this stage started" in text
    assert "the 'language' row of this report describes checkpoint" in text
    assert "lineage broken for 'code'" in capsys.readouterr().err
    # a checkpoint replaced behind its record's back
    code.write_bytes(b"other weights")
    text = write_report("exp", ["language", "code"], models_dir=str(tmp_path / "models"), runs_dir=runs).read_text()
    assert "is not the checkpoint its record" in text


def test_report_from_records_alone_checks_their_hashes_and_names_their_card(tmp_path):
    """Records brought back from a GPU machine without their checkpoints: the chain is checked on the records'
    hashes (a parent that is not its parent's record still breaks it), the card is the device they name."""
    import json

    exp = tmp_path / "models" / "exp"
    gpu = {"tokens_per_s": 1000, "devices": 1, "device": "NVIDIA H200"}
    update_stage_record(exp, "language", {"checkpoint": {"path": "elsewhere/language.ckpt", "sha256": "a" * 64},
                                          "losses": {"final": {"language": 4.0}}, "throughput": gpu})
    update_stage_record(exp, "code", {"checkpoint": {"path": "elsewhere/code.ckpt", "sha256": "b" * 64},
                                      "parent": {"stage": "language", "path": "elsewhere/language.ckpt",
                                                 "sha256": "a" * 64},
                                      "losses": {"final": {"language": 4.5, "code": 3.0}}, "throughput": gpu})
    runs = tmp_path / "runs"
    text = write_report("exp", ["language", "code"], models_dir=str(tmp_path / "models"), runs_dir=str(runs)).read_text()
    assert "checked on the records alone" in text and "broken" not in text and "## Plots" not in text
    assert json.loads((runs / "exp" / "report.json").read_text())["card"] == "1x NVIDIA H200"
    update_stage_record(exp, "code", {"parent": {"stage": "language", "path": "elsewhere/language.ckpt",
                                                 "sha256": "c" * 64}})
    text = write_report("exp", ["language", "code"], models_dir=str(tmp_path / "models"), runs_dir=str(runs),
                        card="2x NVIDIA H100").read_text()
    assert "| code (lineage broken) |" in text and "no longer exists" not in text
    assert json.loads((runs / "exp" / "report.json").read_text())["card"] == "2x NVIDIA H100"


def test_a_stage_runs_its_before_command_first_from_its_parent(fake_fit):
    stages = [*_stages(), pl.StageSpec("preference", ["stage.yaml"], before=["pairs", "--parent", "{parent}",
                                                                              "--data_dir", "{data_dir}"])]
    pl.pipeline(stages, experiment="t", report=False, data_dir="mydata")
    assert fake_fit[2][-5:] == ["pairs", "--parent", "models/t/code_model_best.ckpt", "--data_dir", "mydata"]
    assert "--stage.parent=code" in fake_fit[3]  # then the fit
    assert pl.pipeline(stages, experiment="t", report=False, data_dir="mydata")["preference"] == "skipped"
    assert len(fake_fit) == 4  # up to date: neither runs again
    stages[-1].before += ["--limit", "8"]  # other pairs: part of the stage's key, so it trains again
    assert pl.pipeline(stages, experiment="t", report=False, data_dir="mydata")["preference"] == "trained"
    assert fake_fit[4][-2:] == ["--limit", "8"] and len(fake_fit) == 6
    with pytest.raises(StagewiseError, match="not a command"):
        pl.pipeline([pl.StageSpec("p", ["stage.yaml"], before=["frobnicate"])], report=False)


def test_stages_side_by_side_that_need_the_same_before_step_take_turns(monkeypatch):
    """Recipe variants run in threads; two preference variants of one parent make the same pairs: the second
    must wait for the first (then `stagewise pairs` finds them up to date) instead of writing them beside it."""
    import threading
    import time

    inside, most, lock = [0], [0], threading.Lock()

    def run(cmd, env=None, cwd=None, **streams):
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.2)
        with lock:
            inside[0] -= 1
        return 0

    monkeypatch.setattr(pl, "run_forwarding_signals", run)
    same = lambda name: pl.StageSpec(name, ["s.yaml"], before=["pairs", "--parent", "{parent}"])  # noqa: E731
    threads = [threading.Thread(target=pl._run_before, args=(same(n), Path("p.ckpt"), "data", None)) for n in "ab"]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert most[0] == 1
    other = pl.StageSpec("c", ["s.yaml"], before=["pairs", "--parent", "{parent}"])  # another parent: no waiting
    threads = [threading.Thread(target=pl._run_before, args=(spec, Path(p), "data", None))
               for spec, p in ((same("a"), "p.ckpt"), (other, "q.ckpt"))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert most[0] == 2


def test_report_of_a_preference_stage_gives_its_pair_metrics_and_tool_scores_before_and_after(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    models, runs = tmp_path / "models", tmp_path / "runs"
    scores = {"json_valid": 0.5, "name_accuracy": 0.25, "call_accuracy": 0.125}
    update_stage_record(models / "exp", "tools", {"losses": {"final": {"tools": 2.0}}, "tools": scores})
    update_stage_record(models / "exp", "preference", {"parent": {"stage": "tools"}, "best_step": 20, "losses": {
        "final": {"tools": 1.5, "preference": 0.5}}, "tools": dict(scores, call_accuracy=0.375)})
    writer = SummaryWriter(runs / "exp" / "preference")
    for step, accuracy in ((0, 0.0), (20, 0.75), (40, 0.625)):  # the best checkpoint is step 20's validation
        writer.add_scalar("val/preference/reward_accuracy", accuracy, step)
    writer.close()
    text = write_report("exp", ["tools", "preference"], models_dir=str(models), runs_dir=str(runs)).read_text()
    assert "| tools loss | tools json" in text and "preference loss" not in text  # pairs: their own section
    assert "| preference | tools | 0.75 | – | – | 0.50 / 0.25 / 0.12 → 0.50 / 0.25 / 0.38 |" in text


def test_report_of_a_preference_stage_reads_its_pair_metrics_from_the_record_without_event_files(tmp_path):
    """A record written by StageHandoff carries the best checkpoint's val/preference/* (val_metrics) and pair loss
    (losses.best): the card needs no TensorBoard files (a GPU machine's results come back without them)."""
    models, runs = tmp_path / "models", tmp_path / "runs"
    scores = {"json_valid": 0.5, "name_accuracy": 0.25, "call_accuracy": 0.125}
    update_stage_record(models / "exp", "tools", {"losses": {"final": {"tools": 2.0}}, "tools": scores})
    update_stage_record(models / "exp", "preference", {
        "parent": {"stage": "tools"}, "best_step": 20,
        "losses": {"final": {"preference": 0.6}, "best": {"tools": 1.5, "preference": 0.25}}, "tools": scores,
        "val_metrics": {"best": {"val/preference/reward_accuracy": 0.875, "val/preference/reward_margin": 1.5},
                        "final": {"val/preference/reward_accuracy": 0.5}}})
    text = write_report("exp", ["tools", "preference"], models_dir=str(models), runs_dir=str(runs)).read_text()
    assert "| preference | tools | 0.88 | 1.500 | 0.250 |" in text
