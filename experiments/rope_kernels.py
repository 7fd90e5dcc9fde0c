"""Rotary position embedding formulations, compiled, on the throughput benchmark's q/k shapes.

Each variant takes the fused q/k/v projection's output [B, T, (H + 2·KV)·hd] (bf16), splits q and k, moves
heads forward and rotates them, as ``CausalSelfAttention`` does; ``torch.compile`` generates its kernels.
Timed: forward + backward (median, ``triton.testing.do_bench``), against the bytes a single pass must move
(read q and k, write the rotated copies; the same again backward). Every variant is checked against the
model's own ``apply_rope`` in float32.

  inline     cos/sin derived inside the compiled step from the positions, halves rotated and concatenated
             (the model before 2026-11-26)
  table      cos/sin read from precomputed [T, hd/2] tables, halves rotated and concatenated
  table_stack  the same tables, halves as a [2, hd/2] view rotated and stacked (the model's ``apply_rope`` now)
  reference  the shared reference script's formulation (interleaved pairs, cos/sin derived inline)

    python -m experiments.rope_kernels          # on a GPU; writes rope_kernels_<date>.json / .md
"""

from __future__ import annotations

import datetime

import torch

from experiments.benchmark_throughput import SIZES, load_reference, model_config, save_results
from lightning_modules.report_card import machine_card as card
from lightning_modules.transformer import apply_rope, rope_cos_sin


def split_heads(qkv: torch.Tensor, heads: int, kv_heads: int, hd: int):
    B, T, _ = qkv.shape
    q, k, _ = qkv.split([heads * hd, kv_heads * hd, kv_heads * hd], dim=-1)
    return q.view(B, T, heads, hd).transpose(1, 2), k.view(B, T, kv_heads, hd).transpose(1, 2)


def rotate_cat(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split rotation with the halves concatenated (``apply_rope`` as it was before ``table_stack``)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos.type_as(x), sin.type_as(x)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def variant(name: str, heads: int, kv_heads: int, hd: int, theta: float):
    """fn(qkv, cos, sin) -> (rotated q, rotated k) for variant ``name`` (cos/sin: [T, hd/2] tables)."""
    if name == "inline":
        def rotate(x, cos, sin):
            T = x.shape[2]
            inv = 1.0 / theta ** (torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd)
            f = torch.outer(torch.arange(T, device=x.device, dtype=torch.float32), inv)
            return rotate_cat(x, f.cos(), f.sin())
    elif name == "table":
        rotate = rotate_cat
    elif name == "table_stack":
        rotate = apply_rope
    elif name == "reference":
        ref = load_reference()

        def rotate(x, cos, sin):
            c, s = ref.rope(x.shape[2], hd, x.device)
            return ref.apply_rope(x, c, s)
    else:
        raise ValueError(name)

    def fn(qkv, cos, sin):
        q, k = split_heads(qkv, heads, kv_heads, hd)
        return rotate(q, cos, sin), rotate(k, cos, sin)

    return fn


def measure(size: str, name: str) -> dict:
    from triton.testing import do_bench

    cfg = model_config(size)
    _, T, B, _ = SIZES[size]
    H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    cos, sin = (t.cuda() for t in rope_cos_sin(T, hd, cfg.rope_theta))
    fn = torch.compile(variant(name, H, KV, hd, cfg.rope_theta))
    row = {"size": size, "variant": name, "shape": f"B={B} T={T} H={H} KV={KV} hd={hd}"}
    # check on fresh inputs against the model's rotation in float32 (the reference rotates interleaved pairs,
    # another convention: compared against its own float32 result instead)
    qkv = torch.randn(2, T, (H + 2 * KV) * hd, device="cuda")
    want = variant("reference" if name == "reference" else "table", H, KV, hd, cfg.rope_theta)(qkv, cos, sin)
    got = fn(qkv.bfloat16(), cos, sin)
    row["rel_error"] = max(float((g.double() - w.double()).norm() / w.double().norm()) for g, w in zip(got, want))
    qkv = torch.randn(B, T, (H + 2 * KV) * hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grads = [torch.randn(B, n, T, hd, device="cuda", dtype=torch.bfloat16) for n in (H, KV)]

    def step():
        q, k = fn(qkv, cos, sin)
        torch.autograd.backward((q, k), grads)

    step()
    ms = do_bench(step, warmup=50, rep=300, return_mode="median")
    moved = 2 * 2 * B * T * (H + KV) * hd * 2  # forward and backward: read and write q and k, bf16
    row.update(ms=round(ms, 3), GB_per_s=round(moved / ms / 1e6))
    return row


def main() -> None:
    rows, date, name = [], datetime.date.today().isoformat(), card()
    for size in ("base", "xl"):
        for variant_name in ("inline", "table", "table_stack", "reference"):
            rows.append(measure(size, variant_name))
            print(rows[-1], flush=True)
            lines = ["| size | shape | variant | fwd+bwd ms | GB/s of one pass | max rel. error |",
                     "|---|---|---|---|---|---|"]
            lines += [f"| {r['size']} | {r['shape']} | {r['variant']} | {r['ms']} | {r['GB_per_s']} | "
                      f"{r['rel_error']:.1e} |" for r in rows]
            md = f"Card: {name}; date: {date}; `python -m experiments.rope_kernels`\n\n" + "\n".join(lines) + "\n"
            save_results(f"rope_kernels_{date}", {"card": name, "date": date, "rows": rows}, md)  # after every row
    print(md)


if __name__ == "__main__":
    main()
