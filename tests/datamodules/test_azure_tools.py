"""azure-cli's help examples as exact calls, parsed by azure-cli's own parser with its argument registry."""

import json
import socket

import pytest

pytest.importorskip("azure.cli.core")

from datamodules.azure_tools import AzureCliExamples, tool_name  # noqa: E402
from datamodules.sources import SourceStats  # noqa: E402
from datamodules.tool_corpus import leaves, value_text  # noqa: E402
from datamodules.tool_examples import validate_example  # noqa: E402


@pytest.fixture(scope="module")
def group_examples():
    with pytest.MonkeyPatch.context() as mp:  # parsing an example never reaches the network
        def refuse(*args, **kwargs):
            raise AssertionError("network access attempted")

        mp.setattr(socket, "create_connection", refuse)
        mp.setattr(socket.socket, "connect", refuse)
        stats = SourceStats()
        docs = list(AzureCliExamples(groups=["group", "lock"]).read(stats))
    return docs, stats


def test_examples_are_exact_calls_with_registry_schemas_and_same_group_distractors(group_examples):
    docs, stats = group_examples
    assert len(docs) >= 20 and sum(stats.skipped.values()) > 0
    by_path = {d.path: json.loads(d.text) for d in docs}
    for doc in docs:
        example = by_path[doc.path]
        validate_example(example, doc.path)
        call = example["tool_calls"][0]
        group = doc.path.split()[0]
        assert doc.meta == {"tool": call["name"], "family": "azure", "service": group}
        names = [t["name"] for t in example["tools"]]
        assert call["name"] in names and 4 <= len(names) <= 8
        assert all(n.startswith(f"az_{group}_") for n in names)  # distractors of the same group
        request = example["messages"][0]["content"]
        for _, value in leaves(call["arguments"]):
            assert value_text(value) in request, (doc.path, value)
    create = by_path["group create#0"]
    assert create["tool_calls"][0] == {"name": "az_group_create",
                                       "arguments": {"location": "westus", "name": "MyResourceGroup"}}
    schema = next(t for t in create["tools"] if t["name"] == tool_name("group create"))["parameters"]
    assert set(schema["required"]) == {"name", "location"}  # from the command's own argument registry
    assert schema["properties"]["tags"]["type"] == "array"
    assert schema["properties"]["location"]["description"].startswith("Location")


def test_the_same_examples_every_time(group_examples):
    docs, _ = group_examples
    again = [(d.path, d.text) for d in AzureCliExamples(groups=["group", "lock"]).read(SourceStats())]
    assert again == [(d.path, d.text) for d in docs]
