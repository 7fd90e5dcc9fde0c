"""Tool-calling examples: the two shapes a tool corpus may come in, their check, a JSONL reader, and the
examples of a prepared tool corpus.

An example is a conversation plus the functions on offer, in either shape:

- **stagewise's own**: ``{"messages": [{"role", "content"}...], "tools": [...], "tool_calls": [{"name",
  "arguments"}...]}``: the request, the tools, and the call(s) the assistant answers with;
- **OpenAI chat**: ``{"messages": [...], "tools": [...]}`` whose ``messages`` hold the assistant's turns
  themselves, ``{"role": "assistant", "content": null, "tool_calls": [{"type": "function", "function":
  {"name", "arguments"}}]}`` (``arguments`` an object or a JSON string of one), ``{"role": "tool",
  "content": ...}`` results, and further user / assistant turns.

A tool is flat, ``{"name", "description", "parameters"}``, or wrapped the OpenAI way, ``{"type":
"function", "function": {...}}``; ``parameters`` is a JSON schema. :func:`validate_example` checks either
shape and returns the **canonical** example the corpus stores: tools flat, every call ``{"name",
"arguments": {...}}``, and a conversation that ends in an assistant turn with calls written in the first
shape (so the same conversation in either file format is the same document). The chat template renders
all of these forms as the same text.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterator

import jsonschema

from datamodules.errors import DataFormatError, MissingSourceError, StagewiseError
from datamodules.shards import PREPARE_HINT, open_split
from datamodules.sources import Document, Source, SourceStats

ROLES = ("system", "user", "assistant", "tool")


def _fail(where: str, problem: str) -> None:
    prefix = f"{where}: " if where else ""
    raise DataFormatError(f"{prefix}{problem}. Fix the example or drop it from the corpus.")


def _non_empty_list(value: Any, field: str, where: str) -> list:
    if not isinstance(value, list) or not value:
        _fail(where, f"`{field}` must be a non-empty list, got {type(value).__name__}")
    return value


def _object(value: Any, field: str, where: str) -> dict:
    if not isinstance(value, dict):
        _fail(where, f"`{field}` must be an object, got {type(value).__name__}")
    return value


_CHECKED_SCHEMAS: set[str] = set()  # schemas already known to be valid (tools repeat across examples)


def _check_schema(schema: dict, tool: str, where: str) -> None:
    key = hashlib.sha256(json.dumps(schema, sort_keys=True).encode()).hexdigest()
    if key in _CHECKED_SCHEMAS:
        return
    try:
        jsonschema.Draft7Validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        _fail(where, f"`parameters` of tool `{tool}` is not a valid JSON schema: {e.message}")
    if len(_CHECKED_SCHEMAS) > 100_000:
        _CHECKED_SCHEMAS.clear()
    _CHECKED_SCHEMAS.add(key)


def function_of(item: dict) -> tuple[dict, str]:
    """The function object of a tool or call given flat or OpenAI-wrapped (``{"type": "function",
    "function": {...}}``), and the field prefix that names it in messages (``""`` or ``".function"``)."""
    if isinstance(item.get("function"), dict):
        return item["function"], ".function"
    return item, ""


def _tool(tool: Any, field: str, where: str) -> dict:
    fn, inner = function_of(_object(tool, field, where))
    field += inner
    missing = [k for k in ("name", "parameters") if k not in fn]
    if missing:
        _fail(where, f"`{field}` lacks {', '.join(missing)}")
    if not isinstance(fn["name"], str) or not fn["name"]:
        _fail(where, f"`{field}.name` must be a non-empty string")
    if not isinstance(fn.get("description", ""), str):
        _fail(where, f"`{field}.description` of `{fn['name']}` must be a string")
    if not isinstance(fn["parameters"], dict):
        _fail(where, f"`{field}.parameters` of `{fn['name']}` must be a JSON schema object")
    _check_schema(fn["parameters"], fn["name"], where)
    return fn


def validate_tools(tools: Any, where: str = "", field: str = "tools") -> list[dict]:
    """The tools of a list given flat or OpenAI-wrapped, flat; DataFormatError naming ``where`` and the field
    unless it is a non-empty list of tools with unique names and valid JSON schemas as ``parameters``."""
    flat: dict[str, dict] = {}
    for i, tool in enumerate(_non_empty_list(tools, field, where)):
        fn = _tool(tool, f"{field}[{i}]", where)
        if fn["name"] in flat:
            _fail(where, f"tool `{fn['name']}` is listed twice")
        flat[fn["name"]] = fn
    return list(flat.values())


def _call(call: Any, field: str, tools: dict[str, dict], where: str) -> dict:
    """A checked call, flat: ``{"name", "arguments": dict}``."""
    fn, inner = function_of(_object(call, field, where))
    field += inner
    missing = [k for k in ("name", "arguments") if k not in fn]
    if missing:
        _fail(where, f"`{field}` lacks {', '.join(missing)}")
    name, arguments = fn["name"], fn["arguments"]
    if name not in tools:
        _fail(where, f"`{field}` calls `{name}`, which is not among the tools ({', '.join(tools)})")
    if isinstance(arguments, str):  # OpenAI's form: the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            _fail(where, f"`{field}.arguments` of `{name}` is a string but not JSON ({e.msg} at column {e.colno})")
    if not isinstance(arguments, dict):
        _fail(where, f"`{field}.arguments` must be an object or a JSON string of one, got {type(arguments).__name__}")
    validator = jsonschema.Draft7Validator(tools[name]["parameters"])
    error = jsonschema.exceptions.best_match(validator.iter_errors(arguments))
    if error is not None:
        at = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        _fail(where, f"arguments of `{field}` (`{name}`) do not match its schema at {at}: {error.message}")
    return {"name": name, "arguments": arguments}


def _message(msg: Any, field: str, tools: dict[str, dict], where: str) -> dict:
    """A checked message; an assistant's calls flat, other fields as given."""
    msg = _object(msg, field, where)
    role = msg.get("role")
    if role not in ROLES:
        _fail(where, f"`{field}.role` must be one of {', '.join(ROLES)}, got {role!r}")
    content = msg.get("content")
    if role in ("system", "user") and not isinstance(content, str):
        _fail(where, f"`{field}.content` of a {role} message must be a string, got {type(content).__name__}")
    if role == "tool" and not isinstance(content, (str, dict, list)):
        _fail(where, f"`{field}.content` of a tool message must be a string or JSON, got {type(content).__name__}")
    if role != "assistant":
        return msg
    if content is not None and not isinstance(content, str):
        _fail(where, f"`{field}.content` of an assistant message must be a string or null")
    calls = msg.get("tool_calls")
    if calls is None and not content:
        _fail(where, f"`{field}` (assistant) has neither content nor `tool_calls`")
    if calls is None:
        return msg
    calls = _non_empty_list(calls, f"{field}.tool_calls", where)
    flat = [_call(c, f"{field}.tool_calls[{i}]", tools, where) for i, c in enumerate(calls)]
    return {**{k: v for k, v in msg.items() if k not in ("tool_calls", "content")}, "content": content or "",
            "tool_calls": flat}


