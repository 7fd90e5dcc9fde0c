"""Token shards: flat memory-mapped token ids per split, document offsets, an optional loss mask, a manifest.

Layout of ``data/<corpus>/``::

    <split>.bin        token ids, uint16 if the vocabulary fits, else uint32
    <split>.idx.npy    int64 document offsets into <split>.bin (n_docs + 1 entries, starting at 0)
    <split>.mask.bin   uint8 loss mask, one per token (tool corpora only)
    <split>.jsonl      each document's text, one line per document in shard order (tool corpora only: the
                       examples as JSON, for what needs them unrendered, e.g. ``stagewise pairs``)
    manifest.json      counts, sources, tokenizer sha256, dtype, kind, config (written last)

Every file is written to ``<file>.tmp`` and renamed into place, so an interrupted run leaves the previous
shards intact, never half-written ones. :func:`atomic_path` does the same for any one file (checkpoints,
stage records, caches).
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from datamodules.errors import StagewiseError, TokenizerMismatchError

PREPARE_HINT = "run `stagewise prepare -c configs/data/demo.yaml` (or your data config) first"


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


class ShardWriter:
    """Appends documents to one split's shard files, buffering ``chunk_tokens`` tokens in memory between writes.

    Use as a context manager, or call :meth:`close` to publish the files (:meth:`abort` to drop them).

    Args:
        corpus_dir: The corpus directory (created if missing).
        split: ``train``, ``val`` or ``test``.
        dtype: ``uint16`` or ``uint32``: the token id type of the ``.bin`` file.
        with_mask: Also write a uint8 loss mask per token (tool corpora).
        with_documents: Also keep each document's text as one line of ``<split>.jsonl`` (tool corpora).
        chunk_tokens: Tokens buffered in memory before a write to disk.
    """

    def __init__(self, corpus_dir: str | Path, split: str, dtype: str = "uint16", with_mask: bool = False,
                 with_documents: bool = False, chunk_tokens: int = 1 << 22):
        self.dir = Path(corpus_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.split = split
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.uint16, np.uint32):
            raise ValueError(f"shard dtype must be uint16 or uint32, not {dtype}")
        self.with_mask = with_mask
        self.chunk_tokens = chunk_tokens
        self.final = {"tokens": self.dir / f"{split}.bin", "offsets": self.dir / f"{split}.idx.npy"}
        if with_mask:
            self.final["mask"] = self.dir / f"{split}.mask.bin"
        if with_documents:
            self.final["documents"] = self.dir / f"{split}.jsonl"
        self._tokens_file = open(_tmp(self.final["tokens"]), "wb")
        self._mask_file = open(_tmp(self.final["mask"]), "wb") if with_mask else None
        self._documents_file = open(_tmp(self.final["documents"]), "w", encoding="utf-8") if with_documents else None
        self._buffer: list[np.ndarray] = []
        self._mask_buffer: list[np.ndarray] = []
        self._buffered = 0
        self._offsets = [0]
        self._finished = False
        self._closed = False

    @property
    def tokens(self) -> int:
        """Tokens added so far."""
        return self._offsets[-1]

    @property
    def documents(self) -> int:
        """Documents added so far."""
        return len(self._offsets) - 1

    def add(self, ids, mask=None, text: str | None = None) -> None:
        """Append one document's token ids (and, for a masked shard, its 0/1 loss mask of the same length;
        with ``with_documents``, its one-line ``text``)."""
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"token id {arr.max()} does not fit the shard dtype {self.dtype}")
        if self.with_mask:
            if mask is None or len(mask) != len(arr):
                raise ValueError(f"a masked shard needs a mask of {len(arr)} entries per document")
            self._mask_buffer.append(np.asarray(mask, dtype=np.uint8))
        elif mask is not None:
            raise ValueError("this shard has no mask; create the writer with with_mask=True")
        if self._documents_file is not None:
            if text is None or "\n" in text:
                raise ValueError("a writer with_documents needs each document's text, on one line")
            self._documents_file.write(text + "\n")
        self._buffer.append(arr.astype(self.dtype))
        self._buffered += len(arr)
        self._offsets.append(self._offsets[-1] + len(arr))
        if self._buffered >= self.chunk_tokens:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            self._tokens_file.write(np.concatenate(self._buffer).tobytes())
        if self._mask_buffer:
            self._mask_file.write(np.concatenate(self._mask_buffer).tobytes())
        self._buffer, self._mask_buffer, self._buffered = [], [], 0

    def finish(self) -> None:
        """Write what is buffered and the document index to the temporary files, without publishing them
        (:meth:`close` then only renames, so several writers can be published together)."""
        if self._finished:
            return
        self._flush()
        self._tokens_file.close()
        for file in (self._mask_file, self._documents_file):
            if file:
                file.close()
        with open(_tmp(self.final["offsets"]), "wb") as f:
            np.save(f, np.asarray(self._offsets, dtype=np.int64))
        self._finished = True

    def close(self) -> None:
        """Write what is buffered and move the files into place."""
        if self._closed:
            return
        self.finish()
        for path in self.final.values():
            os.replace(_tmp(path), path)
        self._closed = True

    def abort(self) -> None:
        """Drop the temporary files; the split's previous files (if any) stay as they were."""
        if self._closed:
            return
        for file in (self._tokens_file, self._mask_file, self._documents_file):
            try:
                if file:
                    file.close()
            except OSError:  # flushing the buffer fails again on a full disk; the file is closed anyway
                pass
        for path in self.final.values():
            _tmp(path).unlink(missing_ok=True)
        self._closed = True

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


