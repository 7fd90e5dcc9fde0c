import json
import shutil

import lightning as L
import pytest
import torch

from datamodules.errors import StagewiseError, TokenizerMismatchError
from datamodules.tokenizer import CHAT_TEMPLATE, chat_template_sha256, tokenizer_sha256, train_tokenizer
from lightning_modules import CausalLM
from lightning_modules.export import export_hf, main

TEXTS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.\n"] * 20


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project directory as `stagewise prepare` leaves it: ``data/tokenizer``."""
    root = tmp_path_factory.mktemp("project")
    train_tokenizer(TEXTS, vocab_size=300, out_dir=root / "data" / "tokenizer")
    return root


def checkpoint(root, make_batch, tie: bool = False, name: str = "model.ckpt", **model_args) -> str:
    """A CausalLM checkpoint ``<root>/models/<name>`` recording the tokenizer of ``<root>/data`` (random weights,
    norms included, as training would leave them)."""
    torch.manual_seed(0)
    model = CausalLM(size="tiny", vocab_size=320, tokenizer_sha256=tokenizer_sha256(root / "data" / "tokenizer"),
                     model_overrides={"tie_embeddings": tie, "rope_theta": 5000.0}, **model_args)
    model.configure_model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = root / "models" / name
    path.parent.mkdir(exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "pytorch-lightning_version": L.__version__}, path)
    return str(path)


@pytest.mark.parametrize("tie", [False, True])
def test_export_is_complete_and_matches_our_logits(tmp_path, project, make_batch, tie):
    """No tokenizer argument: the export finds the checkpoint's tokenizer (``data/`` beside ``models/``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = checkpoint(project, make_batch, tie)
    out = export_hf(path, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = CausalLM.load_from_checkpoint(path).eval()
    assert hf.config.num_key_value_heads == 2 and hf.config.num_attention_heads == 4  # GQA
    assert hf.config.tie_word_embeddings is tie

    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours.model(ids), atol=1e-4, rtol=0)
    generated = hf.generate(ids[:1, :8], max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert torch.equal(generated, ours.generate(ids[:1, :8], max_new_tokens=6))

    tok = AutoTokenizer.from_pretrained(out)
    assert tokenizer_sha256(out) == tokenizer_sha256(project / "data" / "tokenizer")
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    ids_of = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    assert ids_of == {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
    assert {k: config[k] for k in ids_of} == ids_of
    assert {k: generation[k] for k in ("bos_token_id", "pad_token_id")} == {"bos_token_id": 0, "pad_token_id": 2}
    assert generation["eos_token_id"] == [tok.eos_token_id, tok.convert_tokens_to_ids("<|end|>")]  # a turn's ends


def test_export_refuses_another_tokenizer(tmp_path, project, make_batch):
    path = checkpoint(project, make_batch)
    other = tmp_path / "other_tokenizer"
    train_tokenizer(TEXTS[:2] + ["something else entirely"], vocab_size=290, out_dir=other)
    with pytest.raises(TokenizerMismatchError, match=f"looked at {other} \\(another tokenizer"):
        export_hf(path, tmp_path / "hf", tokenizer_dir=other)
    assert not (tmp_path / "hf").exists()


def test_export_checks_the_chat_template_the_checkpoint_recorded(tmp_path, project, make_batch):
    """After a template change the vocabulary is the same but prompts render otherwise: refused, unless asked;
    a checkpoint from before templates were recorded matches on the vocabulary alone."""
    tok_dir = tmp_path / "tokenizer"
    shutil.copytree(project / "data" / "tokenizer", tok_dir)
    (tok_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE.replace("<|tools|>", "<|tools|> "))
    recorded = checkpoint(project, make_batch, name="recorded.ckpt", chat_template_sha256=chat_template_sha256())
    with pytest.raises(TokenizerMismatchError, match="the same vocabulary but another chat template"):
        export_hf(recorded, tmp_path / "hf", tokenizer_dir=tok_dir)
    assert (export_hf(recorded, tmp_path / "hf", tokenizer_dir=tok_dir, allow_other_template=True)
            / "chat_template.jinja").read_text() == (tok_dir / "chat_template.jinja").read_text()
    old = checkpoint(project, make_batch, name="old.ckpt")  # records tokenizer_sha256 only
    assert export_hf(old, tmp_path / "hf_old", tokenizer_dir=tok_dir).is_dir()


def test_export_command_line(tmp_path, project, make_batch, capsys, monkeypatch):
    path = checkpoint(project, make_batch)
    monkeypatch.chdir(tmp_path)  # elsewhere: the tokenizer is found beside the checkpoint's directory
    main(["--ckpt", path, "--out", str(tmp_path / "cli_hf")])
    assert (tmp_path / "cli_hf" / "model.safetensors").is_file() and (tmp_path / "cli_hf" / "tokenizer.json").is_file()
    assert "cli_hf" in capsys.readouterr().out


def test_export_refuses_a_checkpoint_whose_tokenizer_is_nowhere(tmp_path, project, make_batch, monkeypatch):
    path = checkpoint(project, make_batch)
    monkeypatch.chdir(tmp_path)
    lone = tmp_path / "lone" / "model.ckpt"
    lone.parent.mkdir()
    shutil.copy(path, lone)
    with pytest.raises(StagewiseError, match="cannot find the tokenizer .* was trained with .*looked at .*no tokenizer"):
        export_hf(lone, tmp_path / "hf")
