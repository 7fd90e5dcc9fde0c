"""`stagewise prepare`: corpora -> documents -> tokenizer -> token shards.

Each step is cached by a key over everything it depends on, so a second run with the same config
and sources does nothing, and a changed source or config rebuilds only what depends on it:

    source fingerprint ──> documents cache (data/.cache/docs/<corpus>/<source>-<key>.jsonl)
    tokenizer sha256 + corpus config + its sources ──> data/<corpus>/{train,val,test[,unseen]}.bin + manifest.json

One tokenizer per data dir, for the whole lineage of stages trained on it: ``data/tokenizer/`` is trained
once, when there is none, and reused after that, whatever changes in the sources or the fractions (a new
tokenizer would make every checkpoint trained on the old one useless for the next stage). Retraining it is
explicit (``--retrain_tokenizer true``). ``tokenizer.from_dir`` copies another data dir's tokenizer into this
one (and records where it came from), so later corpora prepared elsewhere share the first stage's ids;
``tokenizer.from_model`` adopts a transformers model's tokenizer instead. The chat template
(``datamodules.tokenizer.CHAT_TEMPLATE``) is the other half of the tokenizer's identity: a new one is written
into ``data/tokenizer/`` without retraining BPE and re-renders the tool shards only.

Prepared data travels without its sources: where the sources are not installed (a GPU machine), a data dir
whose manifests match the config (the same sources, settings and tokenizer) is up to date as it is.

A run publishes nothing until everything is written: a new tokenizer, shards and manifests go to
``*.tmp`` names first and are renamed into place together at the end, so an error (a malformed line, a
full disk) leaves the data prepared before exactly as it was.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterable, Iterator, Literal

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import numpy as np

from datamodules.errors import MissingSourceError, StagewiseError
from datamodules.shards import ShardWriter, atomic_path, replace_dir, stage_manifest
from datamodules.sources import Document, Source, SourceStats, ordered_map
from datamodules.tokenizer import (
    CHAT_TEMPLATE,
    adopt_tokenizer,
    chat_template_of,
    chat_template_sha256,
    check_adoptable,
    encode_document,
    load_tokenizer,
    render_tool_example,
    tokenizer_sha256,
    train_tokenizer,
)

SPLITS = ("train", "val", "test")
UNSEEN = "unseen"  # tool corpora: examples of whole services that no other split has
TOKENIZER_RECORD = "stagewise_tokenizer.json"  # how data_dir/tokenizer was made (trained here or copied)
console = Console(stderr=True)
if not console.is_terminal:  # logs and CI: keep the table readable instead of 80 columns
    console.width = 160


@dataclass
class Corpus:
    """One training domain (language, code, tools...) built from a list of sources.

    Args:
        sources: The readers that produce this corpus's documents (class_path + init_args each).
        kind: ``text`` for plain documents, ``tools`` for tool-calling examples (rendered with the chat
            template; loss only on the assistant's tool-call tokens).
        val_fraction: Share of documents held out for validation, chosen by a stable hash of the text.
        test_fraction: Share of documents held out for testing, chosen the same way.
        min_heldout_documents: Fewest documents each held-out split gets: where the fractions give fewer
            (a small corpus), the training documents nearest the split's hash boundary move over; a corpus
            too small to keep any training document then is refused.
        unseen_fraction: Tool corpora: share of *services* (an AWS service, an azure-cli command group)
            held out whole in the ``unseen`` split, chosen by a stable hash of the service's name: no
            example of theirs is in train, val or test.
        max_train_tokens: Train on at most this many tokens of the corpus: whole training documents are
            taken in the order of their stable hash (a fixed sample across all sources) until the next would
            pass the budget (all when None).
        max_heldout_tokens: The same cap for each held-out split (val, test, unseen); all when None.
    """

    sources: list[Source]
    kind: Literal["text", "tools"] = "text"
    val_fraction: float = 0.01
    test_fraction: float = 0.01
    min_heldout_documents: int = 1
    unseen_fraction: float = 0.0
    max_train_tokens: int | None = None
    max_heldout_tokens: int | None = None

    def settings(self) -> dict:
        """Everything about the corpus the config states, sources included, without touching a file."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "sources"} | {
            "sources": [s.settings() for s in self.sources]
        }


