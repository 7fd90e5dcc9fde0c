"""`stagewise prepare`: corpora -> documents -> tokenizer -> token shards.

Each step is cached by a key over everything it depends on, so a second run with the same config
and sources does nothing, and a changed source or config rebuilds only what depends on it:

    source fingerprint ──> documents cache (data/.cache/docs/<corpus>/<source>-<key>.jsonl)
    tokenizer config + every source fingerprint ──> data/tokenizer/ (its sha256 feeds the next key)
    tokenizer sha256 + corpus config + its sources ──> data/<corpus>/{train,val,test}.bin + manifest.json

Pin a tokenizer with `tokenizer.from_dir` to keep it fixed while sources change.

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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Literal

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from datamodules.errors import StagewiseError
from datamodules.shards import ShardWriter, atomic_path, stage_manifest
from datamodules.sources import Document, Source, SourceStats
from datamodules.tokenizer import (
    encode_document,
    load_tokenizer,
    render_tool_example,
    tokenizer_sha256,
    train_tokenizer,
)

SPLITS = ("train", "val", "test")
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
    """

    sources: list[Source]
    kind: Literal["text", "tools"] = "text"
    val_fraction: float = 0.01
    test_fraction: float = 0.01


@dataclass
class TokenizerConfig:
    """How the byte-level BPE tokenizer is made.

    Args:
        vocab_size: Vocabulary size, special tokens included (8192 for the demo; 32768 for real runs).
        sample_bytes: Bytes of training text sampled for BPE training, split evenly over the corpora.
        from_dir: Use this existing tokenizer directory instead of training one.
    """

    vocab_size: int = 32768
    sample_bytes: int = 40_000_000
    from_dir: str | None = None


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


def split_of(text: str, val_fraction: float, test_fraction: float) -> str:
    """The split a document belongs to, from a stable hash of its text: re-runs never move it."""
    u = int(hashlib.sha256(text.encode()).hexdigest()[:15], 16) / 16**15
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def _source_config(source: Source) -> dict:
    return {"class": f"{type(source).__module__}.{type(source).__qualname__}", "name": source.name}


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
    """Exact deduplication (first occurrence wins) and the stable hash split."""
    seen: set[str] = set()
    splits: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for result in results:
        for doc in result.documents:
            digest = hashlib.sha256(doc.text.encode()).hexdigest()
            if digest in seen:
                result.stats.skipped["duplicate"] += 1
                continue
            seen.add(digest)
            splits[split_of(doc.text, corpus.val_fraction, corpus.test_fraction)].append(doc)
    if not splits["train"]:
        skipped = ", ".join(f"{r.name}: {dict(r.stats.skipped) or 'nothing skipped'}" for r in results)
        raise StagewiseError(
            f"corpus '{name}' is empty after cleaning ({skipped}). Check its sources' paths and filters "
            "in the data config."
        )
    return splits


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


def _ensure_tokenizer(cfg: TokenizerConfig, data_dir: Path, key: str, splits) -> tuple[Path, bool]:
    """The tokenizer directory to use, and whether it was just trained: then it is ``tokenizer.tmp``, which
    :func:`_publish_tokenizer` moves into place once the shards are written."""
    if cfg.from_dir:
        load_tokenizer(cfg.from_dir)  # fails clearly if it lacks the reserved tokens
        return Path(cfg.from_dir), False
    out = data_dir / "tokenizer"
    key_file = out / "stagewise_key.txt"
    if key_file.exists() and key_file.read_text() == key:
        return out, False
    with console.status(f"training a {cfg.vocab_size}-token byte-level BPE tokenizer"):
        tmp = data_dir / "tokenizer.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            train_tokenizer(_tokenizer_sample(splits, cfg.sample_bytes), cfg.vocab_size, tmp)
            (tmp / "stagewise_key.txt").write_text(key)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return tmp, True


def _publish_tokenizer(tmp: Path, out: Path) -> None:
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


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


