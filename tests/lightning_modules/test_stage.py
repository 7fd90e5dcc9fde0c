"""The stage as one object: what `stagewise fit` derives from `stage:`, its precedence, the config layout,
one TensorBoard step axis per validation, the HPARAMS tab, the console script's imports, and pipelines whose
experiments and directories never touch each other's files."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from callbacks import BestCheckpoint, ForgettingMonitor, StageHandoff, TextSamples, ToolCallEval
from datamodules.stage_record import file_sha256, read_stage_record, update_stage_record
from lightning_modules import pipeline as pl
from lightning_modules.cli import main, run_lightning

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
TINY, CPU = str(CONFIGS / "model" / "tiny.yaml"), str(CONFIGS / "overlays" / "cpu.yaml")
STEPS = ["--trainer.max_steps=4", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=2",
         "--data.init_args.seq_len=16", "--data.init_args.batch_size=2", "--trainer.enable_progress_bar=false"]


def stage(name: str) -> str:
    return str(CONFIGS / "stages" / f"{name}.yaml")


def finished_stage(models: Path, name: str, domains: list[str]) -> Path:
    """What a finished stage leaves for its child: a best checkpoint and the record that describes it (the
    weights are not read when the child's classes are only built)."""
    best = models / f"{name}_model_best.ckpt"
    best.parent.mkdir(parents=True, exist_ok=True)
    best.write_bytes(f"weights of {name}".encode())
    update_stage_record(models, name, {"checkpoint": {"path": str(best), "sha256": file_sha256(best)},
                                       "domains": domains})
    return best


def built(*args: str):
    """The CLI of ``stagewise fit <args>`` with its classes built, nothing run."""
    return run_lightning([*args, "--trainer.accelerator=cpu"], run=False)


def callback(cli, cls):
    return next(cb for cb in cli.trainer.callbacks if isinstance(cb, cls))


def test_a_stage_config_alone_is_a_complete_stage(tmp_path, monkeypatch, corpora):
    monkeypatch.chdir(tmp_path)
    parent = finished_stage(Path("models/default"), "language", ["language"])
    cli = built("-c", stage("code"), "-c", TINY, f"--data.init_args.data_dir={corpora}")
    best = callback(cli, BestCheckpoint)
    assert Path(best.dirpath) == (tmp_path / "models/default").resolve() and best.filename == "code_model_best"
    assert best.monitor == "val/code/loss" and best.mode == "min"
    handoff, forgetting = callback(cli, StageHandoff), callback(cli, ForgettingMonitor)
    assert (handoff.stage, handoff.models_dir, handoff.experiment) == ("code", "models/default", "default")
    assert (forgetting.stage, forgetting.stage_domain, forgetting.domains) == ("code", "code", ["language"])
    assert callback(cli, TextSamples) is not None  # from configs/base.yaml, never named
    listed = built("-c", stage("code"), "-c", TINY, f"--data.init_args.data_dir={corpora}",
                   "--trainer.callbacks+=callbacks.ToolCallEval")  # a stage's own callback gets the stage too
    assert (callback(listed, ToolCallEval).stage, callback(listed, ToolCallEval).models_dir) == ("code", "models/default")
    assert Path(cli.trainer.logger.log_dir) == Path("runs/default/code")
    assert cli.datamodule.corpus == "code" and cli.datamodule.val_domains == ["language", "code"]
    assert cli.model.hparams.init_from == str(parent) and cli.model.hparams.lr == 1e-4
    assert cli.trainer.max_steps == 3000 and cli.model.hparams.size == "tiny"  # base config, then the preset


def test_precedence_of_explicit_values_and_of_the_stage(tmp_path, monkeypatch, corpora):
    monkeypatch.chdir(tmp_path)
    other = finished_stage(tmp_path / "elsewhere", "mine", ["language", "code"])
    # an explicit init_from beats stage.parent (whose stage has not run here), and brings its own lineage
    cli = built("-c", stage("code"), "-c", TINY, f"--data.init_args.data_dir={corpora}",
                f"--model.init_args.init_from={other}")
    assert cli.model.hparams.init_from == str(other) and cli.datamodule.val_domains == ["language", "code"]
    # explicit validation domains and watched domains beat the lineage's
    cli = built("-c", stage("code"), "-c", TINY, f"--data.init_args.data_dir={corpora}",
                f"--model.init_args.init_from={other}", "--data.init_args.val_domains=[code]",
                "--forgetting.domains=[]")
    assert cli.datamodule.val_domains == ["code"] and callback(cli, ForgettingMonitor).domains == []
    # the stage decides where things go, whatever a config says about the logger or the callbacks' stage
    finished_stage(Path("M/b"), "language", ["language"])
    cli = built("-c", stage("code"), "-c", TINY, f"--data.init_args.data_dir={corpora}", "--stage.experiment=b",
                "--stage.models_dir=M", "--stage.runs_dir=R", "--trainer.logger.init_args.version=mine",
                "--handoff.stage=mine")
    assert Path(cli.trainer.logger.log_dir) == Path("R/b/code") and callback(cli, StageHandoff).stage == "code"
    assert callback(cli, StageHandoff).models_dir == "M/b" and cli.model.hparams.init_from == "M/b/language_model_best.ckpt"


def test_a_stage_validates_on_its_parents_windows_whatever_its_batch_size(tmp_path, monkeypatch, corpora):
    """The parent's window length and window cap carry over, so a stage at another batch size scores the same
    held-out windows; a batch cap (limit_val_batches) on a stage with a parent is warned about."""
    monkeypatch.chdir(tmp_path)
    models = Path("models/default")
    finished_stage(models, "language", ["language"])
    update_stage_record(models, "language", {"val_seq_len": 24, "val_max_windows": 6})
    for batch in (4, 1):
        cli = built("-c", stage("code"), "-c", TINY, f"--data.init_args.data_dir={corpora}",
                    "--data.init_args.seq_len=16", f"--data.init_args.batch_size={batch}")
        assert (cli.datamodule.val_seq_len, cli.datamodule.val_max_windows) == (24, 6)
        windows = [loader.dataset for loader in cli.datamodule.val_dataloader()]
        assert [(len(w), w.seq_len) for w in windows] == [(6, 24), (6, 24)]  # language, code: the parent's windows
    with pytest.warns(UserWarning, match="val_max_windows=3 but its parent validated with 6"):
        explicit = built("-c", stage("code"), "-c", TINY, f"--data.init_args.data_dir={corpora}",
                         "--data.init_args.val_max_windows=3")
    assert explicit.datamodule.val_max_windows == 3  # an explicit value beats the parent's, with a warning
    with pytest.warns(UserWarning, match=r"limit_val_batches=2(\.0)? validates a number of batches"):
        built("-c", stage("code"), "-c", TINY, f"--data.init_args.data_dir={corpora}", "--trainer.limit_val_batches=2")


def test_the_joint_baseline_is_a_stage_from_scratch_on_a_mixture(tmp_path, monkeypatch, corpora):
    monkeypatch.chdir(tmp_path)
    cli = built("-c", str(CONFIGS / "baselines" / "joint.yaml"), "-c", TINY, f"--data.init_args.data_dir={corpora}")
    assert callback(cli, BestCheckpoint).monitor == "val/code/loss" and cli.model.hparams.init_from is None
    assert cli.datamodule.corpus == "language" and cli.datamodule.val_domains == ["language", "code"]
    assert callback(cli, ForgettingMonitor).domains == []  # from scratch: nothing to forget
    assert Path(cli.trainer.logger.log_dir) == Path("runs/default/joint")


def test_stage_configs_state_only_their_differences():
    for path in sorted((CONFIGS / "stages").glob("*.yaml")) + [CONFIGS / "baselines" / "joint.yaml"]:
        lines = [line for line in path.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
        assert len(lines) <= 20, (path.name, len(lines))
    assert not (CONFIGS / "joint.yaml").exists() and not (CONFIGS / "pipelines" / "demo_cpu.yaml").exists()


def _scalars(run_dir: Path) -> tuple[dict[str, list[int]], EventAccumulator]:
    acc = EventAccumulator(str(next(run_dir.glob("events.out.tfevents.*"))), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}, acc


def test_one_step_axis_per_validation_and_hparams_that_define_the_run(tmp_path, monkeypatch, corpora):
    from tensorboard.plugins.hparams import plugin_data_pb2

    monkeypatch.chdir(tmp_path)
    common = ["-c", TINY, f"--data.init_args.data_dir={corpora}", *STEPS]
    main(["fit", "-c", stage("language"), *common])
    main(["fit", "-c", stage("code"), *common, "--forgetting.grace=0"])
    steps, acc = _scalars(tmp_path / "runs/default/code")
    per_validation = [t for t in steps if t.startswith(("val/", "forgetting/"))]
    assert {"val/language/loss", "val/code/loss", "forgetting/language"} <= set(per_validation)
    for tag in per_validation:  # one x per validation: the optimizer steps taken, whoever logged it
        assert steps[tag] == [2, 4], (tag, steps[tag])
    assert [e.step for e in acc.Tensors("samples/code/text_summary")] == [2, 4]
    content = acc.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["seq_len"].number_value == 16 and hparams["batch_size"].number_value == 2
    assert hparams["trainer/max_steps"].number_value == 4 and hparams["seed"].number_value == 1234
    assert hparams["data_dir"].string_value == str(corpora) and hparams["corpus"].string_value == "code"
    assert hparams["init_from"].string_value == "models/default/language_model_best.ckpt"


# ----------------------------------------------------------------------------------------- console script
def console_script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The installed ``stagewise`` entry point (not ``python -m``), run in ``cwd``."""
    script = Path(sys.executable).parent / "stagewise"
    return subprocess.run([str(script), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_the_readmes_subclass_commands_run_through_the_console_script(tmp_path, corpora):
    readme = (REPO / "README.md").read_text()
    commands = [line.split("#")[0].split()[1:] for line in readme.splitlines()
                if line.startswith("stagewise fit") and "--model experiments.examples." in line]
    assert len(commands) == 2
    where = [f"--data.init_args.data_dir={corpora}", f"--stage.models_dir={tmp_path / 'models'}",
             f"--stage.runs_dir={tmp_path / 'runs'}", "--trainer.accelerator=cpu", *STEPS]
    trained = console_script(*commands[0], *where, cwd=REPO)
    assert trained.returncode == 0, trained.stderr[-3000:]
    hparams = torch.load(tmp_path / "models/default/language_model_best.ckpt", weights_only=False)["hyper_parameters"]
    assert hparams["_class_path"] == "experiments.examples.label_smoothing.LabelSmoothingLM"
    printed = console_script(*commands[1], *where, "--print_config", cwd=REPO)
    assert printed.returncode == 0 and "SlidingWindowLM" in printed.stdout, printed.stderr[-3000:]
    # a module of the user's own, in the working directory
    (tmp_path / "mymodule.py").write_text("from lightning_modules import CausalLM\n\n\nclass MyLM(CausalLM):\n"
                                          "    \"\"\"Mine.\"\"\"\n")
    printed = console_script("fit", "-c", stage("language"), "-c", TINY, "--model", "mymodule.MyLM", *where,
                             "--print_config", cwd=tmp_path)
    assert printed.returncode == 0 and "class_path: mymodule.MyLM" in printed.stdout, printed.stderr[-3000:]


# ----------------------------------------------------------------------------------------- pipelines
def snapshot(*roots: Path) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for root in roots for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.mark.slow
def test_experiments_side_by_side_a_fourth_stage_and_pipeline_directories(tmp_path, monkeypatch, corpora):
    """Two experiments of one pipeline in one checkout, each a staged path of four stages (the fourth added as
    one short YAML file and one pipeline line), and a third with its own models and runs directories. The fits
    run in this process (the pipeline's `stagewise fit` command, without paying the interpreter's start-up)."""
    monkeypatch.chdir(tmp_path)
    real_run = subprocess.run  # the report card's nvidia-smi and git calls stay real

    def in_process(cmd, env=None, cwd=None, **streams):
        if cmd[1:4] != ["-m", "lightning_modules", "fit"]:
            return real_run(cmd, env=env, cwd=cwd, **streams)
        assert cwd is None
        try:
            main(cmd[3:])
        except SystemExit as exit:
            return exit.code
        return 0

    monkeypatch.setattr(pl, "run_forwarding_signals", in_process)
    shutil.copytree(corpora, "Y")
    shutil.copytree("Y/code", "Y/code_copy")  # a fourth corpus, prepared with the same tokenizer
    Path("extra.yaml").write_text("stage:\n  name: extra\n  domain: code_copy\n  parent: tools\n")
    line = lambda name, configs: {"name": name, "configs": [*configs, TINY, CPU], "args": STEPS}  # noqa: E731
    Path("pipe.yaml").write_text(yaml.safe_dump({
        "experiment": "a", "data_dir": "Y",
        "stages": [line("language", [stage("language")]), line("code", [stage("code")]),
                   # a third stage of the demo's kind, on code again (no tool corpus here)
                   line("tools", [stage("code")]), line("extra", ["extra.yaml"])]}))

    pl.main(["-c", "pipe.yaml"])
    a = snapshot(Path("models/a"), Path("runs/a"))
    pl.main(["-c", "pipe.yaml", "--experiment", "b"])
    assert snapshot(Path("models/a"), Path("runs/a")) == a  # b never touched a's files
    for exp in ("a", "b"):
        assert sorted(p.name for p in Path(f"models/{exp}").glob("*.ckpt")) == [
            f"{s}_model_best.ckpt" for s in ("code", "extra", "language", "tools")]
        extra = read_stage_record(f"models/{exp}", "extra")
        assert extra["parent"]["path"] == f"models/{exp}/tools_model_best.ckpt"
        assert extra["domains"] == ["language", "code", "code_copy"] and set(extra["losses"]["final"]) == {
            "language", "code", "code_copy"}
        report = Path(f"runs/{exp}/report.md").read_text()
        assert "| extra | tools |" in report and "Lineage: checked" in report
    # its own models and runs directories, its own data: nothing else is read or written
    before = snapshot(Path("models"), Path("runs"))
    pl.main(["-c", "pipe.yaml", "--experiment", "c", "--models_dir", "X", "--runs_dir", "R", "--report", "false"])
    assert snapshot(Path("models"), Path("runs")) == before and not Path("data").exists()
    assert sorted(p.name for p in Path("X/c").glob("*.ckpt")) == [
        f"{s}_model_best.ckpt" for s in ("code", "extra", "language", "tools")]
    assert {p.name for p in Path("R/c").iterdir()} == {"language", "code", "tools", "extra"}
    # a second run skips every stage
    assert pl.pipeline([pl.StageSpec(**line("language", [stage("language")]))], experiment="a", data_dir="Y",
                       report=False) == {"language": "skipped"}
