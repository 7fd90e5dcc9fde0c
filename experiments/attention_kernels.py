"""``F.scaled_dot_product_attention`` kernels on the attention shapes of the throughput benchmark's sizes.

For each size and kernel (flash, memory-efficient, cuDNN; each alone, the others disabled): the median time of forward + backward (``triton.testing.do_bench``), the achieved
TFLOP/s (causal: forward 2·B·H·T²·hd, backward 2.5× that), and the error of output and gradients against
float32 math on the same upcast inputs (fresh random inputs, batch 2). Prints a table, writes
``attention_kernels_<date>.json`` / ``.md`` to ``experiments/results/`` and ``$OUT``.

    python -m experiments.attention_kernels            # on a GPU

With torch 2.11 on Hopper, ``F.scaled_dot_product_attention`` already picks cuDNN for our training shapes
(the throughput benchmark's ``--profile`` shows ``cudnn_generated_fort_native_sdpa_sm90_flash_*`` kernels
under the default settings), the fastest of the three here; so the model leaves the choice to PyTorch.
"""

from __future__ import annotations

import argparse
import datetime

import torch
import torch.nn.functional as F

from experiments.benchmark_throughput import save_results
from lightning_modules.report_card import machine_card as card

# size: (batch, query heads, key/value heads, sequence, head size), as in benchmark_throughput.SIZES
SHAPES = {"base": (32, 12, 12, 1024, 64), "xl": (8, 32, 4, 2048, 64)}
KERNELS = ("flash", "efficient", "cudnn")


def inputs(batch: int, heads: int, kv_heads: int, seq: int, hd: int, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    make = lambda h: torch.randn(batch, h, seq, hd, device="cuda", dtype=torch.bfloat16, generator=g)  # noqa: E731
    return make(heads), make(kv_heads), make(kv_heads), make(heads)  # q, k, v, grad of the output


def run(kernel: str, q, k, v, dout):
    """Output and (dq, dk, dv) of causal attention with ``kernel`` alone enabled."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[kernel]
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    with sdpa_kernel(backend):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
    return out, torch.autograd.grad(out, (q, k, v), dout)


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).norm() / ref.double().norm())


def measure(size: str, kernel: str) -> dict:
    batch, heads, kv_heads, seq, hd = SHAPES[size]
    row = {"size": size, "kernel": kernel, "shape": f"B={batch} H={heads} KV={kv_heads} T={seq} hd={hd}"}
    try:
        q, k, v, dout = inputs(2, heads, kv_heads, seq, hd, seed=1)
        out, grads = run(kernel, q, k, v, dout)
        ref_out, ref_grads = run("math", *(t.float() for t in (q, k, v, dout)))
        row["rel_error"] = {name: round(rel_error(a, b), 5)
                            for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads))}
        del q, k, v, dout, out, grads, ref_out, ref_grads
        q, k, v, dout = inputs(batch, heads, kv_heads, seq, hd, seed=2)
        from triton.testing import do_bench

        ms = do_bench(lambda: run(kernel, q, k, v, dout), warmup=50, rep=300, return_mode="median")
    except RuntimeError as err:  # the kernel cannot take these inputs
        row["error"] = str(err).splitlines()[0][:200]
        return row
    fwd_flops = 2 * batch * heads * seq * seq * hd  # QK^T and PV, causal half of 4·B·H·T²·hd
    row.update(ms=round(ms, 3), tflops=round(fwd_flops * 3.5 / ms / 1e9, 1))
    return row


def table(rows: list[dict]) -> str:
    fastest = {}
    for r in rows:
        if "ms" in r:
            fastest[r["size"]] = min(fastest.get(r["size"], float("inf")), r["ms"])
    lines = ["| size | shape | kernel | fwd+bwd ms | TFLOP/s | vs fastest | rel. error out / dq / dk / dv |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['size']} | {r['shape']} | {r['kernel']} | failed: {r['error']} | | | |")
            continue
        err = " / ".join(f"{e:.1e}" for e in r["rel_error"].values())
        lines.append(f"| {r['size']} | {r['shape']} | {r['kernel']} | {r['ms']} | {r['tflops']} | "
                     f"{r['ms'] / fastest[r['size']]:.2f}× | {err} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    args = parser.parse_args(argv)
    rows = []
    for size in args.sizes:
        for kernel in args.kernels:
            rows.append(measure(size, kernel))
            print(rows[-1], flush=True)
    date = datetime.date.today().isoformat()
    report = {"card": card(), "date": date, "torch": torch.__version__,
              "cudnn": torch.backends.cudnn.version(), "rows": rows}
    md = (f"Card: {report['card']}; date: {date}; torch {torch.__version__}, cuDNN {report['cudnn']}; "
          f"`python -m experiments.attention_kernels`\n\n{table(rows)}\n")
    save_results(f"attention_kernels_{date}", report, md)
    print(md)


if __name__ == "__main__":
    main()
