"""ForgettingMonitor on a tiny stage-2 run: an "old" domain the model knows, an "own" domain that conflicts."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from callbacks.forgetting import ForgettingMonitor

V, T = 32, 16


def _sequences(rule, n: int, seed: int) -> torch.Tensor:
    """Token t+1 follows ``rule`` from token t half of the time, else is random (so losses stay well above 0)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (n, T + 1), generator=g)
    follow = torch.rand(n, T, generator=g) < 0.5
    for t in range(T):
        x[:, t + 1] = torch.where(follow[:, t], rule(x[:, t]), x[:, t + 1])
    return x


RULES = {"old": lambda t: (t + 1) % V, "own": lambda t: (3 * t + 7) % V}  # same inputs, other targets


class Data(L.LightningDataModule):
    """Trains on ``corpus`` ("own"); validates on ["old", "own"] (one loader each, like CorpusDataModule)."""

    val_domains = ["old", "own"]

    def __init__(self, corpus: str = "own") -> None:
        super().__init__()
        self.corpus = corpus

    def train_dataloader(self):
        x = _sequences(RULES[self.corpus], 256, 0)
        return DataLoader([{"input_ids": r[:-1], "targets": r[1:]} for r in x], batch_size=8, shuffle=True)

    def val_dataloader(self):
        return [
            DataLoader([{"input_ids": r[:-1], "targets": r[1:]} for r in _sequences(RULES[d], 32, 1)], batch_size=16)
            for d in self.val_domains
        ]


class Bigram(L.LightningModule):
    """Stand-in for CausalLM: logs val/<domain>/loss and has total_tokens and hparams.init_from."""

    def __init__(self, lr: float = 1e-4, init_from: str | None = None, decay_steps: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(V, 16)
        self.head = torch.nn.Linear(16, V)
        self.total_tokens = 0

    def loss(self, batch):
        logits = self.head(self.emb(batch["input_ids"]))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())

    def training_step(self, batch, batch_idx):
        self.total_tokens += batch["input_ids"].numel()
        return self.loss(batch)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        domain = self.trainer.datamodule.val_domains[dataloader_idx]
        self.log(f"val/{domain}/loss", self.loss(batch), add_dataloader_idx=False)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        if not self.hparams.decay_steps:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / self.hparams.decay_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def pretrained(lr: float, **kw) -> Bigram:
    """A model that has learned "old" (stage 1), ready for stage 2 at ``lr``."""
    model = Bigram(lr=lr, **kw)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    x = _sequences(RULES["old"], 64, 2)
    for _ in range(150):
        opt.zero_grad()
        model.loss({"input_ids": x[:, :-1], "targets": x[:, 1:]}).backward()
        opt.step()
    return model


def fit(model, monitor, tmp_path, max_steps=40, extra=(), **kw) -> L.Trainer:
    options = dict(
        max_steps=max_steps, val_check_interval=5, check_val_every_n_epoch=None, num_sanity_val_steps=0,
        callbacks=[monitor, *extra], logger=L.pytorch.loggers.TensorBoardLogger(tmp_path / "runs", name="exp"),
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, accelerator="cpu",
        default_root_dir=tmp_path, log_every_n_steps=5,
    )
    trainer = L.Trainer(**{**options, **kw})
    trainer.fit(model, datamodule=Data())
    return trainer


def monitor(tmp_path, **kw) -> ForgettingMonitor:
    return ForgettingMonitor(stage="own", models_dir=str(tmp_path / "models"), grace=10, **kw)


def test_absurd_lr_stops_within_two_validations_after_grace(tmp_path):
    m = monitor(tmp_path, action="stop")
    trainer = fit(pretrained(lr=0.3), m, tmp_path)
    assert m.domains == ["old"] and m.baseline_source == "validation at step 0"
    stops = [a for a in m.alarms["old"] if a["level"] == "stop"]
    assert len(stops) == 1 and stops[0]["step"] <= 10 + 2 * 5
    assert trainer.should_stop and trainer.global_step == stops[0]["step"] < 40
    assert m.max_rise["old"] > 0.25
    import json

    record = json.loads((tmp_path / "models" / "own" / "stage.json").read_text())["forgetting"]["old"]
    assert record["baseline"] == pytest.approx(m.baselines["old"])
    assert record["alarms"][-1]["level"] == "stop" and record["max_rise"] > 0.25


def test_sane_lr_raises_no_alarm(tmp_path):
    m = monitor(tmp_path, action="stop")
    trainer = fit(pretrained(lr=1e-4), m, tmp_path)
    assert trainer.global_step == 40 and m.alarms == {}
    assert abs(m.max_rise["old"]) < 0.05 and m.final["old"] == pytest.approx(m.baselines["old"], rel=0.05)


def test_grace_period_suppresses_an_early_rise(tmp_path):
    m = ForgettingMonitor(stage="own", models_dir=str(tmp_path / "models"), grace=0.9, action="stop")
    trainer = fit(pretrained(lr=0.3), m, tmp_path)
    assert trainer.global_step == 40 and m.alarms == {}
    assert m.max_rise["old"] > 0.25  # measured and recorded, just no alarm


class Probe(L.Callback):
    """Records the LR of every step and the weights right after each validation."""

    def __init__(self):
        self.lrs, self.after_val = {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]

    def on_validation_end(self, trainer, pl_module):
        self.after_val[trainer.global_step] = {k: v.clone() for k, v in pl_module.state_dict().items()}


