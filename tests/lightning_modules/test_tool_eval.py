"""Tool-call parsing and scoring: what counts as a valid, right-name and right call."""

import pytest

from lightning_modules.tool_eval import ERRORS, error_kind, parse_tool_call, score_calls

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


def test_a_turn_of_several_calls_is_right_only_when_every_call_is_in_order():
    from lightning_modules.tool_eval import parse_tool_calls

    a, b = {"name": "f", "arguments": {"x": 1}}, {"name": "g", "arguments": {}}
    turn = f'<|tool_call|>{json.dumps(a)}<|/tool_call|><|tool_call|>{json.dumps(b)}<|/tool_call|><|end|>'
    assert parse_tool_calls(turn) == [a, b]
    assert parse_tool_calls(turn.replace('"g"', '"g')) is None  # one call does not parse: the turn does not
    assert parse_tool_calls("no call") is None
    scores = score_calls([[a, b], [b, a], [a], [a, {**b, "arguments": {"y": 2}}], None], [[a, b]] * 5)
    assert scores == {"n": 5, "json_valid": 0.8, "name_accuracy": 0.4, "call_accuracy": 0.2}


def test_score_lengths_must_match():
    with pytest.raises(ValueError):
        score_calls([None], [CALL, CALL])


# --------------------------------------------------------------------------- held-out examples, generation
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from datamodules.shards import ShardWriter, write_manifest  # noqa: E402
from datamodules.tokenizer import (  # noqa: E402
    encode_document, load_tokenizer, render_tool_example, render_tool_prompt, tokenizer_sha256, train_tokenizer,
)
from lightning_modules.tool_eval import evaluate_tool_calls, load_heldout_examples  # noqa: E402

TOOLS = [
    {"name": "get_weather", "description": "Weather forecast for a city",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                    "required": ["city"]}},
    {"name": "convert_currency", "description": "Convert an amount between currencies",
     "parameters": {"type": "object", "properties": {"amount": {"type": "number"}, "to": {"type": "string"}},
                    "required": ["amount", "to"]}},
]
CITIES = ["Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Quito", "Accra", "Hanoi"]


def tool_examples() -> list[dict]:
    out = []
    for i, city in enumerate(CITIES):
        out.append({"messages": [{"role": "user", "content": f"What is the weather in {city} for {i + 1} days?"}],
                    "tools": TOOLS, "tool_calls": [{"name": "get_weather", "arguments": {"city": city, "days": i + 1}}]})
        out.append({"messages": [{"role": "user", "content": f"Convert {10 * i + 5} dollars to EUR for my trip to {city}"}],
                    "tools": TOOLS,
                    "tool_calls": [{"name": "convert_currency", "arguments": {"amount": 10 * i + 5, "to": "EUR"}}]})
    return out


PROSE = ["The quick brown fox jumps over the lazy dog. " * 20, "It was the best of times, it was the worst. " * 20]
CODE = ["def add(a, b):\n    return a + b\n" * 20, "for i in range(10):\n    print(i)\n" * 20]


def prepare_tiny(root: Path) -> Path:
    """A data dir as `stagewise prepare` leaves it: tokenizer + language, code and tools shards."""
    examples = tool_examples()
    tok = train_tokenizer(PROSE + CODE + [json.dumps(e) for e in examples], 400, root / "tokenizer")
    sha = tokenizer_sha256(root / "tokenizer")
    for name, docs in {"language": PROSE, "code": CODE}.items():
        for split in ("train", "val", "test"):
            with ShardWriter(root / name, split, "uint16") as w:
                for doc in docs:
                    w.add(np.array(encode_document(tok, doc)))
        write_manifest(root / name, {"dtype": "uint16", "kind": "text", "tokenizer_sha256": sha})
    splits = {"train": examples, "val": examples[:6], "test": examples[6:8], "unseen": examples[8:12]}
    for split, exs in splits.items():
        with ShardWriter(root / "tools", split, "uint16", with_mask=True) as w:
            for ex in exs:
                ids, mask = render_tool_example(tok, ex)
                w.add(np.array(ids), np.array(mask, dtype=np.uint8))
    write_manifest(root / "tools", {"dtype": "uint16", "kind": "tools", "tokenizer_sha256": sha})
    return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_tiny(tmp_path_factory.mktemp("data"))