def _write_shards(name, corpus, corpus_dir, splits, results, tok, tok_sha, key, progress) -> StagedCorpus:
    dtype = "uint16" if len(tok) <= 65535 else "uint32"
    tools = corpus.kind == "tools"
    tokens: dict[str, int] = {}
    per_source = {r.name: {"documents": 0, "tokens": 0} for r in results}
    total = sum(len(v) for v in splits.values())
    task = progress.add_task(f"tokenize {name}", total=total)
    staged = StagedCorpus(corpus_dir, {})
    try:
        for split in SPLITS:
            writer = ShardWriter(corpus_dir, split, dtype, with_mask=tools, with_documents=tools)
            staged.writers.append(writer)
            for batch in _batched(splits[split], 256):
                if tools:
                    encoded = [render_tool_example(tok, json.loads(d.text)) for d in batch]
                else:
                    encoded = [(ids, None) for ids in encode_document(tok, [d.text for d in batch])]
                for doc, (ids, mask) in zip(batch, encoded):
                    writer.add(ids, mask, doc.text if tools else None)
                    per_source[doc.source]["documents"] += 1
                    per_source[doc.source]["tokens"] += len(ids)
                progress.advance(task, len(batch))
            writer.finish()
            tokens[split] = writer.tokens
        for r in results:
            per_source[r.name].update(read=r.stats.documents, bytes=r.stats.bytes, skipped=dict(r.stats.skipped))
        staged.manifest = {
            "corpus": name,
            "kind": corpus.kind,
            "dtype": dtype,
            "tokens": tokens,
            "documents": {s: len(splits[s]) for s in SPLITS},
            "sources": per_source,
            "tokenizer_sha256": tok_sha,
            "key": key,
            "config": {
                "kind": corpus.kind,
                "val_fraction": corpus.val_fraction,
                "test_fraction": corpus.test_fraction,
                "sources": [_source_config(s) for s in corpus.sources],
            },
        }
        staged.manifest_tmp = stage_manifest(corpus_dir, staged.manifest)
    except BaseException:
        staged.abort()
        raise
    return staged


def _manifest_if_current(corpus_dir: Path, key: str) -> dict | None:
    path = corpus_dir / "manifest.json"
    if not path.exists():
        return None
    manifest = json.loads(path.read_text())
    files = [corpus_dir / f"{s}.bin" for s in SPLITS]
    if manifest.get("kind") == "tools":  # tool corpora keep their examples as JSONL (since `stagewise pairs`)
        files += [corpus_dir / f"{s}.jsonl" for s in SPLITS]
    return manifest if manifest.get("key") == key and all(f.exists() for f in files) else None


# --- the command -------------------------------------------------------------------------------


def prepare(
    corpora: dict[str, Corpus],
    tokenizer: TokenizerConfig = TokenizerConfig(),
    data_dir: str = "data",
) -> dict[str, dict]:
    """Turn the configured corpora into a tokenizer and token shards under ``data_dir``.

    Args:
        corpora: Named corpora (``language``, ``code``, ``tools``...), each a list of sources.
        tokenizer: How the tokenizer is trained (or which existing one to use).
        data_dir: Where the tokenizer, the shards and the caches go.

    Returns:
        The manifest of every corpus, by name.
    """
    if not corpora:
        raise StagewiseError("the data config names no corpora; add at least one under `corpora:`")
    try:
        return _prepare(corpora, tokenizer, Path(data_dir))
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise StagewiseError(
            f"the disk is full ({err.strerror or err}) while preparing {data_dir}/"
            f"{f' (writing {err.filename})' if err.filename else ''}. Nothing was changed: the data prepared "
            f"before and its manifests are as they were. Free some space (or set `data_dir` to a larger disk) "
            "and re-run `stagewise prepare`."
        ) from None


