"""Greedy text samples in TensorBoard's text tab, so a run's progress can be read, not only plotted."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

from callbacks.every_n import EveryNValidations
from lightning_modules.decoding import decoding_model, decoding_threads, greedy_continuations
from lightning_modules.tool_eval import load_heldout_examples, stop_token_ids

DEFAULT_PROMPTS = {
    "language": "The purpose of this chapter is to explain how the",
    "code": "def read_config(path):\n    \"\"\"Read a configuration file and return a dict.\"\"\"\n",
}


class TextSamples(L.Callback):
    """Write greedy continuations of a few prompts to TensorBoard (``samples/<name>``) at validation end.

    Acts in ``on_validation_end`` (every ``every_n_validations``-th validation, not the sanity check).
    Rank 0 generates (a few short prompts in one batch; under FSDP from the gathered weights, see
    ``decoding.decoding_model``) and writes. Each entry shows the prompt and its continuation at the current
    optimizer step.

    Args:
        prompts: Name -> prompt text. Default: a prose opening (``language``), a Python ``def`` opening
            (``code``) and, when the tool corpus is prepared, the request of the first held-out tool
            example (``tools``, rendered with the chat template).
        max_new_tokens: Tokens generated per prompt.
        every_n_validations: Write samples at every n-th validation.
        data_dir: Where the tokenizer and the tool corpus are (used when the datamodule does not say).
    """

    def __init__(self, prompts: dict[str, str] | None = None, max_new_tokens: int = 48,
                 every_n_validations: int = 1, data_dir: str = "data") -> None:
        self.prompts = prompts
        self.max_new_tokens = max_new_tokens
        self._every = EveryNValidations(every_n_validations)
        self.data_dir = data_dir
        self._tokenizer = None
        self._prompt_ids: dict[str, list[int]] | None = None

    def _prepare(self, trainer: L.Trainer) -> None:
        from datamodules.tokenizer import load_tokenizer

        data_dir = getattr(trainer.datamodule, "data_dir", None) or self.data_dir  # the run's data first
        tok_dir = getattr(trainer.datamodule, "tokenizer_dir", None) or Path(data_dir) / "tokenizer"
        self._tokenizer = tok = load_tokenizer(tok_dir)
        if self.prompts is not None:
            self._prompt_ids = {k: tok.encode(v, add_special_tokens=False) for k, v in self.prompts.items()}
            return
        self._prompt_ids = {k: tok.encode(v, add_special_tokens=False) for k, v in DEFAULT_PROMPTS.items()}
        if (Path(data_dir) / "tools" / "manifest.json").exists():
            examples = load_heldout_examples(data_dir, "val", limit=1, tokenizer=tok)
            if examples:
                self._prompt_ids["tools"] = examples[0]["prompt_ids"]

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._every.due(trainer):
            return
        if self._prompt_ids is None:
            self._prepare(trainer)
        model = decoding_model(trainer, pl_module)  # every rank: collective under FSDP; None off rank 0
        if model is None:
            return
        tok, names = self._tokenizer, list(self._prompt_ids)
        prompts = [self._prompt_ids[name] for name in names]
        with trainer.precision_plugin.forward_context(), decoding_threads(model):
            generated = greedy_continuations(model, prompts, self.max_new_tokens, stop_token_ids(tok))
        texts = {name: _markdown(tok.decode(ids, skip_special_tokens=False), tok.decode(new, skip_special_tokens=False),
                                 trainer.global_step, len(new))
                 for name, ids, new in zip(names, prompts, generated)}
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                for name, text in texts.items():
                    logger.experiment.add_text(f"samples/{name}", text, global_step=trainer.global_step)

    def state_dict(self) -> dict:
        return {"validations": self._every.count}

    def load_state_dict(self, state_dict: dict) -> None:
        self._every.count = int(state_dict.get("validations", 0))


def _indent(text: str) -> str:
    # An indented block is shown verbatim by TensorBoard's markdown (whitespace and <|tokens|> intact).
    return "\n".join("    " + line for line in text.splitlines() or [""])


def _markdown(prompt: str, continuation: str, step: int, n_tokens: int) -> str:
    tail = prompt if len(prompt) <= 600 else "…" + prompt[-600:]
    return (f"**prompt**\n\n{_indent(tail)}\n\n**greedy continuation** (step {step}, {n_tokens} tokens)\n\n"
            f"{_indent(continuation)}")
