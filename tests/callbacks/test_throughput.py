"""Throughput: tokens/s, MFU (6N + 12·L·d·T over the device's peak FLOP/s), step time, logged every N batches
(the Trainer's ``log_every_n_steps`` by default)."""

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader

from callbacks.throughput import Throughput
from lightning_modules.causal_lm import CausalLM

VOCAB, SEQ, BATCH = 64, 16, 4


class Capture(Logger):
    """Keeps every (step, metrics) a Trainer logs."""

    name, version = "capture", 0

    def __init__(self):
        super().__init__()
        self.logged: list[tuple[int, dict]] = []

    def log_metrics(self, metrics, step=None):
        self.logged.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_logs_tokens_per_s_and_mfu_every_n_steps(tmp_path):
    # tiny preset, one layer: d=64, 4 heads of 16, 2 kv heads, ffn 256, untied head over 64 ids
    model = CausalLM(size="tiny", vocab_size=VOCAB, model_overrides={"n_layers": 1, "max_seq_len": 32}, warmup_steps=1)
    d, heads, kv, hd, ffn = 64, 4, 2, 16, 256
    n_by_hand = d * (heads + 2 * kv) * hd + d * d + d * 2 * ffn + ffn * d + 2 * d + d + d * VOCAB
    flops_per_token = 6 * n_by_hand + 12 * 1 * d * SEQ
    ids = torch.randint(0, VOCAB, (6 * BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
    data = DataLoader([{"input_ids": w[:-1], "targets": w[1:]} for w in ids], batch_size=BATCH)
    logger, monitor = Capture(), Throughput(log_every_n_steps=2, peak_flops=1e9)
    trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=logger, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[monitor],
                        default_root_dir=tmp_path)
    trainer.fit(model, data)

    points = [(step, m) for step, m in logger.logged if "throughput/tokens_per_s" in m]
    assert [step for step, _ in points] == [2, 4, 6]
    for _, m in points:
        assert m["throughput/tokens_per_s"] > 0
        # tokens/s × seconds per step = the tokens of one batch
        assert m["throughput/tokens_per_s"] * m["throughput/step_time_s"] == pytest.approx(BATCH * SEQ)
        assert m["throughput/mfu"] == pytest.approx(m["throughput/tokens_per_s"] * flops_per_token / 1e9)


def test_follows_the_trainers_log_every_n_steps_and_logs_no_mfu_on_a_cpu(tmp_path):
    model = CausalLM(size="tiny", vocab_size=VOCAB, model_overrides={"n_layers": 1, "max_seq_len": 32}, warmup_steps=1)
    ids = torch.randint(0, VOCAB, (6 * BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
    data = DataLoader([{"input_ids": w[:-1], "targets": w[1:]} for w in ids], batch_size=BATCH)
    logger = Capture()
    trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=logger, enable_checkpointing=False, log_every_n_steps=3,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Throughput()],
                        default_root_dir=tmp_path)
    trainer.fit(model, data)
    points = [(step, m) for step, m in logger.logged if "throughput/tokens_per_s" in m]
    assert [step for step, _ in points] == [3, 6]
    assert not any("throughput/mfu" in m for _, m in points)  # a CPU has no peak in the table


@pytest.mark.parametrize("name, fp8, peak", [
    ("NVIDIA H100 80GB HBM3", False, 989e12), ("NVIDIA H100 80GB HBM3", True, 1979e12),
    ("NVIDIA H100 PCIe", False, 756e12), ("NVIDIA H200", False, 989e12), ("NVIDIA A100-SXM4-80GB", False, 312e12),
    ("NVIDIA A100-SXM4-80GB", True, 312e12), ("NVIDIA L40S", False, 362e12), ("NVIDIA L4", False, 121e12),
    ("NVIDIA A10", False, 125e12), ("Some Future GPU", False, None),
])
def test_mfu_peak_is_the_running_devices(monkeypatch, name, fp8, peak):
    from callbacks.throughput import device_peak_flops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert device_peak_flops(torch.device("cuda", 0), "fp8-mixed" if fp8 else "bf16-mixed") == peak
    assert device_peak_flops(torch.device("cpu")) is None


def test_validation_time_is_not_counted_as_training_time(tmp_path, monkeypatch):
    import types

    import callbacks.throughput

    # A fake clock, so the test does not depend on how busy the machine is: every reading advances it by
    # 1 s, and a validation step advances it by 1000 s.
    clock = [0.0]

    def perf_counter():
        clock[0] += 1.0
        return clock[0]

    monkeypatch.setattr(callbacks.throughput, "time", types.SimpleNamespace(perf_counter=perf_counter))

    class SlowValidation(CausalLM):
        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            clock[0] += 1000.0

    model = SlowValidation(size="tiny", vocab_size=VOCAB, model_overrides={"n_layers": 1, "max_seq_len": 32},
                           warmup_steps=1)
    ids = torch.randint(0, VOCAB, (4 * BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
    data = DataLoader([{"input_ids": w[:-1], "targets": w[1:]} for w in ids], batch_size=BATCH)
    logger = Capture()
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=logger, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        val_check_interval=2, limit_val_batches=1, callbacks=[Throughput(log_every_n_steps=4)],
                        default_root_dir=tmp_path)
    trainer.fit(model, data, data)
    (step, m), = [(s, m) for s, m in logger.logged if "throughput/step_time_s" in m]
    # the validation after step 2 falls inside the window; counted, it would add 250 s per step
    assert step == 4 and m["throughput/step_time_s"] < 10


def test_mfu_counts_the_whole_model_when_parameters_are_sharded():
    from callbacks.throughput import model_shape

    model = CausalLM(size="tiny", vocab_size=VOCAB, model_overrides={"n_layers": 1})
    model.configure_model()
    whole = model_shape(model)
    for p in model.model.parameters():  # FSDP keeps each rank's part of every parameter as a 1-D view
        p.data = p.data.flatten()[: p.numel() // 2]
    assert model_shape(model) == whole
    assert model.model.num_parameters(non_embedding=True) < whole[0]  # what the shards alone would count


def test_a_device_names_peak_is_found_by_whole_words():
    """An L40 is not an L4, an A10G not an A10, a GB200 not a B200: unknown there, so no MFU rather than a wrong one."""
    from callbacks.throughput import PEAK_FLOPS, peak_flops_of

    assert peak_flops_of("NVIDIA H200") == PEAK_FLOPS["h200"] and peak_flops_of("NVIDIA H200 NVL") == PEAK_FLOPS["h200 nvl"]
    assert peak_flops_of("NVIDIA A100-SXM4-80GB") == PEAK_FLOPS["a100"]
    assert peak_flops_of("NVIDIA L40S") == PEAK_FLOPS["l40s"] and peak_flops_of("NVIDIA L4") == PEAK_FLOPS["l4"]
    assert peak_flops_of("NVIDIA L40") is peak_flops_of("NVIDIA A10G") is peak_flops_of("NVIDIA GB200") is None