def _prepare(corpora: dict[str, Corpus], tokenizer: TokenizerConfig, root: Path) -> dict[str, dict]:
    start = time.perf_counter()
    fingerprints = {
        name: {s.name: s.fingerprint() for s in corpus.sources} for name, corpus in corpora.items()
    }
    for name, corpus in corpora.items():
        if len(fingerprints[name]) != len(corpus.sources):
            raise StagewiseError(f"corpus '{name}' has two sources with the same name; give each a `name:`")
    tok_key = _sha(asdict(tokenizer), fingerprints, {n: asdict(c) | {"sources": None} for n, c in corpora.items()})

    # Fast path: nothing changed since the last run.
    tok_dir = Path(tokenizer.from_dir) if tokenizer.from_dir else root / "tokenizer"
    key_file = tok_dir / "stagewise_key.txt"
    if tokenizer.from_dir or (key_file.exists() and key_file.read_text() == tok_key):
        if (tok_dir / "tokenizer.json").exists():
            sha = tokenizer_sha256(tok_dir)
            manifests = {
                n: _manifest_if_current(root / n, _corpus_key(n, c, fingerprints[n], sha))
                for n, c in corpora.items()
            }
            if all(manifests.values()):
                print_table(manifests, console)
                console.print(f"[green]data is up to date[/] in {root}/ ({time.perf_counter() - start:.1f}s)")
                return manifests

    results: dict[str, list[SourceResult]] = {}
    splits: dict[str, dict[str, list[Document]]] = {}
    with _progress() as progress:
        for name, corpus in corpora.items():
            cache_dir = root / ".cache" / "docs" / name
            results[name] = [
                _read_source(s, cache_dir, fingerprints[name][s.name], progress) for s in corpus.sources
            ]
            splits[name] = _split_corpus(name, corpus, results[name])
    tok_dir, trained = _ensure_tokenizer(tokenizer, root, tok_key, splits)
    manifests, staged = {}, []
    try:
        tok = load_tokenizer(tok_dir)
        sha = tokenizer_sha256(tok_dir)
        with _progress() as progress:
            for name, corpus in corpora.items():
                key = _corpus_key(name, corpus, fingerprints[name], sha)
                current = _manifest_if_current(root / name, key)
                if current:
                    console.print(f"{name}: shards up to date")
                    manifests[name] = current
                    continue
                staged.append(_write_shards(
                    name, corpus, root / name, splits[name], results[name], tok, sha, key, progress
                ))
                manifests[name] = staged[-1].manifest
    except BaseException:
        for corpus_files in staged:
            corpus_files.abort()
        if trained:
            shutil.rmtree(tok_dir, ignore_errors=True)
        raise
    # Everything is written: publish the tokenizer and every corpus (renames only).
    if trained:
        _publish_tokenizer(tok_dir, root / "tokenizer")
        console.print(f"tokenizer trained: {len(tok)} tokens, sha256 {sha[:12]}… -> {root / 'tokenizer'}")
    for corpus_files in staged:
        corpus_files.publish()
    print_table(manifests, console)
    console.print(f"prepared {len(manifests)} corpora in {root}/ in {time.perf_counter() - start:.1f}s")
    return manifests


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console,
    )


def _corpus_key(name: str, corpus: Corpus, fingerprints: dict[str, str], tok_sha: str) -> str:
    config = {"kind": corpus.kind, "val": corpus.val_fraction, "test": corpus.test_fraction}
    return _sha(name, config, fingerprints, tok_sha)


def print_table(manifests: dict[str, dict], out: Console) -> None:
    """The per-corpus, per-source table: documents, tokens, what was skipped and why."""
    table = Table(title="prepared corpora")
    for col in ("corpus", "source", "documents", "tokens", "train tokens", "val tokens", "test tokens", "skipped"):
        table.add_column(col, justify="left" if col in ("corpus", "source", "skipped") else "right")
    for name, m in manifests.items():
        for src, s in m["sources"].items():
            skipped = ", ".join(f"{k} {v:,}" for k, v in sorted(s.get("skipped", {}).items())) or "-"
            table.add_row(name, src, f"{s['documents']:,}", f"{s['tokens']:,}", "", "", "", skipped)
        t = m["tokens"]
        table.add_row(
            f"[bold]{name}[/]", "[bold]all[/]", f"{sum(m['documents'].values()):,}", f"{sum(t.values()):,}",
            f"{t['train']:,}", f"{t['val']:,}", f"{t['test']:,}", "", end_section=True,
        )
    out.print(table)


def main(args: list[str] | None = None) -> None:
    """Entry point of ``stagewise prepare -c configs/data/<name>.yaml``."""
    from datamodules.command import run_function

    run_function(prepare, args, "stagewise prepare")
