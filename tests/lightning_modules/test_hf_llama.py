"""Starting from a transformers model: a random LlamaForCausalLM saved by transformers, its tokenizer adopted by
`stagewise prepare`, a stage started from it with init_from (equal logits), and export -> init_from -> export."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import save_llama
from safetensors.torch import load_file

from callbacks.stage_handoff import StageHandoff
from datamodules.datamodule import LanguageDataModule
from datamodules.errors import StagewiseError
from datamodules.tokenizer import SPECIAL_TOKENS, load_tokenizer
from lightning_modules.causal_lm import CausalLM, model_config
from lightning_modules.cli import main
from lightning_modules.export import export_hf

TEXTS = [f"The {w} river runs past the {v} stone, morning and evening, day {i}.\n"
         for i, (w, v) in enumerate(zip("quick slow wide narrow old new".split() * 5, "grey red blue".split() * 10))]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A transformers model directory: the random Llama and a tokenizer of its own, without our special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("llama")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(out)
    return save_llama(out, len(tok))


@pytest.fixture(scope="module")
def stage(llama_dir, tmp_path_factory):
    """`stagewise prepare` adopting the model's tokenizer, then a stage started from the model with init_from:
    the logits its first training step starts from, and the run directory."""
    root = tmp_path_factory.mktemp("run")
    (root / "text").mkdir()
    for i, text in enumerate(TEXTS):
        (root / "text" / f"{i:02d}.txt").write_text(text * 3)
    config = {"data_dir": str(root / "data"), "tokenizer": {"from_model": str(llama_dir)},
              "corpora": {"language": {"val_fraction": 0.2, "test_fraction": 0.0, "sources": [
                  {"class_path": "datamodules.sources.TextFiles",
                   "init_args": {"paths": ["*.txt"], "root": str(root / "text"), "name": "river"}}]}}}
    (root / "data.yaml").write_text(yaml.safe_dump(config))
    main(["prepare", "-c", str(root / "data.yaml")])

    class StartLogits(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.logits = pl_module.model(IDS).detach().clone()

    dm = LanguageDataModule(data_dir=str(root / "data"), seq_len=16, batch_size=2)
    model = CausalLM(vocab_size=dm.vocab_size, tokenizer_sha256=dm.tokenizer_sha256, init_from=str(llama_dir),
                     warmup_steps=1)
    start = StartLogits()
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", limit_val_batches=0,
                        callbacks=[start, StageHandoff("language", models_dir=str(root / "models"))])
    trainer.fit(model, datamodule=dm)
    return start.logits, model, root


IDS = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(3))


def test_a_stage_started_from_a_transformers_llama_has_its_logits(llama_dir, stage):
    from transformers import AutoModelForCausalLM

    start_logits, model, root = stage
    hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(IDS).logits
    vocab = theirs.shape[-1]
    torch.testing.assert_close(start_logits[..., :vocab], theirs, atol=1e-5, rtol=0)  # the original vocabulary
    assert model.config.d_model == 64 and model.config.n_kv_heads == 2 and model.config.rope_theta == 5000.0
    # the adopted tokenizer kept every id and added ours; the rounded vocabulary's new rows began as the mean row
    tok = load_tokenizer(root / "data" / "tokenizer")
    assert len(tok) == vocab + len(SPECIAL_TOKENS) and model.config.vocab_size == 320
    start = CausalLM(vocab_size=320, init_from=str(llama_dir))
    start.configure_model()
    start.load_init_from(llama_dir)
    rows = start.model.tok_embeddings.weight
    torch.testing.assert_close(rows[vocab:], rows[:vocab].mean(0).expand(320 - vocab, -1))
    record = json.loads((root / "models" / "language" / "stage.json").read_text())
    assert record["parent"]["path"] == str(llama_dir) and record["tokens"]["total"] == record["tokens"]["stage"]


def test_export_then_init_from_then_export_round_trips_the_weights(stage, tmp_path):
    _, model, root = stage
    first = root / "models" / "language" / "hf"  # StageHandoff's export of the stage's model
    again = CausalLM(vocab_size=model.config.vocab_size, init_from=str(first), tokenizer_sha256=model.hparams.tokenizer_sha256)
    again.configure_model()
    again.load_init_from(first)
    ckpt = tmp_path / "again.ckpt"
    torch.save({"state_dict": again.state_dict(), "hyper_parameters": dict(again.hparams)}, ckpt)
    second = export_hf(ckpt, tmp_path / "hf", tokenizer_dir=first)
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((first / "config.json").read_text()) == json.loads((second / "config.json").read_text())


def test_the_shape_comes_from_config_json_and_a_disagreeing_preset_is_refused(llama_dir):
    assert model_config(None, 320, {"max_seq_len": 64}, str(llama_dir)).max_seq_len == 64  # free to change
    with pytest.raises(StagewiseError, match="has hidden_size 64 but size 'small' gives d_model 384.*size null"):
        model_config("small", 320, None, str(llama_dir))
    with pytest.raises(StagewiseError, match="has num_hidden_layers 2 but model_overrides gives n_layers 3"):
        model_config(None, 320, {"n_layers": 3}, str(llama_dir))
    with pytest.raises(StagewiseError, match="has vocab_size 300 but this stage's tokenizer has 256 ids.*from_model"):
        model_config(None, 256, None, str(llama_dir))


@pytest.mark.parametrize("changes, field", [
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"attention_bias": True}, "attention_bias True"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 5000.0, "factor": 2.0}}, "rope_parameters.rope_type 'linear'"),
])
def test_a_model_we_cannot_map_is_refused_naming_the_field(tmp_path, make_llama, changes, field):
    make_llama(tmp_path / "m", 300, **changes)
    with pytest.raises(StagewiseError, match=f"has {field} but stagewise's transformer needs"):
        model_config(None, 320, None, str(tmp_path / "m"))


def test_another_architecture_is_refused_naming_model_type(tmp_path):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(StagewiseError, match="has model_type 'gpt2'; stagewise's transformer maps onto 'llama'"):
        model_config(None, 320, None, str(tmp_path / "gpt2"))
