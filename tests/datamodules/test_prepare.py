"""`stagewise prepare` end to end on tiny corpora: manifests, caching, stable splits, clear errors."""

import json
import os
import random
from pathlib import Path

import pytest
import yaml

import datamodules.prepare as prepare_mod
from datamodules.prepare import split_of
from datamodules.tokenizer import tokenizer_sha256
from lightning_modules.cli import main

WORDS = (
    "the a river stone light quick brown fox jumps over lazy dog morning evening city market bread water "
    "kernel memory page driver module python function return value list dict string number green blue "
    "winter summer people house window garden music letter night sleep dream king queen sword castle"
).split()
CODE = [
    "def add{i}(a, b):\n    return a + b * {i}\n",
    "for x in range({i}):\n    print(x, 'item', x ** 2)\n",
    "class Point{i}:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y + {i}\n",
    "func main() {{\n\tfmt.Println(\"hello {i}\")\n}}\n",
    "fn square(x: i32) -> i32 {{\n    x * x + {i}\n}}\n",
]
CITIES = ["Oslo", "Lima", "Paris", "Tokyo", "Cairo", "Quito", "Rome", "Delhi", "Seoul", "Berlin", "Accra", "Hanoi"]
TOOL = {"name": "get_weather", "description": "Current weather for a city.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city"], "additionalProperties": False}}


def tool_example(city: str, unit: str = "celsius") -> dict:
    return {"messages": [{"role": "user", "content": f"What is the weather in {city} in {unit}?"}],
            "tools": [TOOL], "tool_calls": [{"name": "get_weather", "arguments": {"city": city, "unit": unit}}]}


def make_sources(root: Path) -> None:
    rng = random.Random(0)
    (root / "text").mkdir(parents=True)
    for i in range(30):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))).capitalize() + "." for _ in range(4)]
        (root / "text" / f"doc{i:02d}.txt").write_text("\n".join(lines) + "\n")
    (root / "code").mkdir()
    for i in range(25):
        (root / "code" / f"snippet{i:02d}.txt").write_text(CODE[i % len(CODE)].format(i=i))
    (root / "tools.jsonl").write_text(
        "\n".join(json.dumps(tool_example(c, u)) for c in CITIES for u in ("celsius", "fahrenheit")) + "\n"
    )


def write_config(root: Path, **extra) -> Path:
    cfg = {
        "data_dir": str(root / "data"),
        "tokenizer": {"vocab_size": 320, "sample_bytes": 20000},
        "corpora": {
            "language": {"sources": [{"class_path": "datamodules.sources.TextFiles",
                                      "init_args": {"paths": ["*.txt"], "root": str(root / "text"), "name": "prose"}}]},
            "code": {"val_fraction": 0.1, "test_fraction": 0.1,
                     "sources": [{"class_path": "datamodules.sources.TextFiles",
                                  "init_args": {"paths": ["*.txt"], "root": str(root / "code"), "name": "snippets"}}]},
            "tools": {"kind": "tools", "sources": [{"class_path": "datamodules.tool_examples.ToolJsonl",
                                                     "init_args": {"paths": [str(root / "tools.jsonl")]}}]},
        },
    }
    cfg.update(extra)
    path = root / "data.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_prepare(cfg: Path) -> None:
    main(["prepare", "-c", str(cfg)])


def manifest(root: Path, corpus: str) -> dict:
    return json.loads((root / "data" / corpus / "manifest.json").read_text())


def snapshot(data: Path) -> dict[str, bytes]:
    return {str(p.relative_to(data)): p.read_bytes() for p in sorted(data.rglob("*")) if p.is_file()}


