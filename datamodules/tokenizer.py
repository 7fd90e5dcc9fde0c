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
import weakref
from pathlib import Path
from typing import Iterable, overload

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from datamodules.errors import StagewiseError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = [
    BOS, EOS, PAD,
    "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
    "<|tools|>", "<|/tools|>",
    "<|tool_call|>", "<|/tool_call|>",
    "<|tool_response|>", "<|/tool_response|>",
]

# The assistant's answer sits in a {% generation %} block, so transformers'
# `return_assistant_tokens_mask=True` marks the same tokens as `render_tool_example`'s loss mask.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "<|system|>{{ messages[0]['content'] }}<|end|>"
    "{%- set messages = messages[1:] -%}"
    "{%- endif -%}"
    "{%- if tools -%}"
    "<|tools|>{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}<|/tools|>"
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
    "{%- if message.get('tool_calls') -%}"
    "{%- for call in message['tool_calls'] -%}"
    "{%- set fn = call['function'] if call.get('function') else call -%}"
    "<|tool_call|>{\"name\": {{ fn['name'] | tojson }}, \"arguments\": "
    "{{ fn['arguments'] if fn['arguments'] is string else fn['arguments'] | tojson }}}<|/tool_call|>"
    "{%- endfor -%}"
    "{%- else -%}"
    "{{ message['content'] }}"
    "{%- endif -%}"
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
    """sha256 of the tokenizer's ``tokenizer.json``: the identity every artifact records."""
    file = Path(path) / "tokenizer.json"
    if not file.exists():
        raise StagewiseError(f"no tokenizer at {file}; run `stagewise prepare -c configs/data/demo.yaml` first")
    return hashlib.sha256(file.read_bytes()).hexdigest()


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


def _chat_ids(tok: PreTrainedTokenizerFast, messages: list[dict], tools, add_generation_prompt: bool) -> list[int]:
    text = tok.apply_chat_template(
        messages, tools=tools or None, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    return tok.encode(text, add_special_tokens=False)


def render_tool_prompt(tok: PreTrainedTokenizerFast, example: dict) -> list[int]:
    """The prompt of a tool example (messages + tools) ending with ``<|assistant|>``, where the answer starts."""
    return _chat_ids(tok, example["messages"], example.get("tools"), add_generation_prompt=True)


def render_tool_example(tok: PreTrainedTokenizerFast, example: dict) -> tuple[list[int], list[int]]:
    """A tool example rendered with the chat template, and its loss mask.

    The assistant's answer is built from ``example["tool_calls"]``. The mask is 1 exactly on that answer's
    tokens, ``<|tool_call|>`` through ``<|/tool_call|>`` and the closing ``<|end|>``, and 0 on the prompt
    (messages, tools and the ``<|assistant|>`` marker).
    """
    prompt = render_tool_prompt(tok, example)
    answer = {"role": "assistant", "content": "", "tool_calls": example["tool_calls"]}
    ids = _chat_ids(tok, example["messages"] + [answer], example.get("tools"), add_generation_prompt=False)
    # The prompt ends in a special token, which BPE never merges across, so it is an exact prefix.
    if ids[: len(prompt)] != prompt:
        raise RuntimeError("the chat template rendered the prompt differently inside the full example")
    return ids, [0] * len(prompt) + [1] * (len(ids) - len(prompt))
