"""`stagewise evaluate --ckpt CKPT [-c data-or-stage.yaml]`: held-out loss per domain and tool-call scores.

The losses come from the same code as training's validation (``CorpusDataModule`` val loaders and
``CausalLM.validation_step`` under a ``Trainer.validate``), over every prepared corpus, so they are
directly comparable with the ``val/<domain>/loss`` curves. The tool-call scores come from
``lightning_modules.tool_eval`` on the tool corpus's held-out examples: ``seen`` (its val split: services
it trains on) and ``unseen`` (its unseen split: services no training example calls), where it has one.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import yaml

from datamodules.datamodule import CorpusDataModule
from datamodules.errors import StagewiseError, TokenizerMismatchError
from datamodules.metric_names import val_loss
from datamodules.stage_record import read_checkpoint as _read_checkpoint
from lightning_modules.causal_lm import CausalLM
from lightning_modules.tool_eval import DECODINGS, evaluate_tool_calls, heldout_groups, load_heldout_examples

KNOWN_ORDER = ("language", "code", "tools")


def _settings_from_config(path: str) -> dict[str, Any]:
    """data_dir (and seq_len, batch_size, val_max_windows, val_seq_len, domains) from a stage or a data config."""
    if not Path(path).exists():
        raise StagewiseError(f"config '{path}' does not exist")
    cfg = yaml.safe_load(Path(path).read_text()) or {}
    if isinstance(cfg.get("data"), dict):  # a stage config: data.init_args
        data = cfg["data"].get("init_args", cfg["data"])
        return {k: data[k] for k in ("data_dir", "seq_len", "batch_size", "val_max_windows", "val_seq_len") if k in data}
    if "corpora" in cfg or "data_dir" in cfg:  # a data config
        settings: dict[str, Any] = {"data_dir": cfg.get("data_dir", "data")}
        if isinstance(cfg.get("corpora"), dict):
            settings["domains"] = list(cfg["corpora"])
        return settings
    raise StagewiseError(f"{path} is neither a stage config (with `data:`) nor a data config (with `corpora:`)")


def prepared_domains(data_dir: str | Path) -> list[str]:
    """Every corpus prepared under ``data_dir`` (language, code, tools first, then by name)."""
    names = [p.parent.name for p in Path(data_dir).glob("*/manifest.json")]
    return sorted(names, key=lambda n: (KNOWN_ORDER.index(n) if n in KNOWN_ORDER else len(KNOWN_ORDER), n))


def read_checkpoint(ckpt: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint's contents, memory-mapped; StagewiseError if it is missing or not a checkpoint."""
    return _read_checkpoint(ckpt, "train a stage first or pass --ckpt <file.ckpt> written by `stagewise fit`")


def load_model(ckpt: str | Path, map_location: str = "cpu", saved: dict[str, Any] | None = None):
    """The ``CausalLM`` (or subclass) of a checkpoint, weights loaded, in eval mode (``saved``: the checkpoint's
    contents if already read with :func:`read_checkpoint`)."""
    hp = (saved if saved is not None else read_checkpoint(ckpt)).get("hyper_parameters") or {}
    class_path = hp.get("_class_path")
    if class_path:  # a subclass saved by LightningCLI: import it so Lightning may build it
        importlib.import_module(class_path.rsplit(".", 1)[0])
    model = CausalLM.load_from_checkpoint(ckpt, map_location=map_location)
    return model.eval()


