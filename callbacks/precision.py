"""Mixed precision: resolve ``precision: auto``, watch the numerics, and an FP8 option for the linears.

- :func:`resolve_precision` turns ``auto`` into ``bf16-mixed`` (GPUs with bf16), ``16-mixed`` (older
  GPUs: fp16 with a gradient scaler) or ``32-true`` (CPU), and turns TF32 matmuls on. The CLI calls it
  before the Trainer is built.
- :class:`MixedPrecisionMonitor` logs the resolved precision (console, TensorBoard text, stage.json) and,
  under ``16-mixed``, the gradient scaler's scale as ``train/grad_scale``. The global gradient norm
  ``train/grad_norm`` is logged by ``CausalLM.configure_gradient_clipping`` on every optimizer step.
- :class:`Float8MixedPrecision` is a Lightning precision plugin: bf16 autocast plus torchao's float8
  training for every ``nn.Linear`` but the output head (``--trainer.plugins`` instead of
  ``--trainer.precision``; needs ``torchao`` and an H100-class GPU).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn as nn
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities import rank_zero_info

from datamodules.errors import StagewiseError


def resolve_precision(precision: str | int | None = "auto", accelerator: str | None = None) -> str | int | None:
    """The Trainer precision for ``precision``: ``auto`` (or ``None``) becomes ``bf16-mixed`` where a CUDA
    GPU supports bf16, ``16-mixed`` on older GPUs and ``32-true`` on CPU (or when ``accelerator`` is
    ``cpu``); other values pass through. Also turns TF32 matmuls on for float32 work."""
    torch.set_float32_matmul_precision("high")
    if precision not in (None, "auto"):
        return precision
    if accelerator == "cpu" or not torch.cuda.is_available():
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported(including_emulation=False) else "16-mixed"


def precision_label(trainer: L.Trainer) -> str:
    """The precision a run trains in, as recorded in stage.json and logs (``fp8-mixed`` for the float8 plugin)."""
    return "fp8-mixed" if isinstance(trainer.precision_plugin, Float8MixedPrecision) else str(trainer.precision)


class MixedPrecisionMonitor(L.Callback):
    """Reports which precision a run trains in and watches its numerics.

    At fit start it logs the precision (:func:`precision_label`) to the console and the TensorBoard text
    tab (``StageHandoff`` records the same label in stage.json). Under ``16-mixed`` it logs the
    gradient scaler's scale as ``train/grad_scale`` every ``log_every_n_steps`` optimizer steps (a read
    of the scale syncs with the GPU, so not on every step). The global gradient norm is
    ``train/grad_norm``, logged by ``CausalLM`` on every step whether or not it clips.

    Args:
        log_every_n_steps: Optimizer steps between ``train/grad_scale`` points.
    """

    def __init__(self, log_every_n_steps: int = 50) -> None:
        self.log_every_n_steps = log_every_n_steps
        self.precision: str | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        torch.set_float32_matmul_precision("high")
        self.precision = precision_label(trainer)
        tf32 = torch.get_float32_matmul_precision()
        rank_zero_info(f"precision: {self.precision} (float32 matmuls: {tf32})")
        if not trainer.is_global_zero:
            return
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_text"):  # TensorBoard
            experiment.add_text("precision", f"`{self.precision}` (float32 matmul precision `{tf32}`)", 0)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is None or not scaler.is_enabled() or trainer.global_step % self.log_every_n_steps:
            return
        scale = scaler.get_scale()  # a host float: one sync every log_every_n_steps steps
        for logger in trainer.loggers:
            logger.log_metrics({"train/grad_scale": scale}, step=trainer.global_step)


def float8_filter(module: nn.Module, fqn: str) -> bool:
    """Which linears train in float8: not the output head (its error reaches the loss directly) and only
    those whose both dimensions are multiples of 16 (the float8 matmul's requirement)."""
    if not isinstance(module, nn.Linear) or fqn.split(".")[-1] in ("lm_head", "head", "output"):
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def convert_to_float8(model: nn.Module, recipe: str = "tensorwise") -> nn.Module:
    """Swap the linears :func:`float8_filter` picks for torchao's ``Float8Linear`` (in place; the weights
    stay the same ``Parameter`` objects, so an optimizer built before still holds them)."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        raise StagewiseError("FP8 training needs torchao: pip install torchao") from None
    config = Float8LinearConfig.from_recipe_name(recipe)
    return convert_to_float8_training(model, config=config, module_filter_fn=float8_filter)


class Float8MixedPrecision(MixedPrecision):
    """bf16 autocast with the linear layers' matmuls in float8 (torchao, dynamic scaling).

    Pass it as ``--trainer.plugins callbacks.precision.Float8MixedPrecision`` (and no
    ``--trainer.precision``). The output head stays in bf16. Needs a GPU with float8 tensor cores
    (H100/H200, compute capability ≥ 8.9) and ``torchao``.

    Args:
        recipe: torchao float8 scaling recipe: ``tensorwise`` (fastest), ``rowwise`` or
            ``rowwise_with_gw_hp`` (more accurate).
    """

    def __init__(self, recipe: str = "tensorwise") -> None:
        super().__init__(precision="bf16-mixed", device="cuda")
        self.recipe = recipe

    def convert_module(self, module: nn.Module) -> nn.Module:
        if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
            raise StagewiseError("FP8 training needs a GPU with float8 tensor cores (H100/H200/L40/RTX 40xx)")
        return convert_to_float8(module, self.recipe)
