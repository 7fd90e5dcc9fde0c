import json
import os
import re
import socket

import pytest

pytest.importorskip("awscli")

import awscli  # noqa: E402,F401  (makes awscli's vendored botocore importable)
from botocore.model import ServiceModel  # noqa: E402

from datamodules.aws_tools import AwsCliExamples, parse_examples, shape_to_schema  # noqa: E402
from datamodules.errors import MissingSourceError  # noqa: E402
from datamodules.sources import SourceStats  # noqa: E402
from datamodules.tool_corpus import leaves, value_text  # noqa: E402
from datamodules.tool_examples import validate_example  # noqa: E402

MODEL = {
    "metadata": {"protocol": "json", "apiVersion": "2024-01-01", "endpointPrefix": "demo", "serviceId": "Demo"},
    "operations": {"PutThing": {"name": "PutThing", "input": {"shape": "PutThingRequest"}}},
    "shapes": {
        "PutThingRequest": {
            "type": "structure",
            "required": ["Name"],
            "members": {
                "Name": {"shape": "String", "documentation": "<p>The <b>name</b> of the thing.</p>"},
                "Color": {"shape": "Color"},
                "Tags": {"shape": "TagList"},
                "Labels": {"shape": "LabelMap"},
                "Size": {"shape": "Long"},
                "Node": {"shape": "Node"},
            },
        },
        "String": {"type": "string"},
        "Long": {"type": "long"},
        "Color": {"type": "string", "enum": ["red", "blue"]},
        "TagList": {"type": "list", "member": {"shape": "Tag"}},
        "Tag": {"type": "structure", "members": {"Key": {"shape": "String"}, "Value": {"shape": "String"}}},
        "LabelMap": {"type": "map", "key": {"shape": "String"}, "value": {"shape": "String"}},
        "Node": {"type": "structure", "members": {"Child": {"shape": "Node"}}},
    },
}


def test_shape_to_schema_converts_structure_list_map_enum_and_recursion():
    shape = ServiceModel(MODEL, "demo").operation_model("PutThing").input_shape
    schema = shape_to_schema(shape)
    props = schema["properties"]
    assert schema["type"] == "object" and schema["required"] == ["Name"]
    assert props["Name"] == {"type": "string", "description": "The name of the thing."}
    assert props["Color"] == {"type": "string", "enum": ["red", "blue"]}
    assert props["Tags"]["type"] == "array" and set(props["Tags"]["items"]["properties"]) == {"Key", "Value"}
    assert props["Labels"] == {"type": "object", "additionalProperties": {"type": "string"}}
    assert props["Size"] == {"type": "integer"}
    assert props["Node"]["properties"]["Child"] == {"type": "object"}  # recursion stops one level down


def test_parse_examples_splits_titles_commands_and_shown_files():
    rst = (
        "**Example 1: To make a thing**\n\nThe following ``put-thing`` example makes one. ::\n\n"
        "    aws demo put-thing \\\n        --name a\n\nOutput::\n\n    {}\n\n"
        "**Example 2: To make another**\n\nThis example reads a file. ::\n\n"
        "    aws demo put-thing --cli-input-json file://in.json\n\nContents of ``in.json``::\n\n    {\"Name\": \"b\"}\n"
    )
    examples, contents = parse_examples(rst)
    assert [e["title"] for e in examples] == ["Example 1: To make a thing", "Example 2: To make another"]
    assert examples[0]["commands"] == ["aws demo put-thing \\\n    --name a"]
    assert contents == {"in.json": '{"Name": "b"}'}


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_extracts_exact_calls_with_distractors_and_no_network(no_network, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    source = AwsCliExamples(services=["sqs", "acm"], workers=1)  # in-process: no_network covers it
    stats = SourceStats()
    docs = list(source.read(stats))
    assert len(docs) >= 15
    for doc in docs:
        example = json.loads(doc.text)
        validate_example(example, doc.path)
        call = example["tool_calls"][0]
        names = [t["name"] for t in example["tools"]]
        assert call["name"] in names and 4 <= len(names) <= 8
        assert re.fullmatch(r"(sqs|acm)_[a-z0-9_]+", call["name"])
        request = example["messages"][0]["content"]
        for _, value in leaves(call["arguments"]):
            assert value_text(value) in request, (doc.path, value)
    assert "AWS_ACCESS_KEY_ID" not in os.environ  # the fake credentials were only set while reading
    assert sum(stats.skipped.values()) > 0  # several-command and missing-file examples are counted, not kept
    again = [d.text for d in AwsCliExamples(services=["sqs", "acm"], workers=1).read(SourceStats())]
    assert again == [d.text for d in docs]  # distractors and their order are deterministic


def test_unknown_service_names_the_problem():
    with pytest.raises(MissingSourceError, match="no-such-service"):
        AwsCliExamples(services=["no-such-service"]).files()


def test_parallel_workers_give_the_serial_documents_and_counts():
    serial_stats, parallel_stats = SourceStats(), SourceStats()
    serial = [(d.path, d.text) for d in AwsCliExamples(services=["sqs", "acm"], workers=1).read(serial_stats)]
    parallel = [(d.path, d.text) for d in AwsCliExamples(services=["sqs", "acm"], workers=2).read(parallel_stats)]
    assert parallel == serial and parallel_stats.skipped == serial_stats.skipped
    capped = SourceStats()
    first = [(d.path, d.text) for d in AwsCliExamples(services=["sqs", "acm"], workers=2, max_documents=5).read(capped)]
    assert first == serial[:5] and capped.documents == 5


def test_the_same_examples_every_prepare():
    """Two values the command does not give were random: botocore fills a missing idempotency token with a
    UUID (accessanalyzer apply-archive-rule: clientToken), awscli's cloudfront shorthand a CallerReference
    from the clock (create-distribution). They made every prepare's tool corpus, its split and the
    tokenizer trained on it differ."""
    def read(service, n):
        return [(d.path, d.text) for d in AwsCliExamples(services=[service], workers=1, max_documents=n).read(SourceStats())]

    for service, n in [("accessanalyzer", 3), ("cloudfront", 9)]:
        first = read(service, n)
        assert first == read(service, n), service
    call = json.loads(read("accessanalyzer", 1)[0][1])["tool_calls"][0]
    assert call["name"] == "accessanalyzer_apply_archive_rule" and "clientToken" not in call["arguments"]
    path, text = read("cloudfront", 9)[-1]
    assert path == "cloudfront/create-distribution.rst#0" and '"CallerReference": "cli-ref"' in text
