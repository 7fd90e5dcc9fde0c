"""The staged-vs-joint study's plan: its arms, conditions and budget, each run as a stage of the pipeline
(configs, overrides, key), and :class:`Study`, what is done and what is left to run, in which order
(``experiments/staged_vs_joint.py`` runs it, ``experiments/staged_vs_joint_results.py`` reports it)."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shlex
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from datamodules.stage_record import file_sha256
from lightning_modules.pipeline import StageSpec, Workspace, fit_command

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ("language", "code")
ARMS = ("trained", "seed")
SEED_RECIPE = {"stage1_lr": 3e-5, "staged_lr": 5e-6, "forgetting_lr": 1e-5, "warmup_steps": 300}
JOINT_CODE_FRACTION = 0.07  # the seed's 93/7 mixture

console = Console(highlight=False, soft_wrap=True)


# ----------------------------------------------------------------------------------------------- names
def lr_tag(lr: float) -> str:
    """An LR as it appears in stage and condition names: 3e-4, 2p5e-4 (stage names have no dots)."""
    mantissa, exponent = f"{lr:e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}".replace(".", "p")


def replay_condition(fraction: float) -> str:
    """``replay5`` for 5% language replay (``staged`` is replay 0%)."""
    return "staged" if fraction == 0 else "replay" + f"{fraction * 100:g}".replace(".", "p")


def lr_condition(arm: str, lr: float, args: argparse.Namespace) -> str:
    """The condition of ``arm`` whose stage 2 runs at ``lr`` without replay or carried moments."""
    main_lr = args.stage2_lr if arm == "trained" else SEED_RECIPE["staged_lr"]
    return "staged" if math.isclose(lr, main_lr) else f"staged_lr{lr_tag(lr)}"


# ----------------------------------------------------------------------------------------------- plan
@dataclass
class Budget:
    """Optimizer steps of each kind of run (multiples of ``--val-points``) and tokens per step."""

    tokens_per_step: int
    stage1_steps: int
    stage2_steps: int

    @property
    def joint_steps(self) -> int:
        return self.stage1_steps + self.stage2_steps

    @property
    def code_share(self) -> float:
        """The staged path's code share: stage-2 tokens / all tokens (joint_upsampled's mixture)."""
        return self.stage2_steps / self.joint_steps


def plan_budget(args: argparse.Namespace) -> Budget:
    per_step = args.seq_len * args.batch_size

    def steps(tokens: float) -> int:  # a multiple of val_points, so the last validation is at the last step
        return args.val_points * max(1, round(tokens / per_step / args.val_points))

    return Budget(per_step, steps(args.stage1_tokens), steps(args.stage2_tokens))


@dataclass
class Run:
    """One stage of the study: stage ``name`` of experiment ``<arm>_s<seed>``."""

    arm: str
    condition: str  # stage1, staged, staged_carry, staged_lr<x>, replay<p>, joint, joint_upsampled
    seed: int
    name: str
    configs: list[str]
    lr: float
    steps: int
    warmup: int
    tier: int  # order: 0 the stage-1 sweep, 1 staged vs joint (and the seed arm's 1e-5), 2 claim 2, 3 carry and
    # 5% replay, 4 the rest
    parent: Run | None = None
    mixture: dict[str, float] | None = None
    carry: bool = False
    replay: float = 0.0
    sweep: bool = False  # a stage-1 run of the trained arm's LR sweep
    key: str = ""

    @property
    def stage(self) -> int:
        """1: from scratch (stage 1, joint); 2: from a stage 1."""
        return 2 if self.parent else 1

    @property
    def experiment(self) -> str:
        return f"{self.arm}_s{self.seed}"

    @property
    def label(self) -> str:
        lr = f" (lr {self.lr:g})" if self.condition == "stage1" else ""
        return f"{self.arm}/{self.condition}/seed{self.seed}{lr}"


def _config(*parts: str) -> str:
    return str(Path("configs", *parts))


def plan_runs(args: argparse.Namespace, budget: Budget, chosen_lr: float | None) -> list[Run]:
    """Every run of the study (all arms, conditions and seeds of ``args``; the subset filters are applied later).
    Without ``chosen_lr`` the trained arm holds only its stage-1 sweep. Keys are left to :func:`assign_keys`."""
    model = _config("model", f"{args.size}.yaml")
    runs: list[Run] = []
    sweep_seed = args.study_seeds[0]
    warm = lambda steps: max(1, round(args.warmup_fraction * steps))  # noqa: E731
    seed_warm = lambda steps: max(1, min(SEED_RECIPE["warmup_steps"], steps // 2))  # noqa: E731

    def stage1(arm: str, seed: int, lr: float, sweep: bool = False) -> Run:
        warmup = warm(budget.stage1_steps) if arm == "trained" else seed_warm(budget.stage1_steps)
        return Run(arm, "stage1", seed, f"language_lr{lr_tag(lr)}", [_config("stages", "language.yaml"), model], lr,
                   budget.stage1_steps, warmup, tier=0 if sweep else 1, sweep=sweep)

    def stage2(arm: str, condition: str, parent: Run, lr: float, tier: int, replay: float = 0.0,
               carry: bool = False) -> Run:
        warmup = warm(budget.stage2_steps) if arm == "trained" else seed_warm(budget.stage2_steps)
        # always explicit: code.yaml's own default is 25% language replay
        mixture = {"code": round(1 - replay, 6), "language": replay} if replay else {"code": 1.0}
        return Run(arm, condition, parent.seed, condition, [_config("stages", "code.yaml"), model], lr,
                   budget.stage2_steps, warmup, tier, parent=parent, mixture=mixture, carry=carry, replay=replay)

    def joint(arm: str, condition: str, seed: int, lr: float, code: float, tier: int) -> Run:
        warmup = warm(budget.joint_steps) if arm == "trained" else seed_warm(budget.joint_steps)
        return Run(arm, condition, seed, condition, [_config("baselines", "joint.yaml"), model], lr, budget.joint_steps,
                   warmup, tier, mixture={"language": round(1 - code, 6), "code": code})

    if "trained" in args.arms:
        for lr in args.stage1_lrs:
            runs.append(stage1("trained", sweep_seed, lr, sweep=True))
        if chosen_lr is not None:
            for seed in args.study_seeds:
                parent = next((r for r in runs if r.seed == seed and math.isclose(r.lr, chosen_lr)), None)
                if parent is None:
                    runs.append(parent := stage1("trained", seed, chosen_lr))
                runs.append(stage2("trained", "staged", parent, args.stage2_lr, 1))
                runs.append(joint("trained", "joint", seed, chosen_lr, JOINT_CODE_FRACTION, 1))
                runs.append(joint("trained", "joint_upsampled", seed, chosen_lr, round(budget.code_share, 6), 1))
                for lr in args.stage2_lrs:
                    if lr_condition("trained", lr, args) != "staged":
                        tier = 2 if any(math.isclose(lr, x) for x in (5e-6, 1e-5)) else 4
                        runs.append(stage2("trained", lr_condition("trained", lr, args), parent, lr, tier))
                runs.append(stage2("trained", "staged_carry", parent, args.stage2_lr, 3, carry=True))
                for fraction in args.replays:
                    tier = 3 if math.isclose(fraction, 0.05) else 4
                    runs.append(stage2("trained", replay_condition(fraction), parent, args.stage2_lr, tier,
                                       replay=fraction))
    if "seed" in args.arms:
        for seed in args.study_seeds:
            parent = stage1("seed", seed, SEED_RECIPE["stage1_lr"])
            runs.append(parent)
            runs.append(stage2("seed", "staged", parent, SEED_RECIPE["staged_lr"], 1))
            runs.append(joint("seed", "joint", seed, SEED_RECIPE["stage1_lr"], JOINT_CODE_FRACTION, 1))
            # tier 1 as well: its stage 1 has no other stage-2 run, so it never has to be trained again for it
            runs.append(stage2("seed", lr_condition("seed", SEED_RECIPE["forgetting_lr"], args), parent,
                               SEED_RECIPE["forgetting_lr"], 1))
    return runs


def conditions_of(args: argparse.Namespace) -> dict[str, list[str]]:
    """The conditions each arm has with these settings (``sweep`` and ``stage1`` included)."""
    trained = ["sweep", "stage1", "staged", "staged_carry", "joint", "joint_upsampled"]
    trained += [c for c in (lr_condition("trained", lr, args) for lr in args.stage2_lrs) if c != "staged"]
    trained += [replay_condition(f) for f in args.replays]
    seed = ["stage1", "staged", lr_condition("seed", SEED_RECIPE["forgetting_lr"], args), "joint"]
    return {"trained": trained, "seed": seed}


def selected(run: Run, args: argparse.Namespace) -> bool:
    """Whether the subset filters (``--arms``, ``--conditions``, ``--seeds``) ask for ``run`` itself."""
    if run.arm not in args.run_arms or run.seed not in args.seeds and not run.sweep:
        return False
    if args.conditions is None:
        return True
    return run.condition in args.conditions or (run.sweep and "sweep" in args.conditions)


# ----------------------------------------------------------------------------------------------- stages
def repo_relative(path: Path) -> str:
    """``path`` relative to the repository when inside it (the subprocesses run there), else absolute."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def workspace(run: Run, args: argparse.Namespace) -> Workspace:
    """The experiment of ``run`` and its directories (relative to the repository, where the fits run)."""
    return Workspace(run.experiment, repo_relative(args.work_dir / "models"), repo_relative(args.work_dir / "runs"),
                     repo_relative(args.data_dir))


