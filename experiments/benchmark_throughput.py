"""Training throughput on GPU: our stack against the shared reference, one process per row.

Rows (each in its own subprocess, so compile caches and memory never leak between them):
  stagewise  CausalLM under the Lightning Trainer: bf16-mixed (``precision: auto``), compile, fused
             AdamW with clipping at 1.0, the Throughput callback logging every 10 steps, and the
             PreemptionCheck that ``stagewise fit`` installs (matters with ``--devices`` > 1; its
             interval is ``--preemption-every``, 1 = Lightning's own check before every step)
  fp8        the same with ``Float8MixedPrecision`` (torchao float8 linears, output head in bf16)
  raw        our Transformer + the same loss and optimizer in a plain PyTorch loop
  reference_raw  the reference script's hand-written model in the raw row's loop (our loss, fused AdamW,
             two parameter groups): separates what the model costs from what the loop costs
  fsdp       the stagewise row under Lightning's ``FSDPStrategy`` (blocks wrapped, full shard), with
             ``--devices`` GPUs; then a full checkpoint is saved, loaded back into a fresh model, and
             training resumes from it for 2 steps
  reference  ``throughput_reference.py`` (``RUNS=gpt:raw FUSED=1``: hand-written model, raw loop, fused AdamW)

``--profile N`` adds a per-kernel GPU-time breakdown of N more steps to the raw rows.

Sizes: ``base`` (124M, T=1024, B=32) and ``xl`` (1.1B, T=2048, B=8), vocab 32768, random tokens from
memory. Every row times ``--steps`` steps after ``--warmup`` steps, like the reference.

    python -m experiments.benchmark_throughput --sizes base xl --rows stagewise raw reference fp8
    python -m experiments.benchmark_throughput --sizes base --rows stagewise --devices 2   # DDP
    python -m experiments.benchmark_throughput --sizes base --rows stagewise --devices 2 --preemption-every 1
    python -m experiments.benchmark_throughput --sizes xl --rows fsdp --devices 2 --row-timeout 400
    python -m experiments.benchmark_throughput --sizes base --rows reference_raw raw --profile 5

Prints a table (tokens/s, MFU, peak memory, ratio to the reference of the same size) and writes
``throughput_<date>[_tag].json`` and ``.md`` to ``experiments/results/`` and to ``$OUT`` when set, after
every row.
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

from lightning_modules.report_card import machine_card as card

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "experiments" / "reference" / "throughput_reference.py"
# size: (preset, seq_len, micro_batch, the reference's name for it)
SIZES = {"base": ("base", 1024, 32, "124M"), "xl": ("xl", 2048, 8, "1B"), "smoke": ("base", 256, 4, None),
         # the GPU pipeline's shapes (configs/pipelines/gpu.yaml, vocab 8192): its text stages and its tool stage
         "small_text": ("small", 1024, 32, None), "small_tools": ("small", 4096, 8, None)}
VOCAB = 32768
SIZE_VOCAB = {"small_text": 8192, "small_tools": 8192}  # sizes measured at another vocabulary than VOCAB


def vocab_of(size: str) -> int:
    return SIZE_VOCAB.get(size, VOCAB)


def model_config(size: str):
    from lightning_modules.transformer import TransformerConfig

    preset, seq_len, _, _ = SIZES[size]
    overrides = {"n_layers": 2} if size == "smoke" else {}
    return TransformerConfig.from_preset(preset, vocab_size=vocab_of(size), max_seq_len=max(seq_len, 2048), **overrides)


def random_windows(n: int, seq_len: int, seed: int = 0, vocab: int = VOCAB) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seq_len + 1), generator=g)
    return [{"input_ids": w[:-1], "targets": w[1:]} for w in ids]


def row_stagewise(size: str, steps: int, warmup: int, devices: int, fp8: bool, fsdp: bool = False,
                  preemption_every: int = 20, bucket_view: bool = False) -> dict:
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from callbacks.precision import Float8MixedPrecision, MixedPrecisionMonitor, resolve_precision
    from callbacks.safety import PreemptionCheck
    from callbacks.throughput import Throughput
    from lightning_modules.causal_lm import CausalLM

    _, seq_len, batch, _ = SIZES[size]
    cfg = model_config(size)
    overrides = {k: getattr(cfg, k) for k in ("n_layers", "max_seq_len")}
    model = CausalLM(size=SIZES[size][0], vocab_size=vocab_of(size), model_overrides=overrides, compile=True,
                     warmup_steps=10, max_steps=1000)
    times: list[float] = []

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == warmup:
                torch.cuda.synchronize()
                times.append(time.perf_counter())

        def on_train_end(self, trainer, pl_module):
            torch.cuda.synchronize()
            times.append(time.perf_counter())

    throughput = Throughput(log_every_n_steps=10)
    precision = {"plugins": [Float8MixedPrecision()]} if fp8 else {"precision": resolve_precision("auto")}
    strategy = fsdp_strategy() if fsdp else "auto"
    if bucket_view and devices > 1 and not fsdp:
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(gradient_as_bucket_view=True)  # gradients live in the all-reduce buckets: no copies
    trainer = L.Trainer(
        accelerator="gpu", devices=devices, max_steps=warmup + steps, gradient_clip_val=1.0, strategy=strategy,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[Timer(), throughput, MixedPrecisionMonitor(), PreemptionCheck(preemption_every)],
        use_distributed_sampler=devices > 1,
        **precision,
    )
    windows = random_windows((warmup + steps + 2) * batch * devices, seq_len, vocab=vocab_of(size))
    trainer.fit(model, DataLoader(windows, batch_size=batch, pin_memory=True, drop_last=True))
    dt = (times[1] - times[0]) / steps
    row = measured(size, dt, batch * seq_len * devices, devices)
    row["precision"] = "fp8 (torchao tensorwise) + bf16-mixed" if fp8 else str(trainer.precision)
    row["strategy"] = type(trainer.strategy).__name__
    if devices > 1:
        row["preemption_check_every"] = preemption_every
        if bucket_view and not fsdp:
            row["ddp"] = "gradient_as_bucket_view"
    if fsdp:
        row.update(fsdp_checkpoint_round_trip(trainer, model, windows, batch, warmup + steps))
    row["throughput_callback"] = {k.split("/")[1]: round(v, 4) for k, v in throughput.metrics.items()}
    row["final_loss"] = round(float(trainer.callback_metrics["train/loss"]), 4)
    return row


def fsdp_strategy():
    """Lightning's FSDPStrategy as ``configs/strategies/fsdp.yaml`` sets it up for ``stagewise fit`` (blocks
    wrapped, full shard, full-state checkpoints; ``use_orig_params``, Lightning's default, which
    ``torch.compile`` and our per-parameter optimizer groups need)."""
    from lightning_modules.cli import strategy_from_config

    return strategy_from_config(ROOT / "configs" / "strategies" / "fsdp.yaml")


def fsdp_checkpoint_round_trip(trainer, model, windows, batch: int, done_steps: int) -> dict:
    """Save a full checkpoint of the sharded run, load it into a fresh unsharded model (every tensor equal
    to the gathered shards) and resume the sharded run from it for 2 steps."""
    import tempfile

    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from lightning_modules.causal_lm import CausalLM

    path = Path(tempfile.gettempdir()) / "stagewise_fsdp_benchmark.ckpt"  # xl: ~13 GB, not a result to return
    start = time.perf_counter()
    trainer.save_checkpoint(path)
    saved_s = time.perf_counter() - start
    result = {"checkpoint_save_s": round(saved_s, 1), "checkpoint_GB": round(path.stat().st_size / 1e9, 2)}
    if trainer.global_rank == 0:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        fresh = CausalLM.from_state(ckpt["hyper_parameters"], ckpt["state_dict"], compile=False)  # strict
        result["checkpoint_loads"] = True
        result["checkpoint_optimizer_state"] = "optimizer_states" in ckpt and bool(ckpt["optimizer_states"])
        del ckpt, fresh
    torch.cuda.empty_cache()
    resumed = L.Trainer(accelerator="gpu", devices=trainer.num_devices, max_steps=done_steps + 2,
                        gradient_clip_val=1.0, strategy=fsdp_strategy(), precision=trainer.precision,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=True)
    again = CausalLM(**{**model.hparams, "compile": False})  # 2 steps: not worth compiling again
    # uncompiled, so a smaller micro-batch keeps its activations (beside the first run's state) in memory
    resumed.fit(again, DataLoader(windows, batch_size=max(1, batch // 4), drop_last=True), ckpt_path=path)
    result["resumed_to_step"] = resumed.global_step
    result["resumed_loss"] = round(float(resumed.callback_metrics["train/loss"]), 4)
    if trainer.global_rank == 0:
        path.unlink()
    return result


def row_raw(size: str, steps: int, warmup: int, reference_model: bool = False, profile_steps: int = 0) -> dict:
    """Our Transformer (or, with ``reference_model``, the reference script's hand-written ``GPT``) with our
    loss and fused AdamW in a plain loop; with ``profile_steps``, then that many steps under the profiler."""
    import torch

    from lightning_modules.causal_lm import cross_entropy
    from lightning_modules.transformer import Transformer

    torch.set_float32_matmul_precision("high")
    _, seq_len, batch, _ = SIZES[size]
    if reference_model:
        ref = load_reference()
        model = ref.GPT(*ref.SIZES[SIZES[size][3]][:7]).cuda()
        loss_fn = torch.compile(model)  # GPT.forward(ids, labels) returns the mean cross-entropy
    else:
        model = Transformer(model_config(size)).cuda()
        loss_fn = torch.compile(lambda x, y: cross_entropy(model(x), y)[0])
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "emb" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "emb" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=3e-4, betas=(0.9, 0.95), fused=True)
    windows = random_windows(batch * 4, seq_len, vocab=vocab_of(size))
    batches = [{k: torch.stack([w[k] for w in windows[i * batch:(i + 1) * batch]]).cuda() for k in windows[0]}
               for i in range(4)]

    def step(i: int) -> None:
        b = batches[i % 4]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(b["input_ids"], b["targets"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        step(i)
    torch.cuda.synchronize()
    row = measured(size, (time.perf_counter() - t0) / steps, batch * seq_len, 1)
    row["precision"] = "bf16 autocast"
    if profile_steps:
        row["profile"] = profile(step, profile_steps)
    return row


def load_reference():
    """The shared reference script as a module (its model classes and sizes)."""
    import importlib.util

    if "throughput_reference" in sys.modules:
        return sys.modules["throughput_reference"]
    spec = importlib.util.spec_from_file_location("throughput_reference", REFERENCE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # torch.compile re-imports the functions' module by name
    spec.loader.exec_module(module)
    return module


# Kernel families by name, for the profile's totals (first match wins).
KERNEL_FAMILIES = [("attention", ("flash", "fmha", "cudnn", "attention")),
                   ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "sm90")),
                   ("optimizer", ("adam", "multi_tensor", "foreach")), ("nccl", ("nccl",)),
                   ("triton (fused pointwise/reductions)", ("triton",))]


def profile(step, n: int) -> dict:
    """Run ``step`` ``n`` times under ``torch.profiler``; per step: GPU time by kernel family and the
    25 kernels with the most GPU time (ms and launches per step), plus the span of the whole window."""
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for i in range(n):
            step(i)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA
               and e.self_device_time_total > 0 and not getattr(e, "is_user_annotation", False)]
    kernels.sort(key=lambda e: -e.self_device_time_total)
    families: dict[str, float] = {}
    for e in kernels:
        name = e.key.lower()
        family = next((f for f, keys in KERNEL_FAMILIES if any(k in name for k in keys)), "other")
        families[family] = families.get(family, 0.0) + e.self_device_time_total / 1e3 / n
    return {
        "steps": n, "wall_ms_per_step": round(wall * 1e3 / n, 2),
        "gpu_ms_per_step": round(sum(families.values()), 2),
        "families_ms": {k: round(v, 2) for k, v in sorted(families.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": e.key[:120], "ms": round(e.self_device_time_total / 1e3 / n, 3),
                         "calls": round(e.count / n, 1)} for e in kernels[:25]],
    }


def measured(size: str, step_s: float, tokens_per_step: int, devices: int) -> dict:
    import torch

    from callbacks.throughput import H100_BF16_DENSE_FLOPS, flops_per_token
    from lightning_modules.transformer import Transformer

    cfg = model_config(size)
    with torch.device("meta"):
        n = Transformer(cfg).num_parameters(non_embedding=True)
    tokens_per_s = tokens_per_step / step_s
    flops = flops_per_token(n, cfg.n_layers, cfg.d_model, SIZES[size][1])
    return {
        "step_ms": round(step_s * 1e3, 1), "tokens_per_s": int(tokens_per_s),
        "mfu_pct": round(100 * tokens_per_s / devices * flops / H100_BF16_DENSE_FLOPS, 1),
        "peak_mem_GB": round(torch.cuda.max_memory_allocated() / 2**30, 1), "devices": devices,
    }


def run_reference(size: str) -> dict:
    """The shared reference script in its own process; its JSON row, renamed to our keys."""
    name = SIZES[size][3]
    env = {**os.environ, "RUNS": "gpt:raw", "FUSED": "1"}
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, str(REFERENCE), name], env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"reference failed: {proc.stdout[-1500:]}{proc.stderr[-1500:]}")
    ref = json.loads(lines[-1])
    return {"step_ms": ref["step_ms"], "tokens_per_s": ref["tokens_per_s"], "mfu_pct": ref["mfu_pct"],
            "peak_mem_GB": ref["peak_mem_GB"], "devices": 1, "precision": "bf16 autocast (FUSED=1)"}


ROWS = ("reference", "stagewise", "raw", "reference_raw", "fp8", "fsdp")


def worker(args: argparse.Namespace) -> None:
    row, size = args.worker
    if args.batch_size and row != "reference":
        preset, seq_len, _, name = SIZES[size]
        SIZES[size] = (preset, seq_len, args.batch_size, name)
    if row == "reference":
        result = run_reference(size)
    elif row in ("raw", "reference_raw"):
        result = row_raw(size, args.steps, args.warmup, reference_model=row == "reference_raw",
                         profile_steps=args.profile)
    else:
        result = row_stagewise(size, args.steps, args.warmup, args.devices, fp8=row == "fp8", fsdp=row == "fsdp",
                               preemption_every=args.preemption_every, bucket_view=args.ddp_bucket_view)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("RANK", "0")) == 0:
        print("ROW " + json.dumps({"size": size, "row": row, "micro_batch": SIZES[size][2], **result}), flush=True)


def run_row(cmd: list[str], timeout: float | None) -> tuple[str, str]:
    """Run one row's process (and the ranks it launches) with a time limit; on timeout the whole process
    group is killed and what it printed so far is returned, ending with a line that says so."""
    import signal

    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        stderr = f"{stderr}\n[killed after --row-timeout {timeout:.0f} s]"
    return stdout, stderr


def table(rows: list[dict]) -> str:
    refs = {r["size"]: r["tokens_per_s"] for r in rows if r["row"] == "reference" and "tokens_per_s" in r}
    lines = ["| size | row | GPUs | micro-batch | precision | tokens/s | MFU % | peak mem GiB/GPU | vs reference |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['size']} | {r['row']} | | | failed: {r['error'][-80:]} | | | | |")
            continue
        ratio = f"{r['tokens_per_s'] / refs[r['size']]:.3f}×" if r["size"] in refs else "–"
        lines.append(f"| {r['size']} | {r['row']} | {r['devices']} | {r.get('micro_batch', '')} | {r['precision']} | "
                     f"{r['tokens_per_s']:,} | {r['mfu_pct']} | {r['peak_mem_GB']} | {ratio} |")
    return "\n".join(lines)


def profile_text(rows: list[dict]) -> str:
    """The profiled rows' GPU time per step by kernel family and their top kernels, as markdown."""
    parts = []
    for r in rows:
        prof = r.get("profile")
        if not prof:
            continue
        families = ", ".join(f"{k} {v}" for k, v in prof["families_ms"].items())
        parts.append(f"### {r['size']} {r['row']}: {prof['wall_ms_per_step']} ms/step wall, "
                     f"{prof['gpu_ms_per_step']} ms GPU ({prof['steps']} profiled steps)\n\nGPU ms per step: {families}\n\n"
                     "| kernel | ms/step | launches/step |\n|---|---|---|\n"
                     + "\n".join(f"| `{k['name']}` | {k['ms']} | {k['calls']} |" for k in prof["top_kernels"]))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["base", "xl"], choices=list(SIZES))
    parser.add_argument("--rows", nargs="+", default=["reference", "stagewise", "raw", "fp8"], choices=ROWS)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=8, help="untimed steps first (compilation)")
    parser.add_argument("--devices", type=int, default=1,
                        help="GPUs for the stagewise/fp8 rows (DDP if > 1) and the fsdp row")
    parser.add_argument("--batch-size", type=int, help="micro-batch of our rows (default: the size's)")
    parser.add_argument("--preemption-every", type=int, default=20, metavar="N",
                        help="with --devices > 1: check for SIGTERM across ranks every N steps (PreemptionCheck, "
                        "as stagewise fit does by default); 1 = Lightning's check before every step")
    parser.add_argument("--ddp-bucket-view", action="store_true",
                        help="with --devices > 1: DDP with gradient_as_bucket_view=True (no gradient copies into "
                        "and out of the all-reduce buckets)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after timing, profile N more steps of the raw rows (GPU time by kernel)")
    parser.add_argument("--row-timeout", type=float, help="seconds before a row is killed; its output so far is "
                        "recorded as the row's error (the table and JSON are still written)")
    parser.add_argument("--tag", default="", help="suffix of the result files' names")
    parser.add_argument("--worker", nargs=2, metavar=("ROW", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    date = datetime.date.today().isoformat()
    command = " ".join(["python -m experiments.benchmark_throughput", *(argv if argv is not None else sys.argv[1:])])
    report = {"card": card(), "date": date, "command": command, "steps": args.steps, "warmup": args.warmup,
              "rows": []}
    name = f"throughput_{date}{'_' + args.tag if args.tag else ''}"
    for size in args.sizes:
        for row in args.rows:
            if row == "reference" and (SIZES[size][3] is None or not REFERENCE.exists()):
                continue
            cmd = [sys.executable, "-m", "experiments.benchmark_throughput", "--worker", row, size,
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--devices", str(args.devices),
                   "--profile", str(args.profile), "--preemption-every", str(args.preemption_every)]
            if args.ddp_bucket_view:
                cmd.append("--ddp-bucket-view")
            if args.batch_size:
                cmd += ["--batch-size", str(args.batch_size)]
            start = time.time()
            stdout, stderr = run_row(cmd, args.row_timeout)
            found = [json.loads(ln[4:]) for ln in stdout.splitlines() if ln.startswith("ROW ")]
            result = found[0] if found else {"size": size, "row": row, "error": (stderr or stdout)[-2000:].strip()}
            result["wall_s"] = round(time.time() - start, 1)
            report["rows"].append(result)
            print(json.dumps({k: v for k, v in result.items() if k != "profile"}), flush=True)
            md = f"Card: {report['card']}; date: {date}; `{command}`\n\n{table(report['rows'])}\n"
            if profile_text(report["rows"]):
                md += "\n" + profile_text(report["rows"]) + "\n"
            save_results(name, report, md)  # after every row: a call cut short keeps the rows it finished
    print(md)


def save_results(name: str, report: dict, md: str) -> None:
    """``<name>.json`` and ``<name>.md`` in ``experiments/results/`` and, when set, in ``$OUT`` (what a
    device run sends back)."""
    for folder in {ROOT / "experiments" / "results", *([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])}:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
        (folder / f"{name}.md").write_text(md)


if __name__ == "__main__":
    main()
