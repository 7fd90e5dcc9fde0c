"""``stagewise export``: a CausalLM checkpoint -> a complete transformers directory.

The directory holds a ``LlamaForCausalLM`` (``lightning_modules.hf_llama`` maps the weights; a test checks
the logits match), the tokenizer the checkpoint was trained with, found by itself, and a
``generation_config.json`` that stops at the end of an assistant turn. ``AutoTokenizer`` and
``AutoModelForCausalLM.from_pretrained(out)`` load it with no other argument:

    stagewise export --ckpt models/default/tools_model_best.ckpt --out models/default/tools_hf
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from datamodules.errors import StagewiseError, TokenizerMismatchError
from datamodules.shards import atomic_dir
from datamodules.stage_record import read_checkpoint, stage_record_for_checkpoint
from datamodules.tokenizer import END, chat_template_sha256, load_tokenizer, tokenizer_sha256
from lightning_modules.causal_lm import model_config
from lightning_modules.hf_llama import hf_config, hf_state_dict


def _data_dirs(ckpt_path: Path, ckpt: dict[str, Any]) -> list[Path]:
    """Where the checkpoint's data was: its data module's saved ``data_dir`` and its stage record's config,
    each as given (relative to the working directory) and relative to the checkpoint's parent directories."""
    named = [v.get("data_dir") for v in ckpt.values() if isinstance(v, dict) and "corpus" in v and "data_dir" in v]
    record = stage_record_for_checkpoint(ckpt_path) or {}
    data = ((record.get("config") or {}).get("data") or {})
    named.append((data.get("init_args") or data).get("data_dir") if isinstance(data, dict) else None)
    named.append("data")
    found: list[Path] = []
    for name in filter(None, named):
        for root in [Path("."), *ckpt_path.resolve().parents[:3]]:
            path = Path(name) if Path(name).is_absolute() else root / name
            if all(path.resolve() != p.resolve() for p in found):
                found.append(path)
    return found


def _tokenizer_dirs(data_dir: Path) -> list[Path]:
    dirs = [data_dir / "tokenizer"]
    for manifest in sorted(data_dir.glob("*/manifest.json")):
        named = json.loads(manifest.read_text()).get("tokenizer_dir")
        if named and Path(named) not in dirs:
            dirs.append(Path(named))
    return dirs


def find_tokenizer(ckpt_path: str | Path, ckpt: dict[str, Any], tokenizer_dir: str | Path | None = None,
                   allow_other_template: bool = False) -> Path:
    """The tokenizer directory checkpoint ``ckpt_path`` was trained with: ``tokenizer_dir`` when given
    (checked), else the first one with its recorded identity (``tokenizer_sha256`` and, when recorded,
    ``chat_template_sha256``) under its data dir, its stage record's data dir or ``data/``. A StagewiseError
    names every place looked at when there is none. Checkpoints from before the chat template was recorded
    match on ``tokenizer.json`` alone."""
    hp = ckpt.get("hyper_parameters") or {}
    want, want_template = hp.get("tokenizer_sha256"), hp.get("chat_template_sha256")
    candidates = [Path(tokenizer_dir)] if tokenizer_dir is not None else [
        d for data_dir in _data_dirs(Path(ckpt_path), ckpt) for d in _tokenizer_dirs(data_dir)]
    if want is None:
        if tokenizer_dir is not None:
            return Path(tokenizer_dir)
        raise StagewiseError(f"{ckpt_path} records no tokenizer (no tokenizer_sha256 in its hyperparameters); pass "
                             "the tokenizer it was trained with as --tokenizer_dir DIR")
    looked = []
    for path in candidates:
        if not (path / "tokenizer.json").is_file():
            looked.append(f"{path} (no tokenizer)")
            continue
        sha, template = tokenizer_sha256(path), chat_template_sha256(path)
        if sha != want:
            looked.append(f"{path} (another tokenizer, {sha[:12]}…)")
        elif want_template and template != want_template and not allow_other_template:
            looked.append(f"{path} (the same vocabulary but another chat template, {template[:12]}… instead of "
                          f"{want_template[:12]}…; pass --allow_other_template true to export with it)")
        else:
            return path
    error = TokenizerMismatchError if tokenizer_dir is not None else StagewiseError
    raise error(f"cannot find the tokenizer {ckpt_path} was trained with (tokenizer {want[:12]}…): looked at "
                f"{'; '.join(looked) or 'nowhere'}. Pass its directory as --tokenizer_dir DIR, or re-run "
                "`stagewise prepare` on that stage's data config to recreate it")


