import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.datamodule import CodeDataModule, CorpusDataModule, ToolDataModule
from datamodules.errors import StagewiseError, TokenizerMismatchError
from datamodules.shards import ShardWriter, write_manifest
from datamodules.tokenizer import tokenizer_sha256, train_tokenizer

SEQ = 4


def write_corpus(root: Path, name: str, n_tokens: dict[str, int], sha: str, tools: bool = False) -> None:
    """Token i of each split is the id i, so a window is identified by its first token."""
    for split, n in n_tokens.items():
        with ShardWriter(root / name, split, "uint32", with_mask=tools) as w:
            w.add(np.arange(n), (np.arange(n) % 3 == 0).astype(np.uint8) if tools else None)
    write_manifest(root / name, {"dtype": "uint32", "kind": "tools" if tools else "text",
                                 "tokens": n_tokens, "tokenizer_sha256": sha})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    text = [p.read_text() for p in sorted(Path(sysconfig.get_paths()["stdlib"], "json").glob("*.py"))]
    train_tokenizer(text, 300, root / "tokenizer")
    sha = tokenizer_sha256(root / "tokenizer")
    write_corpus(root, "language", {"train": 30 * SEQ + 1, "val": 5 * SEQ + 3, "test": 2 * SEQ + 1}, sha)
    write_corpus(root, "code", {"train": 25 * SEQ + 1, "val": 3 * SEQ + 1, "test": SEQ + 1}, sha)
    write_corpus(root, "tools", {"train": 12 * SEQ + 1, "val": 2 * SEQ + 1, "test": SEQ + 1}, sha, tools=True)
    write_corpus(root, "other", {"train": 100, "val": 100, "test": 100}, "f" * 64)
    return root


def starts(batches) -> list[int]:
    return [int(t) // SEQ for b in batches for t in b["input_ids"][:, 0]]


def loader(data_dir, rank=0, world=1, epoch=0, num_workers=0, batch_size=2, seed=7):
    dm = CodeDataModule(data_dir=str(data_dir), seq_len=SEQ, batch_size=batch_size, num_workers=num_workers, seed=seed)
    dm._rank_world = lambda: (rank, world)
    dl = dm.train_dataloader()
    dl.sampler.set_epoch(epoch)
    return dl


def test_batches_are_shifted_windows(data_dir):
    dm = CodeDataModule(data_dir=str(data_dir), seq_len=SEQ, batch_size=2)
    assert dm.val_domains == ["language", "code"]
    assert dm.vocab_size == 320  # 300 rounded up to a multiple of 64
    assert dm.tokenizer_sha256 == tokenizer_sha256(data_dir / "tokenizer")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "targets"}
    assert batch["input_ids"].dtype == torch.int64 and batch["input_ids"].shape == (2, SEQ)
    assert torch.equal(batch["targets"], batch["input_ids"] + 1)
    assert torch.equal(batch["input_ids"][:, 0] % SEQ, torch.zeros(2, dtype=torch.int64))


def test_tool_batches_carry_the_shifted_loss_mask(data_dir):
    dm = ToolDataModule(data_dir=str(data_dir), seq_len=SEQ, batch_size=3, align_tool_examples=False)
    batch = next(iter(dm.train_dataloader()))
    assert batch["loss_mask"].dtype == torch.float32
    assert torch.equal(batch["loss_mask"], (batch["targets"] % 3 == 0).float())


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_see_disjoint_windows_covering_the_epoch(data_dir, world):
    seen = [starts(loader(data_dir, r, world, num_workers=2)) for r in range(world)]
    assert len({len(s) for s in seen}) == 1  # same number of batches on every rank
    flat = [w for s in seen for w in s]
    assert len(flat) == len(set(flat))
    order = np.random.default_rng((7, 0)).permutation(25)[:24]  # 25 windows cut to a multiple of 2 and 3
    assert sorted(flat) == sorted(order.tolist())  # batch 2 divides each rank's share: nothing dropped
    assert seen[1] == order[1::world].tolist()


