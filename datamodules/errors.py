"""Errors a user can cause. The CLI prints their message (no traceback) and exits with status 2."""

import re


class StagewiseError(Exception):
    """A problem with the user's input or setup; the message says what is wrong and what to do."""


class MissingSourceError(StagewiseError):
    """A corpus source's files are not on this machine."""


class DataFormatError(StagewiseError):
    """Input data that cannot be read as the config says (malformed JSONL, a call outside its schema...)."""


class TokenizerMismatchError(StagewiseError):
    """Two artifacts were made with different tokenizers."""


class LineageError(StagewiseError):
    """A checkpoint and the stage record that should describe it disagree (the file was replaced)."""


def _type_name(text: str) -> str:
    name = re.sub(r"<class '(?:\w+\.)*(\w+)'>", r"\1", text).replace("typing.", "").replace("NoneType", "None")
    return re.sub(r"^Literal\[(.*)\]$", r"one of \1", name)


def argument_error(message: str, command: str) -> StagewiseError:
    """A one-paragraph StagewiseError from a jsonargparse parse error (an unknown option, a value of the
    wrong type, a missing config file), instead of the parser's usage and its tree of Union alternatives.

    Args:
        message: The message of the ``argparse.ArgumentError`` the parser raised (``exit_on_error=False``).
        command: The command that parsed, e.g. ``stagewise fit``, named in the hint.
    """
    path: list[str] = []
    expected: list[str] = []  # the types of a Union the value matched none of
    problems: list[str] = []
    other: list[str] = []
    for line in message.splitlines():
        line = line.strip().removeprefix("- ")
        key = lambda leaf=None: "`" + ".".join(path + ([leaf] if leaf else [])) + "`"  # noqa: E731
        if m := re.fullmatch(r'Parser key "([^"]+)":', line):
            path.append(m[1])
        elif m := re.fullmatch(r'Parser key "([^"]+)": (.+)', line):
            problems.append(f"{key(m[1])}: {m[2]}")
        elif line.startswith("Problem with given class_path"):
            path.append("init_args")
        elif m := re.search(r"[Oo]ption '([^']+)' is not accepted|does not accept option '([^']+)'|"
                            r"Key '([^']+)' is not expected", line):
            problems.append(f"unknown option {key(m[1] or m[2] or m[3])}")
        elif m := re.fullmatch(r"Expected a (.+?)\. Got value: (.*)", line):
            if "NoneType" not in m[1]:
                problems.append(f"{key()} must be {_type_name(m[1])}, got {m[2]!r}")
        elif m := re.fullmatch(r"Expected a (.+)", line):
            expected.append(_type_name(m[1]))
        elif m := re.fullmatch(r"Given value: (.*)", line):
            if expected and expected != ["None"]:
                problems.append(f"{key()} must be {' or '.join(expected)}, got {m[1]!r}")
            expected = []
        elif not re.match(r"Does not validate|Subtypes:|Errors:|Given value type:", line) and line:
            other.append(line)
    text = "; ".join(problems) or " ".join(other) or message
    return StagewiseError(
        f"{text}. Fix it in the -c config files or the command-line flags; "
        f"`{command} --help` lists the accepted options and their types."
    )
