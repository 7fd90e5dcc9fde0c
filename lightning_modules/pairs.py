"""``stagewise pairs --parent CKPT``: preference pairs for DPO from the parent tool model's own mistakes.

For each training request of the prepared tool corpus (``<data_dir>/tools/train.jsonl``, the examples the
shards were rendered from) the parent answers greedily (batched, KV cache: ``tool_eval.predict_calls``, on
a GPU or the CPU). The **chosen** answer is the reference call; the **rejected** answer is the parent's own
call where it is a wrong one (``rejected_from: model``), and, where the parent gets it right or writes no
parseable call, a corrupted reference call: another function among the offered tools with the same
arguments (``wrong_function``), one argument's value changed (``wrong_argument``) or one argument left out
(``missing_argument``), chosen by a seeded draw per request. Held-out requests (``val.jsonl``) make the
validation pairs the same way. The pairs go to ``<data_dir>/preference/<sha12>/`` (see
``datamodules.preference``), keyed by the parent file's sha256; ``--tag`` keeps another recipe of pairs of
the same parent beside them. With ``--temperature`` above 0 the parent's answers to the training requests are
sampled instead (seeded): a greedy parent is right on most requests it trained on, so most of its pairs are
corruptions, while its samples are wrong more often, in the ways it is wrong (on-policy rejected answers).

    stagewise pairs --parent models/demo/tools_model_best.ckpt --data_dir data
    stagewise pairs --parent models/gpu/tools_model_best.ckpt --data_dir data --temperature 1.0 --tag t1
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric
from rich.console import Console
from rich.table import Table

from callbacks.precision import resolve_precision
from datamodules.errors import StagewiseError, TokenizerMismatchError
from datamodules.preference import pairs_dir
from datamodules.shards import atomic_path, read_manifest, write_manifest
from datamodules.stage_record import file_sha256, read_checkpoint
from datamodules.tokenizer import load_tokenizer
from datamodules.tool_examples import prepared_examples
from lightning_modules.evaluate import load_model
from lightning_modules.tool_eval import predict_calls, score_calls, turns_equal

console = Console(stderr=True)
if not console.is_terminal:  # logs and CI: keep the table readable instead of 80 columns
    console.width = 160
SPLITS = {"train": "train", "val": "val"}  # pairs split -> tool corpus split


# --------------------------------------------------------------------------------------------- corruptions
def _function(tool: dict) -> dict:
    """A tool's function object, flat (``{"name", "parameters"}``) or OpenAI-wrapped (``{"function": {...}}``)."""
    return tool.get("function", tool) if isinstance(tool.get("function"), dict) else tool


def _changed(value: Any, schema: dict, rng: random.Random) -> Any:
    """A plausible wrong value of the same kind: another enum member, the other boolean, a number off by
    one, a string cut short, a list without its last item."""
    others = [v for v in schema.get("enum", []) if v != value]
    if others:
        return rng.choice(others)
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + rng.choice((-1, 1))
    if isinstance(value, str):
        return value[:-1] if len(value) > 1 else value + "s"
    if isinstance(value, list):
        return value[:-1] if value else [""]
    if isinstance(value, dict):
        return {} if value else {"": ""}
    return ""


def corrupt_call(call: dict, tools: list[dict], rng: random.Random) -> tuple[dict, str] | None:
    """A wrong version of ``call`` and how it was made (``wrong_function``, ``wrong_argument`` or
    ``missing_argument``, drawn with ``rng`` among those that apply); None when none applies (a call without
    arguments among tools of one function)."""
    functions = {f.get("name"): f for f in map(_function, tools)}
    others = [name for name in functions if name != call["name"]]
    arguments = dict(call.get("arguments") or {})
    kinds = (["wrong_function"] if others else []) + (["wrong_argument", "missing_argument"] if arguments else [])
    if not kinds:
        return None
    kind = rng.choice(kinds)
    if kind == "wrong_function":
        return {"name": rng.choice(others), "arguments": arguments}, kind
    key = rng.choice(sorted(arguments))
    if kind == "missing_argument":
        del arguments[key]
    else:
        schema = ((functions.get(call["name"]) or {}).get("parameters") or {}).get("properties", {}).get(key) or {}
        arguments[key] = _changed(arguments[key], schema, rng)
    return {"name": call["name"], "arguments": arguments}, kind


