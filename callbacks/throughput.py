"""Training speed in TensorBoard: tokens/s, model FLOPs utilisation, step time and peak memory."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
import torch.nn as nn

H100_BF16_DENSE_FLOPS = 989e12
"""Peak dense bf16 tensor-core FLOP/s of one H100 SXM (the MFU denominator of the shared reference)."""


# Dense bf16 tensor-core peaks (vendor datasheets), by a substring of the device name; the first match wins.
BF16_PEAK_FLOPS = (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("A10", 125e12))


def device_peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of ``device`` from :data:`BF16_PEAK_FLOPS`; None on a CPU or an unknown GPU
    (no MFU is given then)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_FLOPS if key in name), None)


def flops_per_token(n_params: int, n_layers: int, d_model: int, seq_len: int) -> int:
    """Training FLOPs per token: ``6·N + 12·L·d·T`` (forward + backward of the matmuls, N without the
    input embedding, plus attention's scores and weighted sum over ``seq_len`` positions)."""
    return 6 * n_params + 12 * n_layers * d_model * seq_len


def model_shape(pl_module: L.LightningModule) -> tuple[int, int, int]:
    """``(N without the input embedding, n_layers, d_model)`` of a module holding a ``Transformer`` as
    ``.model`` (``CausalLM``) or being one."""
    model = getattr(pl_module, "model", pl_module)
    config = getattr(model, "config", None) or getattr(pl_module, "config")
    if getattr(pl_module, "non_embedding_parameters", None):  # CausalLM counts them before any sharding
        n = pl_module.non_embedding_parameters
    elif hasattr(model, "num_parameters"):
        n = model.num_parameters(non_embedding=True)
    else:
        n = sum(p.numel() for p in model.parameters())
        n -= sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    return n, config.n_layers, config.d_model


class Throughput(L.Callback):
    """Logs ``throughput/tokens_per_s`` (all ranks), ``throughput/mfu`` (per GPU, against ``peak_flops``),
    ``throughput/step_time_s`` and ``throughput/peak_memory_gb`` (GiB, this rank) every
    ``log_every_n_steps`` training batches.

    Timing uses host clocks at batch boundaries and synchronizes with the GPU only at the end of each
    window of ``log_every_n_steps`` batches and when a validation pauses the clock (validation time is not
    counted), so training steps run without host syncs. The first window includes
    ``torch.compile``'s compilation. MFU = tokens/s per GPU × (6·N + 12·L·d·T) / ``peak_flops``, N the
    parameters without the input embedding, T the batch's sequence length.

    Args:
        log_every_n_steps: Training batches per measurement window.
        peak_flops: Peak FLOP/s of one accelerator; the default is the H100 SXM's dense bf16 rate
            (989e12). Use about 1979e12 for dense FP8 on an H100, 312e12 for an A100's bf16.
    """

    def __init__(self, log_every_n_steps: int = 50, peak_flops: float = H100_BF16_DENSE_FLOPS) -> None:
        self.log_every_n_steps, self.peak_flops = log_every_n_steps, peak_flops
        self.metrics: dict[str, float] = {}  # the last window's values
        self._shape: tuple[int, int, int] | None = None
        self._t0: float | None = None  # start of the running stretch of the window; None while paused
        self._elapsed = 0.0  # training seconds of the window before the running stretch
        self._batches = self._tokens = 0
        self._seq_len = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._shape = model_shape(pl_module)
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._t0, self._batches, self._tokens, self._elapsed = None, 0, 0, 0.0

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Validation (and whatever callbacks do there) is not training time: pause the clock.
        if self._t0 is not None:  # None in the sanity check: it runs before on_train_start
            self._sync(pl_module)
            self._elapsed += time.perf_counter() - self._t0
            self._t0 = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._t0 is None:
            self._sync(pl_module)
            self._t0 = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        ids = batch["input_ids"] if isinstance(batch, dict) else batch[0]
        self._seq_len = ids.shape[1]
        self._tokens += ids.numel() * trainer.world_size  # shapes are host-side: no sync
        self._batches += 1
        if self._batches < self.log_every_n_steps:
            return
        self._sync(pl_module)
        elapsed = self._elapsed + time.perf_counter() - self._t0
        self.metrics = self.compute(self._tokens, self._batches, elapsed, trainer.world_size, pl_module.device)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(self.metrics, step=trainer.global_step)
        self._t0, self._batches, self._tokens, self._elapsed = time.perf_counter(), 0, 0, 0.0

    def compute(self, tokens: int, batches: int, elapsed: float, world_size: int, device: torch.device) -> dict[str, float]:
        """The metrics of one window: ``tokens`` trained by all ranks in ``batches`` batches over ``elapsed`` s."""
        n, n_layers, d_model = self._shape
        tokens_per_s = tokens / elapsed
        mfu = tokens_per_s / world_size * flops_per_token(n, n_layers, d_model, self._seq_len) / self.peak_flops
        metrics = {"throughput/tokens_per_s": tokens_per_s, "throughput/mfu": mfu,
                   "throughput/step_time_s": elapsed / batches}
        if device.type == "cuda":
            metrics["throughput/peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        return metrics

    @staticmethod
    def _sync(pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
