"""DDP on CPU (gloo, 2 processes): ranks train on different windows, and the step matches one process
training on the same global batch (loss = mean of the ranks' losses, all-reduced grads = its grads); a
whole `stagewise fit` stage runs on 2 processes through the handoff.

The test runs this file as a script: Lightning's DDP launcher re-runs the script for rank 1.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SEQ, BATCH, VOCAB, WINDOWS, STEPS = 8, 2, 256, 24, 3


def write_corpus(data_dir: Path) -> None:
    """Token i of the train split is id i, so a window is known by its first token // SEQ."""
    from datamodules.shards import ShardWriter, write_manifest

    n = {"train": WINDOWS * SEQ + 1, "val": 2 * SEQ + 1, "test": SEQ + 1}
    for split, count in n.items():
        with ShardWriter(data_dir / "language", split, "uint16", with_mask=False) as w:
            w.add(np.arange(count))
    write_manifest(data_dir / "language", {"dtype": "uint16", "kind": "text", "tokens": n, "tokenizer_sha256": "a" * 64})


def train(data_dir: str, out: str, devices: int, batch_size: int, signal_rank1_after: int | None = None) -> None:
    """``STEPS`` steps of a tiny CausalLM; each rank saves its batches' windows, losses and (reduced) grads. With
    ``signal_rank1_after``, rank 1 alone is signalled (as ``PreemptionCheck``'s handler records a SIGTERM) after
    that batch, and the run may go on for twice ``STEPS``: it must stop on every rank at the next check."""
    import lightning as L
    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

    from callbacks.safety import PreemptionCheck
    from datamodules.datamodule import LanguageDataModule
    from lightning_modules.causal_lm import CausalLM

    import signal

    record = {"windows": [], "loss": [], "grad": [], "sigterm_broadcasts": 0, "stop_checks": 0}
    lightning_check, our_check = _TrainingEpochLoop._broadcast_sigterm_tensor, PreemptionCheck._any_rank_signalled

    def counted_lightning_check(loop):
        record["sigterm_broadcasts"] += 1
        return lightning_check(loop)

    def counted_check(callback, trainer):
        record["stop_checks"] += 1
        return our_check(callback, trainer)

    _TrainingEpochLoop._broadcast_sigterm_tensor = counted_lightning_check
    PreemptionCheck._any_rank_signalled = counted_check

    class Recorder(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            record["windows"].append((batch["input_ids"][:, 0] // SEQ).tolist())
            record["loss"].append(float(outputs["loss"]))
            if batch_idx == signal_rank1_after and trainer.global_rank == 1:
                check._signum = signal.SIGTERM  # what its deferred handler does on a real signal

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            record["grad"].append(torch.cat([p.grad.flatten() for p in pl_module.parameters()]).clone())

    L.seed_everything(0)
    model = CausalLM(size="tiny", vocab_size=VOCAB, model_overrides={"n_layers": 1, "max_seq_len": 16},
                     warmup_steps=1, lr=1e-2)
    data = LanguageDataModule(data_dir=data_dir, seq_len=SEQ, batch_size=batch_size, seed=3)
    check = PreemptionCheck(every_n_steps=2)
    trainer = L.Trainer(
        max_steps=STEPS if signal_rank1_after is None else 2 * STEPS, accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
        use_distributed_sampler=False, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[Recorder(), check],  # before the check: a signal after batch k is seen at batch k's check
    )
    try:
        trainer.fit(model, datamodule=data)
    except SystemExit:  # Lightning's SIGTERMException once the fit stopped on the signal
        pass
    record["global_step"] = trainer.global_step
    name = f"world{devices}_rank{trainer.global_rank}" + ("" if signal_rank1_after is None else "_signalled")
    torch.save(record, Path(out) / f"{name}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    write_corpus(root / "data")
    for devices, batch in [(2, BATCH), (1, 2 * BATCH)]:
        proc = subprocess.run([sys.executable, __file__, str(root / "data"), str(root), str(devices), str(batch)],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return {name: torch.load(root / f"{name}.pt") for name in ("world2_rank0", "world2_rank1", "world1_rank0")}


def test_ranks_see_different_windows_that_make_up_the_global_batch(runs):
    r0, r1, single = runs["world2_rank0"], runs["world2_rank1"], runs["world1_rank0"]
    for step in range(STEPS):
        assert not set(r0["windows"][step]) & set(r1["windows"][step])
        assert sorted(r0["windows"][step] + r1["windows"][step]) == sorted(single["windows"][step])


def test_ddp_loss_and_grads_match_one_process_on_the_global_batch(runs):
    r0, r1, single = runs["world2_rank0"], runs["world2_rank1"], runs["world1_rank0"]
    for step in range(STEPS):  # step 1 also checks that both setups took the same optimizer step
        assert (r0["loss"][step] + r1["loss"][step]) / 2 == pytest.approx(single["loss"][step], rel=1e-5)
        torch.testing.assert_close(r0["grad"][step], r1["grad"][step])  # all-reduced: identical
        torch.testing.assert_close(r0["grad"][step], single["grad"][step], rtol=1e-4, atol=1e-6)


def test_ranks_agree_on_a_signal_every_n_steps_not_every_step(runs):
    """Lightning broadcasts (and reads back: a host sync on GPUs) before every batch of a multi-process run;
    PreemptionCheck(every_n_steps=2) replaces that: the ranks agree on batches 0 and 2 of the 3 only."""
    assert runs["world2_rank0"]["stop_checks"] == runs["world2_rank1"]["stop_checks"] == 2
    assert runs["world2_rank0"]["sigterm_broadcasts"] == runs["world2_rank1"]["sigterm_broadcasts"] == 0
    assert runs["world1_rank0"]["stop_checks"] == runs["world1_rank0"]["sigterm_broadcasts"] == 0  # one process


def test_a_signal_to_one_rank_stops_every_rank_at_the_next_check(tmp_path):
    """Rank 1 alone is signalled after batch 0; PreemptionCheck(every_n_steps=2) checks after batches 0, 2, …:
    both ranks stop after the check at batch 0, having taken 1 step of the 6 allowed. A check that read only its
    own rank's flag would leave rank 0 training (and the ranks' collectives out of step)."""
    write_corpus(tmp_path / "data")
    proc = subprocess.run([sys.executable, __file__, str(tmp_path / "data"), str(tmp_path), "2", str(BATCH), "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode in (0, 143), proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"world2_rank{r}_signalled.pt") for r in (0, 1)]
    assert [r["global_step"] for r in ranks] == [1, 1] and [len(r["loss"]) for r in ranks] == [1, 1]


def test_a_two_process_stage_runs_through_the_handoff(tmp_path):
    """`stagewise fit` on 2 CPU processes ends with its best checkpoint (weights only), its stage.json and its
    last.ckpt (the full state, named in the record). Only rank 0 writes the record; what it reads of the
    Trainer that is collective (``trainer.log_dir``, a broadcast) is read on every rank first, so rank 0 no
    longer waits on a rank that has returned."""
    from test_resume import CONFIG, prepare_corpus

    (tmp_path / "corpus").mkdir()
    data = prepare_corpus(tmp_path / "corpus")
    (tmp_path / "config.yaml").write_text(CONFIG.format(steps=4, data_dir=data).replace(
        "    - class_path: test_resume.StepRecorder\n", ""))
    proc = subprocess.run([sys.executable, "-m", "lightning_modules", "fit", "-c", "config.yaml",
                           "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.val_check_interval=2",
                           "--preemption_check.every_n_steps=2"],
                          cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "models/resume/language/stage.json").read_text())
    assert record["tokens"]["stage"] == 4 * 2 * 4 * 32 and record["losses"]["best"]["language"] > 0
    assert str(record["config"]["trainer"]["devices"]) == "2"  # the run's config.yaml, read through the log dir
    last = torch.load(tmp_path / record["last_checkpoint"], map_location="cpu", weights_only=False)
    best = torch.load(tmp_path / record["checkpoint"]["path"], map_location="cpu", weights_only=False)
    assert record["last_checkpoint"] == "runs/resume/language/checkpoints/last.ckpt"
    assert last["optimizer_states"] and last["callbacks"] and last["global_step"] == 4
    # the best checkpoint: weights, hyperparameters, data settings and counters only (a third of the size)
    assert "optimizer_states" not in best and "callbacks" not in best
    assert best["hyper_parameters"]["size"] == "tiny" and best["CorpusDataModule"]["seq_len"] == 32
    assert best["stagewise"]["tokens_seen"] == record["tokens"]["stage"]
    assert (tmp_path / record["checkpoint"]["path"]).stat().st_size < 0.5 * (tmp_path / record["last_checkpoint"]).stat().st_size


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    train(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), *(int(a) for a in sys.argv[5:6]))
