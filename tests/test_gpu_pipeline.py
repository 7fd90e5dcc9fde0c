"""The GPU pipeline's configs compose and run, shrunk to a tiny model on CPU, through the harness that runs
them on a GPU machine (experiments/gpu_pipeline.py): every stage and the baseline train, the tool stages are
evaluated, and the report card has the shape the README documents."""

import json
import os
import shlex
import shutil
from pathlib import Path

import pytest
import torch
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
                  str(results), "--max-new-tokens", "8", "--eval-limit", "3", "--stage-args", json.dumps(TINY)])
    card = json.loads((results / "report.json").read_text())
    assert set(card["stages"]) == {"language", "code", "tools"} and set(card["baselines"]) == {"joint"}
    assert card["command"].startswith("python -m experiments.gpu_pipeline") and card["card"]
    tools = card["stages"]["tools"]
    assert set(tools["losses"]) == set(tools["bits_per_byte"]) == {"language", "code", "tools"}
    val_examples = json.loads((tool_data_dir / "tools" / "manifest.json").read_text())["documents"]["val"]
    assert val_examples > 3 and set(tools["forgetting"]) == {"language", "code"}
    assert {s["n"] for s in tools["tools"].values()} == {3}  # --eval-limit reaches `stagewise evaluate`
    assert card["stages"]["code"]["forgetting"].keys() == {"language"} and tools["tokens_per_s"] > 0
    assert tools["mfu"] is None  # no MFU on a CPU
    # the staged path, its tool scores, then the baseline (a machine lost during the baseline keeps the scores)
    commands = [line for line in (tmp_path / "runs" / "gpu" / "gpu_pipeline.log").read_text().splitlines()
                if line.startswith("$ ")]
    kinds = [next(w for w in ("pipeline", "evaluate", "report") if f"lightning_modules {w}" in c) for c in commands]
    assert kinds == ["pipeline", "evaluate", "pipeline", "report"], commands
    assert "--baselines '[]'" in commands[0] and "--baselines" not in commands[2]
    models = tmp_path / "models" / "gpu"
    assert (models / "tools" / "eval.json").stat().st_mtime < (models / "joint" / "stage.json").stat().st_mtime
    assert (results / "report.md").is_file()
    # the card's tool scores are the evaluate step's (not the fit's own, which would pass for them on this data)
    evaluated = json.loads((results / "records" / "tools" / "eval.json").read_text())["tools"]
    # (with the wrong calls counted by reason, which the markdown lists)
    assert tools["tools"] == {g: {**{k: s[k] for k in SCORES}, "errors": s["errors"]} for g, s in evaluated.items()}
    assert all(sum(s["errors"].values()) == round(s["n"] * (1 - s["call_accuracy"])) for s in evaluated.values())
    # and evaluate's second decoding, with constrained names and keys, is on the card beside them
    constrained = json.loads((results / "records" / "tools" / "eval.json").read_text())["tools_constrained"]
    assert all(s["constrained"] for s in constrained.values()) and constrained.keys() == evaluated.keys()
    assert tools["tools_constrained"] == {g: {**{k: s[k] for k in SCORES}, "errors": s["errors"]}
                                          for g, s in constrained.items()}
    report = (results / "report.md").read_text()
    assert "Decoded with constrained names" in report and "Wrong calls by reason" in report
    # constrained, no call names a function its prompt does not offer
    assert all(s["errors"]["name_not_offered"] == 0 for s in constrained.values())
    # and the third, strict decoding (required parameters, closed JSON), is on the card too
    strict = json.loads((results / "records" / "tools" / "eval.json").read_text())["tools_strict"]
    assert all(s["strict"] for s in strict.values()) and strict.keys() == evaluated.keys()
    assert tools["tools_strict"] == {g: {**{k: s[k] for k in SCORES}, "errors": s["errors"]} for g, s in strict.items()}
    assert "Decoded strictly" in report