@pytest.fixture
def prepared(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_sources(tmp_path)
    cfg = write_config(tmp_path)
    run_prepare(cfg)
    return tmp_path, cfg


def test_prepare_writes_manifests_shards_and_tokenizer(prepared):
    root, _ = prepared
    sha = tokenizer_sha256(root / "data" / "tokenizer")
    for corpus, n_docs in (("language", 30), ("code", 25), ("tools", 24)):
        m = manifest(root, corpus)
        assert m["tokenizer_sha256"] == sha
        assert sum(m["documents"].values()) == n_docs
        assert m["tokens"]["train"] > 0 and set(m["tokens"]) == {"train", "val", "test"}
        for split in ("train", "val", "test"):
            size = (root / "data" / corpus / f"{split}.bin").stat().st_size
            assert size == m["tokens"][split] * (2 if m["dtype"] == "uint16" else 4)
    assert manifest(root, "tools")["kind"] == "tools"
    assert any((root / "data" / "tools").glob("train*mask*"))
    assert not any((root / "data" / "language").glob("*mask*") or (root / "data" / "language").glob("*.jsonl"))


def test_tool_corpus_keeps_its_examples_beside_the_shards(prepared):
    from datamodules.tool_examples import prepared_examples

    root, cfg = prepared
    written = [tool_example(c, u) for c in CITIES for u in ("celsius", "fahrenheit")]
    kept = [e for split in ("train", "val", "test") for e in prepared_examples(root / "data" / "tools", split)]
    assert sorted(map(json.dumps, kept)) == sorted(json.dumps(e, sort_keys=True) for e in written)
    (root / "data" / "tools" / "val.jsonl").unlink()  # data prepared before they were kept: rebuilt
    run_prepare(cfg)
    assert len(prepared_examples(root / "data" / "tools", "val")) == manifest(root, "tools")["documents"]["val"]


def test_second_run_is_up_to_date_and_touches_nothing(prepared, capsys):
    root, cfg = prepared
    shards = sorted((root / "data").glob("*/*.bin"))
    mtimes = [p.stat().st_mtime_ns for p in shards]
    capsys.readouterr()
    run_prepare(cfg)
    assert "up to date" in capsys.readouterr().err
    assert [p.stat().st_mtime_ns for p in shards] == mtimes


def test_changed_source_file_rebuilds(prepared):
    root, cfg = prepared
    key = manifest(root, "language")["key"]
    path = root / "text" / "doc03.txt"
    path.write_text("An entirely new first line about castles.\n" + path.read_text())
    run_prepare(cfg)
    assert manifest(root, "language")["key"] != key


def test_splits_are_stable_and_independent_of_other_documents(prepared):
    root, cfg = prepared
    texts = [f"document number {i} about rivers" for i in range(200)]
    first = [split_of(t, 0.1, 0.1) for t in texts]
    assert first == [split_of(t, 0.1, 0.1) for t in texts]
    assert {"train", "val", "test"} <= set(first)

    def splits_by_path():
        docs = {}
        for line in (root / "data" / ".cache" / "docs" / "code").glob("*.jsonl").__next__().read_text().splitlines()[1:]:
            d = json.loads(line)
            docs[d["path"]] = split_of(d["text"], 0.1, 0.1)
        return docs

    before, m_before = splits_by_path(), manifest(root, "code")
    (root / "code" / "snippet99.txt").write_text("def brand_new():\n    return 'brand new'\n")
    (root / "code" / "snippet98.txt").write_text((root / "code" / "snippet00.txt").read_text())  # duplicate
    run_prepare(cfg)
    after, m_after = splits_by_path(), manifest(root, "code")
    assert {p: after[p] for p in before} == before
    assert m_after["sources"]["snippets"]["skipped"].get("duplicate") == 1
    assert sum(m_after["documents"].values()) == sum(m_before["documents"].values()) + 1


def expect_error(cfg: Path, capsys, *fragments: str) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_prepare(cfg)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_missing_source_root(prepared, capsys):
    root, _ = prepared
    before = snapshot(root / "data")
    cfg = write_config(root)
    data = yaml.safe_load(cfg.read_text())
    data["corpora"]["language"]["sources"][0]["init_args"]["root"] = str(root / "nowhere")
    cfg.write_text(yaml.safe_dump(data))
    expect_error(cfg, capsys, "prose", "Check `paths` and `root`")
    assert snapshot(root / "data") == before


def test_corpus_empty_after_cleaning_names_the_corpus(prepared, capsys):
    root, cfg = prepared
    before = snapshot(root / "data")
    for p in (root / "code").glob("*.txt"):
        p.write_text("   \n")
    expect_error(cfg, capsys, "corpus 'code' is empty after cleaning", "empty")
    assert {k: v for k, v in snapshot(root / "data").items() if not k.startswith(".cache")} == {
        k: v for k, v in before.items() if not k.startswith(".cache")
    }


def test_malformed_jsonl_line_names_file_and_line(prepared, capsys):
    root, cfg = prepared
    before = snapshot(root / "data")
    path = root / "tools.jsonl"
    path.write_text(path.read_text() + "{not json\n")
    expect_error(cfg, capsys, f"{path}:25", "not valid JSON")
    assert snapshot(root / "data") == before


def test_tool_call_not_matching_its_schema(prepared, capsys):
    root, cfg = prepared
    before = snapshot(root / "data")
    bad = tool_example("Oslo")
    bad["tool_calls"][0]["arguments"] = {"city": "Oslo", "unit": "kelvin"}
    path = root / "tools.jsonl"
    path.write_text(json.dumps(bad) + "\n" + path.read_text())
    expect_error(cfg, capsys, f"{path}:1", "do not match its schema")
    assert snapshot(root / "data") == before


def test_unknown_config_key_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_sources(tmp_path)
    cfg = write_config(tmp_path, bogus_key=1)
    expect_error(cfg, capsys, "bogus_key")
    assert not (tmp_path / "data").exists()


def test_non_utf8_file_is_skipped_and_counted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_sources(tmp_path)
    (tmp_path / "text" / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1"))
    run_prepare(write_config(tmp_path))
    m = manifest(tmp_path, "language")
    assert m["sources"]["prose"]["skipped"] == {"non_utf8": 1}
    assert sum(m["documents"].values()) == 30


def test_failure_while_writing_shards_keeps_previous_corpus(prepared, monkeypatch):
    root, cfg = prepared
    before = snapshot(root / "data" / "tools")
    real = prepare_mod.render_tool_example
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(prepare_mod, "render_tool_example", flaky)
    path = root / "tools.jsonl"
    path.write_text(path.read_text() + json.dumps(tool_example("Lagos")) + "\n")
    with pytest.raises(RuntimeError, match="disk full"):
        run_prepare(cfg)
    assert snapshot(root / "data" / "tools") == before
