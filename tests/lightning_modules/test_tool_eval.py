"""Tool-call parsing and scoring: what counts as a valid, right-name and right call."""

import pytest

from lightning_modules.tool_eval import parse_tool_call, score_calls

CALL = {"name": "s3_list_objects", "arguments": {"bucket": "logs", "max_keys": 10, "prefix": "2024/"}}


def test_parse_between_markers_ignores_what_follows():
    text = '<|tool_call|>{"name": "f", "arguments": {"a": 1}}<|/tool_call|><|end|> trailing {"x": 2}'
    assert parse_tool_call(text) == {"name": "f", "arguments": {"a": 1}}


def test_parse_without_closing_marker_or_markers():
    assert parse_tool_call('<|tool_call|> {"name": "f", "arguments": {}}') == {"name": "f", "arguments": {}}
    assert parse_tool_call('sure: {"name": "g", "arguments": {"b": "x"}} done') == {"name": "g", "arguments": {"b": "x"}}


@pytest.mark.parametrize("text", [
    "",
    "<|tool_call|>{\"name\": \"f\", \"arguments\": {\"a\": <|/tool_call|>",   # truncated JSON
    "no call at all",
    '<|tool_call|>{"arguments": {"a": 1}}<|/tool_call|>',                    # no name
    '<|tool_call|>{"name": "f", "arguments": [1, 2]}<|/tool_call|>',         # arguments not an object
])
def test_parse_returns_none_when_unparseable(text):
    assert parse_tool_call(text) is None


def test_parse_accepts_arguments_as_json_string():
    assert parse_tool_call('{"name": "f", "arguments": "{\\"a\\": 1}"}') == {"name": "f", "arguments": {"a": 1}}


def test_scores_valid_invalid_wrong_name_wrong_argument():
    predicted = [
        CALL,                                                               # right
        None,                                                               # not JSON
        {"name": "s3_get_object", "arguments": CALL["arguments"]},          # wrong name
        {"name": CALL["name"], "arguments": {**CALL["arguments"], "bucket": "other"}},  # wrong argument
    ]
    scores = score_calls(predicted, [CALL] * 4)
    assert scores == {"n": 4, "json_valid": 0.75, "name_accuracy": 0.5, "call_accuracy": 0.25}


def test_argument_order_irrelevant_numbers_as_numbers_strings_differ():
    reordered = {"name": CALL["name"], "arguments": {"prefix": "2024/", "max_keys": 10.0, "bucket": "logs"}}
    as_string = {"name": CALL["name"], "arguments": {"bucket": "logs", "max_keys": "10", "prefix": "2024/"}}
    missing = {"name": CALL["name"], "arguments": {"bucket": "logs", "max_keys": 10}}
    assert score_calls([reordered], [CALL])["call_accuracy"] == 1.0
    assert score_calls([as_string], [CALL])["call_accuracy"] == 0.0
    assert score_calls([missing], [CALL])["call_accuracy"] == 0.0


def test_nested_arguments_and_booleans():
    expected = {"name": "f", "arguments": {"filters": [{"k": "a", "v": [1, 2]}], "dry_run": True}}
    same = {"name": "f", "arguments": {"dry_run": True, "filters": [{"v": [1.0, 2], "k": "a"}]}}
    list_order = {"name": "f", "arguments": {"dry_run": True, "filters": [{"v": [2, 1], "k": "a"}]}}
    bool_as_int = {"name": "f", "arguments": {"dry_run": 1, "filters": [{"k": "a", "v": [1, 2]}]}}
    assert score_calls([same, list_order, bool_as_int], [expected] * 3)["call_accuracy"] == pytest.approx(1 / 3)


def test_score_lengths_must_match():
    with pytest.raises(ValueError):
        score_calls([None], [CALL, CALL])
