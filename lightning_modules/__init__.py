"""stagewise: the transformer, the LightningModules that train it, the CLI and HF export."""

from lightning_modules.causal_lm import CausalLM
from lightning_modules.preference_lm import PreferenceLM
from lightning_modules.transformer import Transformer, TransformerConfig

__all__ = ["CausalLM", "PreferenceLM", "Transformer", "TransformerConfig"]
