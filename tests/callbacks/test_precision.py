"""Precision: `auto` resolves per machine, the monitor records it, the fp16 scale and grad norm are logged."""

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader

from callbacks.precision import MixedPrecisionMonitor, float8_filter, precision_label, resolve_precision
from lightning_modules.causal_lm import CausalLM
from lightning_modules.cli import StagewiseCLI

VOCAB, SEQ = 64, 16


class Capture(Logger):
    """Keeps every (step, metrics) a Trainer logs."""

    def __init__(self):
        super().__init__()
        self.logged: list[tuple[int, dict]] = []

    name, version = "capture", 0

    def log_metrics(self, metrics, step=None):
        self.logged.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


class TinyData(L.LightningDataModule):
    """Random windows; exposes what the CLI links into the model."""

    def __init__(self, batch_size: int = 2):
        super().__init__()
        self.vocab_size, self.tokenizer_sha256, self.batch_size = VOCAB, "a" * 64, batch_size

    def train_dataloader(self):
        ids = torch.randint(0, VOCAB, (16, SEQ + 1), generator=torch.Generator().manual_seed(0))
        return DataLoader([{"input_ids": w[:-1], "targets": w[1:]} for w in ids], batch_size=self.batch_size)


def test_auto_is_32_true_on_cpu_and_turns_tf32_on(monkeypatch):
    torch.set_float32_matmul_precision("highest")
    assert resolve_precision("auto") == "32-true"
    assert torch.get_float32_matmul_precision() == "high"
    assert resolve_precision(None) == "32-true"
    assert resolve_precision("bf16-mixed") == "bf16-mixed"  # explicit choices pass through


@pytest.mark.parametrize("bf16, expected", [(True, "bf16-mixed"), (False, "16-mixed")])
def test_auto_on_a_gpu_picks_bf16_where_supported(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    assert resolve_precision("auto") == expected
    assert resolve_precision("auto", accelerator="cpu") == "32-true"


def test_cli_accepts_and_resolves_precision_auto(tmp_path):
    cli = StagewiseCLI(
        CausalLM, TinyData, subclass_mode_model=True, subclass_mode_data=True, run=False,
        auto_configure_optimizers=False,
        args=["--trainer.precision", "auto", "--trainer.accelerator", "cpu", "--trainer.logger", "false",
              "--trainer.default_root_dir", str(tmp_path), "--model", "lightning_modules.causal_lm.CausalLM",
              "--model.size", "tiny", "--data", f"{TinyData.__module__}.TinyData", "--stage.name", "t",
              "--stage.domain", "language", "--stage.runs_dir", str(tmp_path)],
    )
    assert cli.trainer.precision == "32-true"


def test_monitor_records_precision_and_grad_norm_is_logged(tmp_path):
    model = CausalLM(size="tiny", vocab_size=VOCAB, model_overrides={"n_layers": 1, "max_seq_len": 32}, warmup_steps=1)
    logger = Capture()
    trainer = L.Trainer(
        max_steps=4, accelerator="cpu", logger=logger, log_every_n_steps=1, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[monitor := MixedPrecisionMonitor()],
    )
    trainer.fit(model, datamodule=TinyData())
    assert monitor.precision == precision_label(trainer) == "32-true"
    norms = [m["train/grad_norm"] for _, m in logger.logged if "train/grad_norm" in m]
    assert len(norms) == 4 and all(n > 0 for n in norms)  # logged on every step, without clipping


def test_monitor_logs_the_fp16_scalers_scale_every_n_steps():
    logger = Capture()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler), loggers=[logger], global_step=0)
    monitor = MixedPrecisionMonitor(log_every_n_steps=5)
    for step in range(11):
        trainer.global_step = step
        monitor.on_before_optimizer_step(trainer, None, None)
    assert logger.logged == [(0, {"train/grad_scale": 1024.0}), (5, {"train/grad_scale": 1024.0}),
                             (10, {"train/grad_scale": 1024.0})]


def test_float8_keeps_the_output_head_and_odd_shapes_in_bf16():
    assert float8_filter(torch.nn.Linear(64, 128), "layers.0.attn.qkv")
    assert not float8_filter(torch.nn.Linear(64, 128), "lm_head")
    assert not float8_filter(torch.nn.Linear(64, 100), "layers.0.mlp.down")
    assert not float8_filter(torch.nn.Embedding(64, 64), "tok_embeddings")
