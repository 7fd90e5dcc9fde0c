"""``CausalLM``: the LightningModule that trains a :class:`Transformer` on next-token prediction.

Override points for experiments (see ``experiments/examples/``): :meth:`CausalLM.build_model` (the
network), :meth:`CausalLM.compute_loss` (the training loss), :meth:`CausalLM.build_optimizer`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Literal

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics import MeanMetric

from datamodules.errors import StagewiseError, TokenizerMismatchError
from datamodules.metric_names import (
    TRAIN_GRAD_NORM, TRAIN_LOSS, TRAIN_LR, TRAIN_SKIPPED_STEPS, TRAIN_TOKENS, test_metric, val_loss, val_ppl,
)
from datamodules.stage_record import read_checkpoint, stage_record_for_checkpoint
from lightning_modules.decoding import generate
from lightning_modules.hf_llama import (
    FIXED, FREE, config_fields, is_hf_dir, load_hf_state, our_state_dict, read_hf_config,
)
from lightning_modules.transformer import ARCHITECTURES, TransformerConfig


def lr_factor(
    step: int, total: int, warmup: int, schedule: str, min_ratio: float = 0.1, decay_fraction: float = 0.2
) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` of ``total``: linear warmup over ``warmup``
    steps, then ``constant``, ``cosine`` down to ``min_ratio`` at ``total``, or ``wsd`` (flat, then a
    linear decay to ``min_ratio`` over the last ``decay_fraction`` of the steps)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay_start = max(warmup, total - round(decay_fraction * total))
        if step < decay_start:
            return 1.0
        return 1 - (1 - min_ratio) * min(1.0, (step - decay_start) / max(1, total - decay_start))
    raise StagewiseError(f"unknown schedule '{schedule}'; choose one of: cosine, constant, wsd")


def optimizer_state_source(init_from: str | Path) -> Path:
    """The ``last.ckpt`` whose AdamW state a stage started from ``init_from`` carries over (``carry_optimizer``).

    It is the parent's full training state at the end of its training: the path its ``stage.json`` records
    under ``last_checkpoint``, else ``<runs_dir>/<experiment>/<stage>/checkpoints/last.ckpt`` of the stage
    that record describes (its config's ``stage:`` section; relative paths are relative to the working
    directory, as the stage wrote them). A parent without a record, or whose ``last.ckpt`` is gone, is refused.
    """
    init_from = Path(init_from)
    if is_hf_dir(init_from):
        raise StagewiseError(
            f"carry_optimizer: init_from {init_from} is a transformers model directory, which holds no optimizer "
            "state; start with a fresh optimizer (--model.init_args.carry_optimizer false)")
    record = stage_record_for_checkpoint(init_from) if init_from.is_file() else None
    if record is None:
        raise StagewiseError(
            f"carry_optimizer: init_from {init_from} has no stage record (<models_dir>/<experiment>/<stage>/stage.json), "
            "so where its optimizer state was saved is unknown; start from a stage trained with `stagewise fit`, "
            "or with a fresh optimizer (--model.init_args.carry_optimizer false)")
    if record.get("last_checkpoint"):
        candidates = [Path(record["last_checkpoint"])]
    else:
        stage = (record.get("config") or {}).get("stage") or {}
        name = stage.get("name") or record.get("stage")
        experiment = stage.get("experiment") or record.get("experiment") or "default"
        candidates = [Path(stage.get("runs_dir") or "runs") / experiment / name / "checkpoints" / "last.ckpt"] if name else []
    for path in candidates:
        if path.is_file():
            return path
    where = ", ".join(map(str, candidates)) or "(the record names no stage)"
    raise StagewiseError(
        f"carry_optimizer: the optimizer state of init_from {init_from} is not there: no {where}. It is the "
        "parent's last.ckpt, removed with its run directory; re-run the parent stage, or start with a fresh "
        "optimizer (--model.init_args.carry_optimizer false)")


def carry_optimizer_state(optimizer: torch.optim.Optimizer, source: str | Path) -> dict[str, Any]:
    """Load the AdamW moments and step counts of checkpoint ``source`` (its first optimizer) into ``optimizer``,
    keeping ``optimizer``'s own hyperparameters (LR, betas, weight decay): the schedule stays the new stage's.
    Parameters pair up in order, group by group; a checkpoint of another model shape is refused. Returns what
    ``stage.json`` records as ``optimizer_from``: the path and the optimizer step of that state."""
    hint = "re-run the parent stage, or start with a fresh optimizer (--model.init_args.carry_optimizer false)"
    ckpt = read_checkpoint(source, hint, prefix="carry_optimizer: ")
    saved = (ckpt.get("optimizer_states") or [None])[0]
    if not saved:
        raise StagewiseError(f"carry_optimizer: {source} holds no optimizer state (a weights-only checkpoint); {hint}")
    ours = optimizer.state_dict()["param_groups"]
    sizes = [len(g["params"]) for g in saved["param_groups"]], [len(g["params"]) for g in ours]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    ids = [i for group in saved["param_groups"] for i in group["params"]]
    shapes = [tuple(saved["state"][i]["exp_avg"].shape) if "exp_avg" in saved["state"].get(i, {}) else tuple(p.shape)
              for p, i in zip(params, ids)]
    if sizes[0] != sizes[1] or shapes != [tuple(p.shape) for p in params]:
        raise StagewiseError(
            f"carry_optimizer: the optimizer state in {source} belongs to another model shape (parameter groups "
            f"of {sizes[0]} tensors there, {sizes[1]} here, or other tensor shapes); {hint}")
    # The saved parameter ids with our groups' settings: torch maps ids to our parameters in order and keeps
    # the settings given here, so no LR, weight decay or scheduler `initial_lr` of the parent's comes along.
    groups = [{**group, "params": theirs["params"]} for group, theirs in zip(ours, saved["param_groups"])]
    optimizer.load_state_dict({"state": saved["state"], "param_groups": groups})
    return {"path": str(source), "optimizer_step": ckpt.get("global_step")}


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor | None = None, per_window: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token cross-entropy (float32) and the number of tokens it averages over; with a
    ``loss_mask`` only positions where it is 1 count. ``per_window``: the mean over windows of each window's
    own mean (windows with no position in the mask left out), so every window weighs the same however many of
    its tokens count (a tool window's answer of ~50 tokens as much as a replayed text window's 1,024)."""
    losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    if loss_mask is None:
        return losses.mean(), torch.tensor(losses.numel(), device=losses.device, dtype=torch.float32)
    mask = loss_mask.to(losses.dtype)
    n = mask.sum()
    if per_window:
        counts = mask.sum(dim=-1)
        means = (losses.view_as(mask) * mask).sum(dim=-1) / counts.clamp(min=1)
        has = (counts > 0).to(losses.dtype)
        return (means * has).sum() / has.sum().clamp(min=1), n
    return (losses * mask.flatten()).sum() / n.clamp(min=1), n


