"""A DataModule that trains on a mixture of several prepared corpora: replay and the joint baseline.

The training stream interleaves windows of each domain in fixed fractions of the windows. A text window holds
``seq_len`` tokens, so among text domains these are token fractions; a tool window packs whole examples (the
answers are what its loss counts), so a tool domain's fraction is of windows, not of tokens. Position ``i`` of a rank's stream goes to
the domain with the largest deficit ``fraction * i - count_so_far``, so every prefix of the stream holds
each domain's fraction within one window. Each domain draws its windows from its own permutation, fixed
by (seed, epoch, domain), cycling through it again if a small domain runs out.

Every rank follows the same domain sequence (global position ``j * world_size + r`` is rank ``r``'s
``j``-th window, and ranks draw consecutive windows of each domain's permutation), so each rank's
batches, and its logged ``train/loss``, mix the domains like a single-process run; ranks never share a
window unless a domain cycles. Resuming mid-epoch works as in :mod:`datamodules.datamodule`.
"""

from __future__ import annotations

import math
import zlib
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.datamodule import CorpusDataModule, ResumableDataLoader, TokenWindows, WindowSampler
from datamodules.errors import StagewiseError
from datamodules.shards import check_tokenizer, read_manifest


def interleave(fractions: list[float], length: int) -> np.ndarray:
    """Domain index of each of ``length`` positions: position ``i`` (1-based) goes to the domain with the
    largest ``fractions[d] * i - count[d]`` (ties to the earlier domain)."""
    counts = [0] * len(fractions)
    out = [0] * length
    domains = range(len(fractions))
    for i in range(length):  # plain Python: ~0.5 s per million windows, numpy per step is 10x slower
        best, best_deficit = 0, -math.inf
        for d in domains:
            deficit = fractions[d] * (i + 1) - counts[d]
            if deficit > best_deficit:
                best, best_deficit = d, deficit
        out[i] = best
        counts[best] += 1
    return np.asarray(out, dtype=np.int64)


class MixtureWindows(Dataset):
    """The train windows of several domains behind one flat index: ``offsets[d] + window`` is domain ``d``'s window.

    Args:
        datasets: One :class:`TokenWindows` per domain, in mixture order.
        with_mask: Give every item a ``loss_mask``: a domain's own mask, all ones for domains without one.
    """

    def __init__(self, datasets: list[TokenWindows], with_mask: bool):
        self.datasets, self.with_mask = datasets, with_mask
        self.offsets = np.cumsum([0] + [len(d) for d in datasets])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        d = int(np.searchsorted(self.offsets, i, side="right") - 1)
        item = self.datasets[d][i - int(self.offsets[d])]
        if self.with_mask and "loss_mask" not in item:
            item["loss_mask"] = torch.ones(item["targets"].shape, dtype=torch.float32)
        return item


class MixtureSampler(WindowSampler):
    """One rank's flat window indices of a mixture epoch; ``num_windows`` is the epoch's global length.

    Args:
        domain_windows: Train windows of each domain, in mixture order.
        fractions: Window fraction of each domain (summing to 1), in the same order.
        names: Domain names (they seed each domain's permutation).
        corpus_index: The domain whose windows define the epoch: its windows / its fraction, rounded down to
            a multiple of the world size and so that it never cycles (the stage's own data is seen once).
        seed: Seed of the order.
        rank: This process's global rank.
        world_size: Number of processes that split the windows.
    """

    def __init__(self, domain_windows: list[int], fractions: list[float], names: list[str], corpus_index: int,
                 seed: int = 1234, rank: int = 0, world_size: int = 1):
        self.domain_windows, self.fractions, self.names = list(domain_windows), list(fractions), list(names)
        n_c, f_c = domain_windows[corpus_index], fractions[corpus_index]
        per_rank = int(n_c / f_c / world_size + 1e-9)
        self.labels = interleave(fractions, per_rank)
        while per_rank > 0 and world_size * int((self.labels == corpus_index).sum()) > n_c:
            per_rank -= 1  # rounding gave the corpus one window too many on some rank
            self.labels = self.labels[:per_rank]
        super().__init__(per_rank * world_size, seed, rank, world_size, shuffle=True)
        self.offsets = np.cumsum([0] + self.domain_windows)

    def order(self) -> np.ndarray:
        """The epoch's global order of flat window indices, shared by all ranks."""
        labels = np.repeat(self.labels, self.world_size)  # global position j*world+r is rank r's j-th
        out = np.empty(len(labels), dtype=np.int64)
        for d, n in enumerate(self.domain_windows):
            where = np.flatnonzero(labels == d)
            rng = np.random.default_rng((self.seed, self.epoch, zlib.crc32(self.names[d].encode())))
            perm = rng.permutation(n)
            out[where] = self.offsets[d] + perm[np.arange(len(where)) % n]
        return out


