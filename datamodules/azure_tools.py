"""Tool-calling examples from azure-cli's own help: each example's sentence + the exact call it makes.

azure-cli's help (``helps['vm create']``, YAML) gives every command a few examples: a ``name`` ("Create a
VM with ...") and an ``az vm create ...`` line. The command line is parsed by azure-cli's own parser, with
the command's arguments loaded from its command loader (the registry that knows every parameter's options,
type, choices, help and whether it is required), and nothing runs: no validator, no request, no login. The
call is the values of the options the line gives (AAZ commands' shorthand syntax expanded by their own
schema), keyed by the option's long name; the tool's parameters are the command's arguments as a JSON
schema. Other commands of the same top-level group (``vm``, ``network``, ``storage``...) are the
distractors; that group is the example's service.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import re
import shlex
import tempfile
from pathlib import Path
from typing import Any, Iterator

from datamodules.errors import MissingSourceError
from datamodules.sources import Document, Source, SourceStats
from datamodules.tool_corpus import check_distractors, environment, plain_text, request_stating_values, tool_example
from datamodules.tool_examples import validate_example

_THREE_STATE = {"true", "false", "t", "f", "yes", "no", "y", "n", "1", "0", "enable", "disable"}
_SHELL = re.compile(r"[$`|;&<>]|\{\{|\{[A-Za-z_][\w-]*\}|\$\(|\n\s*az\s")  # shell syntax, {placeholders}


def _azure():
    try:
        import azure.cli.core  # noqa: F401
        from azure.cli.core import get_default_cli
    except ImportError as e:
        raise MissingSourceError(
            f"the azure-cli tool corpus needs azure-cli ({e}). Install it with `pip install azure-cli` "
            "(or `make prepare-full`)."
        ) from e
    return azure.cli.core, get_default_cli


def tool_name(command: str) -> str:
    """The function name of an azure-cli command: ``network vnet create`` -> ``az_network_vnet_create``."""
    return "az_" + re.sub(r"[^a-z0-9]+", "_", command.lower()).strip("_")


def _option_strings(settings: dict) -> list[str]:
    """An argument's options; a deprecated alias (knack's ``Deprecated``) by the option it stands for."""
    return [o if isinstance(o, str) else str(getattr(o, "target", "")) for o in settings.get("options_list") or []]


def option_name(settings: dict) -> str:
    """An argument's name in the schema: its first current long option, ``--resource-group`` -> ``resource_group``."""
    current = [o for o in settings.get("options_list") or [] if isinstance(o, str)] or _option_strings(settings)
    long = [o for o in current if o.startswith("--")] or current
    return long[0].lstrip("-").replace("-", "_")


# ---------------------------------------------------------------- argument registry -> JSON schema


def _aaz_schema(arg: Any, depth: int = 0) -> dict:
    """JSON schema of an AAZ argument (``AAZStrArg``, ``AAZListArg``, ``AAZObjectArg``...)."""
    kind = type(arg).__name__
    if "Bool" in kind:
        schema: dict = {"type": "boolean"}
    elif "Int" in kind:
        schema = {"type": "integer"}
    elif "Float" in kind:
        schema = {"type": "number"}
    elif "List" in kind or "Set" in kind:
        schema = {"type": "array", "items": _aaz_schema(arg.Element, depth + 1) if depth < 3 else {}}
    elif "Dict" in kind:
        schema = {"type": "object", "additionalProperties": _aaz_schema(arg.Element, depth + 1) if depth < 3 else {}}
    elif "Object" in kind:
        schema = {"type": "object"}
        fields = getattr(arg, "_fields", None) or {}
        if depth < 3 and fields:
            schema["properties"] = {name: _aaz_schema(f, depth + 1) for name, f in fields.items()}
    elif "Free" in kind:
        schema = {}
    else:
        schema = {"type": "string"}
    enum = getattr(arg, "enum", None) or getattr(arg, "_enum", None)
    items = getattr(enum, "items", None)
    if schema.get("type") == "string" and items:
        schema["enum"] = sorted({str(k) for k in (items() if callable(items) else items)})
    return schema


def _argument_schema(settings: dict, aaz_arg: Any = None) -> dict:
    """JSON schema of one argument from its registry settings (and its AAZ schema field, if any)."""
    if aaz_arg is not None:
        schema = _aaz_schema(aaz_arg)
    else:
        action, kind, nargs = settings.get("action"), settings.get("type"), settings.get("nargs")
        choices = settings.get("choices")
        if action in ("store_true", "store_false", "store_const"):
            item: dict = {"type": "boolean"}
        elif choices and {str(c).lower() for c in choices} <= _THREE_STATE:
            item = {"type": "boolean"}
        elif kind is int:
            item = {"type": "integer"}
        elif kind is float:
            item = {"type": "number"}
        elif choices:
            item = {"type": "string", "enum": [str(c) for c in choices]}
        else:
            item = {"type": "string"}
        schema = {"type": "array", "items": item} if nargs in ("+", "*") or action == "append" else item
    help_text = plain_text(settings.get("help") if isinstance(settings.get("help"), str) else "", 120)
    if help_text:
        schema["description"] = help_text
    return schema


