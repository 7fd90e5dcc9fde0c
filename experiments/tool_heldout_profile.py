"""What the held-out tool requests give away: how often the request names the function it wants, holds the
argument values verbatim, and how many tools it offers (the floor and the ceiling a tool-call score sits between).

    python -m experiments.tool_heldout_profile --data-dir data/full

For each held-out group (``seen``: the val split, services the corpus trains on; ``unseen``: services held out
whole), over every example, from the prepared shards exactly as the evaluation reads them
(``tool_eval.load_heldout_examples``):

- the tools the prompt offers (``tool_constraint.offered_tools``), whether the expected function is among them,
  how many share its service (:func:`service_of`), and the chance of the right name
  from a uniform pick among them (the mean of 1 / offered);
- whether every word of the expected function's operation (its name after the service, split at ``_``) occurs
  in the request (the last user turn, case-insensitive): the request names the function;
- whether every argument value (each leaf of the arguments, as JSON writes it, strings bare) occurs verbatim in
  the request: the call can be copied from the request;
- turns of more than one call, and the prompt's length in tokens.

Prints a table and writes ``experiments/results/tool_heldout_profile_<data dir name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
from pathlib import Path

from datamodules.tokenizer import END, USER, load_tokenizer
from lightning_modules.report_card import current_commit
from lightning_modules.tool_constraint import offered_tools
from lightning_modules.tool_eval import heldout_groups, load_heldout_examples

ROOT = Path(__file__).resolve().parents[1]


def leaves(value):
    """The scalar values of a JSON value, depth first."""
    if isinstance(value, dict):
        for v in value.values():
            yield from leaves(v)
    elif isinstance(value, list):
        for v in value:
            yield from leaves(v)
    else:
        yield value


def _text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def service_of(name: str) -> str:
    """The service of a function name: ``ec2`` of ``ec2_describe_instances``, ``az_network`` of
    ``az_network_vnet_create`` (azure-cli's commands all start with ``az``)."""
    parts = name.split("_")
    return "_".join(parts[:2]) if parts[0] == "az" and len(parts) > 2 else parts[0]


def profile_example(prompt_text: str, calls: list[dict], prompt_tokens: int) -> dict:
    """The facts of one held-out example (see the module docstring)."""
    request = prompt_text.rsplit(USER, 1)[-1].split(END, 1)[0]
    tools = offered_tools(prompt_text)
    name = calls[0]["name"]
    service = service_of(name)
    lower = request.lower()
    return {
        "offered": len(tools),
        "expected_offered": all(c["name"] in tools for c in calls),
        "same_service": sum(service_of(t) == service for t in tools),
        "named": all(w in lower for c in calls for w in c["name"][len(service_of(c["name"])):].split("_") if w),
        "values_verbatim": all(_text(v) in request for c in calls for v in leaves(c.get("arguments") or {})),
        "calls": len(calls),
        "prompt_tokens": prompt_tokens,
    }


def summarise(rows: list[dict]) -> dict:
    n = len(rows)
    frac = lambda key: sum(bool(r[key]) for r in rows) / n  # noqa: E731
    return {
        "n": n,
        "offered_median": statistics.median(r["offered"] for r in rows),
        "offered_mean": statistics.fmean(r["offered"] for r in rows),
        "expected_offered": frac("expected_offered"),
        "same_service_mean": statistics.fmean(r["same_service"] for r in rows),
        "chance_name": statistics.fmean(1 / r["offered"] for r in rows if r["offered"]),
        "named": frac("named"),
        "values_verbatim": frac("values_verbatim"),
        "named_and_verbatim": sum(r["named"] and r["values_verbatim"] for r in rows) / n,
        "several_calls": sum(r["calls"] > 1 for r in rows) / n,
        "prompt_tokens_median": statistics.median(r["prompt_tokens"] for r in rows),
    }


COLUMNS = [("n", "examples", "{:,}"), ("offered_median", "tools offered (median)", "{:g}"),
           ("same_service_mean", "of its service (mean)", "{:.1f}"), ("expected_offered", "expected offered", "{:.3f}"),
           ("chance_name", "name by chance", "{:.3f}"), ("named", "request names it", "{:.3f}"),
           ("values_verbatim", "values verbatim", "{:.3f}"), ("named_and_verbatim", "both", "{:.3f}"),
           ("several_calls", "several calls", "{:.3f}"), ("prompt_tokens_median", "prompt tokens (median)", "{:,.0f}")]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m experiments.tool_heldout_profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="data/full", help="a prepared data dir with a tool corpus")
    p.add_argument("--out", type=Path, help="default: experiments/results/tool_heldout_profile_<data dir name>")
    args = p.parse_args(argv)

    tok = load_tokenizer(Path(args.data_dir) / "tokenizer")
    groups = {}
    for group, split in heldout_groups(args.data_dir, "val").items():
        rows = [profile_example(tok.decode(e["prompt_ids"], skip_special_tokens=False), e["tool_calls"],
                                len(e["prompt_ids"]))
                for e in load_heldout_examples(args.data_dir, split, tokenizer=tok)]
        groups[group] = summarise(rows)
    command = shlex.join(["python", "-m", "experiments.tool_heldout_profile", *(sys.argv[1:] if argv is None else argv)])
    result = {"command": command, "commit": current_commit(), "date": datetime.date.today().isoformat(),
              "data_dir": str(args.data_dir), "groups": groups}
    lines = [f"# What the held-out tool requests give away (`{args.data_dir}`)", "",
             f"`{command}` at commit {str(result['commit'])[:10]}, {result['date']} (no model: facts of the data).", "",
             "| group | " + " | ".join(c[1] for c in COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    lines += ["| " + g + " | " + " | ".join(fmt.format(s[k]) for k, _, fmt in COLUMNS) + " |" for g, s in groups.items()]
    lines += ["", "*Request names it*: every word of the function's operation occurs in the last user turn. *Values "
              "verbatim*: every argument value does. *Name by chance*: a uniform pick among the offered tools."]
    out = args.out or ROOT / "experiments" / "results" / f"tool_heldout_profile_{Path(args.data_dir).name}"
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(result, indent=2) + "\n")
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
