"""Tool-calling examples from the AWS CLI's own documentation: request prose + the exact API call.

Each ``awscli/examples/<service>/<operation>.rst`` holds one or more examples: a title, a sentence or two
of prose and an ``aws <service> <operation> ...`` command. The command is parsed by awscli's own driver
with every request intercepted (a ``before-call`` handler answers with an empty response, so nothing is
sent and no credentials are used) and a ``provide-client-params`` handler records the API operation and
its parameters. The operation's botocore input shape becomes a JSON schema; a few other operations of the
same service are offered as distractors.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import shlex
import tempfile
from pathlib import Path
from typing import Any, Iterator

from datamodules.errors import MissingSourceError
from datamodules.signals import fork_pool
from datamodules.sources import Document, Source, SourceStats
from datamodules.tool_corpus import check_distractors, environment, plain_text, request_stating_values, tool_example
from datamodules.tool_examples import validate_example

_FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE",
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_PAGER": "",
}
_CLEARED_ENV = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_CA_BUNDLE", "AWS_DEFAULT_PROFILE")


def _awscli():
    try:
        import awscli  # noqa: F401  (makes awscli's vendored botocore importable as `botocore`)
        import botocore
        from awscli.clidriver import create_clidriver
    except ImportError as e:
        raise MissingSourceError(
            f"the AWS tool corpus needs awscli ({e}). Install it with `pip install awscli` (or `make setup`)."
        ) from e
    return awscli, botocore, create_clidriver


@contextlib.contextmanager
def _fake_aws_env(tmp: Path) -> Iterator[None]:
    """Fake credentials, region and config for this process: nothing reads the user's AWS setup or asks IMDS,
    and awscli does not fetch ``http(s)://`` argument values (``cli_follow_urlparam``)."""
    config = tmp / "aws_config"
    config.write_text("[default]\ncli_follow_urlparam = false\n")
    with environment({**_FAKE_ENV, "AWS_CONFIG_FILE": str(config)}, _CLEARED_ENV):
        yield


# ---------------------------------------------------------------- botocore shapes -> JSON schema

_SCALARS = {
    "string": {"type": "string"},
    "character": {"type": "string"},
    "blob": {"type": "string"},
    "timestamp": {"type": "string", "format": "date-time"},
    "boolean": {"type": "boolean"},
    "integer": {"type": "integer"},
    "long": {"type": "integer"},
    "byte": {"type": "integer"},
    "short": {"type": "integer"},
    "float": {"type": "number"},
    "double": {"type": "number"},
    "bigdecimal": {"type": "number"},
    "biginteger": {"type": "integer"},
}


def shape_to_schema(shape: Any, describe: bool = True, max_depth: int = 4, _seen: tuple[str, ...] = ()) -> dict:
    """A botocore input shape as a JSON schema: structures keep their members and `required`, lists their
    items, maps their values, strings their enums. A recursive shape (DynamoDB's AttributeValue) or one nested
    deeper than `max_depth` structures (Glue's and QuickSight's inputs would run to megabytes) becomes a plain
    object or array."""
    kind = shape.type_name
    if kind == "structure":
        if getattr(shape, "is_document_type", False):
            schema: dict = {}
        elif shape.name in _seen or len(_seen) > max_depth:
            schema = {"type": "object"}
        else:
            seen = (*_seen, shape.name)
            schema = {
                "type": "object",
                "properties": {n: shape_to_schema(m, describe, max_depth, seen) for n, m in shape.members.items()},
                "additionalProperties": False,
            }
            if shape.required_members:
                schema["required"] = list(shape.required_members)
    elif kind == "list":
        schema = {"type": "array", "items": shape_to_schema(shape.member, describe, max_depth, _seen)}
    elif kind == "map":
        schema = {"type": "object", "additionalProperties": shape_to_schema(shape.value, describe, max_depth, _seen)}
    else:
        schema = dict(_SCALARS.get(kind, {}))
        if getattr(shape, "enum", None):
            schema["enum"] = list(shape.enum)
    if describe and _seen:  # top-level docs go into the tool's description instead
        doc = plain_text(shape.documentation, 120)
        if doc:
            schema["description"] = doc
    return schema


def operation_tool(service_model: Any, operation_name: str) -> dict:
    """The tool (name, description, parameters) for one botocore operation."""
    op = service_model.operation_model(operation_name)
    params = shape_to_schema(op.input_shape) if op.input_shape is not None else {"type": "object", "properties": {}}
    return {
        "name": tool_name(service_model.service_name, operation_name),
        "description": plain_text(op.documentation, 200) or f"{operation_name} ({service_model.service_name})",
        "parameters": params,
    }


