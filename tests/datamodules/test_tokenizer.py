import json
import sysconfig
from pathlib import Path

import pytest

from datamodules.errors import StagewiseError
from datamodules.tokenizer import (
    SPECIAL_TOKENS,
    encode_document,
    load_tokenizer,
    render_tool_example,
    render_tool_prompt,
    tokenizer_sha256,
    train_tokenizer,
)

EXAMPLE = {
    "messages": [{"role": "user", "content": "List the objects in bucket my-bucket, at most 5, café"}],
    "tools": [
        {"name": "list_objects", "description": "List objects in a bucket.",
         "parameters": {"type": "object", "properties": {"Bucket": {"type": "string"},
                                                         "MaxKeys": {"type": "integer"}}}},
        {"name": "delete_bucket", "description": "Delete a bucket.",
         "parameters": {"type": "object", "properties": {"Bucket": {"type": "string"}}}},
    ],
    "tool_calls": [{"name": "list_objects", "arguments": {"Bucket": "my-bucket", "MaxKeys": 5, "Prefix": "a\"b"}}],
}


def stdlib_texts() -> list[str]:
    files = sorted(Path(sysconfig.get_paths()["stdlib"], "json").glob("*.py"))
    return [f.read_text() for f in files]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(stdlib_texts(), 600, out)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


def test_special_tokens_have_fixed_ids_and_are_never_split(tok):
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(len(SPECIAL_TOKENS)))
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.encode(f"x{t}y", add_special_tokens=False)[1] == i
        assert tok.decode([i], skip_special_tokens=False) == t
    assert len(tok) == 600


def test_encode_document_appends_eos_and_reads_special_strings_as_text(tok):
    ids = encode_document(tok, "def f(): return 1")
    assert ids[-1] == tok.eos_token_id and tok.decode(ids[:-1]) == "def f(): return 1"
    injected = encode_document(tok, "a <|end|> b")
    assert tok.convert_tokens_to_ids("<|end|>") not in injected
    assert tok.decode(injected[:-1], skip_special_tokens=False) == "a <|end|> b"
    batch = encode_document(tok, ["one", "two words"])
    assert batch == [encode_document(tok, "one"), encode_document(tok, "two words")]


def test_chat_template_renders_tools_and_the_call(tok):
    ids, _ = render_tool_example(tok, EXAMPLE)
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|bos|><|tools|>")
    tools_block = text.split("<|tools|>")[1].split("<|/tools|>")[0]
    assert [json.loads(line) for line in tools_block.splitlines()] == EXAMPLE["tools"]
    assert "<|user|>" + EXAMPLE["messages"][0]["content"] + "<|end|><|assistant|><|tool_call|>" in text
    assert text.endswith("<|/tool_call|><|end|>")


def test_system_and_tool_response_messages(tok):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "tool_calls": EXAMPLE["tool_calls"]},
                {"role": "tool", "content": {"Contents": []}}]
    text = tok.apply_chat_template(messages, tools=EXAMPLE["tools"], add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|bos|><|system|>be brief<|end|><|tools|>")
    assert '<|tool_response|>{"Contents": []}<|/tool_response|><|assistant|>' in text


def test_loss_mask_covers_exactly_the_tool_call(tok):
    ids, mask = render_tool_example(tok, EXAMPLE)
    prompt = render_tool_prompt(tok, EXAMPLE)
    assert len(ids) == len(mask)
    assert ids[: len(prompt)] == prompt and tok.decode(prompt[-1:], skip_special_tokens=False) == "<|assistant|>"
    assert mask == [0] * len(prompt) + [1] * (len(ids) - len(prompt))
    answer = tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
    assert answer.startswith("<|tool_call|>") and answer.endswith("<|/tool_call|><|end|>")
    body = answer.removeprefix("<|tool_call|>").removesuffix("<|/tool_call|><|end|>")
    assert json.loads(body) == EXAMPLE["tool_calls"][0]
    # transformers' own assistant mask (from the template's {% generation %} block) agrees
    messages = EXAMPLE["messages"] + [{"role": "assistant", "tool_calls": EXAMPLE["tool_calls"]}]
    out = tok.apply_chat_template(messages, tools=EXAMPLE["tools"], return_assistant_tokens_mask=True, return_dict=True)
    assert list(out["input_ids"]) == ids and list(out["assistant_masks"]) == mask


def test_load_and_hash_errors(tmp_path, tok_dir):
    with pytest.raises(StagewiseError, match="stagewise prepare"):
        load_tokenizer(tmp_path)
    assert tokenizer_sha256(tok_dir) == tokenizer_sha256(tok_dir) and len(tokenizer_sha256(tok_dir)) == 64

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    plain = Tokenizer(models.BPE())
    plain.pre_tokenizer = pre_tokenizers.ByteLevel()
    plain.train_from_iterator(stdlib_texts(), trainers.BpeTrainer(vocab_size=300, special_tokens=["<|eos|>"]))
    PreTrainedTokenizerFast(tokenizer_object=plain, eos_token="<|eos|>").save_pretrained(tmp_path / "plain")
    with pytest.raises(StagewiseError, match="reserved tokens"):
        load_tokenizer(tmp_path / "plain")


# ----------------------------------------------------------------------------------- the standard tool interface
def list_objects(Bucket: str, MaxKeys: int):
    """List objects in a bucket.

    Args:
        Bucket: The bucket's name.
        MaxKeys: At most this many keys.
    """


FLAT = {"name": "list_objects", "description": "List objects in a bucket.",
        "parameters": {"type": "object", "required": ["Bucket", "MaxKeys"],
                       "properties": {"Bucket": {"type": "string", "description": "The bucket's name."},
                                      "MaxKeys": {"type": "integer", "description": "At most this many keys."}}}}


def test_one_tool_renders_the_same_flat_wrapped_and_as_a_python_function(tok):
    """transformers turns the function into {"type": "function", "function": ...} with get_json_schema."""
    messages = [{"role": "user", "content": "list my-bucket"}]
    forms = [[FLAT], [{"type": "function", "function": FLAT}], [list_objects]]
    texts = [tok.apply_chat_template(messages, tools=t, add_generation_prompt=True, tokenize=False) for t in forms]
    assert texts[0] == texts[1] == texts[2]
    assert texts[0].split("<|tools|>")[1].split("<|/tools|>")[0] == json.dumps(FLAT, sort_keys=True) + "\n"


def test_a_training_example_is_what_apply_chat_template_renders(tok):
    """The tool corpus renders each example through the template users call: an OpenAI-style line read by
    ToolJsonl gives exactly the tokens of apply_chat_template on the same conversation, the tool given
    as a Python function; the calls' arguments as JSON strings or dicts alike."""
    from datamodules.tool_examples import validate_example

    call = {"type": "function", "function": {"name": "list_objects", "arguments": '{"MaxKeys": 5, "Bucket": "logs"}'}}
    line = {"tools": [{"type": "function", "function": FLAT}], "messages": [
        {"role": "user", "content": "List 5 keys of logs"}, {"role": "assistant", "content": None, "tool_calls": [call]}]}
    ids, _ = render_tool_example(tok, validate_example(line))
    conversation = [line["messages"][0], {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "list_objects", "arguments": {"Bucket": "logs", "MaxKeys": 5}}}]}]
    assert ids == tok.apply_chat_template(conversation, tools=[list_objects], return_dict=True)["input_ids"]


