"""Tool-call evaluation: generate the assistant's call for held-out requests and score it.

Three numbers, each a fraction of the examples:

- ``json_valid``: the answer holds at least one call and every call in it is a parseable JSON call object;
- ``name_accuracy``: it calls the expected functions, the same number of them in the same order;
- ``call_accuracy``: besides, every call has exactly the expected arguments (key order is irrelevant, ``1``
  equals ``1.0``, but ``"1"`` does not equal ``1``).

The turn scored is an example's **last assistant turn that makes calls** (``tool_examples.scored_turn``),
prompted with the whole conversation before it; a turn with several calls counts as right only when all of
them are, in order.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.errors import StagewiseError
from datamodules.tokenizer import CALL_CLOSE, CALL_OPEN, END
from datamodules.tool_examples import scored_turn
from lightning_modules.decoding import decoding_threads, greedy_continuations



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
        return _parse_body(text.split(CALL_OPEN, 1)[1])
    return _as_call(_first_json_object(text))


def _parse_body(body: str) -> dict | None:
    body = body.split(CALL_CLOSE, 1)[0].split(END, 1)[0].strip()
    try:
        return _as_call(json.loads(body))
    except json.JSONDecodeError:
        return _as_call(_first_json_object(body))


def parse_tool_calls(text: str) -> list[dict] | None:
    """Every call of a generated turn, in order, each as ``{"name", "arguments"}``; None when the turn holds no
    call or any of its calls does not parse. Reads each ``<|tool_call|>...<|/tool_call|>`` up to the turn's
    ``<|end|>``; without the markers, the first JSON object in the text as the one call."""
    if CALL_OPEN not in text:
        call = parse_tool_call(text)
        return None if call is None else [call]
    calls = [_parse_body(body) for body in text.split(END, 1)[0].split(CALL_OPEN)[1:]]
    return None if any(c is None for c in calls) else calls


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


def _turn(calls: list[dict] | dict | None) -> list[dict] | None:
    return [calls] if isinstance(calls, dict) else calls


def turns_equal(predicted: list[dict] | dict | None, expected: list[dict] | dict) -> bool:
    """The same calls in the same order (:func:`calls_equal` each); a dict stands for a turn of one call."""
    predicted, expected = _turn(predicted), _turn(expected)
    return predicted is not None and len(predicted) == len(expected) and all(map(calls_equal, predicted, expected))


def score_calls(predicted: list[list[dict] | dict | None], expected: list[list[dict] | dict]) -> dict:
    """``json_valid``, ``name_accuracy``, ``call_accuracy`` (fractions) and ``n`` over paired turns; each turn
    is its list of calls (a dict: one call; None: nothing parseable)."""
    if len(predicted) != len(expected):
        raise ValueError(f"{len(predicted)} predicted turns for {len(expected)} expected ones")
    n = len(expected)
    if n == 0:
        return {"n": 0, "json_valid": 0.0, "name_accuracy": 0.0, "call_accuracy": 0.0}
    pairs = [(_turn(p), _turn(e)) for p, e in zip(predicted, expected)]
    names = lambda calls: [c.get("name") for c in calls]  # noqa: E731
    return {
        "n": n,
        "json_valid": sum(bool(p) for p, _ in pairs) / n,
        "name_accuracy": sum(p is not None and names(p) == names(e) for p, e in pairs) / n,
        "call_accuracy": sum(turns_equal(p, e) for p, e in pairs) / n,
    }


ERRORS = ("no_call", "call_count", "name_not_offered", "wrong_name", "missing_argument", "extra_argument",
          "wrong_value")


def error_kind(predicted: list[dict] | dict | None, expected: list[dict] | dict,
               offered: set[str] | None = None) -> str | None:
    """Why a turn is wrong (None when it is right), the first reason of :data:`ERRORS` in order: no parseable
    call, another number of calls, a function the prompt does not offer (only where ``offered`` is given), another
    offered function, then, call by call, an expected argument left out, an argument the expected call does not
    have, an argument's value."""
    if turns_equal(predicted, expected):  # the same test as call_accuracy's, so the counts add up to its misses
        return None
    predicted, expected = _turn(predicted), _turn(expected)
    if not predicted:
        return "no_call"
    if len(predicted) != len(expected):
        return "call_count"
    for p, e in zip(predicted, expected):
        if p.get("name") != e.get("name"):
            return "name_not_offered" if offered is not None and p.get("name") not in offered else "wrong_name"
    for p, e in zip(predicted, expected):  # parsed calls' arguments are objects (_as_call)
        got, want = set(p.get("arguments") or {}), set(e.get("arguments") or {})
        if want - got:
            return "missing_argument"
        if got - want:
            return "extra_argument"
    return "wrong_value"


