"""Bad input (issue 8): each mistake a user can make gives one clear paragraph that says what is wrong and
what to do, exit status 2, and changes no file that was there before.

Every case runs the real command line, ``lightning_modules.cli.main([...])``, in a temporary directory.
"""

from __future__ import annotations

import errno
import hashlib
import json
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import lightning_modules.pipeline as pipeline_mod
from datamodules.shards import ShardWriter
from datamodules.tokenizer import tokenizer_sha256
from lightning_modules.causal_lm import CausalLM
from lightning_modules.cli import main

REPO = Path(__file__).resolve().parents[1]
CODE_STAGE = str(REPO / "configs" / "stages" / "code.yaml")
TINY = str(REPO / "configs" / "model" / "tiny.yaml")
WORDS = "the a river stone light quick brown fox jumps over lazy dog morning evening city market bread".split()
TOOL = {"name": "get_weather", "description": "Current weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def make_sources(root: Path) -> None:
    """30 prose documents under ``root/text`` and 20 code snippets under ``root/code``."""
    rng = random.Random(0)
    (root / "text").mkdir(parents=True)
    (root / "code").mkdir()
    for i in range(30):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))) + "." for _ in range(4)]
        (root / "text" / f"doc{i:02d}.txt").write_text("\n".join(lines) + "\n")
    for i in range(20):
        (root / "code" / f"snippet{i:02d}.txt").write_text(f"def f{i}(x):\n    return x * {i} + {i * 7}\n")


def text_source(root: Path, name: str) -> dict:
    return {"class_path": "datamodules.sources.TextFiles", "init_args": {"paths": ["*.txt"], "root": str(root), "name": name}}


def data_config(root: Path, **extra_corpora) -> Path:
    """A data config for ``root/data``: language and code, plus ``extra_corpora``."""
    cfg = {
        "data_dir": str(root / "data"),
        "tokenizer": {"vocab_size": 320, "sample_bytes": 20000},
        "corpora": {
            "language": {"val_fraction": 0.2, "test_fraction": 0.1, "sources": [text_source(root / "text", "prose")]},
            "code": {"val_fraction": 0.2, "test_fraction": 0.1, "sources": [text_source(root / "code", "snippets")]},
            **extra_corpora,
        },
    }
    path = root / f"data-{len(list(root.glob('data-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (but the documents cache), by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and ".cache" not in p.parts}


def run(argv: list[str], capsys) -> tuple[int, str]:
    """Run ``stagewise <argv>``; return its exit status and what it wrote to stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code, capsys.readouterr().err


def assert_clear(err: str, *fragments: str) -> None:
    """stderr ends with one paragraph ``stagewise <command>: error: ...`` naming the problem (progress bars may
    come before it); no traceback, no parser usage dump."""
    assert "Traceback" not in err and "usage:" not in err, err
    starts = [m.start() for m in re.finditer(r"^stagewise \w+: error: ", err, re.MULTILINE)]
    assert starts, err
    message = err[starts[-1]:].strip()
    assert "\n" not in message, err
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"


def assert_refused(argv: list[str], capsys, *fragments: str, unchanged: Path) -> None:
    """``stagewise <argv>`` exits 2 with one clear paragraph naming ``fragments`` and changes no file under
    ``unchanged`` (none added, removed or rewritten)."""
    before = snapshot(unchanged)
    code, err = run(argv, capsys)
    assert code == 2
    assert_clear(err, *fragments)
    assert snapshot(unchanged) == before


def assert_prepare_refused(config: Path, capsys, *fragments: str) -> None:
    """``stagewise prepare -c config`` is refused and leaves its ``data_dir`` as it was."""
    data_dir = Path(yaml.safe_load(Path(config).read_text())["data_dir"])
    assert snapshot(data_dir), f"no prepared data in {data_dir} to compare with"
    assert_refused(["prepare", "-c", str(config)], capsys, *fragments, unchanged=data_dir)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A directory with sources, prepared ``data/`` (language + code, 320-token tokenizer) and a tiny
    ``models/language_model_best.ckpt`` for its tokenizer, in Lightning's format (untrained weights: only the
    format, shapes and tokenizer hash matter here)."""
    root = tmp_path_factory.mktemp("bad_input")
    make_sources(root)
    main(["prepare", "-c", str(data_config(root))])
    save_checkpoint(root / "models" / "language_model_best.ckpt", tokenizer_sha256(root / "data" / "tokenizer"))
    return root