def evaluate(
    ckpt: str,
    config: str | None = None,
    data_dir: str | None = None,
    domains: list[str] | None = None,
    limit: int | None = None,
    out: str | None = None,
    seq_len: int | None = None,
    batch_size: int | None = None,
    val_max_windows: int | None = None,
    max_new_tokens: int = 128,
    decode_batch_size: int | None = None,
    accelerator: str = "auto",
    precision: str = "32-true",
    constrained: bool = False,
    strict: bool = False,
) -> dict[str, Any]:
    """Held-out loss of a checkpoint on every prepared domain, and its tool-call scores.

    Settings come from, in increasing priority: the checkpoint's own data settings, ``config``, the flags.

    Args:
        ckpt: The checkpoint to evaluate (e.g. ``models/default/tools_model_best.ckpt``).
        config: A stage config (its ``data:`` section) or a data config (its ``data_dir`` and corpora).
        data_dir: Where ``stagewise prepare`` wrote the corpora (default ``data``).
        domains: The corpora to evaluate (default: every corpus prepared under ``data_dir``).
        limit: Score at most this many held-out tool examples per group (default: all of the val and unseen splits).
        out: Also write the results as JSON to this file.
        seq_len: Tokens per evaluation window of every domain (default: the training run's, and its
            ``val_seq_len`` for the text domains, so the losses are the run's validation losses).
        batch_size: Windows per batch (default: the run's validation batch, ``val_batch_size``).
        val_max_windows: At most this many windows per domain (default: the whole val split).
        max_new_tokens: Longest tool call generated.
        decode_batch_size: Tool prompts decoded together (the scores do not depend on it; default 64 on a GPU, 16
            elsewhere).
        accelerator: Lightning accelerator (``auto``, ``cpu``, ``gpu``).
        precision: Lightning precision (``32-true``, ``bf16-mixed``...).
        constrained: Also score the tool calls decoded with constrained names and argument keys (the offered
            tools, their parameters: ``lightning_modules.tool_constraint``), under ``tools_constrained``.
        strict: Also score them decoded with the constraint's closing rules as well (every required parameter
            named, the call's JSON closed before it ends), under ``tools_strict``.

    Returns:
        ``{"checkpoint", "data_dir", "losses": {domain: loss}, "tools": {"seen": scores, "unseen": scores} or None}``
        (and ``"tools_constrained"`` of the same shape with ``constrained``, ``"tools_strict"`` with ``strict``).
    """
    import lightning as L

    from datamodules.tokenizer import load_tokenizer  # transformers: imported when used

    saved = read_checkpoint(ckpt)
    # A CorpusDataModule's state_dict (its settings) is stored under its class name.
    data_state = next((v for v in saved.values() if isinstance(v, dict) and "seq_len" in v and "corpus" in v), {})
    settings = {k: v for k, v in data_state.items()
                if k in ("data_dir", "seq_len", "batch_size", "val_max_windows", "val_seq_len")}
    if data_state.get("val_batch_size"):  # the stage's validation batch: scoring is validation
        settings["batch_size"] = data_state["val_batch_size"]
    if config:
        settings.update(_settings_from_config(config))
    flags = {"data_dir": data_dir, "domains": domains, "seq_len": seq_len, "batch_size": batch_size,
             "val_max_windows": val_max_windows}
    if seq_len is not None:  # one window length asked for: every domain at it
        settings.pop("val_seq_len", None)
    settings.update({k: v for k, v in flags.items() if v is not None})
    root = Path(settings.get("data_dir", "data"))
    names = settings.get("domains") or prepared_domains(root)
    if not names:
        raise StagewiseError(f"no prepared corpora under {root}/; run `stagewise prepare -c configs/data/demo.yaml`")

    model = load_model(ckpt, saved=saved)
    del saved
    dm = CorpusDataModule(corpus=names[0], val_domains=names, data_dir=str(root),
                          seq_len=min(settings.get("seq_len", 512), model.config.max_seq_len),
                          batch_size=settings.get("batch_size", 8), val_max_windows=settings.get("val_max_windows"),
                          val_seq_len=settings.get("val_seq_len") and min(settings["val_seq_len"], model.config.max_seq_len))
    theirs = model.hparams.get("tokenizer_sha256")
    if theirs and theirs != dm.tokenizer_sha256:
        raise TokenizerMismatchError(
            f"{ckpt} was trained with tokenizer {theirs[:12]}… but the data in {root}/ uses "
            f"{dm.tokenizer_sha256[:12]}…; evaluate on data prepared with the checkpoint's tokenizer"
        )
    trainer = L.Trainer(accelerator=accelerator, devices=1, precision=precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer.validate(model, datamodule=dm, verbose=False)[0]
    losses = {d: float(metrics[val_loss(d)]) for d in names if val_loss(d) in metrics}
    # the strategy's teardown put the model back on the CPU: decode where it validated (two GPU sessions
    # decoded 800 prompts on the host's CPU, for over 5 minutes each, before this line)
    model.to(trainer.strategy.root_device)

    # the decodings scored: free, then each constrained one asked for
    asked = {"tools": True, "tools_constrained": constrained, "tools_strict": strict}
    decodings = {kind: constrain for kind, constrain in DECODINGS.items() if asked[kind]}
    scored: dict[str, dict | None] = dict.fromkeys(decodings)
    if "tools" in names:
        tok = load_tokenizer(dm.tokenizer_dir)
        scored = {kind: {} for kind in decodings}
        for group, split in heldout_groups(root, "val").items():
            examples = load_heldout_examples(root, split, limit, tokenizer=tok)
            for kind, constrain in decodings.items():
                with trainer.precision_plugin.forward_context():
                    # prompts cut to the training window, as the model saw them (and decoding time grows with them)
                    scored[kind][group] = evaluate_tool_calls(model, tok, examples, max_new_tokens=max_new_tokens,
                                                              batch_size=decode_batch_size,
                                                              max_prompt_tokens=max(1, dm.seq_len - max_new_tokens),
                                                              constrain=constrain)
    result = {"checkpoint": str(ckpt), "data_dir": str(root), "seq_len": dm.seq_len, "val_seq_len": dm.val_seq_len,
              "losses": losses, **scored}
    _print(result)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _print(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result['checkpoint']} (held-out val, seq_len {result['seq_len']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for domain, loss in result["losses"].items():
        table.add_row(f"{domain} loss", f"{loss:.4f}")
    for kind in DECODINGS:
        for group, scores in (result.get(kind) or {}).items():
            for key in ("json_valid", "name_accuracy", "call_accuracy"):
                table.add_row(f"{kind}/{group}/{key}", f"{scores[key]:.3f}")
            table.add_row(f"{kind}/{group} examples", str(scores["n"]))
            wrong = ", ".join(f"{k} {v}" for k, v in (scores.get("errors") or {}).items() if v)
            table.add_row(f"{kind}/{group} wrong calls", wrong or "none")
    Console().print(table)


def main(args: list[str] | None = None) -> None:
    """Entry point of ``stagewise evaluate --ckpt CKPT [-c CONFIG] [--data_dir data] [--limit N] [--out FILE]``."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="stagewise evaluate", description=evaluate.__doc__.splitlines()[0])
    parser.add_function_arguments(evaluate, skip={"config"}, as_group=False)
    parser.add_argument("-c", "--config", type=str | None, default=None,
                        help="a stage config (its data: section) or a data config (data_dir, corpora)")
    cfg = parser.parse_args(args)
    evaluate(**{k: v for k, v in cfg.as_dict().items() if k != "__path__"})
