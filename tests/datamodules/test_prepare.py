"""`stagewise prepare` end to end on tiny corpora: manifests, caching, stable splits, clear errors."""

import json
import random
import shutil
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


# ------------------------------------------------------------------ one tokenizer for a lineage


def set_config(cfg: Path, change) -> None:
    data = yaml.safe_load(cfg.read_text())
    change(data)
    cfg.write_text(yaml.safe_dump(data))


def test_changed_sources_and_fractions_never_retrain_the_tokenizer(prepared, capsys):
    """Adding files to a corpus and changing its fractions rebuilds documents and shards, not the lineage's
    tokenizer (it used to retrain silently, which made every earlier checkpoint useless for the next stage)."""
    root, cfg = prepared
    tok = root / "data" / "tokenizer" / "tokenizer.json"
    sha, mtime, key = tokenizer_sha256(tok.parent), tok.stat().st_mtime_ns, manifest(root, "code")["key"]
    for i in range(19):
        (root / "code" / f"extra{i:02d}.txt").write_text(f"def extra_{i}(x):\n    return x * {i} + {i}\n")
    set_config(cfg, lambda d: d["corpora"]["code"].update(val_fraction=0.2))
    capsys.readouterr()
    run_prepare(cfg)
    assert "reusing" in capsys.readouterr().err
    m = manifest(root, "code")
    assert m["key"] != key and sum(m["documents"].values()) == 25 + 19
    assert (tokenizer_sha256(tok.parent), tok.stat().st_mtime_ns) == (sha, mtime)
    assert all(manifest(root, c)["tokenizer_sha256"] == sha for c in ("language", "code", "tools"))

    main(["prepare", "-c", str(cfg), "--retrain_tokenizer", "true"])  # explicit: a new lineage
    assert tok.stat().st_mtime_ns != mtime and "tokenizer trained" in capsys.readouterr().err
    assert manifest(root, "code")["tokenizer_sha256"] == tokenizer_sha256(tok.parent)


def test_another_vocab_size_is_refused_without_retrain(prepared, capsys):
    root, cfg = prepared
    before = snapshot(root / "data")
    set_config(cfg, lambda d: d["tokenizer"].update(vocab_size=512))
    expect_error(cfg, capsys, "320-token tokenizer", "vocab_size 512", "--retrain_tokenizer true")
    assert snapshot(root / "data") == before


def stage_argv(stage: str, data_dir: str, *extra: str) -> list[str]:
    repo = Path(__file__).resolve().parents[2]
    return ["fit", "-c", str(repo / "configs" / "stages" / f"{stage}.yaml"), "-c", str(repo / "configs" / "model" / "tiny.yaml"),
            "--data.init_args.data_dir", data_dir, "--data.init_args.seq_len", "16", "--data.init_args.batch_size", "2",
            "--trainer.max_steps", "1", "--trainer.val_check_interval", "1", "--trainer.limit_val_batches", "1",
            "--trainer.accelerator", "cpu", "--trainer.logger.init_args.save_dir", "runs", *extra]


def test_a_corpus_pinned_to_the_first_corpus_tokenizer_continues_its_checkpoint(prepared, capsys):
    """The code corpus prepared later into another data dir with `tokenizer.from_dir` gets the first data dir's
    tokenizer written into it (and where it came from recorded), so a stage on it starts from the first
    corpus's checkpoint; without the pin, the new data dir's own tokenizer is refused."""
    root, _ = prepared
    main(stage_argv("language", "data"))
    parent = "models/default/language_model_best.ckpt"
    (root / "more_code").mkdir()
    for i in range(20):
        (root / "more_code" / f"m{i:02d}.txt").write_text(f"while n > {i}:\n    n = n // 2 + {i}\n    print(n)\n")

    def later_config(path: str, **tokenizer) -> Path:
        cfg = {"data_dir": path, "tokenizer": {"vocab_size": 320, "sample_bytes": 20000, **tokenizer},
               "corpora": {"code": {"val_fraction": 0.2, "test_fraction": 0.1, "sources": [{
                   "class_path": "datamodules.sources.TextFiles",
                   "init_args": {"paths": ["*.txt"], "root": str(root / "more_code")}}]}}}
        out = root / f"{Path(path).name}.yaml"
        out.write_text(yaml.safe_dump(cfg))
        return out

    run_prepare(later_config("data_code", from_dir="data/tokenizer"))
    pinned = root / "data_code" / "tokenizer"
    assert tokenizer_sha256(pinned) == tokenizer_sha256(root / "data" / "tokenizer")
    assert json.loads((pinned / "stagewise_tokenizer.json").read_text())["from_dir"] == str(root / "data" / "tokenizer")
    assert json.loads((root / "data_code" / "code" / "manifest.json").read_text())["tokenizer_from"] == str(
        root / "data" / "tokenizer")
    main(stage_argv("code", "data_code", "--model.init_args.init_from", parent, "--data.init_args.val_domains", "[code]",
                    "--data.init_args.mixture", "{code: 1.0}"))
    assert (root / "models" / "default" / "code_model_best.ckpt").exists()

    run_prepare(later_config("data_own"))  # no pin: a tokenizer of its own, which the checkpoint refuses
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(stage_argv("code", "data_own", "--model.init_args.init_from", parent, "--data.init_args.val_domains",
                        "[code]", "--data.init_args.mixture", "{code: 1.0}", "--stage.name", "own", "--overwrite"))
    assert exc.value.code == 2 and "tokenizer" in capsys.readouterr().err