def save_checkpoint(path: Path, tokenizer_sha: str, **model_args) -> None:
    """A Lightning-format checkpoint of a tiny CausalLM (state_dict + hyper_parameters)."""
    model = CausalLM(size="tiny", vocab_size=320, tokenizer_sha256=tokenizer_sha, **model_args)
    model.configure_model()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)


@pytest.fixture
def workdir(prepared, tmp_path, monkeypatch) -> Path:
    """A fresh working directory holding a copy of the prepared data and models."""
    shutil.copytree(prepared / "data", tmp_path / "data")
    shutil.copytree(prepared / "models", tmp_path / "models")
    for sub in ("text", "code"):
        shutil.copytree(prepared / sub, tmp_path / sub)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def fit_argv(*extra: str, init_from: str | None = "models/language_model_best.ckpt") -> list[str]:
    """``stagewise fit`` of the code stage on the tiny model, one CPU step (never reached by these tests)."""
    return ["fit", "-c", CODE_STAGE, "-c", TINY, "--data.init_args.data_dir", "data",
            "--data.init_args.seq_len", "16", "--data.init_args.batch_size", "2", "--trainer.max_steps", "1",
            "--trainer.accelerator", "cpu", *(["--model.init_args.init_from", init_from] if init_from else []), *extra]


# ------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("argv, message", [
    (["--model", "lightning_modules.CausalLM", "--model.lr_typo", "1"], "unknown option `model.init_args.lr_typo`"),
    (["--model", "lightning_modules.CausalLM", "--model.schedule", "sin"],
     "`model.init_args.schedule` must be one of 'cosine', 'constant', 'wsd', got 'sin'"),
    (["--model", "lightning_modules.CausalLM", "--model.model_overrides", "5"],
     "`model.init_args.model_overrides` must be dict or None, got '5'"),
    (["--max_steps", "ten"], "`max_steps` must be int, got 'ten'"),
], ids=["unknown_key", "literal", "union", "int"])
def test_parse_errors_become_one_paragraph(argv, message):
    from argparse import ArgumentError
    from typing import Optional

    from jsonargparse import ArgumentParser

    from datamodules.errors import argument_error

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--model", type=Optional[CausalLM])
    parser.add_argument("--max_steps", type=int)
    with pytest.raises(ArgumentError) as exc:
        parser.parse_args(argv)
    text = str(argument_error(str(exc.value), "stagewise fit"))
    assert text.startswith(message) and "\n" not in text, text
    assert text.endswith("`stagewise fit --help` lists the accepted options and their types.")


def test_unknown_config_key_names_it(workdir, capsys):
    (workdir / "typo.yaml").write_text("model:\n  init_args:\n    lr_typo: 0.1\n")
    assert_refused(fit_argv("-c", "typo.yaml"), capsys, "unknown option `model.init_args.lr_typo`",
                   "stagewise fit --help", unchanged=workdir)
    config = data_config(workdir)
    config.write_text(config.read_text() + "tokenizr:\n  vocab_size: 512\n")
    assert_prepare_refused(config, capsys, "unknown option `tokenizr.vocab_size`", "stagewise prepare --help")


def test_wrong_type_names_the_key_and_the_expected_type(workdir, capsys):
    assert_refused(fit_argv("--trainer.max_steps", "ten"), capsys, "`trainer.max_steps` must be int, got 'ten'",
                   "stagewise fit --help", unchanged=workdir)


# ------------------------------------------------------------------------------------------ corpora


@pytest.mark.parametrize("files, fragments", [
    ({}, ["source 'extra_src': no files match", "Check `paths` and `root`"]),
    ({f"{i}.txt": "   \n\n" for i in range(3)}, ["corpus 'extra' is empty after cleaning", "Check its sources"]),
], ids=["no_files", "empty_after_cleaning"])
def test_corpus_without_documents(workdir, capsys, files, fragments):
    source_dir = workdir / "extra_src"
    source_dir.mkdir()
    for name, text in files.items():
        (source_dir / name).write_text(text)
    assert_prepare_refused(data_config(workdir, extra={"sources": [text_source(source_dir, "extra_src")]}), capsys,
                           *fragments)


