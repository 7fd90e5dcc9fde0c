import copy
import json
import shutil

import pytest

from datamodules.errors import DataFormatError
from datamodules.sources import SourceStats
from datamodules.tool_examples import ToolJsonl, validate_example

FIXTURE = "tests/fixtures/tools/weather.jsonl"
OPENAI = "tests/fixtures/tools/openai.jsonl"  # OpenAI chat form: wrapped tools, calls in messages, tool results


def good() -> dict:
    with open(FIXTURE) as f:
        return json.loads(f.readline())


def test_accepts_a_well_formed_example():
    validate_example(good(), "x.jsonl:1")


def _break(mutate):
    example = copy.deepcopy(good())
    mutate(example)
    return example


@pytest.mark.parametrize(
    "mutate, problem",
    [
        (lambda e: e.pop("messages"), "`messages`"),
        (lambda e: e.__setitem__("messages", []), "`messages`"),
        (lambda e: e["messages"][0].pop("content"), "`messages[0].content` of a user message must be a string"),
        (lambda e: e["messages"][0].__setitem__("role", "bot"), "`messages[0].role` must be one of"),
        (lambda e: e["tools"][0].pop("parameters"), "lacks parameters"),
        (lambda e: e["tools"][0].__setitem__("parameters", {"type": "nonsense"}), "not a valid JSON schema"),
        (lambda e: e.pop("tool_calls"), "`tool_calls`"),
        (lambda e: e["tool_calls"][0].__setitem__("arguments", "city=Oslo"), "`tool_calls[0].arguments` of `get_weather` "
                                                                                "is a string but not JSON"),
        (lambda e: e["tool_calls"][0].__setitem__("arguments", [1]), "must be an object or a JSON string of one"),
        (lambda e: e["tool_calls"][0].__setitem__("name", "get_news"), "not among the tools"),
        (lambda e: e["tool_calls"][0]["arguments"].pop("city"), "'city' is a required property"),
        (lambda e: e["tool_calls"][0]["arguments"].__setitem__("unit", "kelvin"), "at unit"),
        (lambda e: e["tool_calls"][0]["arguments"].__setitem__("days", 3), "Additional properties"),
    ],
)
def test_rejects_each_bad_shape_naming_where(mutate, problem):
    with pytest.raises(DataFormatError) as err:
        validate_example(_break(mutate), "calls.jsonl:7")
    assert "calls.jsonl:7" in str(err.value) and problem in str(err.value)


def test_reader_yields_one_sorted_json_document_per_line():
    stats = SourceStats()
    docs = list(ToolJsonl(paths=[FIXTURE]).read(stats))
    assert [d.path for d in docs] == [f"{FIXTURE}:1", f"{FIXTURE}:3"]  # the blank line 2 is ignored
    assert docs[0].text == json.dumps(good(), sort_keys=True) and stats.documents == 2


@pytest.mark.parametrize(
    "line, problem",
    [
        ('{"messages": [', "not valid JSON"),
        (json.dumps({k: v for k, v in good().items() if k != "tool_calls"}), "`tool_calls`"),
        (json.dumps(_break(lambda e: e["tool_calls"][0].__setitem__("name", "get_news"))), "not among the tools"),
        (json.dumps(_break(lambda e: e["tool_calls"][0]["arguments"].__setitem__("city", 5))), "at city"),
    ],
)
def test_reader_names_file_and_line_of_a_bad_line(tmp_path, line, problem):
    path = tmp_path / "calls.jsonl"
    shutil.copy(FIXTURE, path)
    with open(path, "a") as f:
        f.write(line + "\n")
    with pytest.raises(DataFormatError) as err:
        list(ToolJsonl(paths=[str(path)]).read(SourceStats()))
    assert f"{path}:4" in str(err.value) and problem in str(err.value)


def openai_lines() -> list[dict]:
    with open(OPENAI) as f:
        return [json.loads(line) for line in f]


def test_an_openai_chat_line_is_the_same_document_as_its_stagewise_line():
    """Wrapped tools, the call inside an assistant message, arguments as a JSON string: canonically the first
    line of the stagewise-shaped fixture."""
    assert validate_example(openai_lines()[0], "openai.jsonl:1") == validate_example(good())
    docs = list(ToolJsonl(paths=[OPENAI]).read(SourceStats()))
    assert docs[0].text == json.dumps(good(), sort_keys=True)


def test_multi_turn_conversations_keep_every_turn():
    ending_in_calls, ending_in_text = (validate_example(e) for e in openai_lines()[1:])
    # ends in a call: the earlier turns stay in messages, the last call becomes tool_calls
    assert [m["role"] for m in ending_in_calls["messages"]] == ["user", "assistant", "tool", "user"]
    assert ending_in_calls["messages"][1]["tool_calls"] == [{"name": "get_weather", "arguments": {"city": "Oslo"}}]
    assert ending_in_calls["tool_calls"] == [{"name": "get_time", "arguments": {"city": "Lima"}}]
    # ends in a text answer: the conversation as it is, calls flat
    assert "tool_calls" not in ending_in_text and ending_in_text["messages"][-1]["content"].startswith("It is 14")
    assert [c["name"] for c in ending_in_text["messages"][2]["tool_calls"]] == ["get_weather", "get_time"]


@pytest.mark.parametrize("mutate, problem", [
    (lambda e: e["messages"][1]["tool_calls"][0]["function"].__setitem__("arguments", "{city: Oslo"),
     "`messages[1].tool_calls[0].function.arguments` of `get_weather` is a string but not JSON"),
    (lambda e: e["messages"][1]["tool_calls"][0]["function"].__setitem__("name", "get_news"),
     "`messages[1].tool_calls[0].function` calls `get_news`, which is not among the tools"),
    (lambda e: e["tools"][1]["function"].pop("parameters"), "`tools[1].function` lacks parameters"),
    (lambda e: e["messages"].pop(), "no assistant answer"),
    (lambda e: e["messages"][1].__setitem__("tool_calls", []), "`messages[1].tool_calls` must be a non-empty list"),
])
def test_openai_lines_name_the_field(mutate, problem):
    example = copy.deepcopy(openai_lines()[1])
    mutate(example)
    with pytest.raises(DataFormatError) as err:
        validate_example(example, "chat.jsonl:2")
    assert str(err.value).startswith("chat.jsonl:2: ") and problem in str(err.value)


def test_a_line_that_is_not_utf8_names_file_line_and_byte(tmp_path):
    path = tmp_path / "calls.jsonl"
    path.write_bytes(open(FIXTURE, "rb").read() + b'{"messages": "caf\xe9"}\n')
    with pytest.raises(DataFormatError, match=rf"{path}:4: not UTF-8 \(byte 0xe9 at column 18\)"):
        list(ToolJsonl(paths=[str(path)]).read(SourceStats()))
