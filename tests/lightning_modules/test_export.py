import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from datamodules.errors import TokenizerMismatchError
from datamodules.tokenizer import tokenizer_sha256, train_tokenizer
from lightning_modules import CausalLM
from lightning_modules.export import export_hf, main

TEXTS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.\n"] * 20


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(TEXTS, vocab_size=300, out_dir=out)
    return out


def checkpoint(tmp_path, tokenizer_dir, make_batch, tie: bool) -> str:
    torch.manual_seed(0)
    vocab = 300
    model = CausalLM(size="tiny", vocab_size=vocab, tokenizer_sha256=tokenizer_sha256(tokenizer_dir),
                     model_overrides={"tie_embeddings": tie, "rope_theta": 5000.0}, warmup_steps=1)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path)
    trainer.fit(model, DataLoader([make_batch(vocab_size=vocab)], batch_size=None))
    path = str(tmp_path / "model.ckpt")
    trainer.save_checkpoint(path)
    return path


@pytest.mark.parametrize("tie", [False, True])
def test_export_loads_in_transformers_with_equal_logits(tmp_path, tokenizer_dir, make_batch, tie):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = checkpoint(tmp_path, tokenizer_dir, make_batch, tie)
    out = export_hf(path, tmp_path / "hf", tokenizer_dir=tokenizer_dir)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = CausalLM.load_from_checkpoint(path).eval()
    assert hf.config.num_key_value_heads == 2 and hf.config.num_attention_heads == 4  # GQA
    assert hf.config.tie_word_embeddings is tie

    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours.model(ids), atol=1e-4, rtol=0)
    generated = hf.generate(ids[:1, :8], max_new_tokens=6, do_sample=False, pad_token_id=hf.config.pad_token_id)
    assert torch.equal(generated, ours.generate(ids[:1, :8], max_new_tokens=6))

    tok = AutoTokenizer.from_pretrained(out)
    assert tokenizer_sha256(out) == tokenizer_sha256(tokenizer_dir)
    assert hf.config.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|eos|>")


def test_export_refuses_another_tokenizer(tmp_path, tokenizer_dir, make_batch):
    path = checkpoint(tmp_path, tokenizer_dir, make_batch, tie=False)
    other = tmp_path / "other_tokenizer"
    train_tokenizer(TEXTS[:2] + ["something else entirely"], vocab_size=290, out_dir=other)
    with pytest.raises(TokenizerMismatchError, match="not the tokenizer"):
        export_hf(path, tmp_path / "hf", tokenizer_dir=other)


def test_export_command_line(tmp_path, tokenizer_dir, make_batch, capsys):
    path = checkpoint(tmp_path, tokenizer_dir, make_batch, tie=False)
    main(["--ckpt", path, "--out", str(tmp_path / "cli_hf")])
    assert (tmp_path / "cli_hf" / "model.safetensors").is_file()
    assert "cli_hf" in capsys.readouterr().out