def test_data_dir_never_prepared(workdir, capsys):
    assert_refused(fit_argv("--data.init_args.data_dir", "nowhere"), capsys, "no prepared data in nowhere/code/",
                   "run `stagewise prepare -c", unchanged=workdir)
    assert not (workdir / "nowhere").exists()


def test_stage_validates_on_a_domain_with_no_prepared_data(workdir, capsys):
    assert_refused(fit_argv("--data.init_args.val_domains", "[language, code, tools]"), capsys,
                   "no prepared data in data/tools/", "run `stagewise prepare -c", unchanged=workdir)


# ------------------------------------------------------------------------------------------ init_from


def _write_text(path: Path) -> str:
    path.write_text("these are not weights\n")
    return str(path)


def _other_shape(path: Path) -> str:
    save_checkpoint(path, tokenizer_sha256(Path("data/tokenizer")), model_overrides={"n_layers": 2})
    return str(path)


def _other_tokenizer(path: Path) -> str:
    save_checkpoint(path, "f" * 64)
    return str(path)


@pytest.mark.parametrize("make, fragments", [
    (lambda p: str(p), ["no checkpoint at", "train the previous stage first"]),
    (_write_text, ["is not a readable checkpoint", "--model.init_from"]),
    (_other_shape, ["has another model shape", "size 'tiny'", "model_overrides {'n_layers': 2}", "start this stage"]),
    (_other_tokenizer, ["was trained with tokenizer ffffffffffff", "tokenizer"]),
], ids=["missing", "not_a_checkpoint", "other_shapes", "other_tokenizer"])
def test_bad_init_from(workdir, capsys, make, fragments):
    init_from = make(workdir / "models" / "parent.ckpt")
    # no code_model_best.ckpt, the parent untouched, no run directory (another shape is found once the fit has
    # begun: what it had written is taken away again)
    assert_refused(fit_argv("--model.init_args.init_from", init_from), capsys, "init_from", *fragments,
                   unchanged=workdir)
    assert not (workdir / "runs").exists()


# ------------------------------------------------------------------------------------------ the stage


def _parent_stage(workdir: Path, record: bool = True, experiment: str = "default") -> Path:
    """The language stage of ``experiment`` as a finished run leaves it: best checkpoint and (with ``record``)
    its stage.json."""
    from datamodules.stage_record import file_sha256, update_stage_record

    best = workdir / "models" / experiment / "language_model_best.ckpt"
    best.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(workdir / "models" / "language_model_best.ckpt", best)
    if record:
        update_stage_record(best.parent, "language", {"checkpoint": {"path": str(best), "sha256": file_sha256(best)},
                                                      "domains": ["language"]})
    return best


def test_stage_whose_parent_stage_has_not_run(workdir, capsys):
    assert_refused(fit_argv(init_from=None), capsys, "stage 'code' starts from stage 'language' of experiment "
                   "'default'", "models/default/language_model_best.ckpt does not exist", "run that stage first",
                   unchanged=workdir)
    _parent_stage(workdir, experiment="a")  # another experiment's language stage is not this one's parent
    assert_refused(fit_argv("--stage.experiment", "b", init_from=None), capsys, "of experiment 'b'",
                   "models/b/language_model_best.ckpt does not exist", unchanged=workdir)


def test_stage_whose_parent_stage_did_not_finish(workdir, capsys):
    _parent_stage(workdir, record=False)
    assert_refused(fit_argv(init_from=None), capsys, "has no record", "that stage did not finish",
                   "--ckpt_path last", "--model.init_args.init_from", unchanged=workdir)


def test_stage_whose_parent_checkpoint_was_replaced_after_its_record(workdir, capsys):
    best = _parent_stage(workdir)
    save_checkpoint(best, tokenizer_sha256(Path("data/tokenizer")), lr=0.5)  # other weights, same record
    assert_refused(fit_argv(init_from=None), capsys, "broken lineage", "is not the checkpoint its record",
                   "Re-run stage 'language'", unchanged=workdir)