class MixtureDataLoader(ResumableDataLoader):
    """A :class:`ResumableDataLoader` whose saved position also records the mixture, so a resume under
    another mixture is refused instead of silently changing the data order."""

    def state_dict(self) -> dict:
        sampler: MixtureSampler = self.sampler
        return {**super().state_dict(), "mixture": dict(zip(sampler.names, sampler.fractions)),
                "domain_windows": sampler.domain_windows}

    def load_state_dict(self, state: dict) -> None:
        sampler: MixtureSampler = self.sampler
        ours = {"mixture": dict(zip(sampler.names, sampler.fractions)), "domain_windows": sampler.domain_windows}
        theirs = {k: state.get(k) for k in ours}
        if theirs != ours:
            raise StagewiseError(
                f"cannot resume mid-epoch: the checkpoint's data mixture {theirs} differs from this run's {ours}; "
                "keep `data.mixture`, `data.seq_len` and the prepared data as they were, or start a new run"
            )
        super().load_state_dict(state)


class MixtureDataModule(CorpusDataModule):
    """Train on a fixed token mixture of prepared corpora (replay of earlier domains, or a joint baseline).

    The epoch is defined by the stage's own domain: it ends when ``corpus`` has been seen once, so it holds
    ``corpus`` windows / its fraction windows in all (e.g. a code stage with 5% language replay trains on all
    code windows plus 5/95 as many language windows). Batches are those of :class:`CorpusDataModule`; if any
    mixed domain has a ``loss_mask`` (tool corpora), the text domains' windows get an all-ones mask, so their
    every token is trained on while tool windows keep the loss on tool calls only.

    Args:
        corpus: The stage's own domain: it must be in the mixture, and its train windows set the epoch length
            (``stagewise fit`` sets it to ``--stage.domain``).
        mixture: Fraction of the windows of each domain, summing to 1 (e.g. ``{code: 0.95, language: 0.05}``), or
            ``natural``: ``corpus`` and every ``val_domains`` entry in proportion to their train tokens (as
            windows of ``seq_len`` tokens: meant for text domains).
        val_domains: The corpora to validate on, one loader each, in this order (default: the mixture's domains).
        **kwargs: The other arguments of :class:`CorpusDataModule` (data_dir, seq_len, batch_size,
            num_workers, seed, val_max_windows).
    """

    def __init__(
        self,
        corpus: str | None = None,
        mixture: dict[str, float] | Literal["natural"] = "natural",
        val_domains: list[str] | None = None,
        **kwargs,
    ):
        if mixture != "natural" and corpus:
            mixture = self._check_mixture(corpus, mixture)
            val_domains = val_domains or list(mixture)
        super().__init__(corpus=corpus, val_domains=val_domains, **kwargs)
        self.mixture = mixture
        self._fractions: dict[str, float] | None = None

    @staticmethod
    def _check_mixture(corpus: str, mixture: dict) -> dict[str, float]:
        if not isinstance(mixture, dict) or not mixture:
            raise StagewiseError(f"data.mixture must be `natural` or a mapping domain -> fraction of the windows, "
                                 f"got {mixture!r}")
        bad = {d: f for d, f in mixture.items() if not isinstance(f, (int, float)) or not 0 < f <= 1}
        if bad:
            raise StagewiseError(f"data.mixture fractions must be in (0, 1]; got {bad} (drop a domain instead of giving 0)")
        total = sum(mixture.values())
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise StagewiseError(f"data.mixture fractions sum to {total:g}, not 1: {mixture}; rescale them")
        if corpus not in mixture:
            raise StagewiseError(f"data.corpus '{corpus}' is not in data.mixture {mixture}; the stage's own domain "
                                 "must be mixed in (it sets the epoch length)")
        return {d: float(f) for d, f in mixture.items()}

    def manifests(self) -> dict[str, dict]:
        """The manifests of every mixed and validation domain, checked for one shared tokenizer."""
        if self._manifests is None:
            domains = [] if self.mixture == "natural" else list(self.mixture)
            for d in domains:
                if not (self.data_dir / d / "manifest.json").is_file():
                    known = sorted(p.parent.name for p in self.data_dir.glob("*/manifest.json"))
                    if not known:  # nothing prepared here at all: say how to prepare it
                        read_manifest(self.data_dir / d)
                    raise StagewiseError(
                        f"data.mixture names the domain '{d}', but {self.data_dir / d} holds no prepared corpus "
                        f"(prepared here: {known or 'none'}); fix the name or run `stagewise prepare` for it"
                    )
            manifests = super().manifests()
            sha = manifests[self.corpus]["tokenizer_sha256"]
            for d in domains:
                if d not in manifests:
                    manifests[d] = read_manifest(self.data_dir / d)
                    check_tokenizer(manifests[d], sha, self.data_dir / d)
        return self._manifests

    @property
    def mixture_fractions(self) -> dict[str, float]:
        """The resolved window fraction of each domain (``natural`` turned into numbers), in mixture order."""
        if self._fractions is None:
            if self.mixture == "natural":
                manifests = self.manifests()
                domains = [self.corpus] + [d for d in self.val_domains if d != self.corpus]
                tokens = {d: int(manifests[d]["tokens"]["train"]) for d in domains}
                total = sum(tokens.values())
                if total == 0:
                    raise StagewiseError(f"data.mixture natural: the domains {domains} have no train tokens; prepare data first")
                self._fractions = {d: t / total for d, t in tokens.items() if t > 0}
            else:
                self._fractions = dict(self.mixture)
        return self._fractions

    def train_dataloader(self) -> MixtureDataLoader:
        """This rank's mixture windows (deterministic per seed and epoch, resumable mid-epoch)."""
        fractions = self.mixture_fractions
        self.manifests()
        names = list(fractions)
        datasets = [TokenWindows(self.data_dir / d, "train", self.seq_len, align_to_documents=self._align(d)) for d in names]
        empty = [d for d, ds in zip(names, datasets) if len(ds) == 0]
        if empty:
            raise StagewiseError(f"the train split of {empty} holds no window of {self.seq_len + 1} tokens; lower "
                                 "data.seq_len, prepare more data, or drop them from data.mixture")
        rank, world = self._rank_world()
        sampler = MixtureSampler([len(ds) for ds in datasets], list(fractions.values()), names,
                                 names.index(self.corpus), self.seed, rank, world)
        if len(sampler) < self.batch_size:
            raise StagewiseError(
                f"the '{self.corpus}' train split has {len(datasets[names.index(self.corpus)])} windows of "
                f"{self.seq_len + 1} tokens: a mixture epoch of {sampler.num_windows} windows is less than one batch "
                f"of {self.batch_size} per each of {world} ranks; lower data.seq_len or data.batch_size, or prepare more data"
            )
        dataset = MixtureWindows(datasets, with_mask=any(ds.has_mask for ds in datasets))
        return MixtureDataLoader(dataset, sampler, self.batch_size, **self._loader_kwargs(self.num_workers))
