"""LightningDataModules over prepared token shards: one per stage's corpus, validated on every domain so far.

Training reads windows of ``seq_len + 1`` contiguous tokens of the flat train stream at stride ``seq_len``
(inputs ``w[:-1]``, targets ``w[1:]``). Each epoch is a permutation of the windows drawn from
``(seed, epoch)``, cut to a multiple of the world size, and rank ``r`` takes every ``world_size``-th window:
ranks see disjoint windows and the same number of batches. The train loader counts the batches it has
yielded, so a checkpoint taken mid-epoch resumes with exactly the batches not yet trained on (Lightning
saves and restores the loader's ``state_dict`` with the fit loop).
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from datamodules.errors import StagewiseError
from datamodules.shards import check_tokenizer, open_split, read_manifest
from datamodules.tokenizer import chat_template_sha256


class TokenWindows(Dataset):
    """Windows ``i`` of ``seq_len + 1`` tokens starting at ``i * seq_len`` of one split's token stream.

    The shard is memory-mapped lazily in each process (workers included), never pickled.

    Args:
        corpus_dir: The corpus directory holding the split's shard files.
        split: ``train``, ``val`` or ``test``.
        seq_len: Tokens per training example.
        max_windows: Use only the first ``max_windows`` windows.
        align_to_documents: Windows of whole documents instead (tool examples): consecutive documents are
            packed while they fit in ``seq_len + 1`` tokens, and the window ends where the last of them ends,
            so every assistant answer is trained on once, after its whole prompt. The tokens before the
            group's first document (context from the document before it; pad tokens at the very start) are
            masked out of the loss; a document longer than a window is cut from the left.
    """

    PAD_ID = 2  # the reserved <|pad|> (datamodules.tokenizer.SPECIAL_TOKENS)

    def __init__(self, corpus_dir: str | Path, split: str, seq_len: int, max_windows: int | None = None,
                 align_to_documents: bool = False):
        self.corpus_dir, self.split, self.seq_len = Path(corpus_dir), split, seq_len
        self._data = open_split(self.corpus_dir, split)
        self.has_mask = self._data.mask is not None
        self.align = align_to_documents
        if self.align:
            self._first, self._ends = pack_documents(np.asarray(self._data.offsets, np.int64), seq_len + 1)
            n = len(self._ends)
        else:
            n = (len(self._data.tokens) - 1) // seq_len if len(self._data.tokens) > seq_len else 0
        self.num_windows = n if max_windows is None else min(n, max_windows)

    def __len__(self) -> int:
        return self.num_windows

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_data": None}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self._data is None:
            self._data = open_split(self.corpus_dir, self.split)
        start = i * self.seq_len
        end = start + self.seq_len + 1
        if self.align:
            end = int(self._ends[i])
            start = end - self.seq_len - 1
        pad = max(0, -start)
        tokens = self._data.tokens[max(0, start) : end].astype(np.int64)
        window = torch.from_numpy(np.concatenate([np.full(pad, self.PAD_ID, np.int64), tokens]))
        item = {"input_ids": window[:-1], "targets": window[1:]}
        if self.has_mask:
            mask = np.concatenate([np.zeros(pad, np.float32), self._data.mask[max(0, start) : end].astype(np.float32)])
            if self.align:  # only this window's own documents count: the context before them was trained elsewhere
                mask[: max(0, int(self._first[i]) - start)] = 0
            item["loss_mask"] = torch.from_numpy(mask[1:])
        return item


def pack_documents(offsets: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy packing of consecutive documents (``offsets``: their starts, then the stream's end) into windows
    of ``window`` tokens: each group is as many documents as fit, or one longer document alone. Returns each
    group's first token and its end (the end of its last document)."""
    firsts, ends = [], []
    i, n = 0, len(offsets) - 1
    while i < n:
        j = int(np.searchsorted(offsets, offsets[i] + window, side="right")) - 1  # last document end that fits
        j = max(j, i + 1)
        firsts.append(offsets[i])
        ends.append(offsets[j])
        i = j
    return np.asarray(firsts, np.int64), np.asarray(ends, np.int64)