def _visible(settings: dict) -> bool:
    return settings.get("help") != argparse.SUPPRESS and any(o.startswith("-") for o in _option_strings(settings))


# ---------------------------------------------------------------- the source


class AzureCliExamples(Source):
    """Tool-calling examples built from azure-cli's help examples and its commands' argument registry.

    Each kept example is one user request (the example's sentence, plus a sentence naming any argument value it
    does not state), the command's tool and 3-7 other commands of the same top-level group as distractors in a
    shuffled order, and the exact call. Examples that are not one plain ``az`` command (shell variables, pipes,
    placeholders), that azure-cli's parser rejects or whose values are not JSON are skipped, counted by reason.

    Args:
        groups: Top-level command groups to read (``vm``, ``network``, ``storage``...); all of them when None.
        min_distractors: Fewest other commands of the same group offered next to the right one.
        max_distractors: Most other commands offered; the count is drawn per example, seeded by its hash.
        name: Name of this source in manifests and logs (default: ``azure_cli_examples``).
        max_documents: Stop after this many examples (all when None).
    """

    def __init__(
        self,
        groups: list[str] | None = None,
        min_distractors: int = 3,
        max_distractors: int = 7,
        name: str | None = None,
        max_documents: int | None = None,
    ):
        super().__init__(name=name, max_documents=max_documents)
        check_distractors(min_distractors, max_distractors)
        self.groups = list(groups) if groups is not None else None
        self.min_distractors = min_distractors
        self.max_distractors = max_distractors

    def files(self) -> list[Path]:
        core, _ = _azure()
        root = Path(core.__file__).parents[1] / "command_modules"
        files = sorted(root.glob("*/_help.py")) + sorted(root.glob("*/*/_help.py"))
        if not files:
            raise MissingSourceError(f"no azure-cli command modules under {root}; reinstall it with `pip install azure-cli`")
        return files

    def fingerprint(self) -> str:
        core, _ = _azure()
        return hashlib.sha256(f"{super().fingerprint()} azure-cli-core={core.__version__}".encode()).hexdigest()

    def documents(self, stats: SourceStats) -> Iterator[Document]:
        with tempfile.TemporaryDirectory(prefix="stagewise-az-") as tmp, _quiet_azure_env(tmp):
            registry = _Registry()
            commands = [c for c in sorted(registry.examples) if self.groups is None or c.split()[0] in self.groups]
            if self.groups:
                missing = sorted(set(self.groups) - {c.split()[0] for c in registry.commands})
                if missing:
                    raise MissingSourceError(f"azure-cli has no command group(s) {', '.join(missing)}")
            calls: list[tuple[str, int, str, dict]] = []
            for command in commands:
                for k, example in enumerate(registry.examples[command]):
                    outcome = registry.call(command, example.get("text", ""))
                    if isinstance(outcome, str):
                        stats.skipped[outcome] += 1
                    else:
                        calls.append((command, k, _request_text(example.get("name", "")), outcome))
            by_group: dict[str, list[str]] = {}
            for command in sorted({c for c, *_ in calls}):
                by_group.setdefault(command.split()[0], []).append(command)
            for command, k, request, arguments in calls:
                others = [c for c in by_group[command.split()[0]] if c != command]
                seed = int(hashlib.sha256(f"{command}#{k}\n{json.dumps(arguments, sort_keys=True)}".encode())
                           .hexdigest()[:16], 16)
                example = tool_example(request_stating_values(request, arguments), registry.tool(command), others,
                                       arguments, seed, self.min_distractors, self.max_distractors, registry.tool)
                if example is None:
                    stats.skipped["too_few_commands"] += 1
                    continue
                try:
                    validate_example(example, command)
                except Exception:
                    stats.skipped["schema_mismatch"] += 1
                    continue
                yield Document(text=json.dumps(example, sort_keys=True), source=self.name, path=f"{command}#{k}",
                               meta={"tool": tool_name(command), "family": "azure", "service": command.split()[0]})


def _request_text(name: str) -> str:
    text = re.sub(r"\s+", " ", name.replace("`", "").replace("(autogenerated)", "")).strip()
    return text if text.endswith((".", "?", "!")) or not text else text + "."


def _quiet_azure_env(tmp: str):
    """An empty azure config dir and no telemetry for this process: nothing reads the user's azure setup."""
    for logger in ("cli", "azure", "knack"):
        logging.getLogger(logger).setLevel(logging.CRITICAL)
    return environment({"AZURE_CONFIG_DIR": tmp, "AZURE_CORE_COLLECT_TELEMETRY": "no", "AZURE_CORE_NO_COLOR": "true"})


