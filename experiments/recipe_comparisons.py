"""Recipe comparisons beside the GPU pipeline: variants of its stages, run in the same experiment so they start
from its checkpoints, a few workers at a time on one GPU, each scored as the pipeline's stages are.

Variants (each one stage, ``name``: what changes against the pipeline's stage of the same kind):

  code_noreplay   the code stage without its 25% language replay (parent: language)
  tools_noreplay  the tool stage without its 20% + 20% language and code replay (parent: code)
  tools_lr1e4     the tool stage at a third of its learning rate (1e-4 instead of 3e-4; parent: code)
  tools_long      the tool stage twice as long (its steps doubled, replay and LR as they are; parent: code)
  tools_replay30  the tool stage with 15% + 15% language and code replay instead of 20% + 20% (parent: code)
  joint_tools     the second baseline: language, code and tools mixed from scratch in the staged path's token
                  shares, for the staged path's total tokens (tool windows of 4,096 tokens throughout)
  preference      stage 4: `stagewise pairs` from the tool stage's own wrong calls, then DPO at LR 1e-5,
                  beta 0.1, SFT weight 1 (parent: tools); preference_lr2e6 at LR 2e-6, preference_ipo with
                  the IPO loss (the same pairs, made once); preference_sampled at LR 1e-5 from pairs whose
                  rejected answers are the tool model's samples at temperature 1 (`stagewise pairs --temperature
                  1.0 --tag t1`), on-policy mistakes where its greedy answers are mostly right;
                  preference_dpop at LR 1e-5 with DPO-Positive's penalty on the chosen calls' log-probability
                  falling below the reference's, which the other DPO stages let happen (run 9); `dpop_lambda` 50,
                  untuned: a fall of 0.1 nat then weighs as much as 5 nats of the chosen-over-rejected log-ratio

    python -m experiments.recipe_comparisons --experiment gpu --workers 3
    python -m experiments.recipe_comparisons --variants preference --workers 1

Writes ``experiments/results/recipe_comparisons_<date>.{json,md}`` (and a copy under ``$OUT``): per variant
its per-domain held-out losses, forgetting against each domain's own stage, tool scores on every held-out
example of the seen and unseen services, beside the pipeline stage it replaces. Finished variants are skipped.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import yaml

from experiments.gpu_pipeline import evaluation
from lightning_modules.pipeline import StageSpec, Workspace, data_dir_of, run_stage
from lightning_modules.report_card import card_markdown, report_card

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "configs" / "pipelines" / "gpu.yaml"


def _arg(line: dict, name: str):
    """The value of ``--<name>=...`` in a pipeline line's args (YAML-parsed; the last one wins), or None."""
    values = [a.split("=", 1)[1] for a in line["args"] if a.startswith(f"--{name}=")]
    return yaml.safe_load(values[-1]) if values else None


def line_settings(line: dict, root: Path = ROOT) -> dict:
    """A pipeline line's optimizer steps, windows (``seq_len`` x ``batch_size``) and mixture (window fractions by
    domain), as its config files and then its args set them."""
    data: dict = {}
    domain = None
    for path in line["configs"]:
        cfg = yaml.safe_load((root / path).read_text()) or {}
        data.update(((cfg.get("data") or {}).get("init_args")) or {})
        domain = (cfg.get("stage") or {}).get("domain", domain)
    for key in ("seq_len", "batch_size", "mixture"):
        value = _arg(line, f"data.init_args.{key}")
        data[key] = value if value is not None else data.get(key)
    return {"steps": _arg(line, "trainer.max_steps"), "seq_len": data["seq_len"], "batch_size": data["batch_size"],
            "window_tokens": data["seq_len"] * data["batch_size"],
            "mixture": data.get("mixture") or {domain: 1.0}}


def staged_tokens(config: dict, root: Path = ROOT) -> dict[str, float]:
    """Tokens the pipeline's staged path trains per domain, replay included (a share of a stage's windows is
    that share of its tokens): what a joint baseline must train to compare at equal tokens."""
    tokens: dict[str, float] = {}
    for line in config["stages"]:
        s = line_settings(line, root)
        for domain, share in s["mixture"].items():
            tokens[domain] = tokens.get(domain, 0.0) + share * s["steps"] * s["window_tokens"]
    return tokens


