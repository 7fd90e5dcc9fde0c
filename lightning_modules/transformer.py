"""A dense decoder-only transformer, Llama style, in one file.

RMSNorm, rotary position embeddings (the Hugging Face Llama convention: ``rotate_half`` over the two
halves of each head, so the weights load into ``LlamaForCausalLM`` without permutation), SwiGLU,
grouped-query attention through ``F.scaled_dot_product_attention``, no biases, optional weight tying.

To change attention, subclass :class:`CausalSelfAttention` (usually just :meth:`~CausalSelfAttention.attend`)
and pass the class as ``Transformer(config, attention=MyAttention)``; see
``experiments/examples/sliding_window_attention.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from datamodules.errors import StagewiseError


@dataclass
class TransformerConfig:
    """Shape and initialisation of a :class:`Transformer`."""

    vocab_size: int = 8192
    """Number of token ids (the tokenizer's vocabulary)."""
    d_model: int = 384
    """Width of the residual stream."""
    n_layers: int = 10
    """Number of transformer blocks."""
    n_heads: int = 6
    """Query heads per attention layer; ``d_model`` must be a multiple of it."""
    n_kv_heads: int | None = None
    """Key/value heads (grouped-query attention); ``None`` means ``n_heads`` (plain multi-head)."""
    ffn_hidden: int = 1024
    """Hidden width of the SwiGLU feed-forward layer."""
    max_seq_len: int = 2048
    """Longest sequence (prompt + generated tokens) the model accepts."""
    rope_theta: float = 10000.0
    """Base of the rotary embedding frequencies."""
    norm_eps: float = 1e-5
    """Epsilon of RMSNorm."""
    tie_embeddings: bool = False
    """Share the input embedding matrix with the output head."""
    dropout: float = 0.0
    """Dropout on attention weights and on each block's residual branches (0 for pretraining)."""
    init_std: float = 0.02
    """Std of the normal init; output projections get ``init_std / sqrt(2 * n_layers)``."""

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        problems = []
        if self.d_model % self.n_heads:
            problems.append(f"d_model={self.d_model} is not a multiple of n_heads={self.n_heads}")
        elif (self.d_model // self.n_heads) % 2:
            problems.append(f"head size d_model/n_heads={self.d_model // self.n_heads} must be even for RoPE")
        if self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if problems:
            raise StagewiseError("invalid model shape: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_preset(cls, size: str, **overrides) -> TransformerConfig:
        """The preset ``size`` (a key of ``PRESETS``) with some fields replaced, e.g. ``vocab_size``."""
        if size not in PRESETS:
            raise StagewiseError(f"unknown model size '{size}'; choose one of: {', '.join(PRESETS)}")
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise StagewiseError(
                f"unknown model field(s) {', '.join(unknown)} in model_overrides; valid: {', '.join(sorted(valid))}"
            )
        return replace(PRESETS[size], **overrides)


# Named sizes count parameters without the input embedding (the output head counts: it is a matmul) at
# vocab 32768; tiny is meant for a small vocabulary (≈1M at vocab 8192). Head size 64 from small up.
PRESETS: dict[str, TransformerConfig] = {
    "tiny": TransformerConfig(d_model=64, n_layers=6, n_heads=4, n_kv_heads=2, ffn_hidden=256),  # ≈1M
    "small": TransformerConfig(d_model=384, n_layers=10, n_heads=6, ffn_hidden=1024),  # ≈30M
    "base": TransformerConfig(d_model=768, n_layers=12, n_heads=12, ffn_hidden=2048),  # ≈124M, GPT-2 small
    "medium": TransformerConfig(d_model=1024, n_layers=24, n_heads=16, ffn_hidden=2816),  # ≈350M, GPT-2 medium
    "large": TransformerConfig(d_model=1280, n_layers=36, n_heads=20, ffn_hidden=3456),  # ≈760M, GPT-2 large
    "xl": TransformerConfig(d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_hidden=5632),  # ≈1.1B, TinyLlama
}


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale (``F.rms_norm``; autocast runs it in float32).

    Upcasting by hand (``x.float()`` around the norm, as Hugging Face's Llama does) kept float32 copies of
    every normed activation for backward; this form, together with half-size RoPE tables, made our raw
    training loop 2.6% faster on an H200 (first session of 2026-11-26 in
    ``experiments/results/throughput_summary.md``). The result differs only by rounding.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_cos_sin(length: int, head_dim: int, theta: float, device: torch.device | None = None):
    """cos and sin, [length, head_dim / 2] (float32), of positions ``0 .. length-1``; in the Hugging Face
    convention the two halves of a head share these frequencies."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, heads, T, head_dim] by position (``rotate_half`` over split halves): the pair
    (x1, x2) of halves becomes (x1·cos − x2·sin, x2·cos + x1·sin); ``cos``/``sin`` are [T, head_dim / 2]
    or [B, 1, T, head_dim / 2]."""
    x1, x2 = x.unflatten(-1, (2, x.shape[-1] // 2)).unbind(-2)
    c, s = cos.type_as(x), sin.type_as(x)
    # stacked rather than concatenated halves: compiled, 13% less time forward + backward at xl's shape
    # (experiments/rope_kernels.py, "table_stack" vs "table")
    return torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-2).flatten(-2)


class LayerCache:
    """One layer's keys and values, preallocated to ``max_len`` positions."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype, device) -> None:
        self.k = torch.zeros(batch, n_kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v`` at positions ``start..``; return all keys and values up to the last one.

        With ``start`` a 0-d tensor (:meth:`Transformer.decode_step`), the write is an ``index_copy_`` and all
        ``max_len`` slots come back: shapes and addresses that do not change from step to step."""
        if isinstance(start, torch.Tensor):
            slots = start + torch.arange(k.shape[2], device=k.device)
            self.k.index_copy_(2, slots, k.to(self.k.dtype))
            self.v.index_copy_(2, slots, v.to(self.v.dtype))
            return self.k, self.v
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """Keys and values of every layer for incremental decoding; ``pos`` is the number of cached slots.

    For a left-padded batch, ``key_mask`` [B, max_len] marks the slots that hold real tokens and ``lengths``
    [B] counts them per row (the next token's RoPE position); both stay None for unpadded decoding.
    """

    def __init__(self, config: TransformerConfig, batch: int, max_len: int, dtype, device) -> None:
        self.max_len = max_len
        self.pos = 0
        self.key_mask: torch.Tensor | None = None
        self.lengths: torch.Tensor | None = None
        self.layers = [
            LayerCache(batch, config.n_kv_heads, max_len, config.head_dim, dtype, device)
            for _ in range(config.n_layers)
        ]


class CausalSelfAttention(nn.Module):
    """Multi-head (or grouped-query) causal self-attention with RoPE and a fused q/k/v projection."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.qkv = nn.Linear(config.d_model, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=False)
        self.out = nn.Linear(self.n_heads * self.head_dim, config.d_model, bias=False)
        self.dropout = config.dropout

    def forward(self, x, cos, sin, cache: LayerCache | None = None, start: int = 0,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``cos``/``sin`` are [T, hd/2], or [B, 1, T, hd/2] for per-row positions; ``key_mask`` [B, S] marks
        the key slots that hold real tokens (left-padded batches; passed to ``attend`` only when given)."""
        B, T, _ = x.shape
        sizes = [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim]
        q, k, v = self.qkv(x).split(sizes, dim=-1)
        q = apply_rope(q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2), cos, sin)
        k = apply_rope(k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2), cos, sin)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, start)
        y = self.attend(q, k, v, start) if key_mask is None else self.attend(q, k, v, start, key_mask=key_mask)
        return self.out(y.transpose(1, 2).reshape(B, T, -1))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int,
               key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Causal attention of queries [B, H, T, hd] in slots ``start..start+T-1`` over keys and values
        [B, KV, S, hd] in slots ``0..S-1`` (``S = start + T``). Returns [B, H, T, hd].

        ``key_mask`` [B, S] (True = real token) hides left padding; a padding query sees only itself, so
        its (unused) output stays finite. Subclasses that leave it out still decode unpadded batches."""
        T, S = q.shape[2], k.shape[2]
        mask = None
        if T != S or key_mask is not None:  # decoding with a cache: query i sees keys up to start + i
            k_slot, q_slot = torch.arange(S, device=q.device), (start + torch.arange(T, device=q.device))[:, None]
            mask = k_slot <= q_slot
            if key_mask is not None:  # [B, 1, T, S]
                mask = mask & (key_mask[:, None, None, :] | (k_slot == q_slot))
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=self.n_kv_heads != self.n_heads,
        )


class SwiGLU(nn.Module):
    """Feed-forward layer ``down(silu(gate(x)) * up(x))`` with gate and up fused in one matmul."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.gate_up = nn.Linear(config.d_model, 2 * config.ffn_hidden, bias=False)
        self.down = nn.Linear(config.ffn_hidden, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, config: TransformerConfig, attention: Callable[[TransformerConfig], nn.Module]) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = attention(config)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, cache: LayerCache | None = None, start: int = 0,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        attn_args = (cos, sin, cache, start) if key_mask is None else (cos, sin, cache, start, key_mask)
        x = x + self.drop(self.attn(self.attn_norm(x), *attn_args))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class Transformer(nn.Module):
    """Decoder-only language model: token ids [B, T] -> next-token logits [B, T, vocab_size].

    Args:
        config: The model's shape.
        attention: Builds each layer's attention module from the config; swap it to change attention.
    """

    def __init__(
        self, config: TransformerConfig, attention: Callable[[TransformerConfig], nn.Module] = CausalSelfAttention
    ) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, attention) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight
        # RoPE's cos and sin of every position, computed once. Computed inside the compiled step instead, the
        # q/k rotation kernel re-derived them per element: 2.1 vs 0.84 ms forward + backward at base's shape on
        # an H200 (experiments/rope_kernels.py), 11.7 ms of a 72 ms step. Not in the state dict.
        for name in ("rope_cos", "rope_sin"):
            self.register_buffer(name, torch.empty(config.max_seq_len, config.head_dim // 2), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) for matrices, output projections scaled down by sqrt(2 * n_layers), norms at 1;
        the RoPE tables recomputed (also what a model built on the meta device needs once materialised)."""
        cos, sin = rope_cos_sin(self.config.max_seq_len, self.config.head_dim, self.config.rope_theta)
        with torch.no_grad():
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)
        std = self.config.init_std
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                # residual-branch outputs add up over 2 * n_layers branches (GPT-2 scaled init)
                scale = math.sqrt(2 * self.config.n_layers) if name.endswith((".out", ".down")) else 1.0
                nn.init.normal_(module.weight, mean=0.0, std=std / scale)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                attention_mask: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits [B, T, vocab] for ``input_ids`` [B, T]; with a ``cache`` they continue after its ``pos``.

        Args:
            input_ids: Token ids [B, T].
            cache: Keys and values of earlier tokens (``make_cache``); filled in place.
            attention_mask: [B, T], 1 for real tokens and 0 for left padding. Each row's RoPE positions
                then count its real tokens only, and attention skips the padding. With a cache, the mask
                is remembered: later calls (new tokens, all real) may leave it out.
            last_only: Return only the last position's logits [B, 1, vocab] (prefill for decoding).
        """
        B, T = input_ids.shape
        start = cache.pos if cache is not None else 0
        limit = cache.max_len if cache is not None else self.config.max_seq_len
        if start + T > limit:
            raise StagewiseError(
                f"sequence of {start + T} tokens is longer than the model's limit of {limit}; "
                "use shorter sequences or raise model_overrides.max_seq_len"
            )
        key_mask = None
        if attention_mask is not None or (cache is not None and cache.key_mask is not None):
            if attention_mask is None:
                real = torch.ones(B, T, dtype=torch.bool, device=input_ids.device)
            else:
                real = attention_mask.to(device=input_ids.device, dtype=torch.bool)
            before = torch.zeros(B, dtype=torch.long, device=input_ids.device)
            if cache is not None and cache.lengths is not None:
                before = cache.lengths
            positions = (before[:, None] + real.long().cumsum(1) - 1).clamp(min=0)  # [B, T], all < start + T
            cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]  # [B, 1, T, hd/2]
            key_mask = real
            if cache is not None:
                if cache.key_mask is None:
                    cache.key_mask = torch.zeros(B, cache.max_len, dtype=torch.bool, device=input_ids.device)
                cache.key_mask[:, start:start + T] = real
                cache.lengths = before + real.sum(1)
                key_mask = cache.key_mask[:, :start + T]
        else:
            cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        x = self.tok_embeddings(input_ids)
        for i, layer in enumerate(self.layers):
            layer_cache = cache.layers[i] if cache is not None else None
            x = layer(x, cos, sin, layer_cache, start, key_mask)
        if cache is not None:
            cache.pos += T
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x))

    def decode_step(self, token: torch.Tensor, cache: KVCache, slot: torch.Tensor) -> torch.Tensor:
        """Logits [B, 1, vocab] of one new token per row ``token`` [B, 1], written to cache slot ``slot`` (a 0-d
        long tensor on the model's device): the :meth:`forward` of a decoding step, with nothing that changes
        shape or needs the host from one step to the next, so one CUDA graph replays every step.

        The cache must have been filled by a :meth:`forward` with ``attention_mask`` (its ``key_mask`` and
        ``lengths`` set); attention runs over all ``max_len`` slots, those not yet written masked out.
        ``cache.pos`` is left alone (the caller counts slots). Attention modules that override ``attend``
        decode through :meth:`forward` instead (:meth:`static_decoding`)."""
        positions = cache.lengths[:, None]  # each row's next RoPE position: its real tokens so far
        cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]
        cache.key_mask.index_fill_(1, slot.view(1), True)
        cache.lengths.add_(1)
        x = self.tok_embeddings(token)
        for layer, layer_cache in zip(self.layers, cache.layers):
            x = layer(x, cos, sin, layer_cache, slot, cache.key_mask)
        return self.lm_head(self.norm(x))

    def static_decoding(self) -> bool:
        """Whether :meth:`decode_step` decodes this model: every layer attends with ``CausalSelfAttention``'s own
        ``attend`` (a subclass's, e.g. a sliding window, may assume a growing cache)."""
        return all(type(layer.attn).attend is CausalSelfAttention.attend for layer in self.layers)

    def make_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache for ``batch`` sequences of up to ``max_len`` (default ``max_seq_len``) tokens."""
        max_len = min(max_len or self.config.max_seq_len, self.config.max_seq_len)
        p = self.lm_head.weight
        # under autocast, keys and values come out of the projections in its dtype: keep them so (a float32
        # cache would be cast back on every decoding step, all of it, in every layer)
        kind = p.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else p.dtype
        return KVCache(self.config, batch, max_len, dtype, p.device)

    def num_parameters(self, non_embedding: bool = True) -> int:
        """Number of parameters. ``non_embedding`` leaves out the input embedding table but counts the
        output head even when tied (it is a matmul every token pays for: the N of 6N FLOPs per token)."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied matrix once
        if non_embedding:
            n -= self.tok_embeddings.weight.numel()
            if self.config.tie_embeddings:
                n += self.lm_head.weight.numel()
        return n


ARCHITECTURES: dict[str, type[nn.Module]] = {"dense": Transformer}
"""Model families by ``CausalLM(architecture=...)`` name."""