def test_heldout_example_of_a_conversation_scores_its_last_turn_with_calls(tmp_path, data_dir):
    """A multi-turn document: the prompt is the whole conversation before the last assistant turn that makes
    calls (a text answer after it is not scored), the expected calls are all of that turn's."""
    from datamodules.tool_examples import validate_example

    tok = load_tokenizer(data_dir / "tokenizer")
    call = lambda name, args: {"type": "function", "function": {"name": name, "arguments": args}}  # noqa: E731
    example = validate_example({"tools": TOOLS, "messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [call("get_weather", {"city": "Oslo"})]},
        {"role": "tool", "content": "4 degrees"},
        {"role": "user", "content": "Lima for 2 days, and 3 dollars in EUR"},
        {"role": "assistant", "content": None, "tool_calls": [call("get_weather", {"city": "Lima", "days": 2}),
                                                              call("convert_currency", {"amount": 3, "to": "EUR"})]},
        {"role": "tool", "content": "ok"},
        {"role": "assistant", "content": "Done."}]})
    ids, mask = render_tool_example(tok, example)
    with ShardWriter(tmp_path / "tools", "val", "uint16", with_mask=True) as w:
        w.add(np.array(ids), np.array(mask, dtype=np.uint8))
    write_manifest(tmp_path / "tools", {"dtype": "uint16", "kind": "tools", "tokenizer_sha256": "x"})
    [heldout] = load_heldout_examples(tmp_path, "val", tokenizer=tok)
    assert heldout["tool_calls"] == [{"name": "get_weather", "arguments": {"city": "Lima", "days": 2}},
                                     {"name": "convert_currency", "arguments": {"amount": 3, "to": "EUR"}}]
    assert heldout["prompt_ids"] == render_tool_prompt(tok, example)
    assert tok.decode(heldout["prompt_ids"], skip_special_tokens=False).endswith("3 dollars in EUR<|end|><|assistant|>")


def test_heldout_examples_are_the_prompts_and_calls_of_the_val_split(data_dir):
    tok = load_tokenizer(data_dir / "tokenizer")
    examples = load_heldout_examples(data_dir, "val")
    expected = tool_examples()[:6]
    assert [e["tool_calls"] for e in examples] == [e["tool_calls"] for e in expected]
    assert [e["prompt_ids"] for e in examples] == [render_tool_prompt(tok, e) for e in expected]
    # a limit spreads its examples over the split (shard order groups sources and services)
    assert [e["tool_calls"] for e in load_heldout_examples(data_dir, "val", limit=2)] == [
        expected[0]["tool_calls"], expected[3]["tool_calls"]]


class Oracle(torch.nn.Module):
    """Answers each prompt with a scripted answer (the expected one, or a wrong one)."""

    def __init__(self, tok, answers: dict[tuple, str]):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.tok, self.answers = tok, answers

    def generate(self, input_ids, max_new_tokens, eos_token_id=None, attention_mask=None):
        rows = [ids[mask.bool()] for ids, mask in zip(input_ids, attention_mask)]  # drop the left padding
        new = [torch.tensor(self.tok.encode(self.answers[tuple(r.tolist())], add_special_tokens=False)[:max_new_tokens])
               for r in rows]
        return torch.cat([input_ids, torch.nn.utils.rnn.pad_sequence(new, batch_first=True)], dim=1)