def test_backoff_scales_lr_and_schedule_and_restores_weights(tmp_path):
    model = pretrained(lr=0.3, decay_steps=100)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    m, probe = monitor(tmp_path, action="backoff", max_backoffs=1), Probe()
    trainer = fit(model, m, tmp_path, max_steps=60, extra=[probe])
    first, last = [a for a in m.alarms["old"] if a["level"] == "stop"][:2]
    assert m.backoffs == 1 and trainer.global_step == last["step"] < 60  # second stop alarm: no backoffs left
    # Every watched validation was forgetting, so the restore target is the stage's starting weights.
    for k, v in start.items():
        torch.testing.assert_close(probe.after_val[first["step"]][k], v)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.base_lrs == [pytest.approx(0.15)]
    for step, lr in probe.lrs.items():
        scale = 0.5 if step >= first["step"] else 1.0  # validation at step s runs before batch s
        assert lr == pytest.approx(scale * 0.3 * (1 - step / 100)), step


def test_state_survives_round_trip_and_resume(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    m = monitor(tmp_path, action="log")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    fit(pretrained(lr=0.3), m, tmp_path, max_steps=25, extra=[ckpt], enable_checkpointing=True)
    assert m.alarms["old"]  # warn and stop alarms, logged only
    copy = monitor(tmp_path)
    copy.load_state_dict(m.state_dict())
    assert copy.state_dict() == m.state_dict()

    resumed = monitor(tmp_path, action="log")
    trainer = L.Trainer(
        max_steps=35, val_check_interval=5, check_val_every_n_epoch=None, num_sanity_val_steps=0,
        callbacks=[resumed], logger=False, enable_progress_bar=False, enable_checkpointing=False,
        accelerator="cpu", default_root_dir=tmp_path,
    )
    trainer.fit(pretrained(lr=0.3), datamodule=Data(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed.baselines == m.baselines and resumed.baseline_source == "validation at step 0"
    assert resumed.alarms["old"][: len(m.alarms["old"])] == m.alarms["old"]
    assert max(a["step"] for a in resumed.alarms["old"]) <= 35 and trainer.global_step == 35


def test_tensorboard_gets_rises_on_step_and_token_axes(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    m = monitor(tmp_path, action="stop")
    trainer = fit(pretrained(lr=0.3), m, tmp_path)
    events = EventAccumulator(trainer.logger.log_dir).Reload()
    tags = events.Tags()["scalars"]
    assert {"forgetting/old", "forgetting/old/max_rise", "forgetting_vs_tokens/old"} <= set(tags)
    assert [e.step for e in events.Scalars("forgetting_vs_tokens/old")][:2] == [5 * 8 * T, 10 * 8 * T]
    assert [e.step for e in events.Scalars("val/old/loss")][0] == 0  # the baseline validation
    assert "forgetting/alarms/text_summary" in events.Tags()["tensors"]


def test_baseline_comes_from_the_parent_stage_record(tmp_path):
    from datamodules.stage_record import update_stage_record

    models = tmp_path / "models"
    update_stage_record(str(models), "old", {"losses": {"best": {"old": 2.5}, "final": {"old": 2.7}}})
    m = monitor(tmp_path)
    trainer = fit(pretrained(lr=1e-4, init_from=str(models / "old_model_best.ckpt")), m, tmp_path, max_steps=10)
    assert m.baselines == {"old": 2.5} and "stage record" in m.baseline_source
    assert m.max_rise["old"] > 0.5  # the pretrained model is much better than this made-up baseline says
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(trainer.logger.log_dir).Reload()
    assert events.Scalars("val/old/loss")[0].step > 0  # no extra validation before the first step


def test_causal_lm_stage_two_at_absurd_lr_stops_and_records(tmp_path):
    from lightning_modules.causal_lm import CausalLM

    hp = {"size": "tiny", "model_overrides": {"n_layers": 2}, "vocab_size": V, "warmup_steps": 1, "schedule": "constant"}
    torch.manual_seed(0)
    parent = CausalLM(lr=1e-2, **hp)
    t = L.Trainer(max_steps=30, limit_val_batches=0, logger=False, enable_checkpointing=False, accelerator="cpu",
                  enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    t.fit(parent, datamodule=Data("old"))
    t.save_checkpoint(tmp_path / "old.ckpt")
    m = monitor(tmp_path, action="stop")
    trainer = fit(CausalLM(lr=1.0, init_from=str(tmp_path / "old.ckpt"), **hp), m, tmp_path)
    stop = [a for a in m.alarms["old"] if a["level"] == "stop"]
    assert stop and stop[0]["step"] <= 10 + 2 * 5 and trainer.global_step == stop[0]["step"]
    record = (tmp_path / "models" / "own" / "stage.json").read_text()
    assert '"level": "stop"' in record


def test_backoff_is_refused_under_fsdp_before_training(monkeypatch):
    """A backoff restores a kept copy of the whole weights, which a rank holding a shard cannot do. Lightning
    runs FSDP on GPUs only, so a stand-in for FSDPStrategy stands in for it here."""
    import types

    import lightning.pytorch.strategies as strategies

    from datamodules.errors import StagewiseError

    class FakeFSDP:
        pass

    monkeypatch.setattr(strategies, "FSDPStrategy", FakeFSDP)
    trainer = types.SimpleNamespace(strategy=FakeFSDP(), datamodule=Data())
    with pytest.raises(StagewiseError, match="backoff.*FSDP.*'stop' or 'log'"):
        ForgettingMonitor(stage="own", action="backoff").on_fit_start(trainer, Bigram())
    for action in ("stop", "log"):
        m = ForgettingMonitor(stage="own", action=action)
        m.on_fit_start(trainer, Bigram())
        assert m.domains == ["old"]