# ------------------------------------------------------------------ held-out splits


def test_a_tiny_corpus_still_gets_held_out_documents(tmp_path, monkeypatch, capsys):
    """14 documents at the default 1% fractions used to give 0 val and 0 test documents, and fit then trained
    with no validation at all; prepare now holds out `min_heldout_documents` of each, or refuses."""
    monkeypatch.chdir(tmp_path)
    make_sources(tmp_path)
    for p in sorted((tmp_path / "text").glob("*.txt"))[14:]:
        p.unlink()
    cfg = write_config(tmp_path)
    run_prepare(cfg)
    m = manifest(tmp_path, "language")
    assert m["documents"] == {"train": 12, "val": 1, "test": 1} and m["tokens"]["val"] > 0
    set_config(cfg, lambda d: d["corpora"]["language"].update(min_heldout_documents=7))
    expect_error(cfg, capsys, "corpus 'language' has 14 documents", "min_heldout_documents")


def test_fit_refuses_a_val_split_without_one_window(prepared, capsys):
    root, _ = prepared
    tokens = manifest(root, "language")["tokens"]
    assert tokens["train"] > 4 * tokens["val"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:  # train has windows of val's length + 1, val has none
        main(stage_argv("language", "data", "--data.init_args.seq_len", str(tokens["val"])))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "'language' val split" in err and "val_fraction" in err


SERVICES = {"weather": ["get_weather", "get_forecast"], "maps": ["find_place", "get_route"],
            "mail": ["send_mail", "list_mail"], "calendar": ["add_event", "list_events"],
            "files": ["read_file", "write_file"]}


def service_examples() -> list[dict]:
    out = []
    for service, names in SERVICES.items():
        tools = [{"name": f"{service}_{n}", "description": f"{n} ({service})", "parameters": {
            "type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}} for n in names]
        for i in range(12):
            call = {"name": tools[i % 2]["name"], "arguments": {"q": f"{service} item {i}"}}
            out.append({"messages": [{"role": "user", "content": f"Please {call['name']} for {service} item {i}."}],
                        "tools": tools, "tool_calls": [call]})
    return out


def test_unseen_services_have_no_training_example(tmp_path, monkeypatch):
    from lightning_modules.tool_eval import load_heldout_examples

    monkeypatch.chdir(tmp_path)
    make_sources(tmp_path)
    (tmp_path / "services.jsonl").write_text("\n".join(json.dumps(e) for e in service_examples()) + "\n")
    cfg = write_config(tmp_path)
    set_config(cfg, lambda d: d["corpora"].update(tools={"kind": "tools", "val_fraction": 0.2, "unseen_fraction": 0.3,
        "sources": [{"class_path": "datamodules.tool_examples.ToolJsonl",
                     "init_args": {"paths": [str(tmp_path / "services.jsonl")], "name": "svc"}}]}))
    run_prepare(cfg)
    m = manifest(tmp_path, "tools")
    assert set(m["documents"]) == {"train", "val", "test", "unseen"} and m["documents"]["unseen"] > 0
    assert sum(m["documents"].values()) == 60 and m["families"]["unseen"] == {"svc": m["documents"]["unseen"]}
    unseen = set(m["services"]["unseen"])
    trained = {n for split in ("train", "val", "test") for n in m["services"][split]}
    assert unseen and not unseen & trained
    for split in ("train", "val", "test"):  # from the shards themselves, not the manifest
        called = {e["tool_calls"][0]["name"] for e in load_heldout_examples(tmp_path / "data", split)}
        assert not {f"svc/{n}" for n in called} & unseen
    assert {e["tool_calls"][0]["name"] for e in load_heldout_examples(tmp_path / "data", "unseen")} == {
        s.split("/", 1)[1] for s in unseen}


# ------------------------------------------------------------------ budgets, data without sources


def test_train_token_budget_takes_a_stable_sample_and_keeps_held_out_whole(prepared):
    root, cfg = prepared
    full = manifest(root, "language")
    budget = full["tokens"]["train"] // 2
    set_config(cfg, lambda d: d["corpora"]["language"].update(max_train_tokens=budget))
    run_prepare(cfg)
    capped = manifest(root, "language")
    assert budget * 0.8 < capped["tokens"]["train"] <= budget
    assert capped["documents"]["train"] < full["documents"]["train"] == capped["available_documents"]["train"]
    assert {s: capped["tokens"][s] for s in ("val", "test")} == {s: full["tokens"][s] for s in ("val", "test")}
    first = (root / "data" / "language" / "train.bin").read_bytes()
    set_config(cfg, lambda d: d.update(data_dir=str(root / "again")))
    run_prepare(cfg)
    assert (root / "again" / "language" / "train.bin").read_bytes() == first


def test_prepared_data_is_up_to_date_without_its_sources(prepared, capsys):
    """On a machine without the corpora's packages (a GPU box) prepare, and so pipeline, uses data whose
    manifests match the config, and refuses data that does not."""
    root, cfg = prepared
    before = snapshot(root / "data")
    shutil.move(root / "text", root / "text.away")
    capsys.readouterr()
    run_prepare(cfg)
    err = capsys.readouterr().err
    assert "up to date" in err and "not on this machine" in err
    assert snapshot(root / "data") == before
    set_config(cfg, lambda d: d["corpora"]["language"].update(val_fraction=0.3))
    expect_error(cfg, capsys, "no files match", "no data prepared from this same config")
    assert snapshot(root / "data") == before


def test_pack_and_unpack_carry_a_data_dir_in_small_pieces(prepared, tmp_path, capsys):
    """A data dir travels as checked pieces of at most --max_mb and unpacks to the same files (no caches)."""
    root, _ = prepared
    main(["pack", "--data_dir", str(root / "data"), "--out", str(tmp_path / "packs"), "--max_mb", "0.002"])
    index = json.loads((tmp_path / "packs" / "data.pack.json").read_text())
    assert len(index["pieces"]) > 1 and all(p["bytes"] <= 2000 for p in index["pieces"])
    main(["unpack", "--pack", str(tmp_path / "packs" / "data.pack.json"), "--into", str(tmp_path / "there")])
    assert snapshot(tmp_path / "there" / "data") == {
        k: v for k, v in snapshot(root / "data").items() if not k.startswith(".cache")}
    last = tmp_path / "packs" / index["pieces"][-1]["file"]
    last.write_bytes(last.read_bytes()[:-1] + b"x")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["unpack", "--pack", str(tmp_path / "packs" / "data.pack.json"), "--into", str(tmp_path / "again")])
    assert exc.value.code == 2 and "damaged" in capsys.readouterr().err and not (tmp_path / "again").exists()


def test_a_new_chat_template_re_renders_the_tool_shards_without_retraining(prepared, monkeypatch, capsys):
    """The template is half of the tokenizer's identity: a new one is written into data/tokenizer (the
    vocabulary stays) and the tool shards, rendered with it, are rebuilt; the text shards stay as they were."""
    from datamodules.tokenizer import CHAT_TEMPLATE, chat_template_of, chat_template_sha256

    root, cfg = prepared
    data = root / "data"
    sha, before = tokenizer_sha256(data / "tokenizer"), snapshot(data)
    new = CHAT_TEMPLATE.replace("<|user|>{{", "<|user|> {{")
    monkeypatch.setattr(prepare_mod, "CHAT_TEMPLATE", new)
    monkeypatch.setattr(prepare_mod, "train_tokenizer", lambda *a, **k: pytest.fail("the tokenizer was retrained"))
    run_prepare(cfg)
    assert tokenizer_sha256(data / "tokenizer") == sha and chat_template_of(data / "tokenizer") == new
    tools = manifest(root, "tools")
    assert tools["chat_template_sha256"] == chat_template_sha256(data / "tokenizer") != chat_template_sha256()
    after = snapshot(data)
    assert after["tools/train.bin"] != before["tools/train.bin"]
    assert all(after[f] == before[f] for f in before if f.startswith(("language/", "code/")))
    capsys.readouterr()
    run_prepare(cfg)
    assert "up to date" in capsys.readouterr().err
