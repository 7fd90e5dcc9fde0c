"""Shared tiny fixtures."""

import pytest
import torch


def random_batch(
    batch_size: int = 2, seq_len: int = 16, vocab_size: int = 64, with_mask: bool = False, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A batch dict as the DataModules make it: ``input_ids``, ``targets`` (shifted by one), and for
    tool corpora a float ``loss_mask``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=g)
    batch = {"input_ids": ids[:, :-1].contiguous(), "targets": ids[:, 1:].contiguous()}
    if with_mask:
        batch["loss_mask"] = (torch.rand(batch_size, seq_len, generator=g) < 0.5).float()
    return batch


@pytest.fixture
def make_batch():
    """``make_batch(batch_size=2, seq_len=16, vocab_size=64, with_mask=False, seed=0)`` -> batch dict."""
    return random_batch


WORDS = ("the a river stone light quick brown fox jumps over lazy dog morning evening city market bread water "
         "winter summer people house window garden music letter night sleep dream king queen sword castle").split()
CODE = ["def f(x):", "    return x + 1", "for i in range(10):", "    print(i)", "if x == 0:", "    x = y * 2",
        "class A:", "    pass", "import os", "y = [i for i in x]", "while n > 0:", "    n -= 1"]


@pytest.fixture(scope="session")
def corpora(tmp_path_factory):
    """Prepared ``language`` (60 English-like documents) and ``code`` (60 Python-like files) corpora with a
    320-token tokenizer: ``<dir>/{language,code,tokenizer}``. Read-only: copy it to change it."""
    import random

    from datamodules.prepare import Corpus, TokenizerConfig, prepare
    from datamodules.sources import TextFiles

    root = tmp_path_factory.mktemp("corpora")
    rng = random.Random(1)
    for name in ("language", "code"):
        (root / "sources" / name).mkdir(parents=True)
    for i in range(60):
        text = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "." for _ in range(5)]
        (root / "sources" / "language" / f"doc{i:02d}.txt").write_text("\n".join(text) + "\n")
        (root / "sources" / "code" / f"mod{i:02d}.py").write_text("\n".join(rng.choice(CODE) for _ in range(12)) + "\n")
    sources = {name: Corpus(sources=[TextFiles(paths=["*"], root=str(root / "sources" / name))], val_fraction=0.2,
                            test_fraction=0.1) for name in ("language", "code")}
    prepare(sources, TokenizerConfig(vocab_size=320, sample_bytes=40000), str(root / "data"))
    return root / "data"


def save_llama(out, vocab_size: int, **changes):
    """A random small transformers ``LlamaForCausalLM`` (d 64, 2 layers, GQA 4/2, untied, RoPE base 5000) with
    every weight perturbed (norms too), saved to ``out`` by ``save_pretrained``; ``changes`` edit its config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                  rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**config, **changes}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(out)
    return out


@pytest.fixture
def make_llama():
    """``make_llama(out_dir, vocab_size, **config_changes)`` -> a saved random small LlamaForCausalLM directory."""
    return save_llama
