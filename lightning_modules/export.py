"""``stagewise export``: a CausalLM checkpoint -> a transformers ``LlamaForCausalLM`` directory.

Our RoPE follows the Hugging Face Llama convention, so the mapping only renames tensors and splits the
fused q/k/v and gate/up projections; a test checks that the logits match.

    stagewise export --ckpt models/default/tools_model_best.ckpt --out models/default/tools_hf --tokenizer_dir data/tokenizer
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from datamodules.stage_record import read_checkpoint
from datamodules.errors import StagewiseError, TokenizerMismatchError
from lightning_modules.transformer import TransformerConfig


def hf_config(config: TransformerConfig, **token_ids):
    """The ``LlamaConfig`` of the same shape; ``token_ids`` (bos/eos/pad_token_id) pass through."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.ffn_hidden,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads, head_dim=config.head_dim,
        max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=config.tie_embeddings, attention_bias=False, mlp_bias=False, hidden_act="silu",
        initializer_range=config.init_std, **token_ids,
    )


def hf_state_dict(state: dict[str, torch.Tensor], config: TransformerConfig) -> dict[str, torch.Tensor]:
    """Our ``Transformer`` state dict renamed (and fused projections split) for ``LlamaForCausalLM``."""
    hd, ffn = config.head_dim, config.ffn_hidden
    out = {
        "model.embed_tokens.weight": state["tok_embeddings.weight"],
        "model.norm.weight": state["norm.weight"],
        "lm_head.weight": state["lm_head.weight"],
    }
    for i in range(config.n_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        q, k, v = state[ours + "attn.qkv.weight"].split(
            [config.n_heads * hd, config.n_kv_heads * hd, config.n_kv_heads * hd]
        )
        gate, up = state[ours + "mlp.gate_up.weight"].split([ffn, ffn])
        out |= {
            hf + "input_layernorm.weight": state[ours + "attn_norm.weight"],
            hf + "self_attn.q_proj.weight": q, hf + "self_attn.k_proj.weight": k, hf + "self_attn.v_proj.weight": v,
            hf + "self_attn.o_proj.weight": state[ours + "attn.out.weight"],
            hf + "post_attention_layernorm.weight": state[ours + "mlp_norm.weight"],
            hf + "mlp.gate_proj.weight": gate, hf + "mlp.up_proj.weight": up,
            hf + "mlp.down_proj.weight": state[ours + "mlp.down.weight"],
        }
    return {k: v.clone().contiguous() for k, v in out.items()}


def export_hf(ckpt_path: str | Path, out_dir: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """Write checkpoint ``ckpt_path`` as a ``LlamaForCausalLM`` directory ``out_dir`` (safetensors, float32
    as trained), with the tokenizer files of ``tokenizer_dir`` when given (it must be the checkpoint's
    tokenizer). Returns ``out_dir``."""
    from transformers import LlamaForCausalLM

    ckpt_path, out_dir = Path(ckpt_path), Path(out_dir)
    ckpt = read_checkpoint(ckpt_path, "train a stage first (stagewise fit ...)")
    hp = ckpt.get("hyper_parameters") or {}
    if hp.get("architecture", "dense") != "dense" or "size" not in hp:
        raise StagewiseError(f"{ckpt_path} is not a dense CausalLM checkpoint; only those map onto Llama")
    config = TransformerConfig.from_preset(hp["size"], vocab_size=hp["vocab_size"], **(hp.get("model_overrides") or {}))
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}

    token_ids = {}
    if tokenizer_dir is not None:
        from datamodules.tokenizer import load_tokenizer, tokenizer_sha256

        tok = load_tokenizer(tokenizer_dir)
        expected, actual = hp.get("tokenizer_sha256"), tokenizer_sha256(tokenizer_dir)
        if expected and expected != actual:
            raise TokenizerMismatchError(
                f"{tokenizer_dir} is not the tokenizer {ckpt_path} was trained with "
                f"({actual[:12]}… vs {expected[:12]}…); pass the tokenizer of the data it was trained on"
            )
        token_ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                     "pad_token_id": tok.pad_token_id}

    model = LlamaForCausalLM(hf_config(config, **token_ids))
    try:
        model.load_state_dict(hf_state_dict(state, config), strict=True)
    except (KeyError, RuntimeError) as err:
        raise StagewiseError(f"{ckpt_path} does not hold a plain dense transformer ({err})") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    if tokenizer_dir is not None:
        for file in sorted(Path(tokenizer_dir).iterdir()):
            if file.is_file():
                shutil.copy2(file, out_dir / file.name)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    """``stagewise export --ckpt CKPT --out DIR [--tokenizer_dir DIR]``."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="stagewise export", description="checkpoint -> transformers LlamaForCausalLM directory")
    parser.add_argument("--ckpt", type=str, required=True, help="a CausalLM checkpoint (.ckpt)")
    parser.add_argument("--out", type=str, required=True, help="output directory")
    parser.add_argument("--tokenizer_dir", type=str | None, default=None,
                        help="tokenizer to copy alongside (checked against the checkpoint's tokenizer_sha256)")
    args = parser.parse_args(argv)
    out = export_hf(args.ckpt, args.out, args.tokenizer_dir)
    print(f"wrote {out} (load with transformers.AutoModelForCausalLM.from_pretrained('{out}'))")