@dataclass
class Split:
    """One split of a corpus, memory-mapped: ``tokens`` (flat ids), ``offsets`` (n_docs + 1), ``mask`` or None."""

    tokens: np.ndarray
    offsets: np.ndarray
    mask: np.ndarray | None = None

    @property
    def documents(self) -> int:
        """Number of documents in the split."""
        return len(self.offsets) - 1


def _memmap(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    size = path.stat().st_size
    if size != count * dtype.itemsize:
        raise StagewiseError(
            f"{path} holds {size} bytes but its index says {count} {dtype} entries: the shard is damaged or from "
            f"another run; {PREPARE_HINT}"
        )
    if count == 0:  # an empty file cannot be memory-mapped
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


def open_split(corpus_dir: str | Path, split: str) -> Split:
    """Memory-map ``<corpus_dir>/<split>.*``, checking that the files agree in size.

    The dtype comes from the manifest when there is one, else from the file size.
    """
    corpus_dir = Path(corpus_dir)
    tokens_path, idx_path = corpus_dir / f"{split}.bin", corpus_dir / f"{split}.idx.npy"
    if not tokens_path.exists() or not idx_path.exists():
        raise StagewiseError(f"no '{split}' shard in {corpus_dir}; {PREPARE_HINT}")
    offsets = np.load(idx_path, mmap_mode="r")
    n = int(offsets[-1]) if len(offsets) else -1
    if n < 0 or offsets[0] != 0:
        raise StagewiseError(f"{idx_path} is not a document index; {PREPARE_HINT}")
    manifest_path = corpus_dir / "manifest.json"
    if manifest_path.exists():
        dtype = np.dtype(json.loads(manifest_path.read_text())["dtype"])
    else:
        dtype = np.dtype(np.uint32 if n and tokens_path.stat().st_size == 4 * n else np.uint16)
    tokens = _memmap(tokens_path, dtype, n)
    mask_path = corpus_dir / f"{split}.mask.bin"
    mask = _memmap(mask_path, np.dtype(np.uint8), n) if mask_path.exists() else None
    return Split(tokens, offsets, mask)


def stage_manifest(corpus_dir: str | Path, manifest: dict) -> Path:
    """Write ``manifest.json.tmp`` (removed again if that fails) and return its path; ``os.replace`` it onto
    ``manifest.json`` to publish, after the shards (``prepare`` publishes all corpora together)."""
    tmp = _tmp(Path(corpus_dir) / "manifest.json")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


@contextmanager
def atomic_path(path: str | Path, durable: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` to write; on success it is renamed into place (atomic within one
    directory: readers see the old file or the new one, never half of one), on any error it is removed.
    ``durable`` also fsyncs the file before the rename and the directory after it (checkpoints)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(path.parent)


def replace_dir(tmp: str | Path, path: str | Path) -> None:
    """Put directory ``tmp`` in the place of ``path``: the old one is moved aside first (``<path>.old``) and then
    removed, so ``path`` is always one whole directory, the old or the new."""
    tmp, path = Path(tmp), Path(path)
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """A temporary directory beside ``path`` to fill; on success it replaces ``path`` whole (:func:`replace_dir`),
    on any error (a signal included) it is removed and ``path`` stays as it was."""
    path = Path(path).absolute()  # "." has no name to put a temporary one beside
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_dir(directory: Path) -> None:
    """Persist a rename: fsync the directory entry (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_manifest(corpus_dir: str | Path, manifest: dict) -> None:
    """Write ``manifest.json`` atomically; call it after every shard is in place."""
    os.replace(stage_manifest(corpus_dir, manifest), Path(corpus_dir) / "manifest.json")


def read_manifest(corpus_dir: str | Path) -> dict:
    """The corpus manifest; StagewiseError telling the user to run ``stagewise prepare`` if it is absent."""
    path = Path(corpus_dir) / "manifest.json"
    if not path.exists():
        raise StagewiseError(f"no prepared data in {Path(corpus_dir)}/ (missing manifest.json): {PREPARE_HINT}")
    return json.loads(path.read_text())


def check_tokenizer(manifest: dict, expected_sha: str, corpus_dir: str | Path, template_sha: str | None = None) -> None:
    """Raise TokenizerMismatchError unless the corpus was tokenized with the tokenizer of sha256 ``expected_sha``
    and, where the manifest records one (tool corpora), rendered with the chat template of sha256 ``template_sha``."""
    found = manifest.get("tokenizer_sha256")
    rendered = manifest.get("chat_template_sha256")
    if template_sha and rendered and rendered != template_sha:
        raise TokenizerMismatchError(
            f"{corpus_dir} was rendered with chat template {rendered[:12]}… but the tokenizer's is "
            f"{template_sha[:12]}…; re-run `stagewise prepare` on the same data config (it re-renders the tool "
            "examples, the vocabulary stays)"
        )
    if found != expected_sha:
        raise TokenizerMismatchError(
            f"{corpus_dir} was tokenized with tokenizer {str(found)[:12]}… but {expected_sha[:12]}… is expected "
            "(the training corpus / model uses it); re-run `stagewise prepare` on the same data config so every "
            "corpus shares one tokenizer"
        )
