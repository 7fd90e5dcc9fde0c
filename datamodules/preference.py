"""Preference pairs (prompt, chosen answer, rejected answer) for DPO: where they live and the DataModule that serves them.

``stagewise pairs --parent CKPT`` (``lightning_modules/pairs.py``) writes the pairs of one parent checkpoint to
``<data_dir>/preference/<sha12>/``, ``<sha12>`` the first 12 hex digits of the parent file's sha256, so two
experiments (two parents) never share or overwrite each other's pairs::

    train.jsonl     one pair per line: a tool example whose ``tool_calls`` is replaced by ``chosen`` (the
                    reference calls) and ``rejected`` (a wrong call), with ``rejected_from`` saying where the
                    wrong call came from (``model``: the parent's own greedy answer; else the corruption)
    val.jsonl       pairs of held-out requests, the same way
    manifest.json   the parent (path, sha256), the tokenizer's sha256, the settings and counts (written last)

A pair is rendered with the tokenizer's chat template exactly as a tool example is
(``datamodules.tokenizer.render_tool_prompt`` / ``render_tool_example``); the loss masks cover the answer
tokens only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.datamodule import CorpusDataModule, ResumableDataLoader, TokenWindows, WindowSampler
from datamodules.errors import StagewiseError, TokenizerMismatchError
from datamodules.stage_record import file_sha256
from datamodules.tokenizer import load_tokenizer, render_tool_example, render_tool_prompt

PREFERENCE = "preference"  # the validation domain of the pairs, and the folder under data_dir
PAD_MULTIPLE = 16  # batches are padded to a multiple of this many tokens (fewer shapes to compile)


def pairs_dir(data_dir: str | Path, parent_sha256: str, tag: str | None = None) -> Path:
    """Where the pairs of the parent checkpoint with this sha256 live: ``<data_dir>/preference/<sha12>``, or
    ``<sha12>-<tag>`` for a tagged set (another recipe of pairs from the same parent)."""
    if tag is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", tag):
        raise StagewiseError(f"a pairs tag is a plain name (letters, digits, '_', '.', '-'), not {tag!r}")
    return Path(data_dir) / PREFERENCE / (parent_sha256[:12] + (f"-{tag}" if tag else ""))


def read_pairs(directory: str | Path, split: str) -> list[dict]:
    """The pairs of one split (``train`` or ``val``) of a pairs directory."""
    path = Path(directory) / f"{split}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def render_pair(tok, pair: dict) -> tuple[list[int], list[int], list[int]]:
    """The prompt's token ids and those of the chosen and the rejected answer, rendered by the chat template."""
    prompt = list(render_tool_prompt(tok, {**pair, "tool_calls": pair["chosen"]}))
    answers = []
    for key in ("chosen", "rejected"):
        ids, _ = render_tool_example(tok, {**pair, "tool_calls": pair[key]})
        if ids[: len(prompt)] != prompt:
            raise RuntimeError("the chat template rendered the prompt differently before the answer")
        answers.append(ids[len(prompt):])
    return prompt, answers[0], answers[1]


def _row(prompt: list[int], answer: list[int], keep: int, seq_len: int) -> dict[str, torch.Tensor]:
    ids = prompt[len(prompt) - keep:] + answer[: seq_len + 1 - keep]
    mask = [0.0] * keep + [1.0] * (len(ids) - keep)
    window = torch.tensor(ids, dtype=torch.long)
    return {"input_ids": window[:-1], "targets": window[1:], "loss_mask": torch.tensor(mask[1:])}


class PreferencePairs(Dataset):
    """Rendered pairs: item ``i`` is ``{"chosen": row, "rejected": row}``, each row the input ids, targets
    and answer mask of one sequence.

    Both rows share the same prompt, cut from the left so the longer answer fits in ``seq_len + 1`` tokens
    (the request and the last tool schemas stay, as in the tool stage's windows).

    Args:
        pairs: Pairs as ``stagewise pairs`` writes them.
        tokenizer: The tokenizer whose chat template renders them.
        seq_len: Tokens per row (inputs; targets are shifted by one).
    """

    def __init__(self, pairs: list[dict], tokenizer, seq_len: int):
        self.seq_len = seq_len
        self.rows = [render_pair(tokenizer, pair) for pair in pairs]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, dict[str, torch.Tensor]]:
        prompt, chosen, rejected = self.rows[i]
        keep = max(1, min(len(prompt), self.seq_len + 1 - max(len(chosen), len(rejected))))
        return {"chosen": _row(prompt, chosen, keep, self.seq_len), "rejected": _row(prompt, rejected, keep, self.seq_len)}


