"""``CausalLM(carry_optimizer=True)``: a stage that starts from its parent's AdamW moments (the parent's
``last.ckpt``) with its own, re-warmed LR schedule, records where they came from, and is refused before anything
is written when they are gone."""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules.stage_record import read_stage_record, update_stage_record
from lightning_modules.causal_lm import optimizer_state_source
from lightning_modules.cli import main, run_lightning

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "model" / "tiny.yaml")
STEPS = ["--trainer.val_check_interval=3", "--trainer.limit_val_batches=2", "--data.init_args.seq_len=16",
         "--data.init_args.batch_size=2", "--trainer.enable_progress_bar=false", "--trainer.callbacks=[]",
         "--trainer.accelerator=cpu"]


def stage(name: str) -> str:
    return str(REPO / "configs" / "stages" / f"{name}.yaml")


@pytest.fixture
def parent(tmp_path, monkeypatch, corpora) -> Path:
    """A language stage of 6 steps at LR 2e-3 (``models/default/language_model_best.ckpt``, its record, and
    ``runs/default/language/checkpoints/last.ckpt``), run in ``tmp_path``."""
    monkeypatch.chdir(tmp_path)
    main(["fit", "-c", stage("language"), "-c", TINY, f"--data.init_args.data_dir={corpora}", "--trainer.max_steps=6",
          "--model.init_args.lr=2e-3", *STEPS])
    assert Path("runs/default/language/checkpoints/last.ckpt").is_file()
    return Path("models/default/language_model_best.ckpt")


class Capture(L.Callback):
    """The optimizer's state and LR when training starts (after the state was loaded)."""

    def on_train_start(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        self.params = [p for g in opt.param_groups for p in g["params"]]
        self.state = [{k: v.clone() for k, v in opt.state[p].items()} if p in opt.state else None for p in self.params]
        self.groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


def child(corpora, carry: bool, capture: Capture | None = None) -> None:
    """The code stage from ``parent``, 4 steps at LR 1e-3 with 2 warmup steps."""
    cli = run_lightning(["-c", stage("code"), "-c", TINY, f"--data.init_args.data_dir={corpora}",
                         "--trainer.max_steps=4", "--model.init_args.lr=1e-3", "--model.init_args.warmup_steps=2",
                         f"--model.init_args.carry_optimizer={str(carry).lower()}", *STEPS], run=False)
    if capture is not None:
        cli.trainer.callbacks.append(capture)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)


def test_the_moments_come_from_the_parents_last_checkpoint_and_the_schedule_is_the_stages_own(parent, corpora):
    saved = torch.load("runs/default/language/checkpoints/last.ckpt", weights_only=False)["optimizer_states"][0]
    capture = Capture()
    child(corpora, carry=True, capture=capture)
    ids = [i for g in saved["param_groups"] for i in g["params"]]
    assert len(capture.params) == len(ids) and all(s is not None for s in capture.state)
    for state, i in zip(capture.state, ids):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state[key], saved["state"][i][key]), key
    assert float(capture.state[0]["step"]) == 6  # the parent's 6 steps: bias correction continues
    # this stage's LR and warmup (re-warmed: first step at lr / warmup), never the parent's 2e-3
    assert [g["initial_lr"] for g in capture.groups] == [1e-3, 1e-3]
    assert capture.groups[0]["lr"] == pytest.approx(1e-3 / 2)
    assert [g["weight_decay"] for g in capture.groups] == [0.1, 0.0]
    record = read_stage_record("models/default", "code")
    assert record["optimizer_from"] == {"path": "runs/default/language/checkpoints/last.ckpt", "optimizer_step": 6}


def test_a_fresh_optimizer_starts_empty_and_records_none(parent, corpora):
    capture = Capture()
    child(corpora, carry=False, capture=capture)
    assert capture.state == [None] * len(capture.params)
    assert read_stage_record("models/default", "code")["optimizer_from"] is None


def test_the_records_last_checkpoint_wins_over_the_run_directory(parent, tmp_path):
    moved = tmp_path / "elsewhere" / "last.ckpt"
    moved.parent.mkdir()
    shutil.move("runs/default/language/checkpoints/last.ckpt", moved)
    with pytest.raises(Exception, match="no runs/default/language/checkpoints/last.ckpt"):
        optimizer_state_source(parent)
    update_stage_record("models/default", "language", {"last_checkpoint": str(moved)})
    assert optimizer_state_source(parent) == moved


def test_no_last_checkpoint_is_refused_before_anything_is_written(parent, corpora, capsys):
    Path("runs/default/language/checkpoints/last.ckpt").unlink()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["fit", "-c", stage("code"), "-c", TINY, f"--data.init_args.data_dir={corpora}", "--trainer.max_steps=2",
              "--model.init_args.carry_optimizer=true", *STEPS])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert "carry_optimizer" in err and "re-run the parent" in err
    assert "runs/default/language/checkpoints/last.ckpt" in err
    assert not Path("runs/default/code").exists() and not Path("models/default/code").exists()


def test_carry_optimizer_needs_a_parent(corpora, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "-c", stage("language"), "-c", TINY, f"--data.init_args.data_dir={corpora}",
              "--model.init_args.carry_optimizer=true", *STEPS])
    assert exc.value.code == 2 and "carry_optimizer needs init_from" in capsys.readouterr().err
    assert not Path("runs").exists()


def test_a_transformers_parent_has_no_optimizer_state_to_carry(corpora, tmp_path, monkeypatch, capsys, make_llama):
    monkeypatch.chdir(tmp_path)
    hf = make_llama(tmp_path / "hf", vocab_size=320)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "-c", stage("code"), f"--data.init_args.data_dir={corpora}", f"--model.init_args.init_from={hf}",
              "--model.init_args.size=null", "--model.init_args.carry_optimizer=true", *STEPS])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "is a transformers model directory, which holds no optimizer state" in err
    assert not Path("runs").exists()