class WindowSampler(Sampler[int]):
    """One rank's window indices for one epoch: deterministic per (seed, epoch), disjoint across ranks.

    Args:
        num_windows: Windows in the dataset.
        seed: Seed of the order; each epoch's permutation comes from ``np.random.default_rng((seed, epoch))``.
        rank: This process's global rank.
        world_size: Number of processes that split the windows.
        shuffle: Permute the windows (training); otherwise keep them in order.
    """

    def __init__(self, num_windows: int, seed: int = 1234, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.num_windows, self.seed, self.rank, self.world_size, self.shuffle = num_windows, seed, rank, world_size, shuffle
        self.epoch = 0
        self.start = 0  # position in the epoch's global order to start from (set on a mid-epoch resume)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order to produce (Lightning calls this at the start of every epoch)."""
        self.epoch = epoch

    def order(self) -> np.ndarray:
        """The epoch's global order of window indices, shared by all ranks."""
        if not self.shuffle:
            return np.arange(self.num_windows)
        return np.random.default_rng((self.seed, self.epoch)).permutation(self.num_windows)

    def __iter__(self):
        usable = self.num_windows // self.world_size * self.world_size
        return iter(self.order()[self.start + self.rank : usable : self.world_size].tolist())

    def __len__(self) -> int:
        """Windows this rank sees in a whole epoch (also after a resume, as Lightning counts the epoch's batches)."""
        return self.num_windows // self.world_size


class ResumableDataLoader(DataLoader):
    """A DataLoader over a :class:`WindowSampler` that can resume mid-epoch.

    ``state_dict()`` records how many batches this loader has yielded in the current epoch, counted in the
    main process (batches prefetched by workers but not yet handed out do not count). After
    ``load_state_dict()``, the next iteration over the same epoch starts right after those batches.
    """

    def __init__(self, dataset: Dataset, sampler: WindowSampler, batch_size: int, drop_last: bool = True, **kwargs):
        super().__init__(dataset, sampler=sampler, batch_size=batch_size, drop_last=drop_last, **kwargs)
        self._epoch = sampler.epoch
        self._batches = 0
        self._resume: dict | None = None

    def __iter__(self):
        # A generator: the body runs at the first next(), after Lightning's set_epoch() on the sampler.
        sampler: WindowSampler = self.sampler
        per_step = self.batch_size * sampler.world_size  # windows all ranks consume per batch
        consumed = 0
        if self._resume is not None and self._resume["epoch"] == sampler.epoch:
            consumed = self._resume["batches"] * self._resume["batch_size"] * self._resume["world_size"]
        self._resume = None
        sampler.start = consumed
        self._epoch, self._batches = sampler.epoch, consumed // per_step
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    def state_dict(self) -> dict:
        """Position in the epoch: ``epoch`` and ``batches`` yielded so far, with what they mean in windows."""
        sampler: WindowSampler = self.sampler
        return {"epoch": self._epoch, "batches": self._batches, "batch_size": self.batch_size,
                "world_size": sampler.world_size, "seed": sampler.seed, "num_windows": sampler.num_windows}

    def load_state_dict(self, state: dict) -> None:
        """Resume after the batches ``state`` says were consumed (applies to the next iteration of that epoch)."""
        sampler: WindowSampler = self.sampler
        if (state["seed"], state["num_windows"]) != (sampler.seed, sampler.num_windows):
            raise StagewiseError(
                f"cannot resume mid-epoch: the checkpoint's data order (seed {state['seed']}, {state['num_windows']} "
                f"windows) differs from this run's (seed {sampler.seed}, {sampler.num_windows} windows); keep "
                "`data.seed`, `data.seq_len` and the prepared data as they were, or start a new run"
            )
        self._resume = dict(state)
        self._epoch, self._batches = state["epoch"], state["batches"]
        sampler.set_epoch(state["epoch"])


class CorpusDataModule(L.LightningDataModule):
    """Token windows from a prepared corpus for training, and one validation loader per domain.

    ``vocab_size`` and ``tokenizer_sha256`` are available right after construction (read from the prepared
    data, without ``setup()``); the CLI links them into the model.

    Args:
        corpus: The corpus to train on: a directory ``<data_dir>/<corpus>/`` made by ``stagewise prepare``.
            ``stagewise fit`` sets it to ``--stage.domain``.
        val_domains: The corpora to validate on, one loader each, in this order (default: ``[corpus]``;
            ``stagewise fit``: every domain of the stage's lineage so far).
        data_dir: Where ``stagewise prepare`` wrote the tokenizer and the corpora.
        seq_len: Tokens per training example (the model's context during training).
        batch_size: Examples per batch, per device.
        num_workers: Training DataLoader worker processes per device (0 reads in the main process); validation
            always reads in the main process.
        seed: Seed of the training order: each epoch's order is fixed by (seed, epoch).
        val_max_windows: Validate on at most this many windows per domain (default: the whole held-out split).
        val_seq_len: Tokens per validation window of the text domains (default: ``seq_len``). Held-out losses
            of a domain compare only at one window length: keep it the same in every stage of a lineage when
            the stages train at different ``seq_len`` (tool corpora always validate on windows of ``seq_len``).
        align_tool_examples: For tool corpora, windows of whole examples (packed while they fit, each ending
            where an example ends: every answer trained on once, after its whole prompt), instead of plain
            windows (where an answer of ~50 tokens after ~2K tokens of schemas often falls in no window).
        val_batch_size: Examples per validation and test batch, per device (default: ``batch_size``). Which
            windows are scored does not depend on it, so it may differ from a parent stage's; without gradients
            a larger one fits, and a stage trained on small batches (preference pairs) validates in fewer steps.
    """

    def __init__(
        self,
        corpus: str | None = None,
        val_domains: list[str] | None = None,
        data_dir: str = "data",
        seq_len: int = 512,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 1234,
        val_max_windows: int | None = None,
        val_seq_len: int | None = None,
        align_tool_examples: bool = True,
        val_batch_size: int | None = None,
    ):
        super().__init__()
        if not corpus:
            raise StagewiseError("the data module needs a corpus to train on: `data.corpus`, or `--stage.domain` "
                                 "under `stagewise fit`")
        self.align_tool_examples = align_tool_examples
        self.corpus = corpus
        self.val_domains = list(val_domains) if val_domains else [corpus]
        self.data_dir = Path(data_dir)
        self.seq_len, self.batch_size, self.num_workers = seq_len, batch_size, num_workers
        self.seed, self.val_max_windows, self.val_seq_len = seed, val_max_windows, val_seq_len
        if val_batch_size is not None and val_batch_size < 1:
            raise StagewiseError(f"data.val_batch_size must be at least 1 (got {val_batch_size}); leave it out to "
                                 "validate at data.batch_size")
        self.val_batch_size = val_batch_size or batch_size
        self._manifests: dict[str, dict] | None = None
        self._vocab_size: int | None = None

    def state_dict(self) -> dict:
        """The data settings, stored in every checkpoint (``stagewise evaluate`` reads them back) and shown in
        TensorBoard's HPARAMS tab; the loader's position is saved separately by the fit loop."""
        return {"corpus": self.corpus, "val_domains": list(self.val_domains), "data_dir": str(self.data_dir),
                "seq_len": self.seq_len, "batch_size": self.batch_size, "val_batch_size": self.val_batch_size,
                "val_max_windows": self.val_max_windows,
                "val_seq_len": self.val_seq_len, "data_seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Settings come from the config, not the checkpoint: nothing to restore."""

    # --- what the model needs to know, from the prepared data -----------------------------------------
    def manifests(self) -> dict[str, dict]:
        """The manifests of the training corpus and every validation domain, checked for one shared tokenizer."""
        if self._manifests is None:
            names = [self.corpus] + [d for d in self.corpus_domains if d != self.corpus]
            manifests = {name: read_manifest(self.data_dir / name) for name in names}
            sha = manifests[self.corpus].get("tokenizer_sha256")
            template = chat_template_sha256(manifests[self.corpus].get("tokenizer_dir") or self.data_dir / "tokenizer")
            for name, manifest in manifests.items():
                check_tokenizer(manifest, sha, self.data_dir / name, template)
            self._manifests = manifests
        return self._manifests

    @property
    def corpus_domains(self) -> list[str]:
        """The validation domains that are prepared corpora (all of ``val_domains`` here)."""
        return list(self.val_domains)

    @property
    def tokenizer_sha256(self) -> str:
        """sha256 of the tokenizer.json the training corpus was tokenized with."""
        return self.manifests()[self.corpus]["tokenizer_sha256"]

    @property
    def chat_template_sha256(self) -> str:
        """sha256 of the chat template of the data's tokenizer (the tool shards were rendered with it, checked):
        with ``tokenizer_sha256`` the tokenizer identity a checkpoint records."""
        return chat_template_sha256(self.tokenizer_dir)

    @property
    def tokenizer_dir(self) -> Path:
        """The tokenizer directory (``<data_dir>/tokenizer`` unless the manifest names another)."""
        return Path(self.manifests()[self.corpus].get("tokenizer_dir") or self.data_dir / "tokenizer")

    @property
    def vocab_size(self) -> int:
        """The tokenizer's size rounded up to a multiple of 64 (embedding and output matmuls run faster so);
        the extra ids are never produced by the tokenizer."""
        if self._vocab_size is None:
            from datamodules.tokenizer import load_tokenizer, tokenizer_sha256

            tok_dir = self.tokenizer_dir
            tok = load_tokenizer(tok_dir)
            check_tokenizer({"tokenizer_sha256": tokenizer_sha256(tok_dir)}, self.tokenizer_sha256, tok_dir)
            self._vocab_size = math.ceil(len(tok) / 64) * 64
        return self._vocab_size

    # --- loaders -----------------------------------------------------------------------------------------
    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader_kwargs(self, num_workers: int) -> dict:
        return {
            "num_workers": num_workers,
            "persistent_workers": num_workers > 0,
            "pin_memory": torch.cuda.is_available(),
        }

    def _align(self, domain: str) -> bool:
        return self.align_tool_examples and self.manifests()[domain].get("kind") == "tools"

    def train_dataloader(self) -> ResumableDataLoader:
        """Shuffled training windows of this rank (deterministic per seed and epoch, resumable mid-epoch)."""
        self.manifests()
        dataset = TokenWindows(self.data_dir / self.corpus, "train", self.seq_len, align_to_documents=self._align(self.corpus))
        rank, world = self._rank_world()
        if len(dataset) // world < self.batch_size:
            raise StagewiseError(
                f"the '{self.corpus}' train split has {len(dataset)} windows of {self.seq_len + 1} tokens, fewer "
                f"than one batch of {self.batch_size} per each of {world} ranks; lower data.seq_len or "
                "data.batch_size, or prepare more data"
            )
        sampler = WindowSampler(len(dataset), self.seed, rank, world, shuffle=True)
        return ResumableDataLoader(dataset, sampler, self.batch_size, **self._loader_kwargs(self.num_workers))

    def _eval_loaders(self, split: str) -> list[DataLoader]:
        self.manifests()
        return [self._eval_loader(domain, split) for domain in self.val_domains]

    def _eval_loader(self, domain: str, split: str) -> DataLoader:
        """One domain's held-out windows, in order; a split without one window is refused (a stage that
        validates on nothing would train blind)."""
        align = self._align(domain)
        seq_len = self.seq_len if align or not self.val_seq_len else self.val_seq_len
        dataset = TokenWindows(self.data_dir / domain, split, seq_len, self.val_max_windows, align_to_documents=align)
        if len(dataset) == 0:
            tokens = self.manifests()[domain].get("tokens", {}).get(split, 0)
            raise StagewiseError(
                f"the '{domain}' {split} split holds {tokens} tokens, not one window of {seq_len + 1}: "
                f"nothing to validate on. Raise that corpus's {split}_fraction (or min_heldout_documents) in "
                "the data config and re-run `stagewise prepare`, or lower data.seq_len"
            )
        # Read in the main process: a window is one memmap slice (tens of M tokens/s, see
        # experiments/benchmark_prepare.py), so workers per domain would only hold memory.
        return DataLoader(dataset, batch_size=self.val_batch_size, shuffle=False, **self._loader_kwargs(0))

    def val_dataloader(self) -> list[DataLoader]:
        """One loader per ``val_domains`` entry: its held-out windows once, in order.

        Every rank sees all of them, so the validation losses are the same on every rank.
        """
        return self._eval_loaders("val")

    def test_dataloader(self) -> list[DataLoader]:
        """Like ``val_dataloader`` over each domain's test split."""
        return self._eval_loaders("test")


class LanguageDataModule(CorpusDataModule):
    """Stage 1: train on the ``language`` corpus, validate on language.

    Args:
        corpus: The corpus to train on.
        val_domains: The corpora to validate on, in order (default: ``["language"]``).
        **kwargs: The other arguments of :class:`CorpusDataModule`.
    """

    def __init__(self, corpus: str = "language", val_domains: list[str] | None = None, **kwargs):
        super().__init__(corpus=corpus, val_domains=val_domains or ["language"], **kwargs)


class CodeDataModule(CorpusDataModule):
    """Stage 2: train on the ``code`` corpus, validate on language and code (to see forgetting).

    Args:
        corpus: The corpus to train on.
        val_domains: The corpora to validate on, in order (default: ``["language", "code"]``).
        **kwargs: The other arguments of :class:`CorpusDataModule`.
    """

    def __init__(self, corpus: str = "code", val_domains: list[str] | None = None, **kwargs):
        super().__init__(corpus=corpus, val_domains=val_domains or ["language", "code"], **kwargs)


class ToolDataModule(CorpusDataModule):
    """Stage 3: train on the ``tools`` corpus (loss on tool-call tokens only), validate on all three domains.

    Args:
        corpus: The corpus to train on.
        val_domains: The corpora to validate on, in order (default: ``["language", "code", "tools"]``).
        **kwargs: The other arguments of :class:`CorpusDataModule`.
    """

    def __init__(self, corpus: str = "tools", val_domains: list[str] | None = None, **kwargs):
        super().__init__(corpus=corpus, val_domains=val_domains or ["language", "code", "tools"], **kwargs)