@dataclass
class TokenizerConfig:
    """How the byte-level BPE tokenizer is made.

    Args:
        vocab_size: Vocabulary size, special tokens included (8192 for the demo; 32768 for real runs).
        sample_bytes: Bytes of training text sampled for BPE training, split evenly over the corpora.
        from_dir: Copy this existing tokenizer directory (e.g. the first stage's ``data/tokenizer``) into
            ``data_dir/tokenizer`` instead of training one; where it came from is recorded.
        from_model: Adopt the tokenizer of this transformers model directory (to start a stage from that model
            with ``--model.init_args.init_from``): its vocabulary and ids stay, each of our special tokens it
            lacks is added after its last id, its bos / eos / pad stay, the chat template becomes ours
            (``datamodules.tokenizer.adopt_tokenizer``; written to ``<data_dir>/tokenizer``). ``vocab_size``
            and ``sample_bytes`` are then unused.
    """

    vocab_size: int = 32768
    sample_bytes: int = 40_000_000
    from_dir: str | None = None
    from_model: str | None = None


@dataclass
class SourceResult:
    name: str
    stats: SourceStats
    documents: list[Document] = field(default_factory=list)
    cached: bool = False


def _sha(*parts: object) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()


def stable_u(text: str) -> float:
    """A number in [0, 1) from the sha256 of ``text``: the same on every machine and every run."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16) / 16**15


def split_of(text: str, val_fraction: float, test_fraction: float) -> str:
    """The split a document belongs to, from a stable hash of its text: re-runs never move it."""
    u = stable_u(text)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def service_of(doc: Document) -> str:
    """A tool example's service, ``family/service`` (``aws/ec2``, ``azure/vm``): what the unseen split holds out
    whole. Readers tag it in ``meta``; an untagged example's service is the function it calls."""
    family = doc.meta.get("family") or doc.source
    service = doc.meta.get("service") or json.loads(doc.text)["tool_calls"][0]["name"]
    return f"{family}/{service}"


# --- step 1: documents -------------------------------------------------------------------------


def _read_source(source: Source, cache_dir: Path, fingerprint: str, progress: Progress) -> SourceResult:
    cache = cache_dir / f"{source.name}-{fingerprint[:16]}.jsonl"
    if cache.exists():
        lines = cache.read_text().splitlines()
        header = json.loads(lines[0])
        stats = SourceStats(header["documents"], header["bytes"], Counter(header["skipped"]))
        docs = [Document(**json.loads(line)) for line in lines[1:]]
        return SourceResult(source.name, stats, docs, cached=True)
    files = source.files()  # raises MissingSourceError with the install hint
    task = progress.add_task(f"read {source.name}", total=len(files) or None)
    stats = SourceStats()
    docs = []
    seen_paths: set[str] = set()
    for doc in source.read(stats):
        docs.append(doc)
        file = doc.path.split(":")[0]
        if file not in seen_paths:
            seen_paths.add(file)
            progress.update(task, completed=min(len(seen_paths), len(files)))
    progress.update(task, completed=len(files) or 1, total=len(files) or 1)
    header = {"documents": stats.documents, "bytes": stats.bytes, "skipped": dict(stats.skipped)}
    body = "\n".join(json.dumps(asdict(d)) for d in docs)
    with atomic_path(cache) as tmp:
        tmp.write_text(json.dumps(header) + "\n" + body + ("\n" if body else ""))
    for old in cache_dir.glob(f"{source.name}-*.jsonl"):
        if old != cache:
            old.unlink()
    return SourceResult(source.name, stats, docs)