@pytest.mark.slow
def test_recipe_comparisons_run_shrunk_beside_the_pipeline(tmp_path, tool_data_dir, monkeypatch):
    """Two variants (a text stage without replay, the preference stage with its sampled pairs, a tagged set) start
    from the shrunk pipeline's checkpoints in its experiment, two at a time, and land beside its stages in one
    table."""
    from experiments.recipe_comparisons import main as recipe_comparisons

    (tmp_path / "configs").symlink_to(ROOT / "configs")
    shutil.copytree(tool_data_dir, tmp_path / "data")
    config = yaml.safe_load((ROOT / "configs/pipelines/gpu.yaml").read_text())
    del config["data"]
    (tmp_path / "pipe.yaml").write_text(yaml.safe_dump(config))
    gpu_pipeline(["--config", "pipe.yaml", "--workdir", str(tmp_path), "--data-dir", "data", "--results",
                  str(tmp_path / "results"), "--max-new-tokens", "8", "--steps", "pipeline", "--no-baselines",
                  "--stage-args", json.dumps(TINY)])
    assert (tmp_path / "models/gpu/tools/stage.json").is_file() and not (tmp_path / "models/gpu/joint").exists()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OUT", str(tmp_path))  # --out under $OUT, as gpu_session.sh has it: no copy onto itself
    argv = ["--config", "pipe.yaml", "--variants", "code_noreplay", "preference_sampled", "--workers", "2", "--data-dir", "data",
            "--max-new-tokens", "8", "--out", str(tmp_path / "rc"), "--stage-args", json.dumps(TINY)]
    result = recipe_comparisons(argv)
    assert result["command"] == shlex.join(["python", "-m", "experiments.recipe_comparisons", *argv])
    assert set(result["outcomes"]) == {"code_noreplay", "preference_sampled"}, result["outcomes"]
    assert not any(o.startswith("failed") for o in result["outcomes"].values()), result["outcomes"]
    assert set(result["baselines"]) == {"code_noreplay", "preference_sampled"}
    assert result["baselines"]["code_noreplay"]["forgetting"].keys() == {"language"}
    evaluated = json.loads((tmp_path / "models/gpu/preference_sampled/eval.json").read_text())["tools"]
    assert result["baselines"]["preference_sampled"]["tools"] == {g: {**{k: s[k] for k in SCORES}, "errors": s["errors"]}
                                                          for g, s in evaluated.items()}
    tagged = [p for p in (tmp_path / "data/preference").iterdir() if p.name.endswith("-t1")]
    assert len(tagged) == 1 and json.loads((tagged[0] / "manifest.json").read_text())["settings"]["temperature"] == 1.0
    rows = [line for line in (tmp_path / "rc" / "results.md").read_text().splitlines() if line.startswith("| ")]
    assert {row.split(" | ")[0][2:] for row in rows} >= {"language", "code", "tools", "code_noreplay", "preference_sampled"}


def test_staged_tokens_count_each_stages_windows_by_its_mixture():
    """By hand: language 10 steps x 8 x 256 alone; code 4 steps x 8 x 256 at 75/25 (configs/stages/code.yaml);
    tools 2 steps x 2 x 1,024 at 70/15/15 (configs/stages/tools.yaml), the window set by the line's args."""
    from experiments.recipe_comparisons import staged_tokens

    cpu = "configs/overlays/cpu.yaml"  # windows of 256 x 8
    config = {"stages": [
        {"name": "language", "configs": ["configs/stages/language.yaml", cpu], "args": ["--trainer.max_steps=10"]},
        {"name": "code", "configs": ["configs/stages/code.yaml", cpu], "args": ["--trainer.max_steps=4"]},
        {"name": "tools", "configs": ["configs/stages/tools.yaml", cpu], "args": [
            "--trainer.max_steps=2", "--data.init_args.seq_len=1024", "--data.init_args.batch_size=2"]}]}
    got = staged_tokens(config)
    assert got == pytest.approx({"language": 10 * 2048 + 0.25 * 4 * 2048 + 0.15 * 2 * 2048,
                                 "code": 0.75 * 4 * 2048 + 0.15 * 2 * 2048, "tools": 0.7 * 2 * 2048})


def test_the_gpu_pipelines_joint_baseline_trains_the_staged_paths_text_tokens():
    """configs/pipelines/gpu.yaml's joint run sees as many language and code tokens as the staged path trains,
    replay included, in the same proportions (the comparison the report card draws is at equal tokens)."""
    from experiments.recipe_comparisons import line_settings, staged_tokens

    config = yaml.safe_load((ROOT / "configs/pipelines/gpu.yaml").read_text())
    text = {d: t for d, t in staged_tokens(config).items() if d in ("language", "code")}
    joint = line_settings(config["baselines"][0])
    assert joint["steps"] * joint["window_tokens"] == pytest.approx(sum(text.values()), rel=0.001)
    for domain, share in joint["mixture"].items():
        assert share == pytest.approx(text[domain] / sum(text.values()), abs=0.001)


HARNESS_UNDER_TIMEOUT = """
import sys
from pathlib import Path
from experiments.gpu_pipeline import run

# the command stands in for `stagewise evaluate`: a process that would run for a minute, writing its pid first
child = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(60)"
run([sys.executable, "-c", child, sys.argv[1]], Path(sys.argv[2]), timeout=None)
"""