def test_order_is_deterministic_per_seed_and_epoch(data_dir):
    assert starts(loader(data_dir, epoch=1)) == starts(loader(data_dir, epoch=1))
    assert starts(loader(data_dir, epoch=1)) != starts(loader(data_dir, epoch=2))
    assert starts(loader(data_dir, epoch=1)) != starts(loader(data_dir, epoch=1, seed=8))
    order = np.random.default_rng((7, 3)).permutation(25)
    assert starts(loader(data_dir, epoch=3)) == order[:24].tolist()  # the last, partial batch is dropped


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_yields_exactly_the_remaining_batches(data_dir, num_workers):
    full = starts(loader(data_dir, epoch=2, num_workers=num_workers))
    dl = loader(data_dir, epoch=2, num_workers=num_workers)
    it = iter(dl)
    first = starts([next(it) for _ in range(5)])
    state = dl.state_dict()
    assert state["epoch"] == 2 and state["batches"] == 5
    resumed = loader(data_dir, epoch=0, num_workers=num_workers)  # a fresh process: epoch comes from the state
    resumed.load_state_dict(state)
    rest = starts(list(resumed))
    assert first + rest == full
    assert resumed.state_dict()["batches"] == len(resumed) == len(full) // 2
    resumed.sampler.set_epoch(3)  # the next epoch runs whole
    assert len(starts(list(resumed))) == len(full)


def test_resume_with_another_seed_is_refused(data_dir):
    dl = loader(data_dir)
    next(iter(dl))
    with pytest.raises(StagewiseError, match="seed"):
        loader(data_dir, seed=99).load_state_dict(dl.state_dict())


def test_val_iterates_each_domain_once_in_order(data_dir):
    dm = ToolDataModule(data_dir=str(data_dir), seq_len=SEQ, batch_size=2, align_tool_examples=False)
    loaders = dm.val_dataloader()
    assert len(loaders) == 3
    for dl, n in zip(loaders, [5, 3, 2]):
        assert starts(list(dl)) == list(range(n)) == starts(list(dl))
    assert "loss_mask" in next(iter(loaders[2])) and "loss_mask" not in next(iter(loaders[0]))
    capped = CodeDataModule(data_dir=str(data_dir), seq_len=SEQ, val_max_windows=2).val_dataloader()
    assert [starts(list(dl)) for dl in capped] == [[0, 1], [0, 1]]
    assert [starts(list(dl)) for dl in dm.test_dataloader()] == [[0, 1], [0], [0]]


def test_val_batch_size_batches_the_same_windows(data_dir):
    small, large = (ToolDataModule(data_dir=str(data_dir), seq_len=SEQ, batch_size=2, val_batch_size=v,
                                   align_tool_examples=False) for v in (None, 4))
    assert [[len(b["input_ids"]) for b in dl] for dl in small.val_dataloader()] == [[2, 2, 1], [2, 1], [2]]
    assert [[len(b["input_ids"]) for b in dl] for dl in large.val_dataloader()] == [[4, 1], [3], [2]]
    assert [starts(list(dl)) for dl in large.val_dataloader()] == [starts(list(dl)) for dl in small.val_dataloader()]
    assert len(next(iter(large.train_dataloader()))["input_ids"]) == 2 and large.state_dict()["val_batch_size"] == 4
    with pytest.raises(StagewiseError, match="val_batch_size"):
        ToolDataModule(data_dir=str(data_dir), seq_len=SEQ, val_batch_size=0)


def test_missing_data_tells_the_user_to_prepare(tmp_path):
    dm = CodeDataModule(data_dir=str(tmp_path / "nothing"))
    with pytest.raises(StagewiseError, match="stagewise prepare -c configs/data/demo.yaml"):
        dm.vocab_size


def test_val_domain_with_another_tokenizer_is_refused(data_dir):
    dm = CorpusDataModule(corpus="language", val_domains=["language", "other"], data_dir=str(data_dir))
    with pytest.raises(TokenizerMismatchError, match="stagewise prepare"):
        dm.tokenizer_sha256


