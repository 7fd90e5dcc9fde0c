"""Exact resume: a `stagewise fit` killed with SIGKILL at a random step and resumed with `--ckpt_path last`
trains exactly as an uninterrupted run (same loss at every later step, same windows, same best checkpoint).

The runs are real `python -m lightning_modules fit` processes on a tiny prepared corpus, with dropout on
(so the random draws must match too), validation every 6 steps and an epoch boundary inside the run.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules.prepare import Corpus, TokenizerConfig, prepare
from datamodules.sources import TextFiles
from lightning_modules.cli import main

ROOT = Path(__file__).resolve().parents[1]
STEPS = 20

CONFIG = """
seed_everything: 7
stage: {{name: language, domain: language, experiment: resume}}
trainer:
  accelerator: cpu
  max_steps: {steps}
  val_check_interval: 6
  check_val_every_n_epoch: null
  limit_val_batches: 2
  num_sanity_val_steps: 0
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: test_resume.StepRecorder
handoff:
  export_hf: false
last_checkpoint:
  every_n_train_steps: 3
model:
  class_path: lightning_modules.CausalLM
  init_args:
    size: tiny
    model_overrides: {{n_layers: 2, max_seq_len: 32, dropout: 0.1}}
    lr: 3.0e-3
    warmup_steps: 3
data:
  init_args: {{data_dir: {data_dir}, seq_len: 32, batch_size: 4}}