def test_evaluate_scores_generated_calls(data_dir):
    tok = load_tokenizer(data_dir / "tokenizer")
    examples = load_heldout_examples(data_dir, "val", limit=4)
    answers = {tuple(e["prompt_ids"]): e["answer"] for e in examples}
    wrong = dict(examples[1]["tool_calls"][0], name="delete_everything")
    answers[tuple(examples[1]["prompt_ids"])] = f"<|tool_call|>{json.dumps(wrong)}<|/tool_call|><|end|>"
    answers[tuple(examples[2]["prompt_ids"])] = '<|tool_call|>{"name": "get_wea'  # cut off: not JSON
    scores = evaluate_tool_calls(Oracle(tok, answers), tok, examples, batch_size=3)
    assert {k: scores[k] for k in ("n", "json_valid", "name_accuracy", "call_accuracy")} == {
        "n": 4, "json_valid": 0.75, "name_accuracy": 0.5, "call_accuracy": 0.5}
    # examples[1] calls a function its prompt does not offer; examples[2] calls nothing that parses
    assert "delete_everything" not in load_tokenizer(data_dir / "tokenizer").decode(examples[1]["prompt_ids"])
    assert {k: v for k, v in scores["errors"].items() if v} == {"name_not_offered": 1, "no_call": 1}
    assert set(scores["errors"]) == set(ERRORS)
    assert scores["wrong_samples"]["no_call"]["generated"].startswith('<|tool_call|>{"name": "get_wea')
    first = scores["samples"][0]
    # generation stops at the end of the turn, <|end|> included
    assert first["correct"] and first["generated"] == examples[0]["answer"] and first["generated"].endswith("<|end|>")


def test_evaluate_with_tiny_causal_lm_stops_and_restores_train_mode(data_dir):
    from lightning_modules.causal_lm import CausalLM

    tok = load_tokenizer(data_dir / "tokenizer")
    model = CausalLM(size="tiny", vocab_size=448, model_overrides={"n_layers": 1, "max_seq_len": 512})
    model.configure_model()
    model.train()
    scores = evaluate_tool_calls(model, tok, load_heldout_examples(data_dir, "val"), max_new_tokens=8)
    assert scores["n"] == 6 and 0.0 <= scores["call_accuracy"] <= scores["name_accuracy"] <= scores["json_valid"]
    assert model.training


@torch.no_grad()
def greedy_by_recompute(model, prompt: list[int], max_new_tokens: int, stop_ids: list[int]) -> list[int]:
    """The reference: one prompt, the whole sequence recomputed for every token (no cache, no padding)."""
    ids, new = torch.tensor([prompt]), []
    for _ in range(max_new_tokens):
        token = int(model.model(ids)[0, -1].argmax())
        new.append(token)
        if token in stop_ids:
            break
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return new


def test_batched_decoding_equals_one_prompt_at_a_time():
    from lightning_modules.causal_lm import CausalLM
    from lightning_modules.decoding import greedy_continuations

    torch.manual_seed(0)
    model = CausalLM(size="tiny", vocab_size=64, model_overrides={"n_layers": 2, "max_seq_len": 64})
    model.configure_model()
    prompts = [torch.randint(0, 64, (n,)).tolist() for n in (3, 11, 7, 1, 9)]
    stops = [5, 17]
    model.eval()
    one_by_one = [greedy_by_recompute(model, p, 12, stops) for p in prompts]
    assert greedy_continuations(model, prompts, 12, stops, batch_size=5) == one_by_one
    assert greedy_continuations(model, prompts, 12, stops, batch_size=2) == one_by_one
    assert all(not set(new[:-1]) & set(stops) for new in one_by_one)  # each stops at its first stop id
    assert any(new[-1] in stops for new in one_by_one) and any(len(new) == 12 for new in one_by_one)


def test_long_prompts_keep_their_last_tokens():
    from lightning_modules.causal_lm import CausalLM
    from lightning_modules.decoding import greedy_continuations

    torch.manual_seed(0)
    model = CausalLM(size="tiny", vocab_size=64, model_overrides={"n_layers": 1, "max_seq_len": 16})
    model.configure_model()
    prompts = [torch.randint(0, 64, (n,)).tolist() for n in (30, 12, 4)]
    # the context (16) leaves 10 prompt tokens for 6 new ones; max_prompt_tokens cuts further
    assert greedy_continuations(model, prompts, 6, []) == greedy_continuations(model, [p[-10:] for p in prompts], 6, [])
    cut = greedy_continuations(model, prompts, 6, [], max_prompt_tokens=3)
    assert cut == greedy_continuations(model, [p[-3:] for p in prompts], 6, []) and all(len(n) == 6 for n in cut)


