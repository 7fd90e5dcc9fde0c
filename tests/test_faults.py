"""Safety nets of a stage: atomic checkpoint writes, non-finite steps skipped, no overwriting another run,
a clear error on a full disk."""

import errno
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from callbacks.safety import AtomicCheckpointIO, LastCheckpoint
from datamodules.datamodule import LanguageDataModule
from datamodules.errors import StagewiseError
from lightning_modules.causal_lm import CausalLM
from lightning_modules.cli import main
from test_ddp_cpu import VOCAB, write_corpus
from test_resume import CONFIG, prepare_corpus

ROOT = Path(__file__).resolve().parents[1]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------- atomic writes
KILLED_MID_SAVE = """
import sys, time
from pathlib import Path
import torch
from callbacks.safety import AtomicCheckpointIO

class SlowIO(AtomicCheckpointIO):
    def write_temp(self, checkpoint, tmp):
        super().write_temp(checkpoint, tmp)
        Path(sys.argv[2]).write_text("temp written")  # the new checkpoint is on disk, not yet renamed
        time.sleep(600)

AtomicCheckpointIO().save_checkpoint({"step": 1, "w": torch.ones(1000)}, sys.argv[1])
SlowIO().save_checkpoint({"step": 2, "w": torch.zeros(1000)}, sys.argv[1])
"""


def test_process_killed_while_saving_leaves_the_previous_checkpoint_loadable(tmp_path):
    last, marker = tmp_path / "checkpoints" / "last.ckpt", tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_MID_SAVE, str(last), str(marker)], cwd=ROOT,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert torch.load(last, weights_only=True)["step"] == 1  # the previous checkpoint, whole
    leftovers = list(last.parent.glob(".last.ckpt.tmp*"))
    assert len(leftovers) == 1  # the killed save's temporary file, never under the checkpoint's name
    AtomicCheckpointIO().save_checkpoint({"step": 3}, last)
    assert torch.load(last, weights_only=True)["step"] == 3 and not leftovers[0].exists()  # next save cleans up


def test_disk_full_while_saving_names_the_path_and_keeps_earlier_files(tmp_path, monkeypatch):
    io, best, last = AtomicCheckpointIO(), tmp_path / "language_model_best.ckpt", tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, best)
    io.save_checkpoint({"step": 1}, last)
    before = sha(last)

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(StagewiseError) as err:
        io.save_checkpoint({"step": 2}, last)
    message = str(err.value)
    assert f"disk full while writing {last}" in message and "earlier checkpoints are intact" in message
    assert str(best) in message and "--ckpt_path last" in message
    assert sha(last) == before and sorted(p.name for p in tmp_path.iterdir()) == [best.name, last.name]


# ----------------------------------------------------------------------------------------- non-finite steps
class NaNAt(CausalLM):
    """A CausalLM whose loss (or, with ``grads_only``, only whose gradients) are non-finite at the given
    optimizer steps (0-based ``global_step``)."""

    def __init__(self, bad_steps: list[int], grads_only: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.bad_steps, self.grads_only = set(bad_steps), grads_only

    def compute_loss(self, logits, targets, loss_mask):
        loss = super().compute_loss(logits, targets, loss_mask)
        if self.trainer.global_step not in self.bad_steps:
            return loss
        if self.grads_only:
            logits.register_hook(lambda g: g * float("inf"))
            return loss
        return loss * float("nan")


class Weights(L.Callback):
    """Records the flat weights after every optimizer step."""

    def __init__(self):
        self.after = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[trainer.global_step] = torch.cat([p.detach().flatten() for p in pl_module.parameters()]).clone()


def train(tmp_path: Path, model: CausalLM, steps: int) -> tuple[L.Trainer, Weights]:
    if not (tmp_path / "data").exists():
        write_corpus(tmp_path / "data")
    weights = Weights()
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False, gradient_clip_val=1.0,
        plugins=[AtomicCheckpointIO()], default_root_dir=tmp_path,
        callbacks=[LastCheckpoint(every_n_train_steps=1, dirpath=str(tmp_path / "ckpt")), weights],
    )
    data = LanguageDataModule(data_dir=str(tmp_path / "data"), seq_len=8, batch_size=2, seed=3)
    trainer.fit(model, datamodule=data)
    return trainer, weights


def tiny(**kwargs) -> dict:
    return dict(size="tiny", vocab_size=VOCAB, model_overrides={"n_layers": 1, "max_seq_len": 16},
                warmup_steps=1, lr=1e-2, **kwargs)


