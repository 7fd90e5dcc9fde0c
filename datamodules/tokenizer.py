"""Byte-level BPE tokenizer with reserved chat / tool-call tokens and a chat template that takes ``tools=``.

The special tokens are the first entries of the vocabulary (ids 0..12, in ``SPECIAL_TOKENS`` order), so every
stage, from language pretraining on, uses the same ids for them and the vocabulary never changes. The
tokenizer is saved as a transformers ``PreTrainedTokenizerFast`` directory; its chat template renders

    <|bos|>[<|system|>...<|end|>][<|tools|>{tool json}\\n...<|/tools|>]<|user|>...<|end|>
    <|assistant|><|tool_call|>{"name": ..., "arguments": {...}}<|/tool_call|><|end|>

and a ``tool`` message as ``<|tool_response|>...<|/tool_response|>``.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from pathlib import Path
from typing import Iterable, overload

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from datamodules.errors import StagewiseError, TokenizerMismatchError
from datamodules.tool_examples import conversation, scored_turn

BOS, EOS, PAD, END = "<|bos|>", "<|eos|>", "<|pad|>", "<|end|>"
USER = "<|user|>"
TOOLS_OPEN, TOOLS_CLOSE = "<|tools|>", "<|/tools|>"
CALL_OPEN, CALL_CLOSE = "<|tool_call|>", "<|/tool_call|>"
SPECIAL_TOKENS = [
    BOS, EOS, PAD,
    "<|system|>", USER, "<|assistant|>", END,
    TOOLS_OPEN, TOOLS_CLOSE,
    CALL_OPEN, CALL_CLOSE,
    "<|tool_response|>", "<|/tool_response|>",
]

# Every assistant turn sits in a {% generation %} block: transformers' `return_assistant_tokens_mask=True` gives
# the loss mask of `render_tool_example`. A tool renders as one sorted-key JSON line of its name, description
# and parameters, whether it comes flat, OpenAI-wrapped ({"type": "function", "function": {...}}) or as a
# Python function (transformers turns those into the wrapped form with `get_json_schema`); a call renders as
# {"name": ..., "arguments": ...} (sorted keys) from either form, arguments given as a JSON string verbatim.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "<|system|>{{ messages[0]['content'] }}<|end|>"
    "{%- set messages = messages[1:] -%}"
    "{%- endif -%}"
    "{%- if tools -%}"
    "<|tools|>"
    "{%- for tool in tools -%}"
    "{%- set fn = tool['function'] if tool['function'] is mapping else tool -%}"
    "{{ {'name': fn['name'], 'description': fn.get('description') or '', 'parameters': fn.get('parameters') or {}}"
    " | tojson(sort_keys=True) }}\n{% endfor %}"
    "<|/tools|>"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "<|user|>{{ message['content'] }}<|end|>"
    "{%- elif message['role'] == 'system' -%}"
    "<|system|>{{ message['content'] }}<|end|>"
    "{%- elif message['role'] == 'tool' -%}"
    "<|tool_response|>{{ message['content'] if message['content'] is string else message['content'] | tojson }}"
    "<|/tool_response|>"
    "{%- elif message['role'] == 'assistant' -%}"
    "<|assistant|>{% generation %}"
    "{%- if message['content'] is string -%}{{ message['content'] }}{%- endif -%}"
    "{%- for call in message.get('tool_calls') or [] -%}"
    "{%- set fn = call['function'] if call['function'] is mapping else call -%}"
    "{%- set arguments = fn.get('arguments') or {} -%}"
    "<|tool_call|>{\"name\": {{ fn['name'] | tojson }}, \"arguments\": "
    "{{ arguments if arguments is string else arguments | tojson(sort_keys=True) }}}<|/tool_call|>"
    "{%- endfor -%}"
    "<|end|>{% endgeneration %}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` and save it to ``out_dir``.

    Args:
        texts: Training text, one document per item.
        vocab_size: Vocabulary size including the special tokens (which get ids 0..12).
        out_dir: Directory for the transformers tokenizer files (created).
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=SPECIAL_TOKENS[3:],
        model_max_length=1 << 40,  # windows are cut by the data module, never by the tokenizer
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out_dir)
    return tok


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved by :func:`train_tokenizer`; StagewiseError if missing or lacking the reserved tokens."""
    path = Path(path)
    if not (path / "tokenizer.json").exists():
        raise StagewiseError(
            f"no tokenizer at {path}/tokenizer.json; run `stagewise prepare -c configs/data/demo.yaml` first"
        )
    tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    vocab = tok.get_vocab()
    missing = [t for t in SPECIAL_TOKENS if t not in vocab or len(tok.tokenize(t)) != 1]
    if missing:
        raise StagewiseError(
            f"the tokenizer at {path} lacks the reserved tokens {missing}; train one with "
            "`stagewise prepare` (datamodules.tokenizer.train_tokenizer) so chat and tool tokens have fixed ids"
        )
    if not tok.chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def tokenizer_sha256(path: str | Path) -> str:
    """sha256 of the tokenizer's ``tokenizer.json``: what the token ids mean. With :func:`chat_template_sha256`
    it is the tokenizer's identity, which prepared data, checkpoints and stage records carry."""
    file = Path(path) / "tokenizer.json"
    if not file.exists():
        raise StagewiseError(f"no tokenizer at {file}; run `stagewise prepare -c configs/data/demo.yaml` first")
    return hashlib.sha256(file.read_bytes()).hexdigest()


