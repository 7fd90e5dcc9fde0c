"""Batched greedy decoding of a model preset, three ways: ``forward`` with a growing KV cache (eager), the
static-shape ``decode_step`` (eager: ``STAGEWISE_CUDA_GRAPHS=0``) and ``decode_step`` replayed as a CUDA graph
(``generate``'s default on a GPU). Random weights and prompts: nothing stops early, so every row decodes all
``--new`` tokens.

For each mode: prefill time, milliseconds per decoded token step (all rows together), new tokens per second,
and the fraction of rows whose tokens equal the growing-cache mode's and (for the graph) the static step's. With
random weights the logits are nearly even, so under bf16 a small numerical difference flips an argmax somewhere
in a long decode (on an H200, 64 x 256 tokens: static step vs growing cache 0.61 of rows equal, graph vs static
step 0.64), and each mode is also compared with its own first run, which says whether a mode is deterministic at
this shape at all. Those fractions are information, not a test. The test is the ``check`` (on a GPU): graph vs
eager static step on 8 short prompts in float32, where a graph that reads or writes the wrong memory (the slot
counter, positions, masks) changes the rows (run 3's check there: bitwise-equal logits in float32 and bf16);
``experiments/gpu_session.sh`` decodes eagerly unless the graph was captured and all of its rows are equal.
Prints a table, writes ``decoding_<tag>.json`` / ``.md`` to ``experiments/results/`` and ``$OUT``.

    python -m experiments.benchmark_decoding                       # small, 64 prompts of 1,000-3,000 tokens
    python -m experiments.benchmark_decoding --size tiny --batch 4 --prompt 64 --new 16   # a CPU check
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import torch

from experiments.benchmark_throughput import save_results
from lightning_modules import decoding
from lightning_modules.causal_lm import CausalLM
from lightning_modules.report_card import current_commit, machine_card

MODES = {"growing cache": False, "static step": "eager", "static step, CUDA graph": True}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode(model: CausalLM, ids: torch.Tensor, mask: torch.Tensor, new: int, mode) -> tuple[torch.Tensor, float]:
    """Tokens and seconds of one ``generate`` (``mode``: False, "eager" or True, as in MODES)."""
    before = os.environ.get("STAGEWISE_CUDA_GRAPHS")
    os.environ["STAGEWISE_CUDA_GRAPHS"] = "0" if mode == "eager" else "1"
    try:
        sync(model.device)
        start = time.perf_counter()
        out = model.generate(ids, new, attention_mask=mask, static=bool(mode))
        sync(model.device)
    finally:
        os.environ.pop("STAGEWISE_CUDA_GRAPHS") if before is None else os.environ.update(STAGEWISE_CUDA_GRAPHS=before)
    return out, time.perf_counter() - start


CHECK_PROMPT, CHECK_NEW = 200, 40  # graph_check's longest prompt and new tokens (the model must hold both)


def graph_check(model: CausalLM, vocab: int) -> dict:
    """Graph vs eager static step in float32: 8 prompts of 150-200 tokens (left-padded), 40 new tokens each.
    ``graph_captured`` is False when no graph was captured (off a GPU, or a failed capture: ``generate`` then warns
    and decodes eagerly), where equal rows say nothing about a graph."""
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(150, CHECK_PROMPT + 1, (8,), generator=g)
    ids = torch.randint(0, vocab, (8, CHECK_PROMPT), generator=g)
    mask = (torch.arange(CHECK_PROMPT)[None] >= CHECK_PROMPT - lengths[:, None]).long()
    eager, _ = decode(model, ids, mask, CHECK_NEW, "eager")
    before = decoding.captures
    graph, _ = decode(model, ids, mask, CHECK_NEW, True)
    captured = decoding.captures > before
    equal = float((graph == eager).all(1).float().mean()) if graph.shape == eager.shape else 0.0
    return {"prompts": 8, "prompt_tokens": [int(lengths.min()), int(lengths.max())], "new_tokens": CHECK_NEW,
            "precision": "float32", "graph_captured": captured, "graph_rows_equal_static": equal}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m experiments.benchmark_decoding", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="small")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt", type=int, default=3000, help="longest prompt; the others 1/3 of it to all of it")
    p.add_argument("--new", type=int, default=256, help="tokens decoded per row")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per mode (after one untimed; at least 1)")
    p.add_argument("--tag", default=None)
    args = p.parse_args(argv)
    args.repeats = max(1, args.repeats)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = CausalLM(size=args.size, vocab_size=args.vocab,
                     model_overrides={"max_seq_len": max(args.prompt + args.new, CHECK_PROMPT + CHECK_NEW)})
    model.configure_model()
    model = model.to(device).eval()
    lengths = torch.randint(args.prompt // 3, args.prompt + 1, (args.batch,))
    ids = torch.randint(0, args.vocab, (args.batch, args.prompt))
    mask = (torch.arange(args.prompt)[None] >= args.prompt - lengths[:, None]).long()  # left padding
    precision = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    modes = {k: v for k, v in MODES.items() if device.type == "cuda" or v is not True}
    rows, outputs = [], {}
    with precision:
        prefill = []
        for _ in range(args.repeats + 1):
            cache = model.model.make_cache(args.batch, args.prompt + 1)
            sync(device)
            t = time.perf_counter()
            with torch.no_grad():
                model.model(ids.to(device), cache, attention_mask=mask.to(device), last_only=True)
            sync(device)
            prefill.append(time.perf_counter() - t)
        prefill_s = min(prefill[1:])
        for name, mode in modes.items():
            times, first = [], None
            for _ in range(args.repeats + 1):
                out, seconds = decode(model, ids, mask, args.new, mode)
                times.append(seconds)
                first = out if first is None else first
            seconds = min(times[1:])
            outputs[mode] = out
            # nothing stops early here: a mode that returns fewer tokens is broken, and is timed on what it made
            decoded = out.shape[1] - args.prompt
            same = lambda other: float((out == outputs[other]).all(1).float().mean()  # noqa: E731
                                       if out.shape == outputs[other].shape else 0.0)
            step_ms = 1000 * max(seconds - prefill_s, 1e-9) / max(decoded, 1)
            # random weights give near-even logits, where float rounding flips an argmax (see the docstring)
            # the same mode run twice: below 1.0 the mode itself is not deterministic at this shape, so the
            # fractions between modes measure that, not a fault of one of them
            repeat = float((out == first).all(1).float().mean()) if out.shape == first.shape else 0.0
            rows.append({"mode": name, "new_tokens": decoded, "total_s": round(seconds, 3),
                         "step_ms": round(step_ms, 2), "same_tokens_as_own_first_run": repeat,
                         "new_tokens_per_s": round(args.batch * decoded / max(seconds - prefill_s, 1e-9)),
                         **({"same_tokens_as_growing": same(False)} if mode is not False else {}),
                         **({"same_tokens_as_static_eager": same("eager")} if mode is True else {})})
            print(rows[-1], flush=True)
    try:
        check = graph_check(model, args.vocab) if device.type == "cuda" else None
    except Exception as err:  # noqa: BLE001  (the timings above are kept; the session script reads "no check")
        check = {"error": f"{type(err).__name__}: {err}"}
    if check is not None:
        print({"check": check}, flush=True)
    card = machine_card() if device.type == "cuda" else "cpu"
    report = {"card": card, "commit": current_commit(), "date": datetime.date.today().isoformat(),
              "command": "python -m experiments.benchmark_decoding "
                         + " ".join(argv if argv is not None else sys.argv[1:]),
              "size": args.size, "batch": args.batch, "prompt_tokens": [int(lengths.min()), int(lengths.max())],
              "new_tokens": args.new, "precision": "bf16 autocast" if device.type == "cuda" else "float32",
              "prefill_s": round(prefill_s, 3), "rows": rows, "check": check}
    md = [f"Card: {card}; commit {report['commit']}; `{report['command']}`", "",
          f"`{args.size}`, {args.batch} prompts of {lengths.min()}-{lengths.max()} tokens (left-padded), "
          f"{args.new} new tokens asked each, {report['precision']}; prefill {prefill_s:.3f} s. A mode's time is one "
          "whole `generate` (the graph's includes its capture) less the prefill.", "",
          "| mode | new tokens | total s | ms per token step | new tokens/s | rows equal to growing cache's | "
          "to static step's | to its own first run |", "|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['mode']} | {r['new_tokens']} | {r['total_s']} | {r['step_ms']} | {r['new_tokens_per_s']:,} | "
           f"{r.get('same_tokens_as_growing', '–')} | {r.get('same_tokens_as_static_eager', '–')} | "
           f"{r['same_tokens_as_own_first_run']} |" for r in rows]
    if check is not None and "error" in check:
        md += ["", f"Check (graph vs eager static step): failed, {check['error']}."]
    elif check is not None:
        md += ["", f"Check (graph vs eager static step, {check['prompts']} prompts of {check['prompt_tokens'][0]}-"
               f"{check['prompt_tokens'][1]} tokens, {check['new_tokens']} new tokens, float32): graph captured "
               f"{check['graph_captured']}, rows equal {check['graph_rows_equal_static']}."]
    text = "\n".join(md) + "\n"
    print(text)
    save_results(f"decoding_{args.tag or report['date']}", report, text)
    return report


if __name__ == "__main__":
    main()
