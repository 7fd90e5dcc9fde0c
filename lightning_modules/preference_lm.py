"""``PreferenceLM``: preference tuning (DPO, or IPO) of a ``CausalLM`` from its parent stage, against a frozen
copy of the parent.

The conventions are those of DPO (Rafailov et al. 2023) as TRL's ``DPOTrainer`` computes it: an answer's
log-probability is the **sum** over its tokens of log p(token | everything before it), prompt excluded; the
implicit reward of an answer is ``beta * (log p_policy - log p_reference)``; the loss of a pair is
``-log sigmoid(reward_chosen - reward_rejected)``. IPO (Azar et al. 2023) uses the **mean** log-probability
per answer token and the loss ``(h - 1 / (2 * beta))**2``, ``h`` the same difference of log-ratios. The
optional SFT term (TRL's ``rpo_alpha``) adds ``sft_weight`` times the mean cross-entropy of the chosen answers.
DPO-Positive (Pal et al. 2024, "Smaug") subtracts ``dpop_lambda * max(0, log p_reference(chosen) - log
p_policy(chosen))`` from the difference of log-ratios inside the sigmoid: the loss also rises when the chosen
answer becomes less likely than under the reference, which plain DPO allows on pairs a few tokens apart.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics import MeanMetric

from datamodules.errors import StagewiseError
from datamodules.preference import PREFERENCE
from lightning_modules.causal_lm import CausalLM

METRICS = ("loss", "reward_margin", "reward_accuracy", "chosen_logp", "rejected_logp")
"""What ``PreferenceLM`` logs under ``train/preference/`` and ``val/preference/``."""


def answer_logps(token_logps: torch.Tensor, mask: torch.Tensor, mean: bool = False) -> torch.Tensor:
    """Per row, the sum (or with ``mean`` the mean) of ``token_logps`` [N, T] where ``mask`` is 1."""
    mask = mask.to(token_logps.dtype)
    total = (token_logps * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if mean else total


def check_loss(loss_type: str, dpop_lambda: float = 0.0) -> None:
    """Refuse a loss ``preference_loss`` does not compute (``PreferenceLM`` asks at construction, before training)."""
    if loss_type not in ("sigmoid", "ipo"):
        raise StagewiseError(f"unknown preference loss_type '{loss_type}'; choose sigmoid (DPO) or ipo")
    if dpop_lambda and loss_type != "sigmoid":
        raise StagewiseError(f"dpop_lambda is DPO-Positive's penalty, for loss_type sigmoid, not {loss_type}")


def preference_loss(
    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid", dpop_lambda: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pair: the loss, and the implicit rewards of the chosen and the rejected answer (detached).

    Args:
        policy_chosen: Log-probabilities [B] of the chosen answers under the model being trained.
        policy_rejected: The same for the rejected answers.
        reference_chosen: Log-probabilities [B] of the chosen answers under the frozen reference.
        reference_rejected: The same for the rejected answers.
        beta: DPO's inverse temperature (the strength of the pull towards the reference); IPO's tau.
        loss_type: ``sigmoid`` (DPO) or ``ipo``.
        dpop_lambda: DPO-Positive's weight of the chosen answer's fall below the reference (0: plain DPO;
            ``sigmoid`` only).
    """
    chosen_ratio, rejected_ratio = policy_chosen - reference_chosen, policy_rejected - reference_rejected
    h = chosen_ratio - rejected_ratio
    check_loss(loss_type, dpop_lambda)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * (h - dpop_lambda * (-chosen_ratio).clamp(min=0)))
    else:
        losses = (h - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


class PreferenceLM(CausalLM):
    """A ``CausalLM`` tuned on preference pairs (DPO or IPO), starting from and anchored to its parent.

    The parent is ``init_from`` (the tool stage's best checkpoint): its weights start the policy and, once
    more, make the **reference**, a frozen copy (no gradients, eval mode, never in the optimizer). The
    reference is not a registered submodule, so it is in no state dict: checkpoints hold the policy only,
    and a resumed run (``--ckpt_path last``) rebuilds the reference from ``init_from`` again. It follows the
    policy's device and dtype on first use (bf16-mixed: float32 weights under the same autocast as the
    policy). DDP never sees it (no gradients to reduce), so each rank holds its own copy; FSDP does not
    shard it either: under FSDP every rank holds the whole reference beside its shard of the policy.

    A batch holds B pairs as 2B rows (chosen rows first; ``datamodules.preference.collate_pairs``): the
    policy runs once over all of them, with gradients, and the reference once, without. Validation reports
    every earlier domain's held-out loss as plain cross-entropy (``CausalLM.validation_step``), so
    forgetting is measured as in the other stages, and, for the held-out pairs (the data module's
    ``preference`` domain), ``val/preference/{loss, reward_margin, reward_accuracy, chosen_logp,
    rejected_logp}`` (``loss`` without the SFT term). Training logs the same under ``train/preference/``;
    ``train/loss`` is the loss optimised (with the SFT term).

    Args:
        beta: Strength of the pull towards the reference: DPO's beta (0.1 as in the DPO paper and TRL;
            larger stays closer to the parent), IPO's tau.
        loss_type: ``sigmoid`` (DPO) or ``ipo`` (squared loss on length-normalised log-ratios, less prone to
            overfitting deterministic preferences).
        sft_weight: Weight of an added cross-entropy on the chosen answers (0 = pure DPO, TRL's ``rpo_alpha``
            otherwise); keeps the chosen answers' likelihood from falling while the margin grows. On the tests'
            tiny CPU stage, 1.0 kept the chosen calls' log-probability rising (-62 -> -35) where pure DPO let it
            fall (-62 -> -75), and ranked 9 of 11 held-out pairs right instead of 8.
        dpop_lambda: DPO-Positive's penalty on the chosen answers' log-probability falling below the reference's
            (0 = off; ``sigmoid`` only). Run 9's DPO stages on the GPU let it fall with the rejected ones' and
            lost exact calls; whether this keeps them has not been measured.
        lr: Peak learning rate (a fine-tuning of a trained model: far below a pretraining LR).
        weight_decay: AdamW weight decay (none: the reference anchors the weights).
        warmup_steps: Optimizer steps of linear LR warmup.
        **kwargs: The other arguments of ``CausalLM`` (``init_from`` is required: the parent and reference).
    """

    def __init__(self, beta: float = 0.1, loss_type: Literal["sigmoid", "ipo"] = "sigmoid", sft_weight: float = 1.0,
                 dpop_lambda: float = 0.0, lr: float = 5e-6, weight_decay: float = 0.0, warmup_steps: int = 20,
                 **kwargs: Any) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps, **kwargs)
        if beta <= 0 or sft_weight < 0 or dpop_lambda < 0:
            raise StagewiseError(f"need beta > 0, sft_weight >= 0 and dpop_lambda >= 0, got beta={beta}, "
                                 f"sft_weight={sft_weight}, dpop_lambda={dpop_lambda}")
        check_loss(loss_type, dpop_lambda)
        self.preference_metrics = nn.ModuleDict()  # name -> pair-weighted MeanMetric over a validation
        object.__setattr__(self, "reference", None)  # never a submodule (see the class docstring); set in configure_model

    def configure_model(self) -> None:
        """Build the policy as ``CausalLM`` does (loading ``init_from`` under a Trainer), then the frozen
        reference from the same weights; compile the preference loss with ``compile``."""
        if self.model is not None:
            return
        super().configure_model()
        if self._trainer is not None:  # without one (load_from_checkpoint, decoding copies) nothing trains
            if not self.hparams.init_from:
                raise StagewiseError("PreferenceLM needs --model.init_args.init_from: the parent checkpoint it starts "
                                     "from and keeps as its frozen reference")
            state = self.model.state_dict()
            with torch.device("cpu"):  # also when the strategy builds the policy on the meta device
                reference = self.build_model()
            reference.load_state_dict(state)
            object.__setattr__(self, "reference", reference.requires_grad_(False).eval())
        if self.compiles:
            self.preference_outputs = torch.compile(self.preference_outputs)

    def _reference_model(self) -> nn.Module:
        if self.reference is None:
            raise StagewiseError("PreferenceLM has no reference model: train or validate it under a Trainer, "
                                 "with init_from set")
        policy = next(self.model.parameters())
        ref = next(self.reference.parameters())
        if ref.device != self.device or ref.dtype != policy.dtype:
            self.reference.to(device=self.device, dtype=policy.dtype)
        return self.reference

    def preference_outputs(
        self, input_ids: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The loss to optimise (``loss``), the DPO/IPO part alone (``preference_loss``) and the batch means of
        the metrics, for 2B rows (B chosen, then their B rejected); with ``compile`` this is the compiled unit."""
        hp, pairs = self.hparams, input_ids.shape[0] // 2
        token_logps = -F.cross_entropy(self.model(input_ids).float().flatten(0, 1), targets.flatten(),
                                       reduction="none").view_as(targets)
        with torch.no_grad():
            ref_logits = self.reference(input_ids).float()
            ref_token_logps = -F.cross_entropy(ref_logits.flatten(0, 1), targets.flatten(),
                                               reduction="none").view_as(targets)
        mean = hp.loss_type == "ipo"
        policy, reference = answer_logps(token_logps, loss_mask, mean), answer_logps(ref_token_logps, loss_mask, mean)
        losses, chosen_rewards, rejected_rewards = preference_loss(
            policy[:pairs], policy[pairs:], reference[:pairs], reference[pairs:], hp.beta, hp.loss_type,
            hp.dpop_lambda)
        dpo = losses.mean()
        out = {"preference_loss": dpo, "reward_margin": (chosen_rewards - rejected_rewards).mean(),
               "reward_accuracy": (chosen_rewards > rejected_rewards).float().mean(),
               "chosen_logp": policy[:pairs].detach().mean(), "rejected_logp": policy[pairs:].detach().mean()}
        out["loss"] = dpo
        if hp.sft_weight:
            mask = loss_mask[:pairs].to(token_logps.dtype)
            out["sft_loss"] = -(token_logps[:pairs] * mask).sum() / mask.sum().clamp(min=1)
            out["loss"] = dpo + hp.sft_weight * out["sft_loss"]
        return out

    def _outputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self._reference_model()
        return self.preference_outputs(batch["input_ids"], batch["targets"], batch["loss_mask"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self._outputs(batch)
        pairs = batch["input_ids"].shape[0] // 2
        names = [*METRICS, "sft_loss"] if "sft_loss" in out else METRICS
        for name in names:
            self.log(f"train/preference/{name}", out["preference_loss" if name == "loss" else name], batch_size=pairs)
        return self.account_step(out["loss"], batch["input_ids"])

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._domain(dataloader_idx) != PREFERENCE:
            return super().validation_step(batch, batch_idx, dataloader_idx)
        out = self._outputs(batch)
        for name in METRICS:
            if name not in self.preference_metrics:
                self.preference_metrics[name] = MeanMetric().to(self.device)
            self.preference_metrics[name].update(out["preference_loss" if name == "loss" else name],
                                                 weight=batch["input_ids"].shape[0] // 2)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        for name, metric in self.preference_metrics.items():
            if metric.update_count:
                self.log(f"val/{PREFERENCE}/{name}", metric.compute(), add_dataloader_idx=False)
                metric.reset()