def run_dir(run: Run, args: argparse.Namespace) -> Path:
    return args.work_dir / "runs" / run.experiment / run.name


def best_checkpoint(run: Run, args: argparse.Namespace) -> Path:
    return args.work_dir / "models" / run.experiment / f"{run.name}_model_best.ckpt"


def stage_spec(run: Run, args: argparse.Namespace) -> StageSpec:
    """The stage of ``run``: its configs and the overrides that make the study's budget."""
    cpu = args.devices[0] == "cpu"
    callbacks = []
    if run.parent:  # the stability gap: language held-out loss densely early in stage 2
        callbacks.append({"class_path": "callbacks.StabilityGap", "init_args": {
            "every_n_steps": args.probe_every, "until": args.probe_until, "domains": ["language"]}})
    overrides = [
        f"--seed_everything={run.seed}",
        f"--trainer.max_steps={run.steps}",
        "--trainer.max_epochs=-1",
        f"--trainer.val_check_interval={run.steps // args.val_points}",
        "--trainer.check_val_every_n_epoch=null",
        "--trainer.limit_val_batches=1.0",
        f"--trainer.log_every_n_steps={max(1, min(50, run.steps // 20))}",
        f"--trainer.accelerator={'cpu' if cpu else 'gpu'}",
        "--trainer.devices=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        # wall times are compared: no text samples or throughput probes
        f"--trainer.callbacks={json.dumps(callbacks)}",
        # The final weights are handed on and scored: every validation replaces the file, the last one is at
        # the last step. The next stage starts from them; resumes and carried moments use last.ckpt.
        "--best_checkpoint.keep=final",
        "--best_checkpoint.save_weights_only=true",
        "--last_checkpoint.every_n_train_steps=0",
        "--handoff.export_hf=false",
        f"--model.init_args.lr={run.lr:g}",
        f"--model.init_args.warmup_steps={run.warmup}",
        f"--model.init_args.compile={str(args.compile).lower()}",
        f"--data.init_args.seq_len={args.seq_len}",
        f"--data.init_args.batch_size={args.batch_size}",
        f"--data.init_args.seed={run.seed}",
        f"--data.init_args.val_max_windows={args.val_windows}",
    ]
    if run.condition == "stage1":
        overrides.append("--data.init_args.val_domains=[language, code]")  # code's curve from the start
    if run.mixture:
        overrides.append(f"--data.init_args.mixture={json.dumps(run.mixture)}")
    if run.carry:
        overrides.append("--model.init_args.carry_optimizer=true")
    return StageSpec(run.name, run.configs, overrides)