def chat_template_of(path: str | Path) -> str:
    """The chat template a tokenizer directory renders with: ``chat_template.jinja``, else the one in
    ``tokenizer_config.json``, else :data:`CHAT_TEMPLATE` (what :func:`load_tokenizer` falls back to)."""
    path = Path(path)
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    config = path / "tokenizer_config.json"
    template = json.loads(config.read_text()).get("chat_template") if config.is_file() else None
    return template if isinstance(template, str) and template else CHAT_TEMPLATE


def chat_template_sha256(path: str | Path | None = None) -> str:
    """sha256 of the chat template of tokenizer directory ``path`` (of :data:`CHAT_TEMPLATE` when None): the
    other half of the tokenizer's identity, since the template decides how tool examples and prompts render."""
    template = CHAT_TEMPLATE if path is None else chat_template_of(path)
    return hashlib.sha256(template.encode("utf-8")).hexdigest()


ADOPTED_FILE = "stagewise_adopted.json"


def check_adoptable(model_dir: str | Path) -> None:
    """StagewiseError unless ``model_dir`` holds a fast tokenizer (``tokenizer.json``) for :func:`adopt_tokenizer`."""
    if not (Path(model_dir) / "tokenizer.json").is_file():
        raise StagewiseError(
            f"tokenizer.from_model: no tokenizer.json in {model_dir}; point it at a transformers model directory "
            "with a fast tokenizer (`AutoTokenizer.from_pretrained(...).save_pretrained(dir)` writes one)"
        )