def _split_corpus(name: str, corpus: Corpus, results: list[SourceResult]) -> dict[str, list[Document]]:
    """Exact deduplication (first occurrence wins), the unseen services (tool corpora), the stable hash split
    and the guaranteed minimum of held-out documents."""
    seen: set[str] = set()
    docs: list[Document] = []
    for result in results:
        for doc in result.documents:
            digest = hashlib.sha256(doc.text.encode()).hexdigest()
            if digest in seen:
                result.stats.skipped["duplicate"] += 1
                continue
            seen.add(digest)
            docs.append(doc)
    if not docs:
        skipped = ", ".join(f"{r.name}: {dict(r.stats.skipped) or 'nothing skipped'}" for r in results)
        raise StagewiseError(
            f"corpus '{name}' is empty after cleaning ({skipped}). Check its sources' paths and filters "
            "in the data config."
        )
    splits: dict[str, list[Document]] = {s: [] for s in SPLITS}
    unseen = _unseen_services(corpus, docs)
    if unseen:
        splits[UNSEEN] = [d for d in docs if service_of(d) in unseen]
        docs = [d for d in docs if service_of(d) not in unseen]
    for doc in docs:
        splits[split_of(doc.text, corpus.val_fraction, corpus.test_fraction)].append(doc)
    for split in ("test", "val"):  # too few held out: the training documents nearest the boundary move over
        short = corpus.min_heldout_documents - len(splits[split])
        if short > 0 and len(splits["train"]) > short:
            nearest = set(map(id, sorted(splits["train"], key=lambda d: stable_u(d.text))[:short]))
            splits[split] += [d for d in splits["train"] if id(d) in nearest]
            splits["train"] = [d for d in splits["train"] if id(d) not in nearest]
    small = {s: len(v) for s, v in splits.items() if s != "train" and len(v) < corpus.min_heldout_documents}
    if small or not splits["train"]:
        raise StagewiseError(
            f"corpus '{name}' has {len(docs)} documents after cleaning and deduplication: too few to hold out "
            f"{corpus.min_heldout_documents} for each of val and test (min_heldout_documents) and still train on "
            f"some (train {len(splits['train'])}, {', '.join(f'{s} {n}' for s, n in small.items()) or 'held out'}). "
            "Add documents to its sources, or lower its min_heldout_documents in the data config."
        )
    return splits


def _unseen_services(corpus: Corpus, docs: list[Document]) -> set[str]:
    """The services held out whole: those whose name hashes below ``unseen_fraction`` (at least one)."""
    if corpus.kind != "tools" or corpus.unseen_fraction <= 0:
        return set()
    services = sorted({service_of(d) for d in docs}, key=stable_u)
    chosen = {s for s in services if stable_u(s) < corpus.unseen_fraction}
    if len(services) < 2:
        raise StagewiseError(
            f"a tool corpus with unseen_fraction {corpus.unseen_fraction} needs examples of at least two services "
            f"to hold one out, but all of its examples are of {services[0]}; set unseen_fraction: 0, or add "
            "examples of other services"
        )
    return chosen or {services[0]}


# --- step 2: tokenizer -------------------------------------------------------------------------


def _tokenizer_sample(splits: dict[str, dict[str, list[Document]]], sample_bytes: int) -> Iterator[str]:
    per_corpus = sample_bytes // max(1, len(splits))
    for corpus_splits in splits.values():
        docs = list(corpus_splits["train"])
        random.Random(0).shuffle(docs)
        budget = per_corpus
        for doc in docs:
            if budget <= 0:
                break
            budget -= len(doc.text)
            yield doc.text


def tokenizer_record(tok_dir: str | Path) -> dict:
    """How a data dir's tokenizer was made (``{}`` for one prepared before this was recorded)."""
    path = Path(tok_dir) / TOKENIZER_RECORD
    return json.loads(path.read_text()) if path.exists() else {}


def _tokenizer_plan(cfg: TokenizerConfig, root: Path, retrain: bool) -> str:
    """``reuse`` the data dir's tokenizer, give it the current chat ``template``, ``copy`` ``cfg.from_dir``
    into it, ``adopt`` ``cfg.from_model``'s, or ``train`` one; refuses a config that asks for another
    vocabulary than the tokenizer it would keep."""
    plan = _vocabulary_plan(cfg, root, retrain)
    if plan == "reuse" and chat_template_of(root / "tokenizer") != CHAT_TEMPLATE:
        return "template"
    return plan


