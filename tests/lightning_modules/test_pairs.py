"""`stagewise pairs`: the parent's own wrong calls or corrupted ones, keyed by the parent's sha256."""

import json
import random
import shutil

import pytest
import torch

from datamodules.preference import pairs_dir, read_pairs
from datamodules.stage_record import file_sha256
from datamodules.tool_examples import prepared_examples
from lightning_modules.cli import main
from lightning_modules.pairs import corrupt_call, make_pair, pairs
from lightning_modules.tool_eval import calls_equal

TOOLS = [
    {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]
CALL = {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}


def test_each_corruption_is_a_wrong_call_of_its_kind():
    kinds = {}
    for seed in range(40):
        wrong, kind = corrupt_call(CALL, TOOLS, random.Random(seed))
        kinds[kind] = wrong
        assert not calls_equal(wrong, CALL)
    assert set(kinds) == {"wrong_function", "wrong_argument", "missing_argument"}
    assert kinds["wrong_function"] == {"name": "get_time", "arguments": CALL["arguments"]}  # an offered tool
    assert len(kinds["missing_argument"]["arguments"]) == 1
    changed = kinds["wrong_argument"]["arguments"]
    assert changed.keys() == CALL["arguments"].keys() and (changed["unit"] == "fahrenheit" or changed["city"] == "Osl")
    # nothing to corrupt: one function, no arguments
    assert corrupt_call({"name": "get_time", "arguments": {}}, TOOLS[1:], random.Random(0)) is None
    assert corrupt_call(CALL, TOOLS, random.Random(3)) == corrupt_call(CALL, TOOLS, random.Random(3))  # seeded


def test_rejected_is_the_parents_own_wrong_call_else_a_corrupted_one():
    example = {"messages": [{"role": "user", "content": "Weather in Oslo?"}], "tools": TOOLS, "tool_calls": [CALL]}
    own = {"name": "get_weather", "arguments": {"city": "Oslo"}}
    pair = make_pair(example, "<|tool_call|>...", own, random.Random(0))
    assert pair["chosen"] == [CALL] and pair["rejected"] == [own] and pair["rejected_from"] == "model"
    assert pair["messages"] == example["messages"] and pair["tools"] == TOOLS and "tool_calls" not in pair
    for right_or_none in (dict(CALL), None):  # a right answer, or no parseable call: corrupt the reference
        pair = make_pair(example, "", right_or_none, random.Random(0))
        assert pair["rejected_from"] != "model" and not calls_equal(pair["rejected"][0], CALL)


def test_pairs_are_keyed_by_the_parent_sha256_and_rerun_is_up_to_date(tool_data_dir, tool_parent, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tool_data_dir, data)
    args = ["pairs", "--parent", str(tool_parent), "--data_dir", str(data), "--max_new_tokens", "24",
            "--accelerator", "cpu"]
    main(args)
    sha = file_sha256(tool_parent)
    out = pairs_dir(data, sha)
    assert out == data / "preference" / sha[:12]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parent"]["sha256"] == sha and manifest["settings"]["seq_len"] == 128  # the parent's window
    train, val = read_pairs(out, "train"), read_pairs(out, "val")
    requests = prepared_examples(data / "tools", "train")
    assert manifest["splits"]["train"]["requests"] == len(requests) == len(train) + manifest["splits"]["train"]["skipped"]
    assert len(val) == manifest["splits"]["val"]["pairs"] > 0
    by_request = {json.dumps(e["messages"]): e for e in requests}
    for pair in train:
        assert pair["chosen"] == by_request[json.dumps(pair["messages"])]["tool_calls"]
        assert not calls_equal(pair["rejected"][0], pair["chosen"][0])
    assert sum(manifest["splits"]["train"]["rejected_from"].values()) == len(train)
    # a second run with the same settings does nothing; other settings are refused without --overwrite
    mtime = (out / "train.jsonl").stat().st_mtime_ns
    main(args)
    assert "up to date" in capsys.readouterr().err and (out / "train.jsonl").stat().st_mtime_ns == mtime
    with pytest.raises(SystemExit) as exit_:
        main(args + ["--limit", "5"])
    assert exit_.value.code == 2 and "--overwrite" in capsys.readouterr().err
    # another parent (another experiment's tool model) gets its own directory; the first stays as it was
    other = tmp_path / "other.ckpt"
    ckpt = torch.load(tool_parent, weights_only=False)
    torch.save({**ckpt, "epoch": ckpt["epoch"] + 1}, other)
    assert pairs(str(other), str(data), limit=5, val_limit=2, max_new_tokens=8, accelerator="cpu") != out
    assert len(read_pairs(out, "train")) == len(train) and len(list((data / "preference").iterdir())) == 2


def test_sampled_pairs_go_to_their_tag_and_the_stage_serves_them_only_when_asked(tool_data_dir, tool_parent, tmp_path):
    from datamodules.errors import StagewiseError
    from datamodules.preference import PreferenceDataModule

    data = tmp_path / "data"
    shutil.copytree(tool_data_dir, data)
    kwargs = dict(limit=12, val_limit=3, max_new_tokens=16, accelerator="cpu")
    greedy = pairs(str(tool_parent), str(data), **kwargs)
    sampled = pairs(str(tool_parent), str(data), temperature=1.0, tag="t1", **kwargs)
    sha = file_sha256(tool_parent)
    assert sampled == data / "preference" / f"{sha[:12]}-t1" != greedy
    settings = json.loads((sampled / "manifest.json").read_text())["settings"]
    assert settings["temperature"] == 1.0 and "temperature" not in json.loads((greedy / "manifest.json").read_text())["settings"]
    # the manifest says how each split's answers were decoded (a sampled set's accuracy is its samples')
    splits = {p: json.loads((p / "manifest.json").read_text())["splits"] for p in (greedy, sampled)}
    assert [splits[sampled][s]["decoding"] for s in ("train", "val")] == ["sampled at temperature 1", "greedy"]
    assert {s["decoding"] for s in splits[greedy].values()} == {"greedy"}
    # the training answers are the parent's samples (seeded: the same again), the held-out ones its greedy answers
    answers = {p: [pair["generated"] for pair in read_pairs(p, "train")] for p in (greedy, sampled)}
    assert answers[sampled] != answers[greedy]
    assert read_pairs(sampled, "val") == read_pairs(greedy, "val")
    shutil.rmtree(sampled)
    assert pairs(str(tool_parent), str(data), temperature=1.0, tag="t1", **kwargs) == sampled
    assert [pair["generated"] for pair in read_pairs(sampled, "train")] == answers[sampled]
    dm = PreferenceDataModule(parent=str(tool_parent), data_dir=str(data), seq_len=128, batch_size=2, pairs_tag="t1")
    assert dm.pairs_manifest()["dir"] == str(sampled) and dm.state_dict()["pairs_tag"] == "t1"
    with pytest.raises(StagewiseError, match="--tag t2"):
        PreferenceDataModule(parent=str(tool_parent), data_dir=str(data), seq_len=128, pairs_tag="t2").pairs_manifest()
    with pytest.raises(StagewiseError, match="plain name"):
        pairs_dir(data, sha, "../elsewhere")