# fused AdamW takes the path without a host sync (the verdict stays on the device as its found_inf)
@pytest.mark.parametrize("fused", [False, True], ids=["sync", "fused_on_device"])
@pytest.mark.parametrize("grads_only", [False, True], ids=["nan_loss", "inf_grads"])
def test_non_finite_step_is_skipped_with_weights_unchanged_and_counted(tmp_path, grads_only, fused):
    model = NaNAt([2], grads_only=grads_only, **tiny(fused_adamw=fused))
    trainer, weights = train(tmp_path, model, steps=5)
    w = weights.after
    assert torch.equal(w[3], w[2])  # the third step (global_step 2 -> 3) changed nothing
    assert not torch.equal(w[2], w[1]) and not torch.equal(w[4], w[3])  # the steps around it trained
    assert torch.isfinite(w[5]).all()
    assert model.skipped_steps == 1 and model.bad_steps_in_a_row == 0
    assert trainer.callback_metrics["train/skipped_steps"] == 1
    adam_steps = {float(s["step"]) for s in trainer.optimizers[0].state.values()}
    assert adam_steps == {4.0}  # 5 steps, one skipped: the optimizer's moments saw 4


@pytest.mark.parametrize("fused", [False, True], ids=["sync", "fused_on_device"])
def test_max_bad_steps_in_a_row_stop_the_stage_and_leave_the_last_checkpoint(tmp_path, fused):
    model = NaNAt([2, 3, 4, 5, 6], **tiny(max_bad_steps=3, fused_adamw=fused))
    with pytest.raises(StagewiseError, match=r"stopped at optimizer step 4: 3 steps in a row had a non-finite loss"):
        train(tmp_path, model, steps=10)
    last = tmp_path / "ckpt" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2  # saved after the last good step, not rewritten during the bad ones
    good = torch.cat([t.flatten() for t in ckpt["state_dict"].values()])
    assert torch.isfinite(good).all() and model.skipped_steps == 3
    assert [p.name for p in last.parent.iterdir()] == ["last.ckpt"]


# ----------------------------------------------------------------------------------------- the CLI's nets
@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return prepare_corpus(tmp_path_factory.mktemp("faults_corpus"))


def fit(workdir: Path, corpus: Path, *args: str, steps: int = 2) -> int:
    (workdir / "config.yaml").write_text(CONFIG.format(steps=steps, data_dir=corpus).replace(
        "    - class_path: test_resume.StepRecorder\n", ""))
    try:
        main(["fit", "-c", "config.yaml", "--trainer.val_check_interval", "2", *args])
    except SystemExit as exc:
        return exc.code
    return 0