# --------------------------------------------------------------------------------------------- examples
def load_heldout_examples(data_dir: str | Path = "data", split: str = "val", limit: int | None = None,
                          corpus: str = "tools", tokenizer=None) -> list[dict]:
    """Held-out tool examples straight from the prepared shards of ``<data_dir>/<corpus>/``.

    Each document's loss mask marks its assistant turns; the scored one is the last that makes calls, so the
    tokens before it are exactly the prompt the model sees in training there (``prompt_ids``: the whole
    conversation so far), and its tokens decode to the expected calls (``tool_calls``, parsed like a
    generated answer). Nothing is re-rendered, so the examples cannot drift from what the model was
    trained and validated on.

    Returns:
        Dicts with ``prompt_ids`` (list[int]), ``tool_calls`` (the turn's [{"name", "arguments"}...]) and
        ``answer`` (the expected turn's text), in shard order; with ``limit``, that many spread evenly over the
        split (shards hold the sources and services one after another: the first ``limit`` would be a few
        services of one source).
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
    call_open = tok.convert_tokens_to_ids(CALL_OPEN)
    examples = []
    for start, end in zip(data.offsets[:-1], data.offsets[1:]):
        ids, mask = data.tokens[start:end], data.mask[start:end].astype(bool)
        # assistant turns: runs of 1s in the mask, [begin, end) each; the last one that holds a call is scored
        edges = np.flatnonzero(np.diff(np.concatenate([[False], mask, [False]]).astype(np.int8)))
        turns = [(int(b), int(e)) for b, e in zip(edges[::2], edges[1::2]) if call_open in ids[b:e]]
        if not turns:
            continue
        first, last = turns[-1]
        answer = tok.decode(ids[first:last].tolist(), skip_special_tokens=False)
        calls = parse_tool_calls(answer)
        if calls is None:
            raise StagewiseError(f"{corpus_dir}/{split}: document at offset {int(start)} has no parseable call "
                                 f"in its answer ({answer[:80]!r}); re-run `stagewise prepare`")
        examples.append({"prompt_ids": ids[:first].tolist(), "tool_calls": calls, "answer": answer})
    if limit is not None and limit < len(examples):
        examples = [examples[i * len(examples) // limit] for i in range(limit)]
    return examples


def heldout_groups(data_dir: str | Path = "data", seen_split: str = "val", corpus: str = "tools") -> dict[str, str]:
    """The held-out groups a tool corpus can be scored on, by split: ``seen`` (requests to services it trains
    on, from ``seen_split``) and, where prepare held whole services out, ``unseen``."""
    groups = {"seen": seen_split}
    if (Path(data_dir) / corpus / "unseen.idx.npy").exists():
        groups["unseen"] = "unseen"
    return groups


# --------------------------------------------------------------------------------------------- generation
def stop_token_ids(tokenizer) -> list[int]:
    """The ids that end an assistant turn: ``<|end|>`` and eos (not ``<|/tool_call|>``: a turn may make
    several calls). An export's ``generation_config.eos_token_id`` lists the same ids."""
    ids = [tokenizer.convert_tokens_to_ids(END), tokenizer.eos_token_id]
    unk = tokenizer.unk_token_id
    return list(dict.fromkeys(i for i in ids if i is not None and (unk is None or i != unk)))


def prompt_ids_of(tokenizer, example: dict) -> list[int]:
    """The prompt of an example: its ``prompt_ids``, or ``render_tool_prompt`` of its conversation and tools."""
    if "prompt_ids" in example:
        return list(example["prompt_ids"])
    from datamodules.tokenizer import render_tool_prompt

    return list(render_tool_prompt(tokenizer, example))


