"""StageHandoff: a 2-stage tiny run hands the best checkpoint and its record to the next stage."""

import json

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from callbacks.stage_handoff import StageHandoff
from datamodules.stage_record import file_sha256, read_stage_record, update_stage_record
from datamodules.errors import TokenizerMismatchError
from lightning_modules.causal_lm import CausalLM

VOCAB, SEQ, BATCH = 64, 16, 2
SHA = "a" * 64


class RandomTokens(L.LightningDataModule):
    """Stand-in for CorpusDataModule: fixed random windows, one val loader per domain."""

    def __init__(self, val_domains: list[str], seed: int = 0) -> None:
        super().__init__()
        self.val_domains = val_domains
        self.tokenizer_sha256 = SHA
        self.tokenizer_dir = None
        self.seed = seed

    def _windows(self, n: int, seed: int) -> list[dict]:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, VOCAB, (n, SEQ + 1), generator=g)
        return [{"input_ids": w[:-1], "targets": w[1:]} for w in ids]

    def train_dataloader(self):
        return DataLoader(self._windows(64, self.seed), batch_size=BATCH)

    def val_dataloader(self):
        return [DataLoader(self._windows(4, 100 + i), batch_size=BATCH) for i, _ in enumerate(self.val_domains)]


def run_stage(stage, domains, init_from=None, tokenizer_sha=SHA, max_steps=6, callbacks=(), strategy="auto",
              ckpt_path=None):
    model = CausalLM(size="tiny", vocab_size=VOCAB, tokenizer_sha256=tokenizer_sha, init_from=init_from,
                     model_overrides={"n_layers": 1, "max_seq_len": 64}, warmup_steps=1, lr=1e-2)
    best = ModelCheckpoint(dirpath="models", filename=f"{stage}_model_best", monitor=f"val/{stage}/loss",
                           save_top_k=1, auto_insert_metric_name=False, enable_version_counter=False)
    handoff = StageHandoff(stage=stage, export_hf=False, log_every_n_steps=2)
    trainer = L.Trainer(
        max_steps=max_steps, val_check_interval=3, check_val_every_n_epoch=None, num_sanity_val_steps=0,
        logger=TensorBoardLogger("runs", name="exp", version=stage, default_hp_metric=False),
        callbacks=[best, handoff, *callbacks], enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu", devices=1, use_distributed_sampler=False, strategy=strategy,
    )
    trainer.fit(model, datamodule=RandomTokens(domains), ckpt_path=ckpt_path)
    return trainer, model


@pytest.fixture(scope="module")
def two_stages(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("stages"))
        first = run_stage("language", ["language"])
        second = run_stage("code", ["language", "code"], init_from="models/language_model_best.ckpt")
        yield first, second


def test_first_stage_writes_best_checkpoint_and_record(two_stages):
    (trainer, model), _ = two_stages
    record = read_stage_record("models", "language")
    assert record["stage"] == "language" and record["experiment"] == "exp"
    assert record["parent"] is None
    assert record["checkpoint"] == {"path": "models/language_model_best.ckpt",
                                    "sha256": file_sha256("models/language_model_best.ckpt")}
    assert record["tokenizer_sha256"] == SHA
    best_step = 3 if record["best_step"] == 3 else 6  # validations at steps 3 and 6
    assert record["best_step"] in (3, 6)
    assert record["tokens"] == {"stage": best_step * BATCH * SEQ, "total": best_step * BATCH * SEQ,
                                "trained": 6 * BATCH * SEQ}
    assert record["optimizer_steps"] == {"stage": best_step, "total": best_step, "trained": 6}
    assert record["losses"]["final"]["language"] == pytest.approx(float(trainer.callback_metrics["val/language/loss"]))
    best_score = trainer.checkpoint_callback.best_model_score
    assert record["losses"]["best"]["language"] == pytest.approx(float(best_score))
    assert record["precision"] == "32-true" and record["wall_time_s"] > 0
    assert record["config"]["model"]["init_args"]["size"] == "tiny"


