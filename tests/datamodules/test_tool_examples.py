import copy
import json
import shutil

import pytest

from datamodules.errors import DataFormatError
from datamodules.sources import SourceStats
from datamodules.tool_examples import ToolJsonl, validate_example

FIXTURE = "tests/fixtures/tools/weather.jsonl"


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
        (lambda e: e["messages"][0].pop("content"), "lacks content"),
        (lambda e: e["tools"][0].pop("parameters"), "lacks parameters"),
        (lambda e: e["tools"][0].__setitem__("parameters", {"type": "nonsense"}), "not a valid JSON schema"),
        (lambda e: e.pop("tool_calls"), "`tool_calls`"),
        (lambda e: e["tool_calls"][0].__setitem__("arguments", "city=Oslo"), "must be an object"),
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