def variants(config: dict) -> dict[str, tuple[StageSpec, str | None, str]]:
    """name -> (stage, its parent, the pipeline run it is compared with), from the pipeline's own lines."""
    line = {s["name"]: s for s in config["stages"]}
    spec = lambda name, base, extra: StageSpec(name, line[base]["configs"], [*line[base]["args"], *extra])  # noqa: E731
    tools = line_settings(line["tools"])
    # joint_tools: the staged path's tokens by domain (replay included), in 4,096-token windows like the tool stage's
    tokens = staged_tokens(config)
    total = sum(tokens.values())
    mixture = "{" + ", ".join(f"{d}: {t / total:.3f}" for d, t in tokens.items()) + "}"
    joint_line = (config.get("baselines") or [{}])[0]
    # 8 validations, the last at the end (run 7's interval of 500 left the last 400 of 4,400 steps unscored): the
    # step count rounded to a multiple of 8 (7,000 at this pipeline's budget)
    interval = max(1, round(total / tools["window_tokens"] / 8))
    joint = StageSpec("joint_tools", ["configs/baselines/joint.yaml", *line["tools"]["configs"][1:]], [
        f"--trainer.max_steps={8 * interval}", f"--trainer.val_check_interval={interval}",
        *[a for a in joint_line.get("args", []) if a.startswith(("--model.init_args.lr=", "--model.init_args.warmup"))],
        "--model.init_args.loss_weighting=windows",
        *[a for a in line["tools"]["args"]
          if a.startswith(("--data.init_args.seq_len=", "--data.init_args.batch_size="))],
        f"--data.init_args.mixture={mixture}", "--best_checkpoint.monitor=val/tools/loss",
        "--trainer.callbacks+=callbacks.ToolCallEval"], parent="none")

    def preference(name: str, extra: list[str], pairs: tuple[str, ...] = ()) -> StageSpec:  # one set of pairs
        # 2,000 training requests: a pair each, of which 400 steps x 4 pairs use 1,600 (4,000 took 242 s in run 4).
        # Two validations: each scores every held-out window of the three domains and the 300 held-out pairs, 16 a
        # batch (preference.yaml's val_batch_size: a quarter of the batches; at 4 a batch, 355 took most of
        # run 7's 317 s)
        return StageSpec(name, ["configs/stages/preference.yaml", *line["tools"]["configs"][1:]], [
            "--trainer.max_steps=400", "--trainer.val_check_interval=200", "--model.init_args.lr=1e-5",
            "--data.init_args.seq_len=4096", "--data.init_args.batch_size=4", *extra],
            parent="tools", before=["pairs", "--parent", "{parent}", "--data_dir", "{data_dir}", "--limit", "2000",
                                    "--val_limit", "300", "--max_new_tokens", "256", *pairs])

    return {
        "code_noreplay": (spec("code_noreplay", "code", ["--data.init_args.mixture={code: 1.0}"]), "language", "code"),
        "tools_noreplay": (spec("tools_noreplay", "tools", ["--data.init_args.mixture={tools: 1.0}"]), "code", "tools"),
        "tools_lr1e4": (spec("tools_lr1e4", "tools", ["--model.init_args.lr=1e-4"]), "code", "tools"),
        "tools_replay30": (spec("tools_replay30", "tools",
                                ["--data.init_args.mixture={tools: 0.7, language: 0.15, code: 0.15}"]), "code", "tools"),
        "tools_long": (spec("tools_long", "tools", [f"--trainer.max_steps={2 * tools['steps']}",
                                                    f"--trainer.val_check_interval={tools['steps'] // 2}"]),
                       "code", "tools"),
        "joint_tools": (joint, None, "joint"),
        "preference": (preference("preference", []), "tools", "tools"),
        "preference_lr2e6": (preference("preference_lr2e6", ["--model.init_args.lr=2e-6"]), "tools", "tools"),
        "preference_ipo": (preference("preference_ipo", ["--model.init_args.loss_type=ipo"]), "tools", "tools"),
        "preference_dpop": (preference("preference_dpop", ["--model.init_args.dpop_lambda=50"]), "tools", "tools"),
        "preference_sampled": (preference("preference_sampled", ["--data.init_args.pairs_tag=t1"],
                                          ("--temperature", "1.0", "--tag", "t1")), "tools", "tools"),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m experiments.recipe_comparisons", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=PIPELINE, help="the pipeline whose stages the variants change")
    p.add_argument("--experiment", help="default: the pipeline's")
    p.add_argument("--variants", nargs="+", help="default: all")
    p.add_argument("--workers", type=int, default=3, help="variants trained at once (one GPU shared)")
    p.add_argument("--stage-args", type=json.loads, default=[], help="a JSON list added to every variant (smoke runs)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--eval-limit", type=int, default=400, help="held-out tool examples scored per group (0: all)")
    p.add_argument("--data-dir", help="default: the pipeline's data config's data_dir")
    p.add_argument("--out", type=Path, help="default: experiments/results/recipe_comparisons_<date>")
    args = p.parse_args(argv)

    config = yaml.safe_load(args.config.read_text())
    data_dir = args.data_dir or data_dir_of(config.get("data") and ROOT / config["data"])
    where = Workspace(args.experiment or config.get("experiment", "gpu"), "models", "runs", data_dir)
    table = variants(config)
    chosen = args.variants or list(table)

    def one(name: str) -> tuple[str, str]:
        spec, parent, _ = table[name]
        spec = replace(spec, args=[*spec.args, *args.stage_args])
        log_dir = Path(where.runs_dir) / where.experiment / name
        try:
            outcome = run_stage(spec, parent, where, log_to_files=True)
        except Exception as err:  # noqa: BLE001  (one failed variant must not stop the others)
            return name, f"failed: {err} (see {log_dir}/stderr.log)"
        cmd = evaluation(Path(where.models_dir), where.experiment, name, where.data_dir, args.max_new_tokens,
                         args.eval_limit)
        if cmd and subprocess.run(cmd).returncode != 0:
            return name, f"{outcome}; its evaluation failed (`{shlex.join(cmd)}`)"
        return name, outcome

    out = args.out or ROOT / "experiments" / "results" / f"recipe_comparisons_{datetime.date.today().isoformat()}"
    command = shlex.join(["python", "-m", "experiments.recipe_comparisons", *(sys.argv[1:] if argv is None else argv)])
    outcomes: dict[str, str] = {}
    result: dict = {}
    with futures.ThreadPoolExecutor(args.workers) as pool:
        for job in futures.as_completed([pool.submit(one, name) for name in chosen]):
            name, outcome = job.result()
            outcomes[name] = outcome
            result = write_results(out, where, config, table, chosen, outcomes, command)  # after every variant
    return result


def write_results(out: Path, where: Workspace, config: dict, table: dict, chosen: list[str], outcomes: dict,
                  command: str) -> dict:
    """results.json + results.md under ``out`` (and a copy under ``$OUT``) from the variants finished so far."""
    staged = [s["name"] for s in config["stages"]]
    done = [n for n in chosen if n in outcomes and (Path(where.models_dir) / where.experiment / n / "stage.json").is_file()]
    card = report_card(where.experiment, [n for n in staged if (Path(where.models_dir) / where.experiment / n /
                                                                  "stage.json").is_file()],
                       done, where.models_dir, where.data_dir, command=command)
    result = {"outcomes": outcomes, "compared_with": {n: table[n][2] for n in chosen}, **card}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    pending = [n for n in chosen if n not in outcomes]
    lines = [f"# Recipe comparisons beside `{where.experiment}`", "", f"Command: `{command}`", "",
             "Each variant's row beside the pipeline's stages (the variants under 'baselines'): "
             + ", ".join(f"`{n}` vs `{table[n][2]}`" for n in chosen) + ".", "", *card_markdown(card), "",
             "Outcomes: " + ", ".join(f"{n}: {o}" for n, o in outcomes.items())
             + (f". Not finished: {', '.join(pending)}" if pending else "")]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    copy = Path(os.environ["OUT"]) / out.name if os.environ.get("OUT") else None
    if copy is not None and copy.resolve() != out.resolve():  # --out may be under $OUT already (gpu_session.sh)
        shutil.copytree(out, copy, dirs_exist_ok=True)
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
