"""experiments.tool_heldout_profile: the facts it counts, on a hand-made prompt and on the fixture corpus."""

import json

from experiments.tool_heldout_profile import main, profile_example, service_of

TOOLS = [{"name": "s3_get_object", "parameters": {"properties": {"Bucket": {}, "Key": {}}}},
         {"name": "s3_put_object", "parameters": {}}, {"name": "ec2_run_instances", "parameters": {}}]
PROMPT = ("<|system|>x<|end|><|tools|>\n" + "\n".join(json.dumps(t) for t in TOOLS) + "\n<|/tools|>"
          "<|user|>Get object photo.png from bucket b1, versioned true<|end|><|assistant|>")


def test_profile_example_counts_what_the_request_gives_away():
    call = {"name": "s3_get_object", "arguments": {"Bucket": "b1", "Key": "photo.png", "Versioned": True}}
    facts = profile_example(PROMPT, [call], 40)
    assert facts == {"offered": 3, "expected_offered": True, "same_service": 2, "named": True,
                     "values_verbatim": True, "calls": 1, "prompt_tokens": 40}
    # a value not in the request, a function it does not name, one it does not offer
    assert not profile_example(PROMPT, [dict(call, arguments={"Bucket": "b2"})], 40)["values_verbatim"]
    assert not profile_example(PROMPT, [dict(call, name="s3_put_object")], 40)["named"]
    assert not profile_example(PROMPT, [dict(call, name="s3_delete_object")], 40)["expected_offered"]
    assert service_of("az_network_vnet_create") == "az_network" and service_of("ec2_run_instances") == "ec2"


def test_profile_of_the_fixture_corpus_writes_its_table(tool_data_dir, tmp_path):
    result = main(["--data-dir", str(tool_data_dir), "--out", str(tmp_path / "p")])
    assert set(result["groups"]) >= {"seen"} and result["groups"]["seen"]["n"] > 0
    assert result["groups"]["seen"]["expected_offered"] == 1.0  # the fixture's requests offer their tool
    assert "| seen |" in (tmp_path / "p.md").read_text() and json.loads((tmp_path / "p.json").read_text())["groups"]