def export_hf(ckpt_path: str | Path, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
              allow_other_template: bool = False) -> Path:
    """Write checkpoint ``ckpt_path`` as a complete transformers directory ``out_dir``: ``LlamaForCausalLM``
    weights (safetensors, float32 as trained) and ``config.json``, the checkpoint's tokenizer (see
    :func:`find_tokenizer`), and ``generation_config.json`` with the tokenizer's bos / pad ids and as
    ``eos_token_id`` every token that ends an assistant turn (eos and ``<|end|>``, not the end of one call).
    The one export of ``stagewise export`` and of ``StageHandoff`` (``models/<stage>/hf``). Returns ``out_dir``."""
    from transformers import GenerationConfig, LlamaForCausalLM

    ckpt_path, out_dir = Path(ckpt_path), Path(out_dir)
    earlier = out_dir / "config.json"  # an export replaces its directory whole: never one of the user's folders
    if out_dir.exists() and not earlier.is_file() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise StagewiseError(f"--out {out_dir} holds something other than an earlier export (no config.json), and an "
                             "export replaces the whole directory: name a new or empty one")
    ckpt = read_checkpoint(ckpt_path, "train a stage first (stagewise fit ...)")
    hp = ckpt.get("hyper_parameters") or {}
    if hp.get("architecture", "dense") != "dense" or "vocab_size" not in hp:
        raise StagewiseError(f"{ckpt_path} is not a dense CausalLM checkpoint; only those map onto Llama")
    config = model_config(hp.get("size"), hp["vocab_size"], hp.get("model_overrides"), hp.get("init_from"))
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    tok_dir = find_tokenizer(ckpt_path, ckpt, tokenizer_dir, allow_other_template)
    tok = load_tokenizer(tok_dir)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    model = LlamaForCausalLM(hf_config(config, **ids))
    try:
        model.load_state_dict(hf_state_dict(state, config), strict=True)
    except (KeyError, RuntimeError) as err:
        raise StagewiseError(f"{ckpt_path} does not hold a plain dense transformer ({err})") from None
    turn_ends = list(dict.fromkeys([tok.eos_token_id, tok.convert_tokens_to_ids(END)]))
    model.generation_config = GenerationConfig(**{**ids, "eos_token_id": turn_ends}, max_length=config.max_seq_len)
    with atomic_dir(out_dir) as tmp:  # a stopped export leaves the directory as it was, never half of one
        model.save_pretrained(tmp)
        for file in sorted(tok_dir.iterdir()):
            if file.is_file() and file.name != "stagewise_key.txt":
                shutil.copy2(file, tmp / file.name)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    """``stagewise export --ckpt CKPT --out DIR [--tokenizer_dir DIR]``."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="stagewise export", exit_on_error=False,
                            description="checkpoint -> complete transformers directory (LlamaForCausalLM + tokenizer)")
    parser.add_argument("--ckpt", type=str, required=True, help="a CausalLM checkpoint (.ckpt)")
    parser.add_argument("--out", type=str, required=True, help="output directory")
    parser.add_argument("--tokenizer_dir", type=str | None, default=None,
                        help="the tokenizer to write (default: found from the checkpoint's data dir or stage record; "
                             "checked against the checkpoint's tokenizer_sha256 and chat_template_sha256)")
    parser.add_argument("--allow_other_template", type=bool, default=False,
                        help="export with a tokenizer of the same vocabulary whose chat template is not the one the "
                             "checkpoint was trained with (after a template change)")
    args = parser.parse_args(argv)
    out = export_hf(args.ckpt, args.out, args.tokenizer_dir, args.allow_other_template)
    print(f"wrote {out} (load with transformers.AutoModelForCausalLM.from_pretrained('{out}') and "
          f"AutoTokenizer.from_pretrained('{out}'))")