def make_pair(example: dict, generated: str, predicted: list[dict] | dict | None, rng: random.Random) -> dict | None:
    """The pair of one request: chosen = its reference calls, rejected = the parent's wrong turn (its calls as
    parsed; a dict is a turn of one call), else the reference turn with its first call corrupted."""
    chosen = example["tool_calls"]
    predicted = [predicted] if isinstance(predicted, dict) else predicted
    if predicted is not None and not turns_equal(predicted, chosen):
        rejected, source = list(predicted), "model"
    else:
        corrupted = corrupt_call(chosen[0], example.get("tools") or [], rng)
        if corrupted is None:
            return None
        wrong, source = corrupted
        rejected = [wrong, *chosen[1:]]
    context = {k: v for k, v in example.items() if k != "tool_calls"}
    return {**context, "chosen": chosen, "rejected": rejected, "rejected_from": source, "generated": generated}


# --------------------------------------------------------------------------------------------- the command
def pairs(
    parent: str,
    data_dir: str = "data",
    corpus: str = "tools",
    limit: int | None = None,
    val_limit: int | None = 200,
    max_new_tokens: int = 128,
    seq_len: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    temperature: float = 0.0,
    tag: str | None = None,
    accelerator: str = "auto",
    precision: str = "auto",
    overwrite: bool = False,
) -> Path:
    """Write preference pairs from the parent checkpoint's own wrong calls on the tool corpus's requests.

    Args:
        parent: The checkpoint to decode with, the parent of the preference stage (e.g.
            ``models/demo/tools_model_best.ckpt``); its sha256 names the output directory.
        data_dir: Where ``stagewise prepare`` wrote the corpora; pairs go to ``<data_dir>/preference/<sha12>/``.
        corpus: The prepared tool corpus whose requests are answered.
        limit: Training requests to answer (the first ones of the train split; default: all).
        val_limit: Held-out requests to answer for the validation pairs (the first ones of the val split;
            default 200; None: all).
        max_new_tokens: Longest answer generated.
        seq_len: The training window: prompts are cut to its last ``seq_len - max_new_tokens`` tokens, as
            ``ToolCallEval`` does. Default: the parent's training ``seq_len`` (from its checkpoint).
        batch_size: Requests decoded together (the answers do not depend on it; default 64 on a GPU, 16 elsewhere).
        seed: Seed of the corruptions (one draw per request) and of the sampled answers.
        temperature: 0 answers the training requests greedily; above 0 samples their answers at this
            temperature (the held-out requests are answered greedily either way, so the validation pairs
            stay those of the parent's own best guesses).
        tag: Write to ``<data_dir>/preference/<sha12>-<tag>/`` (the preference stage's ``data.pairs_tag``),
            beside the parent's other pair sets.
        accelerator: Lightning accelerator to decode on (``auto``, ``cpu``, ``gpu``).
        precision: Lightning precision (``auto``: bf16-mixed on GPUs with bf16, 32-true on CPU).
        overwrite: Replace pairs of this parent made with other settings (without it that is refused).

    Returns:
        The pairs directory.
    """
    start = time.perf_counter()
    saved = read_checkpoint(parent, "train the tool stage first or pass --parent <file.ckpt> written by `stagewise fit`",
                            prefix="--parent: ")
    sha = file_sha256(parent)
    corpus_dir = Path(data_dir) / corpus
    tools_manifest = read_manifest(corpus_dir)
    theirs, ours = (saved.get("hyper_parameters") or {}).get("tokenizer_sha256"), tools_manifest.get("tokenizer_sha256")
    if theirs and ours and theirs != ours:
        raise TokenizerMismatchError(f"--parent {parent} was trained with tokenizer {theirs[:12]}… but {corpus_dir} uses "
                                     f"{ours[:12]}…; make pairs on data prepared with the parent's tokenizer")
    if seq_len is None:  # a CorpusDataModule stores its settings under its class name
        seq_len = next((v["seq_len"] for v in saved.values() if isinstance(v, dict) and "seq_len" in v), 512)
    settings = {"corpus": corpus, "corpus_key": tools_manifest.get("key"), "limit": limit, "val_limit": val_limit,
                "max_new_tokens": max_new_tokens, "seq_len": seq_len, "seed": seed}
    if temperature:  # absent at 0: pairs made before the option stay up to date
        settings["temperature"] = temperature
    out = pairs_dir(data_dir, sha, tag)
    if (out / "manifest.json").is_file():
        existing = read_manifest(out)
        if existing.get("settings") == settings and all((out / f"{s}.jsonl").is_file() for s in SPLITS):
            console.print(f"[green]pairs up to date[/] in {out}/ (parent {parent}, sha256 {sha[:12]}…)")
            return out
        if not overwrite:
            raise StagewiseError(f"{out} already holds pairs of {parent} made with other settings "
                                 f"({existing.get('settings')}); pass --overwrite to replace them")
        (out / "manifest.json").unlink()  # no manifest while the files change: a crash leaves "no pairs"

    precision = resolve_precision(precision, accelerator)
    fabric = Fabric(accelerator=accelerator, devices=1, precision=precision)
    model = load_model(parent, saved=saved).to(fabric.device)
    del saved
    tok = load_tokenizer(tools_manifest.get("tokenizer_dir") or Path(data_dir) / "tokenizer")
    max_prompt_tokens = max(1, seq_len - max_new_tokens)
    counts: dict[str, dict] = {}
    for name, split in SPLITS.items():
        n = limit if name == "train" else val_limit
        examples = prepared_examples(corpus_dir, split)[:n]
        sampled = {"temperature": temperature, "generator": torch.Generator(fabric.device).manual_seed(seed)} \
            if temperature > 0 and name == "train" else {}
        with fabric.autocast():
            predictions = predict_calls(model, tok, examples, max_new_tokens, batch_size, max_prompt_tokens,
                                        **sampled)
        made = []
        for i, (example, (_, text, call)) in enumerate(zip(examples, predictions)):
            pair = make_pair(example, text, call, random.Random(f"{seed}/{split}/{i}"))
            if pair is not None:
                made.append(pair)
        scores = score_calls([c for _, _, c in predictions], [e["tool_calls"] for e in examples])
        counts[name] = {"requests": len(examples), "pairs": len(made), "skipped": len(examples) - len(made),
                        "rejected_from": dict(Counter(p["rejected_from"] for p in made)),
                        "parent_scores": {k: v for k, v in scores.items() if k != "n"},
                        "decoding": f"sampled at temperature {temperature:g}" if sampled else "greedy"}
        with atomic_path(out / f"{name}.jsonl") as tmp:
            tmp.write_text("".join(_json_line(p) for p in made), encoding="utf-8")
    write_manifest(out, {
        "parent": {"path": str(parent), "sha256": sha}, "tokenizer_sha256": ours, "settings": settings,
        "splits": counts, "device": str(fabric.device), "precision": str(precision),
        "seconds": round(time.perf_counter() - start, 1)})
    _print(out, counts, time.perf_counter() - start)
    return out


def _json_line(pair: dict) -> str:
    return json.dumps(pair, ensure_ascii=False) + "\n"


def _print(out: Path, counts: dict[str, dict], seconds: float) -> None:
    table = Table(title=f"preference pairs in {out}/ ({seconds:.1f}s)")
    kinds = ("wrong_function", "wrong_argument", "missing_argument")
    for col in ("split", "requests", "pairs", "rejected: parent's call", "rejected: corrupted (function / "
                "argument / missing)", "parent's call accuracy (its decoding)"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for name, c in counts.items():
        made = c["rejected_from"]
        accuracy = f"{c['parent_scores']['call_accuracy']:.3f} ({c['decoding']})"
        table.add_row(name, str(c["requests"]), str(c["pairs"]), str(made.get("model", 0)),
                      " / ".join(str(made.get(k, 0)) for k in kinds), accuracy)
    console.print(table)


def main(args: list[str] | None = None) -> None:
    """Entry point of ``stagewise pairs --parent CKPT [--data_dir data] [--limit N]``."""
    from datamodules.command import run_function

    run_function(pairs, args, "stagewise pairs")