@pytest.mark.parametrize("args, fragments", [
    (["--stage.name", "code v2"], ["stage.name 'code v2' must be letters, digits"]),
    (["--stage.parent", "code"], ["names itself as its parent"]),
    (["--trainer.callbacks+=callbacks.StageHandoff"], ["trainer.callbacks lists StageHandoff, which every stage "
                                                       "already has", "--handoff.<option>"]),
], ids=["name", "own_parent", "duplicate_callback"])
def test_bad_stage_settings(workdir, capsys, args, fragments):
    assert_refused(fit_argv(*args), capsys, *fragments, unchanged=workdir)


def _llama_with_its_tokenizer(path: Path, make_llama, **changes) -> Path:
    """A transformers Llama directory whose tokenizer is its own (not the prepared data's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator([" ".join(WORDS)] * 5, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe)
    tok.save_pretrained(path)
    return make_llama(path, len(tok), **changes)


@pytest.mark.parametrize("size, changes, fragments", [
    ([], {}, ["config.json has num_hidden_layers 3 but size 'tiny' gives n_layers 6", "--model.init_args.size null"]),
    (["--model.init_args.size", "null"], {"hidden_act": "gelu"}, ["has hidden_act 'gelu' but stagewise's transformer "
                                                                  "needs 'silu'", "it cannot be mapped"]),
    (["--model.init_args.size", "null"], {}, ["the tokenizer of", "gives", "other ids than this stage's tokenizer",
                                              "`tokenizer.from_model:"]),
], ids=["preset_disagrees", "unmappable", "tokenizer_not_adopted"])
def test_bad_transformers_init_from(workdir, capsys, make_llama, size, changes, fragments):
    changes = {"num_hidden_layers": 3, **changes} if not size else changes  # tiny has 6 layers
    llama = _llama_with_its_tokenizer(workdir / "llama", make_llama, **changes)
    assert_refused(fit_argv("--model.init_args.init_from", str(llama), *size), capsys, "init_from", *fragments,
                   unchanged=workdir / "models")


def test_stage_handoff_refuses_a_parent_that_is_not_a_checkpoint(tmp_path):
    """The fit-start check of ``StageHandoff`` (it also guards modules that load ``init_from`` themselves)."""
    from callbacks.stage_handoff import StageHandoff
    from datamodules.errors import StagewiseError

    with pytest.raises(StagewiseError, match="is not a readable checkpoint .*--model.init_args.init_from"):
        StageHandoff("code")._check_parent(_write_text(tmp_path / "notes.ckpt"), "a" * 64)


def test_evaluate_a_file_that_is_not_a_checkpoint(workdir, capsys):
    assert_refused(["evaluate", "--ckpt", _write_text(workdir / "notes.ckpt"), "--data_dir", "data"], capsys,
                   "notes.ckpt is not a readable checkpoint", "pass --ckpt <file.ckpt>", unchanged=workdir)


def test_export_and_interpolate_a_file_that_is_not_a_checkpoint(workdir, capsys):
    """Both printed a traceback before they shared ``read_checkpoint``."""
    from datamodules.errors import StagewiseError
    from lightning_modules.interpolate import load_checkpoint

    notes = _write_text(workdir / "notes.ckpt")
    assert_refused(["export", "--ckpt", notes, "--out", str(workdir / "hf")], capsys,
                   "notes.ckpt is not a readable checkpoint", "train a stage first", unchanged=workdir)
    with pytest.raises(StagewiseError, match="notes.ckpt is not a readable checkpoint"):
        load_checkpoint(notes)


def test_export_into_a_directory_that_is_not_an_earlier_export(workdir, capsys):
    """An export replaces its directory whole, so one holding other files is refused, not emptied."""
    (workdir / "notes").mkdir()
    (workdir / "notes" / "todo.txt").write_text("mine\n")
    assert_refused(["export", "--ckpt", "models/language_model_best.ckpt", "--out", "notes"], capsys,
                   "holds something other than an earlier export", "name a new or empty one", unchanged=workdir)


# ------------------------------------------------------------------------------------------ resume, monitor


def _fit(argv: list[str]) -> None:
    """``stagewise fit <argv>`` that must succeed."""
    try:
        main(argv)
    except SystemExit as exc:
        raise AssertionError(f"stagewise {' '.join(argv)} exited with {exc.code}") from None


def test_resume_without_the_runs_model_preset_continues_with_its_settings(workdir):
    """Was 78 lines of "size mismatch": `--ckpt_path last` now names the run's last.ckpt, whose settings
    Lightning reads back as for any checkpoint path."""
    _fit(fit_argv())  # the tiny preset
    untold = fit_argv("--trainer.max_steps", "2", "--ckpt_path", "last")
    i = untold.index(TINY)
    _fit(untold[: i - 1] + untold[i + 1:])  # no -c tiny.yaml
    last = torch.load(workdir / "runs/default/code/checkpoints/last.ckpt", weights_only=False)
    assert last["global_step"] == 2 and last["hyper_parameters"]["size"] == "tiny"


def test_resume_from_weights_only(workdir, capsys):
    assert_refused(fit_argv("--ckpt_path", "models/language_model_best.ckpt"), capsys,
                   "--ckpt_path models/language_model_best.ckpt holds weights only", "--ckpt_path last",
                   "--model.init_args.init_from", unchanged=workdir)


def test_resume_from_a_checkpoint_of_another_shape(workdir, capsys):
    model = CausalLM(size="tiny", vocab_size=320, model_overrides={"n_layers": 2})
    model.configure_model()  # a checkpoint from elsewhere: training state, no settings
    torch.save({"state_dict": model.state_dict(), "optimizer_states": [{"state": {}}]}, workdir / "elsewhere.ckpt")
    assert_refused(fit_argv("--ckpt_path", "elsewhere.ckpt"), capsys, "--ckpt_path elsewhere.ckpt has another model "
                   "shape than this config gives", "are not in it", "config.yaml", unchanged=workdir)


def test_monitor_of_a_domain_the_stage_does_not_validate(workdir, capsys):
    """Crashed at the first validation, after training had started; now refused before the first step."""
    assert_refused(fit_argv("--data.init_args.val_domains", "[language]"), capsys, "the best checkpoint follows "
                   "val/code/loss, but this stage validates on language only", "--data.init_args.val_domains",
                   unchanged=workdir)
    assert not (workdir / "runs").exists()


def test_a_run_that_never_validates_or_leaves_warmup_is_warned_about(workdir):
    """One step against the base config's val_check_interval 250 and the code stage's warmup_steps 100; also
    without a progress bar (the base config lists one)."""
    with pytest.warns(UserWarning) as warned:
        _fit(fit_argv("--trainer.enable_progress_bar", "false"))
    messages = [str(w.message) for w in warned]
    assert any("this run will never validate (max_steps is 1, and the first validation is due after training batch 250)" in m
               for m in messages), messages
    assert any("warmup_steps (100) is not below the 1 optimizer steps of this run" in m for m in messages), messages


@pytest.mark.parametrize("argv, fragments", [
    (["predict", "-c", CODE_STAGE], ["`stagewise predict` has nothing to predict", "stagewise generate",
                                     "stagewise test"]),
    (["test", "-c", CODE_STAGE, "-c", TINY], ["`stagewise test` scores a trained checkpoint", "--ckpt_path best",
                                              "models/default/code_model_best.ckpt"]),
    (["validate", "-c", CODE_STAGE, "-c", TINY], ["`stagewise validate` scores a trained checkpoint"]),
    (["test", "-c", CODE_STAGE, "-c", TINY, "--ckpt_path", "best"], [
        "--ckpt_path best names models/default/code_model_best.ckpt, which does not exist", "--stage.experiment"]),
], ids=["predict", "test_without_checkpoint", "validate_without_checkpoint", "test_best_not_trained"])
def test_commands_that_have_nothing_to_score(workdir, capsys, argv, fragments):
    assert_refused(argv, capsys, *fragments, unchanged=workdir)


# ------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_without_reserved_tokens(workdir, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    plain = Tokenizer(models.BPE())
    plain.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    plain.train_from_iterator(["the quick brown fox"] * 10, trainers.BpeTrainer(vocab_size=280, show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=plain).save_pretrained(workdir / "plain_tokenizer")
    config = data_config(workdir)
    cfg = yaml.safe_load(config.read_text())
    cfg["tokenizer"]["from_dir"] = str(workdir / "plain_tokenizer")
    config.write_text(yaml.safe_dump(cfg))
    assert_prepare_refused(config, capsys, "lacks the reserved tokens", "<|tool_call|>", "train one with `stagewise prepare`")


# ------------------------------------------------------------------------------------------ tool examples


def _example(**changes) -> dict:
    example = {"messages": [{"role": "user", "content": "Weather in Oslo?"}], "tools": [TOOL],
               "tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]}
    return {k: v for k, v in {**example, **changes}.items() if v is not None}


@pytest.mark.parametrize("line, fragments", [
    ('{"messages": [', ["not valid JSON", "Fix or remove the line"]),
    (json.dumps(_example(tool_calls=None)), ["no assistant answer", "top-level `tool_calls`", "Fix the example"]),
    (json.dumps(_example(messages=[{"role": "user", "content": "Oslo?"}, {"role": "assistant", "content": None,
                "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": "{city"}}]}],
                tool_calls=None)), ["`messages[1].tool_calls[0].function.arguments` of `get_weather` is a string "
                                    "but not JSON", "Fix the example"]),
    (json.dumps(_example(tool_calls=[{"name": "book_flight", "arguments": {}}])),
     ["calls `book_flight`, which is not among the tools (get_weather)", "Fix the example"]),
    (b'{"messages": "caf\xe9"}', ["not UTF-8 (byte 0xe9 at column 18)", "save the file as UTF-8"]),
], ids=["not_json", "no_tool_calls", "openai_arguments_not_json", "unknown_function", "not_utf8"])
def test_bad_tool_jsonl_line(workdir, capsys, line, fragments):
    jsonl = workdir / "tools.jsonl"
    jsonl.write_bytes(json.dumps(_example()).encode() + b"\n" + (line if isinstance(line, bytes) else line.encode()) + b"\n")
    tools = {"kind": "tools", "sources": [{"class_path": "datamodules.tool_examples.ToolJsonl",
                                           "init_args": {"paths": [str(jsonl)]}}]}
    assert_prepare_refused(data_config(workdir, tools=tools), capsys, f"{jsonl}:2", *fragments)


# ------------------------------------------------------------------------------------------ pipeline


@pytest.mark.parametrize("change, fragments", [
    ({"configs": [CODE_STAGE, "configs/model/tinny.yaml"]}, ["stage 'code' names config file 'configs/model/tinny.yaml'",
                                                              "which does not exist"]),
    ({"parent": "langauge"}, ["stage 'code' starts from 'langauge'", "not an earlier stage", "earlier: language"]),
], ids=["missing_config", "unknown_parent"])
def test_pipeline_naming_a_missing_stage_runs_nothing(workdir, capsys, monkeypatch, change, fragments):
    ran = []
    monkeypatch.setattr(pipeline_mod, "run_stage", lambda spec, *args: ran.append(spec.name) or "trained")
    stages = [{"name": "language", "configs": [TINY]}, {"name": "code", "configs": [CODE_STAGE, TINY], **change}]
    (workdir / "pipeline.yaml").write_text(yaml.safe_dump({"experiment": "t", "stages": stages, "report": False}))
    assert_refused(["pipeline", "-c", "pipeline.yaml"], capsys, *fragments, "nothing has run yet", unchanged=workdir)
    assert ran == []


# ------------------------------------------------------------------------------------------ full disk


def test_disk_full_while_preparing_keeps_the_earlier_data(workdir, capsys, monkeypatch):
    (workdir / "text" / "new.txt").write_text("a new document about the river and the stone.\n" * 3)
    real_flush = ShardWriter._flush

    def flush(self):
        if self.split == "val":  # the train split of the first corpus is written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        real_flush(self)

    monkeypatch.setattr(ShardWriter, "_flush", flush)
    # tokenizer, shards and manifests as they were
    assert_refused(["prepare", "-c", str(data_config(workdir))], capsys, "the disk is full", "Nothing was changed",
                   "re-run `stagewise prepare`", unchanged=workdir / "data")
    assert not [p for p in (workdir / "data").rglob("*") if ".tmp" in p.name or p.name.endswith(".old")]
