"""TextSamples: greedy continuations land in TensorBoard's text tab at each validation."""

import re

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from callbacks.text_samples import TextSamples
from datamodules.tokenizer import train_tokenizer
from lightning_modules.causal_lm import CausalLM

TEXT = ["The quick brown fox jumps over the lazy dog.\n", "def add(a, b):\n    return a + b\n"] * 30


class Windows(L.LightningDataModule):
    """Stand-in datamodule: random windows, and the tokenizer directory the callback reads."""

    def __init__(self, tokenizer_dir, vocab: int) -> None:
        super().__init__()
        self.tokenizer_dir, self.vocab, self.val_domains = tokenizer_dir, vocab, ["language"]

    def _loader(self, n):
        ids = torch.randint(0, self.vocab, (n, 17), generator=torch.Generator().manual_seed(n))
        return DataLoader([{"input_ids": w[:-1], "targets": w[1:]} for w in ids], batch_size=2)

    def train_dataloader(self):
        return self._loader(16)

    def val_dataloader(self):
        return [self._loader(2)]


def texts(run_dir, tag):
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(f"{tag}/text_summary")]


def test_samples_written_to_tensorboard_each_validation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tok = train_tokenizer(TEXT, 300, tmp_path / "tokenizer")
    model = CausalLM(size="tiny", vocab_size=320, model_overrides={"n_layers": 1, "max_seq_len": 128})
    prompts = {"prose": "The quick brown", "code": "def add(a, b):\n"}
    trainer = L.Trainer(
        max_steps=4, val_check_interval=2, check_val_every_n_epoch=None, num_sanity_val_steps=1,
        logger=TensorBoardLogger("runs", name="exp", version="language"),
        callbacks=[TextSamples(prompts=prompts, max_new_tokens=5, every_n_validations=2)],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, accelerator="cpu",
    )
    trainer.fit(model, datamodule=Windows(tmp_path / "tokenizer", len(tok)))
    for name, prompt in prompts.items():
        entries = texts(tmp_path / "runs/exp/language", f"samples/{name}")
        # the sanity check writes nothing; of the validations at steps 2 and 4, every second one writes
        assert [step for step, _ in entries] == [4]
        text = entries[0][1]
        assert all(f"    {line}" in text for line in prompt.splitlines())
        assert re.search(r"greedy continuation\*\* \(step 4, [1-5] tokens\)", text)


def test_default_prompts_without_a_tool_corpus(tmp_path):
    train_tokenizer(TEXT, 300, tmp_path / "tokenizer")

    class Trainer:
        datamodule = Windows(tmp_path / "tokenizer", 300)

    cb = TextSamples(data_dir=str(tmp_path))
    Trainer.datamodule.data_dir = tmp_path
    cb._prepare(Trainer)
    assert set(cb._prompt_ids) == {"language", "code"} and all(cb._prompt_ids.values())


def test_tokenizer_comes_from_the_data_modules_data_dir(tmp_path):
    train_tokenizer(TEXT, 300, tmp_path / "tokenizer")

    class Trainer:
        class datamodule:  # names its data directory but not its tokenizer's
            data_dir = tmp_path

    cb = TextSamples(data_dir=str(tmp_path / "elsewhere"))
    cb._prepare(Trainer)
    assert cb._tokenizer.vocab_size <= 300 and set(cb._prompt_ids) == {"language", "code"}