def test_attention_subclass_without_padding_support_still_decodes_batches():
    from experiments.examples.sliding_window_attention import SlidingWindowLM
    from lightning_modules.decoding import greedy_continuations

    torch.manual_seed(0)
    model = SlidingWindowLM(window=4, size="tiny", vocab_size=64, model_overrides={"n_layers": 1, "max_seq_len": 64})
    model.configure_model()
    model.eval()
    prompts = [torch.randint(0, 64, (n,)).tolist() for n in (3, 8, 5)]
    assert greedy_continuations(model, prompts, 6, [5]) == [greedy_by_recompute(model, p, 6, [5]) for p in prompts]


# --------------------------------------------------------------------------- in a tool stage, and evaluate
import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from callbacks.stage_handoff import StageHandoff  # noqa: E402
from datamodules.stage_record import read_stage_record  # noqa: E402
from callbacks.text_samples import TextSamples  # noqa: E402
from callbacks.tool_call_eval import ToolCallEval  # noqa: E402
from datamodules.datamodule import ToolDataModule  # noqa: E402
from lightning_modules.causal_lm import CausalLM  # noqa: E402


DECODED: list[bool] = []  # ToolCallEval's evaluate_tool_calls calls in tool_stage, by their `constrain`


@pytest.fixture(scope="module")
def tool_stage(data_dir, tmp_path_factory):
    import callbacks.tool_call_eval as tool_call_eval

    def recorded(*args, constrain=False, **kwargs):
        DECODED.append(constrain)
        return evaluate_tool_calls(*args, constrain=constrain, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("run"))
        mp.setattr(tool_call_eval, "evaluate_tool_calls", recorded)
        dm = ToolDataModule(data_dir=str(data_dir), seq_len=32, batch_size=2, val_seq_len=16)  # text: 16-token windows
        model = CausalLM(size="tiny", vocab_size=dm.vocab_size, tokenizer_sha256=dm.tokenizer_sha256,
                         model_overrides={"n_layers": 1, "max_seq_len": 256}, warmup_steps=1)
        trainer = L.Trainer(
            max_steps=4, val_check_interval=2, check_val_every_n_epoch=None, num_sanity_val_steps=0,
            logger=TensorBoardLogger("runs", name="exp", version="tools", default_hp_metric=False),
            callbacks=[ModelCheckpoint(dirpath="models", filename="tools_model_best", monitor="val/tools/loss",
                                       auto_insert_metric_name=False, enable_version_counter=False),
                       StageHandoff("tools"),
                       ToolCallEval(data_dir=str(data_dir), num_examples=6, max_new_tokens=16, constrained=True),
                       TextSamples(max_new_tokens=4)],
            enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", use_distributed_sampler=False,
        )
        trainer.fit(model, datamodule=dm)
        yield trainer, Path.cwd()


