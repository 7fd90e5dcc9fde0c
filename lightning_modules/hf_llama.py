"""Our :class:`Transformer` and transformers' ``LlamaForCausalLM``: the same network, mapped both ways.

Our RoPE follows the Hugging Face Llama convention, so the weights only need renaming and the fused q/k/v
and gate/up projections splitting (export) or concatenating (import); tests check that the logits match.
A transformers directory we import must be a Llama with exactly our choices (SiLU, no biases, plain RoPE);
anything else is refused, naming the field of its ``config.json`` that differs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from datamodules.errors import StagewiseError
from lightning_modules.transformer import TransformerConfig

# config.json field -> TransformerConfig field. The first ones fix the weights' meaning: a preset or
# override that disagrees with the model is refused; the last ones only shape training and may change.
FIXED = {"hidden_size": "d_model", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
         "num_key_value_heads": "n_kv_heads", "intermediate_size": "ffn_hidden",
         "tie_word_embeddings": "tie_embeddings", "rope_theta": "rope_theta", "rms_norm_eps": "norm_eps"}
FREE = {"max_position_embeddings": "max_seq_len", "initializer_range": "init_std"}


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


# ----------------------------------------------------------------------------------------------- import
def is_hf_dir(path: str | Path | None) -> bool:
    """Whether ``path`` is a transformers model directory (one with a ``config.json``)."""
    return path is not None and Path(path).is_dir() and (Path(path) / "config.json").is_file()


def read_hf_config(model_dir: str | Path):
    """The transformers config of ``model_dir``; StagewiseError unless it is a Llama we can map (naming the field)."""
    from transformers import AutoConfig

    where = f"init_from: {Path(model_dir) / 'config.json'}"
    model_type = json.loads((Path(model_dir) / "config.json").read_text()).get("model_type")
    if model_type != "llama":
        raise StagewiseError(f"{where} has model_type {model_type!r}; stagewise's transformer maps onto 'llama' "
                             "(LlamaForCausalLM) only. Start from a Llama-architecture model or a stagewise export")
    config = AutoConfig.from_pretrained(str(model_dir))
    rope = dict(getattr(config, "rope_parameters", None) or {})
    wanted = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
              "head_dim": config.hidden_size // config.num_attention_heads,
              "rope_parameters.rope_type": "default", "pretraining_tp": 1}
    found = {"hidden_act": config.hidden_act, "attention_bias": config.attention_bias, "mlp_bias": config.mlp_bias,
             "head_dim": getattr(config, "head_dim", None) or wanted["head_dim"],
             "rope_parameters.rope_type": rope.get("rope_type", "default"),
             "pretraining_tp": getattr(config, "pretraining_tp", 1) or 1}
    for field, value in wanted.items():
        if found[field] != value:
            raise StagewiseError(f"{where} has {field} {found[field]!r} but stagewise's transformer needs {value!r} "
                                 "(a Llama with SiLU, no biases, head_dim = hidden_size / num_attention_heads and "
                                 "plain RoPE); it cannot be mapped")
    return config


def config_fields(config) -> dict[str, Any]:
    """The :class:`TransformerConfig` fields (all but ``vocab_size``) of a transformers Llama config."""
    theirs = {"rope_theta": dict(config.rope_parameters or {}).get("rope_theta", 10000.0)}
    for hf_field, ours in {**FIXED, **FREE}.items():
        if hf_field != "rope_theta":
            theirs[ours] = getattr(config, hf_field)
    theirs["n_kv_heads"] = theirs["n_kv_heads"] or theirs["n_heads"]
    return theirs


def load_hf_state(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """The safetensors weights of ``model_dir`` (one file or an index of shards), by their transformers names."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (model_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise StagewiseError(f"init_from: {model_dir} holds no model.safetensors; stagewise reads safetensors "
                             "weights only (`model.save_pretrained(dir)` writes them)")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(model_dir / name)))
    return state


def our_state_dict(hf_state: dict[str, torch.Tensor], config: TransformerConfig, where: str) -> dict[str, torch.Tensor]:
    """A ``LlamaForCausalLM`` state dict (transformers names) as our ``Transformer``'s, float32, the inverse of
    :func:`hf_state_dict`. When ``config.vocab_size`` is larger than the model's vocabulary (an adopted
    tokenizer that gained our special tokens), each new row of the embedding and of the output head is the
    mean of the model's rows, so every logit of the original vocabulary stays what it was."""
    state = {k: v.float() for k, v in hf_state.items() if not k.endswith("rotary_emb.inv_freq")}
    mapped = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "lm_head.weight": "lm_head.weight" if "lm_head.weight" in state else "model.embed_tokens.weight"}
    for i in range(config.n_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        mapped |= {ours + "attn_norm.weight": hf + "input_layernorm.weight",
                   ours + "attn.out.weight": hf + "self_attn.o_proj.weight",
                   ours + "mlp_norm.weight": hf + "post_attention_layernorm.weight",
                   ours + "mlp.down.weight": hf + "mlp.down_proj.weight"}
    fused = {f"layers.{i}.attn.qkv.weight": [f"model.layers.{i}.self_attn.{p}_proj.weight" for p in "qkv"]
             for i in range(config.n_layers)}
    fused |= {f"layers.{i}.mlp.gate_up.weight": [f"model.layers.{i}.mlp.{p}_proj.weight" for p in ("gate", "up")]
              for i in range(config.n_layers)}
    needed = set(mapped.values()) | {k for parts in fused.values() for k in parts}
    missing, unused = sorted(needed - set(state)), sorted(set(state) - needed)
    if missing or unused:
        raise StagewiseError(f"{where}: its weights do not match its config.json: missing {missing[:3]}, not "
                             f"mapped {unused[:3]}; it is not a plain LlamaForCausalLM")
    out = {ours: state[hf] for ours, hf in mapped.items()}
    out |= {ours: torch.cat([state[p] for p in parts]) for ours, parts in fused.items()}
    for name in ("tok_embeddings.weight", "lm_head.weight"):
        rows = out[name]
        extra = config.vocab_size - rows.shape[0]
        if extra > 0:
            out[name] = torch.cat([rows, rows.mean(dim=0, keepdim=True).expand(extra, -1)])
    return out