def validate_example(example: Any, where: str = "") -> dict:
    """The canonical form of a tool example (see the module docstring); DataFormatError naming ``where``
    and the field (``messages[2].tool_calls[0].function.arguments``) unless it is well formed.

    Checks: ``tools`` a non-empty list of tools (flat or wrapped) with unique names and a valid JSON schema as
    ``parameters``; ``messages`` a non-empty list of system / user / assistant / tool messages; every call,
    in top-level ``tool_calls`` or in an assistant message, names a tool and matches its schema; the
    conversation ends with its answer: top-level ``tool_calls``, or a last message from the assistant (and
    at least one assistant call somewhere).
    """
    _object(example, "example", where)
    tools = {fn["name"]: fn for fn in validate_tools(example.get("tools"), where)}
    messages = [_message(m, f"messages[{i}]", tools, where)
                for i, m in enumerate(_non_empty_list(example.get("messages"), "messages", where))]
    canonical = {**example, "tools": list(tools.values()), "messages": messages}
    if "tool_calls" in example:
        calls = _non_empty_list(example["tool_calls"], "tool_calls", where)
        canonical["tool_calls"] = [_call(c, f"tool_calls[{i}]", tools, where) for i, c in enumerate(calls)]
        return canonical
    calls_somewhere = any(m.get("tool_calls") for m in messages if m["role"] == "assistant")
    if not calls_somewhere or messages[-1]["role"] != "assistant":
        _fail(where, "no assistant answer: add the call(s) as a top-level `tool_calls` list, or end `messages` "
                     "with the assistant's turn (at least one assistant message needs `tool_calls`)")
    last = messages[-1]
    if last.get("tool_calls") and not last["content"]:  # ends in calls: the first shape, one document either way
        canonical["messages"], canonical["tool_calls"] = messages[:-1], last["tool_calls"]
    return canonical


