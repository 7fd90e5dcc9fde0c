"""The standard interface end to end: a tiny model overfit on a few tool examples, `stagewise export`, then
transformers alone (AutoTokenizer, AutoModelForCausalLM, apply_chat_template with Python functions as tools,
generate) gives the call, stops at the end of the turn by itself, and our tool evaluation parses what it
wrote; `stagewise generate` says the same from the checkpoint and from the export."""

import json

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from datamodules.tokenizer import chat_template_sha256, render_tool_example, render_tool_prompt, tokenizer_sha256, train_tokenizer
from datamodules.tool_examples import validate_example
from lightning_modules.causal_lm import CausalLM
from lightning_modules.cli import main
from lightning_modules.tool_eval import decoding_threads, parse_tool_calls


def get_weather(city: str, unit: str = "celsius"):
    """Current weather for a city.

    Args:
        city: The city's name.
        unit: The temperature unit. (choices: ["celsius", "fahrenheit"])
    """


def get_time(city: str):
    """Local time in a city.

    Args:
        city: The city's name.
    """


CITY = {"type": "string", "description": "The city's name."}
TOOLS = [  # the same two functions as the corpus writes them: flat JSON schemas
    {"name": "get_weather", "description": "Current weather for a city.", "parameters": {
        "type": "object", "required": ["city"], "properties": {
            "city": CITY, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "The temperature unit."}}}},
    {"name": "get_time", "description": "Local time in a city.",
     "parameters": {"type": "object", "required": ["city"], "properties": {"city": CITY}}},
]


def example(request: str, *calls: tuple[str, dict]) -> dict:
    return validate_example({"messages": [{"role": "user", "content": request}], "tools": TOOLS,
                             "tool_calls": [{"name": n, "arguments": a} for n, a in calls]})


