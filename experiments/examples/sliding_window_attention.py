"""A changed attention block: causal sliding-window attention, swapped in through ``build_model``.

    stagewise fit -c configs/stages/language.yaml \\
        --model experiments.examples.sliding_window_attention.SlidingWindowLM --model.window 128

Each token attends to itself and the ``window - 1`` tokens before it. The checkpoint keeps the dense
model's tensor names, but a Llama export would silently drop the window, so export it only with
``window >= max_seq_len``.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_modules import CausalLM, Transformer, TransformerConfig
from lightning_modules.transformer import CausalSelfAttention


class SlidingWindowAttention(CausalSelfAttention):
    """Causal self-attention restricted to the last ``window`` positions (the query's own included)."""

    def __init__(self, config: TransformerConfig, window: int) -> None:
        super().__init__(config)
        self.window = window

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        T, S = q.shape[2], k.shape[2]
        q_pos = torch.arange(start, start + T, device=q.device)[:, None]
        k_pos = torch.arange(S, device=q.device)
        mask = (k_pos <= q_pos) & (k_pos > q_pos - self.window)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )


class SlidingWindowLM(CausalLM):
    """CausalLM whose transformer uses sliding-window attention in every layer.

    Args:
        window: Positions each token attends to, itself included.
        **kwargs: The arguments of ``CausalLM``.
    """

    def __init__(self, window: int = 256, **kwargs) -> None:
        super().__init__(**kwargs)
        self.window = window

    def build_model(self) -> nn.Module:
        return Transformer(self.config, attention=partial(SlidingWindowAttention, window=self.window))