def _vocabulary_plan(cfg: TokenizerConfig, root: Path, retrain: bool) -> str:
    out = root / "tokenizer"
    exists = (out / "tokenizer.json").exists()
    if cfg.from_model:
        if cfg.from_dir:
            raise StagewiseError("the data config sets both tokenizer.from_dir and tokenizer.from_model; keep one")
        check_adoptable(cfg.from_model)
        theirs = tokenizer_sha256(cfg.from_model)
        if exists and not retrain:
            if tokenizer_record(out).get("from_model_sha256") == theirs:
                return "reuse"
            raise StagewiseError(
                f"{out} holds another tokenizer than the one tokenizer.from_model {cfg.from_model} would adopt; "
                "every stage of a lineage shares one tokenizer, so prepare never replaces it on its own: prepare "
                "into a new data_dir, or pass --retrain_tokenizer true to replace it"
            )
        return "adopt"
    if cfg.from_dir:
        if retrain:
            raise StagewiseError(
                "--retrain_tokenizer asks for a new tokenizer but tokenizer.from_dir names one to copy; drop one of them"
            )
        if exists and not (Path(cfg.from_dir) / "tokenizer.json").exists() and tokenizer_record(out).get("from_dir"):
            console.print(f"tokenizer.from_dir {cfg.from_dir} is not on this machine; {out} was copied from it: using that")
            return "reuse"
        load_tokenizer(cfg.from_dir)  # fails clearly if missing or lacking the reserved tokens
        return "reuse" if exists and tokenizer_sha256(out) == tokenizer_sha256(cfg.from_dir) else "copy"
    if retrain or not exists:
        return "train"
    recorded = tokenizer_record(out)
    if recorded.get("trained_here") and recorded.get("vocab_size") != cfg.vocab_size:
        raise StagewiseError(
            f"{out} is a {recorded['vocab_size']}-token tokenizer, but the data config asks for tokenizer.vocab_size "
            f"{cfg.vocab_size}. Every stage of a lineage shares one tokenizer, so prepare never replaces it on its "
            "own: set vocab_size back, or pass --retrain_tokenizer true to train a new one (checkpoints trained "
            "on the old one will not fit the new data)."
        )
    return "reuse"