EXAMPLES = [
    example("What is the weather in Oslo?", ("get_weather", {"city": "Oslo"})),
    example("Weather in Lima in fahrenheit, please.", ("get_weather", {"city": "Lima", "unit": "fahrenheit"})),
    example("What time is it in Tokyo?", ("get_time", {"city": "Tokyo"})),
    example("Weather and time in Cairo?", ("get_weather", {"city": "Cairo"}), ("get_time", {"city": "Cairo"})),
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``data/tokenizer`` and ``models/tools_model_best.ckpt``: a 2-layer tiny model overfit on EXAMPLES (loss on
    the answers only, as the tool stage trains)."""
    root = tmp_path_factory.mktemp("project")
    tok = train_tokenizer([json.dumps(e) for e in EXAMPLES] * 4, 400, root / "data" / "tokenizer")
    batches = []
    for ex in EXAMPLES:
        ids, mask = (torch.tensor(x) for x in render_tool_example(tok, ex))
        batches.append({"input_ids": ids[None, :-1], "targets": ids[None, 1:], "loss_mask": mask[None, 1:].float()})
    torch.manual_seed(0)
    model = CausalLM(size="tiny", vocab_size=448, model_overrides={"n_layers": 2, "max_seq_len": 512},
                     tokenizer_sha256=tokenizer_sha256(root / "data" / "tokenizer"),
                     chat_template_sha256=chat_template_sha256(root / "data" / "tokenizer"),
                     lr=3e-3, warmup_steps=10, schedule="constant", weight_decay=0.0)
    trainer = L.Trainer(max_steps=240, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", gradient_clip_val=1.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # matmuls this small only lose to thread synchronisation (5x on 2 busy cores)
    try:
        trainer.fit(model, DataLoader(batches, batch_size=None, shuffle=True))
    finally:
        torch.set_num_threads(threads)
    ckpt = root / "models" / "tools_model_best.ckpt"
    trainer.save_checkpoint(ckpt)
    return root, ckpt


def test_transformers_alone_calls_the_tool_and_stops_at_the_end_of_the_turn(trained, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, ckpt = trained
    monkeypatch.chdir(root)
    main(["export", "--ckpt", "models/tools_model_best.ckpt", "--out", "models/tools_hf"])  # the README's command
    tok = AutoTokenizer.from_pretrained("models/tools_hf")
    model = AutoModelForCausalLM.from_pretrained("models/tools_hf").eval()
    end = tok.convert_tokens_to_ids("<|end|>")
    for ex in EXAMPLES:
        messages = ex["messages"]
        inputs = tok.apply_chat_template(messages, tools=[get_weather, get_time], add_generation_prompt=True,
                                         return_dict=True, return_tensors="pt")
        assert inputs["input_ids"][0].tolist() == render_tool_prompt(tok, ex)  # the prompt it was trained on
        with decoding_threads(model):
            out = model.generate(**inputs, max_new_tokens=100, do_sample=False)  # generation_config: stop ids
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        assert new[-1] == end and end not in new[:-1] and len(new) < 100  # stopped by itself, after every call
        text = tok.decode(new, skip_special_tokens=False)
        assert parse_tool_calls(text) == ex["tool_calls"]
        bodies = [b.split("<|/tool_call|>")[0] for b in text.split("<|tool_call|>")[1:]]
        assert [json.loads(b) for b in bodies] == ex["tool_calls"]  # the text between the call tokens


def test_stagewise_generate_from_the_checkpoint_and_from_the_export(trained, monkeypatch, capsys, tmp_path):
    from lightning_modules.generate import generate

    root, ckpt = trained
    monkeypatch.chdir(root)
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([{"type": "function", "function": t} for t in TOOLS]))
    if not (root / "models" / "tools_hf").exists():
        main(["export", "--ckpt", str(ckpt), "--out", "models/tools_hf"])
    wanted = EXAMPLES[3]["tool_calls"]  # two calls in one turn
    for source in (str(ckpt), "models/tools_hf"):
        capsys.readouterr()
        main(["generate", "--ckpt", source, "--tools", str(tools), "--prompt", "Weather and time in Cairo?"])
        printed = capsys.readouterr().out
        assert printed.splitlines()[-1] == "tool_calls: " + json.dumps(wanted)
    sampled = [generate(str(ckpt), "Weather and time in Cairo?", tools=str(tools), temperature=1.0, seed=s)["text"]
               for s in (1, 1, 2)]
    assert sampled[0] == sampled[1]  # sampling follows the seed
    raw = generate(str(ckpt), "What is", max_new_tokens=5)  # a plain continuation, no chat template
    assert raw["tool_calls"] is None and len(raw["text"]) > 0


def test_the_tool_constraint_works_as_a_transformers_logits_processor(trained, monkeypatch):
    """transformers' generate with our ToolCallConstraint: the right calls stay right, and a request for a tool
    the prompt does not offer gets a call of one it does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList

    from lightning_modules.tool_constraint import ToolCallConstraint, offered_tools, token_pieces

    root, ckpt = trained
    monkeypatch.chdir(root)
    if not (root / "models" / "tools_hf").exists():
        main(["export", "--ckpt", str(ckpt), "--out", "models/tools_hf"])
    tok = AutoTokenizer.from_pretrained("models/tools_hf")
    model = AutoModelForCausalLM.from_pretrained("models/tools_hf").eval()

    def call(messages, tools, constrain: bool):
        inputs = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, return_dict=True,
                                         return_tensors="pt")
        prompt = tok.decode(inputs["input_ids"][0], skip_special_tokens=False)
        processors = LogitsProcessorList(
            [ToolCallConstraint(token_pieces(tok), [offered_tools(prompt)])] if constrain else [])
        with decoding_threads(model):
            out = model.generate(**inputs, max_new_tokens=100, do_sample=False, logits_processor=processors)
        return parse_tool_calls(tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=False))

    for ex in EXAMPLES:
        assert call(ex["messages"], [get_weather, get_time], constrain=True) == ex["tool_calls"]
    weather = EXAMPLES[0]["messages"]
    assert call(weather, [get_time], constrain=False)[0]["name"] == "get_weather"  # not offered: free, it calls it
    constrained = call(weather, [get_time], constrain=True)
    assert [c["name"] for c in constrained] == ["get_time"] and set(constrained[0]["arguments"]) <= {"city"}
