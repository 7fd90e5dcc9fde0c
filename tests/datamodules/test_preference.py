"""Preference pairs as batches: rendered by the chat template like tool examples, masks on the answers only."""

import torch

from datamodules.shards import open_split
from datamodules.preference import PAD_MULTIPLE, PreferencePairs, collate_pairs, render_pair
from datamodules.tokenizer import load_tokenizer, render_tool_example, render_tool_prompt
from datamodules.tool_examples import prepared_examples


def pair_of(example: dict) -> dict:
    wrong = {"name": "get_time", "arguments": {"city": "Nowhere"}}
    return {**{k: v for k, v in example.items() if k != "tool_calls"}, "chosen": example["tool_calls"],
            "rejected": [wrong], "rejected_from": "wrong_function"}


def test_tool_corpus_keeps_its_examples_in_shard_order(tool_data_dir):
    tok = load_tokenizer(tool_data_dir / "tokenizer")
    examples = prepared_examples(tool_data_dir / "tools", "train")
    split = open_split(tool_data_dir / "tools", "train")
    first = split.tokens[split.offsets[0]:split.offsets[1]].tolist()
    assert len(examples) == split.documents and render_tool_example(tok, examples[0])[0] == first


def test_pair_rows_are_the_rendered_example_with_the_answer_masked(tool_data_dir):
    tok = load_tokenizer(tool_data_dir / "tokenizer")
    example = prepared_examples(tool_data_dir / "tools", "train")[0]
    pair = pair_of(example)
    prompt, chosen, rejected = render_pair(tok, pair)
    assert prompt == render_tool_prompt(tok, example)
    assert prompt + chosen == render_tool_example(tok, example)[0]
    assert prompt + rejected == render_tool_example(tok, {**example, "tool_calls": pair["rejected"]})[0]

    item = PreferencePairs([pair], tok, seq_len=len(prompt) + len(chosen) + 5)[0]  # room for it all
    row = item["chosen"]
    assert torch.equal(torch.cat([row["input_ids"], row["targets"][-1:]]), torch.tensor(prompt + chosen))
    assert row["loss_mask"].tolist() == [0.0] * (len(prompt) - 1) + [1.0] * len(chosen)  # targets = answer tokens
    # too long: the prompt is cut from the left, both answers stay whole, both rows share the prompt's tail
    seq_len = max(len(chosen), len(rejected)) + 10
    item = PreferencePairs([pair], tok, seq_len=seq_len)[0]
    keep = seq_len + 1 - max(len(chosen), len(rejected))  # prompt tokens kept
    assert max(len(item[k]["input_ids"]) for k in ("chosen", "rejected")) == seq_len
    for key, answer in (("chosen", chosen), ("rejected", rejected)):
        row = item[key]
        assert row["targets"][-len(answer):].tolist() == answer and row["loss_mask"].sum() == len(answer)
        assert row["input_ids"][:keep].tolist() == prompt[-keep:]


def test_a_batch_is_the_chosen_rows_then_the_rejected_rows_right_padded(tool_data_dir):
    tok = load_tokenizer(tool_data_dir / "tokenizer")
    pairs = [pair_of(e) for e in prepared_examples(tool_data_dir / "tools", "train")[:3]]
    dataset = PreferencePairs(pairs, tok, seq_len=512)
    batch = collate_pairs([dataset[i] for i in range(3)])
    assert batch["input_ids"].shape == batch["targets"].shape == batch["loss_mask"].shape
    rows, width = batch["input_ids"].shape
    assert rows == 6 and width % PAD_MULTIPLE == 0
    for i in range(3):
        for half, key in ((0, "chosen"), (1, "rejected")):
            row, n = dataset[i][key], len(dataset[i][key]["input_ids"])
            b = half * 3 + i
            assert torch.equal(batch["input_ids"][b, :n], row["input_ids"])
            assert torch.equal(batch["loss_mask"][b, :n], row["loss_mask"]) and batch["loss_mask"][b, n:].sum() == 0
