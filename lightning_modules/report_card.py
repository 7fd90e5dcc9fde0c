"""The report card of an experiment: ``runs/<experiment>/report.json``, one entry per stage and baseline.

Each entry holds what a reader needs to judge a staged model: per-domain held-out loss of the checkpoint the
stage hands on, the same in bits per byte (comparable across tokenizers), forgetting of every earlier domain
against that domain's value at the end of its own stage, tool-call scores on seen and unseen services, tokens,
wall time, end-to-end tokens/s and MFU of its ``fit``; plus the card, the commit and the command. Shape::

    {"card", "commit", "command", "date", "experiment",
     "stages": {<stage>: {"losses": {<domain>: loss}, "bits_per_byte": {<domain>: bpb},
                          "forgetting": {<domain>: relative rise}, "tools": {"seen": {json_valid,
                          name_accuracy, call_accuracy, n}, "unseen": {...}}, "tokens", "wall_time_s",
                          "tokens_per_s", "mfu", ...}},
     "baselines": {<name>: {same fields}}}

Tool scores come from ``models/<experiment>/<stage>/eval.json`` where ``stagewise evaluate --out`` wrote one
(more examples than a fit scores), else from the stage's own record (``ToolCallEval``).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import subprocess
from pathlib import Path

from datamodules.preference import PREFERENCE
from datamodules.shards import open_split
from datamodules.stage_record import read_stage_record
from lightning_modules.tool_eval import DECODINGS, ERRORS

EVAL_FILE = "eval.json"  # beside stage.json: `stagewise evaluate --out models/<experiment>/<stage>/eval.json`
SCORES = ("json_valid", "name_accuracy", "call_accuracy", "n")


def machine_card(index: str | int | None = None) -> str:
    """The machine's GPUs (``2x NVIDIA H200``), or the name of GPU ``index``; ``cpu`` where there is none. From
    ``nvidia-smi``, so no CUDA context is opened in the calling process."""
    cmd = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", *([f"--id={index}"] if index is not None else [])]
    try:
        names = subprocess.run(cmd, capture_output=True, text=True).stdout.strip().splitlines()
    except FileNotFoundError:  # no NVIDIA driver here
        names = []
    if not names:
        return "cpu"
    return names[0] if index is not None else f"{len(names)}x {names[0]}"


def records_card(records) -> str | None:
    """``2x NVIDIA H200`` when the records that name their device all name the same one and count (None else)."""
    named = {(t["devices"], t["device"]) for t in (r.get("throughput") or {} for r in records) if t.get("device")}
    if len(named) != 1:
        return None
    devices, device = named.pop()
    return "cpu" if device == "cpu" else f"{devices}x {device}"


def current_commit() -> str | None:
    """``$STAGEWISE_COMMIT`` (a copy of the code without its git history names it so), else ``git rev-parse``."""
    if os.environ.get("STAGEWISE_COMMIT"):
        return os.environ["STAGEWISE_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    except FileNotFoundError:
        return None
    return out.stdout.strip() or None


def bits_per_byte(loss: float, bytes_per_token: float) -> float:
    """A held-out loss in nats per token as bits per byte of text (comparable across tokenizers)."""
    return loss / math.log(2) / bytes_per_token


def bytes_per_token(corpus_dir: str | Path, tokenizer, split: str = "val",
                    max_tokens: int | None = None) -> float | None:
    """UTF-8 bytes per token of a split, over the tokens its loss counts: every token of a text corpus, the
    masked (answer) tokens of a tool corpus; decoded run by run with ``tokenizer``. ``max_tokens``: only the
    split's first that many (the windows a validation capped by ``val_max_windows`` scores). None for an empty
    split."""
    import numpy as np

    data = open_split(corpus_dir, split)
    tokens = np.asarray(data.tokens)[:max_tokens]
    if data.mask is None:
        runs = [tokens]
    else:
        mask = np.asarray(data.mask)[:max_tokens].astype(bool)
        edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
        runs = [tokens[a:b] for a, b in zip(edges[::2], edges[1::2])]
    n = sum(len(r) for r in runs)
    if n == 0:
        return None
    text_bytes = sum(len(tokenizer.decode(r.tolist(), skip_special_tokens=False).encode("utf-8")) for r in runs)
    return text_bytes / n


def _tools(models_dir: Path, name: str, record: dict, kind: str = "tools") -> dict | None:
    """A run's tool scores per group: ``stagewise evaluate``'s (``kind``: ``tools``, ``tools_constrained`` for its
    constrained decoding, ``tools_strict`` for its strict one), else the fit's own from its record (free or
    constrained: ``ToolCallEval`` does not decode strictly)."""
    path = models_dir / name / EVAL_FILE
    groups = (json.loads(path.read_text()).get(kind) if path.is_file() else None) or {}
    if not groups:  # the fit's own (ToolCallEval's): free, or constrained where it decoded so as well
        recorded = record.get("tools") or {}
        if kind == "tools":
            groups = {g: recorded[g] for g in ("seen", "unseen") if isinstance(recorded.get(g), dict)}
            if not groups and "call_accuracy" in recorded:  # a record from before the seen/unseen groups
                groups = {"seen": recorded}
        elif kind == "tools_constrained":
            groups = {g: dict(s) for g, s in (recorded.get("constrained") or {}).items()}
        n = recorded.get("n")
        for g, scores in groups.items():
            scores.setdefault("n", n.get(g) if isinstance(n, dict) else n)
    # the wrong turns by reason (tool_eval.error_kind), where the evaluation counted them
    out = {g: {**{k: s.get(k) for k in SCORES}, **({"errors": s["errors"]} if s.get("errors") else {})}
           for g, s in groups.items()}
    return out or None


def _entry(name: str, record: dict, models_dir: Path, own_stage_losses: dict[str, float], bpt: dict[str, float]) -> dict:
    losses = dict((record.get("losses") or {}).get("best") or (record.get("losses") or {}).get("final") or {})
    preference = losses.pop(PREFERENCE, None)
    throughput = record.get("throughput") or {}
    entry = {
        "losses": losses,
        "bits_per_byte": {d: bits_per_byte(loss, bpt[d]) for d, loss in losses.items() if bpt.get(d)},
        "forgetting": {d: losses[d] / base - 1 for d, base in own_stage_losses.items() if d in losses},
        # free, with names among the offered tools and keys among their parameters (tool_constraint), and strictly
        # (also every required parameter, the call's JSON closed: `stagewise evaluate`'s only)
        **{kind: _tools(models_dir, name, record, kind) for kind in DECODINGS},
        "tokens": (record.get("tokens") or {}).get("stage"),
        "total_tokens": (record.get("tokens") or {}).get("total"),
        "wall_time_s": record.get("wall_time_s"),
        "tokens_per_s": throughput.get("tokens_per_s"),
        "mfu": throughput.get("mfu"),
        # of the fit's timed seconds, those from each validation's start to the next training step
        "validation_s": throughput.get("validation_s"),
        "training_tokens_per_s": throughput.get("training_tokens_per_s"),
        "parent": (record.get("parent") or {}).get("stage"),
        "domain": record.get("domain"),
        "replay": record.get("replay"),
    }
    if preference is not None:
        entry["preference_loss"] = preference
    return entry


def report_card(experiment: str, stages: list[str], baselines: list[str], models_dir: str | Path = "models",
                data_dir: str | Path | None = None, command: str | None = None, card: str | None = None) -> dict:
    """The report card of an experiment's finished stages and baselines (module docstring). ``data_dir``
    (default: the first stage's) gives the held-out splits' bytes per token for bits per byte; ``card`` the
    machine the runs trained on (default: the one their records name, else this one)."""
    from datamodules.tokenizer import load_tokenizer

    experiment_models = Path(models_dir) / experiment
    records = {n: read_stage_record(experiment_models, n) or {} for n in stages + baselines}
    if data_dir is None:
        first = records[stages[0]].get("config") or {}
        data_dir = ((first.get("data") or {}).get("init_args") or {}).get("data_dir") or "data"
    data_dir = Path(data_dir)
    domains = {d for r in records.values() for d in ((r.get("losses") or {}).get("best") or {}) if d != PREFERENCE}
    bpt = {}
    tokenizer = load_tokenizer(data_dir / "tokenizer") if (data_dir / "tokenizer").is_dir() else None
    for d in sorted(domains):
        if tokenizer is not None and (data_dir / d / "manifest.json").is_file():
            bpt[d] = bytes_per_token(data_dir / d, tokenizer)
    own: dict[str, float] = {}  # each domain's loss at the end of the stage that trained it
    own_after: dict[str, dict[str, float]] = {}  # `own` as it stood after each stage (a variant's parent)
    card = {"experiment": experiment, "card": card or records_card(records.values()) or machine_card(),
            "commit": current_commit(), "command": command,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "data_dir": str(data_dir), "bytes_per_token": bpt, "stages": {}, "baselines": {}}
    for name in stages:
        entry = _entry(name, records[name], experiment_models, dict(own), bpt)
        card["stages"][name] = entry
        domain = entry["domain"]
        if domain in entry["losses"] and domain not in own:
            own[domain] = entry["losses"][domain]
        own_after[name] = dict(own)
    for name in baselines:  # from scratch: no forgetting; a variant of a stage: against its parent's lineage
        parent = (records[name].get("parent") or {}).get("stage")
        card["baselines"][name] = _entry(name, records[name], experiment_models, own_after.get(parent, {}), bpt)
    return card


def write_report_card(card: dict, experiment_dir: str | Path) -> Path:
    """Write ``report.json`` into ``experiment_dir``; returns its path."""
    path = Path(experiment_dir) / "report.json"
    path.write_text(json.dumps(card, indent=2) + "\n")
    return path


def card_markdown(card: dict) -> list[str]:
    """The report card as markdown lines: one row per stage and baseline."""
    def pct(x: float | None) -> str:
        return "–" if x is None else f"{x:+.1%}"

    def num(x: float | None, digits: int = 3) -> str:
        return "–" if x is None else f"{x:.{digits}f}"

    rows = {**card["stages"], **card["baselines"]}
    order = ["language", "code", "tools"]
    domains = sorted({d for e in rows.values() for d in e["losses"]}, key=lambda d: (order.index(d) if d in order
                                                                                     else len(order), d))
    head = ["run"] + [f"{d} loss (bpb)" for d in domains] + ["forgetting", "tools seen json/name/call (n)",
                                                            "tools unseen json/name/call (n)", "tokens",
                                                            "wall", "tokens/s", "MFU"]
    lines = [f"Report card: {card['card']}, commit {str(card.get('commit'))[:10]}, {card['date']}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    def scores(s: dict | None) -> str:  # one group's json / name / call (n)
        return " / ".join(num(s.get(k), 2) for k in SCORES[:3]) + f" ({s.get('n')})" if s else "–"

    for name, e in rows.items():
        tools = e.get("tools") or {}
        cells = [name] + [f"{num(e['losses'].get(d))} ({num(e['bits_per_byte'].get(d), 3)})" if d in e["losses"] else "–"
                          for d in domains]
        cells += [", ".join(f"{d} {pct(v)}" for d, v in e["forgetting"].items()) or "–", scores(tools.get("seen")),
                  scores(tools.get("unseen")), f"{e['tokens'] or 0:,}", f"{e['wall_time_s'] or 0:.0f}s",
                  f"{e['tokens_per_s']:,}" if e.get("tokens_per_s") else "–", pct(e.get("mfu")).lstrip("+")]
        lines.append("| " + " | ".join(cells) + " |")
    for kind, title in (("tools_constrained", "Decoded with constrained names and argument keys (the offered tools "
                                              "and their parameters)"),
                        ("tools_strict", "Decoded strictly (also every required parameter named, the call's JSON "
                                         "closed before it ends)")):
        decoded = {name: e[kind] for name, e in rows.items() if e.get(kind)}
        if decoded:
            lines += ["", f"{title}, json/name/call (n): " + "; ".join(
                f"{name} " + ", ".join(f"{g} {scores(s)}" for g, s in groups.items())
                for name, groups in decoded.items())]
    labels = {"tools": "free", "tools_constrained": "constrained", "tools_strict": "strict"}
    errors = []  # each run's wrong calls by reason, per decoding and group
    for name, e in rows.items():
        for kind, label in labels.items():
            counted = {g: s["errors"] for g, s in (e.get(kind) or {}).items() if s.get("errors")}
            if counted:
                errors.append(f"{name} {label} " + ", ".join(
                    f"{g} " + " / ".join(str(c.get(r, 0)) for r in ERRORS) for g, c in counted.items()))
    if errors:
        lines += ["", "Wrong calls by reason (" + " / ".join(ERRORS) + "): " + "; ".join(errors)]
    return lines