def test_second_stage_records_parent_and_continues_lineage(two_stages):
    _, (trainer, model) = two_stages
    record = read_stage_record("models", "code")
    parent = "models/language_model_best.ckpt"
    assert record["parent"] == {"path": parent, "sha256": file_sha256(parent), "stage": "language"}
    parent_record = read_stage_record("models", "language")
    steps = record["best_step"]
    assert record["tokens"]["stage"] == steps * BATCH * SEQ and record["tokens"]["trained"] == 6 * BATCH * SEQ
    assert record["tokens"]["total"] == parent_record["tokens"]["total"] + steps * BATCH * SEQ
    assert record["optimizer_steps"]["total"] == parent_record["optimizer_steps"]["total"] + steps
    assert set(record["losses"]["final"]) == {"language", "code"}
    assert set(record["losses"]["best"]) == {"language", "code"}


def test_weights_carried_optimizer_fresh(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_stage("language", ["language"])
    parent = torch.load("models/language_model_best.ckpt", weights_only=False)
    seen = {}

    class Probe(L.Callback):
        def on_train_start(self, trainer, pl_module):
            state = pl_module.state_dict()
            seen["equal"] = all(torch.equal(state[k], v) for k, v in parent["state_dict"].items())
            seen["opt_state"] = len(trainer.optimizers[0].state)
            seen["step"] = trainer.global_step

    run_stage("code", ["language", "code"], init_from="models/language_model_best.ckpt", max_steps=1,
              callbacks=[Probe()])
    assert seen == {"equal": True, "opt_state": 0, "step": 0}


def test_parent_with_other_tokenizer_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_stage("language", ["language"])
    # The record says another tokenizer made the parent (the checkpoint's own hparams agree with us).
    update_stage_record("models", "language", {"tokenizer_sha256": "b" * 64})
    with pytest.raises(TokenizerMismatchError, match="bbbbbbbbbbbb.*aaaaaaaaaaaa.*same tokenizer"):
        run_stage("code", ["language", "code"], init_from="models/language_model_best.ckpt")


def test_curves_on_the_total_tokens_axis(two_stages):
    def scalars(stage):
        acc = EventAccumulator(f"runs/exp/{stage}")
        acc.Reload()
        return acc, {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}

    _, lang = scalars("language")
    code_acc, code = scalars("code")
    window = BATCH * SEQ
    assert lang["val_tokens/language/loss"] == [3 * window, 6 * window]
    # the second run continues the same curve from where its parent checkpoint was saved
    per_stage = read_stage_record("models", "language")["tokens"]["total"]
    assert code["val_tokens/language/loss"] == [per_stage + 3 * window, per_stage + 6 * window]
    assert code["val_tokens/code/loss"] == code["val_tokens/language/loss"]
    assert code["stage/boundary"] == [per_stage]
    assert code["train_tokens/loss"] == [per_stage + 2 * window, per_stage + 4 * window, per_stage + 6 * window]
    text = code_acc.Tensors("stage/boundary/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "models/language_model_best.ckpt" in text and f"{per_stage:,} tokens" in text


def test_best_checkpoint_copied_into_models_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    elsewhere = ModelCheckpoint(dirpath="elsewhere", filename="best", monitor="val/language/loss", save_top_k=1)
    model = CausalLM(size="tiny", vocab_size=VOCAB, tokenizer_sha256=SHA, model_overrides={"n_layers": 1})
    trainer = L.Trainer(max_steps=3, val_check_interval=3, check_val_every_n_epoch=None, num_sanity_val_steps=0,
                        logger=False, callbacks=[elsewhere, StageHandoff("language", export_hf=False)],
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, datamodule=RandomTokens(["language"]))
    record = read_stage_record("models", "language")
    assert file_sha256("models/language_model_best.ckpt") == file_sha256(elsewhere.best_model_path)
    assert record["checkpoint"]["sha256"] == file_sha256(elsewhere.best_model_path)


def test_resume_keeps_losses_and_wall_time():
    a = StageHandoff("code")
    a.val_history, a._wall_before = {"250": {"code": 1.5, "language": 2.0}}, 12.0
    b = StageHandoff("code")
    a.val_metrics_history = {"250": {"val/preference/reward_accuracy": 0.75}}
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.val_history == {"250": {"code": 1.5, "language": 2.0}}
    assert b.val_metrics_history == {"250": {"val/preference/reward_accuracy": 0.75}}
    assert b.wall_time_s() == pytest.approx(12.0)


@pytest.mark.parametrize("restore_after_setup", [False, True])
def test_resume_logs_one_boundary_and_adds_the_resumed_run_to_wall_time(tmp_path, monkeypatch, restore_after_setup):
    """FSDP restores callback states after ``on_fit_start`` (``restore_checkpoint_after_setup``), other
    strategies before it; a resumed stage must come out the same either way."""
    from lightning.pytorch.strategies import SingleDeviceStrategy

    class RestoresAfterSetup(SingleDeviceStrategy):  # FSDP's order of restore and on_fit_start, on CPU
        @property
        def restore_checkpoint_after_setup(self) -> bool:
            return True

    monkeypatch.chdir(tmp_path)
    last = ModelCheckpoint(dirpath="ckpt", save_last=True, save_top_k=0)
    run_stage("language", ["language"], max_steps=3, callbacks=[last])
    first = read_stage_record("models", "language")["wall_time_s"]
    strategy = RestoresAfterSetup(torch.device("cpu")) if restore_after_setup else "auto"
    run_stage("language", ["language"], max_steps=5, strategy=strategy, ckpt_path="ckpt/last.ckpt")
    record = read_stage_record("models", "language")
    assert record["wall_time_s"] > first
    # steps 4-5 ran no validation: the final losses are the latest validation's, the first run's at step 3
    assert set(record["losses"]["final"]) == {"language"} and record["losses"]["final"] == record["losses"]["best"]
    boundaries = []
    for events in sorted((tmp_path / "runs/exp/language").glob("events*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        boundaries += [e.step for e in acc.Scalars("stage/boundary")] if "stage/boundary" in acc.Tags()["scalars"] else []
    assert boundaries == [0]


def test_best_losses_are_those_of_the_checkpointed_step_not_of_a_step0_baseline(tmp_path, monkeypatch):
    """A validation before the first step (ForgettingMonitor's baseline pass) is never checkpointed."""
    monkeypatch.chdir(tmp_path)

    class ValidateAtStart(L.Callback):
        def on_train_start(self, trainer, pl_module):
            trainer.validating = True
            trainer.fit_loop.epoch_loop.val_loop.run()
            trainer.training = True

    run_stage("language", ["language"], callbacks=[ValidateAtStart()])
    record = read_stage_record("models", "language")
    saved = torch.load("models/language_model_best.ckpt", weights_only=False)
    assert record["best_step"] == saved["global_step"] > 0
    assert record["losses"]["best"]["language"] == pytest.approx(float(saved["callbacks"][next(
        k for k in saved["callbacks"] if k.startswith("ModelCheckpoint"))]["best_model_score"]))


def test_the_records_throughput_tells_validation_time_from_training(tmp_path, monkeypatch):
    """``validation_s``: from each validation's start to the next training batch (a callback's work at the
    validation's end included); ``training_tokens_per_s`` is the rate without it. A fake clock: each reading
    advances 1 s, the callback's work at validation end 1000 s."""
    import types

    import callbacks.stage_handoff

    clock = [0.0]

    def perf_counter():
        clock[0] += 1.0
        return clock[0]

    monkeypatch.setattr(callbacks.stage_handoff, "time", types.SimpleNamespace(perf_counter=perf_counter))

    class SlowEvaluation(L.Callback):  # stands in for ToolCallEval's decoding
        def on_validation_end(self, trainer, pl_module):
            clock[0] += 1000.0

    monkeypatch.chdir(tmp_path)
    run_stage("language", ["language"], max_steps=6, callbacks=[SlowEvaluation()])  # validations after 3 and 6
    throughput = read_stage_record("models", "language")["throughput"]
    # the second validation ends training: its 1000 s count to the end of training too
    assert 2000 <= throughput["validation_s"] < throughput["seconds"] < 2100
    assert throughput["training_tokens_per_s"] > 10 * throughput["tokens_per_s"]


def test_the_record_keeps_other_validation_metrics_at_the_best_checkpoint_and_at_the_end(tmp_path, monkeypatch):
    """A val/<domain>/<what> that is neither a loss nor a perplexity (a preference stage's reward accuracy) lands
    in the record as val_metrics, at the best checkpoint's validation and at the last one."""
    monkeypatch.chdir(tmp_path)

    class Score(L.Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            pl_module.log("val/language/score", float(trainer.global_step))

    run_stage("language", ["language"], callbacks=[Score()])
    record = read_stage_record("models", "language")
    assert record["val_metrics"] == {"final": {"val/language/score": 6.0},
                                     "best": {"val/language/score": float(record["best_step"])}}
    assert not any(k.endswith(("/loss", "/ppl")) for k in record["val_metrics"]["final"])