def test_tool_call_eval_logs_scores_and_records_them(tool_stage):
    trainer, run = tool_stage
    acc = EventAccumulator(str(run / "runs/exp/tools"))
    acc.Reload()
    for group in ("seen", "unseen"):  # requests to services trained on, and to services never trained on
        for name in ("json_valid", "name_accuracy", "call_accuracy"):
            tag = f"tools/{group}/{name}"
            assert [e.step for e in acc.Scalars(tag)] == [2, 4]
            assert float(trainer.callback_metrics[tag]) == acc.Scalars(tag)[-1].value
        assert f"tools/{group}/samples/text_summary" in acc.Tags()["tensors"]
    tools = read_stage_record(run / "models", "tools")["tools"]
    assert tools["n"] == {"seen": 6, "unseen": 4} and tools["split"] == "val" and len(tools["history"]) == 2
    best = min(tools["history"], key=lambda e: e["val/tools/loss"])
    assert tools["step"] == best["step"] and tools["call_accuracy"] == best["seen"]["call_accuracy"]
    assert tools["unseen"] == best["unseen"]
    # constrained=True: the same validations decoded again with names and keys held to the offered tools
    for group in ("seen", "unseen"):
        for name in ("json_valid", "name_accuracy", "call_accuracy"):
            assert [e.step for e in acc.Scalars(f"tools/{group}/constrained/{name}")] == [2, 4]
    assert tools["constrained"] == best["constrained"] and set(tools["constrained"]) == {"seen", "unseen"}
    # they are the constrained decoding's scores (the final weights are the last evaluation's), not the free ones
    model, tok = trainer.lightning_module, load_tokenizer(trainer.datamodule.tokenizer_dir)
    final = tools["history"][-1]
    for group, split in (("seen", "val"), ("unseen", "unseen")):
        examples = load_heldout_examples(trainer.datamodule.data_dir, split, 6, tokenizer=tok)
        for constrain, recorded in ((True, final["constrained"][group]), (False, final[group])):
            direct = evaluate_tool_calls(model, tok, examples, 16, max_prompt_tokens=16, constrain=constrain)
            assert {k: direct[k] for k in recorded} == recorded, (group, constrain)
    # each of the 2 evaluations decoded both groups freely, then both constrained
    assert DECODED == [False, False, True, True] * 2
    # the report card takes them where no `stagewise evaluate` ran
    from lightning_modules.report_card import _tools

    card = _tools(run / "models", "tools", read_stage_record(run / "models", "tools"), "tools_constrained")
    assert card == {g: {**best["constrained"][g], "n": tools["n"][g]} for g in ("seen", "unseen")}


def test_tool_stage_exports_the_best_checkpoint(tool_stage):
    _, run = tool_stage
    record = read_stage_record(run / "models", "tools")
    assert set(record["losses"]["final"]) == {"language", "code", "tools"}
    assert (run / "models/tools/hf/config.json").exists() and (run / "models/tools/hf/tokenizer.json").exists()


def test_evaluate_reports_losses_of_every_domain_and_tool_scores(tool_stage, data_dir, tmp_path):
    from lightning_modules.evaluate import evaluate, main

    trainer, run = tool_stage
    ckpt = run / "models/tools_model_best.ckpt"
    out = tmp_path / "eval.json"
    main(["--ckpt", str(ckpt), "--data_dir", str(data_dir), "--limit", "3", "--max_new_tokens", "8",
          "--out", str(out), "--accelerator", "cpu"])
    result = json.loads(out.read_text())
    assert list(result["losses"]) == ["language", "code", "tools"]
    assert (result["seq_len"], result["val_seq_len"]) == (32, 16)  # the training run's, from the checkpoint
    assert result["tools"]["seen"]["n"] == 3 and result["tools"]["unseen"]["n"] == 3
    # the same numbers as the run's validation at the best checkpoint
    best = read_stage_record(run / "models", "tools")["losses"]["best"]
    assert result["losses"] == pytest.approx(best, rel=1e-5)
    # one window length asked for: every domain at it (the text domains' losses change, the tool windows' do not)
    at = evaluate(str(ckpt), data_dir=str(data_dir), limit=1, max_new_tokens=4, seq_len=32, accelerator="cpu")
    assert at["val_seq_len"] is None and at["losses"]["tools"] == pytest.approx(best["tools"], rel=1e-5)
    assert at["losses"]["language"] != pytest.approx(best["language"], rel=1e-5)