def test_a_signalled_harness_stops_the_command_it_runs(tmp_path):
    """A SIGTERM to the harness (the session script's `timeout`) reaches the command in its own process group:
    in run 3, `timeout 760` ended gpu_pipeline while the `stagewise evaluate` it had started could run on beside
    the next steps."""
    import signal
    import subprocess
    import sys
    import time

    pid_file, log = tmp_path / "pid", tmp_path / "log.txt"
    harness = subprocess.Popen([sys.executable, "-c", HARNESS_UNDER_TIMEOUT, str(pid_file), str(log)], cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.time() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    child = int(pid_file.read_text())
    harness.send_signal(signal.SIGTERM)
    assert harness.wait(timeout=30) == 128 + signal.SIGTERM
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the command outlived its harness")


def test_the_throughput_benchmark_measures_the_gpu_pipelines_shapes():
    """Each fit's tokens/s is reported against benchmark_throughput's small_text / small_tools rows: those must be
    the pipeline's model, vocabulary and windows (seq_len x batch) of its text and tool stages."""
    from experiments.benchmark_throughput import SIZES, vocab_of
    from experiments.recipe_comparisons import line_settings

    config = yaml.safe_load((ROOT / "configs/pipelines/gpu.yaml").read_text())
    vocab = yaml.safe_load((ROOT / config["data"]).read_text())["tokenizer"]["vocab_size"]
    for line in config["stages"] + config["baselines"]:
        size = "small_tools" if line["name"] == "tools" else "small_text"
        preset, seq_len, batch, _ = SIZES[size]
        assert "configs/model/small.yaml" in line["configs"] and preset == "small" and vocab_of(size) == vocab
        settings = line_settings(line)
        assert (settings["seq_len"], settings["batch_size"]) == (seq_len, batch), line["name"]


def test_preference_variants_share_one_pairs_step_and_differ_in_their_settings():
    """The preference variants make the tool stage's pairs with one command line (so, run side by side, the
    later one waits for the pairs instead of writing them too) and train from them with their own settings."""
    from experiments.recipe_comparisons import variants

    table = variants(yaml.safe_load((ROOT / "configs/pipelines/gpu.yaml").read_text()))
    specs = {n: table[n][0] for n in ("preference", "preference_lr2e6", "preference_ipo", "preference_dpop")}
    assert len({tuple(s.before) for s in specs.values()}) == 1 and specs["preference"].before[0] == "pairs"
    assert all(table[n][1] == "tools" for n in specs)
    assert specs["preference_lr2e6"].args[-1] == "--model.init_args.lr=2e-6"
    assert specs["preference_ipo"].args[-1] == "--model.init_args.loss_type=ipo"
    assert specs["preference_dpop"].args[-1] == "--model.init_args.dpop_lambda=50"
    # the sampled pairs are another command line, into their own tagged set, which that variant serves
    sampled = table["preference_sampled"][0]
    assert sampled.before[:len(specs["preference"].before)] == specs["preference"].before
    assert sampled.before[-4:] == ["--temperature", "1.0", "--tag", "t1"]
    assert sampled.args[-1] == "--data.init_args.pairs_tag=t1"


def test_the_decoding_benchmarks_graph_check_compares_graph_and_eager_static_tokens(monkeypatch, tmp_path):
    """The check the session script gates CUDA graphs on: float32, 8 left-padded prompts, 40 new tokens, whether a
    graph was captured and the share of rows whose tokens equal the eager static step's; and the gate itself."""
    import subprocess
    import sys

    import experiments.benchmark_decoding as bench
    from lightning_modules.causal_lm import CausalLM

    torch.manual_seed(0)
    model = CausalLM(size="tiny", vocab_size=128, model_overrides={"max_seq_len": 256})
    model.configure_model()
    check = bench.graph_check(model.eval(), 128)  # on a CPU both modes decode eagerly and nothing is captured
    assert check == {"prompts": 8, "prompt_tokens": check["prompt_tokens"], "new_tokens": 40, "precision": "float32",
                     "graph_captured": False, "graph_rows_equal_static": 1.0}
    assert 150 <= check["prompt_tokens"][0] <= check["prompt_tokens"][1] <= 200
    real = bench.decode

    def broken_graph(model, ids, mask, new, mode):  # a captured graph that garbles the first row's last token
        out, seconds = real(model, ids, mask, new, mode)
        if mode is True:
            bench.decoding.captures += 1
            out = out.clone()
            out[0, -1] = (out[0, -1] + 1) % 128
        return out, seconds

    monkeypatch.setattr(bench, "decode", broken_graph)
    assert bench.graph_check(model, 128)["graph_rows_equal_static"] == 0.875
    # gpu_session.sh's gate: graphs only when captured and every row is equal
    script = (ROOT / "experiments/gpu_session.sh").read_text()
    gate = script[script.index('python3 -c "') + len('python3 -c "'):script.index('"; then')]
    for found, graphs in (({"graph_captured": True, "graph_rows_equal_static": 1.0}, True),
                          ({"graph_captured": False, "graph_rows_equal_static": 1.0}, False),
                          ({"graph_captured": True, "graph_rows_equal_static": 0.875}, False),
                          (None, False), ({"error": "RuntimeError: x"}, False)):
        (tmp_path / "decoding_d_gpu_session.json").write_text(json.dumps({"check": found}))
        code = gate.replace("$RESULTS", str(tmp_path)).replace("${date}", "d")
        assert (subprocess.run([sys.executable, "-c", code]).returncode == 0) == graphs, found
