"""Exact resume: a `stagewise fit` killed with SIGKILL at a random step and resumed with `--ckpt_path last`
trains exactly as an uninterrupted run (same loss at every later step, same windows, same best checkpoint);
so does a fit stopped by SIGTERM (it saves last.ckpt at the step it stops, and exits 143 at once), and a
`stagewise pipeline` stopped by SIGTERM (it passes the signal on to its stage) and run again.

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
STOP_WITHIN = 30  # seconds from a SIGTERM to the process's exit (generous: the tiny run stops within about 1 s)

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


def fit(workdir: Path, record: Path, *args: str, sleep: float = 0.0, command: str = "fit") -> subprocess.Popen:
    """Start ``stagewise fit -c config.yaml`` (or ``command`` with ``args``) in ``workdir`` (one intra-op thread:
    the same float sums in every run)."""
    env = dict(os.environ, RECORD_FILE=str(record), RECORD_SLEEP=str(sleep), PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}",
               OMP_NUM_THREADS="1")
    args = ("-c", "config.yaml", *args) if command == "fit" else args
    return subprocess.Popen([sys.executable, "-m", "lightning_modules", command, *args],
                            cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def read(record: Path, key: str = "step") -> list[dict]:
    """The rows of training steps (``step``) or validations (``val_step``)."""
    return [row for row in map(json.loads, record.read_text().splitlines()) if key in row]


def last_step(record: Path) -> int:
    return max([0] + [r["step"] for r in read(record)] if record.exists() else [0])


def stop_all(procs: dict[str, subprocess.Popen], root: Path, stops: dict[str, tuple[int, int]]) -> dict[str, float]:
    """Send each process its signal once its record shows the step trained, without waiting on one while the
    others train on; return the seconds from each signal to that process's exit."""
    deadline, sent, took = time.time() + 180, {}, {}
    while len(took) < len(procs):
        for name, proc in procs.items():
            step, signum = stops[name]
            if name not in sent:
                if last_step(root / f"{name}.jsonl") >= step:
                    proc.send_signal(signum)
                    sent[name] = time.time()
                else:
                    assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
            elif name not in took and proc.poll() is not None:
                took[name] = time.time() - sent[name]
            elif name not in took:
                assert time.time() < sent[name] + 120, f"{name} still running 120 s after its signal"
        time.sleep(0.01)
    return took


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("resume")
    for name in ("whole", "killed", "terminated", "pipeline"):
        (root / name).mkdir()
        (root / name / "config.yaml").write_text(CONFIG.format(steps=STEPS, data_dir=data_dir))
    pipeline_yaml = {"experiment": "resume", "data_dir": str(data_dir), "report": False,
                     "stages": [{"name": "language", "configs": ["config.yaml"]}]}
    (root / "pipeline" / "pipeline.yaml").write_text(json.dumps(pipeline_yaml))
    # Seed 8 draws step 7: the last save before it is due at step 6, where the first validation follows, so
    # the resumed run must neither repeat that validation nor lose what it left in the callbacks' state.
    kill_step = random.Random(8).randint(4, STEPS - 4)
    # SIGTERM during step 6: the validation due after it runs, then last.ckpt is saved; the pipeline's at step 9
    stops = {"killed": (kill_step, signal.SIGKILL), "terminated": (6, signal.SIGTERM), "pipeline": (9, signal.SIGTERM)}
    whole = fit(root / "whole", root / "whole.jsonl")
    stopped = {"killed": fit(root / "killed", root / "killed.jsonl", sleep=0.3),
               "terminated": fit(root / "terminated", root / "terminated.jsonl", sleep=0.3),
               "pipeline": fit(root / "pipeline", root / "pipeline.jsonl", "-c", "pipeline.yaml", sleep=0.3,
                               command="pipeline")}
    took = stop_all(stopped, root, stops)
    assert stopped["killed"].returncode == -signal.SIGKILL  # killed mid-run, not after it ended
    assert whole.wait(timeout=120) == 0, whole.stderr.read()[-3000:]
    out = {"root": root, "kill_step": kill_step, "whole": read(root / "whole.jsonl"),
           "val_whole": read(root / "whole.jsonl", "val_step"), "state_whole": read(root / "whole.jsonl", "start"),
           "stopped": {name: {"took": took[name], "status": proc.returncode, "stderr": proc.stderr.read()}
                       for name, proc in stopped.items()}}
    # The resumed runs in this process: a fresh Trainer from last.ckpt, without paying the start-up again (the
    # pipeline's run again, which resumes its stage as a process of its own).
    for name, argv in (("killed", ["fit", "-c", "config.yaml", "--ckpt_path", "last"]),
                       ("terminated", ["fit", "-c", "config.yaml", "--ckpt_path", "last"]),
                       ("pipeline", ["pipeline", "-c", "pipeline.yaml"])):
        last = root / name / "runs" / "resume" / "language" / "checkpoints" / "last.ckpt"
        resumed_from = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
        record = root / f"{name}.resumed.jsonl"
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(root / name)
            mp.setenv("RECORD_FILE", str(record))
            mp.setenv("RECORD_SLEEP", "0")
            mp.setenv("PYTHONPATH", f"{ROOT}:{ROOT / 'tests'}")
            mp.setenv("OMP_NUM_THREADS", "1")
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                main(argv)
            finally:
                torch.set_num_threads(threads)
        out[name] = {"resumed_from": resumed_from, "last_trained": last_step(root / f"{name}.jsonl"),
                     "before": [r for r in read(root / f"{name}.jsonl") if r["step"] <= resumed_from],
                     "resumed": read(record),
                     "val_combined": [r for r in read(root / f"{name}.jsonl", "val_step") if r["val_step"] <= resumed_from]
                     + read(record, "val_step"), "state_resumed": read(record, "start")}
    return out