class _Registry:
    """azure-cli's command table (every module loaded once), each command's arguments on demand, its parser."""

    def __init__(self):
        import yaml
        from knack.help_files import helps

        _, get_default_cli = _azure()
        self.cli = get_default_cli()
        self.invocation = self.cli.invocation_cls(
            cli_ctx=self.cli, parser_cls=self.cli.parser_cls, commands_loader_cls=self.cli.commands_loader_cls,
            help_cls=self.cli.help_cls)
        self.cli.invocation = self.invocation
        self.loader = self.invocation.commands_loader
        self.invocation.data["command_string"] = ""
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            self.loader.load_command_table(None)
        self.commands = dict(self.loader.command_table)
        self.examples: dict[str, list[dict]] = {}
        self.summaries: dict[str, str] = {}
        for command in self.commands:
            try:
                entry = yaml.safe_load(helps.get(command) or "") or {}
            except yaml.YAMLError:
                continue
            if isinstance(entry, dict):
                self.summaries[command] = str(entry.get("short-summary") or "")
                examples = [e for e in entry.get("examples") or [] if isinstance(e, dict)]
                if examples:
                    self.examples[command] = examples
        self._tools: dict[str, dict] = {}
        self._loaded: dict[str, dict] = {}

    def arguments(self, command: str) -> dict:
        """``{dest: (settings, aaz_arg or None)}`` of a command's arguments, from its command loader."""
        if command not in self._loaded:
            self.invocation.data["command_string"] = command
            self.loader.command_table = {command: self.commands[command]}
            self.loader.command_name = command
            with contextlib.redirect_stderr(io.StringIO()):
                self.loader.load_arguments(command)
            cmd = self.commands[command]
            aaz = _aaz_fields(cmd)
            self._loaded[command] = {dest: (arg.type.settings, aaz.get(dest)) for dest, arg in cmd.arguments.items()}
        return self._loaded[command]

    def tool(self, command: str) -> dict:
        """The tool (name, description, parameters) of one command."""
        if command not in self._tools:
            properties, required = {}, []
            for settings, aaz_arg in self.arguments(command).values():
                if not _visible(settings):
                    continue
                name = option_name(settings)
                properties[name] = _argument_schema(settings, aaz_arg)
                if settings.get("required"):
                    required.append(name)
            parameters: dict = {"type": "object", "properties": properties, "additionalProperties": False}
            if required:
                parameters["required"] = required
            self._tools[command] = {"name": tool_name(command),
                                    "description": plain_text(self.summaries.get(command), 200) or f"az {command}",
                                    "parameters": parameters}
        return self._tools[command]

    def call(self, command: str, line: str) -> dict | str:
        """The arguments ``{option name: value}`` an example's command line passes, or why it was skipped."""
        line = re.sub(r"\\\s*\n", " ", line.strip())
        if not line.startswith("az ") or _SHELL.search(line):
            return "not_one_plain_command"
        try:
            args = shlex.split(line)[1:]
        except ValueError:
            return "unparsable_command"
        if args[: len(command.split())] != command.split():
            return "other_command"
        arguments = self.arguments(command)
        options = {o: dest for dest, (s, _) in arguments.items() if _visible(s) for o in _option_strings(s)}
        given = [options[a.split("=", 1)[0]] for a in args if a.startswith("-") and a.split("=", 1)[0] in options]
        if not given:
            return "no_arguments"
        self.invocation.data["command_string"] = command
        self.loader.command_table = {command: self.commands[command]}
        self.loader.command_name = command
        parser = self.cli.parser_cls(cli_ctx=self.cli)
        try:
            with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
                parser.load_command_table(self.loader)
                namespace = vars(parser.parse_args(args))
        except (Exception, SystemExit):  # argparse exits on bad arguments
            return "cli_error"
        values = _aaz_values(self.commands[command], namespace, given)
        out: dict[str, Any] = {}
        for dest in dict.fromkeys(given):
            settings, _ = arguments[dest]
            value = values[dest] if dest in values else namespace.get(dest)
            out[option_name(settings)] = value
        try:
            return json.loads(json.dumps(out))
        except (TypeError, ValueError):
            return "not_json"


def _aaz_schema_builder(cmd: Any):
    """An AAZ command's arguments-schema builder (None for other commands): AAZ commands are their own class."""
    for cls in (type(cmd), type(getattr(cmd, "handler", None))):
        build = getattr(cls, "get_arguments_schema", None) or getattr(cls, "_build_arguments_schema", None)
        if build is not None:
            return build
    return None


def _aaz_fields(cmd: Any) -> dict:
    """The AAZ schema fields of an AAZ command's arguments, by dest ({} for other commands)."""
    build = _aaz_schema_builder(cmd)
    try:
        return dict(getattr(build(), "_fields", {}) or {}) if build else {}
    except Exception:
        return {}


def _aaz_values(cmd: Any, namespace: dict, given: list[str]) -> dict:
    """The given AAZ arguments' values, expanded by the command's own schema (shorthand syntax, lists...)."""
    build = _aaz_schema_builder(cmd)
    if build is None:
        return {}
    args = build()()
    for dest in given:
        operations = namespace.get(dest)
        if hasattr(operations, "apply"):
            operations.apply(args, dest)
    data = args.to_serialized_data()
    return {dest: data[dest] for dest in given if dest in data}