def collate_pairs(items: list[dict[str, dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """A batch of B pairs as 2B rows, ``input_ids``, ``targets`` and ``loss_mask`` [2B, T]: the chosen rows
    first, then the rejected rows in the same order (one forward pass for both, as TRL's DPOTrainer does).

    Rows are right-padded to one length, a multiple of ``PAD_MULTIPLE``: the padding comes after each row's
    answer, so under causal attention it changes nothing before it, and it is masked out."""
    rows = [item["chosen"] for item in items] + [item["rejected"] for item in items]
    width = -(-max(len(row["input_ids"]) for row in rows) // PAD_MULTIPLE) * PAD_MULTIPLE
    batch = {}
    for key in rows[0]:
        pad = 0.0 if key == "loss_mask" else TokenWindows.PAD_ID
        batch[key] = torch.stack([torch.nn.functional.pad(row[key], (0, width - len(row[key])), value=pad) for row in rows])
    return batch


class PreferenceDataModule(CorpusDataModule):
    """Stage 4: preference pairs of the parent checkpoint for training; held-out pairs and every earlier
    domain's held-out windows for validation.

    The pairs come from ``<data_dir>/preference/<sha12 of parent>/`` (``stagewise pairs``); without them the
    stage refuses to start. ``val_domains`` is every corpus validated (language, code, tools, as plain
    cross-entropy, so forgetting is measured as in the other stages) followed by ``preference``, the
    held-out pairs.

    Args:
        parent: The parent checkpoint whose pairs to serve; ``stagewise fit`` sets it from
            ``model.init_args.init_from`` (the policy's start and the frozen reference).
        val_domains: The corpora validated as in the other stages, in order (default: language, code, tools).
        tools_corpus: The tool corpus the pairs were made from (its tokenizer renders them); not ``corpus``,
            which a stage sets to its own domain.
        val_max_pairs: Validate on at most this many held-out pairs (default: all that ``stagewise pairs`` wrote).
        pairs_tag: Serve the parent's pairs made with ``stagewise pairs --tag`` this tag (default: the untagged set).
        **kwargs: The other arguments of :class:`CorpusDataModule` (data_dir, seq_len, batch_size: pairs per
            batch, val_batch_size, num_workers, seed, val_max_windows).
    """

    def __init__(self, parent: str | None = None, val_domains: list[str] | None = None, tools_corpus: str = "tools",
                 val_max_pairs: int | None = None, pairs_tag: str | None = None, **kwargs):
        domains = [d for d in (val_domains or ["language", "code", "tools"]) if d != PREFERENCE]
        super().__init__(corpus=tools_corpus, val_domains=[*domains, PREFERENCE], **kwargs)
        self.parent, self.val_max_pairs, self.pairs_tag = parent, val_max_pairs, pairs_tag
        self._pairs: dict | None = None
        self._tokenizer = None

    def state_dict(self) -> dict:
        """The data settings (see :class:`CorpusDataModule`) and which pairs trained the policy: its parent and
        the pairs set's tag, so two variants from one parent say which of its sets each used."""
        return {**super().state_dict(), "parent": self.parent, "pairs_tag": self.pairs_tag}

    @property
    def corpus_domains(self) -> list[str]:
        """The validation domains that are prepared corpora: all but ``preference``."""
        return [d for d in self.val_domains if d != PREFERENCE]

    def manifests(self) -> dict[str, dict]:
        """The corpora's manifests, checked as in :class:`CorpusDataModule`; also checks that the pairs of
        ``parent`` exist (the CLI reads this when it builds the model, so a fit without them stops before
        anything is written)."""
        if self._manifests is None:
            self.pairs_manifest(super().manifests()[self.corpus]["tokenizer_sha256"])
        return self._manifests

    def pairs_manifest(self, tokenizer_sha256: str | None = None) -> dict:
        """The manifest of the parent's pairs; StagewiseError saying how to make them if they are missing."""
        if self._pairs is not None:
            return self._pairs
        if not self.parent:
            raise StagewiseError("the preference stage needs its parent checkpoint (`model.init_args.init_from`, "
                                 "which `stagewise fit` passes on as `data.init_args.parent`): it is the start of "
                                 "training, the frozen reference, and the model whose pairs are served")
        if not Path(self.parent).is_file():
            raise StagewiseError(f"the preference stage's parent {self.parent} does not exist; train the tool stage "
                                 "first or point --model.init_args.init_from at a checkpoint")
        sha = file_sha256(self.parent)
        where = pairs_dir(self.data_dir, sha, self.pairs_tag)
        path = where / "manifest.json"
        tag = f" --tag {self.pairs_tag}" if self.pairs_tag else ""
        hint = (f"make them with `stagewise pairs --parent {self.parent} --data_dir {self.data_dir}{tag}`, then run "
                "this stage again")
        if not path.is_file():
            raise StagewiseError(f"no preference pairs for the parent {self.parent} (sha256 {sha[:12]}…): "
                                 f"{where}/manifest.json does not exist; {hint}")
        manifest = json.loads(path.read_text())
        if manifest.get("parent", {}).get("sha256") != sha:
            raise StagewiseError(f"{path} describes pairs of another checkpoint (sha256 "
                                 f"{str(manifest.get('parent', {}).get('sha256'))[:12]}…, not {sha[:12]}…); {hint}")
        if tokenizer_sha256 and manifest.get("tokenizer_sha256") != tokenizer_sha256:
            raise TokenizerMismatchError(f"{where} was made with tokenizer {str(manifest.get('tokenizer_sha256'))[:12]}… "
                                         f"but the data uses {tokenizer_sha256[:12]}…; {hint}")
        self._pairs = {**manifest, "dir": str(where)}
        return self._pairs

    def _dataset(self, split: str, limit: int | None = None) -> PreferencePairs:
        self.manifests()
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_dir)
        pairs = read_pairs(self.pairs_manifest()["dir"], split)
        return PreferencePairs(pairs[:limit] if limit is not None else pairs, self._tokenizer, self.seq_len)

    def train_dataloader(self) -> ResumableDataLoader:
        """Shuffled training pairs of this rank (deterministic per seed and epoch, resumable mid-epoch)."""
        dataset = self._dataset("train")
        rank, world = self._rank_world()
        if len(dataset) // world < self.batch_size:
            raise StagewiseError(f"{self.pairs_manifest()['dir']} holds {len(dataset)} training pairs, fewer than one "
                                 f"batch of {self.batch_size} per each of {world} ranks; lower data.batch_size or "
                                 "make more pairs (`stagewise pairs --limit`)")
        sampler = WindowSampler(len(dataset), self.seed, rank, world, shuffle=True)
        return ResumableDataLoader(dataset, sampler, self.batch_size, collate_fn=collate_pairs,
                                   **self._loader_kwargs(self.num_workers))

    def test_dataloader(self) -> list[DataLoader]:
        """Each corpus's test split, as in the other stages (``stagewise pairs`` holds pairs out for validation
        only, so ``preference`` is not tested)."""
        self.manifests()
        return [self._eval_loader(domain, "test") for domain in self.corpus_domains]

    def _eval_loader(self, domain: str, split: str) -> DataLoader:
        if domain != PREFERENCE:
            return super()._eval_loader(domain, split)
        if split != "val":
            raise StagewiseError("`stagewise pairs` makes held-out pairs for validation only (no test pairs)")
        return DataLoader(self._dataset("val", self.val_max_pairs), batch_size=self.val_batch_size, shuffle=False,
                          collate_fn=collate_pairs, **self._loader_kwargs(0))