def command_of(run: Run, args: argparse.Namespace) -> str:
    """The ``stagewise fit`` command line of ``run`` (run from the repository root)."""
    cmd = fit_command(stage_spec(run, args), run.parent and run.parent.name, workspace(run, args))
    return shlex.join(["python", *cmd[1:]])


def data_fingerprint(data_dir: Path) -> str:
    """The prepared data's identity, so other data never counts as a finished run: per domain its config key (the
    config's settings and the tokenizer's sha256) and its documents and tokens per split. Not the manifests' own
    keys: those hold the source files' mtimes, which a fresh install of the same packages changes (the data
    prepared again on another machine had other keys and the same tokens)."""
    parts = []
    for domain in DOMAINS:
        manifest = data_dir / domain / "manifest.json"
        if not manifest.is_file():
            parts.append("unprepared")
            continue
        m = json.loads(manifest.read_text())
        parts.append([m.get("config_key", ""), m.get("tokenizer_sha256", ""), m.get("documents"), m.get("tokens")])
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def assign_keys(runs: list[Run], args: argparse.Namespace, fingerprint: str) -> None:
    """Each run's key: its stage's command (configs named, overrides, name, experiment; not what the config files
    hold, so an edited config does not re-run finished runs), its parent's key and the data; not the directories
    it writes to, so another ``--work-dir`` finds the same runs done."""
    for run in runs:  # parents come before their children
        spec = stage_spec(run, args)
        blob = [spec.configs, spec.args, run.name, run.experiment, run.parent.key if run.parent else None, fingerprint]
        run.key = hashlib.sha256(json.dumps(blob).encode()).hexdigest()[:16]


