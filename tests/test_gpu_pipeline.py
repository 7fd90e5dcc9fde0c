"""The GPU pipeline's configs compose and run, shrunk to a tiny model on CPU, through the harness that runs
them on a GPU machine (experiments/gpu_pipeline.py): every stage and the baseline train, the tool stages are
evaluated, and the report card has the shape the README documents."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from experiments.gpu_pipeline import main as gpu_pipeline
from lightning_modules.report_card import SCORES

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--trainer.accelerator=cpu", "--model.init_args.size=tiny",
        "--model.init_args.model_overrides={n_layers: 2, max_seq_len: 256}", "--trainer.max_steps=4",
        "--trainer.val_check_interval=2", "--trainer.limit_val_batches=2", "--data.init_args.seq_len=64",
        "--data.init_args.val_seq_len=32", "--data.init_args.batch_size=2", "--data.init_args.val_max_windows=4"]


@pytest.mark.slow
def test_the_gpu_pipeline_runs_shrunk_and_writes_its_report_card(tmp_path, tool_data_dir):
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    shutil.copytree(tool_data_dir, tmp_path / "data")
    config = yaml.safe_load((ROOT / "configs/pipelines/gpu.yaml").read_text())
    assert Path(ROOT / config["data"]).is_file() and config["baselines"][0]["name"] == "joint"
    del config["data"]  # the fixture's data, prepared already, stands in for data/full
    (tmp_path / "pipe.yaml").write_text(yaml.safe_dump(config))
    results = tmp_path / "results"
    gpu_pipeline(["--config", "pipe.yaml", "--workdir", str(tmp_path), "--data-dir", "data", "--results",
                  str(results), "--max-new-tokens", "8", "--stage-args", json.dumps(TINY)])
    card = json.loads((results / "report.json").read_text())
    assert set(card["stages"]) == {"language", "code", "tools"} and set(card["baselines"]) == {"joint"}
    assert card["command"].startswith("python -m experiments.gpu_pipeline") and card["card"]
    tools = card["stages"]["tools"]
    assert set(tools["losses"]) == set(tools["bits_per_byte"]) == {"language", "code", "tools"}
    val_examples = json.loads((tool_data_dir / "tools" / "manifest.json").read_text())["documents"]["val"]
    assert set(tools["forgetting"]) == {"language", "code"} and tools["tools"]["seen"]["n"] == val_examples  # all
    assert card["stages"]["code"]["forgetting"].keys() == {"language"} and tools["tokens_per_s"] > 0
    assert tools["mfu"] is None  # no MFU on a CPU
    assert (results / "report.md").is_file()
    # the card's tool scores are the evaluate step's (not the fit's own, which would pass for them on this data)
    evaluated = json.loads((results / "records" / "tools" / "eval.json").read_text())["tools"]
    assert tools["tools"] == {g: {k: s[k] for k in SCORES} for g, s in evaluated.items()}


@pytest.mark.slow
def test_recipe_comparisons_run_shrunk_beside_the_pipeline(tmp_path, tool_data_dir, monkeypatch):
    """Two variants (a text stage without replay, the preference stage with its pairs) start from the shrunk
    pipeline's checkpoints in its experiment, two at a time, and land beside its stages in one table."""
    from experiments.recipe_comparisons import main as recipe_comparisons

    (tmp_path / "configs").symlink_to(ROOT / "configs")
    shutil.copytree(tool_data_dir, tmp_path / "data")
    config = yaml.safe_load((ROOT / "configs/pipelines/gpu.yaml").read_text())
    del config["data"], config["baselines"]
    (tmp_path / "pipe.yaml").write_text(yaml.safe_dump(config))
    gpu_pipeline(["--config", "pipe.yaml", "--workdir", str(tmp_path), "--data-dir", "data", "--results",
                  str(tmp_path / "results"), "--max-new-tokens", "8", "--steps", "pipeline",
                  "--stage-args", json.dumps(TINY)])
    monkeypatch.chdir(tmp_path)
    result = recipe_comparisons(["--config", "pipe.yaml", "--variants", "code_noreplay", "preference", "--workers", "2",
                                 "--data-dir", "data", "--max-new-tokens", "8", "--out", str(tmp_path / "rc"),
                                 "--stage-args", json.dumps(TINY)])
    assert set(result["outcomes"]) == {"code_noreplay", "preference"}, result["outcomes"]
    assert not any(o.startswith("failed") for o in result["outcomes"].values()), result["outcomes"]
    assert set(result["baselines"]) == {"code_noreplay", "preference"}
    assert result["baselines"]["code_noreplay"]["forgetting"].keys() == {"language"}
    evaluated = json.loads((tmp_path / "models/gpu/preference/eval.json").read_text())["tools"]
    assert result["baselines"]["preference"]["tools"] == {g: {k: s[k] for k in SCORES} for g, s in evaluated.items()}
    assert (tmp_path / "rc" / "results.md").read_text().count("code_noreplay") >= 2


def test_the_gpu_pipelines_joint_baseline_trains_the_staged_paths_text_tokens():
    """configs/pipelines/gpu.yaml's joint run sees as many language and code tokens as the staged path trains,
    replay included, in the same proportions (the comparison the report card draws is at equal tokens)."""
    config = yaml.safe_load((ROOT / "configs/pipelines/gpu.yaml").read_text())
    overlay = yaml.safe_load((ROOT / "configs/overlays/gpu.yaml").read_text())["data"]["init_args"]

    def arg(line, name, default=None):
        value = next((a.split("=", 1)[1] for a in line["args"] if a.startswith(f"--{name}=")), default)
        return yaml.safe_load(value) if isinstance(value, str) else value

    def mixture(line):
        stage = yaml.safe_load((ROOT / line["configs"][0]).read_text())
        data = (stage.get("data") or {}).get("init_args") or {}
        return arg(line, "data.init_args.mixture") or data.get("mixture") or {stage["stage"]["domain"]: 1.0}

    tokens = {"language": 0.0, "code": 0.0}
    for line in config["stages"]:
        batch = arg(line, "data.init_args.batch_size", overlay["batch_size"])
        seq = arg(line, "data.init_args.seq_len", overlay["seq_len"])
        for domain, share in mixture(line).items():
            if domain in tokens:  # windows: a share of the windows is that share of the tokens
                tokens[domain] += share * arg(line, "trainer.max_steps") * batch * seq
    joint = config["baselines"][0]
    joint_tokens = arg(joint, "trainer.max_steps") * overlay["batch_size"] * overlay["seq_len"]
    assert joint_tokens == pytest.approx(sum(tokens.values()), rel=0.001)
    for domain, share in mixture(joint).items():
        assert share == pytest.approx(tokens[domain] / sum(tokens.values()), abs=0.001)
