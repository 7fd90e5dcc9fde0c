"""Tool-call evaluation: generate the assistant's call for held-out requests and score it.

Three numbers, each a fraction of the examples:

- ``json_valid``: the answer holds a parseable JSON call object;
- ``name_accuracy``: it calls the expected function;
- ``call_accuracy``: it calls the expected function with exactly the expected arguments (key order is
  irrelevant, ``1`` equals ``1.0``, but ``"1"`` does not equal ``1``).

Only the first call of an example is scored (the corpora have one call per example).
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from datamodules.errors import StagewiseError

CALL_OPEN, CALL_CLOSE, END = "<|tool_call|>", "<|/tool_call|>", "<|end|>"


# --------------------------------------------------------------------------------------------- parsing
def _first_json_object(text: str) -> Any:
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            return decoder.raw_decode(text, start)[0]
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
    return None


def _as_call(obj: Any) -> dict | None:
    if isinstance(obj, list) and obj:
        obj = obj[0]
    if isinstance(obj, dict) and "function" in obj and "name" not in obj:  # {"function": {name, arguments}}
        obj = obj["function"]
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(arguments, str):  # OpenAI style: arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return {"name": obj["name"], "arguments": arguments}


def parse_tool_call(text: str) -> dict | None:
    """The first call in generated text, as ``{"name", "arguments"}``; None if there is none to parse.

    Reads what is between ``<|tool_call|>`` and ``<|/tool_call|>`` (or after ``<|tool_call|>`` up to the
    end, if generation stopped early); without the markers, the first JSON object in the text.
    """
    if CALL_OPEN in text:
        body = text.split(CALL_OPEN, 1)[1].split(CALL_CLOSE, 1)[0].split(END, 1)[0].strip()
        try:
            return _as_call(json.loads(body))
        except json.JSONDecodeError:
            return _as_call(_first_json_object(body))
    return _as_call(_first_json_object(text))


# --------------------------------------------------------------------------------------------- scoring
def _canonical(value: Any) -> Any:
    """A hashable, order-free form of a JSON value in which numbers compare as numbers."""
    if isinstance(value, dict):
        return ("object", tuple(sorted((str(k), _canonical(v)) for k, v in value.items())))
    if isinstance(value, (list, tuple)):
        return ("array", tuple(_canonical(v) for v in value))
    if isinstance(value, bool):  # before int: True is an int in Python, not in JSON
        return ("bool", value)
    if isinstance(value, (int, float)):
        return ("number", value if not (isinstance(value, float) and math.isnan(value)) else "nan")
    return (type(value).__name__, value)


def calls_equal(predicted: dict | None, expected: dict) -> bool:
    """Same function name and the same arguments after JSON normalisation."""
    return (
        predicted is not None
        and predicted.get("name") == expected.get("name")
        and _canonical(predicted.get("arguments", {})) == _canonical(expected.get("arguments", {}))
    )


def score_calls(predicted: list[dict | None], expected: list[dict]) -> dict:
    """``json_valid``, ``name_accuracy``, ``call_accuracy`` (fractions) and ``n`` over paired calls."""
    if len(predicted) != len(expected):
        raise ValueError(f"{len(predicted)} predicted calls for {len(expected)} expected ones")
    n = len(expected)
    if n == 0:
        return {"n": 0, "json_valid": 0.0, "name_accuracy": 0.0, "call_accuracy": 0.0}
    return {
        "n": n,
        "json_valid": sum(p is not None for p in predicted) / n,
        "name_accuracy": sum(p is not None and p.get("name") == e.get("name") for p, e in zip(predicted, expected)) / n,
        "call_accuracy": sum(calls_equal(p, e) for p, e in zip(predicted, expected)) / n,
    }


# --------------------------------------------------------------------------------------------- examples
def load_heldout_examples(data_dir: str | Path = "data", split: str = "val", limit: int | None = None,
                          corpus: str = "tools", tokenizer=None) -> list[dict]:
    """Held-out tool examples straight from the prepared shards of ``<data_dir>/<corpus>/``.

    Each document's loss mask marks the assistant's answer, so the tokens before the first masked token
    are exactly the prompt the model sees in training (``prompt_ids``), and the masked tokens decode to
    the expected call (``tool_calls``, parsed like a generated answer). Nothing is re-rendered, so the
    examples cannot drift from what the model was trained and validated on.

    Returns:
        Dicts with ``prompt_ids`` (list[int]), ``tool_calls`` ([{"name", "arguments"}]) and ``answer``
        (the expected answer's text), in shard order, at most ``limit`` of them.
    """
    from datamodules.shards import open_split, read_manifest
    from datamodules.tokenizer import load_tokenizer

    corpus_dir = Path(data_dir) / corpus
    manifest = read_manifest(corpus_dir)
    if manifest.get("kind") != "tools":
        raise StagewiseError(f"{corpus_dir} holds a '{manifest.get('kind')}' corpus, not tool examples")
    tok = tokenizer if tokenizer is not None else load_tokenizer(manifest.get("tokenizer_dir") or Path(data_dir) / "tokenizer")
    data = open_split(corpus_dir, split)
    if data.mask is None:
        raise StagewiseError(f"{corpus_dir}/{split}.mask.bin is missing; re-run `stagewise prepare`")
    examples = []
    for start, end in zip(data.offsets[:-1], data.offsets[1:]):
        if limit is not None and len(examples) >= limit:
            break
        ids = data.tokens[start:end]
        masked = data.mask[start:end].nonzero()[0]
        if len(masked) == 0:
            continue
        first, last = int(masked[0]), int(masked[-1]) + 1
        answer = tok.decode(ids[first:last].tolist(), skip_special_tokens=False)
        call = parse_tool_call(answer)
        if call is None:
            raise StagewiseError(f"{corpus_dir}/{split}: document at offset {int(start)} has no parseable call "
                                 f"in its answer ({answer[:80]!r}); re-run `stagewise prepare`")
        examples.append({"prompt_ids": ids[:first].tolist(), "tool_calls": [call], "answer": answer})
    return examples


# --------------------------------------------------------------------------------------------- generation
def stop_token_ids(tokenizer) -> list[int]:
    """The ids that end an answer: ``<|/tool_call|>``, ``<|end|>`` and eos."""
    ids = [tokenizer.convert_tokens_to_ids(t) for t in (CALL_CLOSE, END)] + [tokenizer.eos_token_id]
    unk = tokenizer.unk_token_id
    return list(dict.fromkeys(i for i in ids if i is not None and (unk is None or i != unk)))


def prompt_ids_of(tokenizer, example: dict) -> list[int]:
    """The prompt of an example: its ``prompt_ids``, or ``render_tool_prompt`` of its messages and tools."""
    if "prompt_ids" in example:
        return list(example["prompt_ids"])
    from datamodules.tokenizer import render_tool_prompt

    return list(render_tool_prompt(tokenizer, example))


def decoding_model(trainer, pl_module):
    """The module to decode with during a fit, on rank 0; ``None`` on the other ranks.

    ``pl_module`` itself, except under Lightning's ``FSDPStrategy``: there each rank holds only a shard
    of the weights, and the FSDP units gather theirs only inside the strategy's training or validation
    step, all ranks together, so ``pl_module.generate`` called from a callback fails (the embedding is a
    1-D shard) and decoding on all ranks in lock step would hang as soon as their stop tokens differ. Under
    FSDP the full weights are gathered to rank 0 (``strategy.lightning_module_state_dict()``, the same
    gather a full checkpoint does) and loaded into an unsharded, uncompiled copy on rank 0's device, which
    rank 0 decodes with alone. Every rank must call this: the gather is collective. The copy costs one
    model's float32 weights on rank 0's GPU while it is referenced.
    """
    from lightning.pytorch.strategies import FSDPStrategy

    if not isinstance(trainer.strategy, FSDPStrategy):
        return pl_module if trainer.is_global_zero else None
    if getattr(trainer.strategy, "_state_dict_type", "full") != "full":  # Lightning keeps the choice privately
        raise StagewiseError("decoding during an FSDP fit (TextSamples, ToolCallEval) gathers the full weights and "
                             "needs the strategy's state_dict_type: full, as in configs/strategies/fsdp.yaml; "
                             "set it, or leave these callbacks out of this run")
    state = trainer.strategy.lightning_module_state_dict()  # collective; the full weights on rank 0 only
    if not trainer.is_global_zero:
        return None
    with torch.device(pl_module.device):
        return type(pl_module).from_state(pl_module.hparams, state, compile=False, init_from=None)


@contextmanager
def decoding_threads(model):
    """On CPU, decode with one intra-op thread: one token's matmuls are too small to share, and thread
    synchronisation made batch-1 decoding of the tiny model 13x slower on a busy 2-core machine."""
    on_cpu = next(model.parameters()).device.type == "cpu"
    before = torch.get_num_threads()
    if on_cpu and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


@torch.no_grad()
def greedy_continuations(model, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int],
                         batch_size: int = 16, max_prompt_tokens: int | None = None) -> list[list[int]]:
    """Greedy new tokens after each prompt, up to and including its first stop id, decoded in batches.

    Prompts of similar length are batched together (left-padded, KV cache, see ``CausalLM.generate``);
    each result equals the prompt's unbatched greedy continuation. A prompt is cut from the left to at most
    ``max_prompt_tokens`` and to leave room for ``max_new_tokens`` in the model's context.
    """
    context = getattr(getattr(model, "config", None), "max_seq_len", None)
    if context:
        max_new_tokens = min(max_new_tokens, context - 1)
    keep = [n for n in (max_prompt_tokens, context and context - max_new_tokens) if n]
    if keep:
        prompts = [p[-max(1, min(keep)):] for p in prompts]
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # little padding per batch
    results: list[list[int]] = [[] for _ in prompts]
    for first in range(0, len(order), batch_size):
        rows = order[first:first + batch_size]
        width = max(len(prompts[i]) for i in rows)
        input_ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for b, i in enumerate(rows):
            input_ids[b, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[b, width - len(prompts[i]):] = 1
        out = model.generate(input_ids.to(device), max_new_tokens=max_new_tokens, eos_token_id=stop_ids or None,
                             attention_mask=mask.to(device))
        for b, i in enumerate(rows):
            new = out[b, width:].tolist()
            stop = next((k for k, t in enumerate(new) if t in stop_ids), None)
            results[i] = new if stop is None else new[: stop + 1]
    return results


def evaluate_tool_calls(model, tokenizer, examples: list[dict], max_new_tokens: int = 128,
                        limit: int | None = None, num_samples: int = 3, batch_size: int = 16,
                        max_prompt_tokens: int | None = None) -> dict:
    """Generate the call for each example (greedy, KV cache, batched) and score it against the expected call.

    Args:
        model: A ``CausalLM`` (anything with ``generate(input_ids, max_new_tokens, eos_token_id,
            attention_mask)`` and ``parameters()``).
        tokenizer: The tokenizer the model was trained with.
        examples: Tool examples: ``{"messages", "tools", "tool_calls"}`` or ``load_heldout_examples`` dicts.
        max_new_tokens: Longest answer generated; generation stops earlier at ``<|/tool_call|>``,
            ``<|end|>`` or eos.
        limit: Evaluate only the first ``limit`` examples.
        num_samples: How many (prompt tail, generated, expected) triples to return for reading.
        batch_size: Prompts decoded together (the scores do not depend on it).
        max_prompt_tokens: Keep only the last this many prompt tokens (the request and the last tool
            schemas). Decoding cost grows with the prompt: match the training window (``seq_len`` less
            the answer) to see prompts as the model saw them. Default: as many as the context holds.

    Returns:
        The scores of :func:`score_calls` plus ``samples``.
    """
    examples = examples[:limit] if limit is not None else examples
    predictions = predict_calls(model, tokenizer, examples, max_new_tokens, batch_size, max_prompt_tokens)
    predicted, expected, samples = [], [], []
    for ex, (prompt, text, call) in zip(examples, predictions):
        predicted.append(call)
        expected.append(ex["tool_calls"][0])
        if len(samples) < num_samples:
            tail = tokenizer.decode(prompt[-48:], skip_special_tokens=False)
            samples.append({"prompt_tail": tail, "generated": text, "expected": ex["tool_calls"][0],
                            "correct": calls_equal(call, ex["tool_calls"][0])})
    return {**score_calls(predicted, expected), "samples": samples}


def predict_calls(model, tokenizer, examples: list[dict], max_new_tokens: int = 128, batch_size: int = 16,
                  max_prompt_tokens: int | None = None) -> list[tuple[list[int], str, dict | None]]:
    """Each example's prompt ids, the generated answer's text and the call parsed from it (None if none
    parses): greedy, batched, with the KV cache (arguments as in :func:`evaluate_tool_calls`)."""
    prompts = [prompt_ids_of(tokenizer, ex) for ex in examples]
    with decoding_threads(model):  # CausalLM.generate switches to eval mode and back
        generated = greedy_continuations(model, prompts, max_new_tokens, stop_token_ids(tokenizer), batch_size,
                                         max_prompt_tokens)
    texts = [tokenizer.decode(new, skip_special_tokens=False) for new in generated]
    return [(prompt, text, parse_tool_call(text)) for prompt, text in zip(prompts, texts)]