def test_text_samples_default_prompts_include_a_heldout_tool_request(tool_stage):
    _, run = tool_stage
    acc = EventAccumulator(str(run / "runs/exp/tools"))
    acc.Reload()
    assert {"samples/language/text_summary", "samples/code/text_summary", "samples/tools/text_summary"} <= set(
        acc.Tags()["tensors"])
    text = acc.Tensors("samples/tools/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "What is the weather in Paris for 1 days?<|end|><|assistant|>" in text


# --------------------------------------------------------------------------------------------- decoding_model
class _Ranks:
    """Stand-in for the Trainer as decoding_model sees it: its strategy and whether this is rank 0."""

    def __init__(self, strategy, rank0: bool) -> None:
        self.strategy, self.is_global_zero = strategy, rank0


def test_decoding_model_under_fsdp_decodes_a_copy_of_the_gathered_weights_on_rank_0(monkeypatch):
    """Lightning runs FSDP on GPUs only; here a stand-in strategy returns the full state dict the way
    FSDPStrategy does on rank 0. The copy must decode exactly as the module; other ranks get None but
    still join the gather."""
    import lightning.pytorch.strategies as strategies

    from datamodules.errors import StagewiseError
    from lightning_modules.decoding import decoding_model, greedy_continuations

    gathers = []

    class FakeFSDP:
        def lightning_module_state_dict(self):
            gathers.append(1)
            return {k: v.clone() for k, v in model.state_dict().items()}

    monkeypatch.setattr(strategies, "FSDPStrategy", FakeFSDP)
    torch.manual_seed(0)
    model = CausalLM(size="tiny", vocab_size=64, model_overrides={"n_layers": 2, "max_seq_len": 64}, compile=True)
    model.configure_model()
    model.hparams["_instantiator"] = "lightning.pytorch.cli.instantiate_module"  # as LightningCLI saves them
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)  # weights a fresh init would not have
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    expected = greedy_continuations(model, prompts, 12, [])

    assert decoding_model(_Ranks(FakeFSDP(), rank0=False), model) is None
    copy = decoding_model(_Ranks(FakeFSDP(), rank0=True), model)
    assert len(gathers) == 2
    assert copy is not model and type(copy) is CausalLM and not copy.hparams.compile
    assert greedy_continuations(copy, prompts, 12, []) == expected
    sharded = FakeFSDP()
    sharded._state_dict_type = "sharded"  # its state dict would hold this rank's shards only
    with pytest.raises(StagewiseError, match="state_dict_type: full"):
        decoding_model(_Ranks(sharded, rank0=True), model)
    # without FSDP: the module itself on rank 0, nothing on the others, no gather
    assert decoding_model(_Ranks("ddp", rank0=True), model) is model
    assert decoding_model(_Ranks("ddp", rank0=False), model) is None
    assert len(gathers) == 2


def test_error_kind_gives_the_first_reason_a_turn_is_wrong():
    want = {"name": "s3_get_object", "arguments": {"Bucket": "b", "Key": "k"}}
    call = lambda **kw: {"name": kw.pop("name", "s3_get_object"), "arguments": kw}  # noqa: E731
    offered = {"s3_get_object", "s3_put_object"}
    assert error_kind(call(Bucket="b", Key="k"), want, offered) is None
    assert error_kind({"name": "s3_get_object", "arguments": {"Key": "k", "Bucket": "b"}}, [want]) is None
    assert error_kind(None, want, offered) == "no_call"
    assert error_kind([], want, offered) == "no_call"
    assert error_kind([call(Bucket="b", Key="k")] * 2, want, offered) == "call_count"
    assert error_kind(call(name="s3_put_object", Bucket="b", Key="k"), want, offered) == "wrong_name"
    assert error_kind(call(name="s3_delete_object", Bucket="b", Key="k"), want, offered) == "name_not_offered"
    assert error_kind(call(name="s3_delete_object", Bucket="b", Key="k"), want) == "wrong_name"  # nothing offered
    # a missing argument is the reason even where another one is extra, and an extra one before a wrong value
    assert error_kind(call(Bucket="b", Other=1), want, offered) == "missing_argument"
    assert error_kind(call(Bucket="b", Key="k", Range="r"), want, offered) == "extra_argument"
    assert error_kind(call(Bucket="b", Key="x"), want, offered) == "wrong_value"
    assert error_kind(call(Bucket="b", Key="k"), {**want, "arguments": {"Bucket": "b", "Key": "k"}}) is None
    assert error_kind({"name": "f", "arguments": {"n": "1"}}, {"name": "f", "arguments": {"n": 1}}) == "wrong_value"
