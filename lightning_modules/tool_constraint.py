"""Constrained decoding of tool calls: the function's name is one of the offered tools and the arguments'
top-level keys are among that tool's parameters; with ``strict``, also its required parameters are all named and
the call's JSON is closed before the call ends.

This follows the strict modes of serving stacks (OpenAI's ``strict`` function calling, vLLM's guided decoding):
the request's tool schemas decide which tokens may come next. Here that covers only the places where a small
model's calls went wrong most often (run 7, ``experiments/results/gpu_pipeline_2026-12-02_run7``: names not on
offer, left-out arguments, calls that do not parse), and it needs no grammar library. Everything else, argument
values and nested objects included, is decoded freely. At each step a row is either free or at a point where the
text must continue one of a few known strings:

- after ``<|tool_call|>``: ``{"name": "<one offered name>", "arguments": `` (as the chat template renders it);
- at a key of the arguments object (right after its ``{``, or after a ``,`` at its top level):
  ``"<parameter>": `` for a parameter not used yet, or ``}`` right after the ``{`` (with ``strict``, only when
  the tool requires none).

With ``strict``, two closing rules forbid tokens rather than allow them. They are an option because a call held
open can run on into the token limit: the CPU demo's tiny tool model, which has not learned which tool a request
wants, parsed 0.42 of 50 strictly against 0.64 (``experiments/results/demo_tool_stage_2026-12-01.md``); whether
they help a trained model is not measured yet. While the tool's ``required`` parameters are not all
named, no token may close the arguments object (a ``}`` that would take it to depth 0, a ``"}`` that ends a value
and the object at once included). And until the call's JSON is closed (the arguments object and the ``}`` after
it), no special token may come, so the call cannot end (``<|/tool_call|>``, ``<|end|>``) before it closes.

The tokens allowed there are those whose text keeps the row on one of those strings, or completes one and
runs past it. They are found by looking up prefixes in the vocabulary, not by scanning all of it. A row
whose text has already left every string (a token that crossed a boundary wrongly) decodes freely from then on.

:class:`ToolCallConstraint` has transformers' ``LogitsProcessor`` signature, ``(input_ids, scores) -> scores``,
so the same object constrains ``transformers``' ``generate`` on an exported model as well as ours
(``lightning_modules.decoding.generate``, ``logits_processor=``).
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Iterable

import torch

from datamodules.tokenizer import CALL_CLOSE, CALL_OPEN, END, TOOLS_CLOSE, TOOLS_OPEN


def offered_tools(prompt_text: str) -> dict[str, dict]:
    """The tools a rendered prompt offers, ``{name: parameters schema}``, read from its last ``<|tools|>`` block
    (one JSON object per line, as the chat template writes them); lines that do not parse are left out."""
    if TOOLS_OPEN not in prompt_text:
        return {}
    block = prompt_text.rsplit(TOOLS_OPEN, 1)[1].split(TOOLS_CLOSE, 1)[0]
    tools = {}
    for line in block.splitlines():
        try:
            tool = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(tool, dict) and isinstance(tool.get("name"), str):
            tools[tool["name"]] = tool.get("parameters") if isinstance(tool.get("parameters"), dict) else {}
    return tools


class TokenPieces:
    """The text of every vocabulary entry, indexed for prefix lookups (built once per tokenizer)."""

    def __init__(self, tokenizer):
        special = set(tokenizer.all_special_ids)
        self.vocab_size = len(tokenizer)
        self.text: list[str] = []
        self.exact: dict[str, list[int]] = defaultdict(list)  # a token's text -> tokens with that text
        self.starting: dict[str, list[int]] = defaultdict(list)  # a prefix -> tokens whose text starts with it
        # the lowest depth each token's text reaches from 0, read outside a string (row 0), inside one (row 1) or
        # inside one right after a backslash (row 2); and whether, read from depth 0 outside a string, it opens
        # an object and closes it again (``{}``: an arguments object closed as soon as it opens)
        self.dip = torch.zeros(3, self.vocab_size, dtype=torch.int16)
        self.reopens = torch.zeros(self.vocab_size, dtype=torch.bool)
        # no special token inside a call's JSON (<|/tool_call|> and <|end|> among them): part of every strict mask
        self.special = torch.zeros(self.vocab_size, dtype=torch.bool)
        self.special[[i for i in special if 0 <= i < self.vocab_size]] = True
        for i in range(self.vocab_size):
            piece = tokenizer.decode([i], skip_special_tokens=False)
            self.text.append(piece)
            if i in special or not piece or "\ufffd" in piece:  # special, or a byte of a longer character
                continue
            if "}" in piece or "]" in piece:
                (self.dip[0, i], self.reopens[i]), (self.dip[1, i], _), (self.dip[2, i], _) = (
                    _dip(piece, False), _dip(piece, True), _dip(piece, True, escape=True))
            self.exact[piece].append(i)
            for k in range(1, len(piece) + 1):
                self.starting[piece[:k]].append(i)

    def continuing(self, done: str, targets: Iterable[str]) -> set[int] | None:
        """The tokens after which ``done`` + their text is still a prefix of one of ``targets``, or has
        completed one and runs past it. None when ``done`` is a proper prefix of no target (nothing to constrain)."""
        allowed: set[int] = set()
        live = False
        for target in targets:
            if len(target) <= len(done) or not target.startswith(done):
                continue
            live = True
            rest = target[len(done):]
            for k in range(1, len(rest)):
                allowed.update(self.exact.get(rest[:k], ()))
            allowed.update(self.starting.get(rest, ()))  # the rest exactly, or the rest and more
        return allowed if live else None


def _dip(text: str, in_string: bool, escape: bool = False) -> tuple[int, bool]:
    """The lowest depth ``text`` reaches (0 or below: it closes what was open) from depth 0, read from inside a
    JSON string (right after a backslash: ``escape``) or not; and whether it comes back to depth 0 after going
    above it (it opens something and closes it)."""
    depth = low = 0
    reopens = False
    for ch in text:
        if in_string:
            if escape:
                escape = False
            elif ch == "\\":
                escape = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            low = min(low, depth)
            reopens = reopens or depth == 0
    return low, reopens


_PIECES: dict[int, tuple[object, TokenPieces]] = {}


def token_pieces(tokenizer) -> TokenPieces:
    """:class:`TokenPieces` of ``tokenizer``, built once per tokenizer object (0.04 s at vocab 8192 on this project's CPU)."""
    held = _PIECES.get(id(tokenizer))
    if held is None or held[0] is not tokenizer:
        held = _PIECES[id(tokenizer)] = (tokenizer, TokenPieces(tokenizer))
    return held[1]


class _Arguments:
    """Where a call's arguments object stands, fed its text character by character: the depth, whether in a
    string, the parameters named so far, and where the current top-level key begins (``anchor``)."""

    def __init__(self):
        self.text, self.depth, self.in_string, self.escape = "", 0, False, False
        self.key_string, self.expect_key, self.closed = False, False, False
        self.anchor: int | None = None  # index in ``text`` where a top-level key is expected
        self.after_open = False  # that anchor directly follows the object's "{" (so "}" may close it)
        self.used: list[str] = []
        self._key_start = 0
        self.closed_at: int | None = None  # index in ``text`` of the "}" that closed the object
        self.opened = False  # its "{" came (else the arguments are not an object, and a "}" closes the call)

    def feed(self, chars: str) -> None:
        start = len(self.text)
        self.text += chars
        if self.closed:
            return
        for i, ch in enumerate(chars, start):
            if self.closed:
                break
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif ch == "\\":
                    self.escape = True
                elif ch == '"':
                    self.in_string = False
                    if self.key_string:
                        try:
                            self.used.append(json.loads(self.text[self._key_start:i + 1]))
                        except json.JSONDecodeError:
                            pass
                continue
            if ch == '"':
                self.in_string, self.key_string, self._key_start = True, self.depth == 1 and self.expect_key, i
            elif ch in "{[":
                self.depth += 1
                if ch == "{" and self.depth == 1:
                    self.anchor, self.after_open, self.expect_key, self.opened = i + 1, True, True, True
            elif ch in "}]":
                self.depth -= 1
                if self.depth <= 0:
                    self.closed, self.anchor, self.closed_at = True, None, i
            elif ch == "," and self.depth == 1:
                self.anchor, self.after_open, self.expect_key = i + 1, False, True
            elif ch == ":" and self.depth == 1:
                self.expect_key = False

    def targets(self, parameters: dict, strict: bool = False) -> list[str] | None:
        """The strings the text after the anchor must follow (None: no key expected now, or no schema to check)."""
        properties = parameters.get("properties")
        if self.anchor is None or self.closed or not isinstance(properties, dict):
            return None
        keys = [json.dumps(k) + ": " for k in properties if k not in self.used]
        if self.after_open:
            return keys + ([] if strict and self.missing(parameters) else ["}"])
        return [" " + k for k in keys]

    def missing(self, parameters: dict) -> list[str]:
        """The tool's required parameters (those it also lists as properties) not named yet."""
        required, properties = parameters.get("required"), parameters.get("properties")
        if not isinstance(required, list) or not isinstance(properties, dict):
            return []
        return [k for k in required if isinstance(k, str) and k in properties and k not in self.used]


class _Row:
    """One row's generated text and, inside a call, which tool it names and where its arguments stand."""

    def __init__(self, tools: dict[str, dict], strict: bool = False):
        self.tools, self.strict = tools, strict
        self.names = {name: '{"name": ' + json.dumps(name) + ', "arguments": ' for name in tools}
        self.call: str | None = None  # the text since the last <|tool_call|>, while inside that call
        self.tool: str | None = None
        self.arguments: _Arguments | None = None

    def feed(self, piece: str) -> None:
        if piece == CALL_OPEN:
            self.call, self.tool, self.arguments = "", None, None
            return
        if self.call is None:
            return
        if piece in (CALL_CLOSE, END):
            self.call = None
            return
        self.call += piece
        if self.tool is None:
            self.tool = self._tool_of(self.call)
            if self.tool is not None:
                self.arguments = _Arguments()
                self.arguments.feed(self.call[len(self.names[self.tool]):])
        elif self.arguments is not None:
            self.arguments.feed(piece)

    def _tool_of(self, call: str) -> str | None:
        """The offered tool whose head (``{"name": ..., "arguments": ``) the call text starts with, if any."""
        return next((n for n, head in self.names.items() if call.startswith(head)), None)

    def _closes_too_soon(self, call: str) -> bool:
        """Whether the call text ``call`` has closed its arguments object while a required parameter is missing."""
        tool = self._tool_of(call)
        if tool is None:
            return False
        arguments = _Arguments()
        arguments.feed(call[len(self.names[tool]):])
        return arguments.closed and arguments.opened and bool(arguments.missing(self.tools[tool]))

    def forbidden(self, pieces: TokenPieces) -> torch.Tensor | None:
        """The closing rules (module docstring): a bool mask [V] of the tokens that may not come next, or None."""
        if not self.strict or self.call is None or self.tool is None or self.arguments is None:
            return None
        args = self.arguments
        if args.closed:
            # the call's own object is closed too (or the arguments were no object and their "}" closed it): it may end
            return None if not args.opened or "}" in args.text[args.closed_at + 1:] else pieces.special
        if not args.missing(self.tools[self.tool]) or (args.depth == 0 and args.in_string):
            return pieces.special  # open, nothing required missing (or arguments that are a string): just not end
        if args.depth >= 1:  # no token that takes the object to depth 0
            return pieces.special | ((args.depth + pieces.dip[2 if args.escape else int(args.in_string)].int()) <= 0)
        return pieces.special | pieces.reopens  # before the object's "{": no "{}" in one token

    def allowed(self, pieces: TokenPieces) -> set[int] | None:
        if self.call is None or not self.tools:
            return None
        if self.tool is None:
            allowed = pieces.continuing(self.call, self.names.values())
            if self.strict and allowed:  # nor a token that ends the head and closes the arguments at once (` {}`)
                allowed = {i for i in allowed if not self._closes_too_soon(self.call + pieces.text[i])} or allowed
            return allowed
        targets = self.arguments.targets(self.tools[self.tool], self.strict) if self.arguments is not None else None
        if targets is None:
            return None
        return pieces.continuing(self.arguments.text[self.arguments.anchor:], targets)


class ToolCallConstraint:
    """A logits processor that keeps each row's tool calls to its offered tools (module docstring).

    Args:
        pieces: :class:`TokenPieces` of the model's tokenizer.
        tools: Per row of the batch, ``{name: parameters schema}`` (:func:`offered_tools` of its prompt); an
            empty dict leaves that row free.
        strict: Also the closing rules: every required parameter named, the call's JSON closed before it ends.

    Call it once per decoding step with every token so far (``input_ids`` [B, T], the prompt's included: a
    prompt may end inside a call) and the next token's scores [B, V]. It returns the scores with the tokens that
    would leave the offered tools set to ``-inf``. ``constrained_steps`` counts the row-steps it restricted.
    """

    def __init__(self, pieces: TokenPieces, tools: list[dict[str, dict]], strict: bool = False):
        self.pieces, self.rows = pieces, [_Row(t, strict) for t in tools]
        self.seen = 0  # tokens of input_ids already fed to the rows (the prompt's too: it may end in a call)
        self.constrained_steps = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[0] != len(self.rows):
            raise ValueError(f"ToolCallConstraint was built for {len(self.rows)} rows, called with {input_ids.shape[0]}")
        new = input_ids[:, self.seen:].tolist()
        self.seen = input_ids.shape[1]
        keep, width = {}, scores.shape[1]  # row -> bool [V]: the tokens it may take
        for b, (row, tokens) in enumerate(zip(self.rows, new)):
            for t in tokens:
                row.feed(self.pieces.text[t] if 0 <= t < len(self.pieces.text) else "")
            allowed, forbidden = row.allowed(self.pieces), row.forbidden(self.pieces)
            mask = None
            if allowed:  # an empty set (no token continues) is left free rather than forced to nonsense
                mask = torch.zeros(width, dtype=torch.bool)
                mask[[i for i in allowed if i < width]] = True
            if forbidden is not None and forbidden.any():
                n = min(width, len(forbidden))  # a model's padded vocabulary: its extra ids are not forbidden
                free = torch.ones(width, dtype=torch.bool)
                free[:n] = ~forbidden[:n]
                both = free if mask is None else mask & free
                mask = both if mask is None or both.any() else mask  # else the allowed ones (names, keys) still hold
            if mask is not None and mask.any():  # never a row with no token left
                keep[b] = mask
        if not keep:
            return scores
        self.constrained_steps += len(keep)
        rows = sorted(keep)
        index = torch.tensor(rows, device=scores.device)
        out = scores.clone()
        out[index] = scores[index].masked_fill(~torch.stack([keep[b] for b in rows]).to(scores.device), float("-inf"))
        return out
