"""Constrained tool-call decoding: names among the offered tools, argument keys among the tool's parameters."""

import json
import re

import pytest
import torch

from datamodules.tokenizer import load_tokenizer, render_tool_prompt
from lightning_modules.tool_constraint import ToolCallConstraint, _dip, offered_tools, token_pieces
from lightning_modules.tool_eval import evaluate_tool_calls, load_heldout_examples, parse_tool_call, predict_calls
from tests.lightning_modules.test_tool_eval import TOOLS, prepare_tiny, tool_examples

SCHEMAS = {t["name"]: t["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_tiny(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def tok(data_dir):
    return load_tokenizer(data_dir / "tokenizer")


def test_offered_tools_are_read_from_the_rendered_prompt(tok):
    prompt = tok.decode(render_tool_prompt(tok, tool_examples()[0]), skip_special_tokens=False)
    assert offered_tools(prompt) == SCHEMAS
    assert offered_tools("<|user|>no tools here<|end|>") == {}


class Scripted:
    """Logits that want one fixed text: each token scores by how much of the text it would continue from the
    row's text so far (the same character offset, also after the row was made to leave the text)."""

    def __init__(self, tok, want: str):
        self.tok, self.want = tok, want
        self.text = [tok.decode([i], skip_special_tokens=False) for i in range(len(tok))]

    def scores(self, done: str) -> torch.Tensor:
        rest = self.want[len(done):]
        s = torch.full((len(self.text),), -1.0)
        for i, piece in enumerate(self.text):
            if piece and rest.startswith(piece):
                s[i] = len(piece)
            elif piece and piece[0] == rest[:1]:
                s[i] = 0.0  # the right next character at least
        return s


class Preferring:
    """Logits that want one text and, where the constraint forbids what it wants, a second one (alone once the
    text has left the first)."""

    def __init__(self, tok, first: str, second: str):
        self.first, self.second = Scripted(tok, first), Scripted(tok, second)

    def scores(self, done: str) -> torch.Tensor:
        if not self.first.want.startswith(done):
            return self.second.scores(done)
        return 100 * self.first.scores(done) + self.second.scores(done)


def decode(tok, want: str, tools: dict, steps: int = 80, model=None, strict: bool = False) -> str:
    """Greedy decoding of ``Scripted(want)`` (or of ``model``) under the constraint, from a prompt of three tokens."""
    model = model or Scripted(tok, want)
    constraint = ToolCallConstraint(token_pieces(tok), [tools], strict)
    ids, new = torch.tensor([[1, 2, 3]]), []
    end = tok.convert_tokens_to_ids("<|end|>")
    for _ in range(steps):
        done = tok.decode(new, skip_special_tokens=False)
        token = int(constraint(ids, model.scores(done)[None]).argmax())
        new.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        if token == end:
            break
    return tok.decode(new, skip_special_tokens=False)


def test_a_misspelled_function_name_becomes_an_offered_one(tok):
    free = decode(tok, '<|tool_call|>{"name": "get_wether", "arguments": {"city": "Oslo"}}<|/tool_call|><|end|>', {})
    assert parse_tool_call(free)["name"] == "get_wether"  # without tools to keep to, the text as wanted
    text = decode(tok, '<|tool_call|>{"name": "get_wether", "arguments": {"city": "Oslo"}}<|/tool_call|><|end|>',
                  SCHEMAS)
    assert text.startswith('<|tool_call|>{"name": "get_weather", "arguments": ')
    # a misspelled parameter: free as wanted, constrained one of the tool's
    want = '<|tool_call|>{"name": "get_weather", "arguments": {"ciyt": "Oslo"}}<|/tool_call|><|end|>'
    assert parse_tool_call(decode(tok, want, {}))["arguments"] == {"ciyt": "Oslo"}
    keys = re.findall(r'(?:\{|, )"(\w+)": ', decode(tok, want, SCHEMAS).split('"arguments": ', 1)[1])
    assert keys and set(keys) <= {"city", "days"}


def test_argument_keys_are_the_tools_parameters_each_once(tok):
    pieces = token_pieces(tok)
    constraint = ToolCallConstraint(pieces, [SCHEMAS])
    row = constraint.rows[0]
    for piece in ['<|tool_call|>', '{"name": "get_weather", "arguments": ', '{']:
        row.feed(piece)

    def texts(allowed):
        return {pieces.text[i] for i in allowed}

    first = texts(row.allowed(pieces))
    # every allowed token keeps the text on '"city": ', '"days": ' or '}' (or completes one and goes on)
    targets = ['"city": ', '"days": ', "}"]
    assert first and all(any(t.startswith(p) or p.startswith(t) for t in targets) for p in first)
    assert "}" in first or any(p.startswith("}") for p in first)
    assert row.forbidden(pieces) is None  # the closing rules are strict decoding's
    row.feed('"city": "Oslo"')
    assert row.allowed(pieces) is None  # a value: free
    row.feed(",")
    after_comma = texts(row.allowed(pieces))
    assert after_comma and all(' "days": '.startswith(p) or p.startswith(' "days": ') for p in after_comma)
    row.feed(' "days": 3}')
    assert row.allowed(pieces) is None and row.arguments.used == ["city", "days"]


def test_strictly_the_arguments_close_only_with_every_required_parameter_and_the_call_ends_only_when_closed(tok):
    pieces = token_pieces(tok)
    row = ToolCallConstraint(pieces, [SCHEMAS], strict=True).rows[0]
    closing = [i for i, p in enumerate(pieces.text) if p.startswith("}")]  # }, }}, ...
    closing_a_value = [i for i, p in enumerate(pieces.text) if p.startswith('"}')]  # from inside a string
    enders = [tok.convert_tokens_to_ids(t) for t in ("<|/tool_call|>", "<|end|>")]
    assert closing and closing_a_value
    for piece in ['<|tool_call|>', '{"name": "convert_currency", "arguments": ', '{']:
        row.feed(piece)
    first = {pieces.text[i] for i in row.allowed(pieces)}
    assert first and not any(p.startswith("}") for p in first)  # "to" and "amount" are required: no empty object
    row.feed('"amount": 5')
    forbidden = row.forbidden(pieces)
    assert forbidden[closing].all() and forbidden[enders].all()  # "to" is still missing
    assert not forbidden[[i for i, p in enumerate(pieces.text) if p == ","]].any()
    row.feed(', "to": "EU')  # inside the last required value: a token that ends it and the object is fine now
    forbidden = row.forbidden(pieces)
    assert not forbidden[closing + closing_a_value].any() and forbidden[enders].all()
    before = ToolCallConstraint(pieces, [SCHEMAS], strict=True).rows[0]  # inside a value while "to" is missing
    for piece in ['<|tool_call|>', '{"name": "convert_currency", "arguments": ', '{"amount": 5, "note": "EU']:
        before.feed(piece)
    assert before.forbidden(pieces)[closing_a_value].all() and not before.forbidden(pieces)[closing].any()
    row.feed('R"}')  # the arguments are closed, the call's own object is not
    assert row.forbidden(pieces)[enders].all() and not row.forbidden(pieces)[closing].any()
    row.feed("}")
    assert row.forbidden(pieces) is None
    weather = ToolCallConstraint(pieces, [SCHEMAS], strict=True).rows[0]  # get_weather requires city only
    for piece in ['<|tool_call|>', '{"name": "get_weather", "arguments": ', '{"city": "Oslo"']:
        weather.feed(piece)
    assert not weather.forbidden(pieces)[closing].any()


def test_strictly_no_empty_arguments_in_one_token_scalar_arguments_end_and_escapes_are_read(tok):
    # a token's depth profile: its lowest depth, and whether it opens and closes again ("{}" in one token)
    assert _dip("}", False) == (-1, False) and _dip(" {}", False) == (0, True) and _dip("{}}", False) == (-1, True)
    assert _dip('"}', True) == (-1, False) and _dip('"}', True, escape=True) == (0, False)  # \" stays in the string
    pieces = token_pieces(tok)
    row = ToolCallConstraint(pieces, [SCHEMAS], strict=True).rows[0]
    row.feed("<|tool_call|>")
    head = '{"name": "get_weather", "arguments": '
    assert row._closes_too_soon(head + "{}") and row._closes_too_soon(head + " {}}")  # city is required
    assert not row._closes_too_soon(head + '{"city": "Oslo"}') and not row._closes_too_soon(head + "{")
    quote_close = [i for i, p in enumerate(pieces.text) if p == '"}']
    for ending, closes in (('"a', True), ('"a\\', False)):  # in a value, "} ends it and the object; after \\ not
        currency = ToolCallConstraint(pieces, [SCHEMAS], strict=True).rows[0]  # "to" is still missing
        for piece in ["<|tool_call|>", '{"name": "convert_currency", "arguments": ', '{"amount": 5, "note": ' + ending]:
            currency.feed(piece)
        assert bool(currency.forbidden(pieces)[quote_close].all()) is closes
    scalar = ToolCallConstraint(pieces, [SCHEMAS], strict=True).rows[0]
    for piece in ["<|tool_call|>", head, "null}"]:  # arguments that are no object: their "}" closes the call
        scalar.feed(piece)
    assert scalar.forbidden(pieces) is None


def test_strictly_a_call_that_would_leave_out_a_required_argument_names_it(tok):
    without = '<|tool_call|>{"name": "convert_currency", "arguments": {"amount": 5}}<|/tool_call|><|end|>'
    with_it = '<|tool_call|>{"name": "convert_currency", "arguments": {"amount": 5, "to": "EUR"}}<|/tool_call|><|end|>'
    model = Preferring(tok, without, with_it)
    left_out = {"name": "convert_currency", "arguments": {"amount": 5}}
    assert parse_tool_call(decode(tok, "", {}, model=model)) == left_out
    assert parse_tool_call(decode(tok, "", SCHEMAS, model=model)) == left_out  # names and keys only: as wanted
    assert parse_tool_call(decode(tok, "", SCHEMAS, model=model, strict=True)) == {
        "name": "convert_currency", "arguments": {"amount": 5, "to": "EUR"}}


def test_constrained_decoding_of_a_tiny_model_calls_offered_tools_with_their_parameters(data_dir, tok, monkeypatch):
    """A random tiny model prompted into a call: constrained, every call names an offered tool (and any keys it
    writes are that tool's), batched or not; free, it does not."""
    from lightning_modules.causal_lm import CausalLM

    torch.manual_seed(0)
    model = CausalLM(size="tiny", vocab_size=len(tok), model_overrides={"n_layers": 1, "max_seq_len": 512})
    model.configure_model()
    examples = load_heldout_examples(data_dir, "val", tokenizer=tok)
    call_open = tok.convert_tokens_to_ids("<|tool_call|>")
    prompted = [dict(e, prompt_ids=e["prompt_ids"] + [call_open]) for e in examples]

    def heads(texts):  # the call's text up to its arguments, as JSON
        return [json.loads(t.split(', "arguments": ', 1)[0] + "}") if ', "arguments": ' in t else None for t in texts]

    free = [text for _, text, _ in predict_calls(model, tok, prompted, max_new_tokens=24, batch_size=4)]
    assert not all(h is not None and h["name"] in SCHEMAS for h in heads(free))
    constrained = predict_calls(model, tok, prompted, max_new_tokens=24, batch_size=4, constrain=True)
    texts = [text for _, text, _ in constrained]
    assert len(texts) == len(examples) == 6
    assert all(h is not None and h["name"] in SCHEMAS for h in heads(texts))
    for text, head in zip(texts, heads(texts)):
        keys = re.findall(r'(?:\{|, )"(\w+)": ', text.split(', "arguments": ', 1)[1])
        assert set(keys) <= set(SCHEMAS[head["name"]]["properties"])  # top-level keys (values here hold no keys)
    one = predict_calls(model, tok, prompted, max_new_tokens=24, batch_size=1, constrain=True)
    assert [t for _, t, _ in one] == texts  # batching does not change what is decoded
    assert evaluate_tool_calls(model, tok, prompted, max_new_tokens=24, constrain=True)["constrained"] is True
    import lightning_modules.tool_constraint as tool_constraint

    built = []  # the `strict` each decoding's constraint was built with

    class Spy(ToolCallConstraint):
        def __init__(self, pieces, tools, strict=False):
            built.append(strict)
            super().__init__(pieces, tools, strict)

    monkeypatch.setattr(tool_constraint, "ToolCallConstraint", Spy)
    strict = evaluate_tool_calls(model, tok, prompted, max_new_tokens=24, constrain="strict")
    assert strict["constrained"] is True and strict["strict"] is True
    assert built and all(built)  # the strict rules reached every batch's constraint
    built.clear()
    assert "strict" not in evaluate_tool_calls(model, tok, prompted, max_new_tokens=24, constrain=True)
    assert built and not any(built)


def test_rows_count_must_match(tok):
    constraint = ToolCallConstraint(token_pieces(tok), [SCHEMAS])
    with pytest.raises(ValueError, match="1 rows"):
        constraint(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, len(tok)))
