import numpy as np
import pytest
import torch

from datamodules.errors import StagewiseError, TokenizerMismatchError
from datamodules.mixture import MixtureDataModule, interleave
from datamodules.shards import ShardWriter, write_manifest

SEQ = 4
BASE = {"language": 1_000_000, "code": 2_000_000, "tools": 3_000_000}  # token ids tell a window's domain
SHA = "a" * 64


def write_corpus(root, name, windows, sha=SHA, tools=False):
    n = windows * SEQ + 1
    with ShardWriter(root / name, "train", "uint32", with_mask=tools) as w:
        w.add(BASE.get(name, 0) + np.arange(n), (np.arange(n) % 3 == 0).astype(np.uint8) if tools else None)
    for split in ("val", "test"):
        with ShardWriter(root / name, split, "uint32", with_mask=tools) as w:
            w.add(BASE.get(name, 0) + np.arange(2 * SEQ + 1), np.ones(2 * SEQ + 1, np.uint8) if tools else None)
    write_manifest(root / name, {"dtype": "uint32", "kind": "tools" if tools else "text", "tokenizer_sha256": sha,
                                 "tokens": {"train": n, "val": 2 * SEQ + 1, "test": 2 * SEQ + 1}})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_corpus(root, "language", 300)
    write_corpus(root, "code", 400)
    write_corpus(root, "tools", 10, tools=True)
    write_corpus(root, "other", 50, sha="f" * 64)
    return root