def tool_name(service: str, operation: str) -> str:
    """The function name of an API operation: ``ec2`` + ``DescribeInstances`` -> ``ec2_describe_instances``."""
    from botocore import xform_name

    return f"{service}_{xform_name(operation)}".replace("-", "_")


# ---------------------------------------------------------------- the example .rst files

_BOLD_LINE = re.compile(r"^\*\*(.+?)\*\*:?\s*$")
_CONTENTS = re.compile(r"^contents of (?:the )?(?:file )?``?([^`]+?)``?(?: file)?\s*:?:\s*$", re.I)


def clean_rst(text: str) -> str:
    """RST prose -> plain text: links keep their label, literals and emphasis lose their markup."""
    text = re.sub(r"`([^`<]*?)\s*<[^>]*>`_{1,2}", r"\1", text)
    text = re.sub(r":\w+:`([^`]*)`", r"\1", text)
    text = re.sub(r"``([^`]*)``", r"\1", text)
    text = re.sub(r"\*\*([^*]+)\*\*|\*([^*]+)\*", lambda m: m.group(1) or m.group(2), text)
    text = re.sub(r"\s*::\s*$", ".", text.strip())
    text = text.replace("::", ":")
    return re.sub(r"\s+", " ", text).strip()


def parse_examples(rst: str) -> tuple[list[dict], dict[str, str]]:
    """Split an example .rst into examples ({title, prose, commands}) and the files it shows ({name: text})."""
    lines = rst.splitlines()
    examples: list[dict] = []
    contents: dict[str, str] = {}
    current = {"title": "", "prose": [], "commands": []}
    paragraph: list[str] = []
    i = 0

    def flush_paragraph() -> str:
        text = " ".join(paragraph)
        paragraph.clear()
        return text

    while i < len(lines):
        line = lines[i]
        bold = _BOLD_LINE.match(line.strip())
        if bold and not line.startswith(" "):
            flush_paragraph()
            if current["commands"]:
                examples.append(current)
                current = {"title": "", "prose": [], "commands": []}
            current["title"] = (current["title"] + " " + bold.group(1)).strip()
            i += 1
            continue
        if line.strip() and not line[0].isspace():
            paragraph.append(line.strip())
            if not line.rstrip().endswith("::"):
                i += 1
                continue
        elif not line.strip():
            if paragraph and not current["commands"]:
                current["prose"].append(flush_paragraph())
            paragraph.clear()
            i += 1
            continue
        # an indented (literal) block, introduced by the paragraph ending in "::" (if any)
        intro = flush_paragraph()
        i += 1 if intro else 0
        block: list[str] = []
        while i < len(lines) and (not lines[i].strip() or lines[i][0].isspace()):
            block.append(lines[i])
            i += 1
        body = _dedent(block)
        file_name = _CONTENTS.match(intro)
        if file_name:
            contents[file_name.group(1).strip()] = body
            continue
        if intro and not current["commands"] and not re.match(r"^(output|contents)\b", intro, re.I):
            current["prose"].append(intro)
        if body.startswith("aws "):
            current["commands"].extend(_split_commands(body))
    if current["commands"]:
        examples.append(current)
    return examples, contents


def _dedent(block: list[str]) -> str:
    indents = [len(l) - len(l.lstrip()) for l in block if l.strip()]
    cut = min(indents, default=0)
    return "\n".join(l[cut:] for l in block).strip("\n")


def _split_commands(body: str) -> list[str]:
    commands: list[str] = []
    for line in body.splitlines():
        if line.startswith("aws ") or not commands:
            commands.append(line)
        else:
            commands[-1] += "\n" + line
    return [c.strip() for c in commands]


def _command_args(command: str) -> list[str]:
    joined = re.sub(r"[\\^]\s*\n", " ", command)
    return shlex.split(joined)[1:]  # drop the leading "aws"