"""


WORDS = (
    "the a river stone light quick brown fox jumps over lazy dog morning evening city market bread water "
    "winter summer people house window garden music letter night sleep dream king queen sword castle"
).split()


def prepare_corpus(root: Path, documents: int = 13) -> Path:
    """A prepared ``language`` corpus of short English-like documents (30 train windows of 32 tokens: 7
    batches of 4 an epoch; one of the 13 is the test split's guaranteed document) and a 320-token tokenizer
    under ``root/data``."""
    rng = random.Random(1)
    (root / "text").mkdir()
    for i in range(documents):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "." for _ in range(5)]
        (root / "text" / f"doc{i:02d}.txt").write_text("\n".join(lines) + "\n")
    corpus = Corpus(sources=[TextFiles(paths=["*.txt"], root=str(root / "text"))], val_fraction=0.2, test_fraction=0.1)
    prepare({"language": corpus}, TokenizerConfig(vocab_size=320, sample_bytes=20000), str(root / "data"))
    return root / "data"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return prepare_corpus(tmp_path_factory.mktemp("corpus"))


class StepRecorder(L.Callback):
    """Test-only: appends each optimizer step's loss and window ids, and each validation's loss, to
    ``$RECORD_FILE`` (one JSON line each, written before the next step starts, so a killed run's file is
    complete up to its last step); with ``$RECORD_SLEEP`` it slows training down so the test can kill it at a
    chosen step."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        """What earlier validations left in the callbacks' state: StageHandoff's losses by step, the best score."""
        handoff = next(cb for cb in trainer.callbacks if type(cb).__name__ == "StageHandoff")
        best = next(cb for cb in trainer.checkpoint_callbacks if cb.monitor).best_model_score
        self._write({"start": trainer.global_step, "validated": sorted(map(int, handoff.val_history)),
                     "best": None if best is None else float(best)})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._write({"step": trainer.global_step, "epoch": trainer.current_epoch, "loss": float(outputs["loss"]),
                     "windows": [hash(tuple(r)) for r in batch["input_ids"].tolist()]})
        time.sleep(float(os.environ.get("RECORD_SLEEP", 0)))

    def on_validation_end(self, trainer, pl_module):
        self._write({"val_step": trainer.global_step, "val_loss": float(trainer.callback_metrics["val/language/loss"])})

    def _write(self, row: dict) -> None:
        with open(os.environ["RECORD_FILE"], "a") as f:
            f.write(json.dumps(row) + "\n")


def fit(workdir: Path, record: Path, *args: str, sleep: float = 0.0) -> subprocess.Popen:
    """Start ``stagewise fit -c config.yaml`` in ``workdir`` (one intra-op thread: the same float sums in every run)."""
    env = dict(os.environ, RECORD_FILE=str(record), RECORD_SLEEP=str(sleep), PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}",
               OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "lightning_modules", "fit", "-c", "config.yaml", *args],
                            cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def read(record: Path, key: str = "step") -> list[dict]:
    """The rows of training steps (``step``) or validations (``val_step``)."""
    return [row for row in map(json.loads, record.read_text().splitlines()) if key in row]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("resume")
    for name in ("whole", "killed"):
        (root / name).mkdir()
        (root / name / "config.yaml").write_text(CONFIG.format(steps=STEPS, data_dir=data_dir))
    # Seed 8 draws step 7: the last save before it is due at step 6, where the first validation follows, so
    # the resumed run must neither repeat that validation nor lose what it left in the callbacks' state.
    kill_step = random.Random(8).randint(4, STEPS - 4)
    whole = fit(root / "whole", root / "whole.jsonl")
    killed = fit(root / "killed", root / "killed.jsonl", sleep=0.3)
    deadline = time.time() + 120
    while max([0] + [r["step"] for r in read(root / "killed.jsonl")] if (root / "killed.jsonl").exists() else [0]) < kill_step:
        assert killed.poll() is None and time.time() < deadline, killed.stderr and killed.stderr.read()[-3000:]
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert whole.wait(timeout=120) == 0, whole.stderr.read()[-3000:]
    last = root / "killed" / "runs" / "resume" / "language" / "checkpoints" / "last.ckpt"
    resumed_from = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    before = [r for r in read(root / "killed.jsonl") if r["step"] <= resumed_from]
    val_before = [r for r in read(root / "killed.jsonl", "val_step") if r["val_step"] <= resumed_from]
    # The resumed run in this process: a fresh Trainer from last.ckpt, without paying the start-up again.
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root / "killed")
        mp.setenv("RECORD_FILE", str(root / "resumed.jsonl"))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            main(["fit", "-c", "config.yaml", "--ckpt_path", "last"])
        finally:
            torch.set_num_threads(threads)
    return {"root": root, "kill_step": kill_step, "resumed_from": resumed_from, "whole": read(root / "whole.jsonl"),
            "before": before, "resumed": read(root / "resumed.jsonl"),
            "val_whole": read(root / "whole.jsonl", "val_step"),
            "val_combined": val_before + read(root / "resumed.jsonl", "val_step"),
            "state_whole": read(root / "whole.jsonl", "start"), "state_resumed": read(root / "resumed.jsonl", "start")}


def test_killed_and_resumed_run_logs_the_same_loss_at_every_later_step(runs):
    assert 0 < runs["resumed_from"] <= runs["kill_step"]
    assert runs["resumed"][0]["step"] == runs["resumed_from"] + 1
    combined, whole = runs["before"] + runs["resumed"], runs["whole"]
    assert [r["step"] for r in combined] == [r["step"] for r in whole] == list(range(1, STEPS + 1))
    for ours, theirs in zip(combined, whole):
        assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-6), ours["step"]


def test_resumed_run_sees_each_window_of_the_epoch_exactly_once(runs):
    combined, whole = runs["before"] + runs["resumed"], runs["whole"]
    assert [r["windows"] for r in combined] == [r["windows"] for r in whole]
    epochs = [[w for r in combined if r["epoch"] == e for w in r["windows"]] for e in (0, 1)]
    # 30 windows in batches of 4: each epoch trains 28 distinct ones (its permutation's last 2 are dropped)
    assert len(epochs[0]) == len(set(epochs[0])) == len(epochs[1]) == len(set(epochs[1])) == 28
    assert len(set(epochs[0]) | set(epochs[1])) <= 30 and epochs[0] != epochs[1]


def test_resumed_run_validates_at_the_same_steps_and_keeps_what_validations_left(runs):
    assert [r["val_step"] for r in runs["val_combined"]] == [r["val_step"] for r in runs["val_whole"]] == [6, 12, 18]
    for ours, theirs in zip(runs["val_combined"], runs["val_whole"]):
        assert ours["val_loss"] == pytest.approx(theirs["val_loss"], abs=1e-6)
    # callback state at every resumed step: the validations StageHandoff has seen, the best score so far
    whole = {r["start"]: r for r in runs["state_whole"]}
    for ours in runs["state_resumed"]:
        assert ours["validated"] == whole[ours["start"]]["validated"], ours["start"]
        assert ours["best"] == pytest.approx(whole[ours["start"]]["best"], abs=1e-6)


def test_resumed_run_keeps_best_checkpoint_tracking_and_weights(runs):
    root = runs["root"]
    ours = torch.load(root / "killed" / "models" / "resume" / "language_model_best.ckpt", map_location="cpu",
                      weights_only=False)
    theirs = torch.load(root / "whole" / "models" / "resume" / "language_model_best.ckpt", map_location="cpu",
                        weights_only=False)
    assert ours["global_step"] == theirs["global_step"]
    for name, tensor in theirs["state_dict"].items():
        torch.testing.assert_close(ours["state_dict"][name], tensor, rtol=0, atol=1e-6)
    record = {n: json.loads((root / n / "models" / "resume" / "language" / "stage.json").read_text())
              for n in ("killed", "whole")}
    for kind in ("final", "best"):
        assert record["killed"]["losses"][kind] == pytest.approx(record["whole"]["losses"][kind], abs=1e-6)
    assert record["killed"]["tokens"] == record["whole"]["tokens"]


def test_resumed_run_keeps_the_config_the_run_started_with(runs):
    run = runs["root"] / "killed" / "runs" / "resume" / "language"
    started, resumed = (run / "config.yaml").read_text(), (run / "config.resume1.yaml").read_text()
    # `--ckpt_path last` names the file it resumed from (Lightning then reads the model's settings from it)
    assert "ckpt_path: null" in started and "ckpt_path: runs/resume/language/checkpoints/last.ckpt" in resumed


def test_ckpt_path_last_without_a_checkpoint_says_to_start_without_it(tmp_path, monkeypatch, capsys, data_dir):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text(CONFIG.format(steps=2, data_dir=data_dir).replace(
        "    - class_path: test_resume.StepRecorder\n", ""))
    with pytest.raises(SystemExit) as exc:
        main(["fit", "-c", "config.yaml", "--ckpt_path", "last"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "no last.ckpt under runs/resume/language/checkpoints" in err and "start without --ckpt_path" in err
    assert not (tmp_path / "models").exists()