class CompiledFullBatches:
    """``loss_fn(input_ids, targets, loss_mask)`` compiled for full batches, eager for a shorter batch of a kind
    already seen (same window length, with or without a mask): a held-out loader's last, partial batch. Compiling
    for it too costs a recompile (seconds under inductor, in every stage, at the first validation) to save
    milliseconds once per validation."""

    def __init__(self, loss_fn: Callable[..., Any]) -> None:
        self.eager, self.compiled = loss_fn, torch.compile(loss_fn)
        self.full: dict[tuple, int] = {}  # kind -> the largest batch seen

    def __call__(self, input_ids: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor | None = None):
        kind, rows = (tuple(input_ids.shape[1:]), loss_mask is None), input_ids.shape[0]
        if rows < self.full.setdefault(kind, rows):
            return self.eager(input_ids, targets, loss_mask)
        self.full[kind] = rows
        return self.compiled(input_ids, targets, loss_mask)


def shape_mismatch(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str | None:
    """How the tensors of ``state`` (a checkpoint's) differ from ``expected`` (this model's) in names or shapes,
    in words; None when they agree."""
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        return f"this model's tensors {missing[:3]} are not in it, and its tensors {unexpected[:3]} are not in this model"
    for name, tensor in expected.items():
        if state[name].shape != tensor.shape:
            return f"tensor '{name}' is {tuple(state[name].shape)} there but {tuple(tensor.shape)} here"
    return None


def trained_shape(hparams: dict[str, Any]) -> str:
    """The model settings a checkpoint's ``hyper_parameters`` were trained with, in words."""
    return (f"size '{hparams.get('size')}', architecture '{hparams.get('architecture')}' and model_overrides "
            f"{hparams.get('model_overrides') or {}}")


def model_config(size: str | None, vocab_size: int, model_overrides: dict[str, Any] | None = None,
                 init_from: str | None = None) -> TransformerConfig:
    """The transformer's shape: preset ``size`` (``small`` when None) with ``model_overrides``; with ``init_from``
    a transformers Llama directory and no ``size``, that model's ``config.json``.

    Against a transformers model, a preset or override that disagrees on a field that fixes the weights'
    meaning (width, layers, heads, ffn, tying, RoPE base, norm epsilon) is refused, naming the field;
    ``max_seq_len``, ``dropout`` and ``init_std`` may differ. Its vocabulary may be smaller than
    ``vocab_size`` (an adopted tokenizer with our special tokens added), never larger.
    """
    overrides = dict(model_overrides or {})
    if not is_hf_dir(init_from):
        return TransformerConfig.from_preset(size or "small", vocab_size=vocab_size, **overrides)
    hf = read_hf_config(init_from)
    theirs = config_fields(hf)
    where = f"init_from: {Path(init_from) / 'config.json'}"
    hf_name = {ours: name for name, ours in {**FIXED, **FREE}.items()}
    if hf.vocab_size > vocab_size:
        raise StagewiseError(
            f"{where} has vocab_size {hf.vocab_size} but this stage's tokenizer has {vocab_size} ids: prepare the "
            f"data with that model's tokenizer (`tokenizer.from_model: {init_from}` in the data config)")
    given = TransformerConfig.from_preset(size, vocab_size=vocab_size, **overrides) if size else None
    for field in FIXED.values():
        ours = getattr(given, field) if given else overrides.get(field, theirs[field])
        if ours != theirs[field]:
            origin = (f"size '{size}'" + (" with model_overrides" if field in overrides else "")) if given else \
                "model_overrides"
            raise StagewiseError(
                f"{where} has {hf_name[field]} {theirs[field]!r} but {origin} gives {field} {ours!r}; leave the "
                "preset out (--model.init_args.size null) to take the shape from config.json, and override "
                "only max_seq_len, dropout or init_std")
    return TransformerConfig(**{**theirs, **overrides, "vocab_size": vocab_size})


class CausalLM(L.LightningModule):
    """A decoder-only language model trained on next-token prediction, one stage at a time.

    Start a stage from another stage's weights with ``init_from`` (weights only: fresh optimizer and
    schedule), or from a transformers ``LlamaForCausalLM`` directory; resume an interrupted run with the
    Trainer's ``ckpt_path`` instead.

    Args:
        size: Model size preset: tiny (≈1M), small (≈30M), base (≈124M), medium (≈350M), large (≈760M),
            xl (≈1.1B). Default: ``small``, or, when ``init_from`` is a transformers directory, that model's
            shape from its ``config.json`` (a preset given with one must agree with it).
        architecture: Model family; only ``dense`` (a Llama-style transformer) exists.
        model_overrides: Fields of ``TransformerConfig`` that replace the preset's, e.g.
            ``{n_layers: 4, max_seq_len: 1024, tie_embeddings: true}``.
        vocab_size: Vocabulary size; the CLI links it from the data's tokenizer.
        tokenizer_sha256: sha256 of the tokenizer.json the data was made with; linked from the data and
            checked against ``init_from``'s.
        chat_template_sha256: sha256 of the data tokenizer's chat template, linked from the data: with
            ``tokenizer_sha256`` the tokenizer identity the checkpoint records (``stagewise export`` finds
            the tokenizer by it).
        lr: Peak learning rate.
        weight_decay: AdamW weight decay, applied to matrices only (not to embeddings or norms).
        betas: AdamW betas.
        warmup_steps: Optimizer steps of linear LR warmup.
        schedule: LR after warmup: ``cosine`` (down to ``min_lr_ratio``), ``constant``, or ``wsd``
            (warmup-stable-decay: flat, then linear decay over the last ``decay_fraction``).
        decay_fraction: Fraction of all steps spent decaying in the ``wsd`` schedule.
        min_lr_ratio: Final LR as a fraction of ``lr`` (cosine and wsd).
        max_steps: Optimizer steps the schedule spans; default: the Trainer's estimated stepping batches.
        init_from: Where this stage's starting weights come from: a checkpoint (``.ckpt``), or a transformers
            ``LlamaForCausalLM`` directory (``config.json`` + safetensors, e.g. a ``stagewise export``). For a
            directory, the data's tokenizer must be that model's (``tokenizer.from_model`` in the data config);
            embedding and output rows for ids the model lacks start as the mean of its rows.
        carry_optimizer: Start the AdamW moments (and step counts) from the parent's, not from zero: with
            ``init_from`` a stage's checkpoint, they come from that stage's ``last.ckpt``
            (:func:`optimizer_state_source`); the LR schedule is still this stage's own (warmup included).
            ``stage.json`` records where they came from (``optimizer_from``). A resumed run takes its optimizer
            from its own ``last.ckpt`` as always.
        loss_weighting: How the training loss averages a batch with a loss mask: ``tokens`` (every counted
            token alike) or ``windows`` (each window's mean, then the mean over windows: in a replay mixture
            beside a tool corpus, the mixture's window fractions are then the loss's fractions, where by tokens
            the replayed text, every token counted, would outweigh the tool answers many times over).
            Validation is per domain and by tokens either way.
        compile: ``torch.compile`` the forward pass together with the loss (state-dict keys stay unchanged);
            ``None``: where the Trainer runs on CUDA (compilation costs ~30 s a process and pays on a GPU).
        fused_adamw: Use the fused AdamW kernel; ``None``: on CUDA unless fp16 loss scaling is on.
        max_bad_steps: A step whose loss or gradient norm is not finite is skipped (weights and optimizer
            state unchanged; it still counts for the LR schedule and ``max_steps``) and counted in
            ``train/skipped_steps``; after this many in a row the stage stops with an error, leaving the
            last checkpoint as it was. Under fp16 loss scaling, overflowing gradients are the scaler's to skip.
    """

    def __init__(
        self,
        size: str | None = None,
        architecture: str = "dense",
        model_overrides: dict[str, Any] | None = None,
        vocab_size: int = 8192,
        tokenizer_sha256: str | None = None,
        chat_template_sha256: str | None = None,
        lr: float = 3e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        schedule: Literal["cosine", "constant", "wsd"] = "cosine",
        decay_fraction: float = 0.2,
        min_lr_ratio: float = 0.1,
        max_steps: int | None = None,
        init_from: str | None = None,
        carry_optimizer: bool = False,
        loss_weighting: Literal["tokens", "windows"] = "tokens",
        compile: bool | None = None,
        fused_adamw: bool | None = None,
        max_bad_steps: int = 10,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if architecture not in ARCHITECTURES:
            raise StagewiseError(
                f"unknown architecture '{architecture}'; choose one of: {', '.join(ARCHITECTURES)}"
            )
        if carry_optimizer and not init_from:
            raise StagewiseError("carry_optimizer needs init_from (the parent whose optimizer state is carried over); "
                                 "set --model.init_args.init_from or --stage.parent, or leave carry_optimizer false")
        # Build the config now so a bad size or override fails when the CLI parses, not mid-setup.
        self.config = model_config(size, vocab_size, model_overrides, init_from)
        if is_hf_dir(init_from):  # the shape in the hyperparameters, so a checkpoint rebuilds without that directory
            self.hparams["model_overrides"] = {f: v for f, v in vars(self.config).items() if f != "vocab_size"}
        self.model: nn.Module | None = None
        self.val_metrics = nn.ModuleDict()  # domain -> token-weighted MeanMetric, created on first use
        self.tokens_seen = 0  # tokens trained on in this stage, all ranks together
        self.optimizer_steps = 0  # optimizer steps in this stage
        self.parent_tokens = 0  # total tokens of the init_from checkpoint's lineage
        self.parent_optimizer_steps = 0
        self._skipped_steps = 0  # optimizer steps skipped for a non-finite loss or gradient, in this stage
        self._bad_steps_in_a_row = 0
        self._bad_counts: torch.Tensor | None = None  # on-device [skipped, in a row, steps] since the last host read
        self._last_checked_step = 0  # the optimizer step of the newest on-device verdict
        self._step_loss: torch.Tensor | None = None
        self.optimizer_from: dict[str, Any] | None = None  # where carry_optimizer took the moments from
        self._init_from_step: int | None = None  # the optimizer step of init_from's weights

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped for a non-finite loss or gradient in this stage (reads the device)."""
        self._settle_bad_counts()
        return self._skipped_steps

    @property
    def bad_steps_in_a_row(self) -> int:
        """Non-finite steps in a row up to the last one (reads the device)."""
        self._settle_bad_counts()
        return self._bad_steps_in_a_row

    @property
    def compiles(self) -> bool:
        """Whether the training and validation losses are compiled: ``compile``, or by default under a Trainer on
        CUDA."""
        if self.hparams.get("compile") is not None:
            return bool(self.hparams.compile)
        return self._trainer is not None and self.trainer.strategy.root_device.type == "cuda"

    @property
    def total_tokens(self) -> int:
        """Tokens trained on by this model's whole lineage: ``parent_tokens + tokens_seen``."""
        return self.parent_tokens + self.tokens_seen

    # ----------------------------------------------------------------------------------------- model
    def build_model(self) -> nn.Module:
        """The network; override to train a changed transformer (called once, from ``configure_model``)."""
        return ARCHITECTURES[self.hparams.architecture](self.config)

    def configure_model(self) -> None:
        """Build the model once; under a Trainer, load ``init_from``'s weights; then compile if asked."""
        if self.model is not None:
            return
        self.model = self.build_model()
        # Each parameter's rank as built: FSDP (use_orig_params) later turns the same Parameter objects into
        # flat 1-D shards, which would otherwise all look like norms to param_groups (no weight decay at all).
        self._built_ndim = {id(p): p.dim() for p in self.model.parameters()}
        # N of the MFU formula, counted before sharding (FSDP's shards would count this rank's part only)
        if hasattr(self.model, "num_parameters"):
            self.non_embedding_parameters = self.model.num_parameters(non_embedding=True)
        # Without a Trainer (``load_from_checkpoint``) the weights come from that checkpoint instead.
        if self.hparams.init_from and self._trainer is not None:
            self.load_init_from(self.hparams.init_from)
        if self.compiles:
            # Model and loss in one graph: the float32 logits are never materialised (one H100, base preset,
            # vocab 32768, B=32, T=1024, bf16: 407K tokens/s and 15.7 GB vs 328K and 25.2 GB with
            # ``self.model.compile()`` alone). Modules stay unwrapped, so state-dict keys are unchanged.
            self.training_loss = torch.compile(self.training_loss)
            self.validation_loss = CompiledFullBatches(self.validation_loss)

    @classmethod
    def from_state(cls, hparams: dict[str, Any], state_dict: dict[str, torch.Tensor], **overrides: Any) -> "CausalLM":
        """A module built from saved init arguments (``hparams``, e.g. a checkpoint's ``hyper_parameters``;
        the ``_``-prefixed entries LightningCLI adds are not init arguments) with ``overrides`` replacing some,
        its model built and ``state_dict`` (the whole module's, ``model.*`` keys) loaded strictly."""
        init = {k: v for k, v in hparams.items() if not k.startswith("_")}
        module = cls(**{**init, **overrides})
        module.configure_model()
        module.load_state_dict(state_dict, strict=True)
        return module

    def load_init_from(self, path: str | Path) -> None:
        """Load the model weights of checkpoint ``path`` (no optimizer, schedule or step) and record its
        lineage's token count in ``parent_tokens``; or those of a transformers Llama directory (the inverse
        of ``stagewise export``; its lineage is unknown, so the count starts at 0)."""
        path = Path(path)
        if is_hf_dir(path):
            state = our_state_dict(load_hf_state(path), self.config, f"init_from: {path}")
            meta = any(p.is_meta for p in self.model.parameters())  # sharded strategies build on meta
            self.model.load_state_dict(state, strict=True, assign=meta)
            return
        hint = ("train the previous stage first or pass --model.init_from <checkpoint or transformers model "
                "directory>")
        ckpt = read_checkpoint(path, hint, prefix="init_from: ")
        theirs = (ckpt.get("hyper_parameters") or {}).get("tokenizer_sha256")
        ours = self.hparams.tokenizer_sha256
        if theirs and ours and theirs != ours:
            raise TokenizerMismatchError(
                f"init_from: {path} was trained with tokenizer {theirs[:12]}… but this stage's data uses "
                f"{ours[:12]}…; prepare the data with the tokenizer of the first stage"
            )
        state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
        problem = shape_mismatch(self.model.state_dict(), state)
        if problem:
            raise StagewiseError(
                f"init_from: {path} has another model shape: {problem}; it was trained with "
                f"{trained_shape(ckpt.get('hyper_parameters') or {})}: start this stage with the same ones "
                "(--model.init_args.size / .model_overrides), or from a checkpoint of this model's shape"
            )
        meta = any(p.is_meta for p in self.model.parameters())  # sharded strategies build on meta
        self.model.load_state_dict(state, strict=True, assign=meta)
        lineage = ckpt.get("stagewise", {})
        self._init_from_step = ckpt.get("global_step")
        self.parent_tokens = lineage.get("parent_tokens", 0) + lineage.get("tokens_seen", 0)
        self.parent_optimizer_steps = lineage.get("parent_optimizer_steps", 0) + lineage.get("optimizer_steps", 0)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)

    # -------------------------------------------------------------------------------------- training
    def compute_loss(
        self, logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The training loss (override to change it): mean next-token cross-entropy in float32, over the
        positions where ``loss_mask`` is 1 when there is one. Validation always reports plain
        cross-entropy, so runs with different training losses stay comparable."""
        return cross_entropy(logits, targets, loss_mask, per_window=self.hparams.get("loss_weighting") == "windows")[0]

    def training_loss(
        self, input_ids: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Forward and :meth:`compute_loss`; with ``compile`` this is the compiled unit."""
        return self.compute_loss(self.model(input_ids), targets, loss_mask)

    def validation_loss(
        self, input_ids: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Plain cross-entropy and its token count (see :func:`cross_entropy`); compiled with ``compile``."""
        return cross_entropy(self.model(input_ids), targets, loss_mask)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.training_loss(batch["input_ids"], batch["targets"], batch.get("loss_mask"))
        return self.account_step(loss, batch["input_ids"])

    def account_step(self, loss: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Count a training step's tokens and log ``train/loss``, ``train/tokens`` and ``train/lr``; returns
        ``loss`` (what ``training_step`` returns). Subclasses with another loss call it too."""
        self._step_loss = loss.detach()
        # Host-side count (numel is known without a device sync); each rank sees an equal-sized batch.
        self.tokens_seen += input_ids.numel() * self.trainer.world_size
        bs = input_ids.shape[0]
        self.log(TRAIN_LOSS, loss, batch_size=bs)
        self._show_loss(loss, bs)
        # CPU tensors: a Python float would be copied to the GPU, a host sync on every step.
        self.log(TRAIN_TOKENS, torch.tensor(float(self.tokens_seen)), batch_size=bs)
        self.log(TRAIN_LR, torch.tensor(self.trainer.optimizers[0].param_groups[0]["lr"]), batch_size=bs)
        return loss

    def _show_loss(self, loss: torch.Tensor, batch_size: int) -> None:
        """Put the loss in the progress bar without a host sync. Lightning turns every ``prog_bar`` value
        into a Python float after each batch (``.item()``: the CPU waits for the GPU, every step); here the
        loss is copied to pinned host memory asynchronously and the bar shows the newest copy that has
        landed (on CUDA usually the previous step's)."""
        if loss.device.type != "cuda":
            self.log("loss", loss.detach(), prog_bar=True, logger=False, batch_size=batch_size)
            return
        if getattr(self, "_loss_copy", None) is None:
            self._loss_copy = (torch.zeros((), pin_memory=True), torch.cuda.Event(), torch.tensor(float("nan")))
        host, ready, shown = self._loss_copy
        if ready.query():  # the previous copy has landed: publish it, start the next one
            shown.copy_(host)
            host.copy_(loss.detach().float(), non_blocking=True)
            ready.record()
        self.log("loss", shown, prog_bar=True, logger=False, batch_size=batch_size)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Random draws (dropout) depend on (seed, epoch, batch, rank) only, so a resumed run draws what an
        # uninterrupted one would have, without saving generator states.
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        torch.manual_seed(hash((seed, self.trainer.current_epoch, batch_idx, self.trainer.global_rank)) % 2**63)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.optimizer_steps = self.trainer.global_step

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """Step, then free the gradients at once. Lightning zeroes them only after the next step's forward
        pass, so a step's gradients (float32, the size of the model) stayed allocated through the next
        forward, on top of its activations: 4 GiB more peak memory than a plain loop for ``xl``."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        optimizer.zero_grad(set_to_none=True)

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip with ``torch.nn.utils`` ourselves and log ``train/grad_norm`` (before clipping).

        Lightning's mixed-precision plugin refuses any clipping with fused AdamW (it cannot know the
        gradients are already unscaled); under bf16 they are, so clipping here is correct and lets the
        fastest optimizer run. With fp16 loss scaling a fused optimizer unscales inside ``step``, too
        late to clip, so that combination is an error.
        """
        fused = any(group.get("fused") for group in optimizer.param_groups)
        if fused and getattr(self.trainer.precision_plugin, "scaler", None) is not None and gradient_clip_val:
            raise StagewiseError(
                "gradient clipping with fused AdamW needs bf16-mixed or 32-bit precision, not 16-mixed; "
                "set --model.fused_adamw false or --trainer.precision bf16-mixed"
            )
        params = [p for p in self.parameters() if p.grad is not None]
        if gradient_clip_algorithm == "value" and gradient_clip_val:
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            gradient_clip_val = None
        root = self.trainer.strategy.model
        if hasattr(root, "clip_grad_norm_"):
            # FSDP: each rank holds a shard of every gradient; the root module computes the global norm.
            norm = root.clip_grad_norm_(gradient_clip_val or float("inf"))
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, gradient_clip_val or float("inf"))
            if hasattr(norm, "full_tensor"):  # DTensor gradients (ModelParallelStrategy / FSDP2)
                norm = norm.full_tensor()
        if not self.skip_non_finite_step(norm):
            self.log(TRAIN_GRAD_NORM, norm)
        pending = self._bad_counts  # on the device path: count without a host sync
        skipped = torch.tensor(float(self._skipped_steps)) if pending is None else pending[0] + self._skipped_steps
        self.log(TRAIN_SKIPPED_STEPS, skipped)

    def skip_non_finite_step(self, grad_norm: torch.Tensor) -> bool:
        """Skip this optimizer step when the loss or ``grad_norm`` is not finite; stop the stage after
        ``max_bad_steps`` in a row. Ranks agree (one rank's bad step would make their weights differ).

        With fused AdamW the verdict never leaves the device: the optimizer's ``found_inf`` (as under a
        gradient scaler) skips its update, moments and step count, and the counts are read every
        ``log_every_n_steps`` steps and whenever ``skipped_steps`` / ``bad_steps_in_a_row`` are read (before
        each ``last.ckpt``), so a stop may come that many steps late. Other optimizers cannot skip on the
        device: the verdict is read every step (a host sync) and the gradients are dropped.
        Returns whether the step is skipped, when that is known now (always False on the device path)."""
        scaled = getattr(self.trainer.precision_plugin, "scaler", None) is not None
        loss = self._step_loss if self._step_loss is not None else torch.zeros((), device=grad_norm.device)
        bad = (~torch.isfinite(loss.to(grad_norm.device)) | (~torch.isfinite(grad_norm) & (not scaled))).float()
        if self.trainer.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        self._last_checked_step = self.trainer.global_step
        c = self._bad_counts if self._bad_counts is not None else torch.zeros(3, device=bad.device)
        self._bad_counts = torch.stack([c[0] + bad, (c[1] + 1) * bad, c[2] + 1])  # skipped, in a row, steps
        optimizer = self.trainer.optimizers[0]
        if not scaled and all(g.get("fused") for g in optimizer.param_groups):
            optimizer.found_inf = bad
            if (self.trainer.global_step + 1) % max(1, self.trainer.log_every_n_steps) == 0:
                self._settle_bad_counts()
            return False
        skip = bool(bad)
        if skip:
            for p in self.parameters():
                p.grad = None
        self._settle_bad_counts()
        return skip

    def _settle_bad_counts(self) -> None:
        """Fold the on-device counts of :meth:`skip_non_finite_step` into the host's (one host sync); warn
        about skipped steps and stop the stage after ``max_bad_steps`` in a row."""
        counts, self._bad_counts = getattr(self, "_bad_counts", None), None
        if counts is None:
            return
        skipped, in_a_row, steps = (int(x) for x in counts.tolist())
        if skipped:
            rank_zero_warn(f"skipped {skipped} optimizer step(s) up to step {self._last_checked_step}: "
                           "non-finite loss or gradient norm")
        self._skipped_steps += skipped
        # A streak that began before the last read continues only if every step since was bad.
        self._bad_steps_in_a_row = in_a_row + (self._bad_steps_in_a_row if in_a_row == steps else 0)
        if self._bad_steps_in_a_row >= self.hparams.max_bad_steps:
            raise StagewiseError(
                f"stopped at optimizer step {self._last_checked_step}: {self._bad_steps_in_a_row} steps in a row "
                "had a non-finite loss or gradient and were skipped. The last checkpoint "
                "(last.ckpt and the stage's best) was not overwritten by these steps. Lower the learning rate, "
                "check the data around this step, or resume with --ckpt_path last and a larger "
                "--model.init_args.max_bad_steps"
            )

    # ------------------------------------------------------------------------------------ validation
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        loss, n_tokens = self.validation_loss(batch["input_ids"], batch["targets"], batch.get("loss_mask"))
        domain = self._domain(dataloader_idx)
        if domain not in self.val_metrics:
            self.val_metrics[domain] = MeanMetric().to(self.device)
        self.val_metrics[domain].update(loss, weight=n_tokens)  # token-weighted over the epoch

    def on_validation_epoch_end(self) -> None:
        self._log_heldout_losses()
        # The x of these points: optimizer steps taken, the step every callback logs this validation at
        # (Lightning would use its count of batches that stepped, one less inside a fit's validation).
        self.log("step", float(self.trainer.global_step), add_dataloader_idx=False)

    def _log_heldout_losses(self, rename: Callable[[str], str] = str) -> None:
        """Log each domain's token-weighted held-out loss and perplexity of the epoch (``val/<domain>/...``,
        or what ``rename`` makes of those names)."""
        for domain, metric in self.val_metrics.items():
            if metric.update_count == 0:
                continue
            loss = metric.compute()  # reduced across ranks by torchmetrics
            metric.reset()
            self.log(rename(val_loss(domain)), loss, add_dataloader_idx=False)
            self.log(rename(val_ppl(domain)), torch.exp(loss), add_dataloader_idx=False)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        """A test split's batch, scored as validation scores its val split (``stagewise test``)."""
        self.validation_step(batch, batch_idx, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        """``test/<domain>/loss`` and ``test/<domain>/ppl`` of every domain tested."""
        self._log_heldout_losses(test_metric)

    def _domain(self, dataloader_idx: int) -> str:
        domains = getattr(getattr(self._trainer, "datamodule", None), "val_domains", None) or []
        return domains[dataloader_idx] if dataloader_idx < len(domains) else f"domain{dataloader_idx}"

    # ------------------------------------------------------------------------------------- optimizer
    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: weight decay on matrices (≥2-D as built, also once FSDP has flattened them into
        shards) except embeddings; none on norms and embeddings."""
        embeddings = {id(m.weight) for m in self.model.modules() if isinstance(m, nn.Embedding)}
        built = getattr(self, "_built_ndim", {})
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (decay if built.get(id(p), p.dim()) >= 2 and id(p) not in embeddings else no_decay).append(p)
        return [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def build_optimizer(self) -> torch.optim.Optimizer:
        """AdamW over :meth:`param_groups`; override to train with another optimizer."""
        fused = self.hparams.fused_adamw
        if fused is None:
            fused = self.device.type == "cuda" and getattr(self.trainer.precision_plugin, "scaler", None) is None
        return torch.optim.AdamW(
            self.param_groups(), lr=self.hparams.lr, betas=tuple(self.hparams.betas), fused=fused or None
        )

    def schedule_steps(self) -> int:
        """Optimizer steps the LR schedule spans: ``max_steps`` or the Trainer's estimate."""
        if self.hparams.max_steps:
            return self.hparams.max_steps
        steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(steps):
            raise StagewiseError("cannot size the LR schedule: set --trainer.max_steps or --model.max_steps")
        return int(steps)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.build_optimizer()
        if self.hparams.get("carry_optimizer") and self._trainer is not None and self.trainer.ckpt_path is None:
            self.optimizer_from = carry_optimizer_state(optimizer, optimizer_state_source(self.hparams.init_from))
            step = self.optimizer_from["optimizer_step"]
            if self._init_from_step is not None and step != self._init_from_step:
                rank_zero_warn(f"carry_optimizer: the moments come from optimizer step {step} of the parent, its "
                               f"weights (init_from) from step {self._init_from_step}")
        total, hp = self.schedule_steps(), self.hparams
        if hp.warmup_steps >= total:
            rank_zero_warn(f"warmup_steps ({hp.warmup_steps}) is not below the {total} optimizer steps of this run: the "
                           f"LR never leaves its warm-up (it ends at {lr_factor(total - 1, total, hp.warmup_steps, hp.schedule):.0%} "
                           "of model.lr). Lower --model.init_args.warmup_steps or raise --trainer.max_steps")
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: lr_factor(step, total, hp.warmup_steps, hp.schedule, hp.min_lr_ratio, hp.decay_fraction),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["stagewise"] = {
            "tokens_seen": self.tokens_seen,
            # The Trainer's count: callbacks that save at a batch end run before on_train_batch_end updates ours.
            "optimizer_steps": self.trainer.global_step if self._trainer is not None else self.optimizer_steps,
            "parent_tokens": self.parent_tokens,
            "parent_optimizer_steps": self.parent_optimizer_steps,
            "skipped_steps": self.skipped_steps,
            "bad_steps_in_a_row": self.bad_steps_in_a_row,
        }
        checkpoint["optimizer_from"] = self.optimizer_from  # a resumed run still records where its moments began

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.optimizer_from = checkpoint.get("optimizer_from")
        for key, value in checkpoint.get("stagewise", {}).items():
            # the non-finite step counts are read-only properties over private fields
            setattr(self, f"_{key}" if key in ("skipped_steps", "bad_steps_in_a_row") else key, value)

    # ------------------------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | list[int] | None = None,
        attention_mask: torch.Tensor | None = None, pad_token_id: int | None = None,
        temperature: float = 0.0, top_k: int | None = None, generator: torch.Generator | None = None,
        static: bool | None = None, logits_processor=None,
    ) -> torch.Tensor:
        """Greedy (or sampled) continuation of prompts ``input_ids`` [B, T], all rows decoded together with a
        KV cache (:func:`lightning_modules.decoding.generate`, where the arguments are documented)."""
        return generate(self, input_ids, max_new_tokens, eos_token_id, attention_mask, pad_token_id,
                        temperature, top_k, generator, static, logits_processor)