def _without_session_options(args: list[str]) -> list[str]:
    """Drop global options that would change the shared session for every later command (a `--profile`
    that doesn't exist here, `--debug` logging) or point it elsewhere (`--endpoint-url`)."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in ("--profile", "--endpoint-url"):
            skip = True
        elif a != "--debug" and not a.startswith(("--profile=", "--endpoint-url=")):
            out.append(a)
    return out


class AwsCliExamples(Source):
    """Tool-calling examples built from awscli's documentation examples and botocore's service models.

    Each kept example is one user request (the example's title and prose, plus a sentence naming any argument
    value the prose does not state, plus the contents of files the command reads), the operation's tool and
    3-7 distractor operations of the same service in a shuffled order, and the exact call awscli makes. Parsing
    never sends a request. Examples whose command awscli rejects, that call no API operation (``aws s3 cp``,
    ``aws deploy push``...) or that read a file the example does not show are skipped, counted by reason.

    Args:
        services: CLI service names to read (directories of ``awscli/examples``, e.g. ``ec2``, ``s3api``);
            all of them when None.
        min_distractors: Fewest other operations of the same service offered next to the right one.
        max_distractors: Most other operations offered; the count is drawn per example, seeded by its hash.
        name: Name of this source in manifests and logs (default: ``aws_cli_examples``).
        max_documents: Stop after this many examples (all when None).
        workers: Processes that parse commands (awscli-bound, ~16 examples/s each); the examples and their
            order do not depend on it. Default: ``stagewise prepare``'s ``workers`` (every core); read
            outside ``prepare``, up to 2.
    """

    def __init__(
        self,
        services: list[str] | None = None,
        min_distractors: int = 3,
        max_distractors: int = 7,
        name: str | None = None,
        max_documents: int | None = None,
        workers: int | None = None,
    ):
        super().__init__(name=name, max_documents=max_documents)
        check_distractors(min_distractors, max_distractors)
        self.services = services
        self.min_distractors = min_distractors
        self.max_distractors = max_distractors
        self._workers = workers  # not in the fingerprint

    def examples_dir(self) -> Path:
        awscli, _, _ = _awscli()
        return Path(awscli.__file__).parent / "examples"

    def files(self) -> list[Path]:
        root = self.examples_dir()
        if self.services is None:
            dirs = sorted(p for p in root.iterdir() if p.is_dir())
        else:
            dirs = [root / s for s in self.services]
            missing = [d.name for d in dirs if not d.is_dir()]
            if missing:
                raise MissingSourceError(
                    f"awscli has no examples for service(s) {', '.join(missing)} (in {root}). "
                    "Use names of directories there, e.g. ec2, s3api, dynamodb."
                )
        return sorted(p for d in dirs for p in d.glob("*.rst") if not p.name.startswith("_"))

    def fingerprint(self) -> str:
        awscli, botocore, _ = _awscli()
        base = super().fingerprint()
        return hashlib.sha256(f"{base} awscli={awscli.__version__} botocore={botocore.__version__}".encode()).hexdigest()

    def documents(self, stats: SourceStats) -> Iterator[Document]:
        root = self.examples_dir()
        jobs = [(str(path), path.relative_to(root).as_posix()) for path in self.files()]
        with tempfile.TemporaryDirectory(prefix="stagewise-aws-") as tmp:
            workers = self._workers or min(2, os.cpu_count() or 1)
            if workers > 1 and len(jobs) > 1 and "fork" in multiprocessing.get_all_start_methods():
                # One awscli driver per worker; imap keeps file order, so the documents are the serial ones.
                # Forked workers run only awscli (no torch, no tokenizers) and need no `__main__` guard.
                pool = fork_pool(workers, _start_worker, (tmp, self.min_distractors, self.max_distractors))
                try:
                    results = pool.imap(_file_examples, jobs, chunksize=4)
                    yield from self._documents(jobs, results, stats)
                finally:
                    pool.terminate()  # also when the reader stops early (max_documents)
            else:
                with _fake_aws_env(Path(tmp)):
                    extractor = _Extractor(Path(tmp), self.min_distractors, self.max_distractors)
                    results = (list(extractor.examples(Path(path), rel)) for path, rel in jobs)
                    yield from self._documents(jobs, results, stats)

    def _documents(self, jobs: list[tuple[str, str]], results, stats: SourceStats) -> Iterator[Document]:
        for (_, rel), outcomes in zip(jobs, results):
            for k, example in outcomes:
                if isinstance(example, str):
                    stats.skipped[example] += 1
                    continue
                yield Document(text=json.dumps(example, sort_keys=True), source=self.name, path=f"{rel}#{k}",
                               meta={"tool": example["tool_calls"][0]["name"], "family": "aws",
                                     "service": rel.split("/", 1)[0]})


_WORKER: dict[str, Any] = {}


def _start_worker(tmp: str, min_distractors: int, max_distractors: int) -> None:
    """Pool initializer (after ``fork_pool``'s signal defaults): fake AWS settings for the worker's lifetime and
    one extractor of its own."""
    work = Path(tempfile.mkdtemp(dir=tmp))
    _WORKER["env"] = _fake_aws_env(work)  # held: a collected context manager would restore the environment
    _WORKER["env"].__enter__()  # left only when the worker process ends with the pool
    _WORKER["extractor"] = _Extractor(work, min_distractors, max_distractors)


def _file_examples(job: tuple[str, str]) -> list[tuple[int, dict | str]]:
    path, rel = job
    return list(_WORKER["extractor"].examples(Path(path), rel))


class _Extractor:
    """One awscli driver (slow to build) reused for every command, with request interception and caches."""

    def __init__(self, tmp: Path, min_distractors: int, max_distractors: int):
        _, self.botocore, create_clidriver = _awscli()
        from awscli.clidriver import ServiceCommand
        from awscli.customizations import cloudfront

        # awscli's cloudfront shorthand (`--origin-domain-name`) fills CallerReference and the origin id with
        # the clock and a random number: a fixed suffix keeps every prepare's examples the same.
        cloudfront.unique_string = lambda prefix="cli": f"{prefix}-ref"
        self.tmp = tmp
        self.min_distractors, self.max_distractors = min_distractors, max_distractors
        for logger in ("awscli", "botocore", "s3transfer"):
            logging.getLogger(logger).setLevel(logging.CRITICAL)
        self.driver = create_clidriver()
        self.calls: list[tuple[str, str, dict]] = []
        session = self.driver.session
        session.register("provide-client-params", self._record)
        session.register("before-call", self._dummy_response)
        # Building a client costs ~20 ms and awscli makes one per command: reuse them.
        clients: dict = {}
        create_client = session.create_client

        def cached_create_client(service_name, *args, **kwargs):
            key = (service_name, args, tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
            if key not in clients:
                clients[key] = create_client(service_name, *args, **kwargs)
            return clients[key]

        session.create_client = cached_create_client
        # Each main() emits `session-initialized`, whose handlers register new argument handlers every time
        # (so every command got slower than the last): emit it once, as one CLI invocation would.
        emit_session_event = self.driver._emit_session_event

        def emit_once(parsed_args):
            if not self._session_initialized:
                emit_session_event(parsed_args)
                self._session_initialized = True

        self._session_initialized = False
        self.driver._emit_session_event = emit_once
        # ec2's boolean customization registers an `operation-args-parsed.ec2.*` check for the operation whose
        # arguments it just built; left in place it breaks every later ec2 command: drop it after each command.
        emitter = session.get_component("event_emitter")
        register = emitter.register
        self._per_command_handlers: list[tuple[str, Any]] = []

        def register_tracked(event_name, handler, *args, **kwargs):
            if event_name.startswith("operation-args-parsed."):
                self._per_command_handlers.append((event_name, handler))
            return register(event_name, handler, *args, **kwargs)

        emitter.register = register_tracked
        self._emitter = emitter
        self.commands = {
            name: cmd for name, cmd in self.driver._get_command_table().items() if isinstance(cmd, ServiceCommand)
        }
        self.tools: dict[tuple[str, str], dict] = {}
        self.services: dict[str, tuple[Any, dict[str, str]]] = {}

    def _record(self, params, model, **kwargs):
        # A copy, as the command gave them: botocore's before-parameter-build handlers then change this dict
        # in place (a random UUID for an idempotency token the command left out, base64 of ec2 user data),
        # which is not the call the command makes and made every prepare's corpus differ.
        self.calls.append((model.service_model.service_name, model.name, copy.deepcopy(params)))

    @staticmethod
    def _dummy_response(model, params, **kwargs):
        return _DummyHttpResponse(), {}

    def _tool(self, service_model, operation: str) -> dict:
        key = (service_model.service_name, operation)
        if key not in self.tools:
            self.tools[key] = operation_tool(service_model, operation)
        return self.tools[key]

    def _service(self, cli_service: str) -> tuple[Any, dict[str, str]]:
        """The botocore service model behind a CLI service name, and its operations by CLI name."""
        if cli_service not in self.services:
            command = self.commands.get(cli_service)
            if command is None:  # a customization such as `aws s3` or `aws configure`
                self.services[cli_service] = (None, {})
            else:
                model = command.service_model
                self.services[cli_service] = (model, {self.botocore.xform_name(op, "-"): op for op in model.operation_names})
        return self.services[cli_service]

    def examples(self, path: Path, rel: str) -> Iterator[tuple[int, dict | str]]:
        """``(k, example)`` for each example of one .rst file, in order; a skipped one's example is the reason."""
        cli_service, cli_operation = path.parent.name, path.stem
        model, operations = self._service(cli_service)
        try:
            examples, contents = parse_examples(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError):
            yield -1, "unreadable_rst"
            return
        if cli_operation not in operations:
            for _ in range(max(len(examples), 1)):
                yield -1, "not_api_operation"
            return
        if not examples:
            yield -1, "no_command"
        for k, ex in enumerate(examples):
            yield k, self._build(ex, contents, model, operations[cli_operation], cli_service, rel, k)

    def _build(self, ex: dict, contents: dict, model, operation: str, cli_service: str, rel: str, k: int):
        wanted = f"aws {cli_service} {path_op(rel)}"
        commands = [c for c in ex["commands"] if c.split("\\")[0].split()[:3] == wanted.split()]
        if len(commands) != 1:
            return "no_command" if not commands else "several_commands"
        try:
            args = _command_args(commands[0])
        except ValueError:
            return "unparsable_command"
        if any(a.startswith(("$", "`")) or "$(" in a or "<" in a[:1] for a in args):
            return "shell_syntax"
        args = _without_session_options(args)
        args, files_used = self._local_files(args, contents)
        if args is None:
            return "missing_file"
        self.calls.clear()
        out, err = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rc = self.driver.main(args)
        except (Exception, SystemExit):  # argparse exits on bad arguments
            return "cli_error"
        finally:
            for event_name, handler in self._per_command_handlers:
                self._emitter.unregister(event_name, handler)
            self._per_command_handlers.clear()
        calls = [c for c in self.calls if c[1] == operation]
        if rc != 0 or len(calls) != 1:
            return "cli_error" if rc != 0 else "no_api_call"
        arguments = calls[0][2]
        try:
            arguments = json.loads(json.dumps(arguments))
        except (TypeError, ValueError):
            return "binary_argument"  # fileb:// contents, opened streams

        request = self._request(ex, arguments, files_used)
        right = self._tool(model, operation)
        seed = int(hashlib.sha256(f"{rel}#{k}\n{commands[0]}".encode()).hexdigest()[:16], 16)
        others = sorted(op for op in model.operation_names if op != operation)
        example = tool_example(request, right, others, arguments, seed, self.min_distractors, self.max_distractors,
                               lambda op: self._tool(model, op))
        if example is None:
            return "too_few_operations"
        try:
            validate_example(example, rel)
        except Exception:
            return "schema_mismatch"
        return example

    def _local_files(self, args: list[str], contents: dict) -> tuple[list[str] | None, dict[str, str]]:
        """Point file:// arguments at the file contents the example shows; None if it doesn't show one."""
        used: dict[str, str] = {}
        out = []
        for a in args:
            m = re.match(r"^(fileb?)://(.+)$", a)
            if m:
                name = m.group(2)
                base = Path(name).name
                text = contents.get(name) or contents.get(base)
                if text is None:
                    return None, {}
                target = self.tmp / hashlib.sha256(text.encode()).hexdigest()[:16] / base
                target.parent.mkdir(exist_ok=True)
                target.write_text(text + "\n", encoding="utf-8")
                used[base] = text
                a = f"{m.group(1)}://{target}"
            out.append(a)
        return out, used

    @staticmethod
    def _request(ex: dict, arguments: dict, files_used: dict[str, str]) -> str:
        title = re.sub(r"^Example\s*\d+\s*[:.-]?\s*", "", clean_rst(ex["title"]), flags=re.I)
        parts = [title.rstrip(".:") + "." if title else ""]
        parts += [clean_rst(p) for p in ex["prose"]]
        request = " ".join(p for p in parts if p).strip()
        for name, text in files_used.items():
            request += f"\n\nContents of {name}:\n{text}"
        return request_stating_values(request, arguments)


def path_op(rel: str) -> str:
    return Path(rel).stem


class _DummyHttpResponse:
    """Stands in for the HTTP response a `before-call` handler must return alongside the parsed one."""

    status_code = 200
    headers: dict = {}
    content = b""
    text = ""
