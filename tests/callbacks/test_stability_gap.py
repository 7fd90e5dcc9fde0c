"""StabilityGap in a real `stagewise fit` of a code stage: dense held-out points early in the stage that equal
what a validation at the same step measures, in stage.json and TensorBoard, and nothing saved for them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from callbacks import StabilityGap
from datamodules.stage_record import read_stage_record
from lightning_modules.cli import main

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "model" / "tiny.yaml")
COMMON = ["--data.init_args.seq_len=16", "--data.init_args.batch_size=2", "--data.init_args.val_max_windows=6",
          "--trainer.limit_val_batches=2", "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu"]


def stage(name: str) -> str:
    return str(REPO / "configs" / "stages" / f"{name}.yaml")


def test_dense_points_early_in_a_stage_match_validation(tmp_path, monkeypatch, corpora):
    monkeypatch.chdir(tmp_path)
    data = f"--data.init_args.data_dir={corpora}"
    main(["fit", "-c", stage("language"), "-c", TINY, data, "--trainer.max_steps=4", "--trainer.val_check_interval=4",
          "--model.init_args.lr=3e-3", "--trainer.callbacks=[]", *COMMON])
    probe = {"class_path": "callbacks.StabilityGap",
             "init_args": {"every_n_steps": 2, "until": 0.5, "domains": ["language"]}}
    main(["fit", "-c", stage("code"), "-c", TINY, data, "--trainer.max_steps=8", "--trainer.val_check_interval=4",
          "--model.init_args.lr=3e-3", "--model.init_args.warmup_steps=1", f"--trainer.callbacks=[{json.dumps(probe)}]",
          *COMMON])
    parent, record = read_stage_record("models/default", "language"), read_stage_record("models/default", "code")
    gap = record["stability_gap"]["domains"]
    assert list(gap) == ["language"]  # only the domains asked for
    points = gap["language"]["points"]
    assert [p[0] for p in points] == [0, 2, 4]  # step 0, then every 2 steps up to half of the 8
    assert [p[1] for p in points] == [32 * (4 + s) for s in (0, 2, 4)]  # the lineage's tokens: 2 × 16 a step
    # step 0 holds the parent's weights: its final validation, on the same windows
    assert gap["language"]["start"] == pytest.approx(parent["losses"]["final"]["language"], abs=1e-5)
    # at step 4 the stage also validated: the same number
    events = next(Path("runs/default/code").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(events), size_guidance={"scalars": 0})
    events.Reload()
    val = {e.step: e.value for e in events.Scalars("val/language/loss")}
    assert points[2][2] == pytest.approx(val[4], abs=1e-5)
    assert [e.step for e in events.Scalars("stability/language/loss")] == [0, 2, 4]
    assert [e.step for e in events.Scalars("stability_tokens/language/loss")] == [p[1] for p in points]
    peak = max(points[1:], key=lambda p: p[2])
    assert (gap["language"]["peak"], gap["language"]["peak_step"]) == (peak[2], peak[0])


def test_bad_settings_are_refused():
    with pytest.raises(Exception, match="every_n_steps >= 1"):
        StabilityGap(every_n_steps=0)
