"""What every tool corpus built from a CLI's documentation shares: a request that states every argument
value of the call, distractor tools drawn from the same family, and one example's shape.

A CLI example (awscli's ``aws ec2 ...``, azure-cli's ``az vm ...``) gives a title or a sentence and a command
line. Parsed by the CLI's own parser, the command line is the exact call; the title rarely names every value
the call passes, so :func:`request_stating_values` adds a sentence that does ("Use name MyVm, ..."): every
argument value is readable from the request, so a correct call never has to be guessed.
"""

from __future__ import annotations

import contextlib
import html
import json
import os
import random
import re
from typing import Any, Callable, Iterator


@contextlib.contextmanager
def environment(set: dict[str, str], clear: tuple[str, ...] = ()) -> Iterator[None]:
    """This process's environment with ``set`` set and ``clear`` removed, restored afterwards: a CLI parsed for
    its examples reads no user setup (credentials, profiles, config dirs)."""
    saved = {k: os.environ.get(k) for k in (*set, *clear)}
    os.environ.update(set)
    for k in clear:
        os.environ.pop(k, None)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def plain_text(doc: str | None, max_chars: int = 160) -> str:
    """Documentation (HTML or plain) -> its first sentence(s) as plain text, at most `max_chars` characters."""
    text = html.unescape(re.sub(r"<[^>]+>", " ", doc or ""))
    text = re.sub(r"\s+", " ", text).strip()
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    end = cut.rfind(". ")
    return cut[: end + 1] if end > 40 else cut.rsplit(" ", 1)[0] + "..."


def leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted path, scalar)`` for every scalar inside a JSON value (list items share their list's path)."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from leaves(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from leaves(v, path)
    else:
        yield path, value


def value_text(value: Any) -> str:
    """How a scalar argument value is written in a request (``true``, ``null``, ``42``, ``my-bucket``)."""
    return json.dumps(value) if isinstance(value, bool) or value is None else str(value)


def _quoted(value: str) -> str:
    return value if value and not re.search(r"[\s,]", value) else f'"{value}"'


def mentions(text: str, value: str) -> bool:
    """Whether ``value`` appears in ``text`` as a whole token (not inside a longer name)."""
    return re.search(r"(?<![\w-])" + re.escape(value) + r"(?![\w-])", text) is not None


def request_stating_values(request: str, arguments: dict) -> str:
    """``request`` plus a sentence naming each argument value it does not already mention, by its path."""
    missing: dict[str, str] = {}
    for leaf_path, value in leaves(arguments):
        shown = value_text(value)
        if not mentions(request, shown) and shown not in missing.values():
            missing.setdefault(f"{leaf_path}={shown}", shown)
    if missing:
        said = ", ".join(f"{key.split('=', 1)[0]} {_quoted(v)}" for key, v in missing.items())
        request += f"\n\nUse {said}."
    return request


def check_distractors(min_distractors: int, max_distractors: int) -> None:
    """A tool reader's distractor range (other tools offered beside the right one) must be 0 <= min <= max."""
    if not 0 <= min_distractors <= max_distractors:
        raise ValueError(f"need 0 <= min_distractors <= max_distractors, got {min_distractors}, {max_distractors}")


def tool_example(request: str, right: dict, others: list, arguments: dict, seed: int, min_distractors: int,
                 max_distractors: int, tool_of: Callable[[Any], dict] = lambda tool: tool) -> dict | None:
    """One example: the request, the right tool among ``min_distractors``-``max_distractors`` others of the
    same family (drawn per ``seed`` from ``others``, each made a tool by ``tool_of``) in a shuffled order, and
    the call; None when there are fewer than ``min_distractors`` others."""
    if len(others) < min_distractors:
        return None
    rng = random.Random(seed)
    n = min(rng.randint(min_distractors, max_distractors), len(others))
    tools = [right] + [tool_of(other) for other in rng.sample(others, n)]
    rng.shuffle(tools)
    return {
        "messages": [{"role": "user", "content": request}],
        "tools": tools,
        "tool_calls": [{"name": right["name"], "arguments": arguments}],
    }