def windows(batches) -> list[tuple[str, int]]:
    """(domain, window index) of every example, in order."""
    names = {v // 1_000_000: k for k, v in BASE.items()}
    return [(names[int(t) // 1_000_000], int(t) % 1_000_000 // SEQ) for b in batches for t in b["input_ids"][:, 0]]


def loader(data_dir, mixture=None, corpus="code", rank=0, world=1, epoch=0, seed=7, batch_size=4, num_workers=0,
           align_tool_examples=False):
    """The train loader of a mixture; the tool corpus here is one long document, read as plain windows unless
    ``align_tool_examples``."""
    dm = MixtureDataModule(corpus=corpus, mixture=mixture or {"code": 0.95, "language": 0.05}, data_dir=str(data_dir),
                           seq_len=SEQ, batch_size=batch_size, seed=seed, num_workers=num_workers,
                           align_tool_examples=align_tool_examples)
    dm._rank_world = lambda: (rank, world)
    dl = dm.train_dataloader()
    dl.sampler.set_epoch(epoch)
    return dl


def test_interleave_keeps_every_prefix_within_one_window_of_the_fractions():
    for fractions in ([0.95, 0.05], [0.93, 0.07], [0.5, 0.3, 0.2], [0.6, 0.25, 0.1, 0.05]):
        labels = interleave(fractions, 2000)
        counts = np.stack([np.cumsum(labels == d) for d in range(len(fractions))], axis=1)
        expected = np.arange(1, 2001)[:, None] * np.asarray(fractions)
        assert np.abs(counts - expected).max() < 1


@pytest.mark.parametrize("mixture", [{"code": 0.95, "language": 0.05}, {"code": 0.75, "language": 0.25}])
def test_replay_batches_hold_the_configured_token_fraction(data_dir, mixture):
    seen = windows(loader(data_dir, mixture))
    lang = [w for d, w in seen if d == "language"]
    code = [w for d, w in seen if d == "code"]
    assert abs(len(lang) / len(seen) - mixture["language"]) <= 0.01
    assert len(set(code)) == len(code)  # no code window twice
    assert len(code) >= 400 - 4  # the epoch is the code corpus once (less the dropped partial batch)
    assert len(set(lang)) == len(lang)  # 300 language windows: no cycling needed
    # every batch of 4 holds the fraction within one window
    for b in range(0, len(seen), 4):
        n_lang = sum(d == "language" for d, _ in seen[: b + 4])
        assert abs(n_lang - mixture["language"] * (b + 4)) < 1


def test_natural_fractions_follow_train_tokens(data_dir):
    dm = MixtureDataModule(corpus="language", mixture="natural", val_domains=["language", "code"],
                           data_dir=str(data_dir), seq_len=SEQ, batch_size=4)
    n_lang, n_code = 300 * SEQ + 1, 400 * SEQ + 1
    assert dm.mixture_fractions == pytest.approx({"language": n_lang / (n_lang + n_code),
                                                  "code": n_code / (n_lang + n_code)})
    dm._rank_world = lambda: (0, 1)
    seen = windows(dm.train_dataloader())
    assert abs(sum(d == "code" for d, _ in seen) / len(seen) - dm.mixture_fractions["code"]) <= 0.01
    lang = [w for d, w in seen if d == "language"]
    assert len(set(lang)) == len(lang) >= 300 - 4  # the corpus domain once, less the dropped partial batch


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_see_disjoint_windows_each_holding_the_fraction(data_dir, world):
    seen = [windows(loader(data_dir, rank=r, world=world)) for r in range(world)]
    assert len({len(s) for s in seen}) == 1
    flat = [w for s in seen for w in s]
    assert len(flat) == len(set(flat))
    for s in seen:  # each rank mixes like a single process (so its logged train loss is representative)
        assert abs(sum(d == "language" for d, _ in s) - 0.05 * len(s)) < 1


def test_order_is_deterministic_per_seed_and_epoch(data_dir):
    assert windows(loader(data_dir, epoch=1)) == windows(loader(data_dir, epoch=1))
    assert windows(loader(data_dir, epoch=1)) != windows(loader(data_dir, epoch=2))
    assert windows(loader(data_dir, epoch=1)) != windows(loader(data_dir, epoch=1, seed=8))
    # the domain pattern is the same every epoch; only the windows drawn change
    assert [d for d, _ in windows(loader(data_dir, epoch=1))] == [d for d, _ in windows(loader(data_dir, epoch=2))]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_yields_exactly_the_remaining_batches(data_dir, num_workers):
    full = windows(loader(data_dir, epoch=2, num_workers=num_workers))
    dl = loader(data_dir, epoch=2, num_workers=num_workers)
    it = iter(dl)
    first = windows([next(it) for _ in range(7)])
    state = dl.state_dict()
    resumed = loader(data_dir, epoch=0, num_workers=num_workers)
    resumed.load_state_dict(state)
    assert first + windows(list(resumed)) == full
    with pytest.raises(StagewiseError, match="mixture"):
        loader(data_dir, {"code": 0.9, "language": 0.1}).load_state_dict(state)


def test_small_domain_cycles_and_text_gets_an_all_ones_mask_beside_tools(data_dir):
    dl = loader(data_dir, {"tools": 0.5, "language": 0.5}, corpus="tools", batch_size=2)
    batches = list(dl)
    assert all(b["loss_mask"].dtype == torch.float32 for b in batches)
    for b in batches:
        for ids, tgt, mask in zip(b["input_ids"], b["targets"], b["loss_mask"]):
            if ids[0] >= BASE["tools"]:
                assert torch.equal(mask, ((tgt - BASE["tools"]) % 3 == 0).float())
            else:
                assert torch.equal(mask, torch.ones(SEQ))
    assert sorted(w for d, w in windows(batches) if d == "tools") == list(range(10))
    cycled = windows(loader(data_dir, {"code": 0.2, "language": 0.2, "tools": 0.6}, corpus="code"))
    tools = [w for d, w in cycled if d == "tools"]
    assert len(tools) > 10 and set(tools) == set(range(10))


@pytest.mark.parametrize("mixture, corpus, match", [
    ({"code": 0.9, "language": 0.05}, "code", "sum to 0.95"),
    ({"code": 1.0, "language": 0.0}, "code", r"\(0, 1\]"),
    ({"language": 1.0}, "code", "not in data.mixture"),
])
def test_bad_mixtures_are_refused_at_construction(mixture, corpus, match):
    with pytest.raises(StagewiseError, match=match):
        MixtureDataModule(corpus=corpus, mixture=mixture)


def test_unknown_or_mismatched_domains_are_refused(data_dir):
    dm = MixtureDataModule(corpus="code", mixture={"code": 0.95, "lnaguage": 0.05}, data_dir=str(data_dir))
    with pytest.raises(StagewiseError, match="'lnaguage'.*prepared here: \\['code', 'language'"):
        dm.train_dataloader()
    dm = MixtureDataModule(corpus="code", mixture={"code": 0.95, "other": 0.05}, val_domains=["code"],
                           data_dir=str(data_dir))
    with pytest.raises(TokenizerMismatchError):
        dm.manifests()


def test_fit_resumes_mid_epoch_with_lightning(data_dir, tmp_path):
    """Lightning saves the mixture loader's position in the checkpoint and restores it on `ckpt_path`."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append((self.current_epoch, *windows([batch])))
            return (self.w * batch["input_ids"].float().mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    def fit(ckpt_path=None):
        dm = MixtureDataModule(corpus="tools", mixture={"tools": 0.5, "language": 0.5}, data_dir=str(data_dir),
                               seq_len=SEQ, batch_size=2, seed=3, align_tool_examples=False)
        model = Recorder()
        every_7 = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=7, save_top_k=-1)
        trainer = L.Trainer(max_steps=16, limit_val_batches=0, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=tmp_path, use_distributed_sampler=False,
                            callbacks=[every_7])
        trainer.fit(model, dm, ckpt_path=ckpt_path)
        return model.seen

    whole = fit()  # 10 batches per epoch: crosses into epoch 1
    assert whole[0][0] == 0 and whole[-1][0] == 1
    assert fit(ckpt_path=tmp_path / "step=7.ckpt") == whole[7:]
    assert fit(ckpt_path=tmp_path / "step=14.ckpt") == whole[14:]


def test_tool_windows_in_a_mixture_are_whole_examples(tmp_path):
    """Replay beside a tool corpus: the tool windows are packed whole examples, as in a tool stage alone."""
    write_corpus(tmp_path, "language", 40)
    with ShardWriter(tmp_path / "tools", "train", "uint32", with_mask=True) as w:
        for i in range(12):  # 12 examples of 3 tokens, the answer their last: a window of 5 holds one
            w.add(BASE["tools"] + 10 * i + np.arange(3), np.array([0, 0, 1], np.uint8))
    for split in ("val", "test"):
        with ShardWriter(tmp_path / "tools", split, "uint32", with_mask=True) as w:
            w.add(BASE["tools"] + np.arange(3), np.array([0, 0, 1], np.uint8))
    write_manifest(tmp_path / "tools", {"dtype": "uint32", "kind": "tools", "tokenizer_sha256": SHA,
                                        "tokens": {"train": 36, "val": 3, "test": 3}})
    batches = list(loader(tmp_path, {"tools": 0.5, "language": 0.5}, corpus="tools", batch_size=2,
                          align_tool_examples=True))
    tool_rows = [(t, m) for b in batches for t, m in zip(b["targets"], b["loss_mask"]) if t[-1] >= BASE["tools"]]
    assert len(tool_rows) == 12
    for targets, mask in tool_rows:  # each ends at its example's answer, the one token in its loss
        assert int(targets[-1] - BASE["tools"]) % 10 == 2 and mask.tolist() == [0, 0, 0, 1]
