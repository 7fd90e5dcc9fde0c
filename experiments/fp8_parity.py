"""FP8 against bf16 on real data: the same model, data order and seed for N optimizer steps, then the
training loss of both (mean over the last ``--tail`` steps) and their relative difference.

Each precision runs in its own process; with two GPUs both run at once (``--gpus 0 1``), one per card.

    python -m experiments.fp8_parity --data-dir data/study --size xl --steps 500 --gpus 0 1

Writes ``fp8_parity_<date>.json`` (every step's loss for both runs) and ``.md`` to ``experiments/results/``
and to ``$OUT`` when set. Needs CUDA and ``torchao``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from experiments.benchmark_throughput import ROOT, save_results


def train(args: argparse.Namespace, precision: str, out: Path) -> None:
    """One run; writes ``out`` (JSON: per-step loss, tokens/s)."""
    import lightning as L
    import torch

    from callbacks.precision import Float8MixedPrecision
    from datamodules.datamodule import LanguageDataModule
    from lightning_modules.causal_lm import CausalLM

    losses: list[torch.Tensor] = []
    times: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(outputs["loss"].detach())  # read at the end: no host sync per step
            if batch_idx in (args.warmup_timing, args.steps - 1):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                times.append(time.perf_counter())

    L.seed_everything(args.seed)
    data = LanguageDataModule(data_dir=args.data_dir, seq_len=args.seq_len, batch_size=args.batch_size,
                              seed=args.seed, val_domains=["language"])
    model = CausalLM(size=args.size, vocab_size=data.vocab_size, lr=args.lr, warmup_steps=args.warmup_steps,
                     max_steps=args.steps, compile=not args.no_compile, model_overrides={"max_seq_len": args.seq_len})
    plugins = {"plugins": [Float8MixedPrecision()]} if precision == "fp8" else {"precision": "bf16-mixed"}
    trainer = L.Trainer(accelerator=args.accelerator, devices=1, max_steps=args.steps, gradient_clip_val=1.0,
                        limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()],
                        use_distributed_sampler=False, **plugins)
    trainer.fit(model, datamodule=data)
    timed = args.steps - 1 - args.warmup_timing
    result = {
        "precision": precision, "card": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "loss": [float(x) for x in losses],
        "tokens_per_s": round(timed * args.batch_size * args.seq_len / (times[1] - times[0])),
        "peak_mem_GB": round(torch.cuda.max_memory_allocated() / 2**30, 1) if torch.cuda.is_available() else None,
    }
    out.write_text(json.dumps(result))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default="data/study", help="prepared data with a language corpus")
    parser.add_argument("--size", default="xl")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--tail", type=int, default=50, help="compare the mean loss of the last N steps")
    parser.add_argument("--warmup-timing", type=int, default=20, help="steps before the tokens/s clock starts")
    parser.add_argument("--gpus", nargs="+", default=["0"], help="GPU ids; two run bf16 and fp8 at once")
    parser.add_argument("--accelerator", default="gpu", help="cpu only to check the script (no fp8 there)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--worker", nargs=2, metavar=("PRECISION", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return train(args, args.worker[0], Path(args.worker[1]))

    out_dir = Path(os.environ.get("OUT") or ROOT / "experiments" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "experiments.fp8_parity", *(argv if argv is not None else sys.argv[1:])]
    procs, files = [], {}
    for i, precision in enumerate(["bf16", "fp8"]):
        files[precision] = out_dir / f"fp8_parity_{precision}.run.json"
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": args.gpus[i % len(args.gpus)]}
        cmd = [*base, "--worker", precision, str(files[precision])]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env))
        if len(args.gpus) == 1:
            procs[-1].wait()
    for p in procs:
        p.wait()
    runs = {k: json.loads(f.read_text()) for k, f in files.items() if f.exists()}
    if len(runs) < 2:
        raise SystemExit(f"a run failed: finished {sorted(runs)}")
    tail = {k: sum(r["loss"][-args.tail:]) / args.tail for k, r in runs.items()}
    rel = (tail["fp8"] - tail["bf16"]) / tail["bf16"]
    date = datetime.date.today().isoformat()
    command = "python -m experiments.fp8_parity " + " ".join(argv if argv is not None else sys.argv[1:])
    report = {"date": date, "command": command, "card": runs["bf16"]["card"], "steps": args.steps,
              "tail": args.tail, "tail_loss": tail, "relative_difference": rel, "runs": runs}
    md = (f"FP8 vs bf16, {args.size}, {args.steps} steps of B={args.batch_size} × T={args.seq_len} on "
          f"`{args.data_dir}` (language); card {report['card']}; {date}; `{command}`\n\n"
          "| precision | mean loss, last %d steps | final loss | tokens/s | peak mem GiB |\n|---|---|---|---|---|\n"
          % args.tail)
    for k in ("bf16", "fp8"):
        r = runs[k]
        md += f"| {k} | {tail[k]:.4f} | {r['loss'][-1]:.4f} | {r['tokens_per_s']:,} | {r['peak_mem_GB']} |\n"
    md += f"\nRelative difference of the tail loss (fp8 − bf16) / bf16: {100 * rel:+.2f}% (goal: within ±1%).\n"
    for f in files.values():
        f.unlink()
    save_results(f"fp8_parity_{date}", report, md)
    print(md)


if __name__ == "__main__":
    main()