def test_fit_refuses_to_overwrite_another_run_unless_told(tmp_path, monkeypatch, capsys, corpus):
    monkeypatch.chdir(tmp_path)
    saved, save = [], AtomicCheckpointIO.save_checkpoint

    def recording_save(self, checkpoint, path, storage_options=None):
        saved.append(Path(path).name)
        save(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", recording_save)
    assert fit(tmp_path, corpus) == 0
    assert {"last.ckpt", "language_model_best.ckpt"} <= set(saved)  # the CLI writes checkpoints atomically
    run = tmp_path / "runs/resume/language"
    best, last = tmp_path / "models/resume/language_model_best.ckpt", run / "checkpoints/last.ckpt"
    before = {p: sha(p) for p in tmp_path.rglob("*") if p.is_file()}
    capsys.readouterr()

    assert fit(tmp_path, corpus) == 2
    err = capsys.readouterr().err
    assert "stage 'language' of experiment 'resume' has run before" in err and "runs/resume/language" in err
    assert str(Path("models/resume/language_model_best.ckpt")) in err and "--overwrite" in err and "--ckpt_path last" in err
    assert {p: sha(p) for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing written

    # another experiment: its own files, the first experiment's untouched
    assert fit(tmp_path, corpus, "--stage.experiment", "other") == 0
    assert (tmp_path / "models/other/language_model_best.ckpt").is_file()
    assert (tmp_path / "runs/other/language/checkpoints/last.ckpt").is_file()
    assert {p: sha(p) for p in before} == before

    old_events = sorted(p.name for p in run.glob("events.out.tfevents.*"))
    assert fit(tmp_path, corpus, "--overwrite", "--model.init_args.lr", "1e-2", steps=4) == 0
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 4
    assert sha(best) != before[best]
    # the run was replaced whole: the old events, hparams and config moved aside together, none mixed in
    aside = [p for p in run.parent.iterdir() if p.name.startswith("language.")]
    assert len(aside) == 1 and sorted(p.name for p in aside[0].glob("events.out.tfevents.*")) == old_events
    assert len(list(run.glob("events.out.tfevents.*"))) == 1 and not set(old_events) & {p.name for p in run.iterdir()}
    assert "lr: 0.01" in (run / "hparams.yaml").read_text() and "lr: 0.01" not in (aside[0] / "hparams.yaml").read_text()


def test_validate_never_writes_into_the_training_run(tmp_path, monkeypatch, corpus):
    monkeypatch.chdir(tmp_path)
    assert fit(tmp_path, corpus) == 0
    before = {p: sha(p) for p in tmp_path.rglob("*") if p.is_file()}
    for _ in range(2):
        main(["validate", "-c", "config.yaml", "--ckpt_path", "models/resume/language_model_best.ckpt"])
    new = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file() and p not in before)
    assert {p: sha(p) for p in before} == before  # the training run, its checkpoints and record untouched
    assert new and all(p.startswith(("runs/resume/language.validate/version_0/",
                                     "runs/resume/language.validate/version_1/")) for p in new), new
    assert any(p.endswith("config.yaml") for p in new)


def test_test_scores_the_test_split_with_the_stages_best_checkpoint(tmp_path, monkeypatch, capsys, corpus):
    """Was "No `test_step()` method defined": `stagewise test --ckpt_path best` scores each domain's test split
    with the stage's best weights, logged beside the training run, which it leaves as it was."""
    monkeypatch.chdir(tmp_path)
    assert fit(tmp_path, corpus) == 0
    before = {p: sha(p) for p in tmp_path.rglob("*") if p.is_file()}
    capsys.readouterr()
    main(["test", "-c", "config.yaml", "--ckpt_path", "best"])
    assert "test/language/loss" in capsys.readouterr().out
    assert {p: sha(p) for p in before} == before
    assert list((tmp_path / "runs/resume/language.test/version_0").glob("events.out.tfevents.*"))


def test_disk_full_during_fit_exits_2_and_keeps_the_earlier_last_checkpoint(tmp_path, monkeypatch, capsys, corpus):
    monkeypatch.chdir(tmp_path)
    write = AtomicCheckpointIO.write_temp

    def fills_up(self, checkpoint, tmp):
        if checkpoint["global_step"] < 3:
            return write(self, checkpoint, tmp)
        tmp.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(AtomicCheckpointIO, "write_temp", fills_up)
    assert fit(tmp_path, corpus, "--last_checkpoint.every_n_train_steps", "1", steps=6) == 2
    err = capsys.readouterr().err
    last = Path("runs/resume/language/checkpoints/last.ckpt")
    assert "disk full while writing runs/resume/language/checkpoints/last.ckpt" in err and "Traceback" not in err
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 2
    assert not list(tmp_path.rglob(".*.tmp*"))  # the partial file is gone


def test_pipeline_passes_overwrite_only_when_it_starts_a_stage_over(tmp_path, monkeypatch):
    from datamodules.stage_record import update_stage_record
    from lightning_modules import pipeline as pl

    monkeypatch.chdir(tmp_path)
    calls = []

    def fake_fit(cmd, env=None, cwd=None, **streams):  # stands in for the `stagewise fit` subprocess
        calls.append(cmd)
        Path("models/t").mkdir(parents=True, exist_ok=True)
        Path("models/t/language_model_best.ckpt").write_bytes(b"weights")
        return 0

    monkeypatch.setattr(pl, "run_forwarding_signals", fake_fit)
    Path("stage.yaml").write_text("trainer: {max_steps: 3}\n")
    stages = [pl.StageSpec("language", ["stage.yaml"])]
    assert pl.pipeline(stages, experiment="t", report=False) == {"language": "trained"}
    assert "--overwrite" in calls[-1]
    update_stage_record(Path("models/t"), "language", {"pipeline_key": "stale"})  # interrupted before it finished
    Path("runs/t/language/checkpoints").mkdir(parents=True)
    Path("runs/t/language/checkpoints/last.ckpt").write_bytes(b"state")
    assert pl.pipeline(stages, experiment="t", report=False) == {"language": "resumed"}
    assert "--overwrite" not in calls[-1] and calls[-1][-2:] == ["--ckpt_path", "runs/t/language/checkpoints/last.ckpt"]


def test_a_checkpoint_saved_at_a_batch_end_records_the_steps_taken(tmp_path):
    """LastCheckpoint saves in a callback hook, before CausalLM's own on_train_batch_end runs."""
    seen = []

    class ReadBack(L.Callback):  # checkpoint callbacks run last in a hook: read the save at the next batch
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx:
                ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
                seen.append((ckpt["global_step"], ckpt["stagewise"]["optimizer_steps"]))

    write_corpus(tmp_path / "data")
    trainer = L.Trainer(
        max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False, default_root_dir=tmp_path,
        callbacks=[LastCheckpoint(every_n_train_steps=1, dirpath=str(tmp_path / "ckpt")), ReadBack()],
    )
    trainer.fit(CausalLM(**tiny()), datamodule=LanguageDataModule(data_dir=str(tmp_path / "data"), seq_len=8,
                                                                   batch_size=2, seed=3))
    assert seen == [(1, 1), (2, 2)]


def test_preemption_check_needs_a_positive_interval():
    from callbacks.safety import PreemptionCheck

    with pytest.raises(StagewiseError, match="at least 1"):
        PreemptionCheck(every_n_steps=0)


# ----------------------------------------------------------------------------------------- signals
# A fit stopped by SIGTERM continues exactly (tests/test_resume.py, with the pipeline's); here every other
# command, each held at a point of its work by tests/slow_command.py, is signalled there.
SLOW = Path(__file__).resolve().parent / "slow_command.py"
STOP_WITHIN = 30  # seconds from the signal to the exit: generous (the tiny commands stop within about 1 s)


def signalled(workdir: Path, target: str, argv: list[str], signum: int) -> tuple[int, str, float]:
    """Run ``stagewise <argv>`` in ``workdir`` with ``target`` slowed down, send ``signum`` once the command has
    reached it; return its exit status, its stderr and the seconds from the signal to its exit."""
    marker = workdir / ".reached"
    proc = subprocess.Popen([sys.executable, str(SLOW), str(marker), target, "0.5", *argv], cwd=workdir,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.time() + 180
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.01)
    sent = time.time()
    proc.send_signal(signum)
    err = proc.communicate(timeout=120)[1]
    return proc.returncode, err, time.time() - sent


def assert_stopped(result: tuple[int, str, float], command: str, signum: int) -> None:
    code, err, took = result
    assert code == 128 + signum and took < STOP_WITHIN, err[-3000:]
    assert err.strip().splitlines()[-1].startswith(f"stagewise {command}: stopped by {signal.Signals(signum).name}")
    assert "Traceback" not in err, err[-3000:]


def test_a_process_forked_while_stopping_on_signals_keeps_no_handler():
    """A pool worker ends on a stop signal as any process does, even blocked in C: with the command's Python
    handler, a worker that Pool.terminate signalled just before it blocked on its task queue waited there for
    ever, and so did the prepare that owned it."""
    from datamodules.signals import STOP_SIGNALS, stopping_on_signals

    with stopping_on_signals():
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(write, bytes([all(signal.getsignal(s) == signal.SIG_DFL for s in STOP_SIGNALS)]))
            os._exit(0)
        os.waitpid(pid, 0)
        assert os.read(read, 1) == b"\x01"
        assert signal.getsignal(signal.SIGTERM) != signal.SIG_DFL  # the command itself keeps its handler


POOL_UNDER_A_RECORDING_HANDLER = """
import signal
from datamodules.signals import defer_signals
from datamodules.sources import ordered_map

def worker_signals(_):
    return signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, signal.getsignal(signal.SIGINT) == signal.SIG_IGN

defer_signals()
print(sorted(set(ordered_map(worker_signals, list(range(32)), workers=2))))
"""


def test_pool_workers_end_on_sigterm_whatever_handler_their_parent_had():
    """A handler that only records (defer_signals, Lightning's, a test runner's) is not inherited by the
    workers of a reader's pool: Pool.terminate's SIGTERM to a worker blocked on its task queue then left it,
    and its owner, waiting for ever (a `make test` hung so in test_prepare, 2026-12-01)."""
    out = subprocess.run([sys.executable, "-c", POOL_UNDER_A_RECORDING_HANDLER], capture_output=True, text=True,
                         timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0 and out.stdout.strip() == "[(True, True)]", out.stderr[-2000:]


POOL_TERMINATED_BEFORE_ITS_WORKERS_STARTED = """
import time
import datamodules.signals as signals

signals.defer_signals()  # the owner's handler only records a signal, as Lightning's and test runners' do
started = signals.pool_worker_signals

def slow_start():  # a worker that the owner's SIGTERM reaches before it sets its own signal handling
    time.sleep(1.0)
    started()

signals.pool_worker_signals = slow_start
pool = signals.fork_pool(2)
pool.terminate()
print("terminated")
"""


def test_a_pool_terminated_before_its_workers_set_their_signals_ends():
    """Pool.terminate right after the pool opened (a reader stopped early): its SIGTERM reaches workers still
    running the owner's inherited handler. They fork with the stop signals blocked, so the signal waits and
    ends them once they unblock it; before, they recorded it and waited on their task queue for ever, and the
    owner with them (`make test` hung so in test_prepare, 2026-12-01)."""
    out = subprocess.run([sys.executable, "-c", POOL_TERMINATED_BEFORE_ITS_WORKERS_STARTED], capture_output=True,
                         text=True, timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0 and out.stdout.strip() == "terminated", out.stderr[-2000:]


def files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("target, signum", [
    ("lightning_modules.decoding:next_token", signal.SIGTERM),  # decoding held-out tool calls
    ("lightning_modules.causal_lm:CausalLM.validation_step", signal.SIGINT),  # inside Trainer.validate
], ids=["decoding_sigterm", "validation_sigint"])
def test_evaluate_stops_on_a_signal_and_writes_no_results(tmp_path, tool_data_dir, tool_parent, target, signum):
    argv = ["evaluate", "--ckpt", str(tool_parent), "--data_dir", str(tool_data_dir), "--domains", "[tools]",
            "--out", "results.json", "--accelerator", "cpu"]
    assert_stopped(signalled(tmp_path, target, argv, signum), "evaluate", signum)
    assert not (tmp_path / "results.json").exists()


def test_generate_stops_on_sigint(tmp_path, tool_parent):
    argv = ["generate", "--ckpt", str(tool_parent), "--prompt", "What is the weather in Oslo?", "--device", "cpu"]
    assert_stopped(signalled(tmp_path, "lightning_modules.decoding:next_token", argv, signal.SIGINT), "generate",
                   signal.SIGINT)


def test_export_stopped_midway_leaves_the_earlier_export_whole(tmp_path, tool_parent):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text("the earlier export\n")
    argv = ["export", "--ckpt", str(tool_parent), "--out", str(out)]
    # held while copying the tokenizer's files, after the weights were written
    assert_stopped(signalled(tmp_path, "lightning_modules.export:shutil.copy2", argv, signal.SIGTERM), "export",
                   signal.SIGTERM)
    assert files(out) == {"config.json": sha(out / "config.json")} and not list(tmp_path.glob(".hf.tmp*"))


def test_prepare_stopped_midway_leaves_the_data_dir_as_it_was(tmp_path, corpus):
    import shutil

    import yaml

    shutil.copytree(corpus.parent, tmp_path / "work")
    work = tmp_path / "work"
    (work / "text" / "new.txt").write_text("A new document about the river and the stone.\n" * 5)
    source = {"class_path": "datamodules.sources.TextFiles", "init_args": {"paths": ["*.txt"], "root": str(work / "text")}}
    (work / "data.yaml").write_text(yaml.safe_dump({
        "data_dir": "data", "tokenizer": {"vocab_size": 320, "sample_bytes": 20000},
        "corpora": {"language": {"val_fraction": 0.2, "test_fraction": 0.1, "sources": [source]}}}))
    before = {k: v for k, v in files(work / "data").items() if ".cache" not in k}
    result = signalled(work, "datamodules.prepare:encode_document", ["prepare", "-c", "data.yaml"], signal.SIGTERM)
    assert_stopped(result, "prepare", signal.SIGTERM)
    assert {k: v for k, v in files(work / "data").items() if ".cache" not in k} == before
    assert not [p for p in (work / "data").rglob("*") if ".tmp" in p.name or p.name.endswith(".old")]


def test_fit_stops_on_sigint_after_saving_last_ckpt(tmp_path, corpus):
    (tmp_path / "config.yaml").write_text(CONFIG.format(steps=50, data_dir=corpus).replace(
        "    - class_path: test_resume.StepRecorder\n", ""))
    argv = ["fit", "-c", "config.yaml", "--last_checkpoint.every_n_train_steps", "0"]
    result = signalled(tmp_path, "lightning_modules.causal_lm:CausalLM.training_step", argv, signal.SIGINT)
    assert_stopped(result, "fit", signal.SIGINT)
    last = torch.load(tmp_path / "runs/resume/language/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert 1 <= last["global_step"] < 50 and last["optimizer_states"]
    assert not (tmp_path / "models/resume/language/stage.json").exists()  # a stopped stage has no record


def test_a_fit_stopped_before_its_first_step_leaves_no_run_directory(tmp_path, corpus):
    (tmp_path / "config.yaml").write_text(CONFIG.format(steps=50, data_dir=corpus).replace(
        "    - class_path: test_resume.StepRecorder\n", ""))
    result = signalled(tmp_path, "lightning_modules.causal_lm:CausalLM.configure_model", ["fit", "-c", "config.yaml"],
                       signal.SIGTERM)
    assert_stopped(result, "fit", signal.SIGTERM)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "models").exists()
