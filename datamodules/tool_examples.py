"""Tool-calling examples: the shape check every tool corpus goes through, a JSONL reader, and the examples
of a prepared tool corpus.

One example is ``{"messages": [{"role", "content"}...], "tools": [{"name", "description",
"parameters"}...], "tool_calls": [{"name", "arguments"}...]}``: the request, the functions on offer
(``parameters`` is a JSON schema), and the call(s) the assistant should make.
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


def _fail(where: str, problem: str) -> None:
    prefix = f"{where}: " if where else ""
    raise DataFormatError(f"{prefix}{problem}. Fix the example or drop it from the corpus.")


def _check_list_of_dicts(example: dict, key: str, fields: tuple[str, ...], where: str) -> list[dict]:
    items = example.get(key)
    if not isinstance(items, list) or not items:
        _fail(where, f"`{key}` must be a non-empty list, got {type(items).__name__}")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            _fail(where, f"`{key}[{i}]` must be an object, got {type(item).__name__}")
        missing = [f for f in fields if f not in item]
        if missing:
            _fail(where, f"`{key}[{i}]` lacks {', '.join(missing)}")
    return items


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


def validate_example(example: Any, where: str = "") -> None:
    """Raise DataFormatError (naming `where` and the problem) unless `example` is a well-formed tool example.

    Checks: `messages` is a non-empty list of {role, content} with string values; `tools` a non-empty list
    of {name, description, parameters} with unique names and a valid JSON schema as `parameters`;
    `tool_calls` a non-empty list of {name, arguments: dict}, each naming a tool and matching its schema.
    """
    if not isinstance(example, dict):
        _fail(where, f"an example must be a JSON object, got {type(example).__name__}")
    for i, msg in enumerate(_check_list_of_dicts(example, "messages", ("role", "content"), where)):
        if not isinstance(msg["role"], str) or not isinstance(msg["content"], str):
            _fail(where, f"`messages[{i}]` role and content must be strings")
    tools: dict[str, dict] = {}
    for i, tool in enumerate(_check_list_of_dicts(example, "tools", ("name", "description", "parameters"), where)):
        if not isinstance(tool["name"], str) or not tool["name"]:
            _fail(where, f"`tools[{i}].name` must be a non-empty string")
        if tool["name"] in tools:
            _fail(where, f"tool `{tool['name']}` is listed twice")
        if not isinstance(tool["parameters"], dict):
            _fail(where, f"`tools[{i}].parameters` of `{tool['name']}` must be a JSON schema object")
        _check_schema(tool["parameters"], tool["name"], where)
        tools[tool["name"]] = tool
    for i, call in enumerate(_check_list_of_dicts(example, "tool_calls", ("name", "arguments"), where)):
        name = call["name"]
        if name not in tools:
            _fail(where, f"`tool_calls[{i}]` calls `{name}`, which is not among the tools ({', '.join(tools)})")
        if not isinstance(call["arguments"], dict):
            _fail(where, f"`tool_calls[{i}].arguments` must be an object, got {type(call['arguments']).__name__}")
        error = jsonschema.exceptions.best_match(
            jsonschema.Draft7Validator(tools[name]["parameters"]).iter_errors(call["arguments"])
        )
        if error is not None:
            at = "/".join(str(p) for p in error.absolute_path) or "(top level)"
            _fail(where, f"arguments of `tool_calls[{i}]` (`{name}`) do not match its schema at {at}: {error.message}")


class ToolJsonl(Source):
    """Tool-calling examples from JSONL files, one example per line, each checked with `validate_example`.

    A malformed line is an error (naming file:line), not a skip: a tool corpus is small and curated, and a
    silently dropped example hides a bug in whatever wrote it. Blank lines are ignored.

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
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    where = f"{path}:{lineno}"
                    try:
                        example = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataFormatError(f"{where}: not valid JSON ({e}). Fix or remove the line.") from e
                    validate_example(example, where)
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