def evaluate_tool_calls(model, tokenizer, examples: list[dict], max_new_tokens: int = 128,
                        limit: int | None = None, num_samples: int = 3, batch_size: int | None = None,
                        max_prompt_tokens: int | None = None, constrain: bool | str = False) -> dict:
    """Generate the call for each example (greedy, KV cache, batched) and score it against the expected call.

    Args:
        model: A ``CausalLM`` (anything with ``generate(input_ids, max_new_tokens, eos_token_id,
            attention_mask)`` and ``parameters()``).
        tokenizer: The tokenizer the model was trained with.
        examples: Tool examples (canonical, either shape of ``datamodules.tool_examples``) or
            ``load_heldout_examples`` dicts; the scored turn is the last assistant turn with calls.
        max_new_tokens: Longest answer generated; generation stops earlier at ``<|end|>`` or eos.
        limit: Evaluate only the first ``limit`` examples.
        num_samples: How many (prompt tail, generated, expected) triples to return for reading.
        batch_size: Prompts decoded together (the scores do not depend on it; default 64 on a GPU, 16
            elsewhere).
        max_prompt_tokens: Keep only the last this many prompt tokens (the request and the last tool
            schemas). Decoding cost grows with the prompt: match the training window (``seq_len`` less
            the answer) to see prompts as the model saw them. Default: as many as the context holds.
        constrain: Decode each call's function name among the prompt's offered tools and its arguments' keys
            among that tool's parameters (``lightning_modules.tool_constraint``); the scores then say
            ``"constrained": true``. ``"strict"``: also the constraint's closing rules (every required parameter
            named, the call's JSON closed before it ends); the scores say ``"strict": true`` too.

    Returns:
        The scores of :func:`score_calls`, ``errors`` (the wrong turns counted by :func:`error_kind`'s reason;
        a prompt that lists no tools counts a wrong name as ``wrong_name``), ``samples`` and ``wrong_samples``
        (the first wrong turn of each reason).
    """
    examples = examples[:limit] if limit is not None else examples
    prompts = [prompt_ids_of(tokenizer, ex) for ex in examples]  # rendered once, for the decoding and the errors
    tools = offered_tools_of(tokenizer, prompts)
    predictions = predict_calls(model, tokenizer, [{"prompt_ids": p} for p in prompts], max_new_tokens, batch_size,
                                max_prompt_tokens, constrain, tools)
    predicted, expected, samples, wrong, errors = [], [], [], {}, dict.fromkeys(ERRORS, 0)
    for ex, offered, (prompt, text, calls) in zip(examples, tools, predictions):
        want = ex["tool_calls"] if "prompt_ids" in ex else scored_turn(ex)[1]
        predicted.append(calls)
        expected.append(want)
        kind = error_kind(calls, want, set(offered) or None)
        if kind is not None:
            errors[kind] += 1
        if len(samples) < num_samples or (kind is not None and kind not in wrong):
            sample = {"prompt_tail": tokenizer.decode(prompt[-48:], skip_special_tokens=False), "generated": text,
                      "expected": want[0] if len(want) == 1 else want, "correct": kind is None}
            if len(samples) < num_samples:
                samples.append(sample)
            if kind is not None:
                wrong.setdefault(kind, sample)
    marks = {"constrained": True, **({"strict": True} if constrain == "strict" else {})} if constrain else {}
    return {**score_calls(predicted, expected), **marks,
            "errors": errors, "samples": samples, "wrong_samples": wrong}


# The decodings `stagewise evaluate` scores, by the result's key: evaluate_tool_calls's ``constrain`` for each
DECODINGS = {"tools": False, "tools_constrained": True, "tools_strict": "strict"}


def offered_tools_of(tokenizer, prompts: list[list[int]]) -> list[dict[str, dict]]:
    """The tools each prompt offers (``tool_constraint.offered_tools`` of its whole text: the request's tools, also
    where decoding cuts the prompt's start to the model's window)."""
    from lightning_modules.tool_constraint import offered_tools  # it imports this module

    return [offered_tools(tokenizer.decode(p, skip_special_tokens=False)) for p in prompts]


def predict_calls(model, tokenizer, examples: list[dict], max_new_tokens: int = 128, batch_size: int | None = None,
                  max_prompt_tokens: int | None = None, constrain: bool | str = False,
                  tools: list[dict[str, dict]] | None = None, temperature: float = 0.0,
                  generator=None) -> list[tuple[list[int], str, list[dict] | None]]:
    """Each example's prompt ids, the generated turn's text and the calls parsed from it (None if none
    parses): greedy (or sampled at ``temperature`` from ``generator``), batched, with the KV cache (arguments
    as in :func:`evaluate_tool_calls`; ``tools``: each prompt's :func:`offered_tools_of`, where the caller has
    them already)."""
    prompts = [prompt_ids_of(tokenizer, ex) for ex in examples]
    processor_for = None
    if constrain:
        from lightning_modules.tool_constraint import ToolCallConstraint, token_pieces

        pieces = token_pieces(tokenizer)
        tools = tools if tools is not None else offered_tools_of(tokenizer, prompts)
        strict = constrain == "strict"
        processor_for = lambda rows: ToolCallConstraint(pieces, [tools[i] for i in rows], strict)  # noqa: E731
    with decoding_threads(model):  # CausalLM.generate switches to eval mode and back
        generated = greedy_continuations(model, prompts, max_new_tokens, stop_token_ids(tokenizer), batch_size,
                                         max_prompt_tokens, processor_for, temperature, generator)
    texts = [tokenizer.decode(new, skip_special_tokens=False) for new in generated]
    return [(prompt, text, parse_tool_calls(text)) for prompt, text in zip(prompts, texts)]