def test_fit_resumes_mid_epoch_with_lightning(data_dir, tmp_path):
    """Lightning saves the loader's position in the checkpoint and restores it on `ckpt_path`."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append((self.current_epoch, *starts([batch])))
            return (self.w * batch["input_ids"].float().mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    def fit(ckpt_path=None):
        dm = CodeDataModule(data_dir=str(data_dir), seq_len=SEQ, batch_size=2, seed=3)
        model = Recorder()
        every_7 = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=7, save_top_k=-1)
        trainer = L.Trainer(max_steps=20, limit_val_batches=0, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=tmp_path, use_distributed_sampler=False,
                            callbacks=[every_7])
        trainer.fit(model, dm, ckpt_path=ckpt_path)
        return model.seen

    whole = fit()  # 12 batches per epoch: crosses into epoch 1
    assert whole[0][0] == 0 and whole[-1][0] == 1
    assert fit(ckpt_path=tmp_path / "step=7.ckpt") == whole[7:]  # mid-epoch 0
    assert fit(ckpt_path=tmp_path / "step=14.ckpt") == whole[14:]  # mid-epoch 1


def test_only_tool_corpora_get_aligned_windows_by_default(data_dir):
    language, code, tools = (list(dl) for dl in ToolDataModule(data_dir=str(data_dir), seq_len=SEQ, batch_size=1).val_dataloader())
    assert starts(language) == list(range(5)) and starts(code) == list(range(3))  # text stays packed
    assert len(tools) == 1 and int(tools[0]["targets"][0, -1]) == 2 * SEQ  # one example, its window ends at its end


def test_aligned_tool_windows_end_with_each_examples_answer(tmp_path):
    from datamodules.datamodule import TokenWindows

    lengths = [3, 9, 6]  # example i: ids 100*(i+1) + k, answer = its last 2 tokens (mask 1)
    with ShardWriter(tmp_path / "tools", "train", "uint32", with_mask=True) as w:
        for i, n in enumerate(lengths):
            w.add(100 * (i + 1) + np.arange(n), (np.arange(n) >= n - 2).astype(np.uint8))
    windows = TokenWindows(tmp_path / "tools", "train", seq_len=4, align_to_documents=True)
    assert len(windows) == 3
    first, second, third = (windows[i] for i in range(3))
    # the first example is shorter than a window: left-padded with <|pad|>, padding never in the loss
    assert first["input_ids"].tolist() == [2, 2, 100, 101] and first["targets"].tolist() == [2, 100, 101, 102]
    assert first["loss_mask"].tolist() == [0, 0, 1, 1]
    # a long example is left-truncated: the window ends exactly at its answer
    assert second["targets"].tolist() == [205, 206, 207, 208] and second["loss_mask"].tolist() == [0, 0, 1, 1]
    assert third["targets"].tolist()[-2:] == [304, 305] and third["loss_mask"].sum() == 2


def test_tool_windows_pack_whole_examples_and_train_each_answer_once(tmp_path):
    """Short examples share a window (every answer after its whole prompt); context before a window's own
    examples is never in its loss, so an answer in it is not trained twice."""
    from datamodules.datamodule import TokenWindows

    lengths = [2, 2, 3, 6, 2]  # example i: ids 100*(i+1) + k, answer = its last token (mask 1)
    with ShardWriter(tmp_path / "tools", "train", "uint32", with_mask=True) as w:
        for i, n in enumerate(lengths):
            w.add(100 * (i + 1) + np.arange(n), (np.arange(n) == n - 1).astype(np.uint8))
    windows = TokenWindows(tmp_path / "tools", "train", seq_len=6, align_to_documents=True)
    assert len(windows) == 3  # [0, 1, 2] fit in 7 tokens; 3 alone (6 tokens; with 4 it would not fit); 4
    packed = windows[0]
    assert packed["input_ids"].tolist() == [100, 101, 200, 201, 300, 301]
    assert packed["loss_mask"].tolist() == [1, 0, 1, 0, 0, 1]  # targets 101, 200, 201, 300, 301, 302
    last = windows[2]  # the window ends at example 4's end; example 3's tail before it is context only
    assert last["targets"].tolist() == [402, 403, 404, 405, 500, 501] and last["loss_mask"].tolist() == [0] * 5 + [1]
    answers = sum(int(windows[i]["loss_mask"].sum()) for i in range(len(windows)))
    assert answers == len(lengths)  # every answer exactly once
