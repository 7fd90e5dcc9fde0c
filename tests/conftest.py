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


# ----------------------------------------------------------------------------- a prepared tool corpus
TOOL_SET = [
    {"name": "get_weather", "description": "Weather forecast for a city",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                    "required": ["city"]}},
    {"name": "convert_currency", "description": "Convert an amount between currencies",
     "parameters": {"type": "object", "properties": {"amount": {"type": "number"},
                                                     "to": {"type": "string", "enum": ["EUR", "USD", "JPY"]}},
                    "required": ["amount", "to"]}},
    {"name": "get_time", "description": "Local time in a city",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
]
CITIES = ["Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Quito", "Accra", "Hanoi", "Rome", "Delhi", "Seoul", "Berlin",
          "Madrid", "Nairobi", "Dublin", "Havana", "Manila", "Prague", "Santiago", "Vienna"]


def tool_corpus_examples() -> list[dict]:
    """60 tool examples over three functions, every call's arguments readable from the request."""
    out = []
    for i, city in enumerate(CITIES):
        currency = ["EUR", "USD", "JPY"][i % 3]
        for content, call in (
            (f"What is the weather in {city} for {i % 5 + 1} days?",
             {"name": "get_weather", "arguments": {"city": city, "days": i % 5 + 1}}),
            (f"Convert {10 * i + 5} dollars to {currency} for my trip to {city}",
             {"name": "convert_currency", "arguments": {"amount": 10 * i + 5, "to": currency}}),
            (f"What time is it in {city}?", {"name": "get_time", "arguments": {"city": city}}),
        ):
            out.append({"messages": [{"role": "user", "content": content}], "tools": TOOL_SET, "tool_calls": [call]})
    return out


@pytest.fixture(scope="session")
def tool_data_dir(tmp_path_factory):
    """A data dir made by `stagewise prepare`: a 400-token tokenizer, small language and code corpora, and the
    60 examples of ``tool_corpus_examples`` as the ``tools`` corpus (a quarter held out)."""
    import json

    from datamodules.prepare import Corpus, TokenizerConfig, prepare
    from datamodules.sources import TextFiles
    from datamodules.tool_examples import ToolJsonl

    root = tmp_path_factory.mktemp("tool_data")
    for name, text in (("language", "The quick brown fox jumps over the lazy dog number {i}. "),
                       ("code", "def add_{i}(a, b):\n    return a + b * {i}\n")):
        (root / name).mkdir()
        for i in range(12):
            (root / name / f"doc{i:02d}.txt").write_text((text.format(i=i) + "\n") * 12)
    (root / "tools.jsonl").write_text("".join(json.dumps(e) + "\n" for e in tool_corpus_examples()))
    corpora = {name: Corpus(sources=[TextFiles(paths=["*.txt"], root=str(root / name), name=name)],
                            val_fraction=0.25, test_fraction=0.1) for name in ("language", "code")}
    corpora["tools"] = Corpus(sources=[ToolJsonl(paths=[str(root / "tools.jsonl")])], kind="tools",
                              val_fraction=0.25, test_fraction=0.05)
    prepare(corpora, TokenizerConfig(vocab_size=400, sample_bytes=100_000), str(root / "data"))
    return root / "data"


@pytest.fixture(scope="session")
def tool_parent(tool_data_dir, tmp_path_factory):
    """A tool stage as the preference stage's parent: the tiny preset with 2 layers trained 40 steps on
    ``tool_data_dir``'s tools (128-token windows), ``<root>/models/tools_model_best.ckpt`` + ``tools/stage.json``."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from callbacks.stage_handoff import StageHandoff
    from datamodules.datamodule import ToolDataModule
    from lightning_modules.causal_lm import CausalLM

    root = tmp_path_factory.mktemp("tool_parent")
    L.seed_everything(0, verbose=False)
    dm = ToolDataModule(data_dir=str(tool_data_dir), seq_len=128, batch_size=4)
    model = CausalLM(size="tiny", model_overrides={"n_layers": 2}, vocab_size=dm.vocab_size,
                     tokenizer_sha256=dm.tokenizer_sha256, lr=3e-3, warmup_steps=4)
    trainer = L.Trainer(
        max_steps=40, val_check_interval=40, check_val_every_n_epoch=None, num_sanity_val_steps=0, logger=False,
        callbacks=[ModelCheckpoint(dirpath=root / "models", filename="tools_model_best", monitor="val/tools/loss",
                                   auto_insert_metric_name=False, enable_version_counter=False),
                   StageHandoff("tools", models_dir=str(root / "models"), export_hf=False)],
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", use_distributed_sampler=False,
        default_root_dir=root,
    )
    trainer.fit(model, datamodule=dm)
    return root / "models" / "tools_model_best.ckpt"