def adopt_tokenizer(model_dir: str | Path, out_dir: str | Path) -> PreTrainedTokenizerFast:
    """The tokenizer of transformers model directory ``model_dir`` made usable for every stage, saved to ``out_dir``.

    Its vocabulary and ids stay as they are; each of :data:`SPECIAL_TOKENS` it lacks is added as a special
    token after its last id; its own bos / eos / pad stay (ours fill in those it has none of); the chat
    template becomes :data:`CHAT_TEMPLATE`. ``out_dir/stagewise_adopted.json`` records where it came from,
    its sha256 and the tokens added.

    Args:
        model_dir: A directory with a fast tokenizer (``tokenizer.json``), e.g. a ``LlamaForCausalLM`` checkpoint.
        out_dir: Directory for the adopted tokenizer's files (created).
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    check_adoptable(model_dir)
    tok = PreTrainedTokenizerFast.from_pretrained(str(model_dir))
    before = len(tok)
    missing = [t for t in SPECIAL_TOKENS if t not in tok.get_vocab()]
    tok.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    for role, token in (("bos_token", BOS), ("eos_token", EOS), ("pad_token", PAD)):
        if getattr(tok, role) is None:
            setattr(tok, role, token)
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = 1 << 40  # windows are cut by the data module, never by the tokenizer
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out_dir)
    record = {"model_dir": str(model_dir), "tokenizer_sha256": tokenizer_sha256(model_dir),
              "vocab_before": before, "added": missing}
    (out_dir / ADOPTED_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return tok


def check_same_ids(model_dir: str | Path, tokenizer_dir: str | Path) -> None:
    """TokenizerMismatchError unless every token of ``model_dir``'s tokenizer has the same id in
    ``tokenizer_dir``'s: it is that tokenizer, or :func:`adopt_tokenizer` made it from it. Nothing to
    compare when ``model_dir`` has no ``tokenizer.json``."""
    theirs_file, ours_file = Path(model_dir) / "tokenizer.json", Path(tokenizer_dir) / "tokenizer.json"
    if not theirs_file.is_file() or tokenizer_sha256(model_dir) == tokenizer_sha256(tokenizer_dir):
        return
    theirs = Tokenizer.from_file(str(theirs_file)).get_vocab(with_added_tokens=True)
    ours = Tokenizer.from_file(str(ours_file)).get_vocab(with_added_tokens=True)
    differ = sorted(t for t, i in theirs.items() if ours.get(t) != i)
    if differ:
        raise TokenizerMismatchError(
            f"init_from: the tokenizer of {model_dir} gives {len(differ)} of its {len(theirs)} tokens other ids than "
            f"this stage's tokenizer {tokenizer_dir} (e.g. {differ[:3]}); prepare the data with that model's "
            f"tokenizer (`tokenizer.from_model: {model_dir}` in the data config) and run the stage on it"
        )


# Per tokenizer, a copy of its backend that reads special-token strings in documents as plain text, so a
# document that happens to contain "<|end|>" cannot inject a control token into the training stream.
_document_backends: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _document_backend(tok: PreTrainedTokenizerFast) -> Tokenizer:
    backend = _document_backends.get(tok)
    if backend is None:
        backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
        backend.encode_special_tokens = True
        _document_backends[tok] = backend
    return backend


@overload
def encode_document(tok: PreTrainedTokenizerFast, text: str) -> list[int]: ...
@overload
def encode_document(tok: PreTrainedTokenizerFast, text: list[str]) -> list[list[int]]: ...
def encode_document(tok, text):
    """Token ids of a document followed by eos; a list of texts is encoded as a batch (in parallel).

    Special-token strings inside the text are encoded as ordinary text.
    """
    backend = _document_backend(tok)
    eos = tok.eos_token_id
    if isinstance(text, str):
        return backend.encode(text, add_special_tokens=False).ids + [eos]
    return [enc.ids + [eos] for enc in backend.encode_batch_fast(list(text), add_special_tokens=False)]


def render_tool_prompt(tok: PreTrainedTokenizerFast, example: dict) -> list[int]:
    """The prompt of a tool example's scored turn (``tool_examples.scored_turn``: the messages before its last
    assistant turn with calls, and the tools), ending with ``<|assistant|>``, where that answer starts."""
    messages, _ = scored_turn(example)
    text = tok.apply_chat_template(messages, tools=example.get("tools") or None, add_generation_prompt=True,
                                   tokenize=False)
    return tok.encode(text, add_special_tokens=False)


def render_tool_example(tok: PreTrainedTokenizerFast, example: dict) -> tuple[list[int], list[int]]:
    """A tool example (either shape of ``datamodules.tool_examples``) rendered with the chat template as
    ``apply_chat_template(messages, tools=tools)`` renders it, and its loss mask.

    The mask is 1 exactly on **every assistant turn** (its content, each ``<|tool_call|>`` through
    ``<|/tool_call|>``, and the closing ``<|end|>``: the template's ``{% generation %}`` blocks) and 0 on the
    rest (system, user and tool messages, the tools, the ``<|assistant|>`` markers).
    """
    out = tok.apply_chat_template(conversation(example), tools=example.get("tools") or None, tokenize=True,
                                  return_dict=True, return_assistant_tokens_mask=True)
    return list(out["input_ids"]), list(out["assistant_masks"])