def _stage_tokenizer(cfg: TokenizerConfig, root: Path, plan: str, splits, fingerprints) -> Path:
    """Write the tokenizer to ``data_dir/tokenizer.tmp`` (trained, copied from ``cfg.from_dir``, adopted from
    ``cfg.from_model``, or the data dir's own with the current chat template), with its record;
    :func:`_publish_tokenizer` moves it into place once the shards are written."""
    tmp = root / "tokenizer.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if plan == "template":  # the same vocabulary, the new template (tool shards are re-rendered with it)
            console.print(f"chat template changed: updating {root / 'tokenizer'} (the vocabulary stays)")
            shutil.copytree(root / "tokenizer", tmp)
            (tmp / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
            record = tokenizer_record(tmp)
        elif plan == "copy":
            shutil.copytree(cfg.from_dir, tmp, ignore=shutil.ignore_patterns("stagewise_*"))
            (tmp / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
            record = {"trained_here": False, "from_dir": str(Path(cfg.from_dir).resolve()),
                      "from_record": tokenizer_record(cfg.from_dir)}
        elif plan == "adopt":
            adopt_tokenizer(cfg.from_model, tmp)
            record = {"trained_here": False, "from_model": str(Path(cfg.from_model).resolve()),
                      "from_model_sha256": tokenizer_sha256(cfg.from_model)}
        else:
            with console.status(f"training a {cfg.vocab_size}-token byte-level BPE tokenizer"):
                train_tokenizer(_tokenizer_sample(splits, cfg.sample_bytes), cfg.vocab_size, tmp)
            record = {"trained_here": True, "vocab_size": cfg.vocab_size, "sample_bytes": cfg.sample_bytes,
                      "trained_on": fingerprints}
        record["sha256"] = tokenizer_sha256(tmp)
        (tmp / TOKENIZER_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _publish_tokenizer(tmp: Path, out: Path) -> None:
    replace_dir(tmp, out)


# --- step 3: shards ----------------------------------------------------------------------------


def _batched(items: list, n: int) -> Iterable[list]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


@dataclass
class StagedCorpus:
    """A corpus's new shards and manifest, written under ``.tmp`` names, not yet in place."""

    dir: Path
    manifest: dict
    writers: list[ShardWriter] = field(default_factory=list)
    manifest_tmp: Path | None = None

    def publish(self) -> None:
        """Rename the shards, then the manifest, into place (renames only: no disk space needed)."""
        for writer in self.writers:
            writer.close()
        os.replace(self.manifest_tmp, self.dir / "manifest.json")

    def abort(self) -> None:
        """Remove the temporary files; the corpus's previous files stay as they were."""
        for writer in self.writers:
            writer.abort()
        if self.manifest_tmp is not None:
            self.manifest_tmp.unlink(missing_ok=True)


_RENDERING: dict = {}  # the tokenizer forked render workers use (set before they fork, never pickled)


def _render(doc: Document) -> tuple[list[int], list[int]]:
    return render_tool_example(_RENDERING["tok"], json.loads(doc.text))


def _encodings(tok, docs: list[Document], tools: bool, workers: int) -> Iterator[tuple[list[int], list[int] | None]]:
    """``(ids, mask)`` of each document, in order: text in batches (the tokenizer's own threads), tool examples
    through the chat template in ``workers`` forked processes (Python-bound)."""
    if tools:
        _RENDERING["tok"] = tok
        yield from ordered_map(_render, docs, workers, chunksize=16)
        return
    for batch in _batched(docs, 256):
        yield from ((ids, None) for ids in encode_document(tok, [d.text for d in batch]))


def _encoded_split(tok, docs: list[Document], tools: bool, cap: int | None, workers: int, progress, task
                   ) -> Iterator[tuple]:
    """``(doc, ids, mask)`` of the documents a split keeps, in document order: all of them, or under a token
    ``cap`` the first ones in stable-hash order whose tokens fit (at least one), encoding no more than that."""
    if cap is None:
        for doc, (ids, mask) in zip(docs, _encodings(tok, docs, tools, workers)):
            yield doc, ids, mask
            progress.advance(task, 1)
        return
    ordered = sorted(docs, key=lambda d: stable_u(d.text))
    position = {id(d): i for i, d in enumerate(docs)}
    kept: list[tuple] = []
    total = 0
    encodings = _encodings(tok, ordered, tools, workers)
    for doc, (ids, mask) in zip(ordered, encodings):
        if kept and total + len(ids) > cap:
            break
        kept.append((doc, np.asarray(ids, np.uint32), None if mask is None else np.asarray(mask, np.uint8)))
        total += len(ids)
    encodings.close()  # stops the render workers
    progress.advance(task, len(docs))
    yield from sorted(kept, key=lambda k: position[id(k[0])])


def _write_shards(name, corpus, corpus_dir, splits, results, tok, tok_dir, keys, workers, progress) -> StagedCorpus:
    tok_sha, template_sha = tokenizer_sha256(tok_dir), chat_template_sha256(tok_dir)
    dtype = "uint16" if len(tok) <= 65535 else "uint32"
    tools = corpus.kind == "tools"
    tokens: dict[str, int] = {}
    documents: dict[str, int] = {}
    services: dict[str, Counter] = {}
    per_source = {r.name: {"documents": 0, "tokens": 0} for r in results}
    task = progress.add_task(f"tokenize {name}", total=sum(len(v) for v in splits.values()))
    staged = StagedCorpus(corpus_dir, {})
    try:
        for split, docs in splits.items():
            writer = ShardWriter(corpus_dir, split, dtype, with_mask=tools, with_documents=tools)
            staged.writers.append(writer)
            cap = corpus.max_train_tokens if split == "train" else corpus.max_heldout_tokens
            services[split] = Counter()
            for doc, ids, mask in _encoded_split(tok, docs, tools, cap, workers, progress, task):
                writer.add(ids, mask, doc.text if tools else None)
                per_source[doc.source]["documents"] += 1
                per_source[doc.source]["tokens"] += len(ids)
                if tools:
                    services[split][service_of(doc)] += 1
            writer.finish()
            tokens[split], documents[split] = writer.tokens, writer.documents
            if cap is not None:
                console.print(f"{name}/{split}: {writer.documents:,} of {len(docs):,} documents, "
                              f"{writer.tokens:,} tokens (budget {cap:,})")
        for r in results:
            per_source[r.name].update(read=r.stats.documents, bytes=r.stats.bytes, skipped=dict(r.stats.skipped))
        staged.manifest = {
            "corpus": name,
            "kind": corpus.kind,
            "dtype": dtype,
            "tokens": tokens,
            "documents": documents,
            "available_documents": {s: len(v) for s, v in splits.items()},
            "sources": per_source,
            "tokenizer_sha256": tok_sha,
            **({"chat_template_sha256": template_sha} if tools else {}),
            "tokenizer_from": tokenizer_record(tok_dir).get("from_dir"),
            "key": keys[0],
            "config_key": keys[1],
            "config": corpus.settings(),
        }
        if tools:
            staged.manifest["services"] = {s: dict(sorted(c.items())) for s, c in services.items()}
            staged.manifest["families"] = {
                s: dict(sorted(Counter(k.split("/", 1)[0] for k in c.elements()).items())) for s, c in services.items()
            }
        staged.manifest_tmp = stage_manifest(corpus_dir, staged.manifest)
    except BaseException:
        staged.abort()
        raise
    return staged


def _manifest_if_current(corpus_dir: Path, key: str, field: str = "key") -> dict | None:
    path = corpus_dir / "manifest.json"
    if not path.exists():
        return None
    manifest = json.loads(path.read_text())
    splits = manifest.get("documents", SPLITS)
    files = [corpus_dir / f"{s}.bin" for s in splits]
    if manifest.get("kind") == "tools":  # tool corpora keep their examples as JSONL (for `stagewise pairs`)
        files += [corpus_dir / f"{s}.jsonl" for s in splits]
    return manifest if manifest.get(field) == key and all(f.exists() for f in files) else None


# --- the command -------------------------------------------------------------------------------


def prepare(
    corpora: dict[str, Corpus],
    tokenizer: TokenizerConfig = TokenizerConfig(),
    data_dir: str = "data",
    retrain_tokenizer: bool = False,
    workers: int | None = None,
    cache_dir: str | None = None,
) -> dict[str, dict]:
    """Turn the configured corpora into a tokenizer and token shards under ``data_dir``.

    Args:
        corpora: Named corpora (``language``, ``code``, ``tools``...), each a list of sources.
        tokenizer: How the tokenizer is trained (or which existing one to copy), when ``data_dir`` has none.
        data_dir: Where the tokenizer, the shards and the caches go.
        retrain_tokenizer: Train a new tokenizer even though ``data_dir/tokenizer`` exists. This starts a new
            lineage: checkpoints trained on the old tokenizer no longer fit the data.
        workers: Processes that read sources in parallel (default: every core); the documents do not
            depend on it.
        cache_dir: Where the documents read from each source are cached (default ``<data_dir>/.cache``);
            data dirs made from the same sources (the full corpora and a budgeted cut of them) can share one.

    Returns:
        The manifest of every corpus, by name.
    """
    if not corpora:
        raise StagewiseError("the data config names no corpora; add at least one under `corpora:`")
    workers = workers or os.cpu_count() or 1
    for name, corpus in corpora.items():
        _check_corpus(name, corpus)
        for source in corpus.sources:
            source._workers = source._workers or workers
    try:
        return _prepare(corpora, tokenizer, Path(data_dir), retrain_tokenizer,
                        Path(cache_dir) if cache_dir else Path(data_dir) / ".cache", workers)
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise StagewiseError(
            f"the disk is full ({err.strerror or err}) while preparing {data_dir}/"
            f"{f' (writing {err.filename})' if err.filename else ''}. Nothing was changed: the data prepared "
            f"before and its manifests are as they were. Free some space (or set `data_dir` to a larger disk) "
            "and re-run `stagewise prepare`."
        ) from None


def _check_corpus(name: str, corpus: Corpus) -> None:
    fractions = (corpus.val_fraction, corpus.test_fraction, corpus.unseen_fraction)
    if any(not 0 <= f < 1 for f in fractions) or corpus.val_fraction + corpus.test_fraction >= 1:
        raise StagewiseError(
            f"corpus '{name}': val_fraction, test_fraction and unseen_fraction must each be in [0, 1) and val + test "
            f"below 1, got {fractions}; fix them in the data config"
        )
    if corpus.min_heldout_documents < 1:
        raise StagewiseError(
            f"corpus '{name}': min_heldout_documents must be at least 1 (every stage validates on every held-out "
            f"split), got {corpus.min_heldout_documents}"
        )
    if corpus.unseen_fraction and corpus.kind != "tools":
        raise StagewiseError(f"corpus '{name}': unseen_fraction holds out tool services; it needs kind: tools")
    names = [s.name for s in corpus.sources]
    if len(set(names)) != len(names):
        raise StagewiseError(f"corpus '{name}' has two sources with the same name; give each a `name:`")


def _prepare(corpora: dict[str, Corpus], tokenizer: TokenizerConfig, root: Path, retrain: bool,
             cache: Path, workers: int) -> dict[str, dict]:
    start = time.perf_counter()
    tok_dir = root / "tokenizer"
    plan = _tokenizer_plan(tokenizer, root, retrain)
    try:
        fingerprints = {
            name: {s.name: s.fingerprint() for s in corpus.sources} for name, corpus in corpora.items()
        }
    except MissingSourceError as err:
        manifests = None if plan != "reuse" else _prepared_as_configured(corpora, root)
        if manifests is None:
            raise MissingSourceError(
                f"{err} (and {root}/ holds no data prepared from this same config to use instead)"
            ) from None
        print_table(manifests, console)
        console.print(f"[green]data is up to date[/] in {root}/: the sources are not on this machine, but every "
                      "manifest matches this config (same sources, settings and tokenizer); using the shards as "
                      f"they are ({time.perf_counter() - start:.1f}s)")
        return manifests

    if plan == "reuse":  # fast path: nothing changed since the last run
        sha, template = tokenizer_sha256(tok_dir), chat_template_sha256(tok_dir)
        manifests = {n: _manifest_if_current(root / n, _corpus_keys(n, c, fingerprints[n], sha, template)[0])
                     for n, c in corpora.items()}
        if all(manifests.values()):
            print_table(manifests, console)
            console.print(f"[green]data is up to date[/] in {root}/ ({time.perf_counter() - start:.1f}s)")
            return manifests

    results: dict[str, list[SourceResult]] = {}
    splits: dict[str, dict[str, list[Document]]] = {}
    with _progress() as progress:
        for name, corpus in corpora.items():
            cache_dir = cache / "docs" / name
            results[name] = [
                _read_source(s, cache_dir, fingerprints[name][s.name], progress) for s in corpus.sources
            ]
            splits[name] = _split_corpus(name, corpus, results[name])
    staged_tok = None if plan == "reuse" else _stage_tokenizer(tokenizer, root, plan, splits, fingerprints)
    manifests, staged = {}, []
    try:
        use_dir = staged_tok or tok_dir
        tok = load_tokenizer(use_dir)
        sha, template = tokenizer_sha256(use_dir), chat_template_sha256(use_dir)
        if plan == "reuse":
            console.print(f"tokenizer: reusing {tok_dir} (sha256 {sha[:12]}…; --retrain_tokenizer true trains a new one)")
        with _progress() as progress:
            for name, corpus in corpora.items():
                keys = _corpus_keys(name, corpus, fingerprints[name], sha, template)
                current = _manifest_if_current(root / name, keys[0])
                if current:
                    console.print(f"{name}: shards up to date")
                    manifests[name] = current
                    continue
                staged.append(_write_shards(
                    name, corpus, root / name, splits[name], results[name], tok, use_dir, keys, workers, progress
                ))
                manifests[name] = staged[-1].manifest
    except BaseException:
        for corpus_files in staged:
            corpus_files.abort()
        if staged_tok:
            shutil.rmtree(staged_tok, ignore_errors=True)
        raise
    # Everything is written: publish the tokenizer and every corpus (renames only).
    if staged_tok:
        _publish_tokenizer(staged_tok, tok_dir)
        how = {"copy": f"copied from {tokenizer.from_dir}", "adopt": f"adopted from {tokenizer.from_model}",
               "template": "given the current chat template"}.get(plan, "trained")
        console.print(f"tokenizer {how}: {len(tok)} tokens, sha256 {sha[:12]}… -> {tok_dir}")
    for corpus_files in staged:
        corpus_files.publish()
    print_table(manifests, console)
    console.print(f"prepared {len(manifests)} corpora in {root}/ in {time.perf_counter() - start:.1f}s")
    return manifests


def _prepared_as_configured(corpora: dict[str, Corpus], root: Path) -> dict[str, dict] | None:
    """Every corpus's manifest, where each was prepared from this config with the data dir's tokenizer."""
    sha, template = tokenizer_sha256(root / "tokenizer"), chat_template_sha256(root / "tokenizer")
    manifests = {n: _manifest_if_current(root / n, _config_key(n, c, sha, template), "config_key")
                 for n, c in corpora.items()}
    return manifests if all(manifests.values()) else None


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console,
    )


def _config_key(name: str, corpus: Corpus, tok_sha: str, template_sha: str) -> str:
    """What the config says about a corpus (its sources' settings, fractions, budgets) and its tokenizer; a tool
    corpus's also the chat template it is rendered with."""
    return _sha(name, corpus.settings(), tok_sha, *([template_sha] if corpus.kind == "tools" else []))


def _corpus_keys(name: str, corpus: Corpus, fingerprints: dict[str, str], tok_sha: str,
                 template_sha: str) -> tuple[str, str]:
    """The key of a corpus's shards (its config, tokenizer and sources' fingerprints) and its config key."""
    config = _config_key(name, corpus, tok_sha, template_sha)
    return _sha(config, fingerprints), config


def print_table(manifests: dict[str, dict], out: Console) -> None:
    """The per-corpus, per-source table: documents, tokens, what was skipped and why."""
    table = Table(title="prepared corpora")
    for col in ("corpus", "source", "documents", "tokens", "train tokens", "val tokens", "test tokens",
                "unseen tokens", "skipped"):
        table.add_column(col, justify="left" if col in ("corpus", "source", "skipped") else "right")
    for name, m in manifests.items():
        for src, s in m["sources"].items():
            skipped = ", ".join(f"{k} {v:,}" for k, v in sorted(s.get("skipped", {}).items())) or "-"
            table.add_row(name, src, f"{s['documents']:,}", f"{s['tokens']:,}", "", "", "", "", skipped)
        t = m["tokens"]
        table.add_row(
            f"[bold]{name}[/]", "[bold]all[/]", f"{sum(m['documents'].values()):,}", f"{sum(t.values()):,}",
            *(f"{t[s]:,}" if s in t else "-" for s in (*SPLITS, UNSEEN)), "", end_section=True,
        )
    out.print(table)


def main(args: list[str] | None = None) -> None:
    """Entry point of ``stagewise prepare -c configs/data/<name>.yaml``."""
    from datamodules.command import run_function

    run_function(prepare, args, "stagewise prepare")