@pytest.mark.parametrize("name", ["killed", "terminated", "pipeline"])
def test_stopped_and_resumed_run_logs_the_same_loss_at_every_later_step(runs, name):
    run = runs[name]
    assert 0 < run["resumed_from"] <= run["last_trained"]
    assert run["resumed"][0]["step"] == run["resumed_from"] + 1
    combined, whole = run["before"] + run["resumed"], runs["whole"]
    assert [r["step"] for r in combined] == [r["step"] for r in whole] == list(range(1, STEPS + 1))
    for ours, theirs in zip(combined, whole):
        assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-6), ours["step"]
    assert [r["val_step"] for r in run["val_combined"]] == [r["val_step"] for r in runs["val_whole"]] == [6, 12, 18]
    for ours, theirs in zip(run["val_combined"], runs["val_whole"]):
        assert ours["val_loss"] == pytest.approx(theirs["val_loss"], abs=1e-6)


@pytest.mark.parametrize("name", ["terminated", "pipeline"])
def test_sigterm_saves_last_ckpt_at_the_step_it_stops_and_exits_143_at_once(runs, name):
    run, stopped = runs[name], runs["stopped"][name]
    assert stopped["status"] == 143 and stopped["took"] < STOP_WITHIN, stopped["stderr"][-3000:]
    assert run["resumed_from"] == run["last_trained"]  # nothing trained after the save, nothing lost before it
    if name == "terminated":  # stopped after step 6 and the validation due there, which the resume does not repeat
        assert run["resumed_from"] == 6 and run["state_resumed"][0]["validated"] == [6]
    last = stopped["stderr"].strip().splitlines()[-1]
    assert last.startswith(f"stagewise {'fit' if name == 'terminated' else 'pipeline'}: stopped by SIGTERM")
    assert "Traceback" not in stopped["stderr"]


def test_resumed_run_sees_each_window_of_the_epoch_exactly_once(runs):
    run = runs["killed"]
    combined, whole = run["before"] + run["resumed"], runs["whole"]
    assert [r["windows"] for r in combined] == [r["windows"] for r in whole]
    epochs = [[w for r in combined if r["epoch"] == e for w in r["windows"]] for e in (0, 1)]
    # 30 windows in batches of 4: each epoch trains 28 distinct ones (its permutation's last 2 are dropped)
    assert len(epochs[0]) == len(set(epochs[0])) == len(epochs[1]) == len(set(epochs[1])) == 28
    assert len(set(epochs[0]) | set(epochs[1])) <= 30 and epochs[0] != epochs[1]


@pytest.mark.parametrize("name", ["killed", "terminated"])
def test_resumed_run_keeps_what_validations_left(runs, name):
    # callback state at every resumed step: the validations StageHandoff has seen, the best score so far
    whole = {r["start"]: r for r in runs["state_whole"]}
    for ours in runs[name]["state_resumed"]:
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