def load_results(out: Path) -> tuple[list[dict], list[dict]]:
    """The entries of ``<out>/results.json`` and its history of commands (none when there is no file)."""
    path = out / "results.json"
    if not path.is_file():
        return [], []
    results = json.loads(path.read_text())
    return list(results.get("runs") or []), list((results.get("study") or {}).get("commands") or [])


# ----------------------------------------------------------------------------------------------- state
class Study:
    """What is done and what is left, shared by the worker threads (every method runs under ``self.lock``)."""

    def __init__(self, args: argparse.Namespace, budget: Budget, fingerprint: str):
        self.args, self.budget, self.fingerprint = args, budget, fingerprint
        self.entries, self.commands = load_results(args.out)
        self.lock = threading.Condition()
        self.in_flight: dict[str, float] = {}  # key -> when it started (seconds into the study)
        self.tried: set[str] = set()  # keys run (or failed) by this command: never twice
        self.clock = time.perf_counter  # seconds; the time budget counts from the study's start
        self.start = self.clock()
        self.stopped = False  # the time budget is spent: no new run starts
        self.runs = self.plan()

    def elapsed(self) -> float:
        return self.clock() - self.start

    # --- the plan and the sweep
    def plan(self) -> list[Run]:
        runs = plan_runs(self.args, self.budget, self.chosen_lr_if_known())
        assign_keys(runs, self.args, self.fingerprint)
        return runs

    def ok(self, key: str) -> list[dict]:
        return [e for e in self.entries if e.get("key") == key and e.get("status") == "ok"]

    def done(self, key: str) -> bool:
        return any(e.get("key") == key and e.get("status") in ("ok", "diverged") for e in self.entries)

    def sweep_runs(self) -> list[Run]:
        runs = plan_runs(self.args, self.budget, None)
        assign_keys(runs, self.args, self.fingerprint)
        return [r for r in runs if r.sweep]

    def sweep_losses(self) -> dict[float, float | None]:
        """Final language loss of each sweep LR (None: diverged); LRs not yet run are absent."""
        out = {}
        for run in self.sweep_runs():
            ok = self.ok(run.key)
            if ok:
                out[run.lr] = ok[0]["losses"]["final"]["language"]
            elif self.done(run.key):
                out[run.lr] = None
        return out

    def chosen_lr_if_known(self) -> float | None:
        """``--stage1-lr``, else the sweep LR with the lowest final language loss once every sweep LR has run."""
        if self.args.stage1_lr is not None:
            return self.args.stage1_lr
        losses = self.sweep_losses()
        finite = {lr: loss for lr, loss in losses.items() if loss is not None and math.isfinite(loss)}
        if len(losses) < len(self.args.stage1_lrs) or not finite:
            return None
        return min(finite, key=finite.get)

    def stage1_loss(self) -> float | None:
        """Final language loss of the trained arm's stage 1 at the chosen LR (its first finished run), if known."""
        lr = self.chosen_lr_if_known()
        for run in self.runs:
            if run.arm == "trained" and run.condition == "stage1" and lr is not None and math.isclose(run.lr, lr):
                ok = self.ok(run.key)
                if ok:
                    return ok[0]["losses"]["final"]["language"]
        return None

    def target_met(self) -> bool:
        """Whether the trained arm's stage 1 reaches ``--stage1-target`` (unknown, for an explicit ``--stage1-lr``
        not yet run, counts as met: it must run to tell)."""
        loss = self.stage1_loss()
        return self.args.ignore_target or loss is None or loss <= self.args.stage1_target

    def wants_trained(self) -> bool:
        """Whether this command asks for trained-arm runs that need the sweep's LR."""
        if "trained" not in self.args.run_arms:
            return False
        wanted = set(self.args.conditions or conditions_of(self.args)["trained"]) - {"sweep"}
        return bool(wanted & set(conditions_of(self.args)["trained"]))

    # --- what is left
    def available(self, run: Run) -> bool:
        """Whether ``run``'s best checkpoint is on disk and is the one a finished entry of it describes."""
        path = best_checkpoint(run, self.args)
        return path.is_file() and file_sha256(path) in {e.get("checkpoint_sha256") for e in self.ok(run.key)}

    def children(self, run: Run) -> list[Run]:
        return [r for r in self.runs if r.parent is run and selected(r, self.args) and not self.done(r.key)]

    def needed(self, run: Run) -> bool:
        """Whether ``run`` must run now: asked for and not done, or a stage 1 some pending run needs on disk."""
        if selected(run, self.args) and not self.done(run.key):
            return True
        if run.sweep and not self.done(run.key) and self.chosen_lr_if_known() is None and self.wants_trained():
            return True  # the trained arm's conditions wait for the LR it chooses
        return run.stage == 1 and bool(self.children(run)) and not self.available(run)

    def blocked(self, run: Run) -> str | None:
        """Why ``run`` cannot start in this command, if it cannot."""
        if run.arm == "trained" and not run.sweep and not self.target_met():
            return (f"the trained arm's stage 1 misses the target of {self.args.stage1_target} nats/token; raise "
                    "--stage1-tokens (or pass --ignore-target)")
        if run.parent is not None:
            if run.parent.key in self.tried and not self.available(run.parent):
                return "its stage 1 failed in this command"
            if not self.available(run.parent):
                return "waits for its stage 1"
        return None

    def time_scale(self) -> float:
        """How long the finished runs took against :meth:`estimate_s`'s assumptions (1 before any has run)."""
        runs = {r.key: r for r in self.runs}
        measured = [(e["process_time_s"], self.estimate_s(runs[e["key"]], 1.0)) for e in self.entries
                    if e.get("key") in runs and e.get("process_time_s")]
        return sum(m for m, _ in measured) / sum(g for _, g in measured) if measured else 1.0

    def estimate_s(self, run: Run, scale: float | None = None) -> float:
        """Seconds ``run`` should take with every worker busy: ``--assume-start-s`` plus its tokens at its workers'
        share of ``--assume-tokens-per-s``, times ``scale`` (default :meth:`time_scale`)."""
        args = self.args
        per_gpu = len(args.devices) / len(set(args.devices))
        guess = args.assume_start_s + run.steps * self.budget.tokens_per_step / (args.assume_tokens_per_s / per_gpu)
        return guess * (self.time_scale() if scale is None else scale)

    def fits(self, run: Run) -> bool:
        """Whether a stage 1 that only later stage-2 runs need can be trained, with those runs, before the time
        budget ends: their estimated worker-seconds within what the workers have left after the work begun (runs in
        flight, and the pending runs of stage 1s on disk or in flight). A stage 1 that cannot is not trained: its
        stage-2 runs would be left for another command, which would have to train it again."""
        if self.args.time_budget is None:
            return True
        now, scale = self.elapsed(), self.time_scale()
        seconds = {r.key: self.estimate_s(r, scale) for r in self.runs}
        left = len(self.args.devices) * (self.args.time_budget - now)
        begun = sum(max(0.0, seconds.get(k, 0.0) - (now - t)) for k, t in self.in_flight.items())
        for parent in self.runs:
            if parent.stage == 1 and (parent.key in self.in_flight or self.available(parent)):
                begun += sum(seconds[c.key] for c in self.children(parent) if c.key not in self.in_flight)
        return seconds[run.key] + sum(seconds[c.key] for c in self.children(run)) <= left - begun

    def priority(self, run: Run) -> tuple:
        """Decisive runs (tiers 0-1) by tier and seed; then runs whose stage 1 is on disk, then other from-scratch
        runs, then stage 1s to train for the rest; each by tier and seed."""
        tier = run.tier
        if run.stage == 1:  # a stage 1 done before but needed again counts as its most urgent stage-2 run
            tier = min(([] if self.done(run.key) else [run.tier]) + [c.tier for c in self.children(run)] or [tier])
        if tier <= 1:
            return (0, 0, tier, run.seed)
        group = 0 if run.parent else 2 if self.children(run) else 1
        return (1, group, run.seed, tier)

    def ready(self, run: Run) -> bool:
        """Whether ``run`` may start now: nothing blocks it and, for a stage 1 trained for later runs, it fits."""
        if self.blocked(run) is not None:
            return False
        return not (self.priority(run)[:2] == (1, 2) and not self.fits(run))

    def todo(self) -> list[Run]:
        """Runs still to start in this command, most important first."""
        runs = [r for r in self.runs if r.key not in self.tried and r.key not in self.in_flight and self.needed(r)]
        return sorted(runs, key=lambda r: (self.priority(r), self.runs.index(r)))

    def next_run(self) -> Run | None:
        """The next run to start, waiting while only runs that depend on running ones are left; None at the end."""
        with self.lock:
            while True:
                if self.args.time_budget is not None and self.elapsed() >= self.args.time_budget:
                    if not self.stopped:
                        console.print(f"[yellow]time budget of {self.args.time_budget:g}s spent: no new run starts[/]")
                    self.stopped = True
                    return None
                ready = next((r for r in self.todo() if self.ready(r)), None)
                if ready is not None:
                    self.in_flight[ready.key] = self.elapsed()
                    return ready
                if not self.in_flight:
                    return None
                self.lock.wait()

    def finish(self, run: Run, entry: dict) -> None:
        with self.lock:
            self.in_flight.pop(run.key, None)
            self.tried.add(run.key)
            earlier = self.ok(run.key)
            if earlier and entry["status"] == "ok":
                entry["retrain"] = len(earlier)  # a stage 1 trained again for its stage-2 runs (another machine)
            self.entries.append(entry)
            self.runs = self.plan()  # the sweep may have decided the trained arm's LR
            self.lock.notify_all()