def conversation(example: dict) -> list[dict]:
    """The whole conversation of a canonical example: its messages, then the assistant's ``tool_calls``."""
    if not example.get("tool_calls"):
        return list(example["messages"])
    return [*example["messages"], {"role": "assistant", "content": "", "tool_calls": example["tool_calls"]}]


def scored_turn(example: dict) -> tuple[list[dict], list[dict]]:
    """The messages before the example's **last assistant turn that makes calls**, and that turn's calls
    (flat): what a tool evaluation prompts with and expects. In the first shape: the messages and
    ``tool_calls``."""
    messages = conversation(example)
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "assistant" and messages[i].get("tool_calls"):
            return messages[:i], [function_of(c)[0] for c in messages[i]["tool_calls"]]
    raise ValueError("the example has no assistant turn with tool calls")


class ToolJsonl(Source):
    """Tool-calling examples from JSONL files, one example per line in either shape of the module docstring,
    each checked (and made canonical) by `validate_example`.

    A malformed line is an error naming file:line and the field, not a skip: a tool corpus is small and
    curated, and a silently dropped example hides a bug in whatever wrote it. Blank lines are ignored.

    Args:
        paths: JSONL files to read, in this order.
        name: Name of this source in manifests and logs (default: ``tool_jsonl``).
        max_documents: Stop after this many examples (all when None).
    """

    def __init__(self, paths: list[str], name: str | None = None, max_documents: int | None = None):
        super().__init__(name=name, max_documents=max_documents)
        self.paths = list(paths)

    def files(self) -> list[Path]:
        missing = [p for p in self.paths if not Path(p).is_file()]
        if missing:
            raise MissingSourceError(
                f"tool example file(s) not found: {', '.join(missing)}. Check `paths` of source `{self.name}`."
            )
        return [Path(p) for p in self.paths]

    def documents(self, stats: SourceStats) -> Iterator[Document]:
        for path in self.files():
            with open(path, "rb") as f:
                for lineno, raw in enumerate(f, 1):
                    where = f"{path}:{lineno}"
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError as e:
                        raise DataFormatError(f"{where}: not UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                              f"{e.start + 1}); save the file as UTF-8 or fix the line.") from None
                    if not line.strip():
                        continue
                    try:
                        example = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataFormatError(f"{where}: not valid JSON ({e}). Fix or remove the line.") from None
                    example = validate_example(example, where)
                    yield Document(text=json.dumps(example, sort_keys=True), source=self.name, path=where)


def prepared_examples(corpus_dir: str | Path, split: str) -> list[dict]:
    """The examples of one split of a prepared tool corpus, in shard order (``<split>.jsonl``, written by
    ``stagewise prepare`` beside the shards they were rendered into); StagewiseError if it is missing or
    does not match the shard."""
    corpus_dir = Path(corpus_dir)
    path = corpus_dir / f"{split}.jsonl"
    if not path.is_file():
        raise StagewiseError(f"{path} is missing (data prepared before tool corpora kept their examples): "
                             f"re-run `stagewise prepare` on the same data config; {PREPARE_HINT}")
    examples = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    documents = open_split(corpus_dir, split).documents
    if len(examples) != documents:
        raise StagewiseError(f"{path} holds {len(examples)} examples but the '{split}' shard {documents}: they are "
                             f"from different runs of prepare; {PREPARE_HINT}")
    return examples
