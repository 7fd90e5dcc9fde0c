"""The `stagewise` command: dispatch, --print_config round trip, exit status 2 with a message, a real tiny fit."""

import json
import random
from pathlib import Path

import pytest

from datamodules.prepare import Corpus, TokenizerConfig, prepare
from datamodules.sources import TextFiles
from datamodules.tokenizer import tokenizer_sha256
from lightning_modules.cli import main

REPO = Path(__file__).resolve().parents[2]
LANGUAGE = str(REPO / "configs" / "stages" / "language.yaml")
TINY = str(REPO / "configs" / "model" / "tiny.yaml")
WORDS = (
    "the a river stone light quick brown fox jumps over lazy dog morning evening city market bread water "
    "winter summer people house window garden music letter night sleep dream king queen sword castle"
).split()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A prepared ``language`` corpus of 60 short English-like documents and a 320-token tokenizer."""
    root = tmp_path_factory.mktemp("cli_data")
    rng = random.Random(1)
    (root / "text").mkdir()
    for i in range(60):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "." for _ in range(5)]
        (root / "text" / f"doc{i:02d}.txt").write_text("\n".join(lines) + "\n")
    corpus = Corpus(sources=[TextFiles(paths=["*.txt"], root=str(root / "text"))], val_fraction=0.2, test_fraction=0.1)
    prepare({"language": corpus}, TokenizerConfig(vocab_size=320, sample_bytes=20000), str(root / "data"))
    return root / "data"


def exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code


def test_print_config_composes_stage_and_model_and_round_trips(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert exit_code(["fit", "-c", LANGUAGE, "-c", TINY, "--print_config"]) in (0, None)
    printed = capsys.readouterr().out
    assert "size: tiny" in printed
    assert "lightning.pytorch.callbacks.ModelCheckpoint" in printed and "language_model_best" in printed
    config = tmp_path / "printed.yaml"
    config.write_text(printed)
    assert exit_code(["fit", "-c", str(config), "--print_config"]) in (0, None)
    assert capsys.readouterr().out == printed


def test_no_command_prints_usage_and_exits_2(capsys):
    assert exit_code([]) == 2
    out = capsys.readouterr().out
    assert "usage: stagewise" in out and "prepare" in out and "fit" in out


def test_unknown_command_exits_2(capsys):
    assert exit_code(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_fit_without_prepared_data_points_to_prepare(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["fit", "-c", LANGUAGE, "-c", TINY, "--data.init_args.data_dir", str(tmp_path / "missing")]
    assert exit_code(argv) == 2
    err = capsys.readouterr().err
    assert "stagewise prepare" in err and "Traceback" not in err


def test_unknown_model_size_lists_the_valid_ones(tmp_path, monkeypatch, capsys, data_dir):
    monkeypatch.chdir(tmp_path)
    argv = ["fit", "-c", LANGUAGE, "-c", TINY, "--data.init_args.data_dir", str(data_dir),
            "--model.init_args.size", "bogus"]
    assert exit_code(argv) == 2
    err = capsys.readouterr().err
    assert "bogus" in err and "tiny" in err and "small" in err


def test_tiny_fit_writes_best_checkpoint_and_stage_record(tmp_path, monkeypatch, data_dir):
    monkeypatch.chdir(tmp_path)
    main([
        "fit", "-c", LANGUAGE, "-c", TINY,
        "--data.init_args.data_dir", str(data_dir),
        "--data.init_args.seq_len", "32", "--data.init_args.batch_size", "2",
        "--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "2",
        "--trainer.accelerator", "cpu", "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
    ])
    assert (tmp_path / "models" / "language_model_best.ckpt").is_file()
    stage = json.loads((tmp_path / "models" / "language" / "stage.json").read_text())
    assert stage["stage"] == "language" and stage["optimizer_steps"]["stage"] == 3
    assert stage["tokens"]["stage"] == 3 * 2 * 32
    assert stage["tokenizer_sha256"] == tokenizer_sha256(data_dir / "tokenizer")
    assert Path(stage["checkpoint"]["path"]).resolve() == (tmp_path / "models" / "language_model_best.ckpt").resolve()


def test_fsdp_config_builds_the_strategy_the_benchmark_measured():
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from lightning_modules.cli import strategy_from_config
    from lightning_modules.transformer import Block

    strategy = strategy_from_config(Path(__file__).parents[2] / "configs" / "strategies" / "fsdp.yaml")
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.sharding_strategy == ShardingStrategy.FULL_SHARD and strategy._state_dict_type == "full"
    policy = strategy.kwargs["auto_wrap_policy"]  # passed on to FullyShardedDataParallel
    assert isinstance(policy, ModuleWrapPolicy) and policy._module_classes == {Block}
    assert strategy.kwargs["use_orig_params"]  # compile and the weight-decay groups rely on it
