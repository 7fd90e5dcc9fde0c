"""``stagewise generate``: a prompt in, the model's text out, from a checkpoint or a ``stagewise export``.

    stagewise generate --ckpt models/demo/language_model_best.ckpt --prompt "The scheduler"
    stagewise generate --ckpt models/tools_hf --tools tools.json --prompt "What is the weather in Oslo?"
    stagewise generate --ckpt models/demo/code_model_best.ckpt --prompt "def parse(" --temperature 0.8 --top_k 50

With ``--tools`` (or ``--chat true``) the prompt is a user message rendered by the chat template, as
``apply_chat_template(..., tools=..., add_generation_prompt=True)`` renders it, and the answer ends with the
assistant's turn; the calls in it are printed as parsed by the tool evaluation. Without, the prompt is
continued as the start of a document.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from datamodules.errors import DataFormatError, StagewiseError
from datamodules.tokenizer import load_tokenizer
from datamodules.tool_examples import validate_tools
from lightning_modules.causal_lm import CausalLM
from lightning_modules.evaluate import load_model, read_checkpoint
from lightning_modules.export import find_tokenizer
from lightning_modules.hf_llama import is_hf_dir, read_hf_config
from lightning_modules.tool_eval import decoding_threads, parse_tool_calls, stop_token_ids


def load_for_generation(ckpt: str | Path, tokenizer_dir: str | Path | None = None):
    """The model (eval mode, on CPU) and tokenizer of a ``.ckpt`` (its tokenizer found as ``stagewise export``
    finds it) or of a transformers Llama directory with its tokenizer (an export)."""
    path = Path(ckpt)
    if is_hf_dir(path):
        tok = load_tokenizer(tokenizer_dir or path)
        model = CausalLM(vocab_size=read_hf_config(path).vocab_size, init_from=str(path))
        model.configure_model()
        model.load_init_from(path)
        return model.eval(), tok
    saved = read_checkpoint(path)
    tok = load_tokenizer(find_tokenizer(path, saved, tokenizer_dir))
    return load_model(path, saved=saved), tok


def _read_tools(path: str) -> list[dict]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise StagewiseError(f"--tools {path}: cannot read it ({err})") from None
    try:
        tools = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataFormatError(f"--tools {path}: not valid JSON ({err}); give a JSON list of tools") from None
    if isinstance(tools, dict) and "tools" in tools:
        tools = tools["tools"]
    return validate_tools(tools, f"--tools {path}")


def generate(
    ckpt: str,
    prompt: str,
    tools: str | None = None,
    system: str | None = None,
    chat: bool | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
    tokenizer_dir: str | None = None,
    device: str | None = None,
) -> dict:
    """Continue ``prompt`` with a stage's model and print the new text.

    Args:
        ckpt: A checkpoint (``models/<stage>_model_best.ckpt``) or a transformers directory from ``stagewise export``.
        prompt: The text to continue, or with ``chat`` the user's message.
        tools: A JSON file with the list of tools on offer (flat ``{"name", "description", "parameters"}`` or
            OpenAI-wrapped ``{"type": "function", "function": {...}}``); implies ``chat``.
        system: A system message (implies ``chat``).
        chat: Render ``prompt`` as a user message with the chat template and stop at the end of the
            assistant's turn (default: when ``tools`` or ``system`` is given).
        max_new_tokens: Most tokens generated.
        temperature: 0 decodes greedily; above 0 samples from the softmax at this temperature.
        top_k: When sampling, only from the ``top_k`` most likely tokens.
        seed: Seed of the sampling.
        tokenizer_dir: The tokenizer to use (default: the checkpoint's, found by its recorded identity; an
            export's own).
        device: ``cpu`` or ``cuda`` (default: cuda when available).

    Returns:
        ``{"text": the new text, "tool_calls": the calls parsed from it (with chat) or None}``.
    """
    tool_list = _read_tools(tools) if tools else None
    chat = bool(tool_list or system) if chat is None else chat
    model, tok = load_for_generation(ckpt, tokenizer_dir)
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        text = tok.apply_chat_template(messages, tools=tool_list, add_generation_prompt=True, tokenize=False)
        ids, stops = tok.encode(text, add_special_tokens=False), stop_token_ids(tok)
    else:  # the start of a document: documents follow an eos in the training stream
        ids, stops = [tok.eos_token_id] + tok.encode(prompt, add_special_tokens=False), [tok.eos_token_id]
    context = model.config.max_seq_len
    max_new_tokens = min(max_new_tokens, context - 1)
    ids = ids[-(context - max_new_tokens):]
    generator = torch.Generator(model.device).manual_seed(seed)
    with decoding_threads(model):
        out = model.generate(torch.tensor([ids]), max_new_tokens, eos_token_id=stops, temperature=temperature,
                             top_k=top_k, generator=generator)
    new = out[0, len(ids):].tolist()
    stop = next((k for k, t in enumerate(new) if t in stops), None)
    new = new if stop is None else new[: stop + 1]
    text = tok.decode(new, skip_special_tokens=False)
    result = {"text": text, "tool_calls": parse_tool_calls(text) if chat else None}
    print(result["text"])
    if result["tool_calls"]:
        print("tool_calls: " + json.dumps(result["tool_calls"]))
    return result


def main(args: list[str] | None = None) -> None:
    """Entry point of ``stagewise generate --ckpt CKPT --prompt TEXT [--tools FILE] [--temperature T]``."""
    from datamodules.command import run_function

    run_function(generate, args, "stagewise generate")
