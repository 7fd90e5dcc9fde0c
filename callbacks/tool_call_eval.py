"""Score the model's tool calls on held-out requests during the tool stage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from callbacks.every_n import EveryNValidations
from datamodules.metric_names import test_metric, tool_samples, tool_score
from datamodules.stage_record import update_stage_record
from lightning_modules.decoding import decoding_model
from lightning_modules.tool_eval import evaluate_tool_calls, heldout_groups, load_heldout_examples

SCORES = ("json_valid", "name_accuracy", "call_accuracy")
GROUPS = ("seen", "unseen")  # held-out requests to services trained on (``split``), and to services never seen


class ToolCallEval(L.Callback):
    """Generate the assistant's tool call for held-out requests and log how many are right.

    When it acts:

    - ``on_fit_start``: reads the held-out examples (``<data_dir>/tools/<split>`` shards, see
      ``lightning_modules.tool_eval.load_heldout_examples``), so a missing tool corpus fails at once: the
      *seen* group from ``split`` (requests to services the corpus trains on) and, where the corpus holds
      one, the *unseen* group from its ``unseen`` split (services no training example calls).
    - ``on_validation_end`` (every ``every_n_validations``-th validation, not the sanity check): rank 0
      greedily generates a call for each example (batched, KV cache, stops at ``<|/tool_call|>``) and scores it;
      the scores are broadcast so every rank logs the same ``tools/<group>/json_valid``,
      ``tools/<group>/name_accuracy`` and ``tools/<group>/call_accuracy`` (also put in
      ``trainer.callback_metrics``, so a ModelCheckpoint may monitor them); a few (request, generated,
      expected) samples per group go to TensorBoard's text tab.
    - ``on_fit_end`` (rank 0): writes ``tools`` into ``<models_dir>/<stage>/stage.json``: the seen scores of
      the validation with the best monitored loss (the best checkpoint's) and each group's under ``seen`` /
      ``unseen``, ``final`` (the last validation's) and ``history`` (every evaluation's step, tokens and scores).
    - ``on_test_epoch_end`` (``stagewise test``): scores the *seen* group from the ``test`` split (all of it,
      or ``test_examples``) and the *unseen* group, logged as ``test/tools/<group>/<score>`` with the test losses.

    Generation runs on rank 0 only; under FSDP from the gathered full weights (``decoding.decoding_model``).

    Args:
        data_dir: Where ``stagewise prepare`` wrote the shards and tokenizer, when the data module has no ``data_dir``.
        num_examples: Held-out examples scored at each evaluation, per group (spread evenly over each split:
            shards hold sources and services one after another).
        max_new_tokens: Longest answer generated per example.
        every_n_validations: Evaluate at every n-th validation (generation costs more than a loss).
        stage: The stage whose ``stage.json`` gets the ``tools`` section.
        models_dir: Where stage records live.
        split: The held-out split the seen group comes from (``val`` or ``test``).
        monitor: The metric whose lowest value marks the best checkpoint; default: the monitor of the
            Trainer's first ModelCheckpoint that has one.
        batch_size: Requests decoded together (left-padded, KV cache; default 64 on a GPU, 16 elsewhere);
            the scores do not depend on it.
        max_prompt_tokens: Keep only the last this many tokens of each request (its text and the last tool
            schemas); default: the data module's ``seq_len`` less ``max_new_tokens``, i.e. about what the
            model sees in training (decoding time grows with the prompt).
        test_examples: Examples scored per group by ``stagewise test`` (default: every one of the test split
            and of the unseen split).
        constrained: Also decode each request with the function's name among its offered tools and the
            arguments' keys among that tool's parameters (``lightning_modules.tool_constraint``; a second
            decoding), logged as ``tools/<group>/constrained/<score>`` and recorded under ``constrained``
            beside the free scores of the same validation.
    """

    def __init__(self, data_dir: str = "data", num_examples: int = 100, max_new_tokens: int = 128,
                 every_n_validations: int = 1, stage: str = "tools", models_dir: str = "models",
                 split: str = "val", monitor: str | None = None, batch_size: int | None = None,
                 max_prompt_tokens: int | None = None, test_examples: int | None = None,
                 constrained: bool = False) -> None:
        self.data_dir = data_dir
        self.num_examples = num_examples
        self.max_new_tokens = max_new_tokens
        self._every = EveryNValidations(every_n_validations)
        self.stage = stage
        self.models_dir = models_dir
        self.split = split
        self.monitor = monitor
        self.batch_size = batch_size
        self.max_prompt_tokens = max_prompt_tokens
        self.test_examples = test_examples
        self.constrained = constrained
        self.history: list[dict[str, Any]] = []
        self._examples: dict[str, list[dict]] | None = None
        self._tokenizer = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self._examples = self._load(trainer, self.split, self.num_examples)

    def _load(self, trainer: L.Trainer, split: str, limit: int | None) -> dict[str, list[dict]]:
        """The held-out examples of each group, the seen group from ``split``."""
        from datamodules.tokenizer import load_tokenizer

        data_dir = getattr(trainer.datamodule, "data_dir", None) or self.data_dir  # the run's data first
        if self._tokenizer is None:
            tok_dir = getattr(trainer.datamodule, "tokenizer_dir", None) or Path(data_dir) / "tokenizer"
            self._tokenizer = load_tokenizer(tok_dir)
        return {group: load_heldout_examples(data_dir, group_split, limit, tokenizer=self._tokenizer)
                for group, group_split in heldout_groups(data_dir, split).items()}

    def _score(self, trainer: L.Trainer, pl_module: L.LightningModule, examples: dict[str, list[dict]] | None,
               constrain: bool = False) -> tuple[dict[str, dict], dict[str, dict]]:
        """Rank 0 decodes and scores each group (``examples`` are read there; None on the other ranks), freely or
        ``constrain``-ed; returns the scores every rank receives and rank 0's full results (with samples)."""
        results: dict[str, dict] = {}
        model = decoding_model(trainer, pl_module)  # every rank: collective under FSDP; None off rank 0
        if model is not None:
            with trainer.precision_plugin.forward_context():
                for group, group_examples in examples.items():
                    results[group] = evaluate_tool_calls(model, self._tokenizer, group_examples, self.max_new_tokens,
                                                         batch_size=self.batch_size,
                                                         max_prompt_tokens=self._prompt_tokens(trainer),
                                                         constrain=constrain)
        scores = trainer.strategy.broadcast({g: {k: r[k] for k in SCORES} for g, r in results.items()}, src=0)
        return scores, results

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._every.due(trainer):
            return
        if trainer.is_global_zero and self._examples is None:
            self._examples = self._load(trainer, self.split, self.num_examples)
        scores, results = self._score(trainer, pl_module, self._examples)
        monitor = self._monitor(trainer)
        entry = {"step": trainer.global_step, "tokens": int(getattr(pl_module, "total_tokens", trainer.global_step)),
                 **scores}
        flat = {tool_score(k, g): v for g, group in scores.items() for k, v in group.items()}
        if self.constrained:
            entry["constrained"], _ = self._score(trainer, pl_module, self._examples, constrain=True)
            flat.update({tool_score(k, f"{g}/constrained"): v for g, group in entry["constrained"].items()
                         for k, v in group.items()})
        if monitor in trainer.callback_metrics:
            entry[monitor] = float(trainer.callback_metrics[monitor])
        self.history.append(entry)
        for name, value in flat.items():
            trainer.callback_metrics[name] = torch.tensor(value)
        for logger in trainer.loggers:
            logger.log_metrics(flat, step=trainer.global_step)
            if isinstance(logger, TensorBoardLogger):
                for group, result in results.items():
                    logger.experiment.add_text(tool_samples(group), _samples_markdown(result),
                                               global_step=trainer.global_step)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        examples = self._load(trainer, "test", self.test_examples) if trainer.is_global_zero else None
        scores, _ = self._score(trainer, pl_module, examples)
        for group, values in scores.items():
            for key, value in values.items():
                pl_module.log(test_metric(tool_score(key, group)), float(value))

    def _prompt_tokens(self, trainer: L.Trainer) -> int | None:
        seq_len = getattr(trainer.datamodule, "seq_len", None)
        if self.max_prompt_tokens is not None or not seq_len:
            return self.max_prompt_tokens
        return max(1, seq_len - self.max_new_tokens)

    def _monitor(self, trainer: L.Trainer) -> str | None:
        if self.monitor:
            return self.monitor
        return next((cb.monitor for cb in trainer.checkpoint_callbacks if cb.monitor), None)

    def summary(self, trainer: L.Trainer) -> dict[str, Any]:
        """The ``tools`` section of ``stage.json``."""
        monitor = self._monitor(trainer)
        ranked = [e for e in self.history if monitor and monitor in e]
        at_best = min(ranked, key=lambda e: e[monitor]) if ranked else self.history[-1]
        return {
            **at_best["seen"],  # the seen scores, flat, as the report reads them
            **{group: at_best[group] for group in GROUPS if group in at_best},
            **({"constrained": at_best["constrained"]} if "constrained" in at_best else {}),
            "step": at_best["step"],
            "tokens": at_best["tokens"],
            "split": self.split,
            "n": {g: len(e) for g, e in self._examples.items()} if self._examples is not None else self.num_examples,
            "max_new_tokens": self.max_new_tokens,
            "final": self.history[-1],
            "history": self.history,
        }

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and self.history:
            update_stage_record(self.models_dir, self.stage, {"tools": self.summary(trainer)})

    def state_dict(self) -> dict[str, Any]:
        return {"validations": self._every.count, "history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._every.count = int(state_dict.get("validations", 0))
        self.history = list(state_dict.get("history", []))


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines() or [""])


def _samples_markdown(result: dict) -> str:
    parts = [f"json_valid {result['json_valid']:.3f} · name {result['name_accuracy']:.3f} · "
             f"call {result['call_accuracy']:.3f} (n={result['n']})"]
    for s in result["samples"]:
        parts += [f"**{'right' if s['correct'] else 'wrong'}** — request (tail):", _indent(s["prompt_tail"]),
                  "generated:", _indent(s["generated"]), "expected:", _indent(json.dumps(s["expected"]))]
    return "\n\n".join(parts)