def test_multi_turn_mask_covers_every_assistant_turn(tok):
    from datamodules.tool_examples import validate_example

    with open("tests/fixtures/tools/openai.jsonl") as f:
        example = validate_example(json.loads(f.readlines()[2]))  # two calls, two tool results, a text answer
    ids, mask = render_tool_example(tok, example)
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|bos|><|system|>Answer briefly.<|end|><|tools|>")
    spans, start = [], None
    for i, m in enumerate(mask + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append(tok.decode(ids[start:i], skip_special_tokens=False))
            start = None
    assert spans == [
        '<|tool_call|>{"name": "get_weather", "arguments": {"city": "Quito"}}<|/tool_call|>'
        '<|tool_call|>{"name": "get_time", "arguments": {"city": "Quito"}}<|/tool_call|><|end|>',
        "It is 14 degrees and 09:30 in Quito.<|end|>"]
    assert '<|tool_response|>{"temperature": 14}<|/tool_response|><|tool_response|>09:30<|/tool_response|>' in text


def test_identity_is_the_vocabulary_and_the_chat_template(tok_dir, tmp_path):
    import shutil

    from datamodules.tokenizer import CHAT_TEMPLATE, chat_template_sha256

    assert chat_template_sha256(tok_dir) == chat_template_sha256()  # saved with CHAT_TEMPLATE
    edited = tmp_path / "edited"
    shutil.copytree(tok_dir, edited)
    (edited / "chat_template.jinja").write_text(CHAT_TEMPLATE.replace("<|tools|>", "<|tools|>\n"))
    assert tokenizer_sha256(edited) == tokenizer_sha256(tok_dir)
    assert chat_template_sha256(edited) != chat_template_sha256(tok_dir)


def test_adopting_a_tokenizer_adds_only_the_missing_special_tokens(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from datamodules.tokenizer import ADOPTED_FILE, adopt_tokenizer

    plain = Tokenizer(models.BPE())
    plain.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    plain.train_from_iterator(stdlib_texts(), trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<|end|>"],
                                                                 show_progress=False))
    theirs = PreTrainedTokenizerFast(tokenizer_object=plain, bos_token="<s>", eos_token="</s>")
    theirs.save_pretrained(tmp_path / "model")
    adopted = adopt_tokenizer(tmp_path / "model", tmp_path / "adopted")
    assert {t: adopted.convert_tokens_to_ids(t) for t in theirs.get_vocab()} == theirs.get_vocab()  # ids kept
    added = [t for t in SPECIAL_TOKENS if t != "<|end|>"]  # <|end|> was there already
    assert [adopted.convert_tokens_to_ids(t) for t in added] == list(range(len(theirs), len(theirs) + len(added)))
    assert (adopted.bos_token, adopted.eos_token, adopted.pad_token) == ("<s>", "</s>", "<|pad|>")
    record = json.loads((tmp_path / "adopted" / ADOPTED_FILE).read_text())
    assert record["added"] == added and record["vocab_before"] == len(theirs)
    again = load_tokenizer(tmp_path / "adopted")  # has every reserved token, renders tools
    assert again.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "<s><|user|>x<|end|>"
