"""The `stagewise` command: dispatch, --print_config round trip, exit status 2 with a message, a real tiny fit."""

import json
from pathlib import Path

import pytest

from datamodules.tokenizer import tokenizer_sha256
from lightning_modules.cli import main

REPO = Path(__file__).resolve().parents[2]
LANGUAGE = str(REPO / "configs" / "stages" / "language.yaml")
TINY = str(REPO / "configs" / "model" / "tiny.yaml")


@pytest.fixture
def data_dir(corpora) -> Path:
    return corpora


def exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code


def test_print_config_composes_stage_and_model_and_round_trips(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert exit_code(["fit", "-c", LANGUAGE, "-c", TINY, "--print_config"]) in (0, None)
    printed = capsys.readouterr().out
    assert "size: tiny" in printed and "max_steps: 3000" in printed  # the model preset and the base config
    assert "stage:\n  name: language\n  domain: language" in printed
    assert "best_checkpoint:" in printed and "callbacks.TextSamples" in printed
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
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
    ])
    best = tmp_path / "models" / "default" / "language_model_best.ckpt"
    assert best.is_file()
    stage = json.loads((tmp_path / "models" / "default" / "language" / "stage.json").read_text())
    assert stage["stage"] == "language" and stage["optimizer_steps"]["stage"] == 3
    assert stage["experiment"] == "default" and stage["domain"] == "language" and stage["domains"] == ["language"]
    assert stage["tokens"]["stage"] == 3 * 2 * 32
    assert stage["tokenizer_sha256"] == tokenizer_sha256(data_dir / "tokenizer")
    assert Path(stage["checkpoint"]["path"]).resolve() == best.resolve()
    run = tmp_path / "runs" / "default" / "language"
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()


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
