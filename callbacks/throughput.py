"""Training speed in TensorBoard: tokens/s, model FLOPs utilisation, step time and peak memory."""

from __future__ import annotations

import re
import time
from typing import Any

import lightning as L
import torch
import torch.nn as nn
from lightning.pytorch.utilities import rank_zero_warn

from callbacks.precision import precision_label

# Peak dense (no sparsity) tensor-core FLOP/s of one accelerator, (bf16/fp16, fp8), from the vendors' data
# sheets; the first entry whose key is in the lower-cased device name as whole words wins ("nvidia l40" is not
# an "l4", "nvidia a10g" not an "a10", "nvidia gb200" not a "b200"), so longer names come first.
PEAK_FLOPS: dict[str, tuple[float, float | None]] = {
    "h100 nvl": (835e12, 1671e12),
    "h100 pcie": (756e12, 1513e12),
    "h200 nvl": (835e12, 1671e12),
    "gh200": (989e12, 1979e12),
    "h100": (989e12, 1979e12),  # SXM ("NVIDIA H100 80GB HBM3")
    "h200": (989e12, 1979e12),
    "b200": (2250e12, 4500e12),
    "a100": (312e12, None),
    "l40s": (362e12, 733e12),
    "l4": (121e12, 242e12),
    "a10": (125e12, None),
    "mi300x": (1307e12, 2615e12),
}
H100_BF16_DENSE_FLOPS = PEAK_FLOPS["h100"][0]
"""Peak dense bf16 tensor-core FLOP/s of one H100 SXM (the MFU denominator of the shared reference)."""


def peak_flops_of(device_name: str) -> tuple[float, float | None] | None:
    """(bf16, fp8) peak FLOP/s of the device called ``device_name`` (``torch.cuda.get_device_name``), or None."""
    name = device_name.lower()
    return next((v for k, v in PEAK_FLOPS.items() if re.search(rf"(?<![a-z0-9]){re.escape(k)}(?![a-z0-9])", name)),
                None)


def device_peak_flops(device: torch.device, precision: str = "bf16-mixed") -> float | None:
    """The peak dense FLOP/s of ``device`` from :data:`PEAK_FLOPS` for a run in ``precision``
    (:func:`~callbacks.precision.precision_label`): the fp8 rate for ``fp8-mixed``, else the bf16 one; None on a
    CPU or a GPU not in the table (no MFU is given then). The one lookup of ``Throughput`` and ``StageHandoff``."""
    if device.type != "cuda":
        return None
    peaks = peak_flops_of(torch.cuda.get_device_name(device))
    if peaks is None:
        return None
    return peaks[1] if precision == "fp8-mixed" and peaks[1] is not None else peaks[0]


def mfu(tokens_per_s: float, world_size: int, shape: tuple[int, int, int], seq_len: int, peak: float) -> float:
    """Model FLOPs utilisation per accelerator: ``tokens_per_s`` of all ``world_size`` ranks of a model of
    ``shape`` (:func:`model_shape`) at ``seq_len``, against ``peak`` FLOP/s of one."""
    return tokens_per_s / world_size * flops_per_token(*shape, seq_len) / peak


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
    """Logs ``throughput/tokens_per_s`` (all ranks), ``throughput/mfu`` (per GPU, against the device's peak),
    ``throughput/step_time_s`` and ``throughput/peak_memory_gb`` (GiB, this rank) every
    ``log_every_n_steps`` training batches.

    Timing uses host clocks at batch boundaries and synchronizes with the GPU only at the end of each
    window of ``log_every_n_steps`` batches and when a validation pauses the clock (validation time is not
    counted), so training steps run without host syncs. The first window includes
    ``torch.compile``'s compilation. MFU = tokens/s per GPU × (6·N + 12·L·d·T) / peak FLOP/s, N the
    parameters without the input embedding, T the batch's sequence length; the peak is the running GPU's
    dense bf16 rate (fp8 under ``Float8MixedPrecision``) from :data:`PEAK_FLOPS`. No MFU is logged on a CPU
    or on a GPU the table lacks (a warning names it) unless ``peak_flops`` is given.

    Args:
        log_every_n_steps: Training batches per measurement window; default: the Trainer's
            ``log_every_n_steps``.
        peak_flops: Peak FLOP/s of one accelerator, instead of the table's for the running device (e.g.
            312e12 for an A100's bf16).
    """

    def __init__(self, log_every_n_steps: int | None = None, peak_flops: float | None = None) -> None:
        self.log_every_n_steps, self.peak_flops = log_every_n_steps, peak_flops
        self._every = 0  # the window in use and the peak, both set in on_train_start
        self._peak: float | None = None
        self.metrics: dict[str, float] = {}  # the last window's values
        self._shape: tuple[int, int, int] | None = None
        self._t0: float | None = None  # start of the running stretch of the window; None while paused
        self._elapsed = 0.0  # training seconds of the window before the running stretch
        self._batches = self._tokens = 0
        self._seq_len = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._shape = model_shape(pl_module)
        self._every = max(1, self.log_every_n_steps or trainer.log_every_n_steps)
        self._peak = self.peak_flops or device_peak_flops(pl_module.device, precision_label(trainer))
        if self._peak is None and pl_module.device.type == "cuda":
            rank_zero_warn(f"Throughput: no peak FLOP/s known for {torch.cuda.get_device_name(pl_module.device)}, "
                           "so no throughput/mfu; give it as Throughput(peak_flops=...)")
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
        if self._batches < self._every:
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
        tokens_per_s = tokens / elapsed
        metrics = {"throughput/tokens_per_s": tokens_per_s, "throughput/step_time_s": elapsed / batches}
        if self._peak:
            metrics["throughput/mfu"] = mfu(tokens_per_s, world_size, self._shape, self._seq_len, self._peak)
        if device.type == "cuda":
            metrics["throughput/peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        return metrics

    @staticmethod
    def _sync(pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
